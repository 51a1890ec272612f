"""The Triton paged decode kernel against the pure-torch path (interpreter mode on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from inferhub.layers.attention import AttentionMetadata, paged_attention  # noqa: E402
from inferhub.layers.triton_attention import paged_decode_attention  # noqa: E402


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


def test_fused_rotary_matches_torch() -> None:
    from inferhub.layers.rotary import RotaryEmbedding, apply_rotary
    from inferhub.layers.triton_fused import rotary_inplace

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rope = RotaryEmbedding(32, 128, 10000.0).to(device)
    qkv = torch.randn(6, 7 * 32, device=device)
    qk = qkv[:, : 5 * 32].view(6, 5, 32)  # a strided view, as in the model
    positions = torch.tensor([0, 3, 9, 10, 64, 127], device=device)
    ref = apply_rotary(qk.clone(), *rope.cos_sin(positions, qk.dtype))
    rotary_inplace(qk, positions, rope.cos_cache, rope.sin_cache)
    torch.testing.assert_close(qk, ref, atol=1e-5, rtol=1e-5)
