"""Scheduler and block manager on CPU with no model (vLLM style): build sequences, schedule,
pretend the model ran, assert on token counts and block use."""

from __future__ import annotations

import sys

from inferhub.engine.block_manager import BlockManager
from inferhub.engine.sampling_params import SamplingParams
from inferhub.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from inferhub.engine.sequence import FinishReason, Sequence, SequenceStatus


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    budget: int = 32,
    max_seqs: int = 8,
    cache: bool = True,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=1024),
        BlockManager(num_blocks, block_size, enable_prefix_caching=cache),
    )


def seq(n_prompt: int, rid: str = "r", first: int = 0, max_tokens: int = 100) -> Sequence:
    return Sequence(
        rid, list(range(first, first + n_prompt)), SamplingParams(), max_tokens=max_tokens
    )


def run_step(s: Scheduler, token: int = 7) -> SchedulerOutput:
    """Schedule one step and pretend the model produced `token` for each sampling sequence."""
    out = s.schedule()
    sampling = [q for i, q in enumerate(out.seqs) if out.samples(i)]
    s.update_after_step(out)
    for q in sampling:
        q.append_token(token)
    return out


def test_scheduler_does_not_import_torch() -> None:
    # The bookkeeping modules must stay free of torch (design.md).
    import inferhub.engine.block_manager as bm
    import inferhub.engine.scheduler as sch

    for mod in (bm, sch):
        assert "torch" not in mod.__dict__
    from pathlib import Path

    src = Path(sch.__file__).read_text() + Path(bm.__file__).read_text()
    assert "import torch" not in src
    assert "inferhub.engine.scheduler" in sys.modules


def test_prefill_then_decode_token_counts() -> None:
    s = make_scheduler()
    a, b = seq(10, "a"), seq(6, "b", first=100)
    s.add(a)
    s.add(b)
    out = run_step(s)
    assert out.num_new_tokens == [10, 6]
    assert a.num_computed_tokens == 10 and b.num_computed_tokens == 6
    assert a.num_tokens == 11 and b.num_tokens == 7
    # blocks: ceil(10/4)=3 and ceil(6/4)=2
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    out = run_step(s)
    assert out.num_new_tokens == [1, 1]
    assert len(a.block_table) == 3  # position 10 still fits in block 3
    assert len(b.block_table) == 2  # position 6 fits in block 2 (slots 4..7)
    out = run_step(s)  # a at position 11, b at 7
    out = run_step(s)  # a at 12 -> needs a 4th block
    assert len(a.block_table) == 4


def test_chunked_prefill_respects_budget_and_keeps_decodes_running() -> None:
    s = make_scheduler(budget=8)
    short = seq(3, "short")
    s.add(short)
    run_step(s)  # short prefilled, now decoding
    long = seq(20, "long", first=50)
    s.add(long)
    out = run_step(s)
    # the decode goes first and the long prompt gets the rest of the budget
    assert out.seqs == [short, long] and out.num_new_tokens == [1, 7]
    assert not out.samples(1)  # a partial prefill does not sample
    assert long.num_tokens == 20
    out = run_step(s)
    assert out.num_new_tokens == [1, 7]
    out = run_step(s)
    assert out.num_new_tokens == [1, 6] and out.samples(1)
    assert long.num_tokens == 21 and long.num_computed_tokens == 20


def test_prefix_cache_hit_reuses_full_blocks() -> None:
    s = make_scheduler()
    a = seq(10, "a")
    s.add(a)
    run_step(s)
    s.finish(a, FinishReason.STOP)
    bm = s.block_manager
    assert bm.num_used_blocks == 0
    b = seq(10, "b")  # same prompt: the two full blocks (8 tokens) are cached
    s.add(b)
    out = run_step(s)
    assert b.num_cached_tokens == 8
    assert out.num_new_tokens == [2]
    c = seq(8, "c")  # a prompt that is exactly two blocks keeps one token to compute
    s.add(c)
    out = run_step(s)
    assert c.num_cached_tokens == 4 and out.num_new_tokens[-1] == 4


def test_prefix_cache_distinguishes_different_prefixes() -> None:
    s = make_scheduler()
    a = seq(9, "a")
    s.add(a)
    run_step(s)
    b = Sequence("b", [0, 1, 2, 3, 99, 5, 6, 7, 8], SamplingParams(), max_tokens=5)
    s.add(b)
    run_step(s)
    assert b.num_cached_tokens == 4  # only the first block matches


def test_shared_blocks_are_reference_counted() -> None:
    s = make_scheduler()
    a, b = seq(8, "a"), seq(9, "b")
    s.add(a)
    run_step(s)
    s.add(b)
    run_step(s)
    bm = s.block_manager
    shared = a.block_table[0]
    assert b.block_table[0] == shared and bm.blocks[shared].ref_count == 2
    s.finish(a, FinishReason.STOP)
    assert bm.blocks[shared].ref_count == 1
    s.finish(b, FinishReason.STOP)
    assert bm.num_used_blocks == 0


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    s = make_scheduler(num_blocks=6, block_size=4, budget=64, cache=False)
    a, b = seq(8, "a"), seq(8, "b", first=100)
    s.add(a)
    s.add(b)
    run_step(s)  # 2 + 2 blocks used, each has 9 tokens now
    assert s.block_manager.num_free_blocks == 2
    run_step(s)  # each needs a third block: 6 used
    assert s.block_manager.num_free_blocks == 0
    for _ in range(3):
        run_step(s)  # positions 9..11 fit
    out = run_step(s)  # both need a 4th block: b (newest) is preempted
    assert out.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == []
    assert out.seqs == [a]
    # b keeps its generated tokens and is recomputed later
    assert b.num_tokens == 13
    s.finish(a, FinishReason.STOP)
    out = run_step(s)
    assert out.seqs == [b] and out.num_new_tokens == [13]


def test_waiting_request_too_big_for_empty_cache_fails_instead_of_hanging() -> None:
    s = make_scheduler(num_blocks=2, block_size=4)
    big = seq(20, "big")
    s.add(big)
    out = s.schedule()
    assert out.failed == [big] and big.finish_reason is FinishReason.ERROR
    assert s.block_manager.num_used_blocks == 0
    assert not s.has_work()


def test_abort_frees_everything_at_once() -> None:
    s = make_scheduler(budget=4)
    a, b = seq(10, "a"), seq(5, "b", first=30)
    s.add(a)
    s.add(b)
    run_step(s)  # a partially prefilled, b waiting
    s.finish(a, FinishReason.ABORT)
    s.finish(b, FinishReason.ABORT)
    assert s.block_manager.num_used_blocks == 0
    assert not s.has_work()
    assert a.finish_reason is FinishReason.ABORT


def test_max_num_seqs_limits_the_batch() -> None:
    s = make_scheduler(max_seqs=2)
    seqs = [seq(3, f"r{i}", first=10 * i) for i in range(3)]
    for q in seqs:
        s.add(q)
    out = run_step(s)
    assert out.seqs == seqs[:2]
    assert len(s.waiting) == 1


def test_fork_shares_blocks_and_copies_on_write() -> None:
    s = make_scheduler()
    parent = seq(6, "p")
    s.add(parent)
    run_step(s, token=1)
    bm = s.block_manager
    child = Sequence(
        "p",
        parent.prompt_token_ids,
        SamplingParams(),
        index=1,
        max_tokens=10,
        token_ids=[*parent.token_ids[:-1], 2],
    )
    bm.fork(parent, child)
    s.add_running(child, after=parent)
    assert child.block_table == parent.block_table
    assert all(bm.blocks[b].ref_count == 2 for b in parent.block_table)
    out = s.schedule()
    # both write position 6, in the shared partial block 2: the second writer copies it
    assert out.seqs == [parent, child]
    assert len(out.blocks_to_copy) == 1
    src, dst = out.blocks_to_copy[0]
    assert parent.block_table[1] != child.block_table[1]
    assert {src, dst} == {parent.block_table[1], child.block_table[1]}
    assert parent.block_table[0] == child.block_table[0]  # the full block stays shared
    s.update_after_step(out)
    s.finish(parent, FinishReason.STOP)
    s.finish(child, FinishReason.STOP)
    assert bm.num_used_blocks == 0


def test_evicted_cached_block_is_not_reused_by_mistake() -> None:
    s = make_scheduler(num_blocks=4, block_size=4)
    a = seq(9, "a")
    s.add(a)
    run_step(s)
    s.finish(a, FinishReason.STOP)
    # fill the cache with other tokens so a's cached blocks are handed out again
    b = seq(15, "b", first=500)
    s.add(b)
    run_step(s)
    s.finish(b, FinishReason.STOP)
    c = seq(9, "c")
    s.add(c)
    run_step(s)
    assert c.num_cached_tokens == 0 or c.num_cached_tokens == 4
    bm = s.block_manager
    for i in range(c.num_cached_tokens // 4):
        assert bm.blocks[c.block_table[i]].token_ids == tuple(c.token_ids[i * 4 : (i + 1) * 4])
