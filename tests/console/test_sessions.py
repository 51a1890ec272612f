"""The console's session API on the real app and a real database (SQLite and PostgreSQL):
log-in, the cookie's flags, CSRF, the log-in limiter, log-out, the playground key, and that a
session reaches its own account's keys and usage only, exactly as a key does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from console_helpers import ADMIN_KEY, LOGIN_HEADERS

from inferhub.gateway import accounts, auth, sessions
from inferhub.gateway.gateway import DatabaseGateway
from inferhub.gateway.interface import GatewayError

pytestmark = pytest.mark.anyio
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def new_user(gw: DatabaseGateway, name: str, *, credit: int = 1_000_000) -> str:
    account = accounts.create_account(gw.db, name, email=f"{name}@example.test")
    auth.set_password(gw.db, account.id, f"{name}-password")
    if credit:
        accounts.add_credit(gw.db, account.id, credit)
    return account.id


@pytest.fixture
async def client(transport: httpx.ASGITransport) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def login(c: httpx.AsyncClient, name: str, password: str | None = None) -> dict[str, Any]:
    r = await c.post(
        "/console/api/login",
        json={"login": f"{name}@example.test", "password": password or f"{name}-password"},
        headers=LOGIN_HEADERS,
    )
    assert r.status_code == 200, r.text
    info: dict[str, Any] = r.json()
    c.headers["X-CSRF-Token"] = info["csrf_token"]
    return info


def error_code(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    return str(r.json()["error"]["code"])


async def test_login_sets_a_strict_httponly_cookie_and_answers_who_i_am(
    gw: DatabaseGateway, client: httpx.AsyncClient
) -> None:
    new_user(gw, "alice")
    r = await client.post(
        "/console/api/login",
        json={"login": "alice@example.test", "password": "alice-password"},
        headers=LOGIN_HEADERS,
    )
    assert r.status_code == 200, r.text
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("inferhub_session=")
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= flags
    assert "secure" not in flags  # plain http: a Secure cookie would never come back
    assert r.headers["cache-control"] == "no-store"
    info = r.json()
    assert info["account"]["name"] == "alice" and info["currency"] == "USD"
    assert len(info["csrf_token"]) >= 32 and info["csrf_token"] not in cookie
    me = await client.get("/console/api/session")
    assert me.status_code == 200 and me.json()["csrf_token"] == info["csrf_token"]
    # Also by account name, and over https the cookie is Secure.
    transport = client._transport
    async with httpx.AsyncClient(transport=transport, base_url="https://test") as tls:
        r = await tls.post(
            "/console/api/login",
            json={"login": "alice", "password": "alice-password"},
            headers=LOGIN_HEADERS,
        )
        assert r.status_code == 200 and "secure" in r.headers["set-cookie"].lower()


async def test_login_refusals(gw: DatabaseGateway, client: httpx.AsyncClient) -> None:
    new_user(gw, "alice")
    body = {"login": "alice@example.test", "password": "alice-password"}
    # Without the console's header (what a cross-site form would send): refused.
    assert error_code(await client.post("/console/api/login", json=body), 403) == "csrf_failed"
    wrong = {**body, "password": "not-it"}
    r = await client.post("/console/api/login", json=wrong, headers=LOGIN_HEADERS)
    assert error_code(r, 401) == "invalid_credentials" and "set-cookie" not in r.headers
    unknown = {"login": "nobody@example.test", "password": "whatever1"}
    r = await client.post("/console/api/login", json=unknown, headers=LOGIN_HEADERS)
    assert error_code(r, 401) == "invalid_credentials"
    assert error_code(await client.get("/console/api/session"), 401) == "invalid_session"


async def test_login_attempts_are_rate_limited(
    gw: DatabaseGateway, client: httpx.AsyncClient
) -> None:
    new_user(gw, "alice")
    wrong = {"login": "alice@example.test", "password": "not-it"}
    for _ in range(5):
        r = await client.post("/console/api/login", json=wrong, headers=LOGIN_HEADERS)
        assert r.status_code == 401
    right = {**wrong, "password": "alice-password"}
    r = await client.post("/console/api/login", json=right, headers=LOGIN_HEADERS)
    assert error_code(r, 429) == "rate_limit_exceeded"  # even the right password, for now
    assert int(r.headers["retry-after"]) > 0


async def test_session_calls_the_account_api_and_state_changes_need_the_csrf_token(
    gw: DatabaseGateway, client: httpx.AsyncClient
) -> None:
    new_user(gw, "alice")
    info = await login(client, "alice")
    assert (await client.get("/v1/dashboard/account")).json()["name"] == "alice"
    token = client.headers.pop("X-CSRF-Token")
    body = {"name": "ci"}
    r = await client.post("/v1/dashboard/keys", json=body)
    assert error_code(r, 403) == "csrf_failed"
    r = await client.post("/v1/dashboard/keys", json=body, headers={"X-CSRF-Token": "x" + token})
    assert error_code(r, 403) == "csrf_failed"
    r = await client.post("/v1/dashboard/keys", json=body, headers={"X-CSRF-Token": token})
    assert r.status_code == 201, r.text
    secret = r.json()["secret"]
    # The new key works as a bearer key and, sent with it, the key wins over the cookie.
    me = await client.get("/v1/dashboard/keys", headers={"Authorization": f"Bearer {secret}"})
    assert me.status_code == 200 and len(me.json()["data"]) == 1
    assert info["account"]["id"] == r.json()["key"]["account_id"]
    # A user session is not an operator.
    r = await client.get("/admin/accounts")
    assert error_code(r, 403) == "admin_required"


async def test_a_session_never_reaches_another_accounts_keys_or_usage(
    gw: DatabaseGateway, client: httpx.AsyncClient
) -> None:
    new_user(gw, "alice")
    bob_id = new_user(gw, "bob")
    bob_key = accounts.create_key(gw.db, bob_id, name="bob's")
    principal = await gw.authenticate(f"Bearer {bob_key.secret}")
    admission = await gw.admit(
        principal, request_id="req-bob", model="m", prompt_tokens=3, max_completion_tokens=4
    )
    await gw.settle(
        admission, prompt_tokens=3, completion_tokens=4, end_state="completed", finish_reasons=[]
    )
    await login(client, "alice")
    key_id = bob_key.key.id
    assert (await client.get("/v1/dashboard/keys")).json()["data"] == []
    assert error_code(await client.get(f"/v1/dashboard/keys/{key_id}"), 404) == "not_found"
    r = await client.post(f"/v1/dashboard/keys/{key_id}/revoke")
    assert error_code(r, 404) == "not_found"
    assert not accounts.get_key(gw.db, key_id).revoked
    assert (await client.get("/v1/dashboard/usage/requests")).json()["data"] == []
    r = await client.get("/v1/dashboard/usage/requests", params={"key_id": key_id})
    assert r.json()["data"] == []
    assert (await client.get("/v1/dashboard/usage", params={"key_id": key_id})).json()["data"] == []
    for method, path in (
        ("GET", "/admin/usage/requests"),
        ("GET", f"/admin/keys?account={bob_id}"),
        ("POST", f"/admin/keys/{key_id}/revoke"),
        ("POST", f"/admin/accounts/{bob_id}/credit"),
    ):
        r = await client.request(method, path, json={"amount_micros": 1})
        assert error_code(r, 403) == "admin_required", path
    # Bob's own session sees his.
    async with httpx.AsyncClient(transport=client._transport, base_url="http://test") as bob:
        await login(bob, "bob")
        rows = (await bob.get("/v1/dashboard/usage/requests")).json()["data"]
        assert [r["request_id"] for r in rows] == ["req-bob"]


async def test_logout_ends_the_session_and_revokes_its_playground_key(
    gw: DatabaseGateway, client: httpx.AsyncClient
) -> None:
    new_user(gw, "alice")
    await login(client, "alice")
    r = await client.post("/console/api/playground-key")
    assert r.status_code == 201, r.text
    created = r.json()
    expires = datetime.fromisoformat(created["key"]["expires_at"])
    assert timedelta(minutes=55) < expires - datetime.now(UTC) <= timedelta(hours=1)
    p = await gw.authenticate(f"Bearer {created['secret']}")
    assert p.account_id == created["key"]["account_id"]
    # A second one replaces the first.
    second = (await client.post("/console/api/playground-key")).json()
    with pytest.raises(GatewayError):
        await gw.authenticate(f"Bearer {created['secret']}")
    # Log-out needs the CSRF token too: another site cannot log you out.
    token = client.headers.pop("X-CSRF-Token")
    cookie = client.cookies["inferhub_session"]
    assert error_code(await client.post("/console/api/logout"), 403) == "csrf_failed"
    r = await client.post("/console/api/logout", headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and 'inferhub_session=""' in r.headers["set-cookie"]
    with pytest.raises(GatewayError):
        await gw.authenticate(f"Bearer {second['secret']}")
    # The browser drops the cookie; one kept elsewhere no longer opens anything.
    assert "inferhub_session" not in client.cookies
    client.cookies.set("inferhub_session", cookie)
    assert error_code(await client.get("/v1/dashboard/account"), 401) == "invalid_session"


async def test_sessions_end_with_the_account_and_the_password(
    gw: DatabaseGateway, client: httpx.AsyncClient
) -> None:
    alice = new_user(gw, "alice")
    await login(client, "alice")
    accounts.set_account_disabled(gw.db, alice, True)
    assert error_code(await client.get("/console/api/session"), 401) == "invalid_session"
    accounts.set_account_disabled(gw.db, alice, False)
    await login(client, "alice")
    # An operator sets a new password: the account's sessions end.
    r = await client.put(
        "/admin/accounts/alice/password", json={"password": "brand-new-pass"}, headers=ADMIN
    )
    assert r.status_code == 200 and r.json()["has_password"] is True
    assert error_code(await client.get("/console/api/session"), 401) == "invalid_session"
    await login(client, "alice", "brand-new-pass")
    # Changing one's own password needs the current one and keeps this session only.
    async with httpx.AsyncClient(transport=client._transport, base_url="http://test") as other:
        await login(other, "alice", "brand-new-pass")
        bad = {"current_password": "wrong", "new_password": "another-pass-1"}
        r = await client.post("/console/api/password", json=bad)
        assert error_code(r, 400) == "invalid_credentials"
        good = {"current_password": "brand-new-pass", "new_password": "another-pass-1"}
        assert (await client.post("/console/api/password", json=good)).status_code == 200
        assert (await client.get("/console/api/session")).status_code == 200
        assert error_code(await other.get("/console/api/session"), 401) == "invalid_session"


async def test_expired_and_idle_sessions_are_refused(gw: DatabaseGateway) -> None:
    alice = new_user(gw, "alice")
    short = sessions.create_session(gw.db, alice, max_age=timedelta(seconds=-1))
    assert sessions.find_session(gw.db, short.token) is None
    live = sessions.create_session(gw.db, alice)
    assert sessions.find_session(gw.db, live.token) is not None
    assert sessions.find_session(gw.db, live.token, idle_timeout=timedelta(0)) is None
    assert sessions.find_session(gw.db, "not-a-token") is None


async def test_session_tokens_are_stored_only_as_hashes(
    gw: DatabaseGateway, client: httpx.AsyncClient, database_url: str | None, tmp_path: Path
) -> None:
    if database_url is not None:
        pytest.skip("reads the SQLite file")
    new_user(gw, "alice")
    await login(client, "alice")
    token = client.cookies["inferhub_session"]
    stored = b"".join(p.read_bytes() for p in (tmp_path / "data").iterdir() if p.is_file())
    assert token.encode() not in stored
    assert sessions.session_id(token).encode() in stored


async def test_console_files_are_served_with_a_strict_policy(client: httpx.AsyncClient) -> None:
    page = await client.get("/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for src in ('src="/console/static/js/app.js"', 'href="/console/static/console.css"'):
        assert src in page.text
    js = await client.get("/console/static/js/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    again = await client.get(
        "/console/static/js/app.js", headers={"If-None-Match": js.headers["etag"]}
    )
    assert again.status_code == 304
    for path in ("/console/static/nope.js", "/console/static/../routes.py", "/console/static/"):
        assert (await client.get(path)).status_code == 404, path
    # Nothing the page loads comes from another origin.
    for asset in ("js/app.js", "console.css", "js/api.js", "js/pages/usage.js"):
        text = (await client.get(f"/console/static/{asset}")).text
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text
