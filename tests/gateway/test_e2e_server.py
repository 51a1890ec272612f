"""End to end through the real `inferhub serve` and its default, the database gateway, with the
embedded model, the official `openai` client and httpx: billing of a scripted mix of requests
equals what clients were told and what the engine counted, to the token and the micro-unit;
revoked and per-model keys; rate limits and their headers; keys never in clear; kill -9 and a
restart that closes every reservation; two replicas on PostgreSQL sharing limits in Redis."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
from e2e_server import MICROS, GatewayServer, cost, start_gateway_server, two_models
from live import MODEL

pytestmark = pytest.mark.slow

COUNT = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+(\.\d+)?m?s$")  # OpenAI's reset format: 1.5s, 6m0s


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def post(server: GatewayServer, secret: str, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": CAPITAL, "max_tokens": 1, **fields}
    return httpx.post(
        server.live.v1 + "/chat/completions", json=body, headers=auth(secret), timeout=120
    )


def error_of(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


def wait_closed(server: GatewayServer, account: str, request_id: str) -> dict[str, Any]:
    """The request's usage row once it is settled (a disconnect settles in the background)."""
    deadline = time.monotonic() + 10
    while True:
        row = server.rows(account).get(request_id)
        if row is not None and row["status"] == "closed":
            return row
        assert time.monotonic() < deadline, row
        time.sleep(0.05)


def content_of(sse_line: str) -> str:
    """The content delta of an SSE line of a chat stream ('' for anything else)."""
    if not sse_line.startswith("data: {"):
        return ""
    choices = json.loads(sse_line[len("data: ") :])["choices"]
    return str(choices[0]["delta"].get("content") or "") if choices else ""


def assert_books_balance(server: GatewayServer, account: str, credited: int) -> None:
    """Balance == credits - the sum of closed costs, nothing reserved, no open row, and the
    gateway's own audit (keys included) agrees."""
    rows = server.rows(account).values()
    assert all(row["status"] == "closed" for row in rows)
    info = server.account_info(account)
    assert info["balance_micros"] == credited - sum(row["cost_micros"] for row in rows)
    assert info["reserved_micros"] == 0
    audit = server.audit(account)
    assert audit["consistent"] is True, audit
    assert audit["open_reserved_micros"] == 0


# -- one server: SQLite (the default), two models, the admin key printed at first start -------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    gs = start_gateway_server(tmp_path_factory.mktemp("gateway-e2e"), *two_models())
    try:
        yield gs
    finally:
        code = gs.live.stop()
    assert code == 0


def test_billing_is_exact_for_a_scripted_mix(server: GatewayServer) -> None:
    price_in, price_out = 1_234_567, 300_000_007  # per million tokens; costs round up
    server.admin(
        "PUT",
        f"/admin/prices/{MODEL}",
        json={"input_micros_per_mtok": price_in, "output_micros_per_mtok": price_out},
    )
    account = server.account(credit=MICROS)
    server.admin("POST", f"/admin/accounts/{account}/credit", json={"amount_micros": 234_567})
    credited = MICROS + 234_567
    _, secret = server.key(account, name="mix")
    client = server.client(secret)
    told: dict[str, tuple[int, int, list[str]]] = {}  # id -> prompt, completion, finish reasons
    engine_before = server.engine_counts()

    def complete(**fields: Any) -> Any:
        r = client.chat.completions.create(model=MODEL, **fields)
        reasons = [c.finish_reason for c in r.choices]
        told[r.id] = (r.usage.prompt_tokens, r.usage.completion_tokens, reasons)
        return r

    def stream(n: int = 1, **fields: Any) -> list[Any]:
        chunks = list(
            client.chat.completions.create(
                model=MODEL, n=n, stream=True, stream_options={"include_usage": True}, **fields
            )
        )
        usage = chunks[-1].usage
        assert usage is not None and chunks[-1].choices == []
        finish = {c.choices[0].index: c.choices[0].finish_reason for c in chunks[:-1]}
        finish = {i: reason for i, reason in finish.items() if reason is not None}
        assert sorted(finish) == list(range(n))
        reasons = [finish[i] for i in range(n)]
        told[chunks[0].id] = (usage.prompt_tokens, usage.completion_tokens, reasons)
        return reasons

    r = complete(messages=COUNT, temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = complete(messages=COUNT, temperature=0, max_tokens=16, stop=["4"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content.startswith("1")
    assert "4" not in r.choices[0].message.content
    r = complete(messages=CAPITAL, temperature=1, seed=3, n=3, max_tokens=4)
    assert len(r.choices) == 3
    assert stream(messages=CAPITAL, temperature=0, max_tokens=16)[0] in ("stop", "length")
    assert stream(messages=COUNT, temperature=0, max_tokens=16, stop=["3"]) == ["stop"]
    assert stream(n=3, messages=COUNT, temperature=1, seed=7, max_tokens=6) == ["length"] * 3

    # A client that leaves mid-stream: billed what the engine generated, not what it read.
    prompt_before, generated_before = server.engine_counts()
    body = {"model": MODEL, "messages": COUNT, "max_tokens": 64, "ignore_eos": True, "stream": True}
    read = 0
    with httpx.stream(
        "POST", server.live.v1 + "/chat/completions", json=body, headers=auth(secret), timeout=60
    ) as resp:
        assert resp.status_code == 200
        left = resp.headers["x-request-id"]
        for line in resp.iter_lines():
            read += bool(content_of(line))
            if read == 3:
                break
    prompt_after, generated_after = server.engine_counts()
    row = wait_closed(server, account, left)
    assert row["end_state"] == "client_disconnected"
    assert row["prompt_tokens"] == prompt_after - prompt_before
    assert row["completion_tokens"] == generated_after - generated_before
    assert 3 <= row["completion_tokens"] < 64

    # Refused for quota: three choices of up to the whole context do not fit the balance.
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, messages=COUNT, n=3)
    assert refused.value.status_code == 429 and refused.value.code == "insufficient_quota"

    engine_after = server.engine_counts()
    rows = server.rows(account)
    assert len(rows) == len(told) + 2  # + the disconnected one + the refused one
    for request_id, (prompt, completion, reasons) in told.items():
        row = rows[request_id]
        assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
        assert (row["end_state"], row["finish_reasons"]) == ("completed", reasons)
    [rejected] = [row for row in rows.values() if row["end_state"] == "rejected"]
    assert rejected["finish_reasons"] == ["insufficient_quota"]
    assert (rejected["prompt_tokens"], rejected["completion_tokens"]) == (0, 0)
    # Every token the engine took in or generated for this account is billed, and no other.
    assert sum(row["prompt_tokens"] for row in rows.values()) == engine_after[0] - engine_before[0]
    assert sum(r["completion_tokens"] for r in rows.values()) == engine_after[1] - engine_before[1]
    for row in rows.values():
        assert row["cost_micros"] == cost(
            row["prompt_tokens"], row["completion_tokens"], price_in, price_out
        )
    assert_books_balance(server, account, credited)


def test_revoked_key_is_refused_on_its_next_request(server: GatewayServer) -> None:
    account = server.account()
    key_id, secret = server.key(account)
    client = server.client(secret)
    client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=1)
    server.admin("POST", f"/admin/keys/{key_id}/revoke")
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=1)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    error_of(post(server, "sk-" + secrets.token_urlsafe(32)), 401, "invalid_api_key")
    error_of(post(server, server.admin_key[:-1]), 401, "invalid_api_key")


def test_key_limited_to_one_model_gets_403_for_another(server: GatewayServer) -> None:
    account = server.account()
    _, secret = server.key(account, allowed_models=["other"])
    client = server.client(secret)
    r = client.chat.completions.create(model="other", messages=CAPITAL, max_tokens=1)
    assert r.model == "other"
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=1)
    assert refused.value.status_code == 403 and refused.value.code == "model_not_allowed"
    assert refused.value.param == "model"
    rows = sorted(server.rows(account).values(), key=lambda row: row["started_at"])
    assert [(row["model"], row["end_state"]) for row in rows] == [
        ("other", "completed"),
        (MODEL, "rejected"),
    ]


def test_rate_limits_answer_429_with_openai_headers(server: GatewayServer) -> None:
    account = server.account()

    # Requests per minute.
    _, rpm = server.key(account, rpm_limit=2)
    r1, r2, r3 = (post(server, rpm) for _ in range(3))
    assert (r1.status_code, r2.status_code) == (200, 200), r2.text
    assert r1.headers["x-ratelimit-limit-requests"] == "2"
    assert [r.headers["x-ratelimit-remaining-requests"] for r in (r1, r2)] == ["1", "0"]
    assert DURATION.match(r2.headers["x-ratelimit-reset-requests"])
    assert error_of(r3, 429, "rate_limit_exceeded")["type"] == "requests"
    assert int(r3.headers["retry-after"]) >= 1 and int(r3.headers["retry-after-ms"]) >= 1
    assert r3.headers["x-ratelimit-remaining-requests"] == "0"
    assert DURATION.match(r3.headers["x-ratelimit-reset-requests"])

    # Tokens per minute: the prompt at admission, then the completion as it is generated.
    _, tpm = server.key(account, tpm_limit=60)
    r1 = post(server, tpm, messages=COUNT, max_tokens=8, ignore_eos=True)
    prompt = r1.json()["usage"]["prompt_tokens"]
    assert 8 < prompt < 60 - 8
    assert r1.headers["x-ratelimit-limit-tokens"] == "60"
    assert r1.headers["x-ratelimit-remaining-tokens"] == str(60 - prompt)
    r2 = post(server, tpm, messages=COUNT)  # 60 - prompt - 8 left: less than the prompt
    assert error_of(r2, 429, "rate_limit_exceeded")["type"] == "tokens"
    assert int(r2.headers["x-ratelimit-remaining-tokens"]) < prompt
    assert int(r2.headers["retry-after"]) >= 1
    _, tiny = server.key(account, tpm_limit=5)
    assert (
        "Request too large" in error_of(post(server, tiny), 429, "rate_limit_exceeded")["message"]
    )

    # Concurrent requests.
    _, one = server.key(account, concurrency_limit=1)
    body = {
        "model": MODEL,
        "messages": COUNT,
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", server.live.v1 + "/chat/completions", json=body, headers=auth(one), timeout=60
    ) as held:
        assert held.status_code == 200
        generating = held.iter_lines()  # kept: dropping it would close the connection
        assert any(content_of(line) for line in generating)
        busy = error_of(post(server, one), 429, "rate_limit_exceeded")
        assert "concurrent requests: Limit 1" in busy["message"]
        held_id = held.headers["x-request-id"]
    row = wait_closed(server, account, held_id)
    assert row["end_state"] == "client_disconnected" and row["completion_tokens"] > 0
    assert post(server, one).status_code == 200
    assert_books_balance(server, account, 10 * MICROS)


def test_keys_are_never_stored_or_logged_in_clear(server: GatewayServer) -> None:
    _, secret = server.key(server.account())
    assert post(server, secret).status_code == 200
    assert post(server, secret + "x").status_code == 401  # a wrong key is not logged either
    stored = b"".join(p.read_bytes() for p in server.data_dir.rglob("*") if p.is_file())
    log = server.live.log().encode()
    assert b"request chatcmpl-" in log  # the log is the one the requests went to
    keys = [server.admin_key, *server.handed_out]
    assert len(keys) >= 2
    for key in keys:
        hidden = key[len("sk-") + 8 :].encode()  # all but the visible prefix
        assert hidden not in stored and hidden not in log
        assert hashlib.sha256(key.encode()).hexdigest().encode() in stored


# -- kill -9 and a restart on the same data dir -------------------------------------------------


def test_kill_9_during_20_streams_then_restart_closes_every_reservation(tmp_path: Path) -> None:
    admin_key = "sk-admin-" + secrets.token_urlsafe(24)
    server = start_gateway_server(tmp_path, admin_key=admin_key)  # given: never printed
    price_in, price_out = 1_000_003, 2_000_007
    try:
        server.admin(
            "PUT",
            f"/admin/prices/{MODEL}",
            json={"input_micros_per_mtok": price_in, "output_micros_per_mtok": price_out},
        )
        account = server.account(credit=5 * MICROS)
        _, secret = server.key(account)
        body = {"model": MODEL, "messages": COUNT, "max_tokens": 400, "ignore_eos": True,
                "stream": True}  # fmt: skip
        ids: list[str | None] = [None] * 20
        streaming = [threading.Event() for _ in ids]
        cut_off: list[BaseException | None] = [None] * 20

        def stream(i: int) -> None:
            try:
                with httpx.stream(
                    "POST", server.live.v1 + "/chat/completions", json=body,
                    headers=auth(secret), timeout=120,
                ) as r:  # fmt: skip
                    ids[i] = r.headers["x-request-id"]
                    for line in r.iter_lines():
                        if content_of(line):
                            streaming[i].set()
            except httpx.HTTPError as exc:  # the server died under it
                cut_off[i] = exc

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(ids))]
        for t in threads:
            t.start()
        for event in streaming:
            assert event.wait(90)
        time.sleep(1.5)  # past a checkpoint interval: tokens so far are on disk
        server.live.process.kill()
        assert server.live.stop() == -9
        for t in threads:
            t.join(30)
        assert all(isinstance(exc, httpx.HTTPError) for exc in cut_off), cut_off
    finally:
        server.live.stop()

    db = sqlite3.connect(server.data_dir / "inferhub.db")
    try:
        found = db.execute(
            "SELECT request_id, prompt_tokens, completion_tokens FROM usage "
            "WHERE account_id = ? AND status = 'open'",
            (account,),
        ).fetchall()
    finally:
        db.close()
    left_open = {request_id: (prompt, completion) for request_id, prompt, completion in found}
    assert set(left_open) == set(ids)  # every request in flight left its reservation open
    assert any(completion for _, completion in left_open.values())  # some checkpointed tokens

    restarted = start_gateway_server(tmp_path, admin_key=admin_key, name="restart")
    try:
        assert not any("created the admin account" in line for line in restarted.live.stdout_lines)
        assert restarted.live.log().count("recovered open reservation") == len(ids)
        rows = restarted.rows(account)
        assert set(rows) == set(ids)  # exactly one row each
        for request_id, row in rows.items():
            assert (row["status"], row["end_state"]) == ("closed", "crashed")
            # Billed for the prompt and the checkpointed tokens, or released whole if none.
            prompt, completion = left_open[request_id]
            billed = (prompt, completion) if completion else (0, 0)
            assert (row["prompt_tokens"], row["completion_tokens"]) == billed
            assert row["cost_micros"] == cost(*billed, price_in, price_out)
        assert_books_balance(restarted, account, 5 * MICROS)
        assert post(restarted, secret).status_code == 200  # and it serves again
        assert_books_balance(restarted, account, 5 * MICROS)
    finally:
        code = restarted.live.stop()
    assert code == 0


# -- two replicas: PostgreSQL for the books, Redis for the limits ------------------------------


@pytest.fixture
def pg_url(postgres_server: str) -> str:
    schema = "e2e_" + secrets.token_hex(6)
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{postgres_server}?options=-csearch_path%3D{schema}"


def test_two_replicas_on_postgresql_share_rate_limits_through_redis(
    tmp_path: Path, pg_url: str, redis_server: str
) -> None:
    admin_key = "sk-admin-" + secrets.token_urlsafe(24)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with ThreadPoolExecutor(2) as pool:  # both start at once: migrations and bootstrap race
        started = [
            pool.submit(
                start_gateway_server, tmp_path / "a", "--database-url", pg_url,
                "--redis-url", redis_server, "--instance", "a", admin_key=admin_key,
            ),
            pool.submit(
                start_gateway_server, tmp_path / "b", "--instance", "b", admin_key=admin_key,
                env={"INFERHUB_DATABASE_URL": pg_url, "INFERHUB_REDIS_URL": redis_server},
            ),
        ]  # fmt: skip
    servers = [f.result() for f in started if f.exception() is None]
    try:
        assert len(servers) == 2, [f.exception() for f in started]
        a, b = servers
        for s in servers:
            url_line = s.live.stdout_lines[-1]
            assert "keys and billing in postgresql+psycopg://" in url_line
            assert "rate limits in Redis" in url_line
        a.admin("PUT", f"/admin/prices/{MODEL}",
                json={"input_micros_per_mtok": 999_999, "output_micros_per_mtok": 3_333_333})  # fmt: skip
        account = a.account(credit=2 * MICROS)
        _, rpm = b.key(account, rpm_limit=3)  # a key made on b works on a: one database

        answers = [post(a, rpm), post(a, rpm), post(b, rpm)]
        assert [r.status_code for r in answers] == [200, 200, 200]
        assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0"]
        for replica in (b, a):
            refused = post(replica, rpm)
            assert error_of(refused, 429, "rate_limit_exceeded")["type"] == "requests"
            assert int(refused.headers["retry-after"]) >= 1

        _, one = a.key(account, concurrency_limit=1)
        body = {"model": MODEL, "messages": COUNT, "max_tokens": 200, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with httpx.stream(
            "POST", a.live.v1 + "/chat/completions", json=body, headers=auth(one), timeout=60
        ) as held:
            assert held.status_code == 200
            generating = held.iter_lines()  # kept: dropping it would close the connection
            assert any(content_of(line) for line in generating)
            busy = error_of(post(b, one), 429, "rate_limit_exceeded")
            assert "concurrent requests: Limit 1" in busy["message"]
            held_id = held.headers["x-request-id"]
        row = wait_closed(b, account, held_id)
        assert row["end_state"] == "client_disconnected" and row["completion_tokens"] > 0
        r = post(b, one, max_tokens=4)
        assert r.status_code == 200

        rows = a.rows(account)
        for answer in [*answers, r]:
            usage = answer.json()["usage"]
            row = rows[answer.json()["id"]]
            assert (row["prompt_tokens"], row["completion_tokens"]) == (
                usage["prompt_tokens"],
                usage["completion_tokens"],
            )
            assert row["cost_micros"] == cost(
                usage["prompt_tokens"], usage["completion_tokens"], 999_999, 3_333_333
            )
        assert sum(row["end_state"] == "rejected" for row in rows.values()) == 3
        assert_books_balance(b, account, 2 * MICROS)
    finally:
        codes = [s.live.stop() for s in servers]
    assert codes == [0, 0]
