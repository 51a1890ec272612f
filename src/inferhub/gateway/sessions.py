"""Console sessions: the store behind the web console's log-in cookie.

A session is a random token (32 bytes) that lives only in the browser's HttpOnly cookie; the
table keeps its SHA-256, so a copy of the database opens no session. Each session has its
own CSRF token, an absolute expiry and an idle expiry, and remembers the one short-lived
playground key it minted, which is revoked when the session ends or mints another.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from inferhub.gateway import accounts as account_store
from inferhub.gateway.db import Database, utcnow
from inferhub.gateway.interface import GatewayError
from inferhub.gateway.keys import hashes_equal
from inferhub.gateway.records import CreatedKey, aware
from inferhub.gateway.schema import accounts, console_sessions

TOKEN_BYTES = 32
MAX_AGE = timedelta(hours=12)  # a log-in lasts at most this long
IDLE_TIMEOUT = timedelta(hours=2)  # ... and ends after this long without a request
TOUCH_EVERY = timedelta(minutes=1)  # how stale last_seen_at may get before it is rewritten
PLAYGROUND_KEY_TTL = timedelta(hours=1)
PLAYGROUND_KEY_NAME = "playground (console session)"


@dataclass
class ConsoleSession:
    id: str  # the SHA-256 of the token; never the token itself
    account_id: str
    account_name: str
    role: str
    csrf_token: str
    playground_key_id: str | None
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime  # the absolute expiry (aware UTC)


@dataclass
class NewSession:
    token: str  # for the cookie, shown once
    session: ConsoleSession


def session_id(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _select() -> sa.Select[tuple[object, ...]]:
    return sa.select(
        console_sessions, accounts.c.name, accounts.c.role, accounts.c.disabled_at
    ).join(accounts, accounts.c.id == console_sessions.c.account_id)


def _from_row(row: sa.Row[tuple[object, ...]]) -> ConsoleSession:
    m = row._mapping
    return ConsoleSession(
        id=m["id"],
        account_id=m["account_id"],
        account_name=m["name"],
        role=m["role"],
        csrf_token=m["csrf_token"],
        playground_key_id=m["playground_key_id"],
        created_at=aware(m["created_at"]),
        last_seen_at=aware(m["last_seen_at"]),
        expires_at=aware(m["expires_at"]),
    )


def create_session(db: Database, account_id: str, *, max_age: timedelta = MAX_AGE) -> NewSession:
    """A new session for an account (whose password was just checked); also drops expired ones."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    now = utcnow()
    with db.write() as conn:
        conn.execute(console_sessions.delete().where(console_sessions.c.expires_at <= now))
        conn.execute(
            console_sessions.insert().values(
                id=session_id(token),
                account_id=account_id,
                csrf_token=secrets.token_urlsafe(TOKEN_BYTES),
                created_at=now,
                last_seen_at=now,
                expires_at=now + max_age,
            )
        )
        row = conn.execute(_select().where(console_sessions.c.id == session_id(token))).one()
    return NewSession(token, _from_row(row))


def find_session(
    db: Database, token: str, *, idle_timeout: timedelta = IDLE_TIMEOUT
) -> ConsoleSession | None:
    """The live session of a cookie token: None if unknown, expired, idle too long, or its
    account is disabled. Marks it as seen (at most once per TOUCH_EVERY)."""
    sid = session_id(token)
    now = utcnow()
    with db.read() as conn:
        row = conn.execute(_select().where(console_sessions.c.id == sid)).first()
    if row is None or not hashes_equal(row._mapping["id"], sid):  # found by hash, then compared
        return None
    m = row._mapping
    if m["expires_at"] <= now or m["last_seen_at"] + idle_timeout <= now or m["disabled_at"]:
        return None
    if now - m["last_seen_at"] >= TOUCH_EVERY:
        with db.write() as conn:
            conn.execute(
                console_sessions.update()
                .where(console_sessions.c.id == sid)
                .values(last_seen_at=now)
            )
    return _from_row(row)


def end_session(db: Database, token: str) -> None:
    """Log out: delete the session and revoke the playground key it minted."""
    sid = session_id(token)
    with db.write() as conn:
        row = conn.execute(
            sa.select(console_sessions.c.account_id, console_sessions.c.playground_key_id).where(
                console_sessions.c.id == sid
            )
        ).first()
        conn.execute(console_sessions.delete().where(console_sessions.c.id == sid))
    if row is not None and row.playground_key_id is not None:
        account_store.revoke_key(db, row.playground_key_id, account_id=row.account_id)


def end_account_sessions(db: Database, account_id: str, *, keep: str | None = None) -> int:
    """Log an account out everywhere (after a password change), except the session `keep`
    (an id); returns how many ended."""
    where = console_sessions.c.account_id == account_id
    if keep is not None:
        where = sa.and_(where, console_sessions.c.id != keep)
    with db.write() as conn:
        rows = conn.execute(sa.select(console_sessions.c.playground_key_id).where(where)).all()
        conn.execute(console_sessions.delete().where(where))
    for (key_id,) in rows:
        if key_id is not None:
            account_store.revoke_key(db, key_id, account_id=account_id)
    return len(rows)


def mint_playground_key(
    db: Database, session: ConsoleSession, *, ttl: timedelta = PLAYGROUND_KEY_TTL
) -> CreatedKey:
    """A key for the console's playground: it expires within `ttl` (and never after the
    session), and replaces (revokes) the one this session minted before."""
    expires = min(aware(utcnow()) + ttl, session.expires_at)
    created = account_store.create_key(
        db, session.account_id, name=PLAYGROUND_KEY_NAME, expires_at=expires
    )
    with db.write() as conn:
        previous = conn.execute(
            sa.select(console_sessions.c.playground_key_id).where(
                console_sessions.c.id == session.id
            )
        ).scalar()
        updated = conn.execute(
            console_sessions.update()
            .where(console_sessions.c.id == session.id)
            .values(playground_key_id=created.key.id)
        ).rowcount
    if updated != 1:  # logged out meanwhile: the key must not outlive the session
        account_store.revoke_key(db, created.key.id, account_id=session.account_id)
        raise GatewayError(401, "Your console session has ended.", code="invalid_session")
    if previous is not None:
        account_store.revoke_key(db, previous, account_id=session.account_id)
    session.playground_key_id = created.key.id
    return created
