"""Errors the engine raises for bad input; each names the problem and the field."""

from __future__ import annotations


class EngineError(RuntimeError):
    """The engine failed while running a request (not the caller's fault)."""


class EngineDeadError(EngineError):
    """The engine loop has stopped; no request can be served."""


class PromptTooLongError(ValueError):
    """The prompt plus the requested completion does not fit in the model's context."""

    def __init__(self, num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        if max_tokens is None:
            msg = (
                f"This model's maximum context length is {max_model_len} tokens. However, your "
                f"messages resulted in {num_prompt_tokens} tokens, which leaves no room for a "
                "completion. Please reduce the length of the messages."
            )
        else:
            msg = (
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                "messages or completion."
            )
        super().__init__(msg)
