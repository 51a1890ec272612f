"""The soak test's short form: 16 clients for 20 seconds against the real server in gateway
mode (the long one is `python benchmarks/soak.py`, 64 clients for 10 minutes)."""

from __future__ import annotations

import asyncio
import secrets
import sys
from pathlib import Path

import pytest
from live import start_live_server

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

from soak import run_soak

pytestmark = pytest.mark.slow


def test_short_soak_serves_everything_and_bills_exactly(tmp_path: Path) -> None:
    admin_key = "sk-soak-admin-" + secrets.token_urlsafe(24)
    server = start_live_server(
        tmp_path / "server.log",
        "--data-dir", str(tmp_path / "data"),
        api_key=None,
        env={"INFERHUB_ADMIN_KEY": admin_key},
    )  # fmt: skip
    try:
        report = asyncio.run(
            run_soak(
                server.base, admin_key, clients=16, duration_s=20, max_requests=400,
                server_pid=server.process.pid, log=lambda _: None,
            )
        )  # fmt: skip
    finally:
        assert server.stop() == 0
    assert report.unexpected == []
    assert report.billing_mismatches == []
    assert report.served > 20 and report.disconnected > 0 and report.expected_errors
    assert report.usage_rows == report.admitted > 0
    assert report.billed_completion_tokens == report.engine_generation_tokens > 0
    assert report.kv_blocks_in_use_at_end == 0 and report.requests_running_at_end == 0
    assert "500" not in report.statuses
