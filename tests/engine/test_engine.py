"""The engine end to end on tiny random models: exact greedy tokens against `transformers`
under batching, chunked prefill, prefix caching, preemption and n > 1."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from inferhub.engine.errors import PromptTooLongError
from inferhub.engine.llm import LLM
from inferhub.engine.outputs import RequestOutput
from inferhub.engine.sampling_params import SamplingParams, SamplingParamsError
from inferhub.engine.scheduler import SchedulerOutput

Ref = Callable[[Path, list[list[int]], int], list[list[int]]]
ARCHS = ["qwen2", "llama"]


def prompts(n: int, lo: int, hi: int, seed: int = 0, vocab: int = 380) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)  # type: ignore[arg-type]


def tokens(llm: LLM, ps: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [r[0].token_ids for r in llm.generate(ps, params)]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_batched(
    arch: str, tiny_hf: dict[str, Path], make_llm: Callable[..., LLM], hf_reference: Ref
) -> None:
    ps = prompts(6, 3, 40, seed=1)
    llm = make_llm(tiny_hf[arch])
    assert tokens(llm, ps, greedy(12)) == hf_reference(tiny_hf[arch], ps, 12)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_from_gguf_matches_transformers(
    arch: str, tiny_gguf: dict[str, Path], make_llm: Callable[..., LLM], hf_reference: Ref
) -> None:
    from tiny_models import gguf_source_dir

    ps = prompts(4, 5, 30, seed=2)
    llm = make_llm(tiny_gguf[arch])
    assert tokens(llm, ps, greedy(10)) == hf_reference(gguf_source_dir(tiny_gguf[arch]), ps, 10)


@pytest.mark.parametrize("backend", ["torch", "sdpa", "cpu"])
def test_chunked_prefill_gives_the_same_tokens(
    backend: str, tiny_hf: dict[str, Path], make_llm: Callable[..., LLM], hf_reference: Ref
) -> None:
    ps = prompts(5, 20, 60, seed=3)
    llm = make_llm(tiny_hf["qwen2"], max_num_batched_tokens=7, attention_backend=backend)
    steps: list[SchedulerOutput] = []
    original = llm.engine.runner.execute

    def spy(out: SchedulerOutput, sample: list[int]) -> torch.Tensor:
        steps.append(out)
        return original(out, sample)

    llm.engine.runner.execute = spy  # type: ignore[method-assign]
    assert tokens(llm, ps, greedy(8)) == hf_reference(tiny_hf["qwen2"], ps, 8)
    assert all(s.total_tokens <= 7 for s in steps)
    # decodes and prefill chunks shared steps
    assert any(1 in s.num_new_tokens and max(s.num_new_tokens) > 1 for s in steps)


@pytest.mark.parametrize("backend", ["torch", "sdpa", "cpu"])
def test_first_chunks_beside_a_continuing_chunk(
    backend: str, tiny_hf: dict[str, Path], make_llm: Callable[..., LLM], hf_reference: Ref
) -> None:
    """A step that holds a chunk continuing its prompt and first chunks of others attends
    in two groups (gathered + masked, and causal over the new keys alone) with the tokens
    of each prompt alone."""
    ps = [prompts(1, 30, 30, seed=4)[0], *prompts(3, 9, 12, seed=5)]
    llm = make_llm(tiny_hf["llama"], max_num_batched_tokens=36, attention_backend=backend)
    split_steps = 0
    original = llm.engine.runner.prepare

    def spy(out: SchedulerOutput) -> Any:
        nonlocal split_steps
        inputs = original(out)
        meta = inputs.meta
        if meta.prefill is not None and meta.prefill_fresh is not None:
            split_steps += 1
            assert not meta.prefill.all_from_start and meta.prefill_fresh.all_from_start
        return inputs

    llm.engine.runner.prepare = spy  # type: ignore[method-assign]
    assert tokens(llm, ps, greedy(6)) == hf_reference(tiny_hf["llama"], ps, 6)
    assert split_steps > 0


def test_triton_backend_gives_the_same_tokens(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM], hf_reference: Ref
) -> None:
    """The CUDA kernels (decode attention, fused norm and rotary) end to end; on a machine
    without CUDA they run in Triton's interpreter, so this stays small."""
    pytest.importorskip("triton")
    ps = prompts(2, 9, 14, seed=3)
    llm = make_llm(tiny_hf["llama"], max_num_batched_tokens=6, attention_backend="triton")
    assert tokens(llm, ps, greedy(3)) == hf_reference(tiny_hf["llama"], ps, 3)


def test_triton_prefill_kernel_with_prefix_hits_and_decodes(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM], hf_reference: Ref
) -> None:
    """The Triton prefill kernel on chunks that start after a prefix-cache hit, in steps that
    also carry decodes (interpreter mode without CUDA)."""
    pytest.importorskip("triton")
    base = prompts(1, 12, 12, seed=8)[0]
    ps = [base + tail for tail in prompts(3, 2, 7, seed=9)]
    llm = make_llm(tiny_hf["qwen2"], max_num_batched_tokens=10, attention_backend="triton")
    assert tokens(llm, [base], greedy(2)) == hf_reference(tiny_hf["qwen2"], [base], 2)
    hits_before = llm.engine.block_manager.prefix_hits
    assert tokens(llm, ps, greedy(3)) == hf_reference(tiny_hf["qwen2"], ps, 3)
    assert llm.engine.block_manager.prefix_hits > hits_before


def test_prefix_cache_hits_give_the_same_tokens(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM], hf_reference: Ref
) -> None:
    base = prompts(1, 30, 30, seed=4)[0]
    ps = [base + tail for tail in prompts(4, 2, 9, seed=5)]
    llm = make_llm(tiny_hf["llama"])
    first = tokens(llm, [base], greedy(6))
    assert first == hf_reference(tiny_hf["llama"], [base], 6)
    hits_before = llm.engine.block_manager.prefix_hits
    assert tokens(llm, ps, greedy(6)) == hf_reference(tiny_hf["llama"], ps, 6)
    assert llm.engine.block_manager.prefix_hits - hits_before >= 4 * 28  # 7 full blocks each


def test_preemption_gives_the_same_tokens(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM], hf_reference: Ref
) -> None:
    ps = prompts(8, 10, 20, seed=6)
    # 24 blocks of 4 tokens: 8 requests of up to 20 + 24 tokens cannot all stay resident
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # layers * kv * block * heads * dim * 4 bytes
    llm = make_llm(tiny_hf["qwen2"], kv_cache_memory=24 * per_block, enable_prefix_caching=False)
    assert llm.engine.block_manager.num_blocks == 24
    assert tokens(llm, ps, greedy(24)) == hf_reference(tiny_hf["qwen2"], ps, 24)
    assert llm.engine.num_preemptions > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_q4_gguf_greedy_matches_transformers_on_both_kernels(
    arch: str, tmp_path: Path, make_llm: Callable[..., LLM], hf_reference: Ref
) -> None:
    """A Q4_1 file: batches of up to int4_max_rows run on the 4-bit kernel, larger ones on the
    dense weights; both give transformers' greedy tokens (transformers dequantizes the file)."""
    from inferhub.layers.quant_linear import Int4Linear
    from tiny_models import make_tiny_gguf

    path = make_tiny_gguf(tmp_path, arch, quant="Q4_1")
    llm = make_llm(path, weight_quant="auto", int4_max_rows=4)
    assert any(isinstance(m, Int4Linear) for m in llm.engine.model.modules())
    ps = prompts(12, 3, 30, seed=21)
    expected = hf_reference(path, ps, 10)  # transformers reads the GGUF through from_pretrained
    assert [tokens(llm, [p], greedy(10))[0] for p in ps[:3]] == expected[:3]  # 4-bit kernel
    assert tokens(llm, ps, greedy(10)) == expected  # 12 at once: dense weights for most steps


def test_same_prompt_four_times_gives_identical_greedy_outputs(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM]
) -> None:
    p = prompts(1, 17, 17, seed=7)[0]
    llm = make_llm(tiny_hf["qwen2"])
    outs = tokens(llm, [p] * 4, greedy(16))
    assert all(o == outs[0] for o in outs)


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM]
) -> None:
    p = prompts(1, 12, 12, seed=8)[0]
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    llm = make_llm(tiny_hf["qwen2"])
    alone = llm.generate([p], seeded)[0][0].token_ids
    busy = prompts(10, 5, 50, seed=9)
    params = [SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)] * 10
    mixed = llm.generate([*busy[:5], p, *busy[5:]], [*params[:5], seeded, *params[5:]])
    assert mixed[5][0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True)
    assert llm.generate([p], other_seed)[0][0].token_ids != alone


def test_n_choices_share_the_prompt_prefill(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM]
) -> None:
    p = prompts(1, 21, 21, seed=10)[0]
    llm = make_llm(tiny_hf["llama"], enable_prefix_caching=False)
    computed: list[int] = []
    original = llm.engine.runner.execute

    def spy(out: SchedulerOutput, sample: list[int]) -> torch.Tensor:
        computed.append(out.total_tokens)
        return original(out, sample)

    llm.engine.runner.execute = spy  # type: ignore[method-assign]
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    choices = llm.generate([p], params)[0]
    assert [c.index for c in choices] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 6 for c in choices)
    assert len({tuple(c.token_ids) for c in choices}) > 1  # the choices differ
    # one prefill of 21 tokens, then 5 decode steps of 4 sequences
    assert sum(computed) == 21 + 5 * 4


def test_n_greedy_choices_are_identical_and_match_single(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM]
) -> None:
    p = prompts(1, 9, 9, seed=11)[0]
    llm = make_llm(tiny_hf["qwen2"])
    single = tokens(llm, [p], greedy(10))[0]
    choices = llm.generate([p], greedy(10, n=3))[0]
    assert [c.token_ids for c in choices] == [single] * 3


def test_max_tokens_and_eos_finish_reasons(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM]
) -> None:
    llm = make_llm(tiny_hf["qwen2"])
    p = prompts(1, 8, 8, seed=12)[0]
    r = llm.generate([p], greedy(5))[0][0]
    assert r.finish_reason == "length" and len(r.token_ids) == 5
    eos = min(llm.engine.eos_token_ids)
    forced = SamplingParams(temperature=0.0, max_tokens=5, logit_bias={eos: 100.0})
    r = llm.generate([p], forced)[0][0]
    assert r.finish_reason == "stop" and r.token_ids == [eos] and r.text == ""


def test_stop_token_ids_and_logprobs(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM]
) -> None:
    llm = make_llm(tiny_hf["qwen2"])
    p = prompts(1, 8, 8, seed=13)[0]
    free = llm.generate([p], greedy(6, logprobs=2))[0][0]
    assert free.logprobs is not None and len(free.logprobs) == 6
    for lp, tok in zip(free.logprobs, free.token_ids, strict=True):
        assert lp.token_id == tok and lp.logprob <= 0.0 and len(lp.top) == 2
        assert lp.top[0][2] >= lp.top[1][2]
        assert lp.logprob == pytest.approx(lp.top[0][2])  # greedy picks the most likely
    stop_at = free.token_ids[2]
    r = llm.generate([p], greedy(6, stop_token_ids=[stop_at]))[0][0]
    assert r.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    assert r.finish_reason == "stop"


def test_bad_requests_raise_clear_errors_and_leave_nothing_behind(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM]
) -> None:
    llm = make_llm(tiny_hf["qwen2"], max_model_len=64)
    with pytest.raises(PromptTooLongError, match="maximum context length is 64"):
        llm.engine.add_request("a", list(range(3, 63)), SamplingParams(max_tokens=10))
    with pytest.raises(PromptTooLongError):
        llm.engine.add_request("b", list(range(3, 70)), SamplingParams())
    with pytest.raises(SamplingParamsError) as err:
        llm.engine.add_request("c", [5, 6], SamplingParams(temperature=3.0))
    assert err.value.param == "temperature"
    with pytest.raises(SamplingParamsError):
        llm.engine.add_request("d", [5, 10_000], SamplingParams())
    with pytest.raises(SamplingParamsError):
        llm.engine.add_request("e", [5], SamplingParams(logit_bias={10_000: 1.0}))
    # the engine still serves
    assert len(llm.generate([[5, 6, 7]], greedy(3))[0][0].token_ids) == 3


def test_abort_frees_blocks_within_one_step(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM]
) -> None:
    llm = make_llm(tiny_hf["qwen2"])
    eng = llm.engine
    for i, p in enumerate(prompts(3, 10, 30, seed=14)):
        eng.add_request(f"r{i}", p, greedy(50, n=2))
    for _ in range(3):
        eng.step()
    assert eng.block_manager.num_used_blocks > 0
    out = eng.abort_request("r1")
    assert out is not None and out.finished
    assert all(c.finish_reason == "abort" for c in out.outputs)
    eng.abort_request("r0")
    eng.abort_request("r2")
    assert eng.block_manager.num_used_blocks == 0
    assert not eng.has_unfinished_requests()


def test_an_engine_error_fails_only_its_batch(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM]
) -> None:
    llm = make_llm(tiny_hf["qwen2"])
    eng = llm.engine
    original = eng.runner.execute
    calls = {"n": 0}

    def flaky(out: SchedulerOutput, sample: list[int]) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return original(out, sample)

    eng.runner.execute = flaky  # type: ignore[method-assign]
    eng.add_request("bad", [5, 6, 7], greedy(4))
    outs = eng.step()
    assert outs and outs[0].error is not None and "boom" in outs[0].error
    assert outs[0].outputs[0].finish_reason == "error"
    assert eng.block_manager.num_used_blocks == 0
    assert len(llm.generate([[5, 6, 7]], greedy(4))[0][0].token_ids) == 4


def test_an_engine_error_spares_the_requests_outside_the_failed_batch(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM]
) -> None:
    llm = make_llm(tiny_hf["qwen2"], max_num_seqs=2)
    eng = llm.engine
    expected = tokens(llm, [[9, 10, 11]], greedy(6))[0]  # what the spared request must get
    original = eng.runner.execute
    calls = {"n": 0}

    def flaky(out: SchedulerOutput, sample: list[int]) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:  # a decode step of the two running requests
            assert sorted({s.request_id for s in out.seqs}) == ["a", "b"]
            raise RuntimeError("boom")
        return original(out, sample)

    eng.runner.execute = flaky  # type: ignore[method-assign]
    eng.add_request("a", [5, 6, 7], greedy(6))
    eng.add_request("b", [6, 7, 8], greedy(6))
    eng.add_request("c", [9, 10, 11], greedy(6))  # waits: max_num_seqs=2
    finished: dict[str, RequestOutput] = {}
    got: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids_delta)
            if out.finished:
                finished[out.request_id] = out
    assert finished["a"].error is not None and "boom" in finished["a"].error
    assert finished["b"].error is not None
    assert finished["c"].error is None  # not in the failed batch: served in full
    assert got["c"] == expected
    assert eng.block_manager.num_used_blocks == 0


def test_a_sampler_error_fails_its_batch_and_the_engine_goes_on(
    tiny_hf: dict[str, Path], make_llm: Callable[..., LLM]
) -> None:
    llm = make_llm(tiny_hf["qwen2"])
    eng = llm.engine
    original = eng.sampler
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("sampler boom")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    eng.sampler = flaky  # type: ignore[assignment]
    eng.add_request("a", [5, 6, 7], greedy(4, n=2))  # forked children are failed too
    outs = [o for _ in range(3) for o in eng.step()]
    failed = [o for o in outs if o.finished]
    assert len(failed) == 1 and failed[0].error is not None and "sampler boom" in failed[0].error
    assert all(c.finish_reason == "error" for c in failed[0].outputs)
    assert eng.block_manager.num_used_blocks == 0 and not eng.has_unfinished_requests()
    assert len(llm.generate([[5, 6, 7]], greedy(4))[0][0].token_ids) == 4


def test_bad_model_paths(tmp_path: Path) -> None:
    from inferhub.config import EngineConfig
    from inferhub.models.config import UnsupportedModelError

    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(EngineConfig(model=str(tmp_path / "nope"), show_progress=False))
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(EngineConfig(model=str(bad), show_progress=False))
