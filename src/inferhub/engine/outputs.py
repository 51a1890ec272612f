"""What the engine hands back per step: the new tokens and text of each request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # the token's text (may be part of a UTF-8 character)
    logprob: float
    bytes: list[int]
    top: list[tuple[int, str, float, list[int]]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """One choice of a request. Deltas hold what is new since the previous output."""

    index: int
    text_delta: str
    token_ids_delta: list[int]
    logprobs_delta: list[TokenLogprob] | None
    text: str  # all the text so far (stop string cut)
    num_output_tokens: int  # tokens generated so far (what billing counts)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int
    outputs: list[CompletionOutput]  # only the choices that changed in this step
    finished: bool  # every choice of the request has finished
    error: str | None = None  # set with finish_reason "error"
