"""The database gateway: the Gatekeeper that bills every request, with its rate limits and upkeep.

Per request the server calls `authenticate`, `admit`, `record_tokens` (as tokens are
generated) and exactly one `settle`. Database work runs on the gateway's own thread pool;
rate limits run in memory or in Redis. A request in flight is tracked in memory (its
tokens so far) and checkpointed to its usage row every `checkpoint_interval_s`, so that a
crash loses at most that much of its bill. `start()` recovers reservations left open by a
previous crash; `close()` settles what is still in flight as "shutdown".

While the database is unreachable (server down, connection lost, disk full) new requests are
refused with 503 and `Retry-After`; a request that was already running is served to its end
and its settlement is retried until the database answers again, so nothing served goes
unbilled (if the process dies first, the next start's recovery closes it at its last
checkpoint).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, ParamSpec, TypeVar

from inferhub.gateway import billing, recovery
from inferhub.gateway.auth import lookup_secret, missing_key, principal_for_key
from inferhub.gateway.db import Database, is_unavailable
from inferhub.gateway.interface import Admission, GatewayError, Principal
from inferhub.gateway.keys import parse_bearer
from inferhub.gateway.ratelimit import RateLimiter
from inferhub.gateway.records import KeyPrincipal, UsageRecord

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class GatewaySettings:
    instance: str = "default"  # unique per replica sharing a database
    currency: str = "USD"  # the unit of the micro-units
    checkpoint_interval_s: float = 1.0  # how often a stream's tokens so far are saved
    tokens_flush_interval_s: float = 0.0  # how often streamed tokens are charged to TPM
    heartbeat_interval_s: float = 10.0
    stale_after_s: float = 60.0  # a replica silent this long has its reservations recovered
    record_refusals: bool = True  # a usage row also for requests refused by 403/429
    db_threads: int = 8
    settle_wait_s: float = 5.0  # how long a response waits for its settlement to be written
    settle_retry_max_s: float = 5.0  # the longest pause between retries of a settlement
    close_timeout_s: float = 30.0  # how long close() waits for settlements still retrying


DB_RETRY_AFTER_S = 5


def _is_bad_value(exc: BaseException) -> bool:
    """Whether the database refused a value the caller sent (PostgreSQL: a NUL character in
    text, text longer than its column), SQLAlchemy's wrapper and the driver's own alike."""
    orig = getattr(exc, "orig", None) or exc
    return any(cls.__name__ == "DataError" for cls in type(orig).__mro__)


class DatabaseUnavailable(GatewayError):
    """The gateway's database cannot be reached or written now; the request may be retried."""

    def __init__(self) -> None:
        super().__init__(
            503,
            "The service's database is unavailable; please retry shortly.",
            type="server_error",
            code="database_unavailable",
            headers={"retry-after": str(DB_RETRY_AFTER_S)},
        )


@dataclass
class _InFlight:
    principal: KeyPrincipal
    prompt_tokens: int
    started: float
    completion_tokens: int = 0  # recorded so far
    tokens_charged: int = 0  # of those, charged to the TPM limit
    last_flush: float = 0.0
    last_checkpoint: float = 0.0


class DatabaseGateway:
    """Accounts, keys, billing and rate limits on SQLAlchemy (SQLite or PostgreSQL)."""

    def __init__(
        self,
        db: Database,
        limiter: RateLimiter,
        settings: GatewaySettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.limiter = limiter
        self.settings = settings or GatewaySettings()
        self._clock = clock
        self._executor = ThreadPoolExecutor(self.settings.db_threads, "gateway-db")
        self._in_flight: dict[str, _InFlight] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False
        self._db_down = False  # one log line when the database goes away, one when it is back

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> list[UsageRecord]:
        """Recover reservations a crash left open, then keep a heartbeat; returns what it closed."""
        s = self.settings
        await self.call(recovery.heartbeat, self.db, s.instance)
        recovered = await self.call(
            recovery.recover, self.db, s.instance, stale_after_s=s.stale_after_s, include_own=True
        )
        for record in recovered:
            log.warning("recovered open reservation %s (%s)", record.request_id, record.end_state)
        self._heartbeat = asyncio.create_task(self._upkeep())
        return recovered

    async def close(self) -> None:
        """Settle requests still in flight as "shutdown", then release every resource."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        for request_id, flight in list(self._in_flight.items()):
            admission = Admission(request_id, flight.principal, model="")
            del self._in_flight[request_id]
            self._spawn(
                self._settle(
                    admission,
                    flight,
                    flight.prompt_tokens if flight.completion_tokens else 0,
                    flight.completion_tokens,
                    "shutdown",
                    [],
                )
            )
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.close_timeout_s)
            for task in pending:  # the database is still away: the next start recovers them
                task.cancel()
            if pending:
                log.error(
                    "%d settlements could not be written before shutdown; the next start "
                    "recovers them from their last checkpoint",
                    len(pending),
                )
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            await self.call(recovery.forget_instance, self.db, self.settings.instance)
        except Exception:
            log.exception("could not unregister gateway instance")
        await self.limiter.close()
        self._executor.shutdown(wait=True)
        self.db.close()

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a synchronous store function (accounts.*, usage.*) on the database threads;
        DatabaseUnavailable (503) if the database cannot be reached."""
        loop = asyncio.get_running_loop()
        return await self._guard(loop.run_in_executor(self._executor, partial(fn, *args, **kwargs)))

    async def _guard(self, work: Awaitable[T]) -> T:
        try:
            result = await work
        except Exception as exc:
            if is_unavailable(exc):
                self._database_down(exc)
                raise DatabaseUnavailable() from exc
            if _is_bad_value(exc):
                raise GatewayError(
                    400,
                    "A value in the request cannot be stored or searched for (a NUL character, "
                    "or text longer than the field allows).",
                    code="invalid_value",
                ) from None  # the driver's message quotes the statement and its parameters
            raise
        self._database_up()
        return result

    def _database_down(self, exc: BaseException) -> None:
        if not self._db_down:
            self._db_down = True
            log.error("the database is unavailable (%s); refusing new requests with 503", exc)

    def _database_up(self) -> None:
        if self._db_down:
            self._db_down = False
            log.warning("the database is reachable again")

    # -- the Gatekeeper protocol -----------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> KeyPrincipal:
        secret = parse_bearer(authorization)
        if secret is None:
            raise missing_key()
        if self.db.is_sqlite:
            # One indexed read (~50 us); in WAL mode readers never wait for the writer, so
            # it costs the event loop less than the hop to a thread would.
            try:
                return lookup_secret(self.db, secret)
            except Exception as exc:
                if is_unavailable(exc):
                    self._database_down(exc)
                    raise DatabaseUnavailable() from exc
                raise
        return await self.call(lookup_secret, self.db, secret)

    async def admit(
        self,
        principal: Principal,
        *,
        request_id: str,
        model: str,
        prompt_tokens: int,
        max_completion_tokens: int,
    ) -> Admission:
        if prompt_tokens < 0 or max_completion_tokens < 0:
            raise GatewayError(400, "Token counts must not be negative.")
        if isinstance(principal, KeyPrincipal):
            p = principal
        else:
            p = await self.call(principal_for_key, self.db, principal.key_id)
        if p.allowed_models and model not in p.allowed_models:
            await self._refused(p, request_id, model, max_completion_tokens, "model_not_allowed")
            raise GatewayError(
                403,
                f"This API key is not allowed to use the model '{model}'.",
                code="model_not_allowed",
                param="model",
            )
        try:
            decision = await self.limiter.acquire(p.key_id, p.limits, request_id, prompt_tokens)
        except GatewayError:
            raise
        except Exception as exc:
            log.exception("rate limiter failed")
            raise GatewayError(503, "Rate limiter unavailable.", type="server_error") from exc
        if not decision.allowed:
            await self._refused(p, request_id, model, max_completion_tokens, "rate_limit_exceeded")
            raise decision.error()
        future = asyncio.get_running_loop().run_in_executor(
            self._executor,
            partial(
                billing.reserve,
                self.db,
                p,
                request_id=request_id,
                model=model,
                prompt_tokens=prompt_tokens,
                max_completion_tokens=max_completion_tokens,
                instance=self.settings.instance,
            ),
        )
        try:
            reservation = await self._guard(asyncio.shield(future))
        except asyncio.CancelledError:
            # The caller went away while the thread reserved: undo both once it has.
            self._spawn(self.limiter.release(p.key_id, p.limits, request_id, prompt_tokens))
            future.add_done_callback(lambda f: self._spawn(self._release_orphan(f, request_id)))
            raise
        except BaseException:
            await self.limiter.release(p.key_id, p.limits, request_id, prompt_tokens)
            raise
        now = self._clock()
        self._in_flight[request_id] = _InFlight(
            p, prompt_tokens, now, last_flush=now, last_checkpoint=now
        )
        return Admission(request_id, p, model, reservation.reserved_micros, decision.headers())

    async def record_tokens(self, admission: Admission, completion_tokens: int) -> None:
        flight = self._in_flight.get(admission.request_id)
        if flight is None or completion_tokens <= 0:
            return
        flight.completion_tokens += completion_tokens
        now = self._clock()
        p = flight.principal
        if now - flight.last_flush >= self.settings.tokens_flush_interval_s:
            flight.last_flush = now
            await self._charge(flight)
        if now - flight.last_checkpoint >= self.settings.checkpoint_interval_s:
            flight.last_checkpoint = now
            self._spawn(self._checkpoint(admission.request_id, flight.completion_tokens, p))

    async def settle(
        self,
        admission: Admission,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        end_state: str,
        finish_reasons: list[str],
    ) -> None:
        flight = self._in_flight.pop(admission.request_id, None)
        task = self._spawn(
            self._settle(
                admission, flight, prompt_tokens, completion_tokens, end_state, finish_reasons
            )
        )
        # The caller (a response) waits for the usage row a little, not for a database outage;
        # the task goes on retrying, and a cancelled caller does not cancel it.
        await asyncio.wait({task}, timeout=self.settings.settle_wait_s)

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _refused(
        self, p: KeyPrincipal, request_id: str, model: str, max_tokens: int, code: str
    ) -> None:
        if self.settings.record_refusals:
            await self.call(
                billing.record_refusal,
                self.db,
                p,
                request_id=request_id,
                model=model,
                max_completion_tokens=max_tokens,
                code=code,
                instance=self.settings.instance,
            )

    async def _charge(self, flight: _InFlight) -> None:
        tokens = flight.completion_tokens - flight.tokens_charged
        if tokens <= 0:
            return
        flight.tokens_charged += tokens
        try:
            await self.limiter.charge_tokens(
                flight.principal.key_id, flight.principal.limits, tokens
            )
        except Exception:
            log.exception("could not charge tokens to the rate limiter")

    async def _checkpoint(self, request_id: str, tokens: int, p: KeyPrincipal) -> None:
        try:
            await self.call(billing.checkpoint, self.db, request_id, tokens)
            await self.limiter.touch(p.key_id, p.limits, request_id)
        except DatabaseUnavailable:
            pass  # logged once for the outage; the settlement is retried
        except Exception:
            log.exception("could not checkpoint request %s", request_id)

    async def _settle(
        self,
        admission: Admission,
        flight: _InFlight | None,
        prompt_tokens: int,
        completion_tokens: int,
        end_state: str,
        finish_reasons: list[str],
    ) -> None:
        request_id = admission.request_id
        pause = 0.25
        while True:
            try:
                await self.call(
                    billing.settle,
                    self.db,
                    request_id,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    end_state=end_state,
                    finish_reasons=finish_reasons,
                )
                break
            except DatabaseUnavailable:
                # Idempotent (it closes only an open row): retry until the database is back.
                await asyncio.sleep(pause)
                pause = min(2 * pause, self.settings.settle_retry_max_s)
            except Exception:
                # Left open: the next start (or another replica's sweep) recovers it.
                log.exception("could not settle request %s", request_id)
                break
        if flight is None:
            return
        p = flight.principal
        # One call frees the slot and charges what was not charged yet (< 0 gives back).
        unflushed = completion_tokens - flight.tokens_charged
        charge = unflushed + prompt_tokens - flight.prompt_tokens
        try:
            await self.limiter.release(p.key_id, p.limits, request_id, refund_tokens=-charge)
        except Exception:
            log.exception("could not release rate-limit state of %s", request_id)

    async def _release_orphan(self, future: asyncio.Future[Any], request_id: str) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        await self.call(
            billing.settle,
            self.db,
            request_id,
            prompt_tokens=0,
            completion_tokens=0,
            end_state="client_disconnected",
            finish_reasons=[],
        )

    async def _upkeep(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(s.heartbeat_interval_s)
            try:
                await self.call(recovery.heartbeat, self.db, s.instance)
                await self.call(
                    recovery.recover,
                    self.db,
                    s.instance,
                    stale_after_s=s.stale_after_s,
                    include_own=False,
                )
            except DatabaseUnavailable:
                pass  # logged once for the outage
            except Exception:
                log.exception("gateway upkeep failed")
