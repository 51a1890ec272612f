"""Rate limits: requests/min, tokens/min and concurrency, each enforced with OpenAI's headers,
in memory (exact, on a fake clock) and in a real Redis, shared between two gateways."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gateway_helpers import bearer, new_account, new_key, settings

from inferhub.gateway import usage
from inferhub.gateway.factory import bootstrap, open_database
from inferhub.gateway.gateway import DatabaseGateway
from inferhub.gateway.interface import Admission, GatewayError, Principal
from inferhub.gateway.ratelimit import MemoryLimiter, RateLimiter, format_duration
from inferhub.gateway.records import KeyLimits
from inferhub.gateway.redis_limiter import RedisLimiter

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_durations_read_like_openais() -> None:
    assert [format_duration(s) for s in (0, 0.12, 1, 1.5, 59.9984, 60, 360, 3725.5)] == [
        "0s",
        "120ms",
        "1s",
        "1.5s",
        "59.999s",
        "1m0s",
        "6m0s",
        "1h2m5.5s",
    ]


async def test_memory_requests_per_minute_exact() -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(clock)
    limits = KeyLimits(rpm=3)
    for left in (2, 1, 0):
        decision = await limiter.acquire("k", limits, "r", 10)
        assert decision.allowed
        assert decision.headers() == {
            "x-ratelimit-limit-requests": "3",
            "x-ratelimit-remaining-requests": str(left),
            "x-ratelimit-reset-requests": format_duration((3 - left) * 20),
        }
    refused = await limiter.acquire("k", limits, "r", 10)
    assert refused.refused == "requests" and refused.retry_after_s == 20
    error = refused.error()
    assert (error.status, error.code, error.type) == (429, "rate_limit_exceeded", "requests")
    assert error.headers["retry-after"] == "20" and error.headers["retry-after-ms"] == "20000"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.now += 20
    assert (await limiter.acquire("k", limits, "r", 10)).allowed
    assert not (await limiter.acquire("k", limits, "r", 10)).allowed
    assert (await limiter.acquire("other-key", limits, "r", 10)).allowed  # per key


async def test_memory_tokens_per_minute_exact() -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(clock)
    limits = KeyLimits(tpm=100)
    first = await limiter.acquire("k", limits, "a", 60)
    assert first.headers()["x-ratelimit-remaining-tokens"] == "40"
    assert first.headers()["x-ratelimit-reset-tokens"] == "36s"
    await limiter.charge_tokens("k", limits, 50)  # completion tokens: 10 in debt now
    refused = await limiter.acquire("k", limits, "b", 10)
    assert refused.refused == "tokens" and refused.retry_after_s == pytest.approx(12)
    error = refused.error()
    assert (error.type, error.headers["retry-after"]) == ("tokens", "12")
    assert error.headers["x-ratelimit-remaining-tokens"] == "0"
    too_large = await limiter.acquire("k", limits, "c", 101)
    assert too_large.refused == "tokens_too_large" and "too large" in too_large.error().message
    clock.now += 12
    assert (await limiter.acquire("k", limits, "b", 10)).allowed


async def test_memory_concurrency_exact() -> None:
    limiter = MemoryLimiter(FakeClock())
    limits = KeyLimits(concurrency=2)
    assert (await limiter.acquire("k", limits, "a", 1)).allowed
    assert (await limiter.acquire("k", limits, "b", 1)).allowed
    refused = await limiter.acquire("k", limits, "c", 1)
    assert refused.refused == "concurrency" and refused.error().headers["retry-after"] == "1"
    await limiter.release("k", limits, "a")
    assert (await limiter.acquire("k", limits, "c", 1)).allowed


# -- through the gateway, with the in-memory limiter and with Redis -----------------------------


@pytest.fixture(params=["memory", "redis"])
def make_limiter(request: pytest.FixtureRequest) -> object:
    namespace = "test:" + secrets.token_hex(4)  # fresh state for each test

    def make() -> RateLimiter:
        if request.param == "memory":
            return MemoryLimiter()
        return RedisLimiter(request.getfixturevalue("redis_server"), namespace=namespace)

    if request.param == "redis":
        request.getfixturevalue("redis_server")
    return make


async def open_gateway(data_dir: Path, limiter: RateLimiter, instance: str) -> DatabaseGateway:
    db = open_database(None, data_dir)
    bootstrap(db, admin_key=None, announce=lambda _: None)
    flush = 0.25 if isinstance(limiter, RedisLimiter) else 0.0  # as create_gateway does
    gateway = DatabaseGateway(
        db, limiter, settings(instance=instance, tokens_flush_interval_s=flush)
    )
    await gateway.start()
    return gateway


@pytest.fixture
async def limited(make_limiter: object, data_dir: Path) -> AsyncIterator[DatabaseGateway]:
    assert callable(make_limiter)
    gateway = await open_gateway(data_dir, make_limiter(), "a")
    yield gateway
    await gateway.close()


async def admit(gw: DatabaseGateway, p: Principal, rid: str, prompt: int = 10) -> Admission:
    return await gw.admit(
        p, request_id=rid, model="m", prompt_tokens=prompt, max_completion_tokens=10
    )


async def finish(gw: DatabaseGateway, a: Admission, prompt: int = 10, completion: int = 0) -> None:
    await gw.settle(
        a,
        prompt_tokens=prompt,
        completion_tokens=completion,
        end_state="completed",
        finish_reasons=["stop"],
    )


async def test_gateway_enforces_rpm_with_headers(limited: DatabaseGateway) -> None:
    p = await limited.authenticate(
        bearer(new_key(limited, new_account(limited), limits=KeyLimits(rpm=3)))
    )
    for i, left in enumerate(("2", "1", "0")):
        admission = await admit(limited, p, f"r{i}")
        assert admission.headers["x-ratelimit-limit-requests"] == "3"
        assert admission.headers["x-ratelimit-remaining-requests"] == left
        await finish(limited, admission)
    with pytest.raises(GatewayError) as info:
        await admit(limited, p, "r3")
    e = info.value
    assert (e.status, e.code, e.type) == (429, "rate_limit_exceeded", "requests")
    assert e.headers["retry-after"] in ("19", "20")
    assert e.headers["x-ratelimit-remaining-requests"] == "0"
    assert e.headers["x-ratelimit-reset-requests"].endswith("s")
    row = usage.get_usage(limited.db, "r3")
    assert row is not None and row.finish_reasons == ["rate_limit_exceeded"]


async def test_gateway_enforces_tpm_counting_streamed_tokens(limited: DatabaseGateway) -> None:
    p = await limited.authenticate(
        bearer(new_key(limited, new_account(limited), limits=KeyLimits(tpm=100)))
    )
    admission = await admit(limited, p, "a", prompt=60)
    assert admission.headers["x-ratelimit-remaining-tokens"] == "40"
    for _ in range(50):
        await limited.record_tokens(admission, 1)
    await finish(limited, admission, prompt=60, completion=50)
    with pytest.raises(GatewayError) as info:
        await admit(limited, p, "b", prompt=10)
    e = info.value
    assert (e.status, e.code, e.type) == (429, "rate_limit_exceeded", "tokens")
    assert e.headers["x-ratelimit-limit-tokens"] == "100"
    assert e.headers["x-ratelimit-remaining-tokens"] == "0"
    assert e.headers["retry-after"] in ("11", "12")


async def test_gateway_enforces_concurrency(limited: DatabaseGateway) -> None:
    p = await limited.authenticate(
        bearer(new_key(limited, new_account(limited), limits=KeyLimits(concurrency=2)))
    )
    first, _second = await admit(limited, p, "a"), await admit(limited, p, "b")
    with pytest.raises(GatewayError) as info:
        await admit(limited, p, "c")
    assert (info.value.status, info.value.code) == (429, "rate_limit_exceeded")
    assert info.value.headers["retry-after"] == "1"
    await finish(limited, first)
    await finish(limited, await admit(limited, p, "d"))


async def test_refused_reservation_gives_back_its_rate_limit_slot(limited: DatabaseGateway) -> None:
    from inferhub.gateway import accounts

    accounts.set_price(limited.db, "m", 1_000_000, 1_000_000)
    account = new_account(limited, credit=15)
    p = await limited.authenticate(
        bearer(new_key(limited, account, limits=KeyLimits(concurrency=1)))
    )
    with pytest.raises(GatewayError) as info:  # 10 + 10 > 15: no quota
        await admit(limited, p, "a")
    assert info.value.code == "insufficient_quota"
    accounts.add_credit(limited.db, account.id, 100)
    await finish(limited, await admit(limited, p, "b"))  # the slot was given back


async def test_redis_limits_are_shared_between_two_gateways(
    redis_server: str, data_dir: Path
) -> None:
    namespace = "shared:" + secrets.token_hex(4)
    a = await open_gateway(data_dir, RedisLimiter(redis_server, namespace=namespace), "a")
    b = await open_gateway(data_dir, RedisLimiter(redis_server, namespace=namespace), "b")
    try:
        account = new_account(a)
        secret = new_key(a, account, limits=KeyLimits(rpm=4))
        pa, pb = await a.authenticate(bearer(secret)), await b.authenticate(bearer(secret))
        for i, (gate, p) in enumerate([(a, pa), (b, pb), (a, pa), (b, pb)]):
            await finish(gate, await admit(gate, p, f"r{i}"))
        for gate, p, rid in ((a, pa, "x"), (b, pb, "y")):
            with pytest.raises(GatewayError) as info:
                await admit(gate, p, rid)
            assert info.value.headers["x-ratelimit-remaining-requests"] == "0"

        secret = new_key(a, account, limits=KeyLimits(concurrency=1))
        pa, pb = await a.authenticate(bearer(secret)), await b.authenticate(bearer(secret))
        held = await admit(a, pa, "held")
        with pytest.raises(GatewayError) as info:
            await admit(b, pb, "blocked")
        assert info.value.code == "rate_limit_exceeded"
        await finish(a, held)
        await finish(b, await admit(b, pb, "after"))
    finally:
        await a.close()
        await b.close()
