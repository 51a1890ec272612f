"""The web console's routes: its static page and assets under /console, and the session API
under /console/api (log in, log out, who am I, the playground's key, change password).

Everything else the pages show comes from /v1/dashboard and /admin, which accept the
session cookie as a second way in (see sessions.py).
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from inferhub.gateway import accounts
from inferhub.gateway.auth import set_password, verify_login
from inferhub.gateway.interface import GatewayError
from inferhub.gateway.money import MICROS
from inferhub.gateway.records import AccountInfo, CreatedKey
from inferhub.gateway.sessions import (
    ConsoleSession,
    create_session,
    end_account_sessions,
    end_session,
    mint_playground_key,
)
from inferhub.server.admin import GatewayDep
from inferhub.server.console.sessions import (
    COOKIE,
    LoginLimiter,
    check_login_header,
    clear_session_cookie,
    current_session,
    set_session_cookie,
)

STATIC_DIR = Path(__file__).parent / "static"

# The page loads only its own files: no inline script, no other origin, never in a frame.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
NO_STORE = {"Cache-Control": "no-store"}


@dataclass
class _Asset:
    body: bytes
    media_type: str
    etag: str


def _load_assets(root: Path) -> dict[str, _Asset]:
    """Every file under static/, read once: the only paths the asset route will answer."""
    assets = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        body = path.read_bytes()
        media_type = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}.get(
            path.suffix
        ) or (mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        if media_type.startswith("text/"):
            media_type += "; charset=utf-8"
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        assets[path.relative_to(root).as_posix()] = _Asset(body, media_type, etag)
    return assets


def _serve(request: Request, asset: _Asset) -> Response:
    headers = {**PAGE_HEADERS, "ETag": asset.etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginBody(_Body):
    login: str = Field(min_length=1, max_length=320)  # email or account name
    password: str = Field(min_length=1, max_length=1000)


class PasswordChange(_Body):
    current_password: str = Field(min_length=1, max_length=1000)
    new_password: str = Field(min_length=8, max_length=1000)


@dataclass
class SessionInfo:
    """What the page needs to know about its log-in."""

    account: AccountInfo
    csrf_token: str  # to send in X-CSRF-Token on every state-changing call
    expires_at: datetime
    models: list[str]  # the served models
    currency: str
    micros_per_unit: int


@dataclass
class LoggedOut:
    logged_out: bool = True


def _served_models(request: Request) -> list[str]:
    state = getattr(request.app.state, "server", None)
    return list(getattr(state, "engines", {}) or {})


async def _info(gw: GatewayDep, request: Request, session: ConsoleSession) -> SessionInfo:
    account = await gw.call(accounts.find_account, gw.db, session.account_id)
    return SessionInfo(
        account=account,
        csrf_token=session.csrf_token,
        expires_at=session.expires_at,
        models=_served_models(request),
        currency=gw.settings.currency,
        micros_per_unit=MICROS,
    )


def console_router(static_dir: Path = STATIC_DIR) -> APIRouter:
    """The console: GET /console (the page), /console/static/... (its files), /console/api/..."""
    router = APIRouter(prefix="/console", tags=["console"], include_in_schema=False)
    assets = _load_assets(static_dir)
    limiter = LoginLimiter()

    @router.get("")
    @router.get("/")
    async def page(request: Request) -> Response:
        return _serve(request, assets["index.html"])

    @router.get("/static/{name:path}")
    async def static(request: Request, name: str) -> Response:
        asset = assets.get(name)
        if asset is None:
            raise GatewayError(404, f"No such console file: {name}", code="not_found")
        return _serve(request, asset)

    @router.post("/api/login")
    async def login(
        gw: GatewayDep, request: Request, response: Response, body: LoginBody
    ) -> SessionInfo:
        check_login_header(request)
        address = request.client.host if request.client else "unknown"
        limiter.check(address, body.login)
        account = await gw.call(verify_login, gw.db, body.login.strip(), body.password)
        if account is None:
            limiter.failed(address, body.login)
            raise GatewayError(
                401, "Incorrect email or password.", code="invalid_credentials", param="login"
            )
        limiter.succeeded(body.login)
        old = request.cookies.get(COOKIE)
        if old:
            await gw.call(end_session, gw.db, old)
        new = await gw.call(create_session, gw.db, account.id)
        set_session_cookie(request, response, new.token)
        response.headers.update(NO_STORE)
        return await _info(gw, request, new.session)

    @router.post("/api/logout")
    async def logout(gw: GatewayDep, request: Request, response: Response) -> LoggedOut:
        await current_session(gw, request)  # the CSRF check: another site cannot log you out
        await gw.call(end_session, gw.db, request.cookies[COOKIE])
        clear_session_cookie(request, response)
        return LoggedOut()

    @router.get("/api/session")
    async def session(gw: GatewayDep, request: Request, response: Response) -> SessionInfo:
        found = await current_session(gw, request)
        response.headers.update(NO_STORE)
        return await _info(gw, request, found)

    @router.post("/api/playground-key", status_code=201)
    async def playground_key(gw: GatewayDep, request: Request, response: Response) -> CreatedKey:
        """A short-lived key for the playground's calls to /v1/chat/completions, replacing
        the one this session had; the page keeps it in memory only."""
        found = await current_session(gw, request)
        response.headers.update(NO_STORE)
        return await gw.call(mint_playground_key, gw.db, found)

    @router.post("/api/password")
    async def change_password(
        gw: GatewayDep, request: Request, body: PasswordChange
    ) -> SessionInfo:
        """Change one's own password (the current one must match); other sessions end."""
        found = await current_session(gw, request)
        address = request.client.host if request.client else "unknown"
        limiter.check(address, found.account_name)
        account = await gw.call(verify_login, gw.db, found.account_name, body.current_password)
        if account is None or account.id != found.account_id:
            limiter.failed(address, found.account_name)
            raise GatewayError(
                400, "The current password is not right.", code="invalid_credentials",
                param="current_password",
            )  # fmt: skip
        await gw.call(set_password, gw.db, found.account_id, body.new_password)
        await gw.call(end_account_sessions, gw.db, found.account_id, keep=found.id)
        return await _info(gw, request, found)

    return router
