"""Where the time of a CUDA decode step goes (random weights in the shapes of bench_gpu.py).

For each shape: the bandwidth cuBLAS reaches on each projection at batch 1, the GPU time of
the recorded decode graph at several batch sizes (events around replays), the host phases of
a batch-1 engine step (schedule, launch, wait for the GPU, sampling and output), the kernels
of one step (torch profiler), and, with --throughput, the host phases summed over nano-vllm's
workload. Prints tables and writes JSON (benchmarks/results/profile_gpu.json).

    python benchmarks/profile_gpu.py [--shapes 0.5b,7b] [--throughput 0.5b]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import SHAPES, add_workload, build, device_bandwidth
from common import print_table, write_json
from inferhub.config import EngineConfig
from inferhub.engine.llm_engine import LLMEngine
from inferhub.engine.sampling_params import SamplingParams
from inferhub.engine.scheduler import SchedulerOutput


def event_ms(fn: Any, reps: int, warmup: int = 3) -> float:
    """Median GPU milliseconds of fn() timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def gemv_rows(shape: str, dev: torch.device) -> list[dict[str, Any]]:
    """cuBLAS bf16 x @ W.T at batch 1 for each projection shape: GB/s of weight read. The
    weights rotate over copies larger than the L2 cache together."""
    s = SHAPES[shape]
    h, inter = s["hidden_size"], s["intermediate_size"]
    hd = h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    shapes = {
        "qkv": (q + 2 * kv, h),
        "o": (h, q),
        "gate_up": (2 * inter, h),
        "down": (h, inter),
        "lm_head": (151936, h),
    }
    rows = []
    for name, (n, k) in shapes.items():
        copies = max(2, int(256e6 // (n * k * 2)) + 1)
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device=dev) for _ in range(copies)]
        x = torch.randn(1, k, dtype=torch.bfloat16, device=dev)
        it = iter(range(1 << 30))

        def run(ws: list[torch.Tensor] = ws, x: torch.Tensor = x, it: Any = it) -> None:
            F.linear(x, ws[next(it) % len(ws)])

        ms = event_ms(run, 50)
        rows.append(
            {
                "shape": shape,
                "proj": f"{name} {n}x{k}",
                "us": ms * 1000,
                "GB_s": n * k * 2 / ms / 1e6,
            }
        )
        del ws
    return rows


def graph_rows(engine: LLMEngine, shape: str, ctx: int) -> list[dict[str, Any]]:
    """GPU ms of the recorded decode graph at each batch size, every row at context `ctx`."""
    graphs = engine.runner.graphs
    assert graphs is not None
    rows = []
    nb = engine.block_manager.num_blocks
    blocks = -(-ctx // engine.runner.block_size)
    for b in [x for x in (1, 8, 32, 64, 128, 256) if x in graphs.graphs]:
        gen = torch.Generator().manual_seed(b)
        graphs.ctx[:b] = ctx
        graphs.tables[:b, :blocks] = torch.randint(
            0, nb, (b, blocks), generator=gen, dtype=torch.int32
        ).to(graphs.tables.device)
        graphs.positions[:b] = ctx - 1
        graphs.slots[:b] = engine.runner.scratch_slot
        ms = event_ms(graphs.graphs[b].replay, 20)
        rows.append({"shape": shape, "batch": b, "context": ctx, "graph_ms": ms})
    return rows


def decode_kernel_rows(shape: str, dev: torch.device) -> list[dict[str, Any]]:
    """The paged decode kernel alone (bf16, block size 16, random block tables) for a few
    tile sizes and warp counts: microseconds per call and the GB/s of K/V it reads."""
    from inferhub.layers.triton_attention import decode_tile, paged_decode_attention

    s = SHAPES[shape]
    h, hkv = s["num_attention_heads"], s["num_key_value_heads"]
    d = s["hidden_size"] // h
    rows = []
    for batch, ctx in ((1, 600), (1, 4000), (64, 600), (256, 600)):
        blocks = batch * -(-ctx // 16)
        k = torch.randn(blocks * 16, hkv, d, dtype=torch.bfloat16, device=dev)
        v = torch.randn_like(k)
        tables = torch.randperm(blocks, device=dev).view(batch, -1).to(torch.int32)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        q = torch.randn(batch, h, d, dtype=torch.bfloat16, device=dev)
        for tile, warps in ((decode_tile(16, d), 4), (32, 4), (64, 4), (64, 8), (128, 8)):
            args = (q, k, v, tables, lens, 16, d**-0.5)
            ms = event_ms(partial(paged_decode_attention, *args, tile=tile, num_warps=warps), 20)
            rows.append(
                {
                    "shape": shape,
                    "batch": batch,
                    "context": ctx,
                    "tile": tile,
                    "warps": warps,
                    "us": ms * 1000,
                    "kv_GB_s": 2 * batch * ctx * hkv * d * 2 / ms / 1e6,
                }
            )
    return rows


PHASES = ("schedule", "execute", "wait", "post")


def timed_step(engine: LLMEngine) -> tuple[SchedulerOutput, tuple[float, ...]] | None:
    """One engine step (as LLMEngine.step does it) timed in its host phases, in seconds:
    schedule, execute (host until the launch returns), wait (the GPU's remainder, through an
    explicit synchronize), post (sampling, stop checks, outputs). None for an empty step."""
    t0 = time.perf_counter()
    sched = engine.scheduler.schedule()
    t1 = time.perf_counter()
    if sched.is_empty:
        return None
    idx = [i for i in range(len(sched.seqs)) if sched.samples(i)]
    logits = engine.runner.execute(sched, idx)
    t2 = time.perf_counter()
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    engine.scheduler.update_after_step(sched)
    engine._postprocess(sched, idx, logits)
    t4 = time.perf_counter()
    return sched, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)


def step_phases(engine: LLMEngine, steps: int) -> dict[str, float]:
    """Host phases of batch-1 decode steps (median ms, see timed_step) and whole steps."""
    rng = random.Random(0)
    engine.add_request(
        "phases",
        [rng.randrange(100, 150000) for _ in range(128)],
        SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True),
    )
    acc: dict[str, list[float]] = {k: [] for k in (*PHASES, "step")}
    n = 0
    while engine.has_unfinished_requests():
        timed = timed_step(engine)
        n += 1
        if timed is not None and n > 4:
            phases = timed[1]
            for k, v in zip(acc, (*phases, sum(phases)), strict=True):
                acc[k].append(v * 1000)
    return {k: statistics.median(v) for k, v in acc.items()}


def plain_step_ms(engine: LLMEngine, steps: int) -> float:
    rng = random.Random(1)
    engine.add_request(
        "plain",
        [rng.randrange(100, 150000) for _ in range(128)],
        SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True),
    )
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[2:])


def kernel_table(engine: LLMEngine, batch: int) -> str:
    graphs = engine.runner.graphs
    assert graphs is not None
    g = graphs.graphs[batch]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
    return str(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))


def throughput_phases(engine: LLMEngine, n: int, lo: int, hi: int) -> dict[str, Any]:
    """nano-vllm's workload with the host phases summed (seconds), decode and prefill steps
    apart. The explicit synchronize splits a step's host time from its GPU time."""
    total_out = add_workload(engine, n, lo, hi)
    sums = {f"{kind}_{k}": 0.0 for kind in ("decode", "prefill") for k in PHASES}
    counts = {"decode_steps": 0, "prefill_steps": 0}
    t_start = time.perf_counter()
    while engine.has_unfinished_requests():
        timed = timed_step(engine)
        if timed is None:
            continue
        sched, phases = timed
        kind = "decode" if all(x == 1 for x in sched.num_new_tokens) else "prefill"
        counts[f"{kind}_steps"] += 1
        for k, v in zip(PHASES, phases, strict=True):
            sums[f"{kind}_{k}"] += v
    elapsed = time.perf_counter() - t_start
    return {
        "elapsed_s": elapsed,
        "output_tok_s": total_out / elapsed,
        **counts,
        **{k: round(v, 3) for k, v in sums.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="0.5b,7b")
    ap.add_argument("--throughput", default="0.5b", help="shapes to run the workload on")
    ap.add_argument("--max-seqs", type=int, default=256)
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = device_bandwidth(dev)
    print(f"device {torch.cuda.get_device_name(0)}: copy bandwidth {bw / 1e12:.2f} TB/s")
    result: dict[str, Any] = {"bandwidth_Bps": bw, "gemv": [], "graphs": [], "phases": []}
    for shape in args.shapes.split(","):
        result["gemv"] += gemv_rows(shape, dev)
        print_table([r for r in result["gemv"] if r["shape"] == shape], ["proj", "us", "GB_s"])
        dk = decode_kernel_rows(shape, dev)
        result.setdefault("decode_kernel", []).extend(dk)
        print_table(dk, list(dk[0]))
        loaded = build(shape, dev)
        engine = LLMEngine(
            EngineConfig(
                model=shape,
                dtype="bfloat16",
                device="cuda",
                attention_backend="triton",
                max_num_seqs=args.max_seqs,
                max_num_batched_tokens=16384,
                max_model_len=4096,
                kv_cache_fraction=0.6,
                show_progress=False,
            ),
            loaded,
        )
        ph = step_phases(engine, 60)
        ph["plain_step_ms"] = plain_step_ms(engine, 60)
        ph["shape"] = shape  # type: ignore[assignment]
        result["phases"].append(ph)
        print_table([ph], list(ph))
        g = graph_rows(engine, shape, 130)[:1] + graph_rows(engine, shape, 600)
        result["graphs"] += g
        print_table(g, list(g[0]))
        table = kernel_table(engine, 1)
        print(table)
        result[f"kernels_{shape}_b1"] = table
        if 256 in (engine.runner.graphs.graphs if engine.runner.graphs else {}):
            table = kernel_table(engine, 256)
            print(table)
            result[f"kernels_{shape}_b256"] = table
        if shape in args.throughput.split(","):
            tp = throughput_phases(engine, 256, 100, 1024)
            tp["shape"] = shape
            result[f"throughput_{shape}"] = tp
            print_table([tp], list(tp))
        del engine, loaded
        torch.cuda.empty_cache()
    path = write_json("profile_gpu", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
