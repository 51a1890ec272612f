"""The app against a fake engine (no model): response shapes of chat, completions and
models, SSE framing, /health, /ready and /metrics, and the app's lifecycle."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
from fakes import (
    AUTH,
    KEY,
    REPLY,
    USER,
    FakeEngine,
    RecordingGatekeeper,
    chat,
    parse_sse,
    post,
    running_server,
)

# -- shapes ------------------------------------------------------------------------------------------


def test_chat_completion_shape(url: str, gatekeeper: RecordingGatekeeper) -> None:
    r = post(url, "/v1/chat/completions", chat())
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and r.headers["x-request-id"] == body["id"]
    assert r.headers["x-ratelimit-limit-requests"] == "60"  # the admission's headers
    assert body["object"] == "chat.completion" and body["model"] == "fake"
    assert isinstance(body["created"], int) and body["system_fingerprint"] is None
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": REPLY, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    prompt = len("<user>hi<assistant>")
    assert body["usage"]["prompt_tokens"] == prompt
    assert body["usage"]["completion_tokens"] == len(REPLY)
    assert body["usage"]["total_tokens"] == prompt + len(REPLY)
    [settled] = gatekeeper.wait_settled(1)
    assert (settled.request_id, settled.end_state, settled.finish_reasons) == (
        body["id"],
        "completed",
        ["stop"],
    )
    assert (settled.prompt_tokens, settled.completion_tokens) == (prompt, len(REPLY))
    assert gatekeeper.recorded[body["id"]] == len(REPLY)


def test_openai_client_parses_everything(url: str) -> None:
    with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as client:
        c = client.chat.completions.create(
            model="fake", messages=USER, n=2, logprobs=True, top_logprobs=2
        )  # type: ignore[arg-type]
        assert [ch.message.content for ch in c.choices] == [f"{REPLY} 0", f"{REPLY} 1"]
        assert c.usage is not None and c.usage.completion_tokens == 2 * len(f"{REPLY} 0")
        lp = c.choices[0].logprobs
        assert lp is not None and lp.content is not None
        assert lp.content[0].token == "H" and len(lp.content[0].top_logprobs) == 2
        assert "".join(t.token for t in lp.content) == f"{REPLY} 0"
        models = client.models.list()
        assert [m.id for m in models.data] == ["fake"]
        assert client.models.retrieve("fake").id == "fake"
        comp = client.completions.create(model="fake", prompt="ab", max_tokens=3, logprobs=1)
        assert comp.choices[0].text == "Hel" and comp.choices[0].finish_reason == "length"
        assert comp.choices[0].logprobs is not None
        assert comp.choices[0].logprobs.text_offset == [0, 1, 2]


def test_async_client_streams(url: str) -> None:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as client:
            stream = await client.chat.completions.create(model="fake", messages=USER, stream=True)  # type: ignore[arg-type]
            return [c.choices[0].delta.content or "" async for c in stream if c.choices]

    assert "".join(asyncio.run(run())) == REPLY


def test_stream_framing_and_order(url: str) -> None:
    with httpx.stream(
        "POST", url + "/v1/chat/completions", headers=AUTH,
        json=chat(stream=True, n=2, stream_options={"include_usage": True}),
    ) as r:  # fmt: skip
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"].startswith("chatcmpl-")
        payloads = parse_sse(r.read().decode())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["id"] for c in chunks} == {r.headers["x-request-id"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2 * len(REPLY + " 0")
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in ch["delta"] for ch in mine[1:])
        assert mine[-1] == {"index": index, "delta": {}, "logprobs": None, "finish_reason": "stop"}
        assert all(ch["finish_reason"] is None for ch in mine[:-1])
        assert "".join(ch["delta"].get("content", "") for ch in mine) == f"{REPLY} {index}"


def test_no_usage_chunk_unless_asked(url: str) -> None:
    r = post(url, "/v1/chat/completions", chat(stream=True))
    chunks = [json.loads(p) for p in parse_sse(r.text)[:-1]]
    assert all(c["choices"] for c in chunks)


def test_completions_echo_and_several_prompts(url: str) -> None:
    r = post(
        url,
        "/v1/completions",
        {"model": "fake", "prompt": ["ab", "cd"], "n": 2, "echo": True, "max_tokens": 2},
    )
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["text"] for c in body["choices"]] == ["abHe", "abHe", "cdHe", "cdHe"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"] == {
        "prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 0},
    }  # fmt: skip


def test_completions_stream(url: str) -> None:
    r = post(
        url,
        "/v1/completions",
        {
            "model": "fake",
            "prompt": "ab",
            "echo": True,
            "stream": True,
            "max_tokens": 3,
            "stream_options": {"include_usage": True},
        },
    )
    payloads = parse_sse(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    usage = chunks.pop()
    assert usage["usage"]["completion_tokens"] == 3 and usage["choices"] == []
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abHel"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completion_prompt_token_ids_are_checked(url: str) -> None:
    r = post(url, "/v1/completions", {"model": "fake", "prompt": [70000]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(url, "/v1/completions", {"model": "fake", "prompt": ""})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]


# -- operations -----------------------------------------------------------------------------------------


def test_health_ready_metrics(url: str) -> None:
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/ready").json() == {"status": "ready", "models": ["fake"]}
    post(url, "/v1/chat/completions", chat())
    post(url, "/v1/chat/completions", chat(temperature=9))
    text = httpx.get(url + "/metrics").text
    assert 'inferhub_http_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'inferhub_http_requests_total{route="/v1/chat/completions",status="400"} 1.0' in text
    assert 'inferhub_request_finished_total{end_state="completed",model="fake"} 1.0' in text
    assert 'inferhub_time_to_first_token_seconds_count{model="fake"} 1.0' in text
    assert 'inferhub_time_per_output_token_seconds_count{model="fake"} 1.0' in text
    assert 'inferhub_e2e_request_latency_seconds_count{model="fake"} 1.0' in text
    assert f'inferhub_generation_tokens_total{{model="fake"}} {float(len(REPLY))}' in text
    assert 'inferhub_num_requests_running{model="fake"} 0.0' in text
    assert 'inferhub_kv_cache_usage_perc{model="fake"} 0.0' in text


def test_lifespan_starts_and_stops_engines(gatekeeper: RecordingGatekeeper) -> None:
    engine = FakeEngine()
    with running_server({"fake": engine}, gatekeeper):
        assert engine.started and not engine.stopped
    assert engine.stopped


def test_no_module_level_state(gatekeeper: RecordingGatekeeper) -> None:
    a, b = FakeEngine("a"), FakeEngine("b")
    with (
        running_server({"a": a}, gatekeeper) as url_a,
        running_server({"b": b}, gatekeeper) as url_b,
    ):
        assert [m["id"] for m in httpx.get(url_a + "/v1/models", headers=AUTH).json()["data"]] == [
            "a"
        ]
        assert [m["id"] for m in httpx.get(url_b + "/v1/models", headers=AUTH).json()["data"]] == [
            "b"
        ]
