"""API keys: format, stored only as a hash (never in the database or the logs in clear),
401 for unknown/revoked/expired keys and disabled accounts, 403 for a model the key may not
use; and the static-key and open modes."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from gateway_helpers import bearer, new_account, new_key

from inferhub.gateway import accounts, usage
from inferhub.gateway.gateway import DatabaseGateway
from inferhub.gateway.interface import GatewayError
from inferhub.gateway.keys import hash_key
from inferhub.gateway.schema import metadata
from inferhub.gateway.static import OpenAccess, StaticKeys

pytestmark = pytest.mark.anyio


def dump_database(gw: DatabaseGateway, data_dir: Path) -> str:
    """Everything the database holds, as text: the SQLite files' bytes, or every row."""
    if gw.db.is_sqlite:
        return b"".join(p.read_bytes() for p in data_dir.glob("inferhub.db*")).decode("latin-1")
    with gw.db.read() as conn:
        return "\n".join(
            repr(tuple(row))
            for table in metadata.sorted_tables
            for row in conn.execute(sa.select(table))
        )


async def test_key_format_and_listing_hide_the_secret(gw: DatabaseGateway) -> None:
    account = new_account(gw)
    created = accounts.create_key(gw.db, account.id, name="ci")
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", created.secret)
    assert created.key.prefix == created.secret[:11]
    listed = accounts.list_keys(gw.db, account.id)
    assert [k.id for k in listed] == [created.key.id]
    assert created.secret not in repr(listed)
    assert not hasattr(created.key, "secret") and not hasattr(created.key, "key_hash")


async def test_keys_never_stored_or_logged_in_clear(
    gw: DatabaseGateway, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    account = new_account(gw, credit=10_000_000)
    secrets = [new_key(gw, account) for _ in range(3)]
    for i, secret in enumerate(secrets):
        principal = await gw.authenticate(bearer(secret))
        admission = await gw.admit(
            principal, request_id=f"r{i}", model="m", prompt_tokens=3, max_completion_tokens=5
        )
        await gw.settle(
            admission,
            prompt_tokens=3,
            completion_tokens=5,
            end_state="completed",
            finish_reasons=["length"],
        )
    with pytest.raises(GatewayError):
        await gw.authenticate(bearer(secrets[0] + "x"))
    accounts.revoke_key(gw.db, accounts.list_keys(gw.db, account.id)[0].id)
    with pytest.raises(GatewayError):
        await gw.authenticate(bearer(secrets[0]))
    text = dump_database(gw, data_dir)
    for secret in secrets:
        assert hash_key(secret) in text  # the hash is there ...
        random_part = secret.removeprefix("sk-")
        assert random_part not in text  # ... the key is not, not even without its prefix
        assert random_part[8:24] not in text
        assert random_part not in caplog.text


async def test_unknown_malformed_and_missing_keys_get_401(gw: DatabaseGateway) -> None:
    for header in (None, "", "Bearer", "Basic abc", bearer("sk-" + "a" * 43), "Bearer sk-short"):
        with pytest.raises(GatewayError) as info:
            await gw.authenticate(header)
        assert (info.value.status, info.value.code) == (401, "invalid_api_key")
        assert info.value.type == "invalid_request_error"


async def test_revoked_key_gets_401_from_the_next_request(gw: DatabaseGateway) -> None:
    account = new_account(gw, credit=1_000_000)
    secret = new_key(gw, account)
    principal = await gw.authenticate(bearer(secret))
    accounts.revoke_key(gw.db, principal.key_id)
    with pytest.raises(GatewayError) as info:
        await gw.authenticate(bearer(secret))
    assert (info.value.status, info.value.code) == (401, "invalid_api_key")
    assert "revoked" in info.value.message
    # A principal authenticated just before the revocation cannot reserve either.
    with pytest.raises(GatewayError) as info:
        await gw.admit(
            principal, request_id="r1", model="m", prompt_tokens=1, max_completion_tokens=1
        )
    assert info.value.status == 401


async def test_expired_key_and_disabled_account_get_401(gw: DatabaseGateway) -> None:
    account = new_account(gw, credit=1_000_000)
    expired = new_key(gw, account, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(GatewayError) as info:
        await gw.authenticate(bearer(expired))
    assert (info.value.status, info.value.code) == (401, "invalid_api_key")
    assert "expired" in info.value.message
    valid = new_key(gw, account, expires_at=datetime.now(UTC) + timedelta(days=1))
    await gw.authenticate(bearer(valid))
    accounts.set_account_disabled(gw.db, account.id, True)
    with pytest.raises(GatewayError) as info:
        await gw.authenticate(bearer(valid))
    assert info.value.status == 401
    accounts.set_account_disabled(gw.db, account.id, False)
    await gw.authenticate(bearer(valid))


async def test_model_restricted_key_gets_403_for_another_model(gw: DatabaseGateway) -> None:
    account = new_account(gw, credit=1_000_000)
    secret = new_key(gw, account, allowed_models=["qwen2-0.5b"])
    principal = await gw.authenticate(bearer(secret))
    with pytest.raises(GatewayError) as info:
        await gw.admit(
            principal, request_id="r1", model="llama", prompt_tokens=1, max_completion_tokens=1
        )
    assert (info.value.status, info.value.code, info.value.param) == (
        403,
        "model_not_allowed",
        "model",
    )
    admission = await gw.admit(
        principal, request_id="r2", model="qwen2-0.5b", prompt_tokens=1, max_completion_tokens=1
    )
    await gw.settle(
        admission,
        prompt_tokens=1,
        completion_tokens=1,
        end_state="completed",
        finish_reasons=["stop"],
    )
    refused = usage.get_usage(gw.db, "r1")
    assert refused is not None
    assert (refused.status, refused.end_state, refused.cost_micros) == ("closed", "rejected", 0)
    assert refused.finish_reasons == ["model_not_allowed"]


async def test_static_keys_accept_only_their_keys() -> None:
    gate = StaticKeys(["sk-one-1234567890", "sk-two-1234567890"])
    principal = await gate.authenticate("Bearer sk-two-1234567890")
    assert principal.key_prefix == "sk-two-1234"
    assert "sk-two-1234567890" not in repr(principal)
    for header in (None, "Bearer sk-three", "Bearer sk-one-123456789"):
        with pytest.raises(GatewayError) as info:
            await gate.authenticate(header)
        assert (info.value.status, info.value.code, info.value.type) == (
            401,
            "invalid_api_key",
            "invalid_request_error",
        )
    admission = await gate.admit(
        principal, request_id="r", model="m", prompt_tokens=1, max_completion_tokens=1
    )
    await gate.record_tokens(admission, 1)
    await gate.settle(
        admission,
        prompt_tokens=1,
        completion_tokens=1,
        end_state="completed",
        finish_reasons=["stop"],
    )
    with pytest.raises(ValueError):
        StaticKeys([])


async def test_open_access_admits_everyone() -> None:
    gate = OpenAccess()
    for header in (None, "Bearer anything"):
        principal = await gate.authenticate(header)
        assert principal.account_id == "anonymous"
    admission = await gate.admit(
        principal, request_id="r", model="m", prompt_tokens=1, max_completion_tokens=1
    )
    assert admission.headers == {}
