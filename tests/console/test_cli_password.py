"""Console passwords from the CLI: typed at a prompt or read from stdin, never an argument;
setting one ends the account's console sessions."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from inferhub.gateway import auth, sessions
from inferhub.gateway.cli import main
from inferhub.gateway.factory import open_database


def test_create_account_with_a_prompted_password_then_set_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path)]
    typed = iter(["first-password", "first-password"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(typed))
    assert (
        main(["admin", "create-account", "dana", "--email", "d@x.test", "--password", *data]) == 0
    )
    db = open_database(None, tmp_path)
    try:
        account = auth.verify_login(db, "d@x.test", "first-password")
        assert account is not None
        session = sessions.create_session(db, account.id)
        monkeypatch.setattr("sys.stdin", io.StringIO("second-password\n"))
        assert main(["admin", "set-password", "dana", "--password-stdin", *data]) == 0
        assert "1 console session(s) ended" in capsys.readouterr().out
        assert sessions.find_session(db, session.token) is None
        assert auth.verify_login(db, "dana", "first-password") is None
        assert auth.verify_login(db, "dana", "second-password") is not None
        # Two different answers at the prompt, or a short password: refused, nothing changed.
        typed = iter(["third-password", "not-the-same"])
        assert main(["admin", "set-password", "dana", *data]) == 1
        monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
        assert main(["admin", "set-password", "dana", "--password-stdin", *data]) == 1
        assert auth.verify_login(db, "dana", "second-password") is not None
    finally:
        db.close()
