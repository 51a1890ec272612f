"""The real `inferhub serve` with its default, the database gateway, driven from the outside:
start it, read the admin key it prints, and manage accounts, keys and prices through /admin."""

from __future__ import annotations

import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))

from live import MODEL, LiveServer, start_live_server

from inferhub.models.default import default_model_path

MICROS = 1_000_000
ADMIN_KEY_LINE = re.compile(r"^\s+(sk-\S+)\s*$")


def cost(prompt: int, completion: int, input_price: int, output_price: int) -> int:
    """A request's cost in micro-units, written out again here: ceil of the exact product."""
    return -(-(prompt * input_price + completion * output_price) // MICROS)


def two_models() -> list[str]:
    """The embedded model served twice, as MODEL and as "other" (for per-model key rules)."""
    path = default_model_path()
    return ["--model", f"{MODEL}={path}", "--model", f"other={path}"]


@dataclass
class GatewayServer:
    """A live server in gateway mode and its operator's view of it."""

    live: LiveServer
    data_dir: Path
    admin_key: str
    handed_out: list[str] = field(default_factory=list)  # every key secret created

    @property
    def base(self) -> str:
        return self.live.base

    def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        r = httpx.request(
            method,
            self.base + path,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=30,
            **kwargs,
        )
        assert r.status_code in (200, 201), r.text
        return r.json()

    def account(self, credit: int = 10 * MICROS) -> str:
        body = {"name": f"acct-{secrets.token_hex(4)}", "credit_micros": credit}
        account_id: str = self.admin("POST", "/admin/accounts", json=body)["id"]
        return account_id

    def key(self, account_id: str, **fields: Any) -> tuple[str, str]:
        """A new key of the account: (key id, secret)."""
        created = self.admin("POST", f"/admin/accounts/{account_id}/keys", json=fields)
        self.handed_out.append(created["secret"])
        return created["key"]["id"], created["secret"]

    def rows(self, account_id: str) -> dict[str, dict[str, Any]]:
        """The account's usage rows by request id (one row per id, checked)."""
        data = self.admin(
            "GET", "/admin/usage/requests", params={"account": account_id, "limit": 1000}
        )["data"]
        by_id = {row["request_id"]: row for row in data}
        assert len(by_id) == len(data), "a request id has two usage rows"
        return by_id

    def account_info(self, account_id: str) -> dict[str, Any]:
        info: dict[str, Any] = self.admin("GET", f"/admin/accounts/{account_id}")
        return info

    def audit(self, account_id: str) -> dict[str, Any]:
        audit: dict[str, Any] = self.admin("GET", f"/admin/accounts/{account_id}/audit")
        return audit

    def client(self, secret: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.live.v1, api_key=secret, max_retries=0, timeout=120)

    def engine_counts(self, model: str = MODEL) -> tuple[int, int]:
        """(prompt, generated) tokens the engine itself counted, once it is idle."""
        g = self.live.wait_idle(timeout=5.0, model=model)
        assert g["num_requests_running"] == g["num_requests_waiting"] == 0, g
        return int(g["engine_prompt_tokens_total"]), int(g["engine_generation_tokens_total"])


def admin_key_from(lines: list[str]) -> str | None:
    found = [m.group(1) for line in lines if (m := ADMIN_KEY_LINE.match(line))]
    assert len(found) <= 1, lines
    return found[0] if found else None


def start_gateway_server(
    tmp: Path,
    *extra: str,
    admin_key: str | None = None,
    env: dict[str, str] | None = None,
    name: str = "server",
) -> GatewayServer:
    """`inferhub serve` with no API key options: the database gateway, SQLite in tmp/data
    unless `extra` names a database. Without `admin_key` the first start must print one."""
    data_dir = tmp / "data"
    env = dict(env or {})
    if admin_key is not None:
        env["INFERHUB_ADMIN_KEY"] = admin_key
    live = start_live_server(
        tmp / f"{name}.log", "--data-dir", str(data_dir), *extra, api_key=None, env=env
    )
    printed = admin_key_from(live.stdout_lines)
    if admin_key is not None:
        assert printed is None, "a given admin key is never printed"
    else:
        assert printed is not None, live.stdout_lines
        admin_key = printed
    return GatewayServer(live, data_dir, admin_key)
