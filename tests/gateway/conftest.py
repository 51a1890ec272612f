"""Fixtures of the gateway tests: a real PostgreSQL and a real Redis on loopback, started once
per session; a gateway on SQLite and on PostgreSQL (each test gets its own schema); helpers."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from gateway_helpers import settings

from inferhub.gateway.factory import create_gateway
from inferhub.gateway.gateway import DatabaseGateway
from services import own_postgres, own_redis, postgres_server, redis_server  # noqa: F401


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None (SQLite in the test's data dir) or a PostgreSQL URL with a fresh schema."""
    if request.param == "sqlite":
        return None
    base: str = request.getfixturevalue("postgres_server")
    schema = "t_" + secrets.token_hex(6)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{base}?options=-csearch_path%3D{schema}"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def gw(database_url: str | None, data_dir: Path) -> AsyncIterator[DatabaseGateway]:
    announced: list[str] = []
    gateway = create_gateway(database_url, data_dir, settings=settings(), announce=announced.append)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.close()
