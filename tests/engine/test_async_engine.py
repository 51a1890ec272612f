"""The async engines (the engine in a thread, and in a child process) with async streams:
concurrency, streaming order and aborts; then what only the process engine has (a model that
fails to load, a child that dies, Ctrl-C, shutdown with requests running)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferhub.config import EngineConfig
from inferhub.engine.async_engine import AsyncEngine
from inferhub.engine.engine_process import ProcessEngine
from inferhub.engine.errors import EngineDeadError, EngineError
from inferhub.engine.outputs import RequestOutput
from inferhub.engine.sampling_params import SamplingParams


def tiny_config(tiny_hf: dict[str, Path], **overrides: object) -> EngineConfig:
    settings: dict[str, object] = {
        "model": str(tiny_hf["qwen2"]),
        "name": "tiny",
        "dtype": "float32",
        "device": "cpu",
        "block_size": 4,
        "kv_cache_memory": 4 << 20,
        "show_progress": False,
        **overrides,
    }
    return EngineConfig(**settings)  # type: ignore[arg-type]


Engine = AsyncEngine | ProcessEngine


@pytest.fixture(params=["thread", "process"])
def engine(request: pytest.FixtureRequest, tiny_hf: dict[str, Path]) -> Iterator[Engine]:
    eng: Engine = (AsyncEngine if request.param == "thread" else ProcessEngine)(
        tiny_config(tiny_hf)
    )
    eng.start()
    yield eng
    eng.shutdown()
    assert eng.stats().num_used_blocks == 0 and eng.stats().num_running == 0


@pytest.fixture
def process_engine(tiny_hf: dict[str, Path]) -> Iterator[ProcessEngine]:
    eng = ProcessEngine(tiny_config(tiny_hf))
    eng.start()
    yield eng
    eng.shutdown()


async def collect(
    eng: Engine, rid: str, prompt: list[int], p: SamplingParams
) -> list[RequestOutput]:
    return [out async for out in eng.generate(rid, prompt, p)]


def test_concurrent_streams_match_offline(engine: Engine) -> None:
    p = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompt = [5, 6, 7, 8, 9, 10, 11]

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(engine, f"r{i}", prompt, p) for i in range(8)))

    results = asyncio.run(main())
    seqs = [[t for o in outs for c in o.outputs for t in c.token_ids_delta] for outs in results]
    assert all(s == seqs[0] for s in seqs) and len(seqs[0]) == 10
    for outs in results:
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert outs[-1].outputs[0].finish_reason == "length"
        assert outs[-1].outputs[0].num_output_tokens == 10


def test_closing_the_stream_aborts_within_a_step(engine: Engine) -> None:
    p = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main() -> None:
        gen = engine.generate("long", [5, 6, 7], p)
        async for _ in gen:
            break
        await gen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.01)
            st = engine.stats()
            if st.num_running == 0 and st.num_used_blocks == 0:
                return
        raise AssertionError("request still running after abort")

    asyncio.run(main())


def test_abort_and_wait_reports_exact_counts(engine: Engine) -> None:
    p = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True, n=2)

    async def main() -> None:
        seen = 0
        gen = engine.generate("x", [5, 6, 7], p)
        async for out in gen:
            seen += len(out.outputs)
            if seen > 6:
                break
        final = await engine.abort_and_wait("x")
        await gen.aclose()
        assert final is not None and final.finished
        assert [c.finish_reason for c in final.outputs] == ["abort", "abort"]
        assert all(c.num_output_tokens >= 3 for c in final.outputs)

    asyncio.run(main())


def test_bad_request_raises_before_streaming(engine: Engine) -> None:
    from inferhub.engine.sampling_params import SamplingParamsError

    async def main() -> None:
        with pytest.raises(SamplingParamsError):
            await collect(engine, "bad", [5], SamplingParams(top_p=0.0))

    asyncio.run(main())


def test_process_engine_streams_what_the_thread_engine_streams(
    tiny_hf: dict[str, Path], process_engine: ProcessEngine
) -> None:
    """Same requests (greedy, seeded sampling with n=2, penalties, logprobs): the same
    outputs, chunk by chunk, from the engine in a thread and in a process."""
    thread_engine = AsyncEngine(tiny_config(tiny_hf))
    thread_engine.start()
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, logprobs=2, presence_penalty=1.5),
    ]

    async def run(eng: Engine) -> list[list[RequestOutput]]:
        # One at a time: which requests share a step depends on timing, and on a tiny random
        # model a different batch shape can flip a near-tie between two logits.
        return [await collect(eng, f"r{i}", [5, 6, 7, 8 + i], p) for i, p in enumerate(params)]

    try:
        assert asyncio.run(run(process_engine)) == asyncio.run(run(thread_engine))
    finally:
        thread_engine.shutdown()


def test_a_model_that_fails_to_load_raises_the_childs_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"missing\.gguf"):
        ProcessEngine(EngineConfig(model=str(tmp_path / "missing.gguf"), show_progress=False))


def test_a_dead_engine_process_fails_its_streams_and_refuses_new_requests(
    process_engine: ProcessEngine,
) -> None:
    p = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)

    async def main() -> None:
        gen = process_engine.generate("long", [5, 6, 7], p)
        await gen.__anext__()
        assert process_engine._process.pid is not None
        os.kill(process_engine._process.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            async for _ in gen:
                pass
        assert not process_engine.is_running
        with pytest.raises(EngineDeadError):
            await collect(process_engine, "next", [5], p)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_the_engine_process_ignores_ctrl_c_and_shutdown_aborts_running_requests(
    process_engine: ProcessEngine,
) -> None:
    """Ctrl-C reaches the whole process group; the server drains its requests, so the engine
    must keep running until it is told to stop, and then end what still runs."""
    assert process_engine._process.pid is not None
    os.kill(process_engine._process.pid, signal.SIGINT)
    p = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)

    async def main() -> RequestOutput:
        outs = await collect(
            process_engine, "short", [5, 6], SamplingParams(max_tokens=3, ignore_eos=True)
        )
        assert outs[-1].finished and outs[-1].outputs[0].num_output_tokens == 3
        gen = process_engine.generate("long", [5, 6, 7], p)
        await gen.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, process_engine.shutdown)
        return [out async for out in gen][-1]

    last = asyncio.run(asyncio.wait_for(main(), 30))
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert process_engine._process.exitcode == 0
    assert process_engine.stats().num_used_blocks == 0
