"""Faults of the services the gateway stands on, with real servers stopped under it:
PostgreSQL going away mid-run, Redis going away (fall back or fail closed), SQLite's disk
filling up. Requests are refused with 503 and Retry-After while a service is away, nothing
that was served goes unbilled, and service resumes by itself when it is back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.exceptions
from gateway_helpers import bearer, new_account, new_key, settings

from inferhub.gateway import accounts, usage
from inferhub.gateway.factory import create_gateway, open_database
from inferhub.gateway.failover import FailoverLimiter
from inferhub.gateway.gateway import DatabaseGateway
from inferhub.gateway.interface import Admission, GatewayError, Principal
from inferhub.gateway.records import KeyLimits, UsageRecord
from inferhub.gateway.redis_limiter import RedisLimiter
from services import PostgresCluster, RedisInstance, absent

pytestmark = pytest.mark.anyio

MICROS = 1_000_000
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


async def admit(gw: DatabaseGateway, p: Principal, rid: str) -> Admission:
    return await gw.admit(p, request_id=rid, model="m", prompt_tokens=10, max_completion_tokens=100)


async def settle(gw: DatabaseGateway, a: Admission, completion: int) -> None:
    await gw.settle(
        a, prompt_tokens=10, completion_tokens=completion, end_state="completed",
        finish_reasons=["stop"],
    )  # fmt: skip


async def closed_row(gw: DatabaseGateway, request_id: str, timeout: float = 20) -> UsageRecord:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(GatewayError):
            row = await gw.call(usage.get_usage, gw.db, request_id)
            if row is not None and row.end_state is not None:
                return row
        assert time.monotonic() < deadline, f"{request_id} was never settled"
        await asyncio.sleep(0.1)


def assert_unavailable(error: GatewayError, code: str) -> None:
    assert (error.status, error.type, error.code) == (503, "server_error", code)
    assert int(error.headers["retry-after"]) >= 1


# -- PostgreSQL ------------------------------------------------------------------------------------


async def test_postgresql_down_mid_run_refuses_with_503_and_bills_what_was_served(
    own_postgres: PostgresCluster, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gw = create_gateway(
        own_postgres.url, data_dir, settings=settings(settle_wait_s=0.2), announce=lambda _: None
    )
    await gw.start()
    try:
        accounts.set_price(gw.db, "m", 1 * MICROS, 2 * MICROS)  # per million tokens
        account = new_account(gw, credit=MICROS)
        secret = new_key(gw, account)
        p = await gw.authenticate(bearer(secret))
        running = await admit(gw, p, "running")
        await gw.record_tokens(running, 30)

        own_postgres.stop()  # mid-run: one request is being served
        with caplog.at_level(logging.WARNING, logger="inferhub.gateway.gateway"):
            for _ in range(3):
                with pytest.raises(GatewayError) as info:
                    await gw.authenticate(bearer(secret))
                assert_unavailable(info.value, "database_unavailable")
            with pytest.raises(GatewayError) as info:
                await admit(gw, p, "refused")  # even with the principal known: no reservation
            assert_unavailable(info.value, "database_unavailable")

            # The running request ends; its response does not wait for the database ...
            started = time.monotonic()
            await settle(gw, running, 40)
            assert time.monotonic() - started < 2.0
            await asyncio.sleep(1.0)  # ... while its settlement is retried in the background

            own_postgres.start()
            row = await closed_row(gw, "running")
            (await gw.authenticate(bearer(secret)))  # service resumes by itself
            after = await admit(gw, p, "after")
            await settle(gw, after, 5)
        down = [r for r in caplog.records if "database is unavailable" in r.getMessage()]
        back = [r for r in caplog.records if "reachable again" in r.getMessage()]
        assert len(down) == 1 and len(back) == 1  # one line each way, not one per request

        assert (row.prompt_tokens, row.completion_tokens, row.end_state) == (10, 40, "completed")
        assert row.cost_micros == -(-(10 * MICROS + 40 * 2 * MICROS) // MICROS)
        assert await gw.call(usage.get_usage, gw.db, "refused") is None  # never admitted
        info_after = await gw.call(accounts.find_account, gw.db, account.id)
        assert info_after.reserved_micros == 0  # every reservation released
        audit = await gw.call(usage.audit, gw.db, account.id)
        assert audit.consistent, audit
    finally:
        await gw.close()


async def test_postgresql_down_at_shutdown_leaves_the_reservation_to_recovery(
    own_postgres: PostgresCluster, data_dir: Path
) -> None:
    gw = create_gateway(
        own_postgres.url, data_dir,
        settings=settings(settle_wait_s=0.1, close_timeout_s=1.0), announce=lambda _: None,
    )  # fmt: skip
    await gw.start()
    account = new_account(gw, credit=MICROS)
    p = await gw.authenticate(bearer(new_key(gw, account)))
    running = await admit(gw, p, "open-at-exit")
    await gw.record_tokens(running, 7)  # checkpointed (interval 0 in tests)
    await asyncio.sleep(0.3)
    own_postgres.stop()
    started = time.monotonic()
    await gw.close()  # bounded: it does not hang on the missing database
    assert time.monotonic() - started < 5

    own_postgres.start()
    again = create_gateway(own_postgres.url, data_dir, settings=settings(), announce=lambda _: None)
    recovered = await again.start()
    try:
        assert [r.request_id for r in recovered] == ["open-at-exit"]
        row = await closed_row(again, "open-at-exit")
        assert (row.completion_tokens, row.end_state) == (7, "crashed")
    finally:
        await again.close()


# -- Redis -----------------------------------------------------------------------------------------


async def test_redis_down_falls_back_to_memory_limits_with_one_log_line(
    own_redis: RedisInstance, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = FailoverLimiter(RedisLimiter(own_redis.url), "memory", unavailable=REDIS_DOWN)
    gw = DatabaseGateway(open_database(None, data_dir), limiter, settings())
    await gw.start()
    try:
        account = new_account(gw, credit=MICROS)
        p = await gw.authenticate(bearer(new_key(gw, account, limits=KeyLimits(rpm=2))))
        on_redis = await admit(gw, p, "on-redis")
        own_redis.stop()
        with caplog.at_level(logging.WARNING, logger="inferhub.gateway.failover"):
            # The memory fallback starts with full buckets: 2 requests, then 429.
            first = await admit(gw, p, "fallback-1")
            second = await admit(gw, p, "fallback-2")
            with pytest.raises(GatewayError) as info:
                await admit(gw, p, "fallback-3")
            assert (info.value.status, info.value.code) == (429, "rate_limit_exceeded")
            for a in (on_redis, first, second):  # releasing on the dead Redis does not fail
                await settle(gw, a, 3)
            assert limiter.is_down
            own_redis.start()  # an empty Redis: a full bucket again, shared again
            back = await admit(gw, p, "shared-again")
            await settle(gw, back, 3)
            assert not limiter.is_down
        lines = [r.getMessage() for r in caplog.records]
        assert sum("unreachable" in line for line in lines) == 1, lines
        assert "per replica in memory" in next(line for line in lines if "unreachable" in line)
        assert sum("reachable again" in line for line in lines) == 1, lines
        for rid in ("on-redis", "fallback-1", "fallback-2", "shared-again"):
            row = await closed_row(gw, rid)
            assert (row.completion_tokens, row.end_state) == (3, "completed")
    finally:
        await gw.close()


async def test_redis_down_fails_closed_when_configured(
    own_redis: RedisInstance, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = FailoverLimiter(RedisLimiter(own_redis.url), "closed", unavailable=REDIS_DOWN)
    gw = DatabaseGateway(open_database(None, data_dir), limiter, settings())
    await gw.start()
    try:
        account = new_account(gw, credit=MICROS)
        p = await gw.authenticate(bearer(new_key(gw, account, limits=KeyLimits(rpm=100))))
        own_redis.stop()
        with caplog.at_level(logging.WARNING, logger="inferhub.gateway.failover"):
            for rid in ("a", "b"):
                with pytest.raises(GatewayError) as info:
                    await admit(gw, p, rid)
                assert_unavailable(info.value, "rate_limiter_unavailable")
        lines = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(lines) == 1 and "refused with 503" in lines[0]
        info_now = await gw.call(accounts.find_account, gw.db, account.id)
        assert info_now.reserved_micros == 0  # nothing held for the refused requests
        own_redis.start()
        await settle(gw, await admit(gw, p, "after"), 1)
    finally:
        await gw.close()


# -- SQLite on a full disk -------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real file system that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        absent(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    assert shutil.disk_usage(disk).free < 8192
    return filler


async def test_sqlite_disk_full_refuses_cleanly_and_corrupts_nothing(small_disk: Path) -> None:
    data_dir = small_disk / "data"
    gw = create_gateway(
        None, data_dir, settings=settings(settle_wait_s=0.2), announce=lambda _: None
    )
    await gw.start()
    try:
        account = new_account(gw, credit=MICROS)
        secret = new_key(gw, account)
        p = await gw.authenticate(bearer(secret))
        running = await admit(gw, p, "running")

        filler = fill(small_disk)
        refused = 0
        for i in range(50):  # the WAL reuses its pages for a while; then it must grow
            try:
                a = await admit(gw, p, f"while-full-{i}")
            except GatewayError as exc:
                assert_unavailable(exc, "database_unavailable")
                refused += 1
                break
            await settle(gw, a, 1)
        assert refused == 1
        await settle(gw, running, 9)  # retried until there is room again

        filler.unlink()
        row = await closed_row(gw, "running")
        assert (row.completion_tokens, row.end_state) == (9, "completed")
        await settle(gw, await admit(gw, p, "after"), 2)
        audit = await gw.call(usage.audit, gw.db, account.id)
        assert audit.consistent, audit
    finally:
        await gw.close()
    with sqlite3.connect(data_dir / "inferhub.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
