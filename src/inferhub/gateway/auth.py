"""Who is calling: API key lookup (by hash, constant-time compare) and console passwords (argon2)."""

from __future__ import annotations

import contextlib
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from inferhub.gateway.accounts import login_row, set_password_hash
from inferhub.gateway.db import Database, utcnow
from inferhub.gateway.interface import GatewayError
from inferhub.gateway.keys import hash_key, hashes_equal
from inferhub.gateway.records import AccountInfo, KeyLimits, KeyPrincipal

_LOOKUP = """SELECT k.id, k.account_id, k.key_hash, k.prefix, k.allowed_models, k.rpm_limit,
k.tpm_limit, k.concurrency_limit, k.revoked_at IS NOT NULL,
k.expires_at IS NOT NULL AND k.expires_at <= :now, a.role, a.name, a.disabled_at IS NOT NULL
FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE """
_BY_HASH = _LOOKUP + "k.key_hash = :key_hash"
_BY_ID = _LOOKUP + "k.id = :key_id"

# The hash of a random password nobody knows: verified against when a login does not exist.
_DUMMY_HASH = "$argon2id$v=19$m=65536,t=3,p=4$1z0av/vG719m0Gs1N2c6Qg$KFG8Q2KPdveOz4rsrcglfRpbvznmeUFN8MGf3r1nNxU"


def invalid_key(message: str = "Incorrect API key provided.") -> GatewayError:
    return GatewayError(401, message, type="invalid_request_error", code="invalid_api_key")


def missing_key() -> GatewayError:
    return invalid_key(
        "You didn't provide an API key. Provide it in the Authorization header "
        "(Authorization: Bearer YOUR_KEY)."
    )


def _principal(db: Database, row: Any) -> KeyPrincipal:
    key_id, account_id, _, prefix, models, rpm, tpm, concurrency = row[:8]
    revoked, expired, role, account_name, disabled = row[8:]
    if revoked:
        raise invalid_key("This API key has been revoked.")
    if expired:
        raise invalid_key("This API key has expired.")
    if disabled:
        raise invalid_key("The account of this API key is disabled.")
    return KeyPrincipal(
        key_id=key_id,
        account_id=account_id,
        role=role,
        key_prefix=prefix,
        allowed_models=list(db.from_json(models)),
        limits=KeyLimits(rpm=rpm, tpm=tpm, concurrency=concurrency),
        account_name=account_name,
    )


def lookup_secret(db: Database, secret: str) -> KeyPrincipal:
    """The principal of a presented key; 401 if unknown, revoked, expired or its account disabled."""
    digest = hash_key(secret)
    with db.raw_read() as cursor:
        cursor.execute(db.sql(_BY_HASH), {"key_hash": digest, "now": db.ts(utcnow())})
        row = cursor.fetchone()
    if row is None or not hashes_equal(row[2], digest):
        raise invalid_key()
    return _principal(db, row)


def principal_for_key(db: Database, key_id: str) -> KeyPrincipal:
    with db.raw_read() as cursor:
        cursor.execute(db.sql(_BY_ID), {"key_id": key_id, "now": db.ts(utcnow())})
        row = cursor.fetchone()
    if row is None:
        raise invalid_key()
    return _principal(db, row)


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise GatewayError(400, "A password needs at least 8 characters.", param="password")
    return PasswordHasher().hash(password)


def set_password(db: Database, account_id: str, password: str) -> None:
    set_password_hash(db, account_id, hash_password(password))


def verify_login(db: Database, login: str, password: str) -> AccountInfo | None:
    """The account if `login` (name or email) and `password` match and it is enabled."""
    hasher = PasswordHasher()
    found = login_row(db, login)
    stored = found[1] if found else None
    if found is None or stored is None:
        # Spend the same time as a real check, so timing does not tell which logins exist.
        with contextlib.suppress(VerificationError):
            hasher.verify(_DUMMY_HASH, password)
        return None
    account, _ = found
    try:
        hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if hasher.check_needs_rehash(stored):
        set_password_hash(db, account.id, hasher.hash(password))
    return None if account.disabled else account
