"""The C kernels (layers/csrc): decode attention against plain softmax attention, RMSNorm and
rotary against the torch code they replace; how the engine picks them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from inferhub.engine.device import resolve_backend
from inferhub.engine.llm import LLM
from inferhub.engine.sampling_params import SamplingParams
from inferhub.layers import cpu_kernels
from inferhub.layers.activation import silu_and_mul
from inferhub.layers.norm import RMSNorm
from inferhub.layers.rotary import RotaryEmbedding, apply_rotary

CPU = torch.device("cpu")

needs_kernel = pytest.mark.skipif(
    cpu_kernels.library() is None, reason="no C compiler: the CPU kernels cannot be built"
)


def reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: list[list[int]],
    ctx: list[int],
    bs: int,
    scale: float,
) -> torch.Tensor:
    h, hkv = q.shape[1], k_cache.shape[1]
    out = []
    for i, c in enumerate(ctx):
        slots = torch.tensor([tables[i][p // bs] * bs + p % bs for p in range(c)])
        k = k_cache[slots].double().repeat_interleave(h // hkv, dim=1)  # (c, H, D)
        v = v_cache[slots].double().repeat_interleave(h // hkv, dim=1)
        scores = torch.einsum("hd,chd->hc", q[i].double(), k) * scale
        out.append(torch.einsum("hc,chd->hd", scores.softmax(-1), v))
    return torch.stack(out)


def run_case(
    h: int, hkv: int, d: int, bs: int, ctx: list[int], dtype: torch.dtype, seed: int = 0
) -> None:
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = sum(-(-c // bs) for c in ctx)
    num_blocks = blocks_needed + 5
    k_cache = torch.randn(num_blocks * bs, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks * bs, hkv, d, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # scattered blocks
    tables = [[perm.pop() for _ in range(-(-c // bs))] for c in ctx]
    width = max(len(t) for t in tables) + 1  # a wider table than any sequence needs
    bt = torch.zeros(len(ctx), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    # q as a view into a wider row (as it is a slice of the fused qkv output in a layer)
    q = torch.randn(len(ctx), h + 2, d, generator=gen).to(dtype)[:, :h]
    scale = d**-0.5
    out = cpu_kernels.paged_decode_attention(
        q, k_cache, v_cache, bt, torch.tensor(ctx, dtype=torch.int32), bs, scale
    )
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    ref = reference(q, k_cache, v_cache, tables, ctx, bs, scale)
    tol = 1e-5 if dtype is torch.float32 else 1.6e-2  # bf16: the output's own rounding
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("h", "hkv", "d", "bs"),
    [
        (9, 3, 64, 16),  # SmolLM2: AVX-512 path, GQA groups of 3
        (28, 4, 128, 16),  # Qwen2-7B heads
        (4, 4, 32, 8),  # no GQA
        (8, 2, 96, 32),  # bf16 dot products of any multiple of 32, larger blocks
        (6, 2, 40, 4),  # head_dim not a multiple of 16: AVX2's path (or the portable one)
        (4, 2, 36, 4),  # not a multiple of 8 either: the portable C path
    ],
)
@pytest.mark.parametrize(
    "ctx",
    [
        [1],  # one token of context
        [37],
        [1, 16, 17, 300],  # block edges, few sequences: one work item per kv head
        [5 + 7 * i for i in range(20)],  # many sequences: one work item per sequence
    ],
)
def test_kernel_matches_softmax_attention(
    h: int, hkv: int, d: int, bs: int, ctx: list[int], dtype: torch.dtype
) -> None:
    run_case(h, hkv, d, bs, ctx, dtype)


@needs_kernel
def test_kernel_uses_every_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            run_case(9, 3, 64, 16, [200 + 31 * i for i in range(12)], torch.bfloat16, seed=n)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_auto_backend_on_the_cpu_is_the_kernel_for_float32_and_bfloat16() -> None:
    assert resolve_backend("auto", CPU, torch.bfloat16) == "cpu"
    assert resolve_backend("auto", CPU, torch.float32) == "cpu"
    assert resolve_backend("cpu", CPU, torch.float32) == "cpu"


def test_without_the_kernel_auto_falls_back_and_cpu_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu_kernels.library.cache_clear()
    monkeypatch.setenv("INFERHUB_DISABLE_CPU_KERNELS", "1")
    try:
        assert cpu_kernels.library() is None
        assert resolve_backend("auto", CPU, torch.bfloat16) == "sdpa"
        with pytest.raises(ValueError, match="C compiler"):
            resolve_backend("cpu", CPU, torch.bfloat16)
    finally:
        cpu_kernels.library.cache_clear()


@needs_kernel
def test_build_goes_to_the_cache_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERHUB_KERNEL_CACHE", str(tmp_path))
    compiler = cpu_kernels._compiler()
    assert compiler is not None
    first = cpu_kernels._build(compiler)
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels._build(compiler) == first  # same key: reused, not rebuilt
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def test_a_failing_compiler_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERHUB_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="failed"):
        cpu_kernels._build("false")  # exits 1 without output
    assert list(tmp_path.iterdir()) == []


def ulp_mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of elements that differ (bf16: by more than nothing at all)."""
    return (a != b).float().mean().item()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 300])  # 300 x 576: the parallel path
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_torch_path(
    dtype: torch.dtype, rows: int, with_residual: bool
) -> None:
    torch.manual_seed(rows)
    hidden = 576
    norm = RMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden))
    wide = torch.randn(rows, hidden + 64).to(dtype)
    x = wide[:, :hidden]  # rows further apart than hidden, as a slice of a wider output
    residual = torch.randn(rows, hidden).to(dtype) if with_residual else None
    with torch.inference_mode():
        ref_out, ref_res = norm(x, residual)
        out, res = cpu_kernels.rms_norm(x, residual, norm.weight, norm.eps)
    assert torch.equal(res, ref_res)  # the residual sum is rounded exactly as torch does
    if dtype is torch.float32:
        torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    else:  # the float32 sum of squares may differ in its last bit, rarely moving a bf16 value
        assert ulp_mismatch(out, ref_out) < 0.01
        torch.testing.assert_close(out.float(), ref_out.float(), rtol=1e-2, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 200])
def test_rotary_in_place_matches_apply_rotary(dtype: torch.dtype, tokens: int) -> None:
    torch.manual_seed(tokens)
    heads, kv_heads, d = 9, 3, 64
    rotary = RotaryEmbedding(d, 4096, 10000.0)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d).to(dtype)
    qk = qkv[:, : (heads + kv_heads) * d].view(tokens, heads + kv_heads, d)
    positions = torch.randint(0, 4096, (tokens,))
    ref = apply_rotary(qk, *rotary.cos_sin(positions, dtype))
    v_before = qkv[:, (heads + kv_heads) * d :].clone()
    cpu_kernels.rotary_inplace(qk, positions, rotary.cos_cache, rotary.sin_cache)
    assert torch.equal(qk, ref)  # every product and sum rounded as torch rounds it
    assert torch.equal(qkv[:, (heads + kv_heads) * d :], v_before)  # v untouched


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "inter"), [(1, 1536), (3, 37), (64, 1536)])  # 37: the tail
def test_silu_and_mul_matches_the_torch_path(dtype: torch.dtype, rows: int, inter: int) -> None:
    torch.manual_seed(inter)
    gate_up = (4 * torch.randn(rows, 2 * inter)).to(dtype)
    gate_up[0, :3] = torch.tensor([-200.0, 200.0, 0.0])  # exp under- and overflow
    ref = silu_and_mul(gate_up)
    out = cpu_kernels.silu_and_mul(gate_up)
    if dtype is torch.float32:
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-6)
    else:  # exp differs from torch's in the last float32 bit, rarely moving a bf16 value
        assert ulp_mismatch(out, ref) < 0.01
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_fills_the_slots_from_strided_rows(dtype: torch.dtype) -> None:
    t, hkv, d = 5, 3, 16
    qkv = torch.randn(t, (4 + 2 * hkv) * d).to(dtype)
    k = qkv[:, 4 * d : (4 + hkv) * d].view(t, hkv, d)  # views into a wider row, as in a layer
    v = qkv[:, (4 + hkv) * d :].view(t, hkv, d)
    k_cache = torch.zeros(40, hkv, d, dtype=dtype)
    v_cache = torch.zeros(40, hkv, d, dtype=dtype)
    slots = torch.tensor([7, 0, 39, 12, 13])
    cpu_kernels.write_kv(k, v, k_cache, v_cache, slots)
    ref_k, ref_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    ref_k.index_copy_(0, slots, k)
    ref_v.index_copy_(0, slots, v)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


needs_amx = pytest.mark.skipif(
    not cpu_kernels.amx_available(), reason="no AMX tiles on this CPU (or not granted)"
)


@needs_amx
@pytest.mark.parametrize(
    ("m", "k", "n"), [(1, 576, 960), (37, 576, 3072), (64, 1536, 576), (300, 896, 4864)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_amx_linear_matches_f_linear(m: int, k: int, n: int, with_bias: bool) -> None:
    torch.manual_seed(m)
    w = torch.randn(n, k).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    x = torch.randn(m, k + 64).to(torch.bfloat16)[:, :k]  # rows further apart than k
    out = cpu_kernels.amx_linear_bf16(x, cpu_kernels.amx_pack_bf16(w), n, bias)
    ref = torch.nn.functional.linear(x, w, bias)
    exact = torch.nn.functional.linear(
        x.double(), w.double(), None if bias is None else bias.double()
    )
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    # float32 sums in another order than oneDNN's: the same bf16 value but for a rare last bit
    assert ulp_mismatch(out, ref) < 1e-3
    torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=2e-2 * k**0.5)


@needs_amx
def test_amx_packing_refuses_shapes_it_cannot_tile() -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        cpu_kernels.amx_pack_bf16(torch.zeros(48, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="multiples of 32"):
        cpu_kernels.amx_pack_bf16(torch.zeros(64, 64, dtype=torch.float32))


@needs_amx
def test_amx_linear_layer_small_calls_on_tiles_large_ones_on_torch() -> None:
    from inferhub.layers.amx_linear import AMX_MAX_ROWS, AmxLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=True).to(torch.bfloat16)
    layer = AmxLinear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias  # tying survives
    with torch.inference_mode():
        small = torch.randn(5, 64).to(torch.bfloat16)
        big = torch.randn(AMX_MAX_ROWS + 1, 64).to(torch.bfloat16)
        packed = cpu_kernels.amx_linear_bf16(small, layer.packed, 96, linear.bias)
        assert torch.equal(layer(small), packed)
        assert torch.equal(layer(big), linear(big))


@needs_amx
def test_low_bit_layers_run_their_dense_calls_on_amx() -> None:
    from inferhub.layers.quant_linear import Int8Linear

    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 128, bias=False).to(torch.bfloat16)
    layer = Int8Linear(linear, max_rows=4)
    x = torch.randn(9, 64).to(torch.bfloat16)  # above the 8-bit rows: the dense path
    with torch.inference_mode():
        before = layer(x)
        layer.use_amx()
        assert layer.amx_packed is not None
        after = layer(x)
    assert torch.equal(after, cpu_kernels.amx_linear_bf16(x, layer.amx_packed, 128, None))
    assert ulp_mismatch(after, before) < 1e-2


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_matches_torch_max_with_ties_nan_and_inf(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    wide = (4 * torch.randn(8, 1000)).to(dtype)
    logits = wide[:, :997]  # rows further apart than their length; a tail past 16 lanes
    logits[1, 5] = logits[1, 700] = 50.0  # a tie: the first one wins
    logits[2, 996] = 60.0  # the maximum in the tail
    logits[3, 10] = float("nan")  # NaN counts as the largest
    logits[3, 400] = float("nan")
    logits[4] = float("-inf")
    logits[5, :] = 0.0
    logits[5, 300] = -0.0
    got = cpu_kernels.argmax_rows(logits)
    assert got.tolist() == logits.max(dim=-1).indices.tolist()
    assert got[1] == 5 and got[2] == 996 and got[3] == 10 and got[4] == 0


@needs_amx
def test_amx_layer_sends_other_dtypes_and_widths_to_torch() -> None:
    from inferhub.layers.amx_linear import dense_forward

    torch.manual_seed(2)
    w = torch.randn(64, 64).to(torch.bfloat16)
    packed = cpu_kernels.amx_pack_bf16(w)
    x32 = torch.randn(3, 64)
    with pytest.raises(RuntimeError):  # F.linear refuses the dtype mix: no silent garbage
        dense_forward(x32, w, None, packed)
    with pytest.raises(RuntimeError):  # a wider input is refused, not read past the weights
        dense_forward(torch.randn(3, 96).to(torch.bfloat16), w, None, packed)


@needs_amx
def test_a_bf16_engine_packs_its_projections_and_keeps_its_outputs(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM]
) -> None:
    """Loading in bf16 packs every projection the tiles can run (the tiny model's vocabulary,
    400, is not a multiple of 32: its output projection stays on torch); the tokens and
    logprobs of the decode steps (2-6 rows) match the same engine with the tiles off."""
    from inferhub.layers.amx_linear import AmxLinear

    llm = make_llm(tiny_hf["qwen2"], dtype="bfloat16")
    model = llm.engine.runner.model
    amx = [m for m in model.modules() if isinstance(m, AmxLinear)]
    assert len(amx) == 4 * model.config.num_hidden_layers
    assert not isinstance(model.lm_head, AmxLinear)
    prompts = [[5, 9, 33, 71], [200, 3, 8], [17, 18, 19, 20, 21], [40, 41]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    with_tiles = llm.generate(prompts, params)
    for m in amx:
        m.max_rows = 0  # every call on F.linear
    without = llm.generate(prompts, params)
    for a, b in zip(with_tiles, without, strict=True):
        assert a[0].token_ids == b[0].token_ids
        assert a[0].logprobs is not None and b[0].logprobs is not None
        for x, y in zip(a[0].logprobs, b[0].logprobs, strict=True):
            assert abs(x.logprob - y.logprob) < 0.05


def _gguf_like_q4(
    n: int, k: int, seed: int, q4_0: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, d, offset as a Q4_1 (offset = the float16 minimum m) or Q4_0 (offset = -8 d) file
    has them, and the bfloat16 weight a dense load makes of them: float32 q * d + offset
    (the product exact, one rounding), rounded to bfloat16 by torch."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = (torch.randn(n, k // 32, generator=g) * 0.02).half().float()
    offset = -8 * d if q4_0 else (torch.randn(n, k // 32, generator=g) * 0.2).half().float()
    dense = q.float() * d.repeat_interleave(32, 1) + offset.repeat_interleave(32, 1)
    return q, d, offset, dense.to(torch.bfloat16)


@needs_amx
@pytest.mark.parametrize("n,k", [(32, 32), (96, 64), (160, 1536)])
@pytest.mark.parametrize("m", [1, 7, 16, 33, 64, 130, 300])
@pytest.mark.parametrize("q4_0", [False, True])
def test_amx_4bit_tiles_give_the_dense_kernels_bits(n: int, k: int, m: int, q4_0: bool) -> None:
    """The 4-bit kernel rebuilds the very bfloat16 weights a dense load has, so its products
    are the dense AMX kernel's, bit for bit (bias or none, a strided input too)."""
    q, d, offset, dense = _gguf_like_q4(n, k, seed=n + k + m, q4_0=q4_0)
    packed4 = cpu_kernels.amx_q4_pack(q, d, offset)
    assert packed4.numel() == n * k * 5 // 8  # 4 bits and two float16s per 32 weights
    packed16 = cpu_kernels.amx_pack_bf16(dense)
    x = torch.randn(m, 2 * k, dtype=torch.bfloat16)[:, ::2]
    for bias in (None, torch.randn(n, dtype=torch.bfloat16)):
        ours = cpu_kernels.amx_q4_linear_bf16(x, packed4, n, bias)
        assert torch.equal(ours, cpu_kernels.amx_linear_bf16(x, packed16, n, bias))
    exact = x.double() @ dense.double().t()
    torch.testing.assert_close(ours.double() - bias.double(), exact, rtol=2**-7, atol=0.05)


@needs_amx
def test_amx_4bit_packing_refuses_what_it_cannot_hold() -> None:
    q, d, offset, _ = _gguf_like_q4(64, 64, seed=0, q4_0=False)
    with pytest.raises(ValueError, match="float16"):
        cpu_kernels.amx_q4_pack(q, d + 1e-6, offset)  # scales float16 cannot hold exactly
    with pytest.raises(ValueError, match="float16"):
        cpu_kernels.amx_q4_pack(q, d, torch.full_like(offset, 1e6))
    with pytest.raises(ValueError, match="4-bit AMX packing"):
        cpu_kernels.amx_q4_pack(q[:48], d[:48], offset[:48])
    with pytest.raises(ValueError, match="4-bit AMX packing"):
        cpu_kernels.amx_q4_pack(q.to(torch.int32), d, offset)


@needs_amx
def test_an_int4_layer_with_the_files_offsets_runs_dense_calls_on_4bit_tiles() -> None:
    from torch import nn

    from inferhub.layers.quant_linear import Int4Linear, Int4Weight

    q, d, offset, dense = _gguf_like_q4(128, 64, seed=3, q4_0=False)
    linear = nn.Linear(64, 128, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(dense)
    exact = Int4Linear(linear, Int4Weight(q, d, offset + 8 * d, offset), max_rows=0)
    assert exact.amx_q4 is not None and exact.q4 is None and exact.packed is None
    exact.use_amx()
    assert exact.amx_packed is None  # no dense copy beside the 4-bit tiles
    x = torch.randn(20, 64).to(torch.bfloat16)
    expected = cpu_kernels.amx_linear_bf16(x, cpu_kernels.amx_pack_bf16(dense), 128, linear.bias)
    assert torch.equal(exact(x), expected)
    with pytest.raises(RuntimeError):  # a wider input is refused, not read past the blocks
        exact(torch.randn(3, 96).to(torch.bfloat16))
    assert exact(torch.randn(0, 64).to(torch.bfloat16)).shape == (0, 128)  # no rows
    # weights quantized here (no file offsets) keep the dense path for their large calls
    lossy = Int4Linear(linear, Int4Weight(q, d, offset + 8 * d), max_rows=4)
    assert lossy.amx_q4 is None


def test_inferhub_disable_amx_turns_the_tiles_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from inferhub.layers.amx_linear import amx_supported

    monkeypatch.setenv("INFERHUB_DISABLE_AMX", "1")
    cpu_kernels.amx_available.cache_clear()
    try:
        assert cpu_kernels.amx_available() is False
        assert not amx_supported(torch.zeros(64, 64, dtype=torch.bfloat16))
    finally:
        cpu_kernels.amx_available.cache_clear()  # the next caller sees this machine again


needs_lowbit = pytest.mark.skipif(
    not cpu_kernels.lowbit_available(), reason="no AVX512-BF16 here: torch's low-bit kernels"
)


def _fp16_exact_int4(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, scale, zero as a GGUF Q4_1 file has them: scale d and minimum m are float16."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = (torch.rand(n, k // 32, generator=g) * 0.05 + 0.001).half().float()
    m = (torch.randn(n, k // 32, generator=g) * 0.2).half().float()
    return q, d, m + 8 * d  # zero = m + 8 d: w = (q - 8) d + zero = q d + m


@needs_lowbit
@pytest.mark.parametrize("n,k", [(64, 32), (192, 96), (128, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_q4_kernel_is_the_dequantized_product_rounded_once(
    n: int, k: int, m: int, with_bias: bool
) -> None:
    q, scale, zero = _fp16_exact_int4(n, k, seed=n + k + m)
    w = ((q.float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)).double()
    x = torch.randn(m, 2 * k, dtype=torch.bfloat16)[:, ::2]  # a strided input too
    bias = torch.randn(n, dtype=torch.bfloat16) if with_bias else None
    out = cpu_kernels.q4_linear_bf16(x, cpu_kernels.q4_pack(q, scale, zero), n, bias)
    exact = x.double() @ w.t() + (0 if bias is None else bias.double())
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    # float32 sums in another order than float64's, then one rounding to bfloat16
    torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=1e-4 * exact.abs().max())


@needs_lowbit
@pytest.mark.parametrize("m", [1, 4, 6])
def test_q8_kernel_matches_torch_int8_kernel(m: int) -> None:
    torch.manual_seed(m)
    n, k = 160, 100
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = (torch.rand(n) * 0.01).to(torch.bfloat16)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    ours = cpu_kernels.q8_linear_bf16(x, cpu_kernels.q8_pack(q), scale.float(), n, None)
    exact = x.double() @ (q.double() * scale.double()[:, None]).t()
    torch.testing.assert_close(ours.double(), exact, rtol=2**-8, atol=1e-4 * exact.abs().max())
    # torch's kernel (what runs without AVX512-BF16) on a width it takes (it faults on 100)
    q, x = q[:, :64].contiguous(), x[:, :64].contiguous()
    ours = cpu_kernels.q8_linear_bf16(x, cpu_kernels.q8_pack(q), scale.float(), n, None)
    theirs = torch._weight_int8pack_mm(x, q, scale)
    torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=1e-3 * theirs.abs().max().item())


@needs_lowbit
def test_low_bit_packing_refuses_shapes_it_cannot_lay_out() -> None:
    with pytest.raises(ValueError, match="4-bit packing"):
        cpu_kernels.q4_pack(
            torch.zeros(96, 64, dtype=torch.uint8), torch.ones(96, 2), torch.zeros(96, 2)
        )
    with pytest.raises(ValueError, match="4-bit packing"):
        cpu_kernels.q4_pack(
            torch.zeros(64, 48, dtype=torch.uint8), torch.ones(64, 1), torch.zeros(64, 1)
        )
    with pytest.raises(ValueError, match="8-bit packing"):
        cpu_kernels.q8_pack(torch.zeros(24, 8, dtype=torch.int8))


@needs_lowbit
def test_low_bit_layers_use_the_c_kernels_for_bf16_and_torch_otherwise() -> None:
    from torch import nn

    from inferhub.layers.quant_linear import Int4Linear, Int4Weight, Int8Linear

    torch.manual_seed(0)
    q, scale, zero = _fp16_exact_int4(128, 64, seed=1)
    w4 = Int4Weight(q, scale, zero)
    for dtype, on_c in ((torch.bfloat16, True), (torch.float32, False)):
        linear = nn.Linear(64, 128, bias=True).to(dtype)
        layer = Int4Linear(linear, w4, max_rows=8)
        assert (layer.q4 is not None) == on_c and (layer.packed is None) == on_c
        x = torch.randn(3, 64, dtype=dtype)
        exact = x.double() @ w4.dequantize().double().t() + linear.bias.double()
        tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(layer(x).double(), exact, rtol=tol, atol=tol * 10)
    # a width the C layout cannot take keeps torch's kernel
    q96, s96, z96 = _fp16_exact_int4(96, 64, seed=2)
    layer = Int4Linear(nn.Linear(64, 96).to(torch.bfloat16), Int4Weight(q96, s96, z96), 8)
    assert layer.q4 is None and layer.packed is not None
    head = Int8Linear(nn.Linear(64, 320, bias=False).to(torch.bfloat16), max_rows=4)
    assert head.q8 is not None and head.q.numel() == 0
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(
        head(x).float(), F.linear(x, head.weight).float(), atol=0.05, rtol=0.05
    )


needs_avx2 = pytest.mark.skipif(
    not cpu_kernels.q4f32_available(), reason="no AVX2/FMA/F16C (or no C compiler) here"
)


@needs_avx2
@pytest.mark.parametrize("n,k", [(16, 32), (96, 64), (160, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 17, 64, 130])
@pytest.mark.parametrize("q4_0", [False, True])
def test_f32_4bit_kernel_rebuilds_the_files_float32_weights(
    n: int, k: int, m: int, q4_0: bool
) -> None:
    """The float32 AVX2 kernel on a Q4_0/Q4_1 file's blocks: one-hot rows read back the
    dense float32 weights bit for bit (q * d + m, one rounding, as the file dequantizes), and
    any rows give the dense product up to the order of float32 sums."""
    q, d, offset, _ = _gguf_like_q4(n, k, seed=n + k + m, q4_0=q4_0)
    dense = q.float() * d.repeat_interleave(32, 1) + offset.repeat_interleave(32, 1)
    packed = cpu_kernels.q4f32_pack(q, d, offset)
    assert packed.numel() == n * k * 5 // 8
    eye = torch.eye(k)[:m]  # fewer rows than k, or all of them
    assert torch.equal(cpu_kernels.q4f32_linear(eye, packed, n, None), dense[:, : eye.shape[0]].t())
    x = torch.randn(m, 2 * k)[:, :k]  # rows 2k apart, as a slice of a wider output
    bias = torch.randn(n)
    out = cpu_kernels.q4f32_linear(x, packed, n, bias)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    exact = x.double() @ dense.double().t() + bias.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max())


@needs_avx2
@pytest.mark.parametrize("m", [1, 3, 4, 6, 13, 100])
@pytest.mark.parametrize("n,k", [(48, 96), (256, 320)])  # the second: the threads' path
def test_f32_8bit_kernel_rebuilds_a_q8_0_files_float32_weights(m: int, n: int, k: int) -> None:
    import gguf

    from inferhub.layers.quant_linear import q8_0_blocks

    w = torch.randn(n, k).numpy()
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    dense = torch.from_numpy(
        gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(n, k).copy()
    )
    q, scale = q8_0_blocks(raw, (n, k))
    packed = cpu_kernels.q8f32_pack(q, scale)
    eye = torch.eye(k)[:m]
    assert torch.equal(cpu_kernels.q8f32_linear(eye, packed, n, None), dense[:, :m].t())
    x = torch.randn(m, k)
    bias = torch.randn(n)
    out = cpu_kernels.q8f32_linear(x, packed, n, bias)
    exact = x.double() @ dense.double().t() + bias.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max())


@needs_avx2
def test_f32_low_bit_packing_refuses_what_it_cannot_hold() -> None:
    q, d, offset, _ = _gguf_like_q4(32, 64, seed=0, q4_0=False)
    with pytest.raises(ValueError, match="float16"):
        cpu_kernels.q4f32_pack(q, d * (1 + 2**-20), offset)  # not a file's float16 scales
    with pytest.raises(ValueError, match="4-bit packing"):
        cpu_kernels.q4f32_pack(q[:24], d[:24], offset[:24])
    with pytest.raises(ValueError, match="8-bit packing"):
        cpu_kernels.q8f32_pack(torch.zeros(16, 40, dtype=torch.int8), torch.ones(16, 1))
    packed = cpu_kernels.q4f32_pack(q, d, offset)
    with pytest.raises(TypeError, match="float32"):
        cpu_kernels.q4f32_linear(torch.ones(1, 64, dtype=torch.bfloat16), packed, 32, None)
    with pytest.raises(TypeError, match="bias"):
        cpu_kernels.q4f32_linear(
            torch.ones(1, 64), packed, 32, torch.ones(32, dtype=torch.bfloat16)
        )
    with pytest.raises(ValueError, match="width 96"):
        cpu_kernels.q4f32_linear(torch.ones(1, 96), packed, 32, None)


@needs_avx2
@pytest.mark.parametrize(
    ("h", "hkv", "d", "lens"),
    [
        (9, 3, 64, [1, 17, 33, 70]),  # SmolLM2's heads; tiles on and off the diagonal
        (14, 2, 64, [129]),
        (4, 4, 128, [40, 3]),  # two 8-vector chunks of the output
        (6, 2, 40, [21, 50]),  # head_dim not a multiple of 64: the one-vector tail
        (4, 1, 72, [35]),  # a chunk of 8 vectors and a tail
    ],
)
def test_causal_attention_kernel_matches_reference(
    h: int, hkv: int, d: int, lens: list[int]
) -> None:
    """First chunks of several sequences, their rows strided as split from a qkv projection,
    against float64 causal softmax attention of each sequence alone."""
    torch.manual_seed(d + sum(lens))
    n = sum(lens)
    qkv = torch.randn(n, (h + 2 * hkv) * d) * 2
    q = qkv[:, : h * d].view(n, h, d)
    k = qkv[:, h * d : (h + hkv) * d].view(n, hkv, d)
    v = qkv[:, (h + hkv) * d :].view(n, hkv, d)
    starts = [sum(lens[:i]) for i in range(len(lens))]
    bounds = torch.tensor([starts, lens], dtype=torch.int32)
    out = cpu_kernels.causal_attention(q, k, v, bounds, d**-0.5)
    assert out is not None and out.shape == (n, h, d)
    for s0, m in zip(starts, lens, strict=True):
        rows = slice(s0, s0 + m)
        ref = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).double(),
            k[rows].transpose(0, 1).double(),
            v[rows].transpose(0, 1).double(),
            is_causal=True,
            enable_gqa=True,
            scale=d**-0.5,
        ).transpose(0, 1)
        torch.testing.assert_close(out[rows].double(), ref, rtol=1e-5, atol=1e-5)


@needs_avx2
def test_causal_attention_kernel_declines_what_it_does_not_run() -> None:
    q = torch.randn(4, 2, 64)
    bounds = torch.tensor([[0], [4]], dtype=torch.int32)
    assert (
        cpu_kernels.causal_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), bounds, 1.0) is None
    )
    assert (
        cpu_kernels.causal_attention(q[:, :, :36], q[:, :, :36], q[:, :, :36], bounds, 1.0) is None
    )
