"""End to end: the real server (embedded SmolLM2-135M-Instruct) driven by the official openai
client (sync and async) and raw httpx. Every parameter has a test that fails if it is ignored;
after every test no sequence runs and no KV block is used."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from fakes import parse_sse
from live import KEY, MODEL, LiveServer
from openai.types.chat import ChatCompletion

pytestmark = pytest.mark.slow

STORY = [{"role": "user", "content": "Tell me a story."}]
HELLO = [{"role": "user", "content": "Repeat the word hello ten times."}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CHINESE = [{"role": "user", "content": "Write a sentence in Chinese."}]
BANANA = 21285  # " banana" in SmolLM2's vocabulary (checked by the text it produces)
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def client(live_server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=live_server.v1, api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture(autouse=True)
def nothing_left_running(live_server: LiveServer) -> Iterator[None]:
    yield
    g = live_server.wait_idle(timeout=2.0)
    assert (g["num_requests_running"], g["num_requests_waiting"], g["kv_cache_used_blocks"]) == (
        0,
        0,
        0,
    )


def create(client: openai.OpenAI, messages: Any = STORY, **kw: Any) -> ChatCompletion:
    kw.setdefault("max_tokens", 20)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


def text(c: ChatCompletion, i: int = 0) -> str:
    content = c.choices[i].message.content
    assert content is not None
    return content


# -- the parameters -----------------------------------------------------------------------------------


def test_greedy_chat_and_usage(client: openai.OpenAI) -> None:
    c = create(client, temperature=0)
    assert c.id.startswith("chatcmpl-") and c.object == "chat.completion" and c.model == MODEL
    assert text(c).startswith("The story") and c.choices[0].finish_reason == "length"
    assert c.usage is not None and c.usage.completion_tokens == 20
    assert c.usage.total_tokens == c.usage.prompt_tokens + 20 and c.usage.prompt_tokens > 5


def test_temperature(client: openai.OpenAI) -> None:
    greedy = {text(create(client, temperature=0)) for _ in range(2)}
    assert len(greedy) == 1  # 0 means greedy: no randomness left
    hot = {text(create(client, temperature=1.5, seed=s)) for s in (1, 2, 3)}
    assert len(hot) >= 2 and greedy.isdisjoint(hot)


def test_top_p(client: openai.OpenAI) -> None:
    greedy = text(create(client, temperature=0))
    for seed in (1, 2):  # a nucleus of one token is greedy whatever the temperature
        assert text(create(client, temperature=1.5, top_p=1e-9, seed=seed)) == greedy


def test_seed(client: openai.OpenAI) -> None:
    a, b = (text(create(client, temperature=1.0, seed=7)) for _ in range(2))
    assert a == b
    assert text(create(client, temperature=1.0, seed=8)) != a


def test_n_gives_n_different_seeded_choices(client: openai.OpenAI) -> None:
    c = create(client, temperature=1.0, seed=1, n=3)
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    assert len({text(c, i) for i in range(3)}) == 3
    assert c.usage is not None and c.usage.completion_tokens == 60  # every choice is billed
    again = create(client, temperature=1.0, seed=1, n=3)
    assert [text(again, i) for i in range(3)] == [text(c, i) for i in range(3)]


def test_max_tokens(client: openai.OpenAI) -> None:
    c = create(client, FRANCE, temperature=0, max_tokens=3)
    assert c.choices[0].finish_reason == "length" and c.usage and c.usage.completion_tokens == 3
    c = create(client, FRANCE, temperature=0, max_tokens=None)  # up to the context: ends by itself
    assert c.choices[0].finish_reason == "stop" and "Paris" in text(c)


def test_stop(client: openai.OpenAI) -> None:
    full = text(create(client, temperature=0))
    assert "Elena" in full
    c = create(client, temperature=0, stop="Elena")
    assert text(c) == full[: full.index("Elena")] and c.choices[0].finish_reason == "stop"
    c = create(client, temperature=0, stop=["zzz", "woman", "Elena"])
    assert text(c) == full[: full.index("woman")]


def test_presence_and_frequency_penalties(client: openai.OpenAI) -> None:
    plain = text(create(client, HELLO, temperature=0, max_tokens=40))
    assert plain.lower().count("hello") >= 10
    for penalty in ("presence_penalty", "frequency_penalty"):
        penalized = text(create(client, HELLO, temperature=0, max_tokens=40, **{penalty: 2.0}))
        assert penalized != plain and penalized.lower().count("hello") < 10, penalty


def test_logit_bias(client: openai.OpenAI) -> None:
    c = create(client, temperature=0, max_tokens=4, logit_bias={str(BANANA): 100})
    assert text(c) == " banana" * 4
    first = text(create(client, temperature=0, max_tokens=1))
    assert first == "The"
    banned = text(create(client, temperature=0, max_tokens=1, logit_bias={"504": -100}))
    assert banned != "The"


def test_logprobs(client: openai.OpenAI) -> None:
    c = create(client, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    lp = c.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == 8
    assert "".join(t.token for t in lp.content) == text(c)
    for t in lp.content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely token
        values = [a.logprob for a in t.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert t.bytes is not None and bytes(t.bytes).decode() == t.token
    assert create(client, temperature=0, max_tokens=2).choices[0].logprobs is None


def test_user_is_recorded(client: openai.OpenAI, live_server: LiveServer) -> None:
    c = create(client, max_tokens=2, user="e2e-user-42")
    deadline = time.monotonic() + 2
    while c.id not in live_server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert re.search(rf"request {c.id} .*user='e2e-user-42'", live_server.log())


def test_extensions_top_k_min_p_ignore_eos(client: openai.OpenAI) -> None:
    greedy = text(create(client, temperature=0))
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        assert text(create(client, temperature=1.5, seed=3, extra_body=extra)) == greedy, extra
    c = create(client, FRANCE, temperature=0, max_tokens=30, extra_body={"ignore_eos": True})
    assert c.choices[0].finish_reason == "length" and c.usage and c.usage.completion_tokens == 30


# -- streaming ---------------------------------------------------------------------------------------


def test_stream_framing_chinese_and_usage(client: openai.OpenAI, live_server: LiveServer) -> None:
    whole = create(client, CHINESE, temperature=0, max_tokens=40)
    body = {"model": MODEL, "messages": CHINESE, "temperature": 0, "max_tokens": 40, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    r = httpx.post(live_server.v1 + "/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    payloads = parse_sse(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    usage = chunks.pop()
    assert whole.usage is not None and usage["choices"] == []
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [usage["usage"][k] for k in counts] == [getattr(whole.usage, k) for k in counts]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert (
        chunks[-1]["choices"][0]["finish_reason"] == "length"
        and chunks[-1]["choices"][0]["delta"] == {}
    )
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == text(whole)
    assert "\ufffd" not in streamed and re.search(r"[\u4e00-\u9fff]", streamed)


def test_stream_events_survive_clients_that_split_lines_on_unicode_line_breaks(
    live_server: LiveServer,
) -> None:
    """U+2028, U+2029 and NEL are line ends for str.splitlines() (httpx's iter_lines) but not
    for SSE: raw in an event, they cut it in two for such clients. The server escapes them."""
    prompt = "one\u2028two\u2029three\x85four"
    body = {"model": MODEL, "prompt": prompt, "echo": True, "max_tokens": 3, "temperature": 0,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", live_server.v1 + "/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks).startswith(prompt)


def test_stream_n_with_openai_client(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=STORY, n=2, seed=5, max_tokens=10, stream=True,  # type: ignore[arg-type]
    )  # fmt: skip
    texts = {0: "", 1: ""}
    finish = {}
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    whole = create(client, n=2, seed=5, max_tokens=10)
    assert texts == {0: text(whole, 0), 1: text(whole, 1)} and finish == {0: "length", 1: "length"}


def test_async_client_32_concurrent_streams(live_server: LiveServer, client: openai.OpenAI) -> None:
    expected = text(create(client, temperature=0, max_tokens=16))

    async def one(ac: openai.AsyncOpenAI) -> tuple[str, str | None]:
        stream = await ac.chat.completions.create(
            model=MODEL, messages=STORY, temperature=0, max_tokens=16, stream=True,  # type: ignore[arg-type]
        )  # fmt: skip
        out, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                out += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return out, finish

    async def run() -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(base_url=live_server.v1, api_key=KEY, max_retries=0) as ac:
            return await asyncio.gather(*(one(ac) for _ in range(32)))

    assert asyncio.run(run()) == [(expected, "length")] * 32


def test_stream_disconnect_frees_everything(live_server: LiveServer) -> None:
    body = {
        "model": MODEL,
        "messages": STORY,
        "max_tokens": 1500,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", live_server.v1 + "/chat/completions", json=body, headers=AUTH) as r:
        lines = r.iter_lines()
        for _ in range(12):
            next(lines)
        assert live_server.gauges()["num_requests_running"] == 1
        rid = r.headers["x-request-id"]
    dropped = time.monotonic()
    g = live_server.wait_idle(timeout=1.0)
    assert time.monotonic() - dropped <= 1.0
    assert (g["num_requests_running"], g["kv_cache_used_blocks"]) == (0, 0)
    assert re.search(rf"request {rid} .*end=client_disconnected", live_server.log())


def test_non_stream_disconnect_frees_everything(live_server: LiveServer) -> None:
    body = {"model": MODEL, "messages": STORY, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_server.v1 + "/chat/completions", json=body, headers=AUTH, timeout=1.0)
    g = live_server.wait_idle(timeout=1.0)
    assert (g["num_requests_running"], g["kv_cache_used_blocks"]) == (0, 0)


# -- completions and models -------------------------------------------------------------------------------


def test_completions(client: openai.OpenAI) -> None:
    c = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert c.object == "text_completion" and c.choices[0].finish_reason == "length"
    echoed = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "The capital of France is" + c.choices[0].text
    ids = client.completions.create(model=MODEL, prompt=[504, 3575], max_tokens=4, temperature=0)
    assert ids.usage is not None and ids.usage.prompt_tokens == 2
    two = client.completions.create(
        model=MODEL,
        prompt=["The capital of France is", "One, two,"],
        n=2,
        max_tokens=4,
        temperature=0,
        logprobs=2,
    )
    assert [ch.index for ch in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text == c.choices[0].text
    lp = two.choices[2].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 4
    assert lp.top_logprobs is not None and all(len(t) <= 2 for t in lp.top_logprobs)
    streamed = "".join(
        ch.choices[0].text
        for ch in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True
        )
    )
    assert streamed == c.choices[0].text


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_metrics_after_traffic(client: openai.OpenAI, live_server: LiveServer) -> None:
    create(client, max_tokens=3)
    metrics = httpx.get(live_server.base + "/metrics").text
    for name in (
        "time_to_first_token_seconds",
        "time_per_output_token_seconds",
        "e2e_request_latency_seconds",
    ):
        m = re.search(rf'^inferhub_{name}_count{{model="{MODEL}"}} (\S+)$', metrics, re.M)
        assert m and float(m.group(1)) >= 1, name
    assert re.search(
        r'inferhub_http_requests_total\{route="/v1/chat/completions",status="200"\}', metrics
    )
    assert live_server.gauges()["kv_cache_total_blocks"] > 0


# -- invalid input: status and OpenAI error body ------------------------------------------------------------


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": STORY, **fields}


INVALID = [
    (chat_body(temperature=2.5), 400, "temperature", "invalid_value"),
    (chat_body(top_p=0), 400, "top_p", "invalid_value"),
    (chat_body(top_p=1.5), 400, "top_p", "invalid_value"),
    (chat_body(n=0), 400, "n", "invalid_value"),
    (chat_body(n=129), 400, "n", "invalid_value"),
    (chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
    (chat_body(presence_penalty=-2.5), 400, "presence_penalty", "invalid_value"),
    (chat_body(frequency_penalty=2.5), 400, "frequency_penalty", "invalid_value"),
    (chat_body(logit_bias={"5": 150}), 400, "logit_bias", "invalid_value"),
    (chat_body(logit_bias={"49152": 1}), 400, "logit_bias", "invalid_value"),
    (chat_body(logit_bias={"x": 1}), 400, "logit_bias", "invalid_value"),
    (chat_body(messages=[]), 400, "messages", "invalid_value"),
    (chat_body(messages=[{"role": "user"}]), 400, "messages[0].content", None),
    (
        chat_body(messages=[{"role": "wizard", "content": "x"}]),
        400,
        "messages[0].role",
        "invalid_value",
    ),
    (
        chat_body(messages=[{"role": "user", "content": 1}]),
        400,
        "messages[0].content",
        "invalid_value",
    ),
    (chat_body(temperature="hot"), 400, "temperature", "invalid_value"),
    (chat_body(n=2.0), 400, "n", "invalid_value"),
    (chat_body(stream="yes"), 400, "stream", "invalid_value"),
    (chat_body(model="nope"), 404, "model", "model_not_found"),
    (chat_body(max_tokens=2040), 400, "messages", "context_length_exceeded"),
    (chat_body(frobnicate=True), 400, "frobnicate", "invalid_value"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), INVALID)
def test_invalid_input(
    live_server: LiveServer, body: dict[str, Any], status: int, param: str, code: str | None
) -> None:
    r = httpx.post(live_server.v1 + "/chat/completions", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)
    assert err["message"]


def test_context_length_message_has_the_numbers(live_server: LiveServer) -> None:
    r = httpx.post(
        live_server.v1 + "/chat/completions", json=chat_body(max_tokens=2040), headers=AUTH
    )
    msg = r.json()["error"]["message"]
    assert (
        "2048" in msg
        and "2040" in msg
        and re.search(r"requested \d+ tokens \(\d+ in the messages", msg)
    )


def test_auth_body_size_and_json(live_server: LiveServer) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        r = httpx.post(live_server.v1 + "/chat/completions", json=chat_body(), headers=headers)
        assert r.status_code == 401
        assert r.json()["error"] | {"message": ""} == {
            "message": "",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    r = httpx.post(
        live_server.v1 + "/chat/completions",
        content=b"x" * (5 * 2**20),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]
    r = httpx.post(
        live_server.v1 + "/chat/completions",
        content=b'{"model": ',
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_health_and_ready(live_server: LiveServer) -> None:
    assert httpx.get(live_server.base + "/health").status_code == 200
    assert httpx.get(live_server.base + "/ready").json() == {"status": "ready", "models": [MODEL]}
