"""The gateway's value types: what its stores return and its APIs serialize.

Plain dataclasses (FastAPI serializes them as return types). Times are timezone-aware UTC.
Nothing here ever carries a key's secret or hash, except `CreatedKey.secret`, shown once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from inferhub.gateway.interface import Principal


def aware(value: datetime) -> datetime:
    """A naive-UTC column value as an aware datetime."""
    return value.replace(tzinfo=UTC)


def aware_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC)


def naive(value: datetime | None) -> datetime | None:
    """An aware (or naive-UTC) datetime as the naive-UTC form the columns store."""
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


@dataclass
class AccountInfo:
    id: str
    name: str
    email: str | None
    role: str  # "admin" | "user"
    balance_micros: int  # credits minus settled costs
    reserved_micros: int  # held by requests in flight
    available_micros: int  # balance - reserved: what a new request may reserve
    created_at: datetime
    disabled: bool
    has_password: bool


@dataclass
class KeyLimits:
    """Per-key rate limits; None means unlimited."""

    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # prompt + completion tokens per minute
    concurrency: int | None = None  # requests in flight


@dataclass
class KeyInfo:
    id: str
    account_id: str
    name: str
    prefix: str  # e.g. "sk-AbCd1234"; the rest of the key is never stored
    allowed_models: list[str]  # empty: every model
    limits: KeyLimits
    spend_cap_micros: int | None
    spent_micros: int
    reserved_micros: int
    expires_at: datetime | None
    revoked: bool
    created_at: datetime
    last_used_at: datetime | None


@dataclass
class CreatedKey:
    """A new key: `secret` is shown to its owner once and never stored."""

    key: KeyInfo
    secret: str


@dataclass
class PriceInfo:
    model: str  # "*" is the default for models without a price of their own
    input_micros_per_mtok: int
    output_micros_per_mtok: int
    updated_at: datetime


@dataclass
class LedgerEntry:
    id: int
    account_id: str
    amount_micros: int
    kind: str  # "credit" | "adjustment"
    note: str
    created_at: datetime
    balance_micros: int | None = None  # the balance right after, where known


@dataclass
class UsageRecord:
    """One request: its reservation while open, its bill once closed."""

    request_id: str
    account_id: str
    key_id: str
    model: str
    status: str  # "open" | "closed"
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    reserved_micros: int
    end_state: str | None
    finish_reasons: list[str]
    started_at: datetime
    ended_at: datetime | None


@dataclass
class UsageGroup:
    """Totals of closed requests for one group (a day, a model, an account or a key)."""

    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int


@dataclass
class KeyPrincipal(Principal):
    """The Principal the database gateway hands out: the key's policy, read at authentication."""

    allowed_models: list[str] = field(default_factory=list)
    limits: KeyLimits = field(default_factory=KeyLimits)
    account_name: str = ""
    session_id: str | None = None  # set when a console session, not a key, is calling
