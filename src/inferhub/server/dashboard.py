"""The account API under `/v1/dashboard`: the caller's own account, keys, usage and the prices.

Every query is scoped to the caller's account; another account's key answers 404, exactly as
a key that does not exist. A key can create keys no less restricted than itself, so a
restricted key cannot mint its way out of its limits.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from inferhub.gateway import accounts
from inferhub.gateway.interface import GatewayError
from inferhub.gateway.money import MICROS
from inferhub.gateway.records import (
    AccountInfo,
    CreatedKey,
    KeyInfo,
    PriceInfo,
    UsageGroup,
    UsageRecord,
)
from inferhub.gateway.usage import UsageFilter, list_usage, usage_totals
from inferhub.server.admin import (
    CallerDep,
    GatewayDep,
    KeyCreate,
    Offset,
    Page,
    UsageQuery,
    UsageQueryDep,
    create_key_for,
    get_caller,
)


def _check_within(caller: KeyInfo, body: KeyCreate) -> None:
    """Refuse a new key that would have more access than the key asking for it."""

    def refuse(what: str, param: str) -> GatewayError:
        return GatewayError(
            403,
            f"A new key cannot have {what} than the key creating it.",
            param=param,
            code="key_not_within_caller",
        )

    if caller.allowed_models and (
        not body.allowed_models or not set(body.allowed_models) <= set(caller.allowed_models)
    ):
        raise refuse("access to more models", "allowed_models")
    for name, mine, theirs in (
        ("rpm_limit", caller.limits.rpm, body.rpm_limit),
        ("tpm_limit", caller.limits.tpm, body.tpm_limit),
        ("concurrency_limit", caller.limits.concurrency, body.concurrency_limit),
    ):
        if mine is not None and (theirs is None or theirs > mine):
            raise refuse("a higher limit", name)
    if caller.spend_cap_micros is not None and (
        body.spend_cap_micros is None or body.spend_cap_micros > caller.spend_cap_micros
    ):
        raise refuse("a higher spend cap", "spend_cap_micros")
    if caller.expires_at is not None and (
        body.expires_at is None or body.expires_at > caller.expires_at
    ):
        raise refuse("a later expiry", "expires_at")


def _filter(account_id: str, query: UsageQuery) -> UsageFilter:
    return UsageFilter(account_id, query.key_id, query.model, query.since, query.until)


def dashboard_router() -> APIRouter:
    """Routes under /v1/dashboard; any valid key or console session of an account manages
    that account only."""
    router = APIRouter(
        prefix="/v1/dashboard", tags=["dashboard"], dependencies=[Depends(get_caller)]
    )

    @router.get("/account")
    async def account(gw: GatewayDep, caller: CallerDep) -> AccountInfo:
        return await gw.call(accounts.find_account, gw.db, caller.account_id)

    @router.get("/keys")
    async def list_keys(gw: GatewayDep, caller: CallerDep) -> Page[KeyInfo]:
        return Page(data=await gw.call(accounts.list_keys, gw.db, caller.account_id))

    @router.post("/keys", status_code=201)
    async def create_key(gw: GatewayDep, caller: CallerDep, body: KeyCreate) -> CreatedKey:
        if caller.session_id is None:  # a console session is the owner: no key to stay within
            mine = await gw.call(accounts.get_key, gw.db, caller.key_id)
            _check_within(mine, body)
        return await create_key_for(gw, caller.account_id, body)

    @router.get("/keys/{key_id}")
    async def get_key(gw: GatewayDep, caller: CallerDep, key_id: str) -> KeyInfo:
        return await gw.call(accounts.get_key, gw.db, key_id, account_id=caller.account_id)

    @router.post("/keys/{key_id}/revoke")
    async def revoke_key(gw: GatewayDep, caller: CallerDep, key_id: str) -> KeyInfo:
        return await gw.call(accounts.revoke_key, gw.db, key_id, account_id=caller.account_id)

    @router.get("/usage")
    async def usage(gw: GatewayDep, caller: CallerDep, query: UsageQueryDep) -> Page[UsageGroup]:
        f = _filter(caller.account_id, query)
        return Page(data=await gw.call(usage_totals, gw.db, f, query.group_by))

    @router.get("/usage/requests")
    async def usage_requests(
        gw: GatewayDep,
        caller: CallerDep,
        query: UsageQueryDep,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Offset = 0,
    ) -> Page[UsageRecord]:
        f = _filter(caller.account_id, query)
        return Page(data=await gw.call(list_usage, gw.db, f, limit=limit, offset=offset))

    @router.get("/prices")
    async def prices(gw: GatewayDep) -> Page[PriceInfo]:
        return Page(data=await gw.call(accounts.list_prices, gw.db))

    @router.get("/currency")
    async def currency(gw: GatewayDep) -> dict[str, str | int]:
        """What the integer amounts count: micro-units of this currency."""
        return {"currency": gw.settings.currency, "micros_per_unit": MICROS}

    return router
