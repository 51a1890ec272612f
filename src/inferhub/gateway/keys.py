"""API key material: generation, hashing and the visible prefix; ids for rows.

A key is `sk-` + 43 URL-safe characters (32 random bytes). Only its SHA-256 is stored: the key
has 256 bits of entropy, so a fast hash is safe against offline guessing and lets the gateway
find the key by an indexed lookup; the final comparison is constant-time anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_PREFIX = "sk-"
KEY_RANDOM_BYTES = 32
VISIBLE_CHARS = 8  # of the random part, shown in listings: "sk-AbCd1234"
_KEY_SHAPED = re.compile(re.escape(KEY_PREFIX) + "[A-Za-z0-9_-]{" + str(VISIBLE_CHARS + 1) + ",}")


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def hashes_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("ascii"), b.encode("ascii"))


def visible_prefix(key: str) -> str:
    """The part of a key that may be shown and logged, e.g. `sk-AbCd1234`."""
    head = KEY_PREFIX if key.startswith(KEY_PREFIX) else ""
    return head + key[len(head) : len(head) + VISIBLE_CHARS]


def redact_keys(text: str) -> str:
    """`text` with anything shaped like a key cut to its visible prefix, for messages that
    quote what a caller sent (a key pasted where an id belongs)."""
    return _KEY_SHAPED.sub(lambda m: visible_prefix(m.group(0)) + "...", text)


def parse_bearer(authorization: str | None) -> str | None:
    """The key in an `Authorization: Bearer <key>` header value, or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        return None
    return value


def new_id(kind: str) -> str:
    """A random row id such as `acct_3f2a...` or `key_9b1c...`."""
    return f"{kind}_{secrets.token_hex(8)}"
