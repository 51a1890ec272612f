"""Dense bfloat16 weights against the CPU's low-bit kernels, decode tokens/s by batch size.

Same model file (the embedded default GGUF unless --model), the same engine, in one run:
`--weight-quant none` (dense bf16 everywhere) against `auto` (the file's Q4 blocks on the 4-bit
kernel and 8-bit logits for small batches) with the switch disabled (every call on the low-bit
kernels) and at its default. The ratios tell where the switch (`int4_max_rows`) should sit.
Prints a table and writes benchmarks/results/bench_weights.json.

    python benchmarks/bench_weights.py [--batches 1,2,4,8,12,16,32] [--output-len 48]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_json
from inferhub.config import EngineConfig
from inferhub.engine.llm import LLM
from inferhub.engine.sampling_params import SamplingParams
from inferhub.layers.quant_linear import DEFAULT_MAX_ROWS, TILES_MAX_ROWS
from inferhub.models.default import default_model_path

MODES: dict[str, dict[str, Any]] = {
    "dense": {"weight_quant": "none"},
    "low-bit always": {"weight_quant": "auto", "int4_max_rows": 1 << 30},
    "default": {"weight_quant": "auto"},
}


def decode_tok_s(llm: LLM, batch: int, prompt_len: int, out_len: int, seed: int) -> float:
    """Output tokens/s of `batch` requests decoding together (prefill excluded by difference)."""
    rng = random.Random(seed)

    def run(n: int) -> float:
        prompts = [[rng.randrange(1000, 40000) for _ in range(prompt_len)] for _ in range(batch)]
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        return time.perf_counter() - t0

    run(4)  # warm-up
    short, full = run(1), run(out_len + 1)
    return batch * out_len / max(full - short, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    ap.add_argument("--batches", default="1,2,4,8,12,16,32")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = args.model or default_model_path()
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, dict[int, float]] = {}
    for name, overrides in MODES.items():
        cfg: dict[str, Any] = {
            "model": model,
            "dtype": "bfloat16",
            "max_num_seqs": max(batches),
            "kv_cache_memory": 1 << 30,
            "show_progress": False,
            **overrides,
        }
        llm = LLM(EngineConfig(**cfg))
        results[name] = {
            b: decode_tok_s(llm, b, args.prompt_len, args.output_len, args.seed) for b in batches
        }
        del llm
    rows = []
    for b in batches:
        dense = results["dense"][b]
        rows.append(
            {
                "batch": b,
                "dense tok/s": dense,
                "low-bit tok/s": results["low-bit always"][b],
                "low-bit / dense": results["low-bit always"][b] / dense,
                "default switch tok/s": results["default"][b],
                "default / dense": results["default"][b] / dense,
            }
        )
    print(f"model={Path(model).name} dtype=bfloat16 decode tokens/s (prefill excluded)")
    print_table(rows, list(rows[0]))
    path = write_json(
        "bench_weights",
        {
            "model": Path(model).name,
            "default_max_rows": {"dense": DEFAULT_MAX_ROWS, "4-bit tiles": TILES_MAX_ROWS},
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
