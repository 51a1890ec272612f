"""The real server as a subprocess (`python -m inferhub.cli serve --port 0`) on a free loopback
port with the embedded default model, and what tests read from it (gauges, its log)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-e2e-test-key"
SERVE_ARGS = ["--kv-cache-memory", "256M", "--max-model-len", "2048"]


@dataclass
class LiveServer:
    process: subprocess.Popen[str]
    base: str  # http://127.0.0.1:PORT
    log_path: Path
    stdout_lines: list[str] = field(default_factory=list)

    @property
    def v1(self) -> str:
        return self.base + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def gauges(self, model: str = MODEL) -> dict[str, float]:
        """The per-model engine gauges and counters from /metrics, e.g.
        {"num_requests_running": 0.0, "engine_generation_tokens_total": 12.0}."""
        text = httpx.get(self.base + "/metrics").text
        out = {}
        for m in re.finditer(rf'^inferhub_(\w+)\{{model="{model}"\}} (\S+)$', text, re.M):
            out[m.group(1)] = float(m.group(2))
        return out

    def wait_idle(self, timeout: float = 1.0, model: str = MODEL) -> dict[str, float]:
        """Gauges once no sequence runs or waits and no KV block is used (or at the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            g = self.gauges(model)
            idle = g["num_requests_running"] == g["num_requests_waiting"] == 0
            if (idle and g["kv_cache_used_blocks"] == 0) or time.monotonic() > deadline:
                return g
            time.sleep(0.02)

    def engine_pids(self) -> list[int]:
        """The server's engine processes (its children other than multiprocessing's helper)."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [
            int(child)
            for child in children
            if "resource_tracker" not in Path(f"/proc/{child}/cmdline").read_text()
        ]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            assert self.process.stdout is not None
            self.process.stdout.close()


def _reader(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def start_live_server(
    log_path: Path,
    *extra: str,
    api_key: str | None = KEY,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    new_session: bool = False,
) -> LiveServer:
    """Start `inferhub serve` with `extra` arguments; with `api_key` None it runs the database
    gateway (pass `--data-dir`). Its stdout lines up to the URL line are in `stdout_lines`."""
    cmd = [sys.executable, "-m", "inferhub.cli", "serve", "--port", "0"]
    if api_key is not None:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*cmd, *SERVE_ARGS, *extra],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
            start_new_session=new_session,  # its own process group, as in a terminal
        )
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_reader, args=(process.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if m := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line):
            return LiveServer(process, m.group(1), log_path, seen)
    process.kill()
    process.wait()
    process.stdout.close()
    raise RuntimeError(f"the server did not start: {seen}\n{log_path.read_text()[-3000:]}")
