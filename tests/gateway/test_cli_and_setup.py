"""The CLI on a real database, the first-start bootstrap, and the migrations (which must build
exactly the tables the code declares), on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from inferhub.gateway import accounts, auth, factory
from inferhub.gateway.cli import main
from inferhub.gateway.db import VERSION_TABLE, Database
from inferhub.gateway.factory import ADMIN_ACCOUNT, bootstrap, create_gateway, open_database
from inferhub.gateway.interface import GatewayError
from inferhub.gateway.keys import hash_key
from inferhub.gateway.schema import accounts as accounts_table
from inferhub.gateway.schema import api_keys, metadata

pytestmark = pytest.mark.anyio


def db_args(database_url: str | None, data_dir: Path) -> list[str]:
    return ["--data-dir", str(data_dir)] + (
        ["--database-url", database_url] if database_url else []
    )


def test_cli_manages_accounts_keys_credit_prices_and_usage(
    database_url: str | None, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = db_args(database_url, data_dir)

    def run(*argv: str) -> str:
        assert main([*argv, *where]) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    assert "created account acme" in run(
        "admin", "create-account", "acme", "--email", "a@acme.test", "--credit", "12.5"
    )
    out = run(
        "keys", "create", "--account", "acme", "--name", "prod", "--models", "m1,m2", "--rpm", "60"
    )
    secret = re.search(r"(sk-[A-Za-z0-9_-]{43})", out)
    assert secret is not None
    listing = run("keys", "list", "--account", "acme")
    assert secret.group(1) not in listing and secret.group(1)[:11] in listing and "m1,m2" in listing
    assert "balance 13.000000" in run("credit", "add", "acme", "0.5", "--note", "bonus")
    assert "input 0.150000" in run("prices", "set", "m1", "--input", "0.15", "--output", "0.6")
    assert "m1" in run("prices", "list")

    db = open_database(database_url, data_dir)
    try:
        principal = auth.lookup_secret(db, secret.group(1))
        from inferhub.gateway import billing

        billing.reserve(
            db,
            principal,
            request_id="r1",
            model="m1",
            prompt_tokens=1000,
            max_completion_tokens=100,
            instance="cli",
        )
        billing.settle(
            db,
            "r1",
            prompt_tokens=1000,
            completion_tokens=100,
            end_state="completed",
            finish_reasons=["stop"],
        )
        key_id = principal.key_id
    finally:
        db.close()
    usage_out = run("usage", "--account", "acme", "--group-by", "model", "--since", "1d")
    assert re.search(r"m1\s+1\s+1000\s+100\s+0\.000210", usage_out), usage_out
    by_day = run("usage", "--key", key_id, "--group-by", "day")
    assert re.search(r"\d{4}-\d\d-\d\d\s+1\s+1000\s+100\s+0\.000210", by_day), by_day
    assert "revoked" in run("keys", "revoke", key_id)

    assert main(["keys", "revoke", "key_nope", *where]) == 1
    assert "No such key" in capsys.readouterr().err
    assert main(["credit", "add", "acme", "0.0000001", *where]) == 1
    assert "6 decimal" in capsys.readouterr().err


async def test_first_start_prints_the_admin_key_once(
    database_url: str | None, data_dir: Path
) -> None:
    said: list[str] = []
    gw = create_gateway(database_url, data_dir, announce=said.append)
    await gw.close()
    assert len(said) == 1
    secret = re.search(r"sk-[A-Za-z0-9_-]{43}", said[0])
    assert secret is not None
    again: list[str] = []
    gw = create_gateway(database_url, data_dir, announce=again.append)
    try:
        assert again == []
        principal = await gw.authenticate(f"Bearer {secret.group(0)}")
        assert principal.role == "admin"
    finally:
        await gw.close()


async def test_admin_key_from_configuration_is_used_and_never_printed(
    database_url: str | None, data_dir: Path
) -> None:
    given = "sk-operator-chosen-admin-key-0123456789"
    said: list[str] = []
    gw = create_gateway(database_url, data_dir, admin_key=given, announce=said.append)
    try:
        assert given not in " ".join(said)
        assert (await gw.authenticate(f"Bearer {given}")).role == "admin"
    finally:
        await gw.close()
    with pytest.raises(ValueError):
        create_gateway(database_url, data_dir, admin_key="short")


def admin_rows(db: Database) -> tuple[int, list[str]]:
    """How many admin accounts there are, and the hashes of the admin's keys."""
    with db.read() as conn:
        admins = conn.execute(
            sa.select(accounts_table.c.id).where(accounts_table.c.role == "admin")
        ).all()
        hashes = conn.execute(
            sa.select(api_keys.c.key_hash).where(api_keys.c.account_id.in_([a.id for a in admins]))
        ).scalars()
        return len(admins), sorted(hashes)


@pytest.mark.parametrize("race_at", ["key", "account"])
def test_bootstrap_survives_another_replica_writing_between_its_read_and_its_write(
    database_url: str | None, data_dir: Path, monkeypatch: pytest.MonkeyPatch, race_at: str
) -> None:
    """Two replicas start together with the same admin key: the second one's read says "no
    such key" (or "no admin"), then the first one writes it. The second must not crash on the
    unique constraint (CI saw exactly that) and the end state is one admin with one such key."""
    given = "sk-operator-chosen-admin-key-0123456789"
    db = open_database(database_url, data_dir)
    other = open_database(database_url, data_dir)  # the other replica's own connection pool
    raced: list[str] = []
    real_key_exists, real_admin_id = factory.key_exists, factory._admin_id

    def other_replica_starts() -> None:
        if not raced:
            raced.append(race_at)
            bootstrap(other, admin_key=given, announce=lambda _: None)

    def key_exists_then_race(db_: Database, secret: str) -> bool:
        found = real_key_exists(db_, secret)
        if race_at == "key" and db_ is db:
            other_replica_starts()
        return found

    def admin_id_then_race(db_: Database) -> str | None:
        found = real_admin_id(db_)
        if race_at == "account" and db_ is db:
            other_replica_starts()
        return found

    try:
        if race_at == "key":  # the admin account exists already: only the key races
            accounts.create_account(db, ADMIN_ACCOUNT, role="admin")
        monkeypatch.setattr(factory, "key_exists", key_exists_then_race)
        monkeypatch.setattr(factory, "_admin_id", admin_id_then_race)
        said: list[str] = []
        bootstrap(db, admin_key=given, announce=said.append)
        assert raced == [race_at]
        assert admin_rows(db) == (1, [hash_key(given)])
        assert given not in " ".join(said)
    finally:
        db.close()
        other.close()


def test_replicas_bootstrapping_at_once_leave_one_admin_and_its_key(
    database_url: str | None, data_dir: Path
) -> None:
    given = "sk-operator-chosen-admin-key-0123456789"
    replicas = 6
    dbs = [open_database(database_url, data_dir) for _ in range(replicas)]
    go = threading.Barrier(replicas)
    errors: list[BaseException] = []

    def start(db: Database) -> None:
        go.wait()
        try:
            bootstrap(db, admin_key=given, announce=lambda _: None)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start, args=(db,)) for db in dbs]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert admin_rows(dbs[0]) == (1, [hash_key(given)])
    finally:
        for db in dbs:
            db.close()


def test_migrations_build_the_declared_schema_and_rerun_cleanly(
    database_url: str | None, data_dir: Path
) -> None:
    db = open_database(database_url, data_dir)
    try:
        db.migrate()  # a second run is a no-op
        with db.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            assert context.get_current_revision() == "0002"
            assert compare_metadata(context, metadata) == []
    finally:
        db.close()


def test_console_passwords_are_argon2_hashes(database_url: str | None, data_dir: Path) -> None:
    db = open_database(database_url, data_dir)
    try:
        account = accounts.create_account(db, "carol", email="carol@example.test")
        auth.set_password(db, account.id, "correct horse battery")
        found = accounts.login_row(db, "carol")
        assert found is not None and (found[1] or "").startswith("$argon2id$")
        assert auth.verify_login(db, "carol@example.test", "correct horse battery") is not None
        assert auth.verify_login(db, "carol", "wrong password") is None
        assert auth.verify_login(db, "nobody", "correct horse battery") is None
        accounts.set_account_disabled(db, account.id, True)
        assert auth.verify_login(db, "carol", "correct horse battery") is None
    finally:
        db.close()


def test_an_empty_email_is_refused_on_every_path(
    database_url: str | None, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = open_database(database_url, data_dir)
    try:
        accounts.create_account(db, "first", email=None)
        for email in ("", "  "):
            with pytest.raises(GatewayError) as info:
                accounts.create_account(db, f"x{len(email)}", email=email)
            assert (info.value.status, info.value.param) == (400, "email")
        accounts.create_account(db, "second", email=None)  # no email at all stays fine
    finally:
        db.close()
    argv = ["admin", "create-account", "y", "--email", "", *db_args(database_url, data_dir)]
    assert main(argv) != 0
    assert "email must not be empty" in capsys.readouterr().err
