"""Crash recovery: instance heartbeats, and closing reservations whose gateway died.

Each gateway process has an instance name (unique among replicas sharing a database) and a
heartbeat row. At start, a gateway closes the open reservations of its own previous life;
every heartbeat it also closes those of instances silent for longer than `stale_after_s`.
A recovered request is billed for its prompt and its checkpointed completion tokens if any
were generated, else released whole; its end state is "crashed".
"""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from inferhub.gateway.billing import settle
from inferhub.gateway.db import Database, utcnow
from inferhub.gateway.records import UsageRecord
from inferhub.gateway.schema import instances, usage
from inferhub.gateway.usage import get_usage

RECOVERED_STATE = "crashed"  # end_state of a reservation closed by recovery


def heartbeat(db: Database, instance: str) -> None:
    now = utcnow()
    with db.write() as conn:
        found = conn.execute(
            instances.update().where(instances.c.name == instance).values(heartbeat_at=now)
        )
        if found.rowcount == 0:
            conn.execute(instances.insert().values(name=instance, started_at=now, heartbeat_at=now))


def forget_instance(db: Database, instance: str) -> None:
    with db.write() as conn:
        conn.execute(instances.delete().where(instances.c.name == instance))


def recover(
    db: Database, instance: str, *, stale_after_s: float, include_own: bool
) -> list[UsageRecord]:
    """Close the open reservations of instances whose heartbeat is stale (and, at startup,
    `include_own`, of this instance's previous life): bill the prompt and the checkpointed
    completion tokens if any were generated, else release the reservation whole."""
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    alive = sa.select(instances.c.name).where(
        instances.c.heartbeat_at >= cutoff, instances.c.name != instance
    )
    where = [usage.c.status == "open", usage.c.instance.not_in(alive)]
    if not include_own:
        where.append(usage.c.instance != instance)
    query = sa.select(usage.c.request_id, usage.c.prompt_tokens, usage.c.completion_tokens).where(
        *where
    )
    with db.read() as conn:
        orphans = conn.execute(query).all()
    closed = []
    for request_id, prompt, completion in orphans:
        settled = settle(
            db,
            request_id,
            prompt_tokens=prompt if completion else 0,
            completion_tokens=completion,
            end_state=RECOVERED_STATE,
            finish_reasons=[],
        )
        record = get_usage(db, request_id) if settled else None
        if record is not None:
            closed.append(record)
    return closed
