"""Stand-ins for server unit tests: a character-level fake engine, a recording gatekeeper,
an in-process uvicorn server on a free loopback port, and small request helpers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
import uvicorn

from inferhub.config import ServerConfig
from inferhub.engine.errors import PromptTooLongError
from inferhub.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from inferhub.engine.sampling_params import SamplingParams
from inferhub.gateway.interface import Admission, GatewayError, Principal
from inferhub.server.app import create_app


class FakeTokenizer:
    """One token per character: token id = code point."""

    vocab_size = 0x10000
    eos_token_ids: ClassVar[set[int]] = {0}

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return self.encode(text + ("<assistant>" if add_generation_prompt else ""))


@dataclass
class FakeStats:
    num_running: int
    num_waiting: int = 0
    num_used_blocks: int = 0
    num_free_blocks: int = 100
    num_blocks: int = 100
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    total_prompt_tokens: int = 0
    total_generation_tokens: int = 0


class FakeEngine:
    """Choice k answers `reply` (with " k" appended when n > 1), one character per step."""

    def __init__(
        self,
        name: str = "fake",
        reply: str = "Hello, world! 你好",
        *,
        delay: float = 0.0,
        max_model_len: int = 256,
        endless: bool = False,
        fail_after: int | None = None,
        hold: threading.Event | None = None,
    ) -> None:
        self.name = name
        self.reply = reply
        self.delay = delay
        self.max_model_len = max_model_len
        self.endless = endless
        self.fail_after = fail_after
        self.hold = hold  # while set is False, requests wait (as in an engine's queue)
        self.tokenizer = FakeTokenizer()
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.requests: list[tuple[str, list[int], SamplingParams]] = []
        self.started = False
        self.stopped = False

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.stopped = True

    def stats(self) -> FakeStats:
        return FakeStats(num_running=len(self.running), num_used_blocks=len(self.running))

    def abort(self, request_id: str) -> None:
        self.running.discard(request_id)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        params.validate(self.tokenizer.vocab_size)
        if len(prompt_token_ids) + (params.max_tokens or 1) > self.max_model_len:
            raise PromptTooLongError(len(prompt_token_ids), params.max_tokens, self.max_model_len)

    def _text(self, k: int, n: int) -> str:
        return self.reply + (f" {k}" if n > 1 else "")

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        self.requests.append((request_id, prompt_token_ids, params))
        self.running.add(request_id)
        finished = False
        texts = {k: "" for k in range(params.n)}
        done: dict[int, str] = {}
        cap = params.max_tokens or self.max_model_len - len(prompt_token_ids)
        try:
            while self.hold is not None and not self.hold.is_set():
                await asyncio.sleep(0.005)
            step = 0
            while len(done) < params.n:
                await asyncio.sleep(self.delay)
                if self.fail_after is not None and step >= self.fail_after:
                    outs = [
                        CompletionOutput(k, "", [], None, texts[k], len(texts[k]), "error")
                        for k in range(params.n)
                        if k not in done
                    ]
                    finished = True
                    yield RequestOutput(request_id, len(prompt_token_ids), 0, outs, True, "boom")
                    return
                outs = []
                for k in range(params.n):
                    if k in done:
                        continue
                    full = self._text(k, params.n)
                    ch = full[step % len(full)] if self.endless else full[step]
                    texts[k] += ch
                    delta, reason = ch, None
                    for s in params.stop:
                        if s in texts[k]:
                            cut = texts[k].index(s)
                            delta = delta[: max(0, len(delta) - (len(texts[k]) - cut))]
                            texts[k] = texts[k][:cut]
                            reason = "stop"
                    if reason is None and not self.endless and len(texts[k]) == len(full):
                        reason = "stop"
                    if reason is None and step + 1 >= cap:
                        reason = "length"
                    lp = None
                    if params.logprobs is not None:
                        b = list(ch.encode())
                        top = [(ord(ch), ch, -0.25, b)] * params.logprobs
                        lp = [TokenLogprob(ord(ch), ch, -0.25, b, top)]
                    if reason is not None:
                        done[k] = reason
                    outs.append(
                        CompletionOutput(k, delta, [ord(ch)], lp, texts[k], step + 1, reason)
                    )
                step += 1
                finished = len(done) == params.n
                yield RequestOutput(request_id, len(prompt_token_ids), 0, outs, finished)
        finally:
            self.running.discard(request_id)
            if not finished:
                self.aborted.append(request_id)


@dataclass
class Settled:
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    end_state: str
    finish_reasons: list[str]


@dataclass
class RecordingGatekeeper:
    """Accepts `keys` (any key when empty) and records admissions and settlements."""

    keys: list[str] = field(default_factory=list)
    refuse: GatewayError | None = None
    admitted: list[dict[str, object]] = field(default_factory=list)
    recorded: dict[str, int] = field(default_factory=dict)
    settled: list[Settled] = field(default_factory=list)

    async def authenticate(self, authorization: str | None) -> Principal:
        if self.keys:
            scheme, _, token = (authorization or "").partition(" ")
            if scheme != "Bearer" or token not in self.keys:
                raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
        return Principal(key_id="k", account_id="a")

    async def admit(
        self,
        principal: Principal,
        *,
        request_id: str,
        model: str,
        prompt_tokens: int,
        max_completion_tokens: int,
    ) -> Admission:
        if self.refuse is not None:
            raise self.refuse
        self.admitted.append(
            {
                "request_id": request_id,
                "model": model,
                "prompt_tokens": prompt_tokens,
                "max_completion_tokens": max_completion_tokens,
            }
        )
        return Admission(request_id, principal, model, headers={"x-ratelimit-limit-requests": "60"})

    async def record_tokens(self, admission: Admission, completion_tokens: int) -> None:
        rid = admission.request_id
        self.recorded[rid] = self.recorded.get(rid, 0) + completion_tokens

    async def settle(
        self,
        admission: Admission,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        end_state: str,
        finish_reasons: list[str],
    ) -> None:
        self.settled.append(
            Settled(
                admission.request_id, prompt_tokens, completion_tokens, end_state, finish_reasons
            )
        )

    def wait_settled(self, count: int, timeout: float = 3.0) -> list[Settled]:
        deadline = time.monotonic() + timeout
        while len(self.settled) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.settled


@contextmanager
def running_server(
    engines: Mapping[str, FakeEngine],
    gatekeeper: RecordingGatekeeper,
    config: ServerConfig | None = None,
) -> Iterator[str]:
    """Serve the app on a free loopback port in a thread; yields the base URL."""
    app = create_app(config or ServerConfig(), engines, gatekeeper)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def parse_sse(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing: every event is one
    `data: ...` line followed by a blank line."""
    assert body.endswith("\n\n"), body[-80:]
    events = body[:-2].split("\n\n")
    payloads = []
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
        payloads.append(event[len("data: ") :])
    return payloads


KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "hi"}]
REPLY = "Hello, world! 你好"  # what FakeEngine answers


def post(url: str, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=kw.pop("headers", AUTH), **kw)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": USER, **fields}


def error(r: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI error of a response, checking its status and exact shape."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])
