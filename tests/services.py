"""Real services for tests, started once per session on loopback: a throwaway PostgreSQL 15
cluster and a throwaway Redis. Missing binaries skip with the reason, except in CI."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PG_BIN = Path("/usr/lib/postgresql/15/bin")


def absent(what: str) -> None:
    """Skip with the reason, except in CI, where a missing server is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must provide it)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL 15 cluster on a free loopback port; yields its base URL."""
    if not (PG_BIN / "postgres").exists():
        absent(f"PostgreSQL binaries not found in {PG_BIN} (apt-get install postgresql-15)")
    root = Path(tempfile.mkdtemp(prefix="inferhub-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    initdb = [str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
    subprocess.run(
        [*as_user, *initdb, "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    settings = ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
    settings += [
        "listen_addresses=127.0.0.1",
        "max_connections=300",
        f"unix_socket_directories={root}",
    ]
    args = [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port)]
    for setting in settings:
        args += ["-c", setting]
    log = open(root / "postgres.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*as_user, *args], stdout=log, stderr=subprocess.STDOUT)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(url).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((root / "postgres.log").read_text()) from None
                time.sleep(0.1)
        yield url
    finally:
        pid_file = data / "postmaster.pid"
        if pid_file.exists():  # fast shutdown of the postmaster itself; runuser then exits
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, no persistence; yields its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        absent("redis-server is not installed (apt-get install redis-server)")
        raise AssertionError  # unreachable: _absent skips or fails
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
