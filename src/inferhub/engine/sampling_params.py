"""SamplingParams: the one contract between the HTTP schema and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_STOP_SEQUENCES = 4
MAX_N = 128
MAX_TOP_LOGPROBS = 20


class SamplingParamsError(ValueError):
    """An out-of-range sampling value; `param` names the offending field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass
class SamplingParams:
    """How to sample one request. Defaults follow the OpenAI reference.

    `max_tokens=None` means "up to the model's context". `logprobs=None` turns logprobs off;
    an int k >= 0 returns the chosen token's logprob and the k most likely alternatives.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        stop: object = self.stop
        if isinstance(stop, str):
            self.stop = [stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise SamplingParamsError naming the first out-of-range field."""
        if not isinstance(self.n, int) or self.n < 1 or self.n > MAX_N:
            raise SamplingParamsError("n", f"n must be between 1 and {MAX_N}, got {self.n}.")
        if not 0.0 <= self.temperature <= 2.0:
            raise SamplingParamsError(
                "temperature", f"temperature must be between 0 and 2, got {self.temperature}."
            )
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(
                "top_p", f"top_p must be greater than 0 and at most 1, got {self.top_p}."
            )
        if self.top_k < 0:
            raise SamplingParamsError(
                "top_k", f"top_k must be 0 (off) or positive, got {self.top_k}."
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError("min_p", f"min_p must be between 0 and 1, got {self.min_p}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise SamplingParamsError(name, f"{name} must be between -2 and 2, got {value}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SamplingParamsError(
                "max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}."
            )
        if self.min_tokens < 0:
            raise SamplingParamsError("min_tokens", "min_tokens must be non-negative.")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise SamplingParamsError(
                "stop",
                f"stop may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(self.stop)}.",
            )
        if any(not s for s in self.stop):
            raise SamplingParamsError("stop", "stop sequences must be non-empty strings.")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingParamsError(
                "top_logprobs",
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}.",
            )
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                if not -100.0 <= bias <= 100.0:
                    raise SamplingParamsError(
                        "logit_bias",
                        f"logit_bias values must be between -100 and 100, got {bias} for token {token_id}.",
                    )
                if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                    raise SamplingParamsError(
                        "logit_bias",
                        f"logit_bias key {token_id} is not a token id of this model "
                        f"(vocabulary size {vocab_size}).",
                    )
        if vocab_size is not None:
            for token_id in self.stop_token_ids:
                if not 0 <= token_id < vocab_size:
                    raise SamplingParamsError(
                        "stop_token_ids", f"stop token id {token_id} is out of range."
                    )
