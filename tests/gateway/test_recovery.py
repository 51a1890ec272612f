"""Crash safety: a gateway killed with SIGKILL mid-stream leaves open reservations that the
next start closes, each request with exactly one usage row and balances that add up; the
reservations of a replica whose heartbeat went stale are closed by a live one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from gateway_helpers import bearer, new_account, new_key, settings

from inferhub.gateway import accounts, billing, recovery, usage
from inferhub.gateway.db import utcnow
from inferhub.gateway.factory import create_gateway
from inferhub.gateway.gateway import DatabaseGateway
from inferhub.gateway.money import cost_micros
from inferhub.gateway.schema import instances
from inferhub.gateway.usage import UsageFilter

pytestmark = pytest.mark.anyio

# Admits 20 streaming requests, settles every 4th, streams tokens into most of the others,
# waits until their checkpoints are stored, says "ready" and waits to be killed.
CHILD = """
import asyncio, sys, time
from pathlib import Path
from inferhub.gateway import usage
from inferhub.gateway.factory import create_gateway
from inferhub.gateway.gateway import GatewaySettings

async def main():
    url, data_dir, secret = sys.argv[1] or None, Path(sys.argv[2]), sys.argv[3]
    s = GatewaySettings(checkpoint_interval_s=0.0, heartbeat_interval_s=3600.0)
    gw = create_gateway(url, data_dir, settings=s, announce=lambda _: None)
    await gw.start()
    p = await gw.authenticate("Bearer " + secret)
    streamed = {}
    for i in range(20):
        a = await gw.admit(p, request_id=f"crash-{i}", model="m", prompt_tokens=10,
                           max_completion_tokens=50)
        if i % 4 == 0:
            await gw.settle(a, prompt_tokens=10, completion_tokens=7, end_state="completed",
                            finish_reasons=["stop"])
        elif i % 4 != 1:
            for _ in range(i):
                await gw.record_tokens(a, 1)
            streamed[a.request_id] = i
    deadline = time.monotonic() + 20
    while any(usage.get_usage(gw.db, r).completion_tokens != n for r, n in streamed.items()):
        assert time.monotonic() < deadline, "checkpoints never landed"
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


async def test_kill_9_mid_stream_then_restart_recovers_every_reservation(
    database_url: str | None, data_dir: Path
) -> None:
    gate = create_gateway(database_url, data_dir, settings=settings(), announce=lambda _: None)
    accounts.set_price(gate.db, "m", 1_000_000, 2_000_000)
    account = new_account(gate, credit=100_000)
    secret = new_key(gate, account)
    await gate.close()  # never started: nothing of it is in flight

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, database_url or "", str(data_dir), secret],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    restarted = create_gateway(database_url, data_dir, settings=settings(), announce=lambda _: None)
    recovered = await restarted.start()
    try:
        assert len(recovered) == 15
        rows = {
            u.request_id: u
            for u in usage.list_usage(restarted.db, UsageFilter(account.id), limit=100)
        }
        assert sorted(rows) == sorted(f"crash-{i}" for i in range(20))
        for i in range(20):
            row = rows[f"crash-{i}"]
            assert row.status == "closed"
            if i % 4 == 0:
                assert (row.end_state, row.completion_tokens) == ("completed", 7)
            elif i % 4 == 1:  # nothing generated: released whole
                assert (row.end_state, row.prompt_tokens, row.cost_micros) == ("crashed", 0, 0)
            else:  # billed up to its last checkpoint
                assert (row.end_state, row.prompt_tokens, row.completion_tokens) == (
                    "crashed",
                    10,
                    i,
                )
            assert row.cost_micros == cost_micros(
                row.prompt_tokens, row.completion_tokens, 1_000_000, 2_000_000
            )
        after = accounts.find_account(restarted.db, account.id)
        assert after.reserved_micros == 0
        assert after.balance_micros == 100_000 - sum(r.cost_micros for r in rows.values())
        assert usage.audit(restarted.db, account.id).consistent
        assert (
            await restarted.call(
                recovery.recover, restarted.db, "default", stale_after_s=60, include_own=True
            )
            == []
        )
    finally:
        await restarted.close()


async def test_live_replica_recovers_a_stale_replicas_reservations(gw: DatabaseGateway) -> None:
    account = new_account(gw, credit=1_000_000)
    principal = await gw.authenticate(bearer(new_key(gw, account)))
    # Replica "b" admitted two requests, checkpointed one, and went silent.
    recovery.heartbeat(gw.db, "b")
    for request_id in ("b1", "b2"):
        billing.reserve(
            gw.db,
            principal,
            request_id=request_id,
            model="m",
            prompt_tokens=4,
            max_completion_tokens=10,
            instance="b",
        )
    billing.checkpoint(gw.db, "b1", 6)
    mine = await gw.admit(
        principal, request_id="a1", model="m", prompt_tokens=1, max_completion_tokens=1
    )

    sweep = dict(stale_after_s=30.0, include_own=False)
    assert await gw.call(recovery.recover, gw.db, "default", **sweep) == []  # b is alive
    with gw.db.write() as conn:
        conn.execute(
            instances.update()
            .where(instances.c.name == "b")
            .values(heartbeat_at=utcnow() - timedelta(minutes=5))
        )
    closed = await gw.call(recovery.recover, gw.db, "default", **sweep)
    assert sorted(r.request_id for r in closed) == ["b1", "b2"]  # never this replica's own
    b1 = usage.get_usage(gw.db, "b1")
    assert b1 is not None and (b1.prompt_tokens, b1.completion_tokens) == (4, 6)
    a1 = usage.get_usage(gw.db, "a1")
    assert a1 is not None and a1.status == "open"
    await gw.settle(
        mine, prompt_tokens=1, completion_tokens=1, end_state="completed", finish_reasons=["stop"]
    )
    assert usage.audit(gw.db, account.id).consistent
    with gw.db.read() as conn:
        assert (
            conn.execute(
                sa.select(sa.func.count())
                .where(sa.text("status = 'open'"))
                .select_from(sa.text("usage"))
            ).scalar()
            == 0
        )
