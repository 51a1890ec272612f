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


class PostgresCluster:
    """A throwaway PostgreSQL 15 cluster on a free loopback port that can be stopped and
    started again (fault tests stop it under load)."""

    def __init__(self) -> None:
        if not (PG_BIN / "postgres").exists():
            absent(f"PostgreSQL binaries not found in {PG_BIN} (apt-get install postgresql-15)")
        self.root = Path(tempfile.mkdtemp(prefix="inferhub-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data = self.root / "data"
        initdb = [str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
        subprocess.run(
            [*self.as_user, *initdb, "-E", "UTF8", "--no-sync"], check=True, capture_output=True
        )
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        settings = ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
        settings += [
            "listen_addresses=127.0.0.1",
            "max_connections=300",
            f"unix_socket_directories={self.root}",
        ]
        args = [str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        for setting in settings:
            args += ["-c", setting]
        with open(self.root / "postgres.log", "ab") as log:
            self.proc = subprocess.Popen([*self.as_user, *args], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((self.root / "postgres.log").read_text()) from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown: open connections are closed, the server is gone when this returns."""
        if self.proc is None:
            return
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():  # signal the postmaster itself; runuser then exits
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL 15 cluster shared by the session; yields its base URL."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster.url
    finally:
        cluster.remove()


class RedisInstance:
    """A throwaway redis-server on a free loopback port, no persistence, that can be stopped
    and started again on the same port (fault tests stop it)."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            absent("redis-server is not installed (apt-get install redis-server)")
            raise AssertionError  # unreachable: absent() skips or fails
        self.exe = exe
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A throwaway redis-server shared by the session; yields its URL."""
    instance = RedisInstance()
    try:
        instance.start()
        yield instance.url
    finally:
        instance.stop()


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    """A cluster of the test's own, to stop and start under load (fault tests)."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def own_redis() -> Iterator[RedisInstance]:
    """A redis-server of the test's own, to stop and start (fault tests)."""
    instance = RedisInstance()
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
