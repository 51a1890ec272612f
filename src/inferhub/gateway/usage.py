"""Usage queries: the request rows, their totals by day, model, account or key, and the audit
that recomputes an account's balance from its ledger and usage rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from inferhub.gateway.db import Database
from inferhub.gateway.interface import GatewayError
from inferhub.gateway.records import UsageGroup, UsageRecord, aware, aware_or_none, naive
from inferhub.gateway.schema import accounts, api_keys, ledger, usage

GROUPS = ("day", "model", "account", "key")
MAX_ROWS = 1000


@dataclass
class AccountAudit:
    """Stored totals of an account against the totals recomputed from its ledger and usage."""

    account_id: str
    balance_micros: int
    credits_micros: int  # sum of ledger entries
    costs_micros: int  # sum of closed usage costs
    reserved_micros: int
    open_reserved_micros: int  # sum of open reservations
    keys_consistent: bool  # each key's spent/reserved equals its usage rows

    @property
    def consistent(self) -> bool:
        return (
            self.balance_micros == self.credits_micros - self.costs_micros
            and self.reserved_micros == self.open_reserved_micros
            and self.keys_consistent
        )


def usage_from_row(row: Any) -> UsageRecord:
    return UsageRecord(
        request_id=row.request_id,
        account_id=row.account_id,
        key_id=row.key_id,
        model=row.model,
        status=row.status,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        cost_micros=row.cost_micros,
        reserved_micros=row.reserved_micros,
        end_state=row.end_state,
        finish_reasons=list(row.finish_reasons),
        started_at=aware(row.started_at),
        ended_at=aware_or_none(row.ended_at),
    )


@dataclass
class UsageFilter:
    """Which requests: every field narrows; `since` inclusive, `until` exclusive (start times)."""

    account_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def _where(f: UsageFilter) -> list[Any]:
    clauses: list[Any] = []
    if f.account_id is not None:
        clauses.append(usage.c.account_id == f.account_id)
    if f.key_id is not None:
        clauses.append(usage.c.key_id == f.key_id)
    if f.model is not None:
        clauses.append(usage.c.model == f.model)
    if f.since is not None:
        clauses.append(usage.c.started_at >= naive(f.since))
    if f.until is not None:
        clauses.append(usage.c.started_at < naive(f.until))
    return clauses


def list_usage(
    db: Database, f: UsageFilter, *, limit: int = 100, offset: int = 0
) -> list[UsageRecord]:
    """Request rows, newest first."""
    limit = max(1, min(limit, MAX_ROWS))
    query = (
        sa.select(usage)
        .where(*_where(f))
        .order_by(usage.c.started_at.desc(), usage.c.request_id)
        .limit(limit)
        .offset(max(0, offset))
    )
    with db.read() as conn:
        return [usage_from_row(r) for r in conn.execute(query)]


def get_usage(db: Database, request_id: str) -> UsageRecord | None:
    with db.read() as conn:
        row = conn.execute(sa.select(usage).where(usage.c.request_id == request_id)).first()
    return None if row is None else usage_from_row(row)


def usage_totals(db: Database, f: UsageFilter, group_by: str | None = None) -> list[UsageGroup]:
    """Totals of tokens and cost of closed requests, in one group or one per day/model/...;
    refused requests count as requests with no tokens."""
    sums = (
        sa.func.count(),
        sa.func.coalesce(sa.func.sum(usage.c.prompt_tokens), 0),
        sa.func.coalesce(sa.func.sum(usage.c.completion_tokens), 0),
        sa.func.coalesce(sa.func.sum(usage.c.cost_micros), 0),
    )
    where = [usage.c.status == "closed", *_where(f)]
    if group_by is None:
        query = sa.select(sa.literal_column("'total'"), *sums).where(*where)
    else:
        if group_by not in GROUPS:
            raise GatewayError(400, f"group_by must be one of {GROUPS}", param="group_by")
        column: Any = {
            "day": sa.func.date(usage.c.started_at),
            "model": usage.c.model,
            "account": usage.c.account_id,
            "key": usage.c.key_id,
        }[group_by]
        query = sa.select(column, *sums).where(*where).group_by(column).order_by(column)
    with db.read() as conn:
        rows = [r for r in conn.execute(query).all() if r[1]]
    return [
        UsageGroup(str(g), int(n), int(p), int(c), int(p) + int(c), int(cost))
        for g, n, p, c, cost in rows
    ]


def audit(db: Database, account_id: str) -> AccountAudit:
    """Recompute an account's balance and reservations from its ledger and usage rows."""
    with db.read(snapshot=True) as conn:
        account = conn.execute(sa.select(accounts).where(accounts.c.id == account_id)).one()
        credits = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(ledger.c.amount_micros), 0)).where(
                ledger.c.account_id == account_id
            )
        ).scalar_one()
        per_key = conn.execute(
            sa.select(
                usage.c.key_id,
                sa.func.coalesce(
                    sa.func.sum(
                        sa.case((usage.c.status == "closed", usage.c.cost_micros), else_=0)
                    ),
                    0,
                ),
                sa.func.coalesce(
                    sa.func.sum(
                        sa.case((usage.c.status == "open", usage.c.reserved_micros), else_=0)
                    ),
                    0,
                ),
            )
            .where(usage.c.account_id == account_id)
            .group_by(usage.c.key_id)
        ).all()
        keys = conn.execute(
            sa.select(api_keys.c.id, api_keys.c.spent_micros, api_keys.c.reserved_micros).where(
                api_keys.c.account_id == account_id
            )
        ).all()
    sums = {key_id: (int(cost), int(held)) for key_id, cost, held in per_key}
    keys_ok = all(sums.get(k.id, (0, 0)) == (k.spent_micros, k.reserved_micros) for k in keys)
    return AccountAudit(
        account_id=account_id,
        balance_micros=account.balance_micros,
        credits_micros=int(credits),
        costs_micros=sum(cost for cost, _ in sums.values()),
        reserved_micros=account.reserved_micros,
        open_reserved_micros=sum(held for _, held in sums.values()),
        keys_consistent=keys_ok,
    )
