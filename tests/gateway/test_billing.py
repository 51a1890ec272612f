"""Billing: exact bills from the engine's counts, one settlement per request, reservations that
never let concurrent requests overspend, prices fixed at admission, spend caps, shutdown."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from gateway_helpers import bearer, new_account, new_key, settings

from inferhub.gateway import accounts, billing, usage
from inferhub.gateway.factory import create_gateway, open_database
from inferhub.gateway.gateway import DatabaseGateway
from inferhub.gateway.interface import GatewayError, Principal
from inferhub.gateway.money import cost_micros
from inferhub.gateway.usage import UsageFilter

pytestmark = pytest.mark.anyio

INPUT, OUTPUT = 150_000, 600_000  # micro-units per million tokens: 0.15 and 0.60


@dataclass
class Scripted:
    """One request as the server would drive it, and what it reported to its client."""

    request_id: str
    prompt: int
    max_completion: int  # n x max_tokens
    pieces: list[int]  # completion tokens as the engine produced them
    end_state: str = "completed"
    finish: list[str] = field(default_factory=lambda: ["stop"])
    stream: bool = False

    @property
    def completion(self) -> int:
        return sum(self.pieces)


async def drive(gw: DatabaseGateway, principal: Principal, r: Scripted, model: str = "m") -> None:
    admission = await gw.admit(
        principal,
        request_id=r.request_id,
        model=model,
        prompt_tokens=r.prompt,
        max_completion_tokens=r.max_completion,
    )
    if r.stream:
        for piece in r.pieces:
            await gw.record_tokens(admission, piece)
    await gw.settle(
        admission,
        prompt_tokens=r.prompt,
        completion_tokens=r.completion,
        end_state=r.end_state,
        finish_reasons=r.finish,
    )


async def test_scripted_mix_bills_exactly(gw: DatabaseGateway) -> None:
    accounts.set_price(gw.db, "m", INPUT, OUTPUT)
    account = new_account(gw, credit=1_000_000)
    principal = await gw.authenticate(bearer(new_key(gw, account)))
    script = [
        Scripted("plain", 17, 50, [23]),
        Scripted("stream", 9, 40, [1] * 12, stream=True),
        Scripted("n3", 11, 3 * 10, [10, 7, 10], finish=["length", "stop", "length"]),
        Scripted("stop-hit", 30, 64, [5], finish=["stop"], stream=True),
        Scripted("max-tokens-hit", 8, 32, [32], finish=["length"]),
        Scripted("disconnect", 14, 100, [2, 1, 2], "client_disconnected", ["abort"], stream=True),
        Scripted("engine-error", 12, 20, [], "error", ["abort"]),
    ]
    for r in script:
        await drive(gw, principal, r)
    with pytest.raises(GatewayError) as info:
        await drive(gw, principal, Scripted("too-expensive", 10, 10_000_000, [1]))
    assert (info.value.status, info.value.code, info.value.type) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )

    rows = {u.request_id: u for u in usage.list_usage(gw.db, UsageFilter(account.id), limit=100)}
    assert set(rows) == {r.request_id for r in script} | {"too-expensive"}
    for r in script:
        row = rows[r.request_id]
        assert (row.prompt_tokens, row.completion_tokens) == (r.prompt, r.completion)
        assert row.cost_micros == cost_micros(r.prompt, r.completion, INPUT, OUTPUT)
        assert (row.status, row.end_state, row.finish_reasons) == ("closed", r.end_state, r.finish)
        assert row.ended_at is not None and row.ended_at >= row.started_at
    refused = rows["too-expensive"]
    assert (refused.end_state, refused.cost_micros, refused.prompt_tokens) == ("rejected", 0, 0)

    total = sum(u.cost_micros for u in rows.values())
    after = accounts.find_account(gw.db, account.id)
    assert after.balance_micros == 1_000_000 - total
    assert after.reserved_micros == 0
    audit = usage.audit(gw.db, account.id)
    assert audit.consistent, audit
    totals = usage.usage_totals(gw.db, UsageFilter(account.id))
    assert totals[0].cost_micros == total and totals[0].requests == len(script) + 1
    by_model = usage.usage_totals(gw.db, UsageFilter(account.id), "model")
    assert [(g.group, g.completion_tokens) for g in by_model] == [
        ("m", sum(r.completion for r in script))
    ]


async def test_fifty_concurrent_admits_never_overspend_a_balance_for_ten(
    gw: DatabaseGateway, database_url: str | None, data_dir: Path
) -> None:
    """Half of the requests go through a second gateway on the same database."""
    accounts.set_price(gw.db, "m", 0, 1_000_000)  # one micro-unit per completion token
    account = new_account(gw, credit=1_000)  # pays for ten requests of 100 tokens
    secret = new_key(gw, account)
    other = create_gateway(database_url, data_dir, settings=settings(instance="other"))
    await other.start()
    try:

        async def one(i: int) -> str:
            gate = gw if i % 2 else other
            try:
                admission = await gate.admit(
                    await gate.authenticate(bearer(secret)),
                    request_id=f"c{i}",
                    model="m",
                    prompt_tokens=5,
                    max_completion_tokens=100,
                )
            except GatewayError as exc:
                return exc.code or ""
            await asyncio.sleep(0.01)  # hold the reservation while the others try
            assert accounts.find_account(gw.db, account.id).available_micros >= 0
            await gate.settle(
                admission,
                prompt_tokens=5,
                completion_tokens=100,
                end_state="completed",
                finish_reasons=["length"],
            )
            return "ok"

        results = await asyncio.gather(*(one(i) for i in range(50)))
    finally:
        await other.close()
    assert results.count("ok") == 10
    assert results.count("insufficient_quota") == 40
    after = accounts.find_account(gw.db, account.id)
    assert (after.balance_micros, after.reserved_micros) == (0, 0)
    assert usage.audit(gw.db, account.id).consistent


async def test_price_change_applies_to_requests_that_start_after_it(gw: DatabaseGateway) -> None:
    accounts.set_price(gw.db, "m", 1_000_000, 2_000_000)
    account = new_account(gw, credit=10_000_000)
    principal = await gw.authenticate(bearer(new_key(gw, account)))
    before = await gw.admit(
        principal, request_id="old", model="m", prompt_tokens=10, max_completion_tokens=10
    )
    accounts.set_price(gw.db, "m", 5_000_000, 7_000_000)
    later = await gw.admit(
        principal, request_id="new", model="m", prompt_tokens=10, max_completion_tokens=10
    )
    for admission in (before, later):
        await gw.settle(
            admission,
            prompt_tokens=10,
            completion_tokens=4,
            end_state="completed",
            finish_reasons=["stop"],
        )
    old, new = usage.get_usage(gw.db, "old"), usage.get_usage(gw.db, "new")
    assert old is not None and new is not None
    assert old.cost_micros == 10 * 1 + 4 * 2
    assert new.cost_micros == 10 * 5 + 4 * 7
    # A model without a price of its own pays the default ("*").
    accounts.set_price(gw.db, "*", 1_000_000, 1_000_000)
    other = await gw.admit(
        principal, request_id="dflt", model="x", prompt_tokens=3, max_completion_tokens=3
    )
    await gw.settle(
        other, prompt_tokens=3, completion_tokens=3, end_state="completed", finish_reasons=["stop"]
    )
    assert (usage.get_usage(gw.db, "dflt") or old).cost_micros == 6


async def test_settle_is_idempotent(gw: DatabaseGateway) -> None:
    accounts.set_price(gw.db, "m", 1_000_000, 1_000_000)
    account = new_account(gw, credit=1_000)
    principal = await gw.authenticate(bearer(new_key(gw, account)))
    admission = await gw.admit(
        principal, request_id="once", model="m", prompt_tokens=10, max_completion_tokens=90
    )
    assert admission.reserved_micros == 100
    assert accounts.find_account(gw.db, account.id).available_micros == 900

    async def settle() -> None:
        await gw.settle(
            admission,
            prompt_tokens=10,
            completion_tokens=20,
            end_state="completed",
            finish_reasons=["stop"],
        )

    await asyncio.gather(*(settle() for _ in range(5)))
    await settle()
    assert (
        billing.settle(
            gw.db,
            "once",
            prompt_tokens=1,
            completion_tokens=1,
            end_state="error",
            finish_reasons=[],
        )
        is None
    )
    after = accounts.find_account(gw.db, account.id)
    assert (after.balance_micros, after.reserved_micros) == (970, 0)
    row = usage.get_usage(gw.db, "once")
    assert row is not None and (row.cost_micros, row.completion_tokens) == (30, 20)
    with pytest.raises(GatewayError) as info:  # a request id is billed once, ever
        await gw.admit(
            principal, request_id="once", model="m", prompt_tokens=1, max_completion_tokens=1
        )
    assert info.value.status == 400


async def test_key_spend_cap_refuses_what_would_exceed_it(gw: DatabaseGateway) -> None:
    accounts.set_price(gw.db, "m", 1_000_000, 1_000_000)
    account = new_account(gw, credit=1_000_000)
    principal = await gw.authenticate(bearer(new_key(gw, account, spend_cap_micros=150)))
    first = await gw.admit(
        principal, request_id="a", model="m", prompt_tokens=50, max_completion_tokens=50
    )
    with pytest.raises(GatewayError) as info:  # 100 held + 100 more > 150
        await gw.admit(
            principal, request_id="b", model="m", prompt_tokens=50, max_completion_tokens=50
        )
    assert (info.value.status, info.value.code) == (429, "insufficient_quota")
    await gw.settle(
        first,
        prompt_tokens=50,
        completion_tokens=10,
        end_state="completed",
        finish_reasons=["stop"],
    )
    second = await gw.admit(
        principal, request_id="c", model="m", prompt_tokens=40, max_completion_tokens=50
    )
    await gw.settle(
        second,
        prompt_tokens=40,
        completion_tokens=50,
        end_state="completed",
        finish_reasons=["length"],
    )
    key = accounts.get_key(gw.db, principal.key_id)
    assert (key.spent_micros, key.reserved_micros) == (150, 0)


async def test_free_model_needs_no_credit(gw: DatabaseGateway) -> None:
    account = new_account(gw)  # no credit; the default price is zero
    principal = await gw.authenticate(bearer(new_key(gw, account)))
    admission = await gw.admit(
        principal, request_id="f", model="free", prompt_tokens=5, max_completion_tokens=5
    )
    await gw.settle(
        admission,
        prompt_tokens=5,
        completion_tokens=5,
        end_state="completed",
        finish_reasons=["stop"],
    )
    assert accounts.find_account(gw.db, account.id).balance_micros == 0


async def test_close_settles_requests_still_in_flight(
    database_url: str | None, data_dir: Path
) -> None:
    gate = create_gateway(database_url, data_dir, settings=settings(), announce=lambda _: None)
    await gate.start()
    accounts.set_price(gate.db, "m", 1_000_000, 1_000_000)
    account = new_account(gate, credit=1_000)
    principal = await gate.authenticate(bearer(new_key(gate, account)))
    admission = await gate.admit(
        principal, request_id="s", model="m", prompt_tokens=10, max_completion_tokens=50
    )
    await gate.record_tokens(admission, 3)
    await gate.close()
    db = open_database(database_url, data_dir)
    try:
        row = usage.get_usage(db, "s")
        assert row is not None
        assert (row.status, row.end_state, row.prompt_tokens, row.completion_tokens) == (
            "closed",
            "shutdown",
            10,
            3,
        )
        assert accounts.find_account(db, account.id).balance_micros == 1_000 - 13
        assert usage.audit(db, account.id).consistent
    finally:
        db.close()


async def test_caller_cancelled_during_reservation_leaves_nothing_held(data_dir: Path) -> None:
    """On SQLite, holding the writer lock catches the reservation inside its thread."""
    gw = create_gateway(None, data_dir, settings=settings(), announce=lambda _: None)
    await gw.start()
    try:
        accounts.set_price(gw.db, "m", 1_000_000, 1_000_000)
        account = new_account(gw, credit=1_000)
        principal = await gw.authenticate(bearer(new_key(gw, account)))
        lock = gw.db._write_lock
        assert lock is not None
        with lock:
            task = asyncio.create_task(
                gw.admit(
                    principal,
                    request_id="gone",
                    model="m",
                    prompt_tokens=10,
                    max_completion_tokens=10,
                )
            )
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        for _ in range(100):  # the thread reserves, then the gateway releases it
            row = usage.get_usage(gw.db, "gone")
            if row is not None and row.status == "closed":
                break
            await asyncio.sleep(0.02)
        assert row is not None and (row.end_state, row.cost_micros) == ("client_disconnected", 0)
        assert accounts.find_account(gw.db, account.id).reserved_micros == 0
    finally:
        await gw.close()
