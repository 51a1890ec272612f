"""SIGTERM and SIGINT drain the real server: running streams finish, then it exits 0."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
import pytest
from fakes import parse_sse
from live import KEY, MODEL, start_live_server

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_running_streams_and_exits_0(tmp_path: Path, sig: signal.Signals) -> None:
    server = start_live_server(tmp_path / "server.log")
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to fifty."}],
                "max_tokens": 100, "ignore_eos": True, "stream": True}  # fmt: skip
        started = threading.Event()
        result: dict[str, str] = {}

        def stream() -> None:
            with httpx.stream(
                "POST", server.v1 + "/chat/completions", json=body,
                headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
            ) as r:  # fmt: skip
                chunks = []
                for chunk in r.iter_text():
                    chunks.append(chunk)
                    started.set()
                result["body"] = "".join(chunks)

        thread = threading.Thread(target=stream)
        thread.start()
        assert started.wait(30)
        server.process.send_signal(sig)
        thread.join(60)
        payloads = parse_sse(result["body"])
        assert payloads[-1] == "[DONE]"
        assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "length"
    finally:
        code = server.stop(sig)
    assert code == 0
    assert "end=completed" in server.log()
