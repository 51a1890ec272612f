"""Incremental detokenization and stop strings.

Text is emitted only when it is complete: a token that ends inside a UTF-8 character waits
for the next one. Stop strings are matched across token boundaries; the text that could be
the start of a stop string is held back until it is known not to be one, so the stop text is
never sent, also not in a stream.
"""

from __future__ import annotations

from typing import Protocol

# Prompt tokens decoded with the output, so word-initial spaces come out right.
_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """The text of one sequence, built one token at a time."""

    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int], stop: list[str]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self.text = ""  # the output text so far, cut at a stop string
        self._emitted = 0  # characters of `text` already handed out
        self.stopped_by: str | None = None

    def _decode_new(self) -> str:
        prefix = self._tok.decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True
        )
        full = self._tok.decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""

    def add_token(self, token_id: int) -> None:
        """Append one token; sets `stopped_by` when a stop string appears."""
        if self.stopped_by is not None:
            return
        self._ids.append(token_id)
        new = self._decode_new()
        if not new:
            return
        start = max(0, len(self.text) - self._max_stop + 1)
        self.text += new
        if self._stop:
            best: tuple[int, str] | None = None
            for s in self._stop:
                pos = self.text.find(s, start)
                if pos != -1 and (best is None or pos < best[0]):
                    best = (pos, s)
            if best is not None:
                self.text = self.text[: best[0]]
                self.stopped_by = best[1]

    def _held_back(self) -> int:
        """Characters at the end of `text` that may begin a stop string."""
        if not self._stop or self.stopped_by is not None:
            return 0
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def flush_delta(self, final: bool = False) -> str:
        """Text that can be sent now; with final=True everything left (a sequence ended)."""
        end = len(self.text) if final else len(self.text) - self._held_back()
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
