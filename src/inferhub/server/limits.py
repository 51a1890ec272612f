"""Guards on request bodies: the size limit (an OpenAI-shaped 413 before a too-large body is
read) and the refusal of JSON strings that are not valid Unicode (lone surrogate escapes)."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferhub.server.errors import APIError


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is too large (limit {limit} bytes).")


class BodyLimit:
    """Refuses a declared Content-Length over the limit at once; counts streamed bodies."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await too_large(self.max_bytes).response()(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413)  # rendered by the 413 handler in errors.py
            return message

        await self.app(scope, limited_receive, send)


# A UTF-16 surrogate as a JSON escape (paired ones are valid, lone ones are not) or encoded
# as UTF-8 bytes (never valid, but Python's JSON parser decodes them with "surrogatepass").
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
LONE_SURROGATE = (
    "The request body holds a lone UTF-16 surrogate (such as \\ud800), which is not valid "
    "Unicode; send valid UTF-8 text."
)


def holds_lone_surrogate(body: bytes) -> bool:
    """Whether `body`, parsed as JSON, holds a string (or key) with a lone surrogate. A body
    that does not parse is left to the app, which reports the parse error."""
    if not _SURROGATE.search(body):
        return False
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return False
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class UnicodeGuard:
    """Refuses (400) a body whose JSON strings hold lone surrogates: Python's JSON parser
    accepts them, but they cannot be tokenized, stored or written back as UTF-8, so they
    would otherwise fail deep inside a request (as a 500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def checked_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body = b"".join(chunks)
                    chunks.clear()
                    if holds_lone_surrogate(body):
                        raise HTTPException(400, LONE_SURROGATE)
            return message

        await self.app(scope, checked_receive, send)
