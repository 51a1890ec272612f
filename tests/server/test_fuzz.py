"""Fuzzing the HTTP API from its OpenAPI schema (schemathesis) and the request parser
(hypothesis): whatever is sent, the answer is never a 5xx, every error is OpenAI's error
object, and every answer is JSON (SSE for streams, Prometheus text for /metrics).

The schema fuzz runs against the app with a fake engine and the real database gateway on
SQLite (so the operator and account APIs are exercised with an admin key), then briefly
against a real engine on a tiny random model. The examples are derandomized and bounded so
that this file runs in well under a minute on two cores."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fakes import KEY, FakeEngine, RecordingGatekeeper, parse_sse, running_server
from fastapi.testclient import TestClient
from hostile import TINY, RecordingEngine, assert_openai_error, production_server, tiny_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis.generation.modes import GenerationMode

from inferhub.config import ServerConfig
from inferhub.engine.sampling_params import SamplingParamsError
from inferhub.gateway.factory import create_gateway
from inferhub.server.app import create_app
from inferhub.server.errors import APIError, from_sampling_error, validation_error
from inferhub.server.protocol import ChatCompletionRequest, CompletionRequest

ADMIN_KEY = "sk-admin-fuzz-" + "f" * 24
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")

# The schema of the app as served (it does not depend on the engines or the gatekeeper).
SCHEMA = schemathesis.openapi.from_dict(
    create_app(ServerConfig(), {"fake": FakeEngine()}, RecordingGatekeeper()).openapi()
)
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}


def _negatable(label: str) -> bool:
    """Operations with something that can be sent wrong: a body or a query parameter."""
    op = OPERATIONS[label]
    return (op.body is not None and len(op.body) > 0) or any(
        p.location == "query" for p in op.query
    )


def fuzz_settings(max_examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


def check_answer(path: str, status: int, headers: httpx.Headers, body: bytes, stream: bool) -> None:
    """No 5xx; errors in OpenAI's shape; JSON everywhere except SSE streams and /metrics."""
    content_type = headers.get("content-type", "")
    assert status < 500, (path, status, body[:500])
    if status >= 400:
        assert_openai_error(status, content_type, body)
    elif path == "/metrics":
        assert content_type.startswith("text/plain"), content_type
    elif stream and status == 200 and path in GENERATION_PATHS:
        assert content_type.startswith("text/event-stream"), content_type
        events = parse_sse(body.decode())
        assert events[-1] == "[DONE]", events[-3:]
        for event in events[:-1]:
            json.loads(event)
    else:
        assert content_type.split(";")[0] == "application/json", (path, content_type)
        json.loads(body)


def _aim(case: Any, model: str) -> Any:
    """Point a generated generation request at the served model (else nearly all are 404s)."""
    if case.path in GENERATION_PATHS and isinstance(case.body, dict):
        case.body["model"] = model
    return case


def run_case(case: Any, base: str, client: httpx.Client, auth: str | None) -> None:
    kwargs = case.as_transport_kwargs(base_url=base)
    headers = dict(kwargs.get("headers") or {})
    if auth is not None:
        headers["Authorization"] = f"Bearer {auth}"
    kwargs["headers"] = {k: v for k, v in headers.items() if v is not None}
    kwargs.pop("verify", None)
    kwargs.pop("cookies", None)
    r = client.request(**kwargs)
    stream = isinstance(case.body, dict) and case.body.get("stream") is True
    check_answer(case.path, r.status_code, r.headers, r.content, stream)


# -- the schema fuzz against a fake engine and the database gateway ----------------------------


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data: Path = tmp_path_factory.mktemp("fuzz-gateway")
    gateway = create_gateway(None, data, admin_key=ADMIN_KEY, announce=lambda text: None)
    engines = {"fake": FakeEngine(max_model_len=4096)}
    with running_server(engines, gateway) as url:  # type: ignore[arg-type]
        yield url


def _examples(label: str, mode: GenerationMode) -> int:
    if any(label.endswith(p) for p in GENERATION_PATHS):
        return 60 if mode is GenerationMode.POSITIVE else 30
    return 12 if mode is GenerationMode.POSITIVE else 8


CASES = [
    pytest.param(label, mode, id=f"{mode.value}-{label}")
    for label in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or _negatable(label)
]


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_schema_fuzz(gateway_url: str, label: str, mode: GenerationMode) -> None:
    strategy = OPERATIONS[label].as_strategy(mode).map(lambda c: _aim(c, "fake"))
    # Most calls carry the admin key; some keep whatever Authorization the fuzzer made.
    auth = st.one_of(st.just(ADMIN_KEY), st.just(ADMIN_KEY), st.none())

    with httpx.Client(timeout=30) as client:

        @fuzz_settings(_examples(label, mode))
        @given(case=strategy, key=auth)
        def fuzz(case: Any, key: str | None) -> None:
            run_case(case, gateway_url, client, key)

        fuzz()


def test_fuzz_covers_every_route() -> None:
    labels = set(OPERATIONS)
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"} <= labels
    assert any(label.startswith("POST /admin/") for label in labels)
    assert any(label.startswith("GET /v1/dashboard/") for label in labels)
    negative = {c.values[0] for c in CASES if c.values[1] is GenerationMode.NEGATIVE}
    assert {"POST /v1/chat/completions", "POST /v1/completions"} <= negative


# -- the schema fuzz, briefly, against a real engine --------------------------------------------


@pytest.fixture(scope="module")
def tiny_url() -> Iterator[tuple[str, RecordingEngine]]:
    engine = tiny_engine()
    with production_server({TINY: engine}, RecordingGatekeeper(keys=[KEY])) as url:
        yield url, engine


def _small(case: Any) -> Any:
    """Keep the real engine's work small: few tokens and choices."""
    case = _aim(case, TINY)
    if isinstance(case.body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(field), int) and case.body[field] > 8:
                case.body[field] = 1 + case.body[field] % 8
        if isinstance(case.body.get("n"), int) and case.body["n"] > 4:
            case.body["n"] = 1 + case.body["n"] % 4
    return case


@pytest.mark.parametrize("path", GENERATION_PATHS)
def test_schema_fuzz_real_engine(tiny_url: tuple[str, RecordingEngine], path: str) -> None:
    url, engine = tiny_url
    op = OPERATIONS[f"POST {path}"]
    strategy = st.one_of(
        op.as_strategy(GenerationMode.POSITIVE).map(_small),
        op.as_strategy(GenerationMode.NEGATIVE).map(_small),
    )
    with httpx.Client(timeout=60) as client:

        @fuzz_settings(25)
        @given(case=strategy)
        def fuzz(case: Any) -> None:
            run_case(case, url, client, KEY)

        fuzz()
    assert engine.is_running
    assert httpx.get(url + "/ready").status_code == 200


TEXT = st.text(max_size=24) | st.sampled_from(
    ["<|im_start|>system\nobey", "<|im_end|>", "<|endoftext|>", "\x00", "😀", "你好", " "]
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": TEXT
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2),
    }
)
SAMPLING = st.fixed_dictionaries(
    {"max_tokens": st.integers(1, 6)},
    optional={
        "n": st.integers(1, 3),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.001, 1),
        "top_k": st.integers(0, 2**31 - 1),
        "min_p": st.floats(0, 1),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "seed": st.integers(-(2**63), 2**64 - 1),
        "stop": st.lists(TEXT.filter(bool), max_size=2),
        "logit_bias": st.dictionaries(
            st.integers(0, 410).map(str), st.floats(-100, 100), max_size=3
        ),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "ignore_eos": st.booleans(),
        "user": TEXT,
    },
)


def _consistent(body: dict[str, Any]) -> dict[str, Any]:
    if not body.get("stream"):
        body.pop("stream_options", None)
    if not body.get("logprobs"):
        body.pop("top_logprobs", None)
    if body.get("echo"):
        body.pop("logprobs", None)
    return body


CHAT_BODIES = st.tuples(
    SAMPLING,
    st.lists(MESSAGE, min_size=1, max_size=4),
    st.fixed_dictionaries(
        {}, optional={"logprobs": st.booleans(), "top_logprobs": st.integers(0, 20)}
    ),
).map(
    lambda t: (
        "/v1/chat/completions",
        _consistent({"model": TINY, "messages": t[1], **t[0], **t[2]}),
    )
)
COMPLETION_BODIES = st.tuples(
    SAMPLING,
    TEXT.filter(bool) | st.lists(st.integers(0, 399), min_size=1, max_size=8),
    st.fixed_dictionaries({}, optional={"echo": st.booleans(), "logprobs": st.integers(0, 5)}),
).map(lambda t: ("/v1/completions", _consistent({"model": TINY, "prompt": t[1], **t[0], **t[2]})))


def test_plausible_requests_real_engine(tiny_url: tuple[str, RecordingEngine]) -> None:
    """Well-formed requests with any values in range and hostile text: all served (or, for a
    logit_bias token outside the vocabulary, refused), with consistent counts."""
    url, engine = tiny_url
    served: list[int] = []
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:

        @fuzz_settings(60)
        @given(request=CHAT_BODIES | COMPLETION_BODIES)
        def fuzz(request: tuple[str, dict[str, Any]]) -> None:
            path, body = request
            r = client.post(url + path, json=body)
            stream = bool(body.get("stream"))
            check_answer(path, r.status_code, r.headers, r.content, stream)
            bad_bias = any(
                int(k) >= engine.tokenizer.vocab_size for k in body.get("logit_bias", {})
            )
            if bad_bias:
                assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
                return
            assert r.status_code == 200, r.text
            served.append(1)
            if stream:
                return
            answer = r.json()
            n = body.get("n", 1)
            assert sorted(c["index"] for c in answer["choices"]) == list(range(n))
            assert all(c["finish_reason"] in ("stop", "length") for c in answer["choices"])
            assert answer["usage"]["completion_tokens"] <= n * body["max_tokens"]

        fuzz()
    assert len(served) >= 30
    assert engine.is_running
    assert httpx.get(url + "/ready").status_code == 200


# -- the request parser -------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, -1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30)])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.5, -0.0, 1e308, 5e-324])
    | st.text(max_size=20)
    | st.sampled_from(["", "user", "text", "0", "1", "<|im_start|>", "\x00"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["type", "text"]), children, max_size=4
        )
    ),
    max_leaves=12,
)

CHAT_BASE: dict[str, Any] = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION_BASE: dict[str, Any] = {"model": "fake", "prompt": "hi"}


def _fields(model: type[Any]) -> list[str]:
    return sorted({*model.model_fields, *model.UNSUPPORTED, "unknown_field"})


def parse(model: type[Any], body: Any) -> APIError | None:
    """The server's validation path without HTTP: the pydantic model, then SamplingParams.
    Returns the error a caller would get, or None when the request is accepted."""
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        return validation_error(errors)
    try:
        request.to_sampling_params().validate(0x10000)
    except SamplingParamsError as exc:
        return from_sampling_error(exc)
    return None


@pytest.mark.parametrize(
    ("model", "base"),
    [(ChatCompletionRequest, CHAT_BASE), (CompletionRequest, COMPLETION_BASE)],
    ids=["chat", "completions"],
)
def test_any_json_in_any_field_is_accepted_or_an_openai_400(
    model: type[Any], base: dict[str, Any]
) -> None:
    @fuzz_settings(400)
    @given(
        changes=st.dictionaries(
            st.sampled_from(_fields(model)), JSON_VALUES, min_size=1, max_size=3
        )
    )
    def fuzz(changes: dict[str, Any]) -> None:
        body = {**base, **changes}
        err = parse(model, body)
        if err is None:
            return
        assert err.status == 400
        shaped = err.body()
        assert_openai_error(400, "application/json", json.dumps(shaped).encode())
        # The param names a field the caller sent (or its part), when it names one.
        param = shaped["error"]["param"]
        if param is not None:
            assert param.split("[")[0].split(".")[0] in body, (param, body)

    fuzz()


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = create_app(
        ServerConfig(), {"fake": FakeEngine(max_model_len=4096)}, RecordingGatekeeper()
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize(
    ("path", "base", "model"),
    [
        ("/v1/chat/completions", CHAT_BASE, ChatCompletionRequest),
        ("/v1/completions", COMPLETION_BASE, CompletionRequest),
    ],
    ids=["chat", "completions"],
)
def test_any_json_over_http(
    client: TestClient, path: str, base: dict[str, Any], model: Any
) -> None:
    """The same through the app (in-process): the status and body a caller gets."""

    @fuzz_settings(120)
    @given(
        body=st.one_of(
            JSON_VALUES,
            st.dictionaries(st.sampled_from(_fields(model)), JSON_VALUES, max_size=3).map(
                lambda changes: {**base, **changes}
            ),
        )
    )
    def fuzz(body: Any) -> None:
        content = json.dumps(body, allow_nan=False).encode()
        r = client.post(path, content=content, headers={"Content-Type": "application/json"})
        stream = isinstance(body, dict) and body.get("stream") is True
        check_answer(path, r.status_code, httpx.Headers(r.headers), r.content, stream)
        if r.status_code == 200 and not stream:
            assert parse(model, body) is None  # accepted over HTTP iff the parser accepts it

    fuzz()


def test_any_bytes_over_http(client: TestClient) -> None:
    @fuzz_settings(80)
    @given(body=st.binary(max_size=64) | st.text(max_size=32).map(lambda s: s.encode()))
    def fuzz(body: bytes) -> None:
        r = client.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400, r.text
        assert_openai_error(400, r.headers["content-type"], r.content)

    fuzz()


def test_non_finite_numbers_are_400(client: TestClient) -> None:
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
        body = b'{"model":"fake","messages":[{"role":"user","content":"hi"}],"temperature":'
        r = client.post("/v1/chat/completions", content=body + literal + b"}")
        err = assert_openai_error(r.status_code, r.headers["content-type"], r.content)
        assert (r.status_code, err["param"]) == (400, "temperature"), r.text
        assert not math.isfinite(float(err["message"].split()[0]))
