"""SIGTERM and SIGINT drain the real server: running streams finish, then it exits 0; Ctrl-C
in a terminal (SIGINT to the whole process group, engine processes included) does the same.
An engine process that dies takes its model out of /ready and fails its requests with 503."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from fakes import parse_sse
from live import KEY, MODEL, start_live_server

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("sig", "to_group"), [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)]
)
def test_signal_drains_running_streams_and_exits_0(
    tmp_path: Path, sig: signal.Signals, to_group: bool
) -> None:
    server = start_live_server(tmp_path / "server.log", new_session=to_group)
    assert len(server.engine_pids()) == 1
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
        if to_group:
            os.killpg(server.process.pid, sig)
        else:
            server.process.send_signal(sig)
        thread.join(60)
        payloads = parse_sse(result["body"])
        assert payloads[-1] == "[DONE]"
        assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "length"
    finally:
        code = server.stop(sig)
    assert code == 0
    assert "end=completed" in server.log()


def test_a_dead_engine_process_takes_its_model_out_of_ready(tmp_path: Path) -> None:
    server = start_live_server(tmp_path / "server.log")
    try:
        assert httpx.get(server.base + "/ready").status_code == 200
        (engine,) = server.engine_pids()
        os.kill(engine, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(server.base + "/ready").status_code == 200:
            assert time.monotonic() < deadline, "/ready still says ready"
            time.sleep(0.05)
        r = httpx.post(
            server.v1 + "/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        )
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "server_error"
        assert httpx.get(server.base + "/health").status_code == 200  # the process itself lives
    finally:
        server.stop()
