"""The billing ledger's per-request path: reserve, refuse, checkpoint, and settle exactly once.

A request's `usage` row is inserted open at admission, holding the reservation (the most the
request can cost, at the prices of that moment) against the account's balance and the key's
spend cap. Settlement closes it once, charges the cost of the engine's token counts and
releases the whole reservation. The holds are conditional `UPDATE`s, atomic on both
databases; the lock order is usage row, account, key everywhere. These statements run on
the driver's cursor (see db.py for why); the SQL is the same for SQLite and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inferhub.gateway.accounts import DEFAULT_PRICE_MODEL
from inferhub.gateway.db import Database, utcnow
from inferhub.gateway.interface import GatewayError, Principal
from inferhub.gateway.money import cost_micros, format_amount

_PRICES = """SELECT model, input_micros_per_mtok, output_micros_per_mtok FROM prices
WHERE model IN (:model, :default_model)"""
_HOLD_ACCOUNT = """UPDATE accounts SET reserved_micros = reserved_micros + :amount
WHERE id = :account_id AND disabled_at IS NULL
AND (:amount = 0 OR balance_micros - reserved_micros >= :amount)"""
_HOLD_KEY = """UPDATE api_keys SET reserved_micros = reserved_micros + :amount, last_used_at = :now
WHERE id = :key_id AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > :now)
AND (:amount = 0 OR spend_cap_micros IS NULL
     OR spent_micros + reserved_micros + :amount <= spend_cap_micros)"""
_WHY_REFUSED = """SELECT k.revoked_at IS NOT NULL, k.expires_at IS NOT NULL AND k.expires_at <= :now,
a.disabled_at IS NOT NULL, a.balance_micros - a.reserved_micros, k.spend_cap_micros
FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.id = :key_id"""
_INSERT_USAGE = """INSERT INTO usage (request_id, account_id, key_id, model, status, instance,
input_micros_per_mtok, output_micros_per_mtok, max_completion_tokens, reserved_micros,
prompt_tokens, completion_tokens, cost_micros, end_state, finish_reasons, started_at, ended_at)
VALUES (:request_id, :account_id, :key_id, :model, :status, :instance, :input, :output,
:max_completion_tokens, :reserved, :prompt_tokens, 0, 0, :end_state, :finish_reasons,
:now, :ended_at)"""
_CHECKPOINT = """UPDATE usage SET completion_tokens = :completion
WHERE request_id = :request_id AND status = 'open' AND completion_tokens < :completion"""
_OPEN_ROW = """SELECT account_id, key_id, reserved_micros, input_micros_per_mtok,
output_micros_per_mtok FROM usage WHERE request_id = :request_id AND status = 'open'"""
_CHARGE_ACCOUNT = """UPDATE accounts SET balance_micros = balance_micros - :cost,
reserved_micros = reserved_micros - :held WHERE id = :account_id"""
_CHARGE_KEY = """UPDATE api_keys SET spent_micros = spent_micros + :cost,
reserved_micros = reserved_micros - :held WHERE id = :key_id"""
_CLOSE = """UPDATE usage SET status = 'closed', prompt_tokens = :prompt, completion_tokens = :completion,
cost_micros = :cost, end_state = :end_state, finish_reasons = :finish_reasons, ended_at = :now
WHERE request_id = :request_id AND status = 'open'"""


@dataclass
class Reservation:
    request_id: str
    reserved_micros: int
    input_micros_per_mtok: int
    output_micros_per_mtok: int


@dataclass
class Settlement:
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int


class _Refused(Exception):
    def __init__(self, error: GatewayError) -> None:
        self.error = error


def quota_error(message: str) -> GatewayError:
    return GatewayError(429, message, type="insufficient_quota", code="insufficient_quota")


def _invalid_key(message: str) -> GatewayError:
    return GatewayError(401, message, code="invalid_api_key")


def _why_refused(db: Database, cursor: Any, key_id: str, amount: int, now: Any) -> GatewayError:
    cursor.execute(db.sql(_WHY_REFUSED), {"key_id": key_id, "now": now})
    row = cursor.fetchone()
    if row is None or row[0]:
        return _invalid_key("This API key has been revoked.")
    _, expired, disabled, available, cap = row
    if expired:
        return _invalid_key("This API key has expired.")
    if disabled:
        return _invalid_key("The account of this API key is disabled.")
    if amount > available:
        return quota_error(
            "You exceeded your current quota: this request may cost up to "
            f"{format_amount(amount)} and the account has {format_amount(available)} available."
        )
    return quota_error(
        f"This request would exceed the spend cap of this API key ({format_amount(cap or 0)})."
    )


def price_of(db: Database, cursor: Any, model: str) -> tuple[int, int]:
    """(input, output) micro-units per million tokens: the model's own price, else the default."""
    cursor.execute(db.sql(_PRICES), {"model": model, "default_model": DEFAULT_PRICE_MODEL})
    by_model = {m: (i, o) for m, i, o in cursor.fetchall()}
    return by_model.get(model) or by_model.get(DEFAULT_PRICE_MODEL) or (0, 0)


def _usage_row(principal: Principal, request_id: str, model: str, instance: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "account_id": principal.account_id,
        "key_id": principal.key_id,
        "model": model,
        "instance": instance,
    }


def reserve(
    db: Database,
    principal: Principal,
    *,
    request_id: str,
    model: str,
    prompt_tokens: int,
    max_completion_tokens: int,
    instance: str,
) -> Reservation:
    """Hold credit for the largest cost of a request, or refuse it (401, 429) with a closed row."""
    now = db.ts(utcnow())
    row = _usage_row(principal, request_id, model, instance)
    row |= {"max_completion_tokens": max_completion_tokens, "now": now}
    try:
        with db.raw_write() as cursor:
            input_price, output_price = price_of(db, cursor, model)
            amount = cost_micros(prompt_tokens, max_completion_tokens, input_price, output_price)
            hold = {"amount": amount, "now": now, **row}
            cursor.execute(db.sql(_HOLD_ACCOUNT), hold)
            held = cursor.rowcount == 1
            if held:
                cursor.execute(db.sql(_HOLD_KEY), hold)
                held = cursor.rowcount == 1
            if not held:  # roll both holds back, then keep the refusal's row
                raise _Refused(_why_refused(db, cursor, principal.key_id, amount, now))
            row |= {"status": "open", "input": input_price, "output": output_price}
            row |= {"reserved": amount, "prompt_tokens": prompt_tokens, "end_state": None}
            row |= {"finish_reasons": db.json([]), "ended_at": None}
            cursor.execute(db.sql(_INSERT_USAGE), row)
    except _Refused as refused:
        _insert_refusal(db, row, refused.error.code or "refused", input_price, output_price)
        raise refused.error from None
    except db.integrity_error as exc:
        raise GatewayError(
            400, f"Duplicate request id {request_id}", code="duplicate_request"
        ) from exc
    return Reservation(request_id, amount, input_price, output_price)


def _insert_refusal(db: Database, row: dict[str, Any], code: str, inp: int, out: int) -> None:
    """The closed row of a refused request: it held nothing and used no tokens."""
    row = row | {"status": "closed", "input": inp, "output": out, "reserved": 0}
    row |= {"prompt_tokens": 0, "end_state": "rejected", "finish_reasons": db.json([code])}
    row |= {"ended_at": row["now"]}
    try:
        with db.raw_write() as cursor:
            cursor.execute(db.sql(_INSERT_USAGE), row)
    except db.integrity_error:
        pass  # a request id already used: its first row stands


def record_refusal(
    db: Database,
    principal: Principal,
    *,
    request_id: str,
    model: str,
    max_completion_tokens: int,
    code: str,
    instance: str,
) -> None:
    """The usage row of a request refused before any reservation (403, rate limits)."""
    row = _usage_row(principal, request_id, model, instance)
    row |= {"max_completion_tokens": max_completion_tokens, "now": db.ts(utcnow())}
    _insert_refusal(db, row, code, 0, 0)


def checkpoint(db: Database, request_id: str, completion_tokens: int) -> None:
    """Persist the completion tokens generated so far, for billing after a crash (never
    backwards: checkpoints may land out of order)."""
    with db.raw_write() as cursor:
        params = {"request_id": request_id, "completion": completion_tokens}
        cursor.execute(db.sql(_CHECKPOINT), params)


def settle(
    db: Database,
    request_id: str,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    end_state: str,
    finish_reasons: list[str],
) -> Settlement | None:
    """Close a reservation with its bill; None if it was already closed (or never existed)."""
    lock_row = _OPEN_ROW if db.is_sqlite else _OPEN_ROW + " FOR UPDATE"
    with db.raw_write() as cursor:
        cursor.execute(db.sql(lock_row), {"request_id": request_id})
        found = cursor.fetchone()
        if found is None:
            return None
        account_id, key_id, held, input_price, output_price = found
        cost = cost_micros(prompt_tokens, completion_tokens, input_price, output_price)
        money = {"cost": cost, "held": held}
        cursor.execute(db.sql(_CHARGE_ACCOUNT), {"account_id": account_id, **money})
        cursor.execute(db.sql(_CHARGE_KEY), {"key_id": key_id, **money})
        cursor.execute(
            db.sql(_CLOSE),
            {
                "request_id": request_id,
                "prompt": prompt_tokens,
                "completion": completion_tokens,
                "cost": cost,
                "end_state": end_state,
                "finish_reasons": db.json(list(finish_reasons)),
                "now": db.ts(utcnow()),
            },
        )
    return Settlement(request_id, prompt_tokens, completion_tokens, cost)
