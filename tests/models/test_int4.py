"""Low-bit weights on the CPU: GGUF Q4_0/Q4_1 blocks kept bit for bit, the int4 kernels against
transformers' dequantized model, the dense/4-bit switch by batch rows, 8-bit logits in bf16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_loader import assert_logits_match, hf_model, our_logits
from torch import nn

from inferhub.config import EngineConfig
from inferhub.engine.llm import LLM
from inferhub.engine.sampling_params import SamplingParams
from inferhub.layers import cpu_kernels
from inferhub.layers.quant_linear import ALL_ROWS, GROUP, Int4Linear, Int4Weight, Int8Linear
from inferhub.models.loader import LoadedModel, load_model
from tiny_models import ARCHS, gguf_source_dir, make_tiny_gguf

CPU = torch.device("cpu")
QUANTS = ("Q4_0", "Q4_1")


@pytest.fixture(scope="module")
def q4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-q4")
    return {f"{a}-{q}": make_tiny_gguf(root, a, quant=q) for a in ARCHS for q in QUANTS}


def load(path: Path, dtype: torch.dtype = torch.float32, **kw: object) -> LoadedModel:
    kw.setdefault("weight_quant", "auto")  # the low-bit paths are opt-in
    return load_model(str(path), dtype=dtype, device=CPU, show_progress=False, **kw)  # type: ignore[arg-type]


def int4_layers(lm: LoadedModel) -> list[Int4Linear]:
    return [m for m in lm.model.modules() if isinstance(m, Int4Linear)]


@pytest.mark.parametrize("qtype", QUANTS)
def test_gguf_blocks_unpack_exactly(qtype: str) -> None:
    import gguf

    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 4 * GROUP)).astype(np.float32)
    kind = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(w, kind)
    expected = gguf.quants.dequantize(raw, kind).reshape(w.shape)
    ours = Int4Weight.from_gguf(raw, qtype, w.shape).dequantize().numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def test_quantize_error_is_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    q = Int4Weight.quantize(w)
    assert int(q.q.max()) <= 15
    step = q.scale.repeat_interleave(GROUP, dim=1)
    assert bool(((q.dequantize() - w).abs() <= step / 2 + 1e-6).all())
    with pytest.raises(ValueError, match="groups of 32"):
        Int4Weight.quantize(torch.randn(4, 40))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_switches_kernel_by_rows(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=True).to(dtype)
    w4 = Int4Weight.quantize(torch.randn(96, 128))
    layer = Int4Linear(linear, w4, max_rows=4)
    assert layer.weight is linear.weight  # the dense weight stays a parameter
    small, large = torch.randn(3, 128, dtype=dtype), torch.randn(5, 128, dtype=dtype)
    expected_small = small.float() @ w4.dequantize().t() + linear.bias.float()
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(layer(small).float(), expected_small, atol=tol, rtol=tol)
    # above max_rows: the dense weight (deliberately different from the 4-bit one here)
    torch.testing.assert_close(layer(large), F.linear(large, linear.weight, linear.bias))


@pytest.mark.parametrize("name", [f"{a}-{q}" for a in ARCHS for q in QUANTS])
def test_q4_gguf_on_4bit_kernels_matches_transformers(q4: dict[str, Path], name: str) -> None:
    """Every projection on the 4-bit kernel (max_rows huge) gives transformers' logits for the
    same file, which transformers dequantizes to float32."""
    path = q4[name]
    lm = load(path, int4_max_rows=1 << 30)
    layers = lm.config.num_hidden_layers
    assert lm.int4_projections == 4 * layers
    assert len(int4_layers(lm)) == 4 * layers
    assert_logits_match(lm, hf_model(path.parent, gguf_file=path.name))


@pytest.mark.parametrize("name", [f"{a}-Q4_1" for a in ARCHS])
def test_q4_dense_and_4bit_paths_agree(q4: dict[str, Path], name: str) -> None:
    dense = load(q4[name], weight_quant="none", int4_max_rows=0)  # no small-call kernel
    assert dense.int4_projections == 0 and not int4_layers(dense)
    small = load(q4[name], int4_max_rows=1 << 30)
    ids = dense.tokenizer.encode("Once upon a time there was a small language model")
    torch.testing.assert_close(our_logits(small, ids), our_logits(dense, ids), atol=1e-4, rtol=1e-4)
    # bf16: the same model within bf16 rounding, and the same greedy choices
    small16 = load(q4[name], torch.bfloat16, int4_max_rows=1 << 30)
    dense16 = load(q4[name], torch.bfloat16, weight_quant="none")
    a, b = our_logits(small16, ids), our_logits(dense16, ids)
    torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_f32_gguf_keeps_dense_weights_unless_asked(q4: dict[str, Path], tmp_path: Path) -> None:
    """auto converts only what the file stores in 4 bits; int4 quantizes the rest (lossy)."""
    f32 = make_tiny_gguf(tmp_path, "qwen2")
    assert load(f32).int4_projections == 0
    lm = load(f32, weight_quant="int4", int4_max_rows=1 << 30)
    assert lm.int4_projections == 4 * lm.config.num_hidden_layers
    reference = load(gguf_source_dir(f32))  # the HF folder it was written from
    ids = reference.tokenizer.encode("Hello, world! How are you today?")
    ours, theirs = our_logits(lm, ids), our_logits(reference, ids)
    assert ours.shape == theirs.shape
    assert not torch.equal(ours, theirs)  # it did change the weights
    # 4 bits per weight of a random model: close in direction, not equal
    cosine = F.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0)
    print(f"cosine {float(cosine):.4f}")
    assert float(cosine) > 0.95
    hf = load(gguf_source_dir(f32), weight_quant="int4")  # HF folders too
    assert hf.int4_projections == 4 * hf.config.num_hidden_layers


def test_weight_quant_errors(q4: dict[str, Path]) -> None:
    path = q4["qwen2-Q4_1"]
    with pytest.raises(ValueError, match="auto, none or int4"):
        load(path, weight_quant="int8")
    with pytest.raises(ValueError, match="CPU only"):
        load_model(str(path), dtype=torch.float16, device=torch.device("cuda"), weight_quant="int4")


def test_int8_linear_small_calls_close_to_dense() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 300, bias=False).to(torch.bfloat16)
    layer = Int8Linear(linear, max_rows=2)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    dense = F.linear(x, linear.weight).float()
    torch.testing.assert_close(layer(x).float(), dense, atol=0.05, rtol=0.05)
    big = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(big), F.linear(big, linear.weight))
    with pytest.raises(ValueError, match="bfloat16"):
        Int8Linear(nn.Linear(64, 8))


def test_int8_logits_only_for_quantized_outputs_in_bf16(
    q4: dict[str, Path], tmp_path: Path
) -> None:
    q = load(q4["qwen2-Q4_1"], torch.bfloat16)
    assert q.quantized_output and q.int8_lm_head
    assert isinstance(q.model.lm_head, Int8Linear)
    assert q.model.lm_head.weight is q.model.embed_tokens.weight  # still tied
    dense = load(q4["qwen2-Q4_1"], torch.bfloat16, weight_quant="none")
    assert not dense.int8_lm_head
    ids = q.tokenizer.encode("Hello, world! How are you today?")
    a, b = our_logits(q, ids[:1]), our_logits(dense, ids[:1])  # one row: the 8-bit kernels
    assert float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.99
    assert not load(q4["qwen2-Q4_1"]).int8_lm_head  # float32 stays exact
    assert not load(make_tiny_gguf(tmp_path, "qwen2"), torch.bfloat16).int8_lm_head  # F32 file


@pytest.mark.skipif(not cpu_kernels.lowbit_available(), reason="no AVX512-BF16 here")
@pytest.mark.parametrize("quant", ["auto", "none"])
@pytest.mark.parametrize("name", [f"{a}-{q}" for a in ARCHS for q in QUANTS])
def test_decode_layers_in_one_call_equal_the_layer_by_layer_path(
    q4: dict[str, Path], name: str, quant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 on 4-bit weights with the C kernels: decode steps run every layer in one C call,
    on the 4-bit kernel up to int4_max_rows sequences (weight_quant auto) and on the AMX
    tiles above (or always, with weight_quant none); the tokens and their log-probabilities
    are exactly those of the Python path, for single and batched decodes."""
    tiles = cpu_kernels.amx_available()
    if quant == "none" and not tiles:
        pytest.skip("no AMX tiles here: weight_quant none keeps the layer-by-layer path")
    calls: list[tuple[int, bool]] = []
    real = cpu_kernels.decode_q4_layers

    def counting(x: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        calls.append((x.shape[0], bool(args[-1] if len(args) > 13 else kw.get("amx", False))))
        return real(x, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(cpu_kernels, "decode_q4_layers", counting)

    def run(one_call: bool) -> list[list[tuple[int, float]]]:
        llm = LLM(
            EngineConfig(
                model=str(q4[name]),
                dtype="bfloat16",
                attention_backend="cpu",
                weight_quant=quant,
                int4_max_rows=4,
                kv_cache_memory=1 << 24,
                show_progress=False,
            )
        )
        model = llm.engine.runner.model
        assert model._q4_plan is not None
        if not one_call:
            model._q4_plan = None
        prompts = [[5, 9, 2, 7, 1, 3, 8][:n] for n in (7, 3, 5, 2, 6)] + [[4, 4, 6]]
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
        out = llm.generate([prompts[0]], params) + llm.generate(prompts, params)
        return [
            [(t, lp.logprob) for t, lp in zip(r[0].token_ids, r[0].logprobs or [], strict=True)]
            for r in out
        ]

    fast = run(one_call=True)
    # one sequence, then six: the 4-bit kernel for one (auto), the tiles for six
    expected = {(1, quant == "none"), (6, True)} if tiles else {(1, False)}
    assert set(calls) == expected
    calls.clear()
    slow = run(one_call=False)
    assert not calls
    assert fast == slow


@pytest.mark.skipif(not cpu_kernels.amx_available(), reason="no AMX tiles here")
@pytest.mark.parametrize("name", [f"{a}-{q}" for a in ARCHS for q in QUANTS])
def test_bf16_tiles_read_the_files_4_bits_and_give_the_dense_bits(
    q4: dict[str, Path], name: str
) -> None:
    """A Q4_0/Q4_1 file in bfloat16 (weight_quant none, the default): every projection's AMX
    calls read the file's own 4-bit blocks instead of a dense packed copy, and the logits of
    the whole model are the bits of the dense tiles, prefill-sized and decode-sized calls."""
    lm = load(q4[name], torch.bfloat16, weight_quant="none")
    layers = lm.config.num_hidden_layers
    assert lm.amx_q4_projections == 4 * layers and lm.int4_projections == 0
    projections = int4_layers(lm)
    assert len(projections) == 4 * layers
    assert all(p.amx_q4 is not None and p.amx_packed is None for p in projections)
    assert all(p.max_rows == 0 and p.q4 is None for p in projections)  # no 4-bit arithmetic
    prompts = [lm.tokenizer.encode("Once upon a time there was a small language model"), [7]]
    with torch.inference_mode():
        tiles4 = [our_logits(lm, ids) for ids in prompts]
        for p in projections:  # the dense tiles instead: a packed bfloat16 copy
            p.amx_q4 = None
            p.use_amx()
            assert p.amx_packed is not None
        dense = [our_logits(lm, ids) for ids in prompts]
    for a, b in zip(tiles4, dense, strict=True):
        assert torch.equal(a, b)
    # and the same model as transformers sees it, within bfloat16's rounding
    reference = hf_model(q4[name].parent, gguf_file=q4[name].name)
    ids = prompts[0]
    theirs = reference(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(tiles4[0].float(), theirs, atol=0.1, rtol=0.05)


@pytest.mark.skipif(not cpu_kernels.amx_available(), reason="no AMX tiles here")
def test_4bit_tiles_are_skipped_when_the_unpacked_blocks_would_not_fit(
    q4: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading holds a file's 4-bit blocks unpacked (a byte a weight) until they are packed:
    with too little memory for that (and so for a packed dense copy, which is larger), the
    projections stay on torch's dense product: the same model within bf16 rounding."""
    from inferhub.layers.quant_linear import DEFAULT_MAX_ROWS
    from inferhub.models import loader

    path = q4["qwen2-Q4_1"]
    with_tiles = load(path, torch.bfloat16, weight_quant="none")
    monkeypatch.setattr(loader, "_memory_available", lambda: 4 * path.stat().st_size)
    without = load(path, torch.bfloat16, weight_quant="none")
    assert with_tiles.amx_q4_projections > 0
    assert without.amx_q4_projections == 0 and not int4_layers(without)
    assert without.amx_projections == 0
    # weight_quant auto keeps its 4-bit kernel for small calls, the dense weight above (so
    # the 4-bit kernel's default limit is the dense one's)
    auto = load(path, torch.bfloat16, weight_quant="auto", int4_max_rows=None)
    assert auto.amx_q4_projections == 0
    assert {(p.amx_q4, p.max_rows) for p in int4_layers(auto)} == {(None, DEFAULT_MAX_ROWS)}
    ids = without.tokenizer.encode("Once upon a time")
    with torch.inference_mode():
        a, b = our_logits(with_tiles, ids).float(), our_logits(without, ids).float()
    torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)


def test_the_4bit_kernels_row_limit_defaults_by_what_serves_larger_calls(
    q4: dict[str, Path], tmp_path: Path
) -> None:
    """weight_quant auto: the 4-bit kernel takes calls of up to 4 rows when AMX tiles on the
    file's 4 bits take the larger ones (where the tiles are faster from 5 rows), up to 8 when
    the dense weights do; an explicit int4_max_rows wins."""
    from inferhub.layers.quant_linear import DEFAULT_MAX_ROWS, F32_MAX_ROWS, TILES_MAX_ROWS

    path = q4["llama-Q4_0"]
    lm = load(path, torch.bfloat16, int4_max_rows=None)
    expected = TILES_MAX_ROWS if cpu_kernels.amx_available() else DEFAULT_MAX_ROWS
    assert {p.max_rows for p in int4_layers(lm)} == {expected}
    # float32: the exact AVX2 kernel's limit where it runs
    expected = F32_MAX_ROWS if cpu_kernels.q4f32_available() else DEFAULT_MAX_ROWS
    assert {p.max_rows for p in int4_layers(load(path, int4_max_rows=None))} == {expected}
    # ... but weights quantized here (no file blocks: a lossy kernel) keep the dense limit
    lossy = load(make_tiny_gguf(tmp_path, "llama"), weight_quant="int4", int4_max_rows=None)
    assert {(p.q4f32, p.max_rows) for p in int4_layers(lossy)} == {(None, DEFAULT_MAX_ROWS)}
    explicit = load(path, torch.bfloat16, int4_max_rows=6)
    assert {p.max_rows for p in int4_layers(explicit)} == {6}


needs_avx2 = pytest.mark.skipif(
    not cpu_kernels.q4f32_available(), reason="no AVX2/FMA/F16C (or no C compiler) here"
)


@needs_avx2
@pytest.mark.parametrize("name", [f"{a}-{q}" for a in ARCHS for q in QUANTS])
def test_f32_small_calls_read_the_files_4_bits_by_default(q4: dict[str, Path], name: str) -> None:
    """float32 on AVX2, weight_quant none (the default): every projection's calls of up to
    F32_MAX_ROWS rows run the exact kernel on the file's own 4-bit blocks, and the logits are
    the dense model's (int4_max_rows=0) up to the order of float32 sums, and transformers'."""
    from inferhub.layers.quant_linear import F32_MAX_ROWS

    lm = load(q4[name], weight_quant="none")
    layers = lm.config.num_hidden_layers
    assert lm.int4_projections == 4 * layers
    projections = int4_layers(lm)
    assert len(projections) == 4 * layers
    assert all(p.q4f32 is not None and p.max_rows == F32_MAX_ROWS for p in projections)
    dense = load(q4[name], weight_quant="none", int4_max_rows=0)
    assert dense.int4_projections == 0 and not int4_layers(dense)
    for ids in ([7], dense.tokenizer.encode("Once upon a time")):  # rows <= F32_MAX_ROWS
        assert len(ids) <= F32_MAX_ROWS
        a, b = our_logits(lm, ids), our_logits(dense, ids)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert_logits_match(lm, hf_model(q4[name].parent, gguf_file=q4[name].name))
    # where the kernel takes every call (AVX2 without AVX-512), the dense copies are gone
    released = F32_MAX_ROWS >= ALL_ROWS
    assert all(p.dense_released == released for p in projections)
    dense_bytes = sum(p.out_features * p.in_features * 4 for p in projections)
    assert lm.released_bytes == (dense_bytes if released else 0)
    assert dense.released_bytes == 0


def record_dequantized(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The GGUF tensors the loader dequantizes from now on, by name."""
    from inferhub.models import loader

    seen: list[str] = []
    real = loader._dequantize

    def recording(tensor: object) -> np.ndarray:
        seen.append(tensor.name)  # type: ignore[attr-defined]
        return real(tensor)

    monkeypatch.setattr(loader, "_dequantize", recording)
    return seen


@needs_avx2
@pytest.mark.parametrize("arch", ARCHS)
def test_f32_lean_load_never_dequantizes_what_the_exact_kernel_serves(
    tmp_path: Path, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the exact kernels take every call (AVX2 without AVX-512), a projection all of
    whose parts the file stores in 4 bits is packed as it is read and never dequantized (its
    dense parameter never written, then released); one with a part in 8 bits (a mixed file,
    as llama.cpp writes them) loads densely. Logits equal the dense load's and transformers'."""
    path = make_tiny_gguf(tmp_path, arch, quant="Q4_1", mixed={"attn_v": "Q8_0"})
    dequantized = record_dequantized(monkeypatch)
    # every call on the exact kernels: the default on AVX2, asked for here on any CPU
    lm = load(path, weight_quant="none", int4_max_rows=ALL_ROWS)
    monkeypatch.undo()
    layers = lm.config.num_hidden_layers
    lean = [p for p in int4_layers(lm) if p.dense_released]
    assert len(lean) == 3 * layers  # o, gate_up, down; q/k/v has an 8-bit part
    assert all(isinstance(layer.self_attn.qkv_proj, nn.Linear) for layer in lm.model.layers)
    kinds = {name.split(".")[2] for name in dequantized if name.startswith("blk.")}
    assert {"attn_q", "attn_k", "attn_v"} <= kinds  # the mixed q/k/v, densely
    assert not kinds & {"attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    assert lm.released_bytes == sum(p.out_features * p.in_features * 4 for p in lean)
    dense = load(path, weight_quant="none", int4_max_rows=0)
    ids = lm.tokenizer.encode("Once upon a time, in a land far away")
    torch.testing.assert_close(our_logits(lm, ids), our_logits(dense, ids), atol=1e-5, rtol=1e-5)
    assert_logits_match(lm, hf_model(path.parent, gguf_file=path.name))


@needs_avx2
def test_f32_lean_load_falls_back_to_dense_where_the_kernel_refuses_the_blocks(
    q4: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks the exact kernel cannot take (a scale float16 does not hold) are found only
    when a projection's parts are packed: those parts are then loaded densely after all, and
    the model is the dense one, not one with unwritten weights."""
    from inferhub.layers.quant_linear import PackedQ4F32

    def refuse(weight: Int4Weight) -> PackedQ4F32:
        raise ValueError("4-bit scales or offsets that float16 does not hold exactly")

    monkeypatch.setattr(PackedQ4F32, "pack", staticmethod(refuse))
    path = q4["llama-Q4_0"]
    dequantized = record_dequantized(monkeypatch)
    lm = load(path, weight_quant="none", int4_max_rows=ALL_ROWS)
    kinds = {name.split(".")[2] for name in dequantized if name.startswith("blk.")}
    assert {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"} <= kinds
    assert lm.released_bytes == 0 and lm.int4_projections == 0
    assert not int4_layers(lm)  # every projection dense, with its real weight
    dense = load(path, weight_quant="none", int4_max_rows=0)
    ids = lm.tokenizer.encode("Once upon a time")
    torch.testing.assert_close(our_logits(lm, ids), our_logits(dense, ids), atol=0, rtol=0)
    # weight_quant auto: the refused blocks still serve the small calls' lossy kernel
    auto = load(path, weight_quant="auto", int4_max_rows=ALL_ROWS)
    assert len(int4_layers(auto)) == 4 * auto.config.num_hidden_layers
    assert all(p.q4f32 is None and not p.dense_released for p in int4_layers(auto))


@needs_avx2
def test_f32_lean_load_refuses_to_serve_a_projection_no_kernel_took(
    q4: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lean projection has no dense weight: if nothing put it on the exact kernel, the load
    fails instead of serving a model with empty weights."""
    from inferhub.models.qwen2 import Qwen2ForCausalLM

    monkeypatch.setattr(Qwen2ForCausalLM, "use_int4", lambda self, *a, **kw: 0)
    with pytest.raises(RuntimeError, match="no exact kernel took"):
        load(q4["qwen2-Q4_1"], weight_quant="none", int4_max_rows=ALL_ROWS)


@needs_avx2
def test_f32_exact_kernel_takes_prefill_sized_calls_and_releases_the_dense_weight() -> None:
    """With no row limit the exact kernel serves calls of any size (a 2048-token prefill
    chunk) with the dense weight's products; once that weight is released the layer still
    gives the same numbers, and an input the kernel cannot take fails clearly instead of
    reaching the freed weight. A layer with a row limit keeps its dense weight."""
    torch.manual_seed(0)
    n, k = 96, 128
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    d = (torch.rand(n, k // GROUP) * 0.02).half().float()
    offset = (-torch.rand(n, k // GROUP) * 0.1).half().float()
    w4 = Int4Weight(q, d, offset + 8 * d, offset)
    linear = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        linear.weight.copy_(w4.dequantize())
    layer = Int4Linear(linear, w4, max_rows=0, exact_rows=ALL_ROWS)
    assert layer.q4f32 is not None and layer.max_rows == ALL_ROWS
    calls: list[int] = []
    real = cpu_kernels.q4f32_linear

    def counting(x: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args)  # type: ignore[arg-type]

    x = torch.randn(2048, k)
    want = F.linear(x, linear.weight, linear.bias)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "q4f32_linear", counting)
        before = layer(x)
        layer.release_dense()
        after = layer(x)
    assert calls == [2048, 2048]
    torch.testing.assert_close(before, want, atol=1e-4, rtol=1e-5)
    assert torch.equal(before, after)
    assert layer.dense_released and layer.weight.numel() == 0
    assert "dense weight released" in repr(layer)
    with pytest.raises(RuntimeError, match="dense weight was released"):
        layer(x.to(torch.bfloat16))
    limited = Int4Linear(nn.Linear(k, n), w4, max_rows=0, exact_rows=256)
    with pytest.raises(ValueError, match="above 256 rows"):
        limited.release_dense()
    assert not limited.dense_released
    lossy = Int4Linear(nn.Linear(k, n), Int4Weight(q, d, offset + 8 * d), max_rows=ALL_ROWS)
    with pytest.raises(ValueError, match="lossy"):
        lossy.release_dense()


@needs_avx2
@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_read_a_q8_0_files_output_rows(tmp_path: Path, arch: str) -> None:
    """A Q8_0 file in float32: the output projection (tied for the tiny Qwen2, its own
    tensor for the tiny Llama) runs the exact 8-bit kernel on the file's blocks; logits equal
    the dense ones up to sum order. An untied output's dense copy is released where the
    kernel takes every call; a tied one stays, the embedding's."""
    from inferhub.layers.quant_linear import EXACT_Q8_MAX_ROWS, ExactQ8Linear

    path = make_tiny_gguf(tmp_path, arch, quant="Q8_0")
    lm = load(path, weight_quant="none")
    head = lm.model.lm_head
    assert lm.exact_q8_lm_head and isinstance(head, ExactQ8Linear)
    tied = lm.config.tie_word_embeddings
    assert tied == (arch == "qwen2")
    if tied:
        assert head.weight is lm.model.embed_tokens.weight  # still tied
    assert head.max_rows == EXACT_Q8_MAX_ROWS
    assert head.dense_released == (not tied and EXACT_Q8_MAX_ROWS >= ALL_ROWS)
    assert lm.model.embed_tokens.weight.numel() > 0
    dense = load(path, weight_quant="none", int4_max_rows=0)
    assert not dense.exact_q8_lm_head and isinstance(dense.model.lm_head, nn.Linear)
    ids = lm.tokenizer.encode("Hello, world! How are you today?")
    torch.testing.assert_close(our_logits(lm, ids), our_logits(dense, ids), atol=1e-5, rtol=1e-5)
    assert not load(path, torch.bfloat16, weight_quant="none").exact_q8_lm_head


@pytest.fixture(scope="module")
def q8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-q8")
    return {f"{a}-Q8_0": make_tiny_gguf(root, a, quant="Q8_0") for a in ARCHS}


@needs_avx2
@pytest.mark.parametrize("arch", ARCHS)
def test_f32_lean_load_runs_a_q8_0_files_projections_on_their_own_blocks(
    q8: dict[str, Path], arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Q8_0 file where the exact kernels take every call: every projection (q/k/v fused,
    Llama's q/k rows unpermuted) runs the exact 8-bit kernel on the file's blocks, is never
    dequantized and has no dense copy; logits equal the dense load's up to the order of
    float32 sums, and transformers'."""
    from inferhub.layers.quant_linear import ExactQ8Linear

    path = q8[f"{arch}-Q8_0"]
    dequantized = record_dequantized(monkeypatch)
    lm = load(path, weight_quant="none", int4_max_rows=ALL_ROWS)
    monkeypatch.undo()
    layers = lm.config.num_hidden_layers
    projections = [m for m in lm.model.layers.modules() if isinstance(m, ExactQ8Linear)]
    assert len(projections) == 4 * layers == lm.int4_projections
    assert all(p.dense_released and p.max_rows == ALL_ROWS for p in projections)
    weights = [n for n in dequantized if n.startswith("blk.") and n.endswith(".weight")]
    assert weights and all("_norm." in n for n in weights)  # the norms only
    dense = load(path, weight_quant="none", int4_max_rows=0)
    assert dense.int4_projections == 0
    ids = lm.tokenizer.encode("Once upon a time, in a land far away")
    torch.testing.assert_close(our_logits(lm, ids), our_logits(dense, ids), atol=1e-5, rtol=1e-5)
    assert_logits_match(lm, hf_model(path.parent, gguf_file=path.name))


@needs_avx2
def test_f32_lean_load_with_4_and_8_bit_projections_in_one_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Q4_0 file whose down projections are Q8_0 (as llama.cpp's mixed files): each
    projection on its own exact kernel, none dequantized; the one-call decode (one kernel for
    all) steps aside for the layer-by-layer path; logits equal the dense load's. If the 8-bit
    projections are not installed, the load fails instead of serving empty weights."""
    from inferhub.layers.quant_linear import ExactQ8Linear
    from inferhub.models.qwen2 import Qwen2ForCausalLM

    path = make_tiny_gguf(tmp_path, "llama", quant="Q4_0", mixed={"ffn_down": "Q8_0"})
    lm = load(path, weight_quant="none", int4_max_rows=ALL_ROWS)
    layers = lm.config.num_hidden_layers
    assert lm.int4_projections == 4 * layers
    assert all(isinstance(layer.mlp.down_proj, ExactQ8Linear) for layer in lm.model.layers)
    assert len([p for p in int4_layers(lm) if p.q4f32 is not None]) == 3 * layers
    assert lm.model._q4_plan is None
    dense = load(path, weight_quant="none", int4_max_rows=0)
    ids = lm.tokenizer.encode("Once upon a time")
    torch.testing.assert_close(our_logits(lm, ids), our_logits(dense, ids), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(Qwen2ForCausalLM, "use_exact_q8", lambda self, *a, **kw: 0)
    with pytest.raises(RuntimeError, match="no exact kernel took"):
        load(path, weight_quant="none", int4_max_rows=ALL_ROWS)


@needs_avx2
@pytest.mark.parametrize(
    ("name", "kernel"),
    [
        ("qwen2-Q4_1", cpu_kernels.KERNEL_Q4_F32),
        ("llama-Q4_0", cpu_kernels.KERNEL_Q4_F32),
        ("qwen2-Q8_0", cpu_kernels.KERNEL_Q8_F32),
        ("llama-Q8_0", cpu_kernels.KERNEL_Q8_F32),
    ],
)
def test_f32_decode_layers_in_one_call_equal_the_layer_by_layer_path(
    q4: dict[str, Path],
    q8: dict[str, Path],
    name: str,
    kernel: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """float32 on the exact 4-bit (or, for a Q8_0 file loaded lean, 8-bit) kernel with the
    C kernels: decode steps run every layer in one C call; tokens and log-probabilities are
    exactly those of the Python path, for single and batched decodes."""
    kernels: list[tuple[int, int]] = []
    real = cpu_kernels.decode_q4_layers

    def counting(x: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        kernels.append((x.shape[0], int(args[-1])))  # type: ignore[call-overload]
        return real(x, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(cpu_kernels, "decode_q4_layers", counting)

    def run(one_call: bool) -> list[list[tuple[int, float]]]:
        llm = LLM(
            EngineConfig(
                model=str({**q4, **q8}[name]),
                dtype="float32",
                attention_backend="cpu",
                kv_cache_memory=1 << 24,
                show_progress=False,
                # Q8_0 projections take the exact kernel in a lean load only (every call)
                int4_max_rows=ALL_ROWS if kernel == cpu_kernels.KERNEL_Q8_F32 else None,
            )
        )
        model = llm.engine.runner.model
        assert model._q4_plan is not None
        assert model._q4_plan.small_kernel == kernel
        if not one_call:
            model._q4_plan = None
        prompts = [[5, 9, 2, 7, 1, 3, 8][:n] for n in (7, 3, 5, 2, 6)] + [[4, 4, 6]]
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
        out = llm.generate([prompts[0]], params) + llm.generate(prompts, params)
        return [
            [(t, lp.logprob) for t, lp in zip(r[0].token_ids, r[0].logprobs or [], strict=True)]
            for r in out
        ]

    fast = run(one_call=True)
    assert set(kernels) == {(1, kernel), (6, kernel)}
    kernels.clear()
    slow = run(one_call=False)
    assert not kernels
    assert fast == slow
