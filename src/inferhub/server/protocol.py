"""The OpenAI request schema as strict pydantic models (chat and legacy completions), and the
one way from a request to the engine's `SamplingParams`.

Strict means: wrong JSON types are errors (no "1" for 1, no 1.0 for an int), unknown fields
are errors, OpenAI fields that inferhub does not implement are errors that say so, and every
range is OpenAI's. Nothing a caller sends is silently ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from inferhub.engine.sampling_params import (
    MAX_N,
    MAX_STOP_SEQUENCES,
    MAX_TOP_LOGPROBS,
    SamplingParams,
)

MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API allows at most 5
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# top_k becomes an int64 tensor in the sampler; anything above a vocabulary size means "off".
MAX_TOP_K = 2**31 - 1
_TOKEN_ID = re.compile(r"^[0-9]+$")

Temperature = Annotated[float | None, Field(ge=0.0, le=2.0)]
TopP = Annotated[float | None, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float | None, Field(ge=-2.0, le=2.0)]
NumChoices = Annotated[int | None, Field(ge=1, le=MAX_N)]
MaxTokens = Annotated[int | None, Field(ge=1)]
Seed = Annotated[int | None, Field(ge=SEED_MIN, le=SEED_MAX)]


def _unsupported(field: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported_parameter", message, {"field": field})


class StrictModel(BaseModel):
    """Strict types, unknown fields refused; OpenAI fields we do not implement refused by name.

    `UNSUPPORTED` maps a field to the only value that may be sent (None: none may)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    UNSUPPORTED: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, allowed in cls.UNSUPPORTED.items():
                value = data.get(name)
                if value is not None and value != allowed:
                    raise _unsupported(
                        name, f"'{name}' is not supported by inferhub" + _hint(allowed)
                    )
            return {k: v for k, v in data.items() if k not in cls.UNSUPPORTED}
        return data


def _hint(allowed: Any) -> str:
    if allowed is None:
        return "."
    return f"; the only accepted value is {allowed!r}."


class StreamOptions(StrictModel):
    include_usage: bool | None = None


# -- chat ------------------------------------------------------------------------------------


class ChatMessage(StrictModel):
    """One message. `content` is a string or a list of text parts (joined); `developer` is
    rendered as `system`, which is what the chat templates know."""

    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "name": None,
        "tool_calls": None,
        "tool_call_id": None,
        "function_call": None,
        "audio": None,
        "refusal": None,
    }

    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("role", mode="before")
    @classmethod
    def refuse_tool_roles(cls, role: Any) -> Any:
        if role in ("tool", "function"):
            raise ValueError(
                f"Messages with role '{role}' are not supported: inferhub has no tool calling yet."
            )
        return role

    @field_validator("content", mode="before")
    @classmethod
    def join_text_parts(cls, content: Any) -> Any:
        if not isinstance(content, list):
            return content
        texts: list[str] = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError(f"content[{i}] must be an object with a 'type'.")
            if part["type"] != "text":
                raise ValueError(
                    f"content[{i}] has type '{part['type']}'; only 'text' parts are supported."
                )
            if set(part) != {"type", "text"} or not isinstance(part["text"], str):
                raise ValueError(f"content[{i}] must be {{'type': 'text', 'text': <string>}}.")
            texts.append(part["text"])
        return "".join(texts)

    def as_template_message(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.content}


def _normalize_stop(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError("Invalid type for 'stop': expected a string or an array of strings.")
    if len(value) > MAX_STOP_SEQUENCES:
        raise ValueError(
            f"'stop' may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(value)}."
        )
    if any(not s for s in value):
        raise ValueError("Stop sequences must be non-empty strings.")
    return value


def _normalize_logit_bias(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("Invalid type for 'logit_bias': expected an object of token id -> bias.")
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not isinstance(key, str) or not _TOKEN_ID.match(key):
            raise ValueError(f"Invalid key in 'logit_bias': {key!r} is not a token id.")
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise ValueError(f"Invalid value in 'logit_bias' for token {key}: expected a number.")
        if not -100 <= bias <= 100:
            raise ValueError(
                f"Invalid value in 'logit_bias' for token {key}: {bias} is outside [-100, 100]."
            )
        out[int(key)] = float(bias)
    return out


class _SamplingFields(StrictModel):
    """The parameters chat and completions share, and their mapping to SamplingParams."""

    model: str
    temperature: Temperature = None
    top_p: TopP = None
    n: NumChoices = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: list[str] = Field(default_factory=list)
    max_tokens: MaxTokens = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    logit_bias: dict[int, float] | None = None
    seed: Seed = None
    user: str | None = None
    # inferhub (and vLLM) extensions; the openai client sends them through `extra_body`.
    top_k: Annotated[int | None, Field(ge=0, le=MAX_TOP_K)] = None
    min_p: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    ignore_eos: bool | None = None

    check_stop = field_validator("stop", mode="before")(_normalize_stop)
    check_logit_bias = field_validator("logit_bias", mode="before")(_normalize_logit_bias)

    @model_validator(mode="after")
    def check_stream_options(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise _unsupported(
                "stream_options",
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            )
        return self

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.num_choices,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=dict(self.logit_bias) if self.logit_bias else None,
            max_tokens=max_tokens,
            stop=list(self.stop),
            ignore_eos=bool(self.ignore_eos),
            seed=self.seed,
            logprobs=logprobs,
        )


class ChatCompletionRequest(_SamplingFields):
    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "tools": None,
        "tool_choice": None,
        "functions": None,
        "function_call": None,
        "parallel_tool_calls": None,
        "response_format": {"type": "text"},
        "modalities": ["text"],
        "audio": None,
        "prediction": None,
        "reasoning_effort": None,
        "verbosity": None,
        "web_search_options": None,
        "service_tier": None,
        "store": False,
        "metadata": None,
        "prompt_cache_key": None,
        "safety_identifier": None,
    }

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None

    @model_validator(mode="after")
    def check_pairs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _unsupported("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise _unsupported(
                "max_completion_tokens", "Send 'max_tokens' or 'max_completion_tokens', not both."
            )
        return self

    def template_messages(self) -> list[dict[str, str]]:
        return [m.as_template_message() for m in self.messages]

    def to_sampling_params(self) -> SamplingParams:
        max_tokens = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)


# -- legacy completions ------------------------------------------------------------------------

PromptItem = str | list[int]


def _normalize_prompt(value: Any) -> Any:
    """str | list[str] | list[int] | list[list[int]] -> a non-empty list of prompts."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise ValueError(
            "Invalid 'prompt': expected a string, an array of strings, an array of token ids "
            "or an array of arrays of token ids (non-empty)."
        )
    if all(isinstance(v, str) for v in value):
        return value
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [value]
    if all(
        isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        for v in value
    ):
        return value
    raise ValueError(
        "Invalid 'prompt': an array must hold only strings, only token ids, or only non-empty "
        "arrays of token ids."
    )


class CompletionRequest(_SamplingFields):
    UNSUPPORTED: ClassVar[dict[str, Any]] = {"suffix": None}

    prompt: list[PromptItem]
    max_tokens: MaxTokens = 16  # the legacy API's default
    echo: bool | None = None
    logprobs: Annotated[int | None, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] = None
    best_of: Annotated[int | None, Field(ge=1, le=MAX_N)] = None

    check_prompt = field_validator("prompt", mode="before")(_normalize_prompt)

    @model_validator(mode="after")
    def check_pairs(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.num_choices:
            raise _unsupported(
                "best_of", "'best_of' different from 'n' is not supported by inferhub."
            )
        if self.echo and self.logprobs is not None:
            raise _unsupported(
                "echo",
                "'echo' together with 'logprobs' (prompt logprobs) is not supported by inferhub.",
            )
        if len(self.prompt) * self.num_choices > MAX_N:
            raise _unsupported(
                "prompt",
                f"At most {MAX_N} choices per request: {len(self.prompt)} prompts x n="
                f"{self.num_choices} is too many.",
            )
        return self

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)
