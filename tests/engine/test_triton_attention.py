"""The Triton paged decode kernel against the pure-torch path (interpreter mode on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from inferhub.layers.attention import AttentionMetadata, paged_attention  # noqa: E402
from inferhub.layers.triton_attention import (  # noqa: E402
    paged_decode_attention,
    paged_prefill_attention,
)


@pytest.mark.parametrize(
    ("h", "hkv", "d", "bs", "splits"),
    [(4, 2, 16, 4, None), (9, 3, 64, 16, 1), (8, 8, 32, 8, 4), (14, 2, 64, 16, 16)],
)
def test_triton_decode_matches_torch_path(
    h: int, hkv: int, d: int, bs: int, splits: int | None
) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("no CUDA and no interpreter")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    num_blocks = 32
    slots = num_blocks * bs
    k_cache = torch.randn(slots, hkv, d, device=device)
    v_cache = torch.randn(slots, hkv, d, device=device)
    ctx = [1, bs, 3 * bs + 1, 5 * bs - 1]
    perm = torch.randperm(num_blocks).tolist()
    tables: list[list[int]] = []
    for c in ctx:
        n = -(-c // bs)
        tables.append([perm.pop() for _ in range(n)])
    width = max(len(t) for t in tables)
    bt = torch.zeros(len(ctx), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    q = torch.randn(len(ctx), h, d, device=device)
    scale = d**-0.5
    out = paged_decode_attention(
        q,
        k_cache,
        v_cache,
        bt.to(device),
        torch.tensor(ctx, dtype=torch.int32, device=device),
        bs,
        scale,
        num_splits=splits,
    )
    # reference: gather each context and do plain softmax attention
    for i, c in enumerate(ctx):
        slots_i = torch.tensor([tables[i][p // bs] * bs + p % bs for p in range(c)], device=device)
        k = k_cache[slots_i].repeat_interleave(h // hkv, dim=1)  # (c, H, D)
        v = v_cache[slots_i].repeat_interleave(h // hkv, dim=1)
        scores = torch.einsum("hd,chd->hc", q[i], k) * scale
        ref = torch.einsum("hc,chd->hd", scores.softmax(-1), v)
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=1e-4)
    assert AttentionMetadata is not None and paged_attention is not None


def test_fused_rms_norm_matches_torch() -> None:
    from inferhub.layers.norm import RMSNorm
    from inferhub.layers.triton_fused import rms_norm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(1)
    norm = RMSNorm(96, eps=1e-5).to(device)
    with torch.no_grad():
        norm.weight.normal_()
    x, res = torch.randn(5, 96, device=device), torch.randn(5, 96, device=device)
    ref_out, ref_res = norm(x, res)
    out, new_res = rms_norm(x, res, norm.weight, 1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_res, ref_res)
    out, _ = rms_norm(x, None, norm.weight, 1e-5)
    torch.testing.assert_close(out, norm(x)[0], atol=1e-5, rtol=1e-5)


def _device() -> torch.device:
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("no CUDA and no interpreter")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _paged_context(
    lens: list[int], bs: int, hkv: int, d: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]], torch.Tensor]:
    """Caches with random contents and a block table per context (blocks shuffled)."""
    num_blocks = sum(-(-n // bs) for n in lens) + 3
    k_cache = torch.randn(num_blocks * bs, hkv, d, device=device).to(dtype)
    v_cache = torch.randn(num_blocks * bs, hkv, d, device=device).to(dtype)
    perm = torch.randperm(num_blocks).tolist()
    tables = [[perm.pop() for _ in range(-(-n // bs))] for n in lens]
    width = max(len(t) for t in tables)
    bt = torch.zeros(len(lens), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return k_cache, v_cache, tables, bt.to(device)


def _reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: list[int],
    bs: int,
    q_pos: list[int],
    scale: float,
) -> torch.Tensor:
    """Float64 softmax attention of queries q: (n, H, D) at positions q_pos over the context
    (positions 0 .. max(q_pos)) read through `table`, causally."""
    h, hkv = q.shape[1], k_cache.shape[1]
    n_ctx = max(q_pos) + 1
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(n_ctx)])
    k = k_cache[slots.to(k_cache.device)].double().repeat_interleave(h // hkv, dim=1)
    v = v_cache[slots.to(v_cache.device)].double().repeat_interleave(h // hkv, dim=1)
    scores = torch.einsum("qhd,chd->hqc", q.double(), k) * scale
    causal = torch.arange(n_ctx).unsqueeze(0) <= torch.tensor(q_pos).unsqueeze(1)  # (n, c)
    scores = scores.masked_fill(~causal.to(scores.device), float("-inf"))
    return torch.einsum("hqc,chd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("h", "hkv", "d", "bs"), [(4, 2, 16, 4), (14, 2, 64, 16), (8, 8, 32, 8)])
def test_triton_prefill_matches_reference(
    h: int, hkv: int, d: int, bs: int, dtype: torch.dtype
) -> None:
    """First chunks, chunks that continue a context (a prefix-cache hit or a chunked prompt)
    and a one-token chunk, in one launch with their rows interleaved among other rows."""
    device = _device()
    torch.manual_seed(h * d + bs)
    starts = [0, 5, 0, 2 * bs, 37]  # tokens already in the cache before this chunk
    lens = [1, 3, 70, bs + 3, 40]  # this step's new tokens
    k_cache, v_cache, tables, bt = _paged_context(
        [s + n for s, n in zip(starts, lens, strict=True)], bs, hkv, d, dtype, device
    )
    total = 7 + sum(lens)  # 7 leading rows (as decode tokens) the kernel must not touch
    q = torch.randn(total, h, d, device=device).to(dtype)
    q_start, at = [], 7
    for n in lens:
        q_start.append(at)
        at += n
    out = torch.full_like(q, float("nan"))
    ints = {"dtype": torch.int32, "device": device}
    paged_prefill_attention(
        q,
        k_cache,
        v_cache,
        bt,
        torch.tensor(q_start, **ints),
        torch.tensor(lens, **ints),
        torch.tensor(starts, **ints),
        max(lens),
        bs,
        d**-0.5,
        out,
    )
    assert torch.isnan(out[:7]).all()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for i, (s0, n) in enumerate(zip(starts, lens, strict=True)):
        rows = slice(q_start[i], q_start[i] + n)
        ref = _reference(
            q[rows], k_cache, v_cache, tables[i], bs, [s0 + j for j in range(n)], d**-0.5
        )
        torch.testing.assert_close(out[rows].double(), ref, atol=tol, rtol=tol)


def test_triton_decode_bf16_and_out_rows() -> None:
    """bfloat16 (the products on tensor cores) and the output written into rows of a larger
    tensor, as the attention layer does for a batch with prefill tokens after its decodes."""
    device = _device()
    torch.manual_seed(3)
    h, hkv, d, bs = 14, 2, 64, 16
    ctx = [1, 17, 300]
    k_cache, v_cache, tables, bt = _paged_context(ctx, bs, hkv, d, torch.bfloat16, device)
    q_all = torch.randn(len(ctx) + 2, h + 2 * hkv, d, device=device).to(torch.bfloat16)
    q = q_all[: len(ctx), :h]  # strided rows and heads, as split from the qkv projection
    out = torch.full((len(ctx) + 2, h, d), float("nan"), dtype=torch.bfloat16, device=device)
    for splits in (1, 8):
        out.fill_(float("nan"))
        paged_decode_attention(
            q,
            k_cache,
            v_cache,
            bt,
            torch.tensor(ctx, dtype=torch.int32, device=device),
            bs,
            d**-0.5,
            num_splits=splits,
            out=out[: len(ctx)],
        )
        assert torch.isnan(out[len(ctx) :]).all()
        for i, c in enumerate(ctx):
            ref = _reference(q[i : i + 1], k_cache, v_cache, tables[i], bs, [c - 1], d**-0.5)
            torch.testing.assert_close(out[i : i + 1].double(), ref, atol=2e-2, rtol=2e-2)


def test_fused_rotary_and_cache_write() -> None:
    """Rotary in place plus the layer's KV-cache writes in one launch: the same as rotary
    followed by index_copy_ of the rotated keys and the values; other slots untouched."""
    from inferhub.layers.rotary import RotaryEmbedding, apply_rotary
    from inferhub.layers.triton_fused import rotary_and_cache

    device = _device()
    torch.manual_seed(4)
    h, hkv, d, t = 6, 2, 32, 5
    rope = RotaryEmbedding(d, 256, 10000.0).to(device)
    qkv = torch.randn(t, (h + 2 * hkv) * d, device=device)
    qk = qkv[:, : (h + hkv) * d].view(t, h + hkv, d)
    v = qkv[:, (h + hkv) * d :].view(t, hkv, d)
    positions = torch.tensor([0, 7, 8, 100, 255], device=device)
    slots = torch.tensor([3, 9, 10, 17, 30], device=device)
    k_cache = torch.randn(32, hkv, d, device=device)
    v_cache = torch.randn(32, hkv, d, device=device)
    ref_qk = apply_rotary(qk.clone(), *rope.cos_sin(positions, qk.dtype))
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_k.index_copy_(0, slots, ref_qk[:, h:])
    ref_v.index_copy_(0, slots, v)
    rotary_and_cache(qk, v, positions, slots, rope.cos_cache, rope.sin_cache, k_cache, v_cache)
    torch.testing.assert_close(qk, ref_qk, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache, ref_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_cache, ref_v, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_silu_and_mul(dtype: torch.dtype) -> None:
    from inferhub.layers.activation import silu_and_mul as reference
    from inferhub.layers.triton_fused import silu_and_mul

    device = _device()
    torch.manual_seed(5)
    x = (torch.randn(3, 2 * 1500, device=device) * 4).to(dtype)  # columns over 2 programs
    # bfloat16: within an ulp or two (where the rounding of the two steps falls differently)
    rtol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(silu_and_mul(x), reference(x), atol=1e-2, rtol=rtol)


def test_triton_attention_refuses_shapes_a_gpu_cannot_compile() -> None:
    """head_dim under 16 or not a power of two, and split counts that are not powers of two,
    fail with a clear error (the interpreter would run them; compiled tl.dot would not)."""
    device = _device()
    ctx = torch.tensor([3], dtype=torch.int32, device=device)
    table = torch.zeros(1, 1, dtype=torch.int32, device=device)
    for d in (8, 48):
        q = torch.randn(1, 2, d, device=device)
        cache = torch.randn(4, 1, d, device=device)
        with pytest.raises(ValueError, match="head_dim"):
            paged_decode_attention(q, cache, cache, table, ctx, 4, 1.0)
        with pytest.raises(ValueError, match="head_dim"):
            paged_prefill_attention(q, cache, cache, table, ctx, ctx, ctx, 1, 4, 1.0, q)
    q = torch.randn(1, 2, 16, device=device)
    cache = torch.randn(4, 1, 16, device=device)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(q, cache, cache, table, ctx, 4, 1.0, num_splits=3)
