"""Paged decode attention as a Triton kernel (CUDA; also runs in Triton's interpreter on CPU).

One program per (sequence, kv head) walks the sequence's block table and keeps an online
softmax over its context; the query heads of one GQA group share each loaded K/V block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit  # type: ignore[untyped-decorator]
def _paged_decode_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    context_lens_ptr,
    scale,
    stride_qb,
    stride_qh,
    stride_cs,
    stride_ch,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCKS_PER_ITER: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + b)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    g_ok = g < GROUP
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None],
        other=0.0,
    ).to(tl.float32)  # (G, D)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_sum = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    TILE: tl.constexpr = BLOCK_SIZE * BLOCKS_PER_ITER
    offs = tl.arange(0, TILE)
    for start in range(0, ctx, TILE):
        pos = start + offs  # (TILE,)
        valid = pos < ctx
        blk = tl.load(block_tables_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_off = slot[:, None] * stride_cs + kvh * stride_ch + d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (G, TILE)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / l_sum[:, None]
    tl.store(
        out_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=g_ok[:, None],
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q: (B, H, D) one query per sequence; caches: (slots, Hkv, D); block_tables:
    (B, max_blocks) int32; context_lens: (B,) int32 (including the new token). -> (B, H, D)."""
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    group = h // hkv
    q = q.contiguous()
    out = torch.empty_like(q)
    if b == 0:
        return out
    blocks_per_iter = max(1, 64 // block_size)
    _paged_decode_kernel[(b, hkv)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        context_lens,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_tables.stride(0),
        BLOCK_SIZE=block_size,
        HEAD_DIM=d,
        GROUP=group,
        GROUP_PAD=max(1, triton.next_power_of_2(group)),
        BLOCKS_PER_ITER=blocks_per_iter,
    )
    return out
