"""Continuous batching: which sequences run in the next step, and with how many tokens.

One step computes up to `max_num_batched_tokens` tokens over at most `max_num_seqs`
sequences. Running sequences go first (one token for a decode, a chunk for an unfinished
prefill), then waiting ones in arrival order, their prompts cut into chunks to fit the
budget. When the KV cache is out of blocks, the most recently admitted running sequence is
preempted: its blocks are freed and it is computed again later (recompute).
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

from inferhub.engine.block_manager import BlockManager
from inferhub.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192


@dataclass
class SchedulerOutput:
    """What one engine step computes."""

    # The sequences to run, in batch order (decodes first, then prefill chunks).
    seqs: list[Sequence] = field(default_factory=list)
    # For each of `seqs`, how many new tokens it computes in this step (its query length).
    num_new_tokens: list[int] = field(default_factory=list)
    # For each of `seqs`, whether it computes its last pending token in this step and so
    # yields logits to sample from (False for a chunk in the middle of a prompt).
    do_sample: list[bool] = field(default_factory=list)
    # KV blocks to copy before the step runs (copy on write of blocks shared after a fork).
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    # Sequences sent back to the waiting queue in this step to free blocks.
    preempted: list[Sequence] = field(default_factory=list)
    # Waiting sequences that can never get their blocks (the cache is empty and still too
    # small); they are finished with FinishReason.ERROR.
    failed: list[Sequence] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def samples(self, i: int) -> bool:
        return self.do_sample[i]

    def _add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.do_sample.append(seq.num_computed_tokens + n == seq.num_tokens)


class Scheduler:
    """Owns the waiting and running queues and the block manager's decisions."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # -- queues ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence, after: Sequence) -> None:
        """Insert a forked sibling right after its parent in the running queue."""
        seq.status = SequenceStatus.RUNNING
        self.running.insert(self.running.index(after) + 1, seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End `seq` and free its blocks, whichever queue holds it."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # -- one step --------------------------------------------------------------------------
    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        """Choose the sequences and token counts of the next step.

        Returns a SchedulerOutput whose `seqs[i]` computes `num_new_tokens[i]` tokens starting
        at its `num_computed_tokens`; blocks for them are already allocated. The caller runs
        the model and then calls `update_after_step`.
        """
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[int] = set()

        # 1. Running sequences, oldest first; preempt the newest when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0:
                i += 1
                continue
            copies = self.block_manager.allocate_slots(seq, n)
            while copies is None:
                victim = self.running[-1]
                if victim.seq_id in scheduled:
                    victim = seq  # never undo work already handed out in this step
                self._preempt(victim, out)
                if victim is seq:
                    break
                copies = self.block_manager.allocate_slots(seq, n)
            if copies is None:
                continue  # seq itself was preempted; self.running[i] is now the next one
            out.blocks_to_copy.extend(copies)
            out._add(seq, n)
            scheduled.add(seq.seq_id)
            budget -= n
            i += 1

        # 2. Waiting sequences in arrival order, unless this step had to preempt.
        while (
            self.waiting
            and budget > 0
            and not out.preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            if not seq.block_table:
                self.block_manager.allocate_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            copies = self.block_manager.allocate_slots(seq, n)
            if copies is None:
                if not self.running:
                    # Nothing will ever free blocks for it: admission control upstream
                    # must keep this from happening; fail it rather than hang.
                    self.waiting.popleft()
                    self.block_manager.free(seq)
                    seq.status = SequenceStatus.FINISHED
                    seq.finish_reason = FinishReason.ERROR
                    out.failed.append(seq)
                    continue
                self.block_manager.free(seq)  # give back prefix-cache hits for now
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.blocks_to_copy.extend(copies)
            out._add(seq, n)
            scheduled.add(seq.seq_id)
            budget -= n
        return out

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance the computed-token counters of the sequences that ran."""
        for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += n
            self.block_manager.commit_computed_blocks(seq)
