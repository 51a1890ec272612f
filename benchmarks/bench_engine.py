"""Offline throughput and single-stream decode: inferhub's engine against `transformers`.

Same model file (the embedded default GGUF unless --model), same dtype, same workloads,
in one process: both engines are loaded once, then measured in --repeats pairs whose order
alternates, and the median of the pairs' ratios is the figure (the machines here drift by
1.5x between minutes). Prints a table and writes benchmarks/results/bench_engine.json.

    python benchmarks/bench_engine.py [--requests 64 --input-len 128 --output-len 128]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import add_dtype_arg, cpu_dtype, print_table, write_json
from inferhub.config import EngineConfig
from inferhub.engine.llm import LLM
from inferhub.engine.sampling_params import SamplingParams
from inferhub.models.default import default_model_path


def random_prompts(
    n: int, length: int, vocab: int, special: set[int], seed: int
) -> list[list[int]]:
    rng = random.Random(seed)
    ok = [t for t in range(min(vocab, 40000)) if t not in special]
    return [[rng.choice(ok) for _ in range(length)] for _ in range(n)]


# One timed run on the given prompts. Each repeat brings prompts of its own: the engine's
# prefix cache keeps the blocks of prompts it has seen, so a repeat of the same prompts would
# skip their prefill.
Measure = Callable[[list[list[int]]], dict[str, float]]


def inferhub_runner(
    model: str, dtype: str, warm: list[list[int]], out_len: int, single_len: int, args: Any
) -> Measure:
    """Load the engine once; each call of the result times one offline run and one stream."""
    llm = LLM(
        EngineConfig(
            model=model,
            dtype=dtype,
            max_num_seqs=max(args.requests, 1),
            max_num_batched_tokens=args.batched_tokens,
            kv_cache_memory=2 << 30,
            show_progress=False,
        )
    )
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    single = SamplingParams(temperature=0.0, max_tokens=single_len, ignore_eos=True)
    llm.generate(warm[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    llm.generate([warm[0][:16]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))

    def measure(prompts: list[list[int]]) -> dict[str, float]:
        t0 = time.perf_counter()
        results = llm.generate(prompts, params)
        elapsed = time.perf_counter() - t0
        generated = sum(len(r[0].token_ids) for r in results)
        # single stream: one short prompt, many output tokens
        t0 = time.perf_counter()
        r = llm.generate([prompts[0][:16]], single)
        single_s = time.perf_counter() - t0
        return {
            "throughput_tok_s": generated / elapsed,
            "offline_elapsed_s": elapsed,
            "single_stream_tok_s": len(r[0][0].token_ids) / single_s,
        }

    return measure


def transformers_runner(
    model: str,
    dtype: torch.dtype,
    warm: list[list[int]],
    out_len: int,
    single_len: int,
    batch: int,
) -> Measure:
    from transformers import AutoModelForCausalLM

    path = Path(model)
    if path.suffix == ".gguf":
        hf = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    hf = hf.to(dtype).eval()

    def run(batch_prompts: list[list[int]], n_new: int) -> int:
        ids = torch.tensor(batch_prompts)
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                pad_token_id=0,
            )
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    run(warm[:2], 4)  # warm-up
    run([warm[0][:16]], 8)

    def measure(prompts: list[list[int]]) -> dict[str, float]:
        t0 = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), batch):
            generated += run(prompts[i : i + batch], out_len)
        elapsed = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = run([prompts[0][:16]], single_len)
        single_s = time.perf_counter() - t0
        return {
            "throughput_tok_s": generated / elapsed,
            "offline_elapsed_s": elapsed,
            "single_stream_tok_s": n / single_s,
        }

    return measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded)")
    add_dtype_arg(ap, "both engines")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--single-len", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=64, help="transformers' static batch size")
    ap.add_argument("--batched-tokens", type=int, default=2048)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="paired runs, order alternating")
    args = ap.parse_args()
    args.dtype = cpu_dtype(args.dtype)
    model = args.model or default_model_path()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    llm_probe = LLM(
        EngineConfig(model=model, dtype="float32", kv_cache_memory=1 << 24, show_progress=False)
    )
    vocab = llm_probe.engine.vocab_size
    special = set(llm_probe.tokenizer.hf.all_special_ids)
    del llm_probe
    warm = random_prompts(2, args.input_len, vocab, special, args.seed + 1_000_000)
    ours = inferhub_runner(model, args.dtype, warm, args.output_len, args.single_len, args)
    theirs: Measure | None = None
    if not args.skip_transformers:
        tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
        theirs = transformers_runner(
            model, tdtype, warm, args.output_len, args.single_len, args.hf_batch
        )
    # Paired repeats, the order alternating (this VM's speed drifts between minutes): each
    # pair gives a ratio, and the median ratio is the figure to quote.
    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, float]] = []
    for rep in range(args.repeats):
        # fresh prompts per pair (no prefix-cache hits), the same for both engines
        prompts = random_prompts(args.requests, args.input_len, vocab, special, args.seed + rep)
        order = [("inferhub", ours), ("transformers", theirs)]
        if rep % 2:
            order.reverse()
        got: dict[str, dict[str, float]] = {}
        for name, measure in order:
            if measure is not None:
                got[name] = measure(prompts)
                rows.append({"engine": f"{name} #{rep + 1}", **got[name]})
        if "transformers" in got:
            a, b = got["inferhub"], got["transformers"]
            ratio = {
                "throughput_tok_s": a["throughput_tok_s"] / b["throughput_tok_s"],
                "single_stream_tok_s": a["single_stream_tok_s"] / b["single_stream_tok_s"],
            }
            ratios.append(ratio)
            rows.append({"engine": f"ratio #{rep + 1}", **ratio})
    if ratios:
        rows.append(
            {
                "engine": "median ratio inferhub/transformers",
                **{k: statistics.median(r[k] for r in ratios) for k in ratios[0]},
            }
        )
    print(
        f"model={Path(model).name} dtype={args.dtype} requests={args.requests} "
        f"in={args.input_len} out={args.output_len} threads={torch.get_num_threads()}"
    )
    print_table(rows, ["engine", "throughput_tok_s", "single_stream_tok_s", "offline_elapsed_s"])
    path = write_json("bench_engine", {"args": vars(args), "model": model, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
