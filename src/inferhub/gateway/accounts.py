"""Accounts, API keys, prices and credit top-ups: the synchronous store behind the APIs and CLI.

Every function takes a `Database` and runs one transaction. Errors are `GatewayError`s with
the HTTP status an API would answer (404 unknown, 409 conflict, 400 invalid input).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from inferhub.gateway.db import Database, utcnow
from inferhub.gateway.interface import GatewayError
from inferhub.gateway.keys import generate_key, hash_key, new_id, redact_keys, visible_prefix
from inferhub.gateway.records import (
    AccountInfo,
    CreatedKey,
    KeyInfo,
    KeyLimits,
    LedgerEntry,
    PriceInfo,
    aware,
    aware_or_none,
    naive,
)
from inferhub.gateway.schema import accounts, api_keys, ledger, prices

ROLES = ("admin", "user")
DEFAULT_PRICE_MODEL = "*"


def _not_found(what: str, ref: str) -> GatewayError:
    return GatewayError(404, f"No such {what}: {redact_keys(ref)}", code="not_found")


def account_from_row(row: Any) -> AccountInfo:
    return AccountInfo(
        id=row.id,
        name=row.name,
        email=row.email,
        role=row.role,
        balance_micros=row.balance_micros,
        reserved_micros=row.reserved_micros,
        available_micros=row.balance_micros - row.reserved_micros,
        created_at=aware(row.created_at),
        disabled=row.disabled_at is not None,
        has_password=row.password_hash is not None,
    )


def key_from_row(row: Any) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        account_id=row.account_id,
        name=row.name,
        prefix=row.prefix,
        allowed_models=list(row.allowed_models),
        limits=KeyLimits(rpm=row.rpm_limit, tpm=row.tpm_limit, concurrency=row.concurrency_limit),
        spend_cap_micros=row.spend_cap_micros,
        spent_micros=row.spent_micros,
        reserved_micros=row.reserved_micros,
        expires_at=aware_or_none(row.expires_at),
        revoked=row.revoked_at is not None,
        created_at=aware(row.created_at),
        last_used_at=aware_or_none(row.last_used_at),
    )


# -- accounts ----------------------------------------------------------------------------------


def create_account(
    db: Database,
    name: str,
    *,
    email: str | None = None,
    role: str = "user",
    password_hash: str | None = None,
) -> AccountInfo:
    name = name.strip()
    if not name:
        raise GatewayError(400, "An account needs a name.", param="name")
    if email is not None and not email.strip():
        raise GatewayError(
            400, "The email must not be empty (leave it out instead).", param="email"
        )
    if role not in ROLES:
        raise GatewayError(400, f"role must be one of {ROLES}", param="role")
    with db.write() as conn:
        taken = conn.execute(
            sa.select(accounts.c.id).where(
                sa.or_(accounts.c.name == name, accounts.c.email == email)
                if email
                else accounts.c.name == name
            )
        ).first()
        if taken is not None:
            raise GatewayError(409, "An account with that name or email exists.", code="conflict")
        account_id = new_id("acct")
        conn.execute(
            accounts.insert().values(
                id=account_id,
                name=name,
                email=email,
                role=role,
                balance_micros=0,
                reserved_micros=0,
                password_hash=password_hash,
                created_at=utcnow(),
            )
        )
        row = conn.execute(sa.select(accounts).where(accounts.c.id == account_id)).one()
    return account_from_row(row)


def find_account(db: Database, ref: str) -> AccountInfo:
    """An account by id, name or email."""
    with db.read() as conn:
        row = conn.execute(
            sa.select(accounts).where(
                sa.or_(accounts.c.id == ref, accounts.c.name == ref, accounts.c.email == ref)
            )
        ).first()
    if row is None:
        raise _not_found("account", ref)
    return account_from_row(row)


def list_accounts(db: Database) -> list[AccountInfo]:
    with db.read() as conn:
        rows = conn.execute(sa.select(accounts).order_by(accounts.c.created_at, accounts.c.id))
        return [account_from_row(r) for r in rows]


def set_account_disabled(db: Database, account_id: str, disabled: bool) -> AccountInfo:
    with db.write() as conn:
        result = conn.execute(
            accounts.update()
            .where(accounts.c.id == account_id)
            .values(disabled_at=utcnow() if disabled else None)
        )
        if result.rowcount != 1:
            raise _not_found("account", account_id)
        row = conn.execute(sa.select(accounts).where(accounts.c.id == account_id)).one()
    return account_from_row(row)


def set_password_hash(db: Database, account_id: str, password_hash: str | None) -> None:
    with db.write() as conn:
        result = conn.execute(
            accounts.update().where(accounts.c.id == account_id).values(password_hash=password_hash)
        )
        if result.rowcount != 1:
            raise _not_found("account", account_id)


def login_row(db: Database, login: str) -> tuple[AccountInfo, str | None] | None:
    """The account whose name or email is `login`, with its password hash."""
    with db.read() as conn:
        row = conn.execute(
            sa.select(accounts).where(sa.or_(accounts.c.name == login, accounts.c.email == login))
        ).first()
    return None if row is None else (account_from_row(row), row.password_hash)


def add_credit(
    db: Database, account_id: str, amount_micros: int, *, note: str = "", kind: str = "credit"
) -> LedgerEntry:
    """Move credit into (or, negative, out of) an account, with a ledger entry."""
    if kind not in ("credit", "adjustment"):
        raise GatewayError(400, "kind must be credit or adjustment", param="kind")
    if amount_micros == 0:
        raise GatewayError(400, "The amount must not be zero.", param="amount_micros")
    now = utcnow()
    with db.write() as conn:
        result = conn.execute(
            accounts.update()
            .where(accounts.c.id == account_id)
            .values(balance_micros=accounts.c.balance_micros + amount_micros)
        )
        if result.rowcount != 1:
            raise _not_found("account", account_id)
        entry_id = conn.execute(
            ledger.insert()
            .values(
                account_id=account_id,
                amount_micros=amount_micros,
                kind=kind,
                note=note,
                created_at=now,
            )
            .returning(ledger.c.id)
        ).scalar_one()
        balance = conn.execute(
            sa.select(accounts.c.balance_micros).where(accounts.c.id == account_id)
        ).scalar_one()
    return LedgerEntry(entry_id, account_id, amount_micros, kind, note, aware(now), balance)


def list_ledger(db: Database, account_id: str) -> list[LedgerEntry]:
    with db.read() as conn:
        rows = conn.execute(
            sa.select(ledger).where(ledger.c.account_id == account_id).order_by(ledger.c.id)
        )
        return [
            LedgerEntry(r.id, r.account_id, r.amount_micros, r.kind, r.note, aware(r.created_at))
            for r in rows
        ]


# -- keys --------------------------------------------------------------------------------------


def create_key(
    db: Database,
    account_id: str,
    *,
    name: str = "",
    allowed_models: list[str] | None = None,
    limits: KeyLimits | None = None,
    spend_cap_micros: int | None = None,
    expires_at: datetime | None = None,
    secret: str | None = None,
) -> CreatedKey:
    """A new key for an account; `secret` imports a given key (the bootstrap admin key)."""
    limits = limits or KeyLimits()
    for field_name, value in vars(limits).items():
        if value is not None and value < 1:
            raise GatewayError(400, f"{field_name} limit must be at least 1", param=field_name)
    if spend_cap_micros is not None and spend_cap_micros < 0:
        raise GatewayError(400, "spend cap must not be negative", param="spend_cap_micros")
    secret = secret or generate_key()
    key_id = new_id("key")
    with db.write() as conn:
        if (
            conn.execute(sa.select(accounts.c.id).where(accounts.c.id == account_id)).first()
            is None
        ):
            raise _not_found("account", account_id)
        conn.execute(
            api_keys.insert().values(
                id=key_id,
                account_id=account_id,
                name=name or key_id,
                key_hash=hash_key(secret),
                prefix=visible_prefix(secret),
                allowed_models=sorted(set(allowed_models or [])),
                rpm_limit=limits.rpm,
                tpm_limit=limits.tpm,
                concurrency_limit=limits.concurrency,
                spend_cap_micros=spend_cap_micros,
                spent_micros=0,
                reserved_micros=0,
                expires_at=naive(expires_at),
                created_at=utcnow(),
            )
        )
        row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).one()
    return CreatedKey(key=key_from_row(row), secret=secret)


def key_exists(db: Database, secret: str) -> bool:
    with db.read() as conn:
        found = conn.execute(
            sa.select(api_keys.c.id).where(api_keys.c.key_hash == hash_key(secret))
        ).first()
    return found is not None


def list_keys(db: Database, account_id: str | None = None) -> list[KeyInfo]:
    query = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
    if account_id is not None:
        query = query.where(api_keys.c.account_id == account_id)
    with db.read() as conn:
        return [key_from_row(r) for r in conn.execute(query)]


def get_key(db: Database, key_id: str, *, account_id: str | None = None) -> KeyInfo:
    """A key by id; with `account_id`, only if that account owns it (else 404, never 403)."""
    query = sa.select(api_keys).where(api_keys.c.id == key_id)
    if account_id is not None:
        query = query.where(api_keys.c.account_id == account_id)
    with db.read() as conn:
        row = conn.execute(query).first()
    if row is None:
        raise _not_found("key", key_id)
    return key_from_row(row)


def revoke_key(db: Database, key_id: str, *, account_id: str | None = None) -> KeyInfo:
    """Revoke a key (idempotent); it is refused from the next request on."""
    where = api_keys.c.id == key_id
    if account_id is not None:
        where = sa.and_(where, api_keys.c.account_id == account_id)
    with db.write() as conn:
        row = conn.execute(sa.select(api_keys).where(where)).first()
        if row is None:
            raise _not_found("key", key_id)
        if row.revoked_at is None:
            conn.execute(api_keys.update().where(where).values(revoked_at=utcnow()))
            row = conn.execute(sa.select(api_keys).where(where)).one()
    return key_from_row(row)


# -- prices ------------------------------------------------------------------------------------


def set_price(db: Database, model: str, input_per_mtok: int, output_per_mtok: int) -> PriceInfo:
    """Set a model's price (micro-units per million tokens); "*" sets the default."""
    if not model:
        raise GatewayError(400, "A price needs a model name.", param="model")
    if input_per_mtok < 0 or output_per_mtok < 0:
        raise GatewayError(400, "Prices must not be negative.", param="price")
    now = utcnow()
    with db.write() as conn:
        values = {
            "input_micros_per_mtok": input_per_mtok,
            "output_micros_per_mtok": output_per_mtok,
            "updated_at": now,
        }
        result = conn.execute(prices.update().where(prices.c.model == model).values(**values))
        if result.rowcount == 0:
            conn.execute(prices.insert().values(model=model, **values))
    return PriceInfo(model, input_per_mtok, output_per_mtok, aware(now))


def delete_price(db: Database, model: str) -> None:
    with db.write() as conn:
        if conn.execute(prices.delete().where(prices.c.model == model)).rowcount != 1:
            raise _not_found("price", model)


def list_prices(db: Database) -> list[PriceInfo]:
    with db.read() as conn:
        rows = conn.execute(sa.select(prices).order_by(prices.c.model))
        return [
            PriceInfo(
                r.model, r.input_micros_per_mtok, r.output_micros_per_mtok, aware(r.updated_at)
            )
            for r in rows
        ]
