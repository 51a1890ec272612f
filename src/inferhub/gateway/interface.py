"""The contract between the HTTP server and whatever decides who may call and what it costs.

The server calls, per request: `authenticate` (the bearer key), `admit` (model permission,
rate limits, reservation of credit), `record_tokens` as completion tokens are generated
(tokens-per-minute accounting), and exactly one `settle` when the request ends, however it
ends. Two implementations: `StaticKeys` (a fixed key list, no billing) and the database-backed
gateway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class GatewayError(Exception):
    """An OpenAI-shaped refusal: HTTP status, error type, code, message and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}


@dataclass
class Principal:
    """Who is calling: the key and its account."""

    key_id: str  # a stable id of the key (never the key itself)
    account_id: str
    role: str = "user"  # "admin" or "user"
    key_prefix: str = ""  # the short visible prefix, for logs and listings


@dataclass
class Admission:
    """A request let in: its reservation and the rate-limit state to report in headers."""

    request_id: str
    principal: Principal
    model: str
    reserved_micros: int = 0
    headers: dict[str, str] = field(default_factory=dict)


class Gatekeeper(Protocol):
    async def authenticate(self, authorization: str | None) -> Principal:
        """Check an `Authorization` header value; raise GatewayError(401) if it is not valid."""
        ...

    async def admit(
        self,
        principal: Principal,
        *,
        request_id: str,
        model: str,
        prompt_tokens: int,
        max_completion_tokens: int,
    ) -> Admission:
        """Check model access and limits, reserve credit for prompt + max completion tokens
        (max_completion_tokens is already n x max_tokens); raise GatewayError (403, 429)."""
        ...

    async def record_tokens(self, admission: Admission, completion_tokens: int) -> None:
        """Completion tokens generated since the last call (for tokens-per-minute limits)."""
        ...

    async def settle(
        self,
        admission: Admission,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        end_state: str,
        finish_reasons: list[str],
    ) -> None:
        """Bill the engine's token counts and release the rest; exactly once per request.
        end_state: "completed" | "client_disconnected" | "error" | "shutdown" | "rejected"."""
        ...
