"""Security on the real app (every router, the console included) over a real database (SQLite
and PostgreSQL). The routes are enumerated from the app itself, so a route added later is
covered without editing this file:

- every /admin route refuses user keys, user console sessions, missing, malformed, near-miss,
  revoked and expired keys, and a session without its CSRF token; nothing changes;
- every route that takes an id answers another account's id with 404, exactly as an id that
  does not exist, and changes nothing; listings show the caller's own rows only;
- SQL injection in every query filter and every path id is inert: 400/404/empty, never 500,
  never another account's rows, and every table is still there, unchanged;
- keys, session tokens and CSRF tokens are found by hash and compared in constant time;
- no key, password, session or CSRF token reaches the logs, an error body or /metrics;
- the admin key rotates as the README says.
"""

from __future__ import annotations

import ast
import base64
import hmac
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from gateway_helpers import bearer, settings

import inferhub
from inferhub.config import ServerConfig
from inferhub.gateway import accounts, auth, keys, sessions
from inferhub.gateway.cli import main as gateway_cli
from inferhub.gateway.factory import ADMIN_ACCOUNT, bootstrap, create_gateway
from inferhub.gateway.gateway import DatabaseGateway
from inferhub.gateway.interface import GatewayError
from inferhub.gateway.records import AccountInfo
from inferhub.gateway.schema import metadata
from inferhub.server.app import create_app
from inferhub.server.console.sessions import COOKIE

pytestmark = pytest.mark.anyio

MODEL = "m-sec"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
LOGIN = ("POST", "/console/api/login")
LOGIN_HEADERS = {"X-Requested-With": "inferhub-console"}
# Routes whose path parameter names something public, not an account's row.
PUBLIC_ROUTES = {"/v1/models/{model_id}", "/console/static/{name}"}
# Valid bodies, so that a route that let a refused caller through would succeed.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/admin/accounts"): {"name": "made-by-intruder"},
    ("PUT", "/admin/accounts/{account}/password"): {"password": "taken-over-password"},
    ("POST", "/admin/accounts/{account}/credit"): {"amount_micros": 999_000_000},
    ("POST", "/admin/accounts/{account}/keys"): {"name": "backdoor"},
    ("PUT", "/admin/prices/{model}"): {"input_micros_per_mtok": 0, "output_micros_per_mtok": 0},
    ("POST", "/v1/dashboard/keys"): {"name": "backdoor"},
}


def body_for(route: Route, caller: Party | None = None) -> dict[str, Any]:
    """A valid body for the route (for the caller, where it must hold their password)."""
    if (route.method, route.path) == ("POST", "/console/api/password") and caller is not None:
        return {"current_password": caller.password, "new_password": "changed-by-" + caller.email}
    return BODIES.get((route.method, route.path), {})


INJECTIONS = [
    "' OR 1=1 --",
    "' OR '1'='1",
    "x' OR 'x'='x'; --",
    '"; DROP TABLE accounts; --',
    "'; DROP TABLE api_keys; --",
    "1; DELETE FROM usage",
    "' UNION SELECT key_hash, id, prefix FROM api_keys --",
    "\u2019 OR 1=1 --",  # right single quotation mark
    "\uff07 OR \uff071\uff07=\uff071",  # fullwidth apostrophes
    "\u02bc; DROP TABLE ledger; --",  # modifier letter apostrophe
    "\\' OR 1=1 --",
    "%",
    "_",
    "*",
    "a\x00' OR 1=1 --",  # NUL byte
    "x" * 5000,
]


# -- the app, its routes and the parties -------------------------------------------------------


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # the template, e.g. /admin/keys/{key_id}
    params: tuple[str, ...]  # path parameters
    query: tuple[str, ...]  # query parameters (from the OpenAPI schema)
    has_body: bool

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def app_routes(app: FastAPI) -> list[Route]:
    """Every (method, route) the app answers, with included routers flattened."""
    try:
        from fastapi.routing import iter_route_contexts

        found: list[Any] = list(iter_route_contexts(app.routes))
    except ImportError:  # FastAPI before lazy included routers: app.routes is flat
        found = list(app.routes)
    spec = app.openapi()["paths"]
    out = []
    for route in found:
        template = getattr(route, "path_format", None)
        if template is None:
            continue
        for method in sorted(getattr(route, "methods", None) or ()):
            if method == "HEAD":
                continue
            op = spec.get(template, {}).get(method.lower(), {})
            query = tuple(p["name"] for p in op.get("parameters", []) if p["in"] == "query")
            params = tuple(route.param_convertors)
            out.append(Route(method, template, params, query, bool(op.get("requestBody"))))
    assert out, "no routes found"
    return out


def fill(route: Route, ids: dict[str, str]) -> str:
    missing = [p for p in route.params if p not in ids]
    assert not missing, f"{route}: teach this test what id to put in {missing}"
    return route.path.format(**{p: quote(ids[p], safe="") for p in route.params})


@dataclass
class Party:
    account: AccountInfo
    email: str
    password: str
    secret: str
    key_id: str
    request_id: str
    token: str = ""  # the console session's cookie
    csrf: str = ""

    def key(self) -> dict[str, str]:
        return {"Authorization": bearer(self.secret)}

    def session(self, csrf: str | None = None) -> dict[str, str]:
        headers = {"Cookie": f"{COOKIE}={self.token}"}
        token = self.csrf if csrf is None else csrf
        if token:
            headers["X-CSRF-Token"] = token
        return headers

    def ids(self) -> dict[str, str]:
        return {
            "account": self.account.id,
            "account_id": self.account.id,
            "key_id": self.key_id,
            "request_id": self.request_id,
            "model": MODEL,
        }

    def marks(self) -> list[str]:
        """What would give away this account's rows in an answer to someone else."""
        return [self.account.id, self.email, self.key_id, self.request_id, self.secret[:11]]


@dataclass
class World:
    gw: DatabaseGateway
    app: FastAPI
    client: httpx.AsyncClient
    root: Party  # an admin
    alice: Party
    bob: Party

    async def send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        self.client.cookies.clear()  # only the cookie a test sends, never one kept from before
        return await self.client.request(method, url, headers=headers, json=json, params=params)


async def settled_request(gw: DatabaseGateway, secret: str, request_id: str) -> None:
    principal = await gw.authenticate(bearer(secret))
    admission = await gw.admit(
        principal, request_id=request_id, model=MODEL, prompt_tokens=3, max_completion_tokens=4
    )
    await gw.settle(
        admission, prompt_tokens=3, completion_tokens=4, end_state="completed", finish_reasons=[]
    )


async def login(transport: httpx.AsyncBaseTransport, login: str, password: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await c.post(
            "/console/api/login",
            json={"login": login, "password": password},
            headers=LOGIN_HEADERS,
        )


@pytest.fixture
async def world(gw: DatabaseGateway) -> AsyncIterator[World]:
    app = create_app(ServerConfig(), {}, gw)
    transport = httpx.ASGITransport(app=app)
    accounts.set_price(gw.db, MODEL, 1_000_000, 2_000_000)
    parties = []
    for name, role in (("root", "admin"), ("alice", "user"), ("bob", "user")):
        email = f"{name}@example.test"
        account = accounts.create_account(gw.db, name, email=email, role=role)
        password = f"{name}-pw-{secrets.token_hex(8)}"
        auth.set_password(gw.db, account.id, password)
        accounts.add_credit(gw.db, account.id, 5_000_000, note="seed")
        created = accounts.create_key(gw.db, account.id, name=f"{name}'s key")
        await settled_request(gw, created.secret, f"req-{name}")
        party = Party(account, email, password, created.secret, created.key.id, f"req-{name}")
        r = await login(transport, email, password)
        assert r.status_code == 200, r.text
        party.token, party.csrf = r.cookies[COOKIE], r.json()["csrf_token"]
        parties.append(party)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield World(gw, app, client, *parties)


VOLATILE = {"last_seen_at", "heartbeat_at"}


def snapshot(gw: DatabaseGateway, *, skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Every row of every table (but clocks that tick on their own), as text."""
    with gw.db.read() as conn:
        return {
            table.name: sorted(
                repr([v for k, v in row._mapping.items() if k not in VOLATILE])
                for row in conn.execute(sa.select(table))
            )
            for table in metadata.sorted_tables
            if table.name not in skip
        }


def altered(token: str) -> str:
    """The token with its first character changed (never the token itself: a fixed "x" would
    be the same token whenever the random one starts with "x")."""
    return ("y" if token[0] == "x" else "x") + token[1:]


def error(r: httpx.Response) -> tuple[int, str | None]:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, r.text
    return r.status_code, body["error"]["code"]


# -- admin routes ------------------------------------------------------------------------------


async def test_every_admin_route_refuses_all_but_an_admin(world: World) -> None:
    w, gw, root = world, world.gw, world.root
    admin_routes = [r for r in app_routes(w.app) if r.path.startswith("/admin")]
    known = {(r.method, r.path) for r in admin_routes}
    assert {
        ("GET", "/admin/accounts"),
        ("POST", "/admin/accounts/{account}/credit"),
        ("PUT", "/admin/accounts/{account}/password"),
        ("POST", "/admin/keys/{key_id}/revoke"),
        ("PUT", "/admin/prices/{model}"),
        ("GET", "/admin/usage/requests"),
    } <= known and len(known) >= 18
    old = accounts.create_key(gw.db, root.account.id, name="old admin key")
    accounts.revoke_key(gw.db, old.key.id)
    expired = accounts.create_key(
        gw.db, root.account.id, expires_at=datetime.now(UTC) - timedelta(seconds=1)
    )
    last = root.secret[-1]
    near_miss = root.secret[:-1] + ("A" if last != "A" else "B")
    basic = base64.b64encode(f"root:{root.password}".encode()).decode()
    refusals: list[tuple[str, dict[str, str], int, str]] = [
        ("a user's key", w.alice.key(), 403, "admin_required"),
        ("a user's console session", w.alice.session(), 403, "admin_required"),
        ("a user's key beside the admin's session", {**root.session(), **w.alice.key()}, 403,
         "admin_required"),
        ("no credentials", {}, 401, "invalid_api_key"),
        ("an empty bearer", {"Authorization": "Bearer "}, 401, "invalid_api_key"),
        ("basic auth with the admin's password", {"Authorization": f"Basic {basic}"}, 401,
         "invalid_api_key"),
        ("the admin key without a scheme", {"Authorization": root.secret}, 401,
         "invalid_api_key"),
        ("a near miss of the admin key", {"Authorization": bearer(near_miss)}, 401,
         "invalid_api_key"),
        ("the admin key cut short", {"Authorization": bearer(root.secret[:-1])}, 401,
         "invalid_api_key"),
        ("the admin key and more", {"Authorization": bearer(root.secret + "x")}, 401,
         "invalid_api_key"),
        ("the admin key's visible prefix", {"Authorization": bearer(root.secret[:11])}, 401,
         "invalid_api_key"),
        ("the admin key's stored hash", {"Authorization": bearer(keys.hash_key(root.secret))},
         401, "invalid_api_key"),
        ("a revoked admin key", {"Authorization": bearer(old.secret)}, 401, "invalid_api_key"),
        ("an expired admin key", {"Authorization": bearer(expired.secret)}, 401,
         "invalid_api_key"),
        ("a forged session cookie", {"Cookie": f"{COOKIE}={secrets.token_urlsafe(32)}"}, 401,
         "invalid_session"),
        ("the admin session's stored id", {"Cookie": f"{COOKIE}={sessions.session_id(root.token)}",
         "X-CSRF-Token": root.csrf}, 401, "invalid_session"),
    ]  # fmt: skip
    before = snapshot(gw)
    for route in admin_routes:
        url = fill(route, w.bob.ids())
        body = BODIES.get((route.method, route.path), {})
        for what, headers, status, code in refusals:
            r = await w.send(route.method, url, headers, json=body)
            assert error(r) == (status, code), f"{route} with {what}: {r.text}"
    assert snapshot(gw) == before, "a refused request changed the database"

    # The control: the admin's key gets through every one of them (so the refusals above
    # were the authorization's doing, not a wrong URL or body).
    for route in admin_routes:
        url = fill(route, w.bob.ids())
        r = await w.send(route.method, url, root.key(), json=BODIES.get((route.method, route.path)))
        if not route.has_body or (route.method, route.path) in BODIES:
            assert r.status_code < 300, f"{route}: {r.text}"
        else:  # a route added since: it needs a body this test does not know
            assert r.status_code not in (401, 403) and r.status_code < 500, f"{route}: {r.text}"


async def test_every_state_changing_route_needs_the_sessions_csrf_token(world: World) -> None:
    w, root = world, world.root
    changing = [
        r for r in app_routes(w.app) if r.method not in SAFE_METHODS and (r.method, r.path) != LOGIN
    ]
    assert {("POST", "/v1/dashboard/keys"), ("POST", "/console/api/logout")} <= {
        (r.method, r.path) for r in changing
    }
    before = snapshot(w.gw)
    for route in changing:
        url = fill(route, root.ids())
        for what, csrf in (
            ("no token", ""),
            ("a wrong token", altered(root.csrf)),
            ("another session's token", w.alice.csrf),
        ):
            r = await w.send(route.method, url, root.session(csrf), json=body_for(route, root))
            status, code = error(r)
            assert status in (401, 403), f"{route} with {what}: {r.text}"
            if route.path.startswith(("/admin", "/v1/dashboard", "/console/api")):
                assert (status, code) == (403, "csrf_failed"), f"{route} with {what}: {r.text}"
    assert snapshot(w.gw) == before, "a request without the CSRF token changed the database"

    # A log-in has no session yet: it must carry the console's header instead.
    for headers in ({}, {"X-Requested-With": "XMLHttpRequest"}):
        r = await w.send(
            "POST",
            "/console/api/login",
            headers,
            json={"login": root.email, "password": root.password},
        )
        assert error(r) == (403, "csrf_failed") and "set-cookie" not in r.headers
    # The control: the same session with its token does change things.
    r = await w.send("POST", "/v1/dashboard/keys", root.session(), json={"name": "ok"})
    assert r.status_code == 201, r.text
    r = await w.send("POST", "/admin/accounts", root.session(), json={"name": "made-by-root"})
    assert r.status_code == 201, r.text


# -- one account, another account's ids -------------------------------------------------------


async def test_every_route_with_an_id_answers_another_accounts_id_with_404(world: World) -> None:
    w, alice, bob = world, world.alice, world.bob
    id_routes = [
        r
        for r in app_routes(w.app)
        if r.params and not r.path.startswith("/admin") and r.path not in PUBLIC_ROUTES
    ]
    assert {("GET", "/v1/dashboard/keys/{key_id}"), ("POST", "/v1/dashboard/keys/{key_id}/revoke")} <= {
        (r.method, r.path) for r in id_routes
    }  # fmt: skip
    nobody = {
        "account": "acct_0000000000000000",
        "account_id": "acct_0000000000000000",
        "key_id": "key_0000000000000000",
        "request_id": "req-nobody",
        "model": MODEL,
    }
    before = snapshot(w.gw)
    for route in id_routes:
        body = BODIES.get((route.method, route.path), {})
        for who, headers in (("alice's key", alice.key()), ("alice's session", alice.session())):
            r = await w.send(route.method, fill(route, bob.ids()), headers, json=body)
            assert error(r) == (404, "not_found"), f"{route} with {who}: {r.text}"
            assert not [m for m in bob.marks() if m in r.text.replace(bob.key_id, "")], r.text
            # Exactly the answer for an id that does not exist: bob's key is not even hinted.
            missing = await w.send(route.method, fill(route, nobody), headers, json=body)
            assert r.json()["error"] | {"message": ""} == missing.json()["error"] | {"message": ""}
            for p in route.params:
                assert r.json()["error"]["message"].replace(bob.ids()[p], "?") == missing.json()[
                    "error"
                ]["message"].replace(nobody[p], "?")
    assert snapshot(w.gw) == before, "alice changed something of bob's"

    # The control: bob reaches his own rows by the same routes.
    for route in id_routes:
        body = BODIES.get((route.method, route.path), {})
        r = await w.send(route.method, fill(route, bob.ids()), bob.session(), json=body)
        assert r.status_code < 300, f"{route}: {r.text}"


async def test_account_listings_show_only_the_callers_own_rows(world: World) -> None:
    w, alice, bob = world, world.alice, world.bob
    listings = [
        r
        for r in app_routes(w.app)
        if r.method == "GET"
        and not r.params
        and r.path.startswith(("/v1/dashboard", "/console/api"))
    ]
    assert len(listings) >= 6
    # Parameters that name another account are not the caller's to choose.
    smuggled = {"account": bob.account.id, "account_id": bob.account.id, "key_id": bob.key_id}
    for route in listings:
        credentials = [("alice's session", alice.session())]
        if not route.path.startswith("/console/api"):  # the console's own API takes no keys
            credentials.append(("alice's key", alice.key()))
        for who, headers in credentials:
            for params in ({}, smuggled, {"group_by": "account"}, {"group_by": "key"}):
                r = await w.send("GET", route.path, headers, params=params)
                assert r.status_code in (200, 400), f"{route} with {who}: {r.text}"
                leaked = [m for m in bob.marks() if m in r.text]
                assert not leaked, f"{route} {params} with {who} shows bob's {leaked}"
    # The control: the same listings show alice's rows and bob's to bob.
    mine = await w.send("GET", "/v1/dashboard/usage/requests", alice.key())
    assert alice.request_id in mine.text
    theirs = await w.send("GET", "/v1/dashboard/usage/requests", bob.key())
    assert bob.request_id in theirs.text and bob.key_id in theirs.text

    # A body cannot name another account either.
    r = await w.send("POST", "/v1/dashboard/keys", alice.key(), json={"account_id": bob.account.id})
    assert r.status_code == 400, r.text
    assert [k.id for k in accounts.list_keys(w.gw.db, bob.account.id)] == [bob.key_id]


# -- SQL injection -----------------------------------------------------------------------------


async def test_sql_injection_in_every_filter_and_id_is_inert(world: World) -> None:
    w, root, alice, bob = world, world.root, world.alice, world.bob
    api = [r for r in app_routes(w.app) if r.path.startswith(("/admin", "/v1/dashboard"))]
    filtered = [r for r in api if r.method == "GET" and r.query]
    filters = {(r.path, q) for r in filtered for q in r.query}
    assert {
        ("/admin/keys", "account"),
        ("/admin/usage/requests", "key_id"),
        ("/v1/dashboard/usage", "model"),
        ("/v1/dashboard/usage/requests", "since"),
    } <= filters
    before = snapshot(w.gw, skip=("prices",))
    prices_before = {p.model for p in accounts.list_prices(w.gw.db)}

    def caller(route: Route) -> Party:
        return root if route.path.startswith("/admin") else alice

    for route in filtered:
        who = caller(route)
        for name in route.query:
            for payload in [*INJECTIONS, bob.key_id + "' OR '1'='1", bob.account.id + "' --"]:
                r = await w.send("GET", fill(route, who.ids()), who.key(), params={name: payload})
                assert r.status_code in (200, 400, 404), f"{route} ?{name}={payload!r}: {r.text}"
                if r.status_code == 200:
                    assert r.json()["data"] == [], f"{route} ?{name}={payload!r}: {r.text}"
                else:
                    error(r)
                if who is alice:  # (an error may quote what alice sent, no more)
                    text = r.text.replace(json.dumps(payload)[1:-1], "")
                    assert not [m for m in bob.marks() if m in text], r.text

    for route in [r for r in api if r.params]:
        who = caller(route)
        body = BODIES.get((route.method, route.path), {})
        for payload in INJECTIONS:
            url = fill(route, dict.fromkeys(route.params, payload))
            r = await w.send(route.method, url, who.key(), json=body)
            assert r.status_code in (200, 400, 404), f"{route} with {payload!r}: {r.text}"
            if r.status_code != 200:
                error(r)
            elif route.path != "/admin/prices/{model}":
                raise AssertionError(f"{route} accepted the id {payload!r}: {r.text}")

    # Every table is still there, with the same rows; a price may now exist for a model
    # literally named like an injection, since any text may name a model.
    assert snapshot(w.gw, skip=("prices",)) == before
    assert {p.model for p in accounts.list_prices(w.gw.db)} - prices_before <= set(INJECTIONS)
    with w.gw.db.read() as conn:
        for table in metadata.sorted_tables:
            conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
    # ... and the service still works for everyone.
    for party in (root, alice, bob):
        r = await w.send("GET", "/v1/dashboard/usage/requests", party.key())
        assert [row["request_id"] for row in r.json()["data"]] == [party.request_id]


# -- constant-time comparisons -----------------------------------------------------------------


async def test_keys_are_found_by_hash_and_compared_in_constant_time(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, alice = world, world.alice
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    principal = await w.gw.authenticate(bearer(alice.secret))
    assert principal.key_id == alice.key_id
    digest = keys.hash_key(alice.secret).encode()
    assert compared == [(digest, digest)]  # the stored hash against the presented key's
    r = await w.send("GET", "/admin/accounts", w.root.key())  # the admin key: the same path
    assert r.status_code == 200 and len(compared) == 2
    assert compared[1] == (keys.hash_key(w.root.secret).encode(),) * 2

    # The lookup itself is by the hash: a key's text never reaches a query.
    statements: list[str] = []
    real_raw_read = w.gw.db.raw_read

    def recording_raw_read() -> Any:
        context = real_raw_read()

        class Recorder:
            def __enter__(self) -> Any:
                cursor = context.__enter__()

                class Cursor:
                    def __getattr__(self, name: str) -> Any:
                        return getattr(cursor, name)

                    def execute(self, sql: str, params: Any = None) -> Any:
                        statements.append(f"{sql} {params!r}")
                        return cursor.execute(sql, params)

                return Cursor()

            def __exit__(self, *exc: Any) -> Any:
                return context.__exit__(*exc)

        return Recorder()

    monkeypatch.setattr(w.gw.db, "raw_read", recording_raw_read)
    await w.gw.authenticate(bearer(alice.secret))
    assert len(statements) == 1 and "key_hash" in statements[0]
    assert digest.decode() in statements[0] and alice.secret[3:] not in statements[0]

    # The decision is the constant-time comparison's: if it says no, the key is refused.
    monkeypatch.setattr(auth, "hashes_equal", lambda a, b: False)
    with pytest.raises(GatewayError) as info:
        await w.gw.authenticate(bearer(alice.secret))
    assert info.value.status == 401


async def test_session_and_csrf_tokens_are_compared_in_constant_time(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, alice = world, world.alice
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    r = await w.send("POST", "/v1/dashboard/keys", alice.session(), json={"name": "via-session"})
    assert r.status_code == 201, r.text
    sid = sessions.session_id(alice.token).encode()
    assert (sid, sid) in compared  # the session found by its hash, then compared
    assert (alice.csrf.encode(), alice.csrf.encode()) in compared  # and its CSRF token

    monkeypatch.setattr(sessions, "hashes_equal", lambda a, b: False)
    r = await w.send("GET", "/v1/dashboard/account", alice.session())
    assert error(r) == (401, "invalid_session")


def test_no_secret_is_compared_with_eq_in_the_source() -> None:
    """A lint: in the code that handles keys, passwords, sessions and CSRF tokens, no `==` or
    `!=` (or `in`) takes a value named like a secret; SQL expressions (`table.c.col == x`) are
    lookups, not comparisons, and are allowed."""
    root = Path(inferhub.__file__).parent
    files = [
        *sorted((root / "gateway").glob("*.py")),
        *sorted((root / "server" / "console").glob("*.py")),
        root / "server" / "admin.py",
        root / "server" / "dashboard.py",
        root / "server" / "state.py",
    ]
    secret_name = re.compile(r"(secret|digest|key_hash|password|csrf|^token$|_token$|^sid$)")

    def names(node: ast.AST) -> set[str]:
        found = set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                found.add(sub.id)
            elif isinstance(sub, ast.Attribute):
                found.add(sub.attr)
        return found

    def is_sql(node: ast.AST) -> bool:
        return any(isinstance(s, ast.Attribute) and s.attr == "c" for s in ast.walk(node))

    violations = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops):
                continue
            operands = [node.left, *node.comparators]
            if any(is_sql(o) for o in operands):
                continue
            if any(secret_name.search(n) for o in operands for n in names(o)):
                violations.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert violations == []


# -- no secret in logs, error bodies or metrics ------------------------------------------------


async def test_no_secret_in_logs_error_bodies_or_metrics(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    w, root, alice, bob = world, world.root, world.alice, world.bob
    errors: list[str] = []

    async def call(
        method: str, url: str, headers: dict[str, str], *, scan: bool = True, **kw: Any
    ) -> httpx.Response:
        r = await w.send(method, url, headers, **kw)
        if r.status_code >= 400 and scan:
            errors.append(f"{r.status_code} {dict(r.headers)} {r.text}")
        return r

    def near(secret: str) -> list[str]:
        flip = "A" if secret[-1] != "A" else "B"
        return [secret[:-1] + flip, secret[:-1], secret + "0", secret.upper(), " " + secret]

    shown: list[str] = []  # secrets handed out once, which must go nowhere else
    for party in (root, alice, bob):
        await call("GET", "/v1/dashboard/account", party.key())
        await call("GET", "/v1/dashboard/account", party.session())
        for wrong in near(party.secret):
            await call("GET", "/v1/dashboard/keys", {"Authorization": bearer(wrong)})
            await call("GET", "/admin/accounts", {"Authorization": bearer(wrong)})
        await call("GET", "/v1/dashboard/keys", {"Authorization": party.secret})  # no scheme
        await call("GET", "/v1/dashboard/keys", {"Cookie": f"{COOKIE}={altered(party.token)}"})
        await call("POST", "/v1/dashboard/keys", party.session(altered(party.csrf)), json={})
        await call(
            "POST",
            "/console/api/login",
            LOGIN_HEADERS,
            json={"login": party.email, "password": party.password + "!"},
        )
        await call(  # the password typed in the login field
            "POST", "/console/api/login", LOGIN_HEADERS, json={"login": party.password,
                                                               "password": party.password}
        )  # fmt: skip
        await call("POST", "/console/api/login", {}, json={"login": party.email,
                                                           "password": party.password})  # fmt: skip
    # Keys and passwords that are made, changed or set: shown once (or never), then nowhere.
    r = await call("POST", "/v1/dashboard/keys", alice.key(), json={"name": "laptop"})
    shown.append(r.json()["secret"])
    r = await call("POST", f"/admin/accounts/{bob.account.id}/keys", root.key(), json={})
    shown.append(r.json()["secret"])
    r = await call("POST", "/console/api/playground-key", alice.session())
    shown.append(r.json()["secret"])
    new_password = "brand-new-" + secrets.token_hex(8)
    r = await call(
        "POST",
        "/console/api/password",
        alice.session(),
        json={"current_password": alice.password, "new_password": new_password},
    )
    assert r.status_code == 200, r.text
    await call(
        "POST",
        "/console/api/password",
        alice.session(),
        json={"current_password": "wrong-" + new_password, "new_password": "x" * 7},
    )
    set_password = "operator-set-" + secrets.token_hex(8)
    await call("PUT", "/admin/accounts/bob/password", root.key(), json={"password": set_password})
    await call("PUT", "/admin/accounts/bob/password", root.key(), json={"password": "short"})
    made_password = "made-with-" + secrets.token_hex(8)
    await call("POST", "/admin/accounts", root.key(), json={"name": "carol",
                                                             "password": made_password})  # fmt: skip
    await call("POST", "/admin/accounts", root.key(), json={"name": "dave", "password": 12345678})
    # A key pasted where an id belongs: the answer shows no more than its visible prefix.
    for url in (f"/v1/dashboard/keys/{alice.secret}", f"/admin/accounts/{alice.secret}"):
        r = await call("GET", url, root.key() if "admin" in url else alice.key())
        assert error(r) == (404, "not_found") and f"{alice.secret[:11]}..." in r.text
    await call("GET", "/v1/dashboard/usage", alice.key(), params={"since": alice.secret})
    # ... nor in a metrics label, though the HTTP layer may quote a URL back to its sender.
    await call("GET", f"/{alice.secret}", alice.key(), scan=False)
    await call("GET", f"/v1/models/{alice.secret}", alice.key(), scan=False)
    await call("POST", "/v1/chat/completions", {"Authorization": bearer(near(alice.secret)[0])},
               json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip

    metrics = (await w.send("GET", "/metrics", {})).text
    assert "inferhub_http_requests" in metrics or "_total" in metrics
    secrets_used = [
        *(s for p in (root, alice, bob) for s in (p.secret, *near(p.secret))),
        *(p.password for p in (root, alice, bob)),
        *(p.token for p in (root, alice, bob)),
        *(p.csrf for p in (root, alice, bob)),
        *shown,
        new_password,
        set_password,
        made_password,
    ]
    server_log = "\n".join(
        f"{rec.name} {rec.getMessage()} {rec.exc_text or ''}"
        for rec in caplog.records
        if not rec.name.startswith(("httpx", "httpcore"))  # the test's client, not the server
    )
    places = {"the log": server_log, "an error body": "\n".join(errors), "/metrics": metrics}
    assert len(errors) > 40 and "invalid_api_key" in places["an error body"]
    for where, text in places.items():
        for secret in secrets_used:
            core = secret.strip().removeprefix("sk-").removeprefix("SK-")
            for piece in (core, core[8:24]):  # not whole, not the part after the visible prefix
                assert piece not in text, f"a secret ({secret[:6]}...) is in {where}"


# -- rotating the admin key --------------------------------------------------------------------


def _cli(database_url: str | None, data_dir: Path, *args: str) -> list[str]:
    where = ["--database-url", database_url] if database_url else ["--data-dir", str(data_dir)]
    argv = [args[0], args[1], *where, *args[2:]]
    assert gateway_cli(argv) == 0
    return argv


async def test_the_admin_key_rotates_as_the_readme_says(
    database_url: str | None, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    said: list[str] = []
    gw = create_gateway(database_url, data_dir, settings=settings(), announce=said.append)
    try:
        await _rotate(gw, said, database_url, data_dir, capsys)
    finally:
        await gw.close()


async def _rotate(
    gw: DatabaseGateway,
    said: list[str],
    database_url: str | None,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = re.search(r"sk-[A-Za-z0-9_-]{43}", said[0])
    assert first is not None
    old = first.group(0)

    async def is_admin(secret: str) -> bool:
        try:
            return (await gw.authenticate(bearer(secret))).role == "admin"
        except GatewayError as exc:
            assert exc.status == 401
            return False

    # 1. A second key on the admin account (the CLI prints it once) ...
    capsys.readouterr()
    _cli(database_url, data_dir, "keys", "create", "--account", ADMIN_ACCOUNT, "--name", "admin-2")
    printed = re.search(r"sk-[A-Za-z0-9_-]{43}", capsys.readouterr().out)
    assert printed is not None
    new = printed.group(0)
    assert await is_admin(new) and await is_admin(old)
    # 2. ... then the old one revoked, by its id from `keys list` (which shows no secrets).
    _cli(database_url, data_dir, "keys", "list", "--account", ADMIN_ACCOUNT)
    listing = capsys.readouterr().out
    assert old not in listing and new not in listing and old[:11] in listing
    old_id = next(
        line.split()[0] for line in listing.splitlines() if old[:11] in line and "active" in line
    )
    _cli(database_url, data_dir, "keys", "revoke", old_id)
    assert not await is_admin(old) and await is_admin(new)
    # A restart still configured with the old key (INFERHUB_ADMIN_KEY) does not bring it back.
    bootstrap(gw.db, admin_key=old, announce=said.append)
    assert not await is_admin(old)
    # A new INFERHUB_ADMIN_KEY is added to the admin account at start, never printed.
    chosen = "sk-rotated-admin-key-" + secrets.token_hex(16)
    bootstrap(gw.db, admin_key=chosen, announce=said.append)
    assert await is_admin(chosen) and chosen not in "".join(said)
    # Or over the operator API with the admin key itself.
    app = create_app(ServerConfig(), {}, gw)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post(
            f"/admin/accounts/{ADMIN_ACCOUNT}/keys",
            headers={"Authorization": bearer(chosen)},
            json={"name": "admin-3"},
        )
        assert r.status_code == 201, r.text
        third = r.json()["secret"]
        chosen_id = next(
            k.id for k in accounts.list_keys(gw.db) if k.prefix == keys.visible_prefix(chosen)
        )
        r = await c.post(
            f"/admin/keys/{chosen_id}/revoke", headers={"Authorization": bearer(third)}
        )
        assert r.status_code == 200 and r.json()["revoked"] is True
    assert not await is_admin(chosen) and await is_admin(third)
