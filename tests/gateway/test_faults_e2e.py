"""PostgreSQL stopped under the real server in the middle of a stream: new requests get an
OpenAI-shaped 503 with Retry-After, the running stream is served to its end and billed
exactly once the database is back, and service resumes by itself."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import httpx
import pytest
from e2e_server import MICROS, start_gateway_server
from live import MODEL
from test_e2e_server import COUNT, auth, error_of, post

from services import PostgresCluster

pytestmark = pytest.mark.slow


def test_postgresql_stopped_mid_stream(tmp_path: Path, own_postgres: PostgresCluster) -> None:
    admin_key = "sk-admin-" + secrets.token_urlsafe(24)
    server = start_gateway_server(tmp_path, "--database-url", own_postgres.url, admin_key=admin_key)
    try:
        account = server.account(credit=10 * MICROS)
        _, key = server.key(account)
        body = {
            "model": MODEL, "messages": COUNT, "max_tokens": 120, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        usage = None
        with httpx.stream(
            "POST", server.live.v1 + "/chat/completions", json=body, headers=auth(key), timeout=120
        ) as held:
            assert held.status_code == 200
            held_id = held.headers["x-request-id"]
            lines = held.iter_lines()
            assert next(line for line in lines if '"content"' in line)
            own_postgres.stop()

            refused = post(server, key)  # a new request while the database is away
            error = error_of(refused, 503, "database_unavailable")
            assert error["type"] == "server_error"
            assert int(refused.headers["retry-after"]) >= 1

            rest = list(lines)  # the running stream is served to its end
            assert "data: [DONE]" in rest
            for line in rest:
                if line.startswith("data: {") and json.loads(line[6:]).get("usage"):
                    usage = json.loads(line[6:])["usage"]
        assert usage is not None and usage["completion_tokens"] == 120

        own_postgres.start()
        deadline = time.monotonic() + 30
        while (after := post(server, key)).status_code != 200:  # resumes by itself
            assert after.status_code == 503 and time.monotonic() < deadline, after.text
            time.sleep(0.5)

        deadline = time.monotonic() + 30
        while (row := server.rows(account).get(held_id)) is None or row["status"] != "closed":
            assert time.monotonic() < deadline, row
            time.sleep(0.5)
        assert (row["prompt_tokens"], row["completion_tokens"], row["end_state"]) == (
            usage["prompt_tokens"], 120, "completed",
        )  # fmt: skip
        rows = server.rows(account)
        assert set(rows) == {held_id, after.json()["id"]}  # the refused request has none
        log = server.live.log()
        assert log.count("the database is unavailable") == 1
        assert "the database is reachable again" in log
    finally:
        assert server.live.stop() == 0
