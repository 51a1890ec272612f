"""The database connection: SQLite (WAL, one serialized writer) or PostgreSQL, and migrations.

All writes go through `Database.write()`: on SQLite it holds a process-wide lock for the
connection's life and starts the transaction with `BEGIN IMMEDIATE`, so writers never
deadlock on lock upgrades and other processes (the CLI) wait on `busy_timeout`. On PostgreSQL
writes are ordinary transactions whose correctness rests on conditional `UPDATE`s and row
locks. Reads (`Database.read()`) run concurrently on pooled connections.

The per-request statements (billing.py, auth.py) use `raw_read()` / `raw_write()`: the same
discipline on the driver's own cursor, with SQL written once in `:name` style and converted
for psycopg by `sql()`. SQLAlchemy Core costs about 20x the driver per statement there
(measured: 850 us against 45 us for a reservation on SQLite), which would make the gateway
the slowest part of a request.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
VERSION_TABLE = "gateway_alembic_version"
SQLITE_FILE = "inferhub.db"
_MIGRATION_LOCK_ID = 0x1F_E2_4B_01  # a PostgreSQL advisory-lock id for concurrent starts
_NAMED = re.compile(r"(?<![:\w]):(\w+)")
_SQLITE_DATETIME = "%Y-%m-%d %H:%M:%S.%f"


def utcnow() -> datetime:
    """The current time as naive UTC, the form every timestamp column stores."""
    return datetime.now(UTC).replace(tzinfo=None)


def resolve_url(database_url: str | None, data_dir: Path) -> str:
    """The SQLAlchemy URL: the given one (postgresql:// means psycopg 3), else SQLite in data_dir."""
    if not database_url:
        data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(data_dir / SQLITE_FILE).resolve()}"
    for scheme in ("postgresql://", "postgres://"):
        if database_url.startswith(scheme):
            return "postgresql+psycopg://" + database_url[len(scheme) :]
    return database_url


# SQLite's primary result codes that mean "not now", not "wrong SQL": busy, locked, read-only,
# I/O error, disk full, cannot open.
_SQLITE_UNAVAILABLE = {5, 6, 8, 10, 13, 14}


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached or written now (server down, the
    connection lost, disk full), as opposed to a bug or a constraint; SQLAlchemy's wrappers
    and the drivers' own exceptions (the raw cursor path) alike."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        if exc.connection_invalidated:
            return True
        exc = exc.orig
    elif isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _SQLITE_UNAVAILABLE
    module = type(exc).__module__
    if module.startswith("psycopg"):
        import psycopg

        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return isinstance(exc, ConnectionError)


def redact_url(url: str) -> str:
    """The URL with any password masked, for messages."""
    return sa.make_url(url).render_as_string(hide_password=True)


class Database:
    """An engine plus the write discipline of the dialect behind it."""

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._write_lock: threading.Lock | None = threading.Lock() if self.is_sqlite else None
        if self.is_sqlite:
            self.engine = sa.create_engine(
                url,
                connect_args={"timeout": 30, "check_same_thread": False},
                hide_parameters=True,  # errors and logs never quote values (keys, tokens)
                pool_size=pool_size,
                max_overflow=pool_size,
            )
            sa.event.listen(self.engine, "connect", _sqlite_on_connect)
            sa.event.listen(self.engine, "begin", _sqlite_on_begin)
        else:
            self.engine = sa.create_engine(
                url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=True,
                hide_parameters=True,  # errors and logs never quote values (keys, tokens)
            )

    @contextmanager
    def read(self, *, snapshot: bool = False) -> Iterator[sa.Connection]:
        """Reads that run concurrently with the writer; on SQLite each statement sees its own
        snapshot unless `snapshot` asks for one transaction around them all."""
        with self.engine.connect() as conn:
            if self.is_sqlite and not snapshot:
                conn.execution_options(inferhub_begin="")
            with conn.begin():
                yield conn

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """A write transaction, committed on exit, rolled back on an exception."""
        lock: AbstractContextManager[Any] = self._write_lock or nullcontext()
        with lock, self.engine.connect() as conn:
            if self.is_sqlite:
                conn.execution_options(inferhub_begin="BEGIN IMMEDIATE")
            with conn.begin():
                yield conn

    # -- the driver-level path of per-request statements ------------------------------------

    def sql(self, statement: str) -> str:
        """`:name` placeholders as the driver wants them (psycopg: `%(name)s`)."""
        return statement if self.is_sqlite else _NAMED.sub(r"%(\1)s", statement)

    def ts(self, value: datetime | None) -> Any:
        """A naive-UTC datetime as the driver must bind it for a DateTime column."""
        if value is None or not self.is_sqlite:
            return value
        return value.strftime(_SQLITE_DATETIME)  # SQLAlchemy's SQLite storage format

    def json(self, value: Any) -> Any:
        """A value to bind to a JSON column."""
        if self.is_sqlite:
            return json.dumps(value)
        from psycopg.types.json import Json

        return Json(value)

    @staticmethod
    def from_json(value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value

    @contextmanager
    def raw_read(self) -> Iterator[Any]:
        """A driver cursor for reads (SQLite: autocommit, one snapshot per statement)."""
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                yield cursor
            finally:
                cursor.close()
        finally:
            raw.close()  # back to the pool, which rolls back whatever PostgreSQL began

    @contextmanager
    def raw_write(self) -> Iterator[Any]:
        """A driver cursor in a write transaction, committed on exit, rolled back on error."""
        lock: AbstractContextManager[Any] = self._write_lock or nullcontext()
        with lock:
            raw = self.engine.raw_connection()
            try:
                cursor = raw.cursor()
                if self.is_sqlite:
                    cursor.execute("BEGIN IMMEDIATE")
                try:
                    yield cursor
                    raw.commit()
                except BaseException:
                    raw.rollback()
                    raise
                finally:
                    cursor.close()
            finally:
                raw.close()

    @property
    def integrity_error(self) -> type[Exception]:
        error: type[Exception] = self.engine.dialect.loaded_dbapi.IntegrityError
        return error

    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent; safe on concurrent starts)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.write() as conn:
            if not self.is_sqlite:
                conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
                )
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself, so that writes can say IMMEDIATE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_on_begin(conn: sa.Connection) -> None:
    statement = conn.get_execution_options().get("inferhub_begin", "BEGIN")
    if statement:  # "" leaves the connection in autocommit: one snapshot per statement
        conn.exec_driver_sql(statement)
