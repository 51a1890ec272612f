"""Fixtures of the console tests: the app in process on a real database (SQLite, and a real
PostgreSQL where its binaries are installed), and for the browser tests one real server
(`inferhub serve`, embedded model, database gateway) and one headless Chromium per module."""

from __future__ import annotations

import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from console_helpers import ADMIN_KEY, Seed, seed_accounts, start_console_server

from inferhub.config import ServerConfig
from inferhub.gateway.factory import create_gateway
from inferhub.gateway.gateway import DatabaseGateway, GatewaySettings
from inferhub.server.app import create_app
from services import absent as _absent
from services import postgres_server  # noqa: F401

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "console"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- in process: the app on a real database ---------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None (SQLite in the test's folder) or a PostgreSQL URL with a fresh schema."""
    if request.param == "sqlite":
        return None
    import psycopg

    base: str = request.getfixturevalue("postgres_server")
    schema = "c_" + secrets.token_hex(6)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{base}?options=-csearch_path%3D{schema}"


@pytest.fixture
async def gw(database_url: str | None, tmp_path: Path) -> AsyncIterator[DatabaseGateway]:
    settings = GatewaySettings(checkpoint_interval_s=0.0, heartbeat_interval_s=3600.0)
    gateway = create_gateway(
        database_url, tmp_path / "data", admin_key=ADMIN_KEY, settings=settings, announce=str
    )
    try:
        yield gateway
    finally:
        await gateway.close()


@pytest.fixture
async def transport(gw: DatabaseGateway) -> AsyncIterator[httpx.ASGITransport]:
    """The real app (every router, the console included) on `gw`, without engines."""
    yield httpx.ASGITransport(app=create_app(ServerConfig(), {}, gw))


# -- a real server and a real browser (one each per test module) ------------------------------


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seed]:
    """`inferhub serve` with the embedded model and the database gateway, seeded with an
    operator (password set), two users with credit and a price for the model."""
    root = tmp_path_factory.mktemp("console-server")
    server = start_console_server(root / "data", root / "server.log")
    try:
        yield seed_accounts(server)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Module-scoped: Playwright's sync API holds an event loop while it runs, which the
    async tests of other modules must not meet."""
    if not CHROMIUM.exists():
        _absent(f"{CHROMIUM} is missing (apt-get install chromium; see scripts/system-deps.sh)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _absent("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
