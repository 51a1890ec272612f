"""The simple Gatekeepers: a fixed list of keys (`--api-key`), or no keys at all (loopback dev).

Neither bills nor limits; both answer the same protocol as the database gateway so the server
treats them alike.
"""

from __future__ import annotations

from inferhub.gateway.auth import invalid_key, missing_key
from inferhub.gateway.interface import Admission, Principal
from inferhub.gateway.keys import hash_key, hashes_equal, parse_bearer, visible_prefix


class StaticKeys:
    """Accepts exactly the given keys (compared in constant time); no billing, no limits."""

    def __init__(self, keys: list[str]) -> None:
        if not keys or any(not k for k in keys):
            raise ValueError("StaticKeys needs at least one non-empty key; use OpenAccess for none")
        # (hash, prefix) pairs: the keys themselves are not kept.
        self._keys = [(hash_key(k), visible_prefix(k)) for k in keys]

    async def authenticate(self, authorization: str | None) -> Principal:
        secret = parse_bearer(authorization)
        if secret is None:
            raise missing_key()
        digest = hash_key(secret)
        match: tuple[str, str] | None = None
        for stored, prefix in self._keys:  # every key is compared: no early exit
            if hashes_equal(stored, digest):
                match = (stored, prefix)
        if match is None:
            raise invalid_key()
        return Principal(key_id="static-" + match[0][:12], account_id="static", key_prefix=match[1])

    async def admit(
        self,
        principal: Principal,
        *,
        request_id: str,
        model: str,
        prompt_tokens: int,
        max_completion_tokens: int,
    ) -> Admission:
        return Admission(request_id=request_id, principal=principal, model=model)

    async def record_tokens(self, admission: Admission, completion_tokens: int) -> None:
        return None

    async def settle(
        self,
        admission: Admission,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        end_state: str,
        finish_reasons: list[str],
    ) -> None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class OpenAccess(StaticKeys):
    """Admits every caller, with or without a key: for a server bound to loopback only."""

    def __init__(self) -> None:
        self._keys = []

    async def authenticate(self, authorization: str | None) -> Principal:
        return Principal(key_id="anonymous", account_id="anonymous", role="user")
