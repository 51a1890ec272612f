"""The engine thread with async streams: concurrency, streaming order and aborts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from inferhub.config import EngineConfig
from inferhub.engine.async_engine import AsyncEngine
from inferhub.engine.outputs import RequestOutput
from inferhub.engine.sampling_params import SamplingParams


@pytest.fixture
def engine(tiny_hf: dict[str, Path]) -> AsyncEngine:
    eng = AsyncEngine(
        EngineConfig(
            model=str(tiny_hf["qwen2"]),
            name="tiny",
            dtype="float32",
            device="cpu",
            block_size=4,
            kv_cache_memory=4 << 20,
            show_progress=False,
        )
    )
    eng.start()
    yield eng
    eng.shutdown()
    assert eng.engine.block_manager.num_used_blocks == 0


async def collect(
    eng: AsyncEngine, rid: str, prompt: list[int], p: SamplingParams
) -> list[RequestOutput]:
    return [out async for out in eng.generate(rid, prompt, p)]


def test_concurrent_streams_match_offline(engine: AsyncEngine) -> None:
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


def test_closing_the_stream_aborts_within_a_step(engine: AsyncEngine) -> None:
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


def test_abort_and_wait_reports_exact_counts(engine: AsyncEngine) -> None:
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


def test_bad_request_raises_before_streaming(engine: AsyncEngine) -> None:
    from inferhub.engine.sampling_params import SamplingParamsError

    async def main() -> None:
        with pytest.raises(SamplingParamsError):
            await collect(engine, "bad", [5], SamplingParams(top_p=0.0))

    asyncio.run(main())
