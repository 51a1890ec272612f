"""The operator API (/admin) and the account API (/v1/dashboard) on a small app that mounts
the routers with the server's error handlers: admin routes refuse user keys, an account
cannot see or touch another's keys or usage, and every error has OpenAI's shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from gateway_helpers import bearer, new_account, new_key

from inferhub.gateway import accounts
from inferhub.gateway.gateway import DatabaseGateway
from inferhub.gateway.static import StaticKeys
from inferhub.server.admin import admin_router
from inferhub.server.dashboard import dashboard_router
from inferhub.server.errors import install_error_handlers

pytestmark = pytest.mark.anyio


def make_app(gatekeeper: object) -> FastAPI:
    app = FastAPI()
    app.state.gateway = gatekeeper
    install_error_handlers(app)
    app.include_router(admin_router())
    app.include_router(dashboard_router())
    return app


@pytest.fixture
async def client(gw: DatabaseGateway) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(gw))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": bearer(secret)}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    return dict(error)


async def test_admin_routes_refuse_user_keys_and_missing_keys(
    gw: DatabaseGateway, client: httpx.AsyncClient
) -> None:
    user = new_key(gw, new_account(gw))
    for method, path in (
        ("GET", "/admin/accounts"),
        ("POST", "/admin/accounts"),
        ("GET", "/admin/keys"),
        ("PUT", "/admin/prices/m"),
        ("GET", "/admin/usage"),
    ):
        assert_error(await client.request(method, path, headers=auth(user)), 403, "admin_required")
        assert_error(await client.request(method, path), 401, "invalid_api_key")


async def test_operator_workflow(gw: DatabaseGateway, client: httpx.AsyncClient) -> None:
    admin = auth(new_key(gw, new_account(gw, role="admin")))
    created = await client.post(
        "/admin/accounts",
        headers=admin,
        json={"name": "acme", "email": "ops@acme.test", "credit_micros": 5_000_000},
    )
    assert created.status_code == 201, created.text
    account = created.json()
    assert (account["balance_micros"], account["role"]) == (5_000_000, "user")
    assert "password_hash" not in account

    top_up = await client.post(
        "/admin/accounts/acme/credit",
        headers=admin,
        json={"amount_micros": 1_000_000, "note": "PO 42"},
    )
    assert top_up.status_code == 201 and top_up.json()["balance_micros"] == 6_000_000
    ledger = (await client.get("/admin/accounts/acme/ledger", headers=admin)).json()
    assert [e["amount_micros"] for e in ledger["data"]] == [5_000_000, 1_000_000]

    key = await client.post(
        f"/admin/accounts/{account['id']}/keys",
        headers=admin,
        json={"name": "prod", "allowed_models": ["m"], "rpm_limit": 60},
    )
    assert key.status_code == 201
    secret, key_id = key.json()["secret"], key.json()["key"]["id"]
    assert secret.startswith("sk-") and key.json()["key"]["limits"]["rpm"] == 60
    listed = (await client.get("/admin/keys", params={"account": "acme"}, headers=admin)).json()
    assert [k["id"] for k in listed["data"]] == [key_id] and secret not in str(listed)

    price = await client.put(
        "/admin/prices/Qwen/Qwen2-0.5B-Instruct",
        headers=admin,
        json={"input_micros_per_mtok": 100_000, "output_micros_per_mtok": 300_000},
    )
    assert price.status_code == 200 and price.json()["model"] == "Qwen/Qwen2-0.5B-Instruct"
    models = [p["model"] for p in (await client.get("/admin/prices", headers=admin)).json()["data"]]
    assert "Qwen/Qwen2-0.5B-Instruct" in models and "*" in models

    p = await gw.authenticate(bearer(secret))
    a = await gw.admit(p, request_id="req-1", model="m", prompt_tokens=3, max_completion_tokens=4)
    await gw.settle(
        a, prompt_tokens=3, completion_tokens=4, end_state="completed", finish_reasons=["stop"]
    )
    totals = (
        await client.get(
            "/admin/usage", params={"account": "acme", "group_by": "model"}, headers=admin
        )
    ).json()
    assert totals["data"] == [
        {
            "group": "m",
            "requests": 1,
            "prompt_tokens": 3,
            "completion_tokens": 4,
            "total_tokens": 7,
            "cost_micros": 0,
        }
    ]
    rows = (
        await client.get("/admin/usage/requests", params={"key_id": key_id}, headers=admin)
    ).json()
    assert [r["request_id"] for r in rows["data"]] == ["req-1"]
    audit = (await client.get("/admin/accounts/acme/audit", headers=admin)).json()
    assert audit["consistent"] is True

    revoked = await client.post(f"/admin/keys/{key_id}/revoke", headers=admin)
    assert revoked.json()["revoked"] is True
    disabled = await client.post("/admin/accounts/acme/disable", headers=admin)
    assert disabled.json()["disabled"] is True

    assert_error(await client.get("/admin/accounts/nobody", headers=admin), 404, "not_found")
    assert_error(
        await client.post("/admin/accounts", headers=admin, json={"name": "acme"}), 409, "conflict"
    )
    bad = assert_error(await client.post("/admin/accounts", headers=admin, json={"nam": "x"}), 400)
    assert bad["type"] == "invalid_request_error"


async def test_accounts_cannot_touch_each_others_keys_or_usage(
    gw: DatabaseGateway, client: httpx.AsyncClient
) -> None:
    alice, bob = (
        new_account(gw, credit=1_000, name="alice"),
        new_account(gw, credit=1_000, name="bob"),
    )
    alice_key, bob_key = new_key(gw, alice), new_key(gw, bob)
    bob_key_id = accounts.list_keys(gw.db, bob.id)[0].id
    for secret, rid in ((alice_key, "alice-1"), (bob_key, "bob-1")):
        p = await gw.authenticate(bearer(secret))
        a = await gw.admit(p, request_id=rid, model="m", prompt_tokens=2, max_completion_tokens=2)
        await gw.settle(
            a, prompt_tokens=2, completion_tokens=2, end_state="completed", finish_reasons=["stop"]
        )

    me = (await client.get("/v1/dashboard/account", headers=auth(alice_key))).json()
    assert me["id"] == alice.id
    units = (await client.get("/v1/dashboard/currency", headers=auth(alice_key))).json()
    assert units == {"currency": "USD", "micros_per_unit": 1_000_000}
    keys = (await client.get("/v1/dashboard/keys", headers=auth(alice_key))).json()["data"]
    assert [k["account_id"] for k in keys] == [alice.id]
    assert_error(await client.get(f"/v1/dashboard/keys/{bob_key_id}", headers=auth(alice_key)), 404)
    assert_error(
        await client.post(f"/v1/dashboard/keys/{bob_key_id}/revoke", headers=auth(alice_key)), 404
    )
    assert not accounts.get_key(gw.db, bob_key_id).revoked
    await gw.authenticate(bearer(bob_key))  # still valid

    rows = (await client.get("/v1/dashboard/usage/requests", headers=auth(alice_key))).json()[
        "data"
    ]
    assert [r["request_id"] for r in rows] == ["alice-1"]
    spy = await client.get(
        "/v1/dashboard/usage/requests", params={"key_id": bob_key_id}, headers=auth(alice_key)
    )
    assert spy.json()["data"] == []
    totals = (await client.get("/v1/dashboard/usage", headers=auth(alice_key))).json()["data"]
    assert [t["requests"] for t in totals] == [1]

    new = await client.post("/v1/dashboard/keys", headers=auth(alice_key), json={"name": "laptop"})
    assert new.status_code == 201 and new.json()["key"]["account_id"] == alice.id
    new_id = new.json()["key"]["id"]
    assert (
        await client.post(f"/v1/dashboard/keys/{new_id}/revoke", headers=auth(alice_key))
    ).json()["revoked"]
    assert_error(
        await client.get("/admin/accounts", headers=auth(alice_key)), 403, "admin_required"
    )


async def test_restricted_key_cannot_mint_a_broader_key(
    gw: DatabaseGateway, client: httpx.AsyncClient
) -> None:
    from inferhub.gateway.records import KeyLimits

    secret = new_key(gw, new_account(gw), allowed_models=["a"], limits=KeyLimits(rpm=10))
    for body in (
        {},
        {"allowed_models": ["a", "b"], "rpm_limit": 10},
        {"allowed_models": ["a"], "rpm_limit": 11},
    ):
        assert_error(
            await client.post("/v1/dashboard/keys", headers=auth(secret), json=body),
            403,
            "key_not_within_caller",
        )
    ok = await client.post(
        "/v1/dashboard/keys", headers=auth(secret), json={"allowed_models": ["a"], "rpm_limit": 5}
    )
    assert ok.status_code == 201


async def test_static_key_server_has_no_account_api() -> None:
    transport = httpx.ASGITransport(app=make_app(StaticKeys(["sk-static-key-123456"])))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        response = await c.get("/v1/dashboard/keys", headers=auth("sk-static-key-123456"))
    assert_error(response, 404, "not_available")
