"""One sequence: its token ids, status, block table and counters."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from inferhub.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, an end-of-turn token, a stop string or a stop token id
    LENGTH = "length"  # max_tokens or the end of the context
    ABORT = "abort"  # the caller went away or the server shut down
    ERROR = "error"  # the engine failed while running this sequence


_seq_counter = itertools.count()


@dataclass
class Sequence:
    """A prompt and what has been generated for it.

    `num_computed_tokens` counts the tokens whose KV is in the cache (prefix-cache hits
    included); the scheduler computes `num_tokens - num_computed_tokens` more of them.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    index: int = 0  # choice index inside its request (n > 1)
    max_tokens: int = 1  # resolved output budget (max_tokens or the context remainder)
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # full blocks of this sequence registered in the prefix cache
    last_block_hash: int | None = None
    fork_n: int = 1  # > 1 until the first token is sampled: then this forks n-1 siblings
    num_preemptions: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefill(self) -> bool:
        """True while more than one token remains to be computed."""
        return self.num_tokens - self.num_computed_tokens > 1

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
