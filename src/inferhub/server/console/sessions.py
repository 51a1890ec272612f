"""The console session over HTTP: the cookie, the CSRF check, the caller a session stands for,
and the log-in attempt limiter.

The cookie holds the session token: HttpOnly (scripts cannot read it), SameSite=Strict (no
other site's page sends it), Secure when served over https, Path=/ (the console's pages call
/v1/dashboard and /admin). A state-changing request authenticated by the cookie must also
carry the session's CSRF token in `X-CSRF-Token`; the page learns it from the log-in answer
or GET /console/api/session, which another origin cannot read. The log-in itself, which has
no session yet, must carry `X-Requested-With: inferhub-console`, a header no cross-site form
can send and no cross-origin script may send without a CORS grant this server never gives.
"""

from __future__ import annotations

import hmac
import time
from collections import deque
from dataclasses import dataclass, field

from fastapi import Request, Response

from inferhub.gateway.gateway import DatabaseGateway
from inferhub.gateway.interface import GatewayError
from inferhub.gateway.records import KeyPrincipal
from inferhub.gateway.sessions import MAX_AGE, ConsoleSession, find_session

COOKIE = "inferhub_session"
CSRF_HEADER = "X-CSRF-Token"
LOGIN_HEADER = "X-Requested-With"
LOGIN_HEADER_VALUE = "inferhub-console"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def invalid_session() -> GatewayError:
    return GatewayError(
        401, "Your console session has expired or ended; log in again.", code="invalid_session"
    )


def has_session_cookie(request: Request) -> bool:
    return bool(request.cookies.get(COOKIE))


def set_session_cookie(request: Request, response: Response, token: str) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(MAX_AGE.total_seconds()),
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )


def clear_session_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(
        COOKIE, path="/", secure=request.url.scheme == "https", httponly=True, samesite="strict"
    )


def check_csrf(request: Request, session: ConsoleSession) -> None:
    """A state-changing request must echo the session's CSRF token."""
    if request.method in SAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
        raise GatewayError(
            403,
            f"Missing or wrong {CSRF_HEADER} header; reload the console and try again.",
            code="csrf_failed",
        )


def check_login_header(request: Request) -> None:
    if request.headers.get(LOGIN_HEADER) != LOGIN_HEADER_VALUE:
        raise GatewayError(
            403,
            f"A console log-in must send {LOGIN_HEADER}: {LOGIN_HEADER_VALUE}.",
            code="csrf_failed",
        )


async def current_session(gateway: DatabaseGateway, request: Request) -> ConsoleSession:
    """The request's live session (401 if none) with its CSRF token checked."""
    token = request.cookies.get(COOKIE)
    if not token:
        raise invalid_session()
    session = await gateway.call(find_session, gateway.db, token)
    if session is None:
        raise invalid_session()
    check_csrf(request, session)
    return session


async def session_caller(gateway: DatabaseGateway, request: Request) -> KeyPrincipal:
    """The caller a console session stands for: its account, with no key (key_id "")."""
    session = await current_session(gateway, request)
    return KeyPrincipal(
        key_id="",
        account_id=session.account_id,
        role=session.role,
        account_name=session.account_name,
        session_id=session.id,
    )


@dataclass
class LoginLimiter:
    """Failed log-ins per client address and per login name in a sliding window; past either
    limit, attempts are refused (429) without checking the password. In memory: each replica
    counts its own (an attacker spread over N replicas gets N times the attempts)."""

    per_address: int = 20
    per_login: int = 5
    window_s: float = 300.0
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def check(self, address: str, login: str) -> None:
        now = time.monotonic()
        waits = []
        for key, limit in (
            (f"a:{address}", self.per_address),
            (f"l:{login.lower()}", self.per_login),
        ):
            times = self._recent(key, now)
            if len(times) >= limit:
                waits.append(times[0] + self.window_s - now)
        if waits:
            retry = max(1, int(max(waits)) + 1)
            raise GatewayError(
                429,
                f"Too many failed log-ins; try again in {retry} seconds.",
                type="rate_limit_exceeded",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )

    def failed(self, address: str, login: str) -> None:
        now = time.monotonic()
        for key in (f"a:{address}", f"l:{login.lower()}"):
            self._recent(key, now).append(now)
        if len(self._failures) > 10_000:  # forget quiet entries so memory stays bounded
            for key in [k for k, v in self._failures.items() if not self._recent(k, now)]:
                del self._failures[key]

    def succeeded(self, login: str) -> None:
        self._failures.pop(f"l:{login.lower()}", None)
