"""Helpers of the gateway tests: settings, accounts and keys in one call, a free port."""

from __future__ import annotations

import secrets
from typing import Any

from inferhub.gateway import accounts
from inferhub.gateway.gateway import DatabaseGateway, GatewaySettings
from inferhub.gateway.records import AccountInfo, KeyLimits
from services import free_port  # noqa: F401  (re-exported for the tests)


def settings(**changes: Any) -> GatewaySettings:
    """Test settings: checkpoint every token, no periodic upkeep during a test."""
    values: dict[str, Any] = {"checkpoint_interval_s": 0.0, "heartbeat_interval_s": 3600.0}
    return GatewaySettings(**(values | changes))


def new_account(
    gateway: DatabaseGateway, *, credit: int = 0, role: str = "user", name: str | None = None
) -> AccountInfo:
    account = accounts.create_account(gateway.db, name or f"acct-{secrets.token_hex(4)}", role=role)
    if credit:
        accounts.add_credit(gateway.db, account.id, credit, note="test credit")
    return account


def new_key(
    gateway: DatabaseGateway,
    account: AccountInfo,
    *,
    limits: KeyLimits | None = None,
    **options: Any,
) -> str:
    return accounts.create_key(gateway.db, account.id, limits=limits, **options).secret


def bearer(secret: str) -> str:
    return f"Bearer {secret}"
