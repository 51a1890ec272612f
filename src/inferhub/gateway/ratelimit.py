"""Per-key rate limits (requests/min, tokens/min, concurrency): decisions, headers, in-memory limiter.

Requests and tokens per minute are token buckets that hold up to the per-minute limit and
refill continuously at limit/60 per second. Admission takes one request and the prompt's
tokens; completion tokens are taken as they are generated and may drive the token bucket
into debt, which holds later requests back until it refills. Concurrency is the number of
requests admitted and not yet settled. `RedisLimiter` (redis_limiter.py) keeps the same
state in Redis so that replicas share it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from inferhub.gateway.interface import GatewayError
from inferhub.gateway.records import KeyLimits

SECONDS_PER_WINDOW = 60.0


@dataclass
class BucketState:
    """One limit as reported in `x-ratelimit-*` headers."""

    limit: int
    level: float  # may be negative (token debt)

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self.level))

    @property
    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.limit - self.level) * SECONDS_PER_WINDOW / self.limit)


@dataclass
class RateDecision:
    """What a limiter said about one admission."""

    requests: BucketState | None = None
    tokens: BucketState | None = None
    # None if allowed, else "requests" | "tokens" | "tokens_too_large" | "concurrency"
    refused: str | None = None
    retry_after_s: float = 0.0
    concurrency_limit: int | None = None
    in_flight: int = 0
    requested_tokens: int = 0

    @property
    def allowed(self) -> bool:
        return self.refused is None

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, state in (("requests", self.requests), ("tokens", self.tokens)):
            if state is not None:
                headers[f"x-ratelimit-limit-{name}"] = str(state.limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(state.remaining)
                headers[f"x-ratelimit-reset-{name}"] = format_duration(state.reset_s)
        if not self.allowed:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
            headers["retry-after-ms"] = str(max(1, math.ceil(self.retry_after_s * 1000)))
        return headers

    def error(self) -> GatewayError:
        wait = format_duration(self.retry_after_s)
        if self.refused == "requests" and self.requests is not None:
            kind, limit = "requests", self.requests.limit
            message = f"requests per min (RPM): Limit {limit}, Requested 1."
        elif self.refused == "concurrency":
            kind = "requests"
            message = (
                f"concurrent requests: Limit {self.concurrency_limit}, In flight {self.in_flight}."
            )
        elif self.tokens is not None:
            kind, limit = "tokens", self.tokens.limit
            message = f"tokens per min (TPM): Limit {limit}, Requested {self.requested_tokens}."
            if self.refused == "tokens_too_large":
                return GatewayError(
                    429,
                    f"Request too large for this API key on {message} "
                    "Send fewer prompt tokens or ask for a higher limit.",
                    type=kind,
                    code="rate_limit_exceeded",
                    headers=self.headers(),
                )
        else:  # pragma: no cover - a refusal always names a configured limit
            kind, message = "requests", "an unknown limit."
        return GatewayError(
            429,
            f"Rate limit reached for this API key on {message} Please try again in {wait}.",
            type=kind,
            code="rate_limit_exceeded",
            headers=self.headers(),
        )


def format_duration(seconds: float) -> str:
    """Durations as OpenAI's headers write them: `120ms`, `1.5s`, `6m0s`, `1h0m0s`."""
    ms = math.ceil(seconds * 1000)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def decide(
    limits: KeyLimits,
    requests_level: float,
    tokens_level: float,
    in_flight: int,
    prompt_tokens: int,
) -> tuple[str | None, float]:
    """Which limit refuses an admission, if any, and how long until it would not."""
    need = max(prompt_tokens, 1)
    if limits.rpm and requests_level < 1:
        return "requests", (1 - requests_level) * SECONDS_PER_WINDOW / limits.rpm
    if limits.tpm and prompt_tokens > limits.tpm:
        return "tokens_too_large", (limits.tpm - tokens_level) * SECONDS_PER_WINDOW / limits.tpm
    if limits.tpm and tokens_level < need:
        return "tokens", (need - tokens_level) * SECONDS_PER_WINDOW / limits.tpm
    if limits.concurrency and in_flight >= limits.concurrency:
        return "concurrency", 1.0
    return None, 0.0


class RateLimiter(Protocol):
    async def acquire(
        self, key_id: str, limits: KeyLimits, request_id: str, prompt_tokens: int
    ) -> RateDecision:
        """Admit one request (taking a request, the prompt tokens and a concurrency slot) or
        refuse it taking nothing."""
        ...

    async def charge_tokens(self, key_id: str, limits: KeyLimits, tokens: int) -> None:
        """Take tokens generated after admission."""
        ...

    async def release(
        self, key_id: str, limits: KeyLimits, request_id: str, refund_tokens: int = 0
    ) -> None:
        """Free the concurrency slot and give back `refund_tokens` (negative: take them)."""
        ...

    async def touch(self, key_id: str, limits: KeyLimits, request_id: str) -> None:
        """The request is still running (renews a lease where slots have one)."""
        ...

    async def close(self) -> None: ...


@dataclass
class _Bucket:
    level: float
    at: float


@dataclass
class _KeyState:
    requests: _Bucket | None = None
    tokens: _Bucket | None = None
    in_flight: set[str] = field(default_factory=set)


class MemoryLimiter:
    """The limiter of a single process (the default)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    def _level(self, bucket: _Bucket | None, limit: int | None, now: float) -> _Bucket | None:
        if not limit:
            return None
        if bucket is None:
            return _Bucket(float(limit), now)
        rate = limit / SECONDS_PER_WINDOW
        bucket.level = min(float(limit), bucket.level + (now - bucket.at) * rate)
        bucket.at = now
        return bucket

    def _refresh(self, key_id: str, limits: KeyLimits) -> _KeyState:
        state = self._keys.setdefault(key_id, _KeyState())
        now = self._clock()
        state.requests = self._level(state.requests, limits.rpm, now)
        state.tokens = self._level(state.tokens, limits.tpm, now)
        return state

    async def acquire(
        self, key_id: str, limits: KeyLimits, request_id: str, prompt_tokens: int
    ) -> RateDecision:
        state = self._refresh(key_id, limits)
        req_level = state.requests.level if state.requests else 0.0
        tok_level = state.tokens.level if state.tokens else 0.0
        refused, retry = decide(limits, req_level, tok_level, len(state.in_flight), prompt_tokens)
        if refused is None:
            if state.requests is not None:
                state.requests.level -= 1
            if state.tokens is not None:
                state.tokens.level -= prompt_tokens
            if limits.concurrency:
                state.in_flight.add(request_id)
        return RateDecision(
            requests=BucketState(limits.rpm, state.requests.level)
            if state.requests and limits.rpm
            else None,
            tokens=BucketState(limits.tpm, state.tokens.level)
            if state.tokens and limits.tpm
            else None,
            refused=refused,
            retry_after_s=retry,
            concurrency_limit=limits.concurrency,
            in_flight=len(state.in_flight),
            requested_tokens=prompt_tokens,
        )

    async def charge_tokens(self, key_id: str, limits: KeyLimits, tokens: int) -> None:
        state = self._refresh(key_id, limits)
        if state.tokens is not None and limits.tpm:
            state.tokens.level = min(float(limits.tpm), state.tokens.level - tokens)

    async def release(
        self, key_id: str, limits: KeyLimits, request_id: str, refund_tokens: int = 0
    ) -> None:
        state = self._refresh(key_id, limits)
        state.in_flight.discard(request_id)
        if state.tokens is not None and limits.tpm and refund_tokens:
            state.tokens.level = min(float(limits.tpm), state.tokens.level + refund_tokens)

    async def touch(self, key_id: str, limits: KeyLimits, request_id: str) -> None:
        return None

    async def close(self) -> None:
        self._keys.clear()
