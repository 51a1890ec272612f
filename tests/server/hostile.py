"""Helpers of the hostile-input and fuzz tests: a tiny random Qwen2 built once per process and
served by a real engine, the production uvicorn configuration (with its header deadline) on
loopback, an engine wrapper that records the token ids it is given, and the OpenAI checks."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import Any

from inferhub.config import EngineConfig, ServerConfig
from inferhub.engine.async_engine import AsyncEngine
from inferhub.engine.outputs import RequestOutput
from inferhub.engine.sampling_params import SamplingParams
from inferhub.gateway.interface import Gatekeeper
from inferhub.server.app import create_app
from inferhub.server.run import HEADER_TIMEOUT_S, Server, server_config
from inferhub.server.state import ServingEngine

TINY = "tiny"


@functools.cache
def tiny_model() -> Path:
    """A tiny random Qwen2 with its ChatML tokenizer, built once per test process."""
    from tiny_models import make_tiny_hf

    root = Path(tempfile.mkdtemp(prefix="inferhub-hostile-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return make_tiny_hf(root / "qwen2", "qwen2")


class RecordingEngine(AsyncEngine):
    """The real engine, keeping the prompt token ids of every request it is given."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.prompts: list[list[int]] = []

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        self.prompts.append(list(prompt_token_ids))
        async with aclosing(super().generate(request_id, prompt_token_ids, params)) as stream:
            async for out in stream:
                yield out


def tiny_engine() -> RecordingEngine:
    return RecordingEngine(
        EngineConfig(
            model=str(tiny_model()),
            name=TINY,
            dtype="float32",
            device="cpu",
            block_size=4,
            kv_cache_memory=4 << 20,
            max_num_seqs=16,
            max_num_batched_tokens=512,
            show_progress=False,
        )
    )


@contextmanager
def production_server(
    engines: Mapping[str, ServingEngine],
    gatekeeper: Gatekeeper,
    config: ServerConfig | None = None,
    *,
    header_timeout: float = HEADER_TIMEOUT_S,
) -> Iterator[str]:
    """Serve the app with `run_server`'s uvicorn configuration (its Server class and protocol)
    on a free loopback port in a thread; yields the base URL."""
    app = create_app(config or ServerConfig(), engines, gatekeeper)
    cfg = server_config(
        app, host="127.0.0.1", port=0, drain_timeout=5, debug=False, header_timeout=header_timeout
    )
    server = Server(cfg, app.state.server, announce=lambda url: None)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def assert_openai_error(status: int, content_type: str, body: bytes) -> dict[str, Any]:
    """A 4xx/5xx answer's body is exactly OpenAI's error object, sent as JSON."""
    assert content_type.split(";")[0].strip() == "application/json", (status, content_type)
    parsed = json.loads(body)
    assert isinstance(parsed, dict) and set(parsed) == {"error"}, parsed
    err = parsed["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    return err
