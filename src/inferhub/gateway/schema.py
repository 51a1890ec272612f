"""The gateway's tables (SQLAlchemy Core); the migrations in `migrations/` create exactly these.

Money columns are integer micro-units (1 currency unit = 1_000_000). Times are naive UTC.
A `usage` row is born as an open reservation at admission and closed once by settlement, so
every admitted or refused request leaves exactly one row.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# An auto-increment primary key that is INTEGER on SQLite (its rowid) and BIGINT elsewhere.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("email", sa.String(320), nullable=True, unique=True),
    sa.Column("role", sa.String(16), nullable=False),  # "admin" | "user"
    sa.Column("balance_micros", sa.BigInteger(), nullable=False),  # credits - settled costs
    sa.Column("reserved_micros", sa.BigInteger(), nullable=False),  # sum of open reservations
    sa.Column("password_hash", sa.String(200), nullable=True),  # argon2, for the console
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("disabled_at", sa.DateTime(), nullable=True),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("account_id", sa.String(32), sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),  # sha256 hex of the key
    sa.Column("prefix", sa.String(16), nullable=False),  # "sk-" + a few characters, for lists
    sa.Column("allowed_models", sa.JSON(), nullable=False),  # [] = every model
    sa.Column("rpm_limit", sa.Integer(), nullable=True),  # None = unlimited
    sa.Column("tpm_limit", sa.Integer(), nullable=True),
    sa.Column("concurrency_limit", sa.Integer(), nullable=True),
    sa.Column("spend_cap_micros", sa.BigInteger(), nullable=True),
    sa.Column("spent_micros", sa.BigInteger(), nullable=False),
    sa.Column("reserved_micros", sa.BigInteger(), nullable=False),
    sa.Column("expires_at", sa.DateTime(), nullable=True),
    sa.Column("revoked_at", sa.DateTime(), nullable=True),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("last_used_at", sa.DateTime(), nullable=True),
    sa.Index("ix_api_keys_account_id", "account_id"),
)

# Per-model prices in micro-units per million tokens; the row with model "*" is the default.
prices = sa.Table(
    "prices",
    metadata,
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("input_micros_per_mtok", sa.BigInteger(), nullable=False),
    sa.Column("output_micros_per_mtok", sa.BigInteger(), nullable=False),
    sa.Column("updated_at", sa.DateTime(), nullable=False),
)

# Credit movements other than request costs: top-ups and manual adjustments.
ledger = sa.Table(
    "ledger",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("account_id", sa.String(32), sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("amount_micros", sa.BigInteger(), nullable=False),  # signed
    sa.Column("kind", sa.String(32), nullable=False),  # "credit" | "adjustment"
    sa.Column("note", sa.String(500), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Index("ix_ledger_account_id", "account_id"),
)

usage = sa.Table(
    "usage",
    metadata,
    sa.Column("request_id", sa.String(100), primary_key=True),
    sa.Column("account_id", sa.String(32), sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("status", sa.String(8), nullable=False),  # "open" | "closed"
    sa.Column("instance", sa.String(100), nullable=False),  # the gateway that admitted it
    # Prices copied at admission: a price change applies to requests that start after it.
    sa.Column("input_micros_per_mtok", sa.BigInteger(), nullable=False),
    sa.Column("output_micros_per_mtok", sa.BigInteger(), nullable=False),
    sa.Column("max_completion_tokens", sa.Integer(), nullable=False),
    sa.Column("reserved_micros", sa.BigInteger(), nullable=False),
    # While open: the admitted prompt and the completion tokens checkpointed so far.
    sa.Column("prompt_tokens", sa.Integer(), nullable=False),
    sa.Column("completion_tokens", sa.Integer(), nullable=False),
    sa.Column("cost_micros", sa.BigInteger(), nullable=False),
    sa.Column("end_state", sa.String(32), nullable=True),
    sa.Column("finish_reasons", sa.JSON(), nullable=False),
    sa.Column("started_at", sa.DateTime(), nullable=False),
    sa.Column("ended_at", sa.DateTime(), nullable=True),
    sa.Index("ix_usage_account_started", "account_id", "started_at"),
    sa.Index("ix_usage_key_started", "key_id", "started_at"),
    sa.Index("ix_usage_status_instance", "status", "instance"),
)

# Live gateway processes; a stale heartbeat lets another replica recover its reservations.
instances = sa.Table(
    "instances",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("started_at", sa.DateTime(), nullable=False),
    sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
)

# Console log-ins: the cookie's token is stored only as its SHA-256 (the row id).
console_sessions = sa.Table(
    "console_sessions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # sha256 hex of the session token
    sa.Column("account_id", sa.String(32), sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("csrf_token", sa.String(64), nullable=False),  # sent back in X-CSRF-Token
    sa.Column("playground_key_id", sa.String(32), nullable=True),  # the key it minted, if any
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("last_seen_at", sa.DateTime(), nullable=False),
    sa.Column("expires_at", sa.DateTime(), nullable=False),
    sa.Index("ix_console_sessions_account_id", "account_id"),
    sa.Index("ix_console_sessions_expires_at", "expires_at"),
)
