"""Building the database gateway: URL, migrations, the rate limiter, and the first-start admin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from inferhub.gateway.accounts import (
    DEFAULT_PRICE_MODEL,
    create_account,
    create_key,
    key_exists,
    set_price,
)
from inferhub.gateway.db import Database, resolve_url
from inferhub.gateway.failover import FailoverLimiter, FailureMode
from inferhub.gateway.gateway import DatabaseGateway, GatewaySettings
from inferhub.gateway.interface import GatewayError
from inferhub.gateway.ratelimit import MemoryLimiter, RateLimiter
from inferhub.gateway.redis_limiter import RedisLimiter
from inferhub.gateway.schema import accounts, prices

ADMIN_ACCOUNT = "admin"
MIN_ADMIN_KEY_CHARS = 20
REDIS_TOKENS_FLUSH_S = 0.25  # batch streamed-token charges to Redis


def open_database(database_url: str | None, data_dir: Path) -> Database:
    """The database at `database_url` (else SQLite in data_dir), migrated to the newest schema."""
    db = Database(resolve_url(database_url, data_dir))
    try:
        db.migrate()
    except BaseException:
        db.close()
        raise
    return db


BOOTSTRAP_ATTEMPTS = 5


def bootstrap(
    db: Database, *, admin_key: str | None, announce: Callable[[str], None] = print
) -> None:
    """On first start create the admin account and its key, printed once through `announce`
    (or `admin_key`, e.g. from INFERHUB_ADMIN_KEY, which is then never printed); also the
    default price row. A later start with a new `admin_key` adds it to the admin account.

    Replicas that start together on one database race here: each step reads, then writes, and
    another replica may write the same row in between (the unique constraints refuse the
    second). The loser reads again and goes on from what the winner wrote."""
    if admin_key is not None and len(admin_key) < MIN_ADMIN_KEY_CHARS:
        raise ValueError(f"the admin key must have at least {MIN_ADMIN_KEY_CHARS} characters")
    for attempt in range(BOOTSTRAP_ATTEMPTS):
        try:
            _bootstrap_once(db, admin_key=admin_key, announce=announce)
            return
        except sa.exc.IntegrityError:
            if attempt == BOOTSTRAP_ATTEMPTS - 1:
                raise


def _admin_id(db: Database) -> str | None:
    with db.read() as conn:
        found: str | None = conn.execute(
            sa.select(accounts.c.id)
            .where(accounts.c.role == "admin")
            .order_by(accounts.c.created_at, accounts.c.id)
        ).scalar()
    return found


def _bootstrap_once(
    db: Database, *, admin_key: str | None, announce: Callable[[str], None]
) -> None:
    with db.read() as conn:
        has_default_price = conn.execute(
            sa.select(prices.c.model).where(prices.c.model == DEFAULT_PRICE_MODEL)
        ).first()
    if not has_default_price:
        set_price(db, DEFAULT_PRICE_MODEL, 0, 0)
    admin_id = _admin_id(db)
    if admin_id is None:
        try:
            admin_id = create_account(db, ADMIN_ACCOUNT, role="admin").id
        except GatewayError:  # the name is taken: another replica won, or a user is "admin"
            admin_id = _admin_id(db)
            if admin_id is None:
                raise
        else:
            created = create_key(db, admin_id, name="bootstrap admin key", secret=admin_key)
            if admin_key is None:
                announce(
                    f"inferhub: created the admin account '{ADMIN_ACCOUNT}'. Its API key, "
                    f"shown only this once:\n\n    {created.secret}\n"
                )
            else:
                announce(
                    f"inferhub: created the admin account '{ADMIN_ACCOUNT}' with the given key."
                )
            return
    if admin_key is not None and not key_exists(db, admin_key):
        create_key(db, admin_id, name="admin key from configuration", secret=admin_key)
        announce("inferhub: added the given admin key to the admin account.")


def create_gateway(
    database_url: str | None,
    data_dir: Path,
    redis_url: str | None = None,
    *,
    admin_key: str | None = None,
    settings: GatewaySettings | None = None,
    announce: Callable[[str], None] = print,
    redis_failure: FailureMode = "memory",
) -> DatabaseGateway:
    """The default gateway: migrate, bootstrap, pick the limiter. Call `await gw.start()` before
        serving (crash recovery, heartbeat) and `await gw.close()` at shutdown. `redis_failure`
    says what rate limits do while Redis is unreachable (see failover.py)."""
    db = open_database(database_url, data_dir)
    try:
        bootstrap(db, admin_key=admin_key, announce=announce)
    except BaseException:
        db.close()
        raise
    if settings is None:
        settings = GatewaySettings(
            tokens_flush_interval_s=REDIS_TOKENS_FLUSH_S if redis_url else 0.0
        )
    limiter: RateLimiter = MemoryLimiter()
    if redis_url:
        import redis.exceptions

        limiter = FailoverLimiter(
            RedisLimiter(redis_url),
            redis_failure,
            unavailable=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError),
        )
    return DatabaseGateway(db, limiter, settings)
