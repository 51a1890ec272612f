"""Every kind of bad request over HTTP, against a fake engine: status and OpenAI error body."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from fakes import (
    AUTH,
    KEY,
    FakeEngine,
    RecordingGatekeeper,
    chat,
    error,
    post,
    running_server,
)

from inferhub.config import ServerConfig
from inferhub.gateway.interface import GatewayError

# -- errors over HTTP ----------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_bad_key_is_401(url: str, headers: dict[str, str]) -> None:
    for r in (
        post(url, "/v1/chat/completions", chat(), headers=headers),
        httpx.get(url + "/v1/models", headers=headers),
    ):
        err = error(r, 401)
        assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_api_key")


def test_unknown_model_is_404(url: str) -> None:
    err = error(post(url, "/v1/chat/completions", chat(model="gpt-4")), 404)
    assert (err["code"], err["param"]) == ("model_not_found", "model")
    assert "gpt-4" in err["message"]
    assert (
        error(httpx.get(url + "/v1/models/gpt-4", headers=AUTH), 404)["code"] == "model_not_found"
    )


def test_validation_is_400_not_422(url: str) -> None:
    err = error(post(url, "/v1/chat/completions", chat(temperature=3)), 400)
    assert (
        err["param"] == "temperature"
        and err["message"] == "3 is greater than the maximum of 2 - 'temperature'"
    )


def test_unknown_token_in_logit_bias(url: str) -> None:
    err = error(post(url, "/v1/chat/completions", chat(logit_bias={"65536": 5})), 400)
    assert err["param"] == "logit_bias" and "65536" in err["message"]


def test_context_length_exceeded(url: str, engine: FakeEngine) -> None:
    err = error(post(url, "/v1/chat/completions", chat(max_tokens=250)), 400)
    assert (err["code"], err["param"]) == ("context_length_exceeded", "messages")
    assert "256" in err["message"] and "269" in err["message"] and "250" in err["message"]
    err = error(post(url, "/v1/completions", {"model": "fake", "prompt": "x" * 300}), 400)
    assert (err["code"], err["param"]) == ("context_length_exceeded", "prompt")
    assert engine.requests == []


def test_malformed_bodies(url: str) -> None:
    err = error(
        httpx.post(
            url + "/v1/chat/completions",
            content=b"{nope",
            headers={**AUTH, "Content-Type": "application/json"},
        ),
        400,
    )
    assert "parse the JSON body" in err["message"]
    err = error(
        httpx.post(
            url + "/v1/chat/completions",
            content=b"[1]",
            headers={**AUTH, "Content-Type": "application/json"},
        ),
        400,
    )
    assert "must be a JSON object" in err["message"]
    err = error(httpx.post(url + "/v1/chat/completions", data={"model": "fake"}, headers=AUTH), 400)
    assert "application/json" in err["message"]
    r = httpx.post(url + "/v1/chat/completions", content=json.dumps(chat()).encode(), headers=AUTH)
    assert r.status_code == 200  # no Content-Type at all: read as JSON


def test_body_too_large_is_413(engine: FakeEngine, gatekeeper: RecordingGatekeeper) -> None:
    with running_server({"fake": engine}, gatekeeper, ServerConfig(max_body_bytes=1000)) as url:
        big = chat(messages=[{"role": "user", "content": "x" * 2000}])
        err = error(post(url, "/v1/chat/completions", big), 413)
        assert "1000 bytes" in err["message"]

        def chunked() -> Iterator[bytes]:
            yield json.dumps(big).encode()

        err = error(
            httpx.post(
                url + "/v1/chat/completions",
                content=chunked(),
                headers={**AUTH, "Content-Type": "application/json"},
            ),
            413,
        )
        assert "1000 bytes" in err["message"]


def test_unknown_path_and_method(url: str) -> None:
    assert (
        error(httpx.get(url + "/v1/nothing", headers=AUTH), 404)["message"]
        == "Invalid URL (GET /v1/nothing)"
    )
    error(httpx.get(url + "/v1/chat/completions", headers=AUTH), 405)
    # A key pasted into a path is never quoted back whole.
    secret = "sk-" + "a1B2c3D4" * 6
    message = error(httpx.get(url + "/v1/" + secret, headers=AUTH), 404)["message"]
    assert secret not in message and message.startswith("Invalid URL (GET /v1/sk-")


def test_gateway_refusal_passes_through(
    url: str, gatekeeper: RecordingGatekeeper, engine: FakeEngine
) -> None:
    gatekeeper.refuse = GatewayError(
        429,
        "Rate limit reached.",
        type="requests",
        code="rate_limit_exceeded",
        headers={"Retry-After": "7"},
    )
    r = post(url, "/v1/chat/completions", chat(stream=True))
    err = error(r, 429)
    assert (err["code"], r.headers["retry-after"]) == ("rate_limit_exceeded", "7")
    assert engine.requests == [] and gatekeeper.settled == []
