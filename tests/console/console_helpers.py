"""Helpers of the console tests: the real server as a subprocess, its seed accounts, and an
HTTP client logged in through the console's session API."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from services import free_port  # noqa: F401  (re-exported for the tests)

ADMIN_KEY = "sk-console-test-admin-key-0123456789"
MODEL = "SmolLM2-135M-Instruct"
SERVE_ARGS = ["--kv-cache-memory", "256M", "--max-model-len", "2048"]
# Prices of the test model, in micro-units per million tokens.
INPUT_PRICE = 1_500_000
OUTPUT_PRICE = 2_000_000
LOGIN_HEADERS = {"X-Requested-With": "inferhub-console"}


def expected_cost(prompt_tokens: int, completion_tokens: int) -> int:
    """What the gateway bills: ceil((p * input + c * output) / 1e6) micro-units."""
    return -(-(prompt_tokens * INPUT_PRICE + completion_tokens * OUTPUT_PRICE) // 1_000_000)


@dataclass
class Account:
    id: str
    name: str
    email: str
    password: str


@dataclass
class Server:
    process: subprocess.Popen[str]
    base: str
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()


@dataclass
class Seed:
    server: Server
    operator: Account
    alice: Account
    bob: Account
    admin_headers: dict[str, str] = field(
        default_factory=lambda: {"Authorization": f"Bearer {ADMIN_KEY}"}
    )

    @property
    def base(self) -> str:
        return self.server.base

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers=self.admin_headers, timeout=30)


def _reader(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def start_console_server(data_dir: Path, log_path: Path, timeout: float = 180) -> Server:
    """`inferhub serve --port 0` with the database gateway in `data_dir` and a known admin key."""
    cmd = [
        sys.executable,
        "-m",
        "inferhub.cli",
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "INFERHUB_ADMIN_KEY": ADMIN_KEY}
    for name in ("INFERHUB_API_KEYS", "INFERHUB_DATABASE_URL", "INFERHUB_REDIS_URL"):
        env.pop(name, None)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*cmd, *SERVE_ARGS], stdout=subprocess.PIPE, stderr=log, text=True, env=env
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
            if process.poll() is not None:
                break
            continue
        if line is None:
            break
        seen.append(line)
        if m := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line):
            return Server(process, m.group(1), log_path)
    process.kill()
    process.wait()
    process.stdout.close()
    raise RuntimeError(f"the server did not start: {seen}\n{log_path.read_text()[-3000:]}")


def seed_accounts(server: Server) -> Seed:
    """Through the operator API: the operator's password, users alice and bob with credit,
    and the test model's price."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=server.base, headers=headers, timeout=30) as c:
        operator_password = "operator-password-1"
        r = c.put("/admin/accounts/admin/password", json={"password": operator_password})
        assert r.status_code == 200, r.text
        operator = Account(r.json()["id"], "admin", "admin", operator_password)
        users = []
        for name in ("alice", "bob"):
            password = f"{name}-password-1"
            r = c.post(
                "/admin/accounts",
                json={
                    "name": name,
                    "email": f"{name}@example.test",
                    "password": password,
                    "credit_micros": 5_000_000,
                },
            )
            assert r.status_code == 201, r.text
            users.append(Account(r.json()["id"], name, f"{name}@example.test", password))
        r = c.put(
            f"/admin/prices/{MODEL}",
            json={"input_micros_per_mtok": INPUT_PRICE, "output_micros_per_mtok": OUTPUT_PRICE},
        )
        assert r.status_code == 200, r.text
    return Seed(server, operator, users[0], users[1])


@contextmanager
def session_client(base: str, login: str, password: str) -> Iterator[httpx.Client]:
    """An httpx client logged in to the console: it holds the session cookie and sends the
    CSRF token on every request, as the console's pages do."""
    with httpx.Client(base_url=base, timeout=30) as client:
        r = client.post(
            "/console/api/login",
            json={"login": login, "password": password},
            headers=LOGIN_HEADERS,
        )
        assert r.status_code == 200, r.text
        client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
        yield client
