"""Paged attention as Triton kernels (CUDA; also run in Triton's interpreter on CPU for tests).

Decode: one program per (sequence, kv head, context split) walks the sequence's block table
with an online softmax; the query heads of one GQA group (padded to 16 rows) share each K/V
tile, and both products run as `tl.dot` on the tensor cores. A first version that multiplied
broadcast (group, tile, head_dim) tensors in registers spilled, and took 387 us a layer for 256
sequences of 600 tokens on an H100 (87% of the decode step).

Prefill: one program per (sequence, query head, tile of 64 queries) attends causally over
the sequence's context read through its block table, so first chunks, continued chunks and
prefix-cache hits take one launch for the whole batch, with no padding and no gathered copy
of the context.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _ieee(dtype: torch.dtype) -> bool:
    """Products in float32 ("ieee"): for float32 caches, and in Triton's interpreter, whose
    `tl.dot` gives wrong results for bfloat16 operands (Triton 3.9). Otherwise the operands'
    own dtype on the tensor cores, with float32 accumulation (P cast to V's dtype, as flash
    attention does)."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit  # type: ignore[untyped-decorator]
def _attend_tile(  # type: ignore[no-untyped-def]
    q,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    pos,
    valid,
    kvh,
    stride_cs,
    stride_ch,
    scale,
    m,
    l_sum,
    acc,
    causal_pos,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One tile of keys for the rows of q (R, D): read the keys and values of positions `pos`
    through the block table row at table_ptr, score them (masked where not `valid`, and with
    CAUSAL where a key follows the row's position causal_pos (R,)), and fold them into the
    online softmax (m, l_sum, acc). Returns the new (m, l_sum, acc)."""
    d = tl.arange(0, HEAD_DIM)
    blk = tl.load(table_ptr + pos // BLOCK_SIZE, mask=valid, other=0)
    slot = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
    kv_off = slot[:, None] * stride_cs + kvh * stride_ch + d[None, :]
    k = tl.load(k_cache_ptr + kv_off, mask=valid[:, None], other=0.0)  # (N, D)
    v = tl.load(v_cache_ptr + kv_off, mask=valid[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    ok = valid[None, :]
    if CAUSAL:
        ok = ok & (pos[None, :] <= causal_pos[:, None])
    s = tl.where(ok, s * scale, float("-inf"))  # (R, N)
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    l_sum = l_sum * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_sum, acc * alpha[:, None] + pv


@triton.jit  # type: ignore[untyped-decorator]
def _paged_decode_split_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_out_ptr,
    part_ml_ptr,
    block_tables_ptr,
    context_lens_ptr,
    scale,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cs,
    stride_ch,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    TILE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Program (b, kv head, split) covers one slice of the context (flash decoding). With one
    split it writes the normalized output itself; else partials for the reduce kernel."""
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
    )  # (G, D)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_sum = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    offs = tl.arange(0, TILE)
    for start in range(lo, hi, TILE):
        pos = start + offs  # (TILE,)
        m, l_sum, acc = _attend_tile(
            q,
            k_cache_ptr,
            v_cache_ptr,
            block_tables_ptr + b * stride_bt,
            pos,
            pos < hi,
            kvh,
            stride_cs,
            stride_ch,
            scale,
            m,
            l_sum,
            acc,
            m,  # (no causal mask: every key of the context precedes the query)
            BLOCK_SIZE=BLOCK_SIZE,
            HEAD_DIM=HEAD_DIM,
            CAUSAL=False,
            IEEE=IEEE,
        )
    if NUM_SPLITS == 1:
        out = acc / l_sum[:, None]
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=g_ok[:, None],
        )
    else:
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


def _check_head_dim(d: int) -> None:
    """tl.arange needs a power of two, and compiled tl.dot needs every dimension >= 16 (the
    interpreter accepts less, so a test could pass on the CPU and fail on a GPU)."""
    if d < 16 or d & (d - 1):
        raise ValueError(f"the Triton attention kernels take head_dim 16, 32, 64, ...: not {d}")


def decode_splits(batch: int, num_kv_heads: int) -> int:
    """How many slices of the context a decode step's programs split into: enough programs
    for a small batch to fill the GPU. It depends only on the batch shape, so a CUDA graph
    recorded for a batch size stays valid for any context length."""
    return max(1, min(32, triton.next_power_of_2(max(1, 256 // (batch * num_kv_heads)))))


def decode_tile(block_size: int, head_dim: int) -> int:
    """Context positions per loop step of the decode kernel: 64 for heads of up to 64 dims,
    else 32 (the K and V tiles of 128-dim heads stay in registers)."""
    return max(block_size, 64 if head_dim <= 64 else 32)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    tile: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """q: (B, H, D) one query per sequence (rows and heads may be strided; D contiguous);
    caches: (slots, Hkv, D); block_tables: (B, max_blocks) int32; context_lens: (B,) int32
    (including the new token). Returns (B, H, D), written into `out` when given."""
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    group = h // hkv
    _check_head_dim(d)
    if q.stride(2) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    if num_splits is None:
        num_splits = decode_splits(b, hkv)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, not {num_splits}")
    # (with one split unused, but never an empty tensor: Triton refuses a null pointer)
    part_out = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(b, h, num_splits, 2, dtype=torch.float32, device=q.device)
    _paged_decode_split_kernel[(b, hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        part_out,
        part_ml,
        block_tables,
        context_lens,
        scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_tables.stride(0),
        BLOCK_SIZE=block_size,
        HEAD_DIM=d,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        TILE=tile or decode_tile(block_size, d),
        NUM_SPLITS=num_splits,
        IEEE=_ieee(q.dtype),
        num_warps=num_warps,
    )
    if num_splits > 1:
        _paged_decode_reduce_kernel[(b, h)](
            part_out,
            part_ml,
            out,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=d,
            NUM_SPLITS=num_splits,
        )
    return out


@triton.jit  # type: ignore[untyped-decorator]
def _paged_prefill_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    q_start_ptr,
    q_len_ptr,
    ctx_start_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cs,
    stride_ch,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Program (sequence, query head, query tile): BLOCK_M of the sequence's new queries
    against its context (positions 0 .. the tile's last query), causally."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    mt = tl.program_id(2)
    q_len = tl.load(q_len_ptr + s)
    if mt * BLOCK_M < q_len:
        q0 = tl.load(q_start_ptr + s)
        c0 = tl.load(ctx_start_ptr + s)
        kvh = h // GROUP
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        d = tl.arange(0, HEAD_DIM)
        q_off = (q0 + rows).to(tl.int64)[:, None] * stride_qt + h * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)  # (M, D)
        q_pos = c0 + rows  # absolute position of each query
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        hi = c0 + tl.minimum((mt + 1) * BLOCK_M, q_len)  # keys up to the tile's last query
        offs = tl.arange(0, BLOCK_N)
        for start in range(0, hi, BLOCK_N):
            pos = start + offs
            m, l_sum, acc = _attend_tile(
                q,
                k_cache_ptr,
                v_cache_ptr,
                block_tables_ptr + s * stride_bt,
                pos,
                pos < hi,
                kvh,
                stride_cs,
                stride_ch,
                scale,
                m,
                l_sum,
                acc,
                q_pos,
                BLOCK_SIZE=BLOCK_SIZE,
                HEAD_DIM=HEAD_DIM,
                CAUSAL=True,
                IEEE=IEEE,
            )
        out = acc / tl.where(l_sum > 0.0, l_sum, 1.0)[:, None]
        o_off = (q0 + rows).to(tl.int64)[:, None] * stride_ot + h * stride_oh + d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    ctx_start: torch.Tensor,
    max_q_len: int,
    block_size: int,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Causal attention of prefill chunks over the paged cache, which already holds their
    own keys and values. q, out: (T, H, D) flat tokens (D contiguous); sequence i's queries
    are rows q_start[i] .. q_start[i] + q_len[i] and sit at positions ctx_start[i] + j of its
    context; block_tables: (S, max_blocks) int32. Writes those rows of `out`."""
    s = block_tables.shape[0]
    h, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[1]
    _check_head_dim(d)
    if s == 0 or max_q_len == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    block_m = 64 if max_q_len > 32 else 16
    grid = (s, h, triton.cdiv(max_q_len, block_m))
    _paged_prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        q_start,
        q_len,
        ctx_start,
        scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_tables.stride(0),
        BLOCK_SIZE=block_size,
        HEAD_DIM=d,
        GROUP=h // hkv,
        BLOCK_M=block_m,
        BLOCK_N=64,  # also for short chunks, which may continue a long context
        IEEE=_ieee(q.dtype),
    )
    return out
