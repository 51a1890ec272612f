"""Paged decode attention as a Triton kernel (CUDA; also runs in Triton's interpreter on CPU).

One program per (sequence, kv head) walks the sequence's block table and keeps an online
softmax over its context; the query heads of one GQA group share each loaded K/V block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit  # type: ignore[untyped-decorator]
def _paged_decode_split_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    part_out_ptr,
    part_ml_ptr,
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
    TILE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Program (b, kv head, split) covers one slice of the context (flash decoding)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    ctx = tl.load(context_lens_ptr + b)
    tiles = tl.cdiv(ctx, TILE)
    per_split = tl.cdiv(tiles, NUM_SPLITS)
    lo = split * per_split * TILE
    hi = tl.minimum(lo + per_split * TILE, ctx)
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
    offs = tl.arange(0, TILE)
    for start in range(lo, hi, TILE):
        pos = start + offs  # (TILE,)
        valid = pos < hi
        blk = tl.load(block_tables_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_off = slot[:, None] * stride_cs + kvh * stride_ch + d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (G, TILE)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    # partials: out (B, H, S, D) unnormalized; ml (B, H, S, 2) = (max, sum)
    row = (b * num_heads + heads) * NUM_SPLITS + split  # (G,)
    tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None])
    tl.store(part_ml_ptr + row * 2, m, mask=g_ok)
    tl.store(part_ml_ptr + row * 2 + 1, l_sum, mask=g_ok)


@triton.jit  # type: ignore[untyped-decorator]
def _paged_decode_reduce_kernel(  # type: ignore[no-untyped-def]
    part_out_ptr,
    part_ml_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_heads = tl.num_programs(1)
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM)
    row = (b * num_heads + h) * NUM_SPLITS + sp  # (S,)
    m = tl.load(part_ml_ptr + row * 2)
    l_sum = tl.load(part_ml_ptr + row * 2 + 1)
    m_max = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))  # (S,)
    acc = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :])  # (S, D)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_sum * w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q: (B, H, D) one query per sequence; caches: (slots, Hkv, D); block_tables:
    (B, max_blocks) int32; context_lens: (B,) int32 (including the new token). -> (B, H, D).

    The context is cut into `num_splits` slices computed in parallel and merged after, so a
    small batch still fills the GPU. The split count depends only on the batch shape, so a
    CUDA graph recorded for a batch size stays valid for any context length.
    """
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    group = h // hkv
    q = q.contiguous()
    out = torch.empty_like(q)
    if b == 0:
        return out
    if num_splits is None:
        num_splits = max(1, min(32, triton.next_power_of_2(max(1, 256 // (b * hkv)))))
    part_out = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(b, h, num_splits, 2, dtype=torch.float32, device=q.device)
    _paged_decode_split_kernel[(b, hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        part_out,
        part_ml,
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
        GROUP_PAD=max(2, triton.next_power_of_2(group)),
        TILE=max(block_size, 32),
        NUM_SPLITS=num_splits,
    )
    _paged_decode_reduce_kernel[(b, h)](
        part_out, part_ml, out, out.stride(0), out.stride(1), HEAD_DIM=d, NUM_SPLITS=num_splits
    )
    return out
