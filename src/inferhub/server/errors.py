"""OpenAI-shaped errors: the `{"error": {...}}` body and the handlers that turn every failure
(ours, FastAPI's validation, Starlette's HTTP errors, the gateway's refusals, the engine's
bad-input errors) into it, with OpenAI's status codes and a `param` naming the field."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferhub.engine.errors import EngineDeadError, PromptTooLongError
from inferhub.engine.sampling_params import SamplingParamsError
from inferhub.gateway.interface import GatewayError
from inferhub.gateway.keys import redact_keys

log = logging.getLogger(__name__)


class APIError(Exception):
    """A refusal the handlers raise; rendered as OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    # A message may quote what the caller sent (a path, a value): never a whole key.
    message = redact_keys(message)
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def server_error(message: str, status: int = 500) -> APIError:
    return APIError(status, message, type="server_error", code=None)


OVERLOAD_RETRY_AFTER_S = 2


def overloaded(model: str, queued: int) -> APIError:
    return APIError(
        503,
        f"The server is overloaded: {queued} requests are already waiting for `{model}`. "
        "Please retry shortly.",
        type="server_error",
        code="server_overloaded",
        headers={"retry-after": str(OVERLOAD_RETRY_AFTER_S)},
    )


def request_timeout(seconds: float) -> APIError:
    return APIError(
        504,
        f"The request did not finish within the server's limit of {seconds:g} seconds and was "
        "stopped; the tokens generated until then are billed.",
        type="server_error",
        code="request_timeout",
    )


def from_sampling_error(exc: SamplingParamsError) -> APIError:
    return APIError(400, exc.message, param=exc.param, code="invalid_value")


def from_prompt_too_long(exc: PromptTooLongError, param: str = "messages") -> APIError:
    return APIError(400, str(exc), param=param, code="context_length_exceeded")


# -- pydantic / FastAPI validation errors ----------------------------------------------------

_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "an array",
}


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a body that is not JSON"


def _num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


def param_path(loc: Sequence[int | str]) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role" (OpenAI's way of naming a field)."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_error(errors: Sequence[Any]) -> APIError:
    """The first pydantic error as an OpenAI 400, with OpenAI's wording where it has one."""
    err: dict[str, Any] = dict(errors[0]) if errors else {"type": "missing", "loc": ("body",)}
    kind = str(err.get("type", ""))
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    loc = list(err.get("loc") or ())
    if ctx.get("field"):
        loc.append(str(ctx["field"]))
    param = param_path(loc) or None
    value = err.get("input")
    if kind == "json_invalid":
        return APIError(
            400,
            "We could not parse the JSON body of your request: "
            f"{ctx.get('error', 'invalid JSON')}. The body must be a JSON object.",
        )
    if param is None:
        if kind == "missing":
            message = "The request body is missing; send a JSON object."
        else:
            message = (
                "The request body must be a JSON object (send it with "
                f"`Content-Type: application/json`), but got {_json_kind(value)}."
            )
        return APIError(400, message)
    if kind == "missing":
        message = f"Missing required parameter: '{param}'."
    elif kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif kind in _EXPECTED:
        message = (
            f"Invalid type for '{param}': expected {_EXPECTED[kind]}, "
            f"but got {_json_kind(value)} instead."
        )
    elif kind == "literal_error":
        message = f"Invalid value: {_num(value)}. Supported values are: {ctx.get('expected')}."
    elif kind == "less_than_equal":
        message = f"{_num(value)} is greater than the maximum of {_num(ctx.get('le'))} - '{param}'"
    elif kind == "less_than":
        message = f"{_num(value)} is greater than or equal to the maximum of {_num(ctx.get('lt'))} - '{param}'"
    elif kind == "greater_than_equal":
        message = f"{_num(value)} is less than the minimum of {_num(ctx.get('ge'))} - '{param}'"
    elif kind == "greater_than":
        message = f"{_num(value)} is less than or equal to the minimum of {_num(ctx.get('gt'))} - '{param}'"
    elif kind == "too_short":
        message = f"'{param}' must hold at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length')}."
    elif kind == "too_long":
        message = f"'{param}' may hold at most {ctx.get('max_length')} item(s), got {ctx.get('actual_length')}."
    elif kind == "value_error":
        message = str(ctx.get("error") or err.get("msg"))
    elif kind == "unsupported_parameter":
        return APIError(400, str(err.get("msg")), param=param, code="unsupported_parameter")
    else:
        message = f"{err.get('msg')} - '{param}'"
    return APIError(400, message, param=param, code="invalid_value" if kind != "missing" else None)


# -- handlers ----------------------------------------------------------------------------------

_STATUS_TYPES = {401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_exceeded"}


def as_api_error(exc: Exception) -> APIError:
    """Any failure as the OpenAI error a caller should see (500 for the unexpected)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, GatewayError):
        return APIError(
            exc.status,
            exc.message,
            type=exc.type,
            param=exc.param,
            code=exc.code,
            headers=exc.headers,
        )
    if isinstance(exc, SamplingParamsError):
        return from_sampling_error(exc)
    if isinstance(exc, PromptTooLongError):
        return from_prompt_too_long(exc)
    if isinstance(exc, EngineDeadError):
        log.error("engine unavailable: %s", exc)
        return server_error("The model's engine is not running; try again later.", 503)
    log.error("unexpected error", exc_info=exc)
    return server_error("The server had an error while processing your request.")


async def _known_error(request: Request, exc: Exception) -> JSONResponse:
    return as_api_error(exc).response()


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error(exc.errors()).response()


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif status == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}."
    elif status == 413:
        server = getattr(request.app.state, "server", None)
        limit = f" (limit {server.config.max_body_bytes} bytes)" if server is not None else ""
        message = f"The request body is too large{limit}."
    else:
        message = str(exc.detail)
    err_type = _STATUS_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    return APIError(status, message, type=err_type, headers=exc.headers).response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error in %s %s", request.method, request.url.path)
    return as_api_error(exc).response()


def install_error_handlers(app: FastAPI) -> None:
    for known in (APIError, GatewayError, SamplingParamsError, PromptTooLongError, EngineDeadError):
        app.add_exception_handler(known, _known_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
