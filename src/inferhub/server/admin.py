"""The operator API under `/admin` (admin-role keys only), and the gateway dependencies that it
shares with the account API in dashboard.py.

The routers find the database gateway at `app.state.gateway` (or, failing that, as the
server's gatekeeper at `app.state.server.gatekeeper`). Every refusal is a `GatewayError`,
which the server's error handlers render in OpenAI's shape.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Generic, Literal, TypeVar

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from inferhub.gateway import accounts
from inferhub.gateway.auth import hash_password, set_password
from inferhub.gateway.gateway import DatabaseGateway
from inferhub.gateway.interface import GatewayError
from inferhub.gateway.records import (
    AccountInfo,
    CreatedKey,
    KeyInfo,
    KeyLimits,
    KeyPrincipal,
    LedgerEntry,
    PriceInfo,
    UsageGroup,
    UsageRecord,
)
from inferhub.gateway.sessions import end_account_sessions
from inferhub.gateway.usage import UsageFilter, list_usage, usage_totals
from inferhub.gateway.usage import audit as usage_audit
from inferhub.server.console.sessions import has_session_cookie, session_caller

T = TypeVar("T")

# Bounds on integers that are stored in the database (64-bit columns). Money is bounded well
# inside int64 so that balances and costs summed from many such values still fit; a larger
# value is a 400 instead of an overflow (a 500) in the database driver.
MAX_MICROS = 10**15  # a billion currency units
MAX_DB_INT = 2**63 - 1
Micros = Annotated[int, Field(ge=-MAX_MICROS, le=MAX_MICROS)]
PositiveMicros = Annotated[int, Field(ge=0, le=MAX_MICROS)]
Limit = Annotated[int | None, Field(default=None, ge=1, le=MAX_DB_INT)]
Offset = Annotated[int, Query(ge=0, le=MAX_DB_INT)]


# -- dependencies ------------------------------------------------------------------------------


def get_gateway(request: Request) -> DatabaseGateway:
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is None:
        gateway = getattr(getattr(request.app.state, "server", None), "gatekeeper", None)
    if not isinstance(gateway, DatabaseGateway):
        raise GatewayError(
            404,
            "Accounts and keys are managed by the database gateway; this server runs without it.",
            code="not_available",
        )
    return gateway


GatewayDep = Annotated[DatabaseGateway, Depends(get_gateway)]


async def get_caller(
    request: Request, gateway: GatewayDep, authorization: Annotated[str | None, Header()] = None
) -> KeyPrincipal:
    """The calling key or, for a request with no Authorization header, the account of its
    console session cookie (with the CSRF header checked on state-changing calls)."""
    if authorization is None and has_session_cookie(request):
        return await session_caller(gateway, request)
    return await gateway.authenticate(authorization)


CallerDep = Annotated[KeyPrincipal, Depends(get_caller)]


async def require_admin(caller: CallerDep) -> KeyPrincipal:
    if caller.role != "admin":
        raise GatewayError(
            403, "This endpoint needs an admin API key or session.", code="admin_required"
        )
    return caller


AdminDep = Annotated[KeyPrincipal, Depends(require_admin)]


# -- bodies and pages --------------------------------------------------------------------------


class Page(BaseModel, Generic[T]):
    """A list in OpenAI's shape."""

    object: Literal["list"] = "list"
    data: list[T]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountCreate(_Body):
    name: str = Field(min_length=1, max_length=200)
    email: str | None = Field(default=None, min_length=1, max_length=320)
    role: Literal["admin", "user"] = "user"
    password: str | None = Field(default=None, min_length=8, max_length=1000)
    credit_micros: PositiveMicros = 0


class PasswordSet(_Body):
    password: str = Field(min_length=8, max_length=1000)


class CreditAdd(_Body):
    amount_micros: Micros
    note: str = Field(default="", max_length=500)
    kind: Literal["credit", "adjustment"] = "credit"


class KeyCreate(_Body):
    name: str = Field(default="", max_length=200)
    allowed_models: list[str] = Field(default_factory=list)
    rpm_limit: Limit = None
    tpm_limit: Limit = None
    concurrency_limit: Limit = None
    spend_cap_micros: PositiveMicros | None = None
    expires_at: datetime | None = None

    def limits(self) -> KeyLimits:
        return KeyLimits(self.rpm_limit, self.tpm_limit, self.concurrency_limit)


class PriceSet(_Body):
    input_micros_per_mtok: PositiveMicros
    output_micros_per_mtok: PositiveMicros


class Deleted(BaseModel):
    id: str
    deleted: bool = True


class UsageQuery(BaseModel):
    key_id: str | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    group_by: Literal["day", "model", "account", "key"] | None = None


UsageQueryDep = Annotated[UsageQuery, Query()]


async def create_key_for(gateway: DatabaseGateway, account_id: str, body: KeyCreate) -> CreatedKey:
    return await gateway.call(
        accounts.create_key,
        gateway.db,
        account_id,
        name=body.name,
        allowed_models=body.allowed_models,
        limits=body.limits(),
        spend_cap_micros=body.spend_cap_micros,
        expires_at=body.expires_at,
    )


# -- the operator API --------------------------------------------------------------------------


def admin_router() -> APIRouter:
    """Routes under /admin; every one needs an admin-role key."""
    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])

    @router.get("/accounts")
    async def list_accounts(gw: GatewayDep) -> Page[AccountInfo]:
        return Page(data=await gw.call(accounts.list_accounts, gw.db))

    @router.post("/accounts", status_code=201)
    async def create_account(gw: GatewayDep, body: AccountCreate) -> AccountInfo:
        password_hash = hash_password(body.password) if body.password else None
        account = await gw.call(
            accounts.create_account,
            gw.db,
            body.name,
            email=body.email,
            role=body.role,
            password_hash=password_hash,
        )
        if body.credit_micros:
            await gw.call(
                accounts.add_credit, gw.db, account.id, body.credit_micros, note="initial credit"
            )
            account = await gw.call(accounts.find_account, gw.db, account.id)
        return account

    @router.get("/accounts/{account}")
    async def get_account(gw: GatewayDep, account: str) -> AccountInfo:
        return await gw.call(accounts.find_account, gw.db, account)

    @router.post("/accounts/{account}/disable")
    async def disable_account(gw: GatewayDep, account: str) -> AccountInfo:
        found = await gw.call(accounts.find_account, gw.db, account)
        return await gw.call(accounts.set_account_disabled, gw.db, found.id, True)

    @router.post("/accounts/{account}/enable")
    async def enable_account(gw: GatewayDep, account: str) -> AccountInfo:
        found = await gw.call(accounts.find_account, gw.db, account)
        return await gw.call(accounts.set_account_disabled, gw.db, found.id, False)

    @router.put("/accounts/{account}/password")
    async def set_account_password(gw: GatewayDep, account: str, body: PasswordSet) -> AccountInfo:
        """Set the account's console password; its console sessions end."""
        found = await gw.call(accounts.find_account, gw.db, account)
        await gw.call(set_password, gw.db, found.id, body.password)
        await gw.call(end_account_sessions, gw.db, found.id)
        return await gw.call(accounts.find_account, gw.db, found.id)

    @router.post("/accounts/{account}/credit", status_code=201)
    async def add_credit(gw: GatewayDep, account: str, body: CreditAdd) -> LedgerEntry:
        found = await gw.call(accounts.find_account, gw.db, account)
        return await gw.call(
            accounts.add_credit,
            gw.db,
            found.id,
            body.amount_micros,
            note=body.note,
            kind=body.kind,
        )

    @router.get("/accounts/{account}/ledger")
    async def ledger(gw: GatewayDep, account: str) -> Page[LedgerEntry]:
        found = await gw.call(accounts.find_account, gw.db, account)
        return Page(data=await gw.call(accounts.list_ledger, gw.db, found.id))

    @router.get("/accounts/{account}/audit")
    async def audit(gw: GatewayDep, account: str) -> dict[str, int | bool | str]:
        found = await gw.call(accounts.find_account, gw.db, account)
        result = await gw.call(usage_audit, gw.db, found.id)
        return {**vars(result), "consistent": result.consistent}

    @router.post("/accounts/{account}/keys", status_code=201)
    async def create_key(gw: GatewayDep, account: str, body: KeyCreate) -> CreatedKey:
        found = await gw.call(accounts.find_account, gw.db, account)
        return await create_key_for(gw, found.id, body)

    @router.get("/keys")
    async def list_keys(gw: GatewayDep, account: str | None = None) -> Page[KeyInfo]:
        account_id = None
        if account is not None:
            account_id = (await gw.call(accounts.find_account, gw.db, account)).id
        return Page(data=await gw.call(accounts.list_keys, gw.db, account_id))

    @router.get("/keys/{key_id}")
    async def get_key(gw: GatewayDep, key_id: str) -> KeyInfo:
        return await gw.call(accounts.get_key, gw.db, key_id)

    @router.post("/keys/{key_id}/revoke")
    async def revoke_key(gw: GatewayDep, key_id: str) -> KeyInfo:
        return await gw.call(accounts.revoke_key, gw.db, key_id)

    @router.get("/prices")
    async def list_prices(gw: GatewayDep) -> Page[PriceInfo]:
        return Page(data=await gw.call(accounts.list_prices, gw.db))

    @router.put("/prices/{model:path}")
    async def set_price(gw: GatewayDep, model: str, body: PriceSet) -> PriceInfo:
        return await gw.call(
            accounts.set_price,
            gw.db,
            model,
            body.input_micros_per_mtok,
            body.output_micros_per_mtok,
        )

    @router.delete("/prices/{model:path}")
    async def delete_price(gw: GatewayDep, model: str) -> Deleted:
        await gw.call(accounts.delete_price, gw.db, model)
        return Deleted(id=model)

    @router.get("/usage")
    async def usage(
        gw: GatewayDep, query: UsageQueryDep, account: str | None = None
    ) -> Page[UsageGroup]:
        f = await _admin_filter(gw, query, account)
        return Page(data=await gw.call(usage_totals, gw.db, f, query.group_by))

    @router.get("/usage/requests")
    async def usage_requests(
        gw: GatewayDep,
        query: UsageQueryDep,
        account: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Offset = 0,
    ) -> Page[UsageRecord]:
        f = await _admin_filter(gw, query, account)
        return Page(data=await gw.call(list_usage, gw.db, f, limit=limit, offset=offset))

    return router


async def _admin_filter(gw: DatabaseGateway, query: UsageQuery, account: str | None) -> UsageFilter:
    account_id = None
    if account is not None:
        account_id = (await gw.call(accounts.find_account, gw.db, account)).id
    return UsageFilter(account_id, query.key_id, query.model, query.since, query.until)
