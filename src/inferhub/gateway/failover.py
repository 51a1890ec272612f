"""What the rate limits do while the shared limiter (Redis) is unreachable.

`FailoverLimiter` wraps the shared limiter. When a call to it fails with a connection error
it logs one warning for the outage and then, as configured:

- ``"memory"`` (the default): falls back to this replica's in-memory limiter, so limits
  still hold per replica (a key may get up to replicas x its limit while Redis is down);
- ``"closed"``: refuses the admission with 503 (no request runs without its shared limit).

Each request is released on the limiter that admitted it. The shared limiter is tried again
on every admission, so service returns to shared limits as soon as Redis answers; one more
log line says so.
"""

from __future__ import annotations

import logging
from typing import Literal

from inferhub.gateway.interface import GatewayError
from inferhub.gateway.ratelimit import MemoryLimiter, RateDecision, RateLimiter
from inferhub.gateway.records import KeyLimits

log = logging.getLogger(__name__)

FailureMode = Literal["memory", "closed"]
FAILURE_MODES: tuple[FailureMode, ...] = ("memory", "closed")
RETRY_AFTER_S = 5


def limiter_unavailable() -> GatewayError:
    return GatewayError(
        503,
        "The rate limiter is unavailable; please retry shortly.",
        type="server_error",
        code="rate_limiter_unavailable",
        headers={"retry-after": str(RETRY_AFTER_S)},
    )


class FailoverLimiter:
    """The shared limiter, with a fallback (or a refusal) while it cannot be reached."""

    def __init__(
        self,
        shared: RateLimiter,
        mode: FailureMode = "memory",
        *,
        unavailable: tuple[type[BaseException], ...] = (ConnectionError, OSError, TimeoutError),
        fallback: RateLimiter | None = None,
    ) -> None:
        if mode not in FAILURE_MODES:
            raise ValueError(f"unknown rate-limiter failure mode {mode!r}")
        self.shared = shared
        self.mode = mode
        self.fallback: RateLimiter = fallback or MemoryLimiter()
        self._unavailable = unavailable
        self._down = False
        self._on_fallback: set[str] = set()  # request ids admitted by the fallback

    @property
    def is_down(self) -> bool:
        return self._down

    def _failed(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            then = (
                "limits are kept per replica in memory until it is back"
                if self.mode == "memory"
                else "requests are refused with 503 until it is back"
            )
            log.warning("the shared rate limiter is unreachable (%s); %s", exc, then)

    def _ok(self) -> None:
        if self._down:
            self._down = False
            log.warning("the shared rate limiter is reachable again; limits are shared again")

    async def acquire(
        self, key_id: str, limits: KeyLimits, request_id: str, prompt_tokens: int
    ) -> RateDecision:
        try:
            decision = await self.shared.acquire(key_id, limits, request_id, prompt_tokens)
        except self._unavailable as exc:
            self._failed(exc)
            if self.mode == "closed":
                raise limiter_unavailable() from exc
            decision = await self.fallback.acquire(key_id, limits, request_id, prompt_tokens)
            if decision.allowed:
                self._on_fallback.add(request_id)
            return decision
        self._ok()
        return decision

    async def charge_tokens(self, key_id: str, limits: KeyLimits, tokens: int) -> None:
        try:
            await self.shared.charge_tokens(key_id, limits, tokens)
        except self._unavailable as exc:
            self._failed(exc)
            await self.fallback.charge_tokens(key_id, limits, tokens)

    async def release(
        self, key_id: str, limits: KeyLimits, request_id: str, refund_tokens: int = 0
    ) -> None:
        if request_id in self._on_fallback:
            self._on_fallback.discard(request_id)
            await self.fallback.release(key_id, limits, request_id, refund_tokens)
            return
        try:
            await self.shared.release(key_id, limits, request_id, refund_tokens)
        except self._unavailable as exc:
            # The slot's lease in Redis runs out by itself (RedisLimiter's lease_s).
            self._failed(exc)

    async def touch(self, key_id: str, limits: KeyLimits, request_id: str) -> None:
        if request_id in self._on_fallback:
            return
        try:
            await self.shared.touch(key_id, limits, request_id)
        except self._unavailable as exc:
            self._failed(exc)

    async def close(self) -> None:
        try:
            await self.shared.close()
        finally:
            await self.fallback.close()
