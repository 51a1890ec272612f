"""A generation's lifecycle against a fake engine: the gateway's admit / record / settle
exactly once, engine errors, disconnects (stream or not) aborting the engine request,
concurrent streams."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from fakes import (
    AUTH,
    REPLY,
    FakeEngine,
    RecordingGatekeeper,
    chat,
    error,
    parse_sse,
    post,
    running_server,
)

from inferhub.config import ServerConfig

# -- the gateway lifecycle ------------------------------------------------------------------------------


def test_reservation_is_n_times_max_tokens(url: str, gatekeeper: RecordingGatekeeper) -> None:
    post(url, "/v1/chat/completions", chat(n=3, max_tokens=5))
    post(url, "/v1/chat/completions", chat(n=2))
    prompt = len("<user>hi<assistant>")
    assert [a["max_completion_tokens"] for a in gatekeeper.admitted] == [15, 2 * (256 - prompt)]
    assert [a["prompt_tokens"] for a in gatekeeper.admitted] == [prompt, prompt]


def test_engine_error_settles_once(gatekeeper: RecordingGatekeeper) -> None:
    with running_server({"fake": FakeEngine(fail_after=3)}, gatekeeper) as url:
        err = error(post(url, "/v1/chat/completions", chat()), 500)
        assert err["type"] == "server_error" and "boom" in err["message"]
        payloads = parse_sse(post(url, "/v1/chat/completions", chat(stream=True)).text)
        assert payloads[-1] == "[DONE]"
        assert "boom" in json.loads(payloads[-2])["error"]["message"]
    assert [s.end_state for s in gatekeeper.settled] == ["error", "error"]
    assert [s.completion_tokens for s in gatekeeper.settled] == [3, 3]


def running_gone(engine: FakeEngine, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    return not engine.running


def test_stream_disconnect_aborts_and_settles(gatekeeper: RecordingGatekeeper) -> None:
    engine = FakeEngine(endless=True, delay=0.01)
    with running_server({"fake": engine}, gatekeeper) as url:
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=chat(stream=True), headers=AUTH
        ) as r:
            lines = r.iter_lines()
            for _ in range(10):
                next(lines)
            rid = r.headers["x-request-id"]
        assert running_gone(engine)
        [settled] = gatekeeper.wait_settled(1)
        assert engine.aborted == [rid]
        assert (settled.end_state, settled.finish_reasons) == ("client_disconnected", ["abort"])
        assert settled.completion_tokens >= 4


def test_non_stream_disconnect_aborts_and_settles(gatekeeper: RecordingGatekeeper) -> None:
    engine = FakeEngine(endless=True, delay=0.01)
    with running_server({"fake": engine}, gatekeeper) as url:
        with pytest.raises(httpx.ReadTimeout):
            post(url, "/v1/chat/completions", chat(), timeout=0.3)
        assert running_gone(engine)
        [settled] = gatekeeper.wait_settled(1)
        assert settled.end_state == "client_disconnected" and settled.completion_tokens > 0
        assert len(engine.aborted) == 1


def test_concurrent_streams(gatekeeper: RecordingGatekeeper) -> None:
    engine = FakeEngine(delay=0.001)

    async def one(client: httpx.AsyncClient, i: int) -> str:
        r = await client.post("/v1/chat/completions", json=chat(stream=True, seed=i), headers=AUTH)
        chunks = [json.loads(p) for p in parse_sse(r.text)[:-1]]
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)

    async def run(url: str) -> list[str]:
        async with httpx.AsyncClient(
            base_url=url, limits=httpx.Limits(max_connections=64)
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    with running_server({"fake": engine}, gatekeeper) as url:
        assert asyncio.run(run(url)) == [REPLY] * 32
    assert len(gatekeeper.settled) == 32 and {s.end_state for s in gatekeeper.settled} == {
        "completed"
    }


@pytest.mark.parametrize("disconnect_after", [0, 3])
def test_stream_settles_when_client_leaves_early(disconnect_after: int) -> None:
    """The client is gone before the body starts, or while it is being sent: the engine
    request is aborted and the generation settled once, as client_disconnected."""
    from inferhub.server.app import create_app
    from inferhub.server.chat import ChatRenderer
    from inferhub.server.generation import admit_generation
    from inferhub.server.state import ServerState

    engine = FakeEngine(endless=True, delay=0.001)
    gatekeeper = RecordingGatekeeper()
    state: ServerState = create_app(ServerConfig(), {"fake": engine}, gatekeeper).state.server

    async def run() -> None:
        from inferhub.engine.sampling_params import SamplingParams
        from inferhub.gateway.interface import Principal

        gen = await admit_generation(
            state, Principal("k", "a"), engine, request_id="r1", prompts=[[1, 2]],
            params=SamplingParams(), user=None, arrival=time.monotonic(),
        )  # fmt: skip
        response = gen.streaming_response(gen.sse(ChatRenderer("r1", "fake", 1, False), False), {})
        sent: list[dict[str, Any]] = []
        gone = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if len(sent) > disconnect_after:
                gone.set()
            await asyncio.sleep(0)

        scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "headers": []}
        await response(scope, receive, send)
        # checked while the response object (and its body) is still alive
        [settled] = gatekeeper.settled
        assert settled.end_state == "client_disconnected"
        assert not engine.running and state.in_flight == 0

    asyncio.run(run())
