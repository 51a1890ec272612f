"""Attention over the paged KV cache.

The flat batch holds `num_decode_tokens` decode tokens (one per sequence) first, then the
prefill chunks that continue a context, then the first chunks (whose context is just their
own tokens: no gather, no mask). New keys and values are written into the cache at
`slot_mapping`; each query then attends to its sequence's context gathered from the cache
through the block table.
Backends: "torch" (plain matmul + softmax, runs everywhere), "sdpa"
(`scaled_dot_product_attention`), "cpu" (decodes read the cache in place with the C kernel of
cpu_kernels.py; prefill chunks as "sdpa") and "triton" on CUDA (see triton_attention.py:
decodes and every prefill chunk read the cache in place, in one launch each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inferhub.layers import cpu_kernels

# Backends whose decode kernel walks the block tables itself (no padded context group); they
# also bring fused RMSNorm and rotary kernels.
KERNEL_BACKENDS = ("triton", "cpu")


# First chunks up to this many tokens take the C causal kernel on the cpu backend (float32):
# 1.5-2.4x torch's flash attention at 128-512 tokens on 2 Zen 3 cores, 1.1x at 2048.
CAUSAL_KERNEL_MAX_LEN = 2048


@dataclass
class AttentionGroup:
    """A padded group of sequences that attend in one call."""

    q_index: torch.Tensor  # (B, Q) index of each query into the group's flat tokens
    q_valid: torch.Tensor  # (B, Q) bool, False for padding
    blocks: torch.Tensor  # (B, nb) block table; the context is nb * block_size positions
    mask: torch.Tensor  # (B, 1, Q, L) bool, True where the query may attend
    all_valid: bool  # no padded queries (every row has Q queries)
    # One sequence only: its context length (keys past it are dropped instead of masked).
    context_len: int | None = None
    # Every sequence's queries start at position 0: its context is exactly this step's new
    # keys and values (a first prefill chunk without a prefix-cache hit).
    all_from_start: bool = False
    num_tokens: int | None = None  # the group's flat tokens (None: the rest of the batch)
    # (2, B) int32 on the CPU: each sequence's first flat row in the group and its number of
    # rows (the C causal kernel of a first chunk reads the flat rows without padding)
    bounds: torch.Tensor | None = None


@dataclass
class PrefillKernelInputs:
    """The prefill chunks of a step for the triton backend's prefill kernel, which reads each
    sequence's context through its block table: every chunk in one launch."""

    block_tables: torch.Tensor  # (S, max_blocks) int32
    q_start: torch.Tensor  # (S,) int32: flat index of each chunk's first token
    q_len: torch.Tensor  # (S,) int32: its new tokens
    ctx_start: torch.Tensor  # (S,) int32: tokens already in the cache before them
    max_q_len: int


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner and shared by every layer."""

    slot_mapping: torch.Tensor  # (T,) cache slot for each new token
    num_decode_tokens: int
    decode: AttentionGroup | None
    prefill: AttentionGroup | None  # chunks that continue a context (or any, built alone)
    # First chunks (after `prefill`'s tokens), attended causally over their own keys: kept
    # apart so that one continuing chunk does not send them all through the gathered,
    # masked path (SmolLM2, 15 first chunks of 128 tokens beside one continuing chunk of
    # 112: the step's attention over 30 layers 107 -> 82 ms)
    prefill_fresh: AttentionGroup | None = None
    # For kernels that walk the block table themselves (triton and cpu backends).
    block_tables: torch.Tensor | None = None  # (B, max_blocks) int32, decodes first
    context_lens: torch.Tensor | None = None  # (B,) int32
    block_size: int = 16
    prefill_kernel: PrefillKernelInputs | None = None  # triton: instead of the two groups

    @property
    def has_prefill(self) -> bool:
        return (
            self.prefill is not None
            or self.prefill_fresh is not None
            or self.prefill_kernel is not None
        )


def _attend_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: (B, H, Q, D); k, v: (B, Hkv, L, D); mask: (B, 1, Q, L). Returns (B, H, Q, D)."""
    b, h, qlen, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    qg = q.reshape(b, hkv, g * qlen, d)  # (B, Hkv, G*Q, D)
    scores = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * scale  # (B, Hkv, G*Q, L)
    scores = scores.view(b, hkv, g, qlen, -1)
    scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))  # mask (B, 1, 1, Q, L)
    probs = torch.softmax(scores, dim=-1).view(b, hkv, g * qlen, -1)
    out = torch.matmul(probs, v.float())  # (B, Hkv, G*Q, D)
    return out.view(b, h, qlen, d).to(q.dtype)


def _attend_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool = False,
) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal, enable_gqa=True
    )


def _attend_group(
    q_flat: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: AttentionGroup,
    scale: float,
    backend: str,
    block_size: int,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    c_causal: bool = False,
) -> torch.Tensor:
    """q_flat: (N, H, D) for this group's tokens, k_new / v_new (N, Hkv, D) their new keys
    and values; returns (N, H, D). c_causal: a first-chunk group may take the C causal
    kernel (cpu backend)."""
    if (
        c_causal
        and group.all_from_start
        and group.bounds is not None
        and k_new is not None
        and v_new is not None
        and group.q_index.shape[1] <= CAUSAL_KERNEL_MAX_LEN
    ):
        out = cpu_kernels.causal_attention(q_flat, k_new, v_new, group.bounds, scale)
        if out is not None:
            return out
    q = _padded(q_flat, group)  # (B, Q, H, D)
    if group.all_from_start and k_new is not None and v_new is not None and backend != "torch":
        # The context is exactly this step's tokens: attend over them causally (no gather
        # from the cache, no mask). Padding sits after each sequence's last query, so no real
        # query sees it; the padded queries' rows are dropped below.
        k, v = _padded(k_new, group), _padded(v_new, group)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, Q, D)
        out = _attend_sdpa(q, k, v, None, scale, is_causal=True)
    else:
        b, nb = group.blocks.shape
        hkv, d = k_cache.shape[1], k_cache.shape[2]
        # Copy whole blocks with index_select (a memcpy per block, far faster than advanced
        # indexing): (B * nb, block * Hkv * D) -> (B, L, Hkv, D)
        flat = group.blocks.reshape(-1)
        k = torch.index_select(k_cache.view(-1, block_size * hkv * d), 0, flat)
        v = torch.index_select(v_cache.view(-1, block_size * hkv * d), 0, flat)
        k = k.view(b, nb * block_size, hkv, d)
        v = v.view(b, nb * block_size, hkv, d)
        mask = group.mask
        if group.context_len is not None:  # one sequence: drop the keys past its context
            k, v = k[:, : group.context_len], v[:, : group.context_len]
            mask = mask[..., : group.context_len]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, len, D)
        if backend == "torch":
            out = _attend_torch(q, k, v, mask, scale)
        elif group.context_len is not None and q.shape[2] == 1:  # a decode sees its context
            out = _attend_sdpa(q, k, v, None, scale)
        else:
            out = _attend_sdpa(q, k, v, mask, scale)
    out = out.transpose(1, 2)  # (B, Q, H, D)
    if group.all_valid:
        return out.reshape(-1, out.shape[-2], out.shape[-1])
    return out[group.q_valid]  # (N, H, D)


def _padded(flat: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """A group's flat rows (N, ...) as (B, Q, ...), padded where sequences are shorter. With
    no padding the rows are already in that order (each sequence's tokens follow the last)."""
    if group.all_valid:
        return flat.reshape(*group.q_index.shape, *flat.shape[1:])
    return flat[group.q_index]


def _decode_kernel(backend: str) -> Callable[..., torch.Tensor]:
    """The decode kernel of a backend that walks the block tables itself:
    (q, k_cache, v_cache, block_tables, context_lens, block_size, scale) -> out."""
    if backend == "triton":
        from inferhub.layers import triton_attention

        return triton_attention.paged_decode_attention
    return cpu_kernels.paged_decode_attention


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    backend: str = "sdpa",
    kv_written: bool = False,
) -> torch.Tensor:
    """q: (T, H, D); k, v: (T, Hkv, D); caches: (num_slots, Hkv, D). Returns (T, H, D).
    kv_written: the caller already wrote k and v into the caches (a fused rotary kernel)."""
    if not kv_written and backend == "cpu":
        cpu_kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    elif not kv_written:
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
    nd = meta.num_decode_tokens
    pk = meta.prefill_kernel if backend == "triton" else None
    # the triton prefill kernel writes its rows of one output; the decode rows go there too
    out = None if pk is None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    decode_out: torch.Tensor | None = None
    if backend in KERNEL_BACKENDS and nd > 0:
        assert meta.block_tables is not None and meta.context_lens is not None
        decode_out = _decode_kernel(backend)(
            q[:nd],
            k_cache,
            v_cache,
            meta.block_tables[:nd],
            meta.context_lens[:nd],
            meta.block_size,
            scale,
            **({} if out is None else {"out": out[:nd]}),
        )
    elif meta.decode is not None:
        decode_out = _attend_group(
            q[:nd], k_cache, v_cache, meta.decode, scale, backend, meta.block_size
        )
    if pk is not None and out is not None:
        from inferhub.layers import triton_attention

        return triton_attention.paged_prefill_attention(
            q,
            k_cache,
            v_cache,
            pk.block_tables,
            pk.q_start,
            pk.q_len,
            pk.ctx_start,
            pk.max_q_len,
            meta.block_size,
            scale,
            out,
        )
    c_causal = backend == "cpu"  # first chunks on the C causal kernel where it runs
    if backend in KERNEL_BACKENDS:
        backend = "sdpa"  # their prefill chunks
    outs = [] if decode_out is None else [decode_out]
    start = nd
    for group in (meta.prefill, meta.prefill_fresh):
        if group is None:
            continue
        end = q.shape[0] if group.num_tokens is None else start + group.num_tokens
        outs.append(
            _attend_group(
                q[start:end],
                k_cache,
                v_cache,
                group,
                scale,
                backend,
                meta.block_size,
                k[start:end],
                v[start:end],
                c_causal,
            )
        )
        start = end
    assert outs, "a step with no tokens"
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
