"""How `inferhub serve` picks its gatekeeper (the database gateway by default; a static key list
or open access as simple modes) and how the app hosts it: the lifespan starts it (crash
recovery) and closes it, /admin and /v1/dashboard are mounted, and answer 404 `not_available`
without it. Fake engines, no model."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))

from fakes import KEY, FakeEngine, chat, running_server
from gateway_helpers import new_account, new_key, settings

from inferhub import cli
from inferhub.config import ServerConfig
from inferhub.gateway import accounts, billing
from inferhub.gateway.auth import principal_for_key
from inferhub.gateway.factory import create_gateway
from inferhub.gateway.gateway import DatabaseGateway
from inferhub.gateway.static import OpenAccess, StaticKeys
from inferhub.gateway.usage import audit, get_usage
from inferhub.server.run import Server

ADMIN_KEY = "sk-admin-" + "x" * 30


def serve(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[int, dict[str, Any]]:
    """Run `inferhub serve` with fake engines and without listening: (status, what it built)."""
    built: dict[str, Any] = {}
    for engine_class in ("async_engine.AsyncEngine", "engine_process.ProcessEngine"):
        monkeypatch.setattr(
            f"inferhub.engine.{engine_class}", lambda config: FakeEngine(config.name)
        )

    def run(server: Server) -> None:
        built["state"] = server.state

    monkeypatch.setattr(Server, "run", run)
    return cli.main(["serve", "--model", "m=/x.gguf", *argv]), built


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INFERHUB_API_KEYS", "INFERHUB_ADMIN_KEY", "INFERHUB_DATABASE_URL",
                 "INFERHUB_REDIS_URL"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def test_serve_defaults_to_the_database_gateway_and_prints_the_admin_key_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = str(tmp_path / "data")
    # With the gateway, keys come from the database: a public host is allowed.
    code, built = serve(monkeypatch, ["--data-dir", data, "--host", "0.0.0.0"])
    assert code == 1  # "not started": run() did not serve
    gateway = built["state"].gatekeeper
    assert isinstance(gateway, DatabaseGateway)
    assert gateway.settings.instance == socket.gethostname()
    assert gateway.settings.tokens_flush_interval_s == 0.0  # in-memory limits: exact at once
    out = capsys.readouterr().out
    [admin_key] = [line.strip() for line in out.splitlines() if line.strip().startswith("sk-")]
    gateway.db.close()

    code, built = serve(monkeypatch, ["--data-dir", data, "--instance", "replica-1"])
    assert built["state"].gatekeeper.settings.instance == "replica-1"
    assert "sk-" not in capsys.readouterr().out  # shown once only
    db = built["state"].gatekeeper.db
    assert accounts.key_exists(db, admin_key)
    db.close()


def test_a_given_admin_key_is_used_and_never_printed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("INFERHUB_ADMIN_KEY", ADMIN_KEY)
    _, built = serve(monkeypatch, ["--data-dir", str(tmp_path)])
    db = built["state"].gatekeeper.db
    assert accounts.key_exists(db, ADMIN_KEY)
    db.close()
    out = capsys.readouterr().out
    assert ADMIN_KEY not in out and "with the given key" in out
    monkeypatch.setenv("INFERHUB_ADMIN_KEY", "too-short")
    code, _ = serve(monkeypatch, ["--data-dir", str(tmp_path / "other")])
    assert code == 1
    assert "the admin key must have at least 20 characters" in capsys.readouterr().err


def test_simple_modes_replace_the_gateway(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _, built = serve(monkeypatch, ["--api-key", "sk-a", "--data-dir", str(tmp_path / "d1")])
    assert isinstance(built["state"].gatekeeper, StaticKeys)
    _, built = serve(monkeypatch, ["--no-auth", "--data-dir", str(tmp_path / "d2")])
    assert isinstance(built["state"].gatekeeper, OpenAccess)
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()  # no database


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--api-key", "k", "--database-url", "postgresql://x/y"],
            "--database-url would be unused",
        ),
        (["--api-key", "k", "--redis-url", "redis://x"], "--redis-url would be unused"),
        (["--no-auth", "--redis-url", "redis://x"], "--no-auth runs without the database gateway"),
        (["--no-auth", "--api-key", "k"], "exclude each other"),
        (["--no-auth", "--host", "0.0.0.0"], "refusing to serve on 0.0.0.0 without API keys"),
    ],
)
def test_options_that_do_not_go_together_are_refused(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    code, built = serve(monkeypatch, argv)
    assert code == 2 and not built
    assert message in capsys.readouterr().err


def test_gateway_urls_from_the_environment_conflict_with_static_keys(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INFERHUB_API_KEYS", "sk-env")
    monkeypatch.setenv("INFERHUB_DATABASE_URL", "postgresql://db/inferhub")
    code, _ = serve(monkeypatch, [])
    assert code == 2 and "--database-url would be unused" in capsys.readouterr().err


def test_static_keys_server_answers_admin_and_dashboard_with_not_available() -> None:
    with running_server({"fake": FakeEngine()}, StaticKeys([KEY])) as url:  # type: ignore[arg-type]
        for path in ("/admin/accounts", "/v1/dashboard/account", "/v1/dashboard/keys"):
            r = httpx.get(url + path, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 404, r.text
            assert r.json()["error"]["code"] == "not_available"


def test_app_starts_and_closes_the_gateway_and_bills_through_it(tmp_path: Path) -> None:
    announced: list[str] = []
    gateway = create_gateway(None, tmp_path, settings=settings(), announce=announced.append)
    admin = new_key(gateway, new_account(gateway, role="admin", name="ops"))
    account = new_account(gateway, credit=1_000_000)
    user = new_key(gateway, account)
    accounts.set_price(gateway.db, "fake", 2_000_000, 3_000_000)
    # A reservation left open by a "previous life" of this instance: start() recovers it.
    [key] = accounts.list_keys(gateway.db, account.id)
    billing.reserve(
        gateway.db,
        principal_for_key(gateway.db, key.id),
        request_id="crashed-1",
        model="fake",
        prompt_tokens=5,
        max_completion_tokens=10,
        instance=gateway.settings.instance,
    )
    config = ServerConfig(data_dir=tmp_path)
    with running_server({"fake": FakeEngine()}, gateway, config) as url:  # type: ignore[arg-type]
        recovered = get_usage(gateway.db, "crashed-1")
        assert recovered is not None and recovered.end_state == "crashed"
        r = httpx.post(
            url + "/v1/chat/completions",
            json=chat(max_tokens=5),
            headers={"Authorization": f"Bearer {user}"},
        )
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        record = get_usage(gateway.db, r.json()["id"])
        assert record is not None and record.status == "closed"
        assert (record.prompt_tokens, record.completion_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        assert record.cost_micros == -(
            -(usage["prompt_tokens"] * 2_000_000 + usage["completion_tokens"] * 3_000_000)
            // 1_000_000
        )
        r = httpx.get(url + "/admin/accounts", headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 200 and account.id in {a["id"] for a in r.json()["data"]}
        r = httpx.get(url + "/admin/accounts", headers={"Authorization": f"Bearer {user}"})
        assert r.status_code == 403
        r = httpx.get(url + "/v1/dashboard/account", headers={"Authorization": f"Bearer {user}"})
        assert r.status_code == 200 and r.json()["id"] == account.id
        assert audit(gateway.db, account.id).consistent
    assert gateway._closed  # the lifespan closed it (and its database) at shutdown


def test_database_url_from_the_environment_serves_the_gateway_commands_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'from-env.db'}"
    monkeypatch.setenv("INFERHUB_DATABASE_URL", url)
    unused = tmp_path / "unused"
    argv = ["prices", "set", "m", "--input", "1", "--output", "2", "--data-dir", str(unused)]
    assert cli.main(argv) == 0
    _, built = serve(monkeypatch, ["--data-dir", str(unused)])
    gateway = built["state"].gatekeeper
    assert gateway.db.url == url and "m" in {p.model for p in accounts.list_prices(gateway.db)}
    gateway.db.close()
    assert not unused.exists()
