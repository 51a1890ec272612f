"""Interleaved step A/B: two engine configurations in one process, step by step.

Whole-run pairs (bench_engine) move by up to 40% on this project's VMs, whose speed drifts
between minutes. Here both engines get the same requests and their steps alternate (A, B,
then B, A, ...), so each ratio compares two steps a few milliseconds apart; the median of the
per-step ratios B/A (decode steps and prefill steps apart) is the figure. Prints a table and
writes benchmarks/results/bench_steps_ab.json.

    python benchmarks/bench_steps_ab.py --b weight_quant=auto
    python benchmarks/bench_steps_ab.py --a attention_backend=sdpa --b attention_backend=cpu

    python benchmarks/bench_steps_ab.py --b-kernels /tmp/csrc-variant

--b-kernels: a folder holding the files of src/inferhub/layers/csrc/ (some of them changed);
it is compiled like the committed kernels and B's steps run on that build (A's on the
committed one), which measures a change to the C kernels the same way.
--a / --b set EngineConfig fields (repeatable, key=value); both start from the same base:
the embedded default model in bfloat16, --requests sequences of --input-len random prompt
tokens, --output-len tokens each, greedy, ignore EOS. The outputs of both are compared too
(same tokens or not), which says whether B changes results.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import random_prompts
from common import print_table, write_json
from inferhub.config import EngineConfig
from inferhub.engine.llm import LLM
from inferhub.engine.sampling_params import SamplingParams
from inferhub.layers import cpu_kernels
from inferhub.models.default import default_model_path


def overrides(pairs: list[str]) -> dict[str, Any]:
    """key=value strings as EngineConfig fields, each value parsed as its field's type."""
    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--a/--b take EngineConfig fields as key=value, not {pair!r}")
        default = fields[key].default
        value: Any = raw
        if isinstance(default, bool):
            value = raw.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            value = int(raw)
        elif isinstance(default, float):
            value = float(raw)
        elif raw.lower() == "none":
            value = None
        elif default is None:  # an optional number (int4_max_rows, num_threads, ...)
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    continue
        out[key] = value
    return out


def variant_kernels(folder: Path) -> ctypes.CDLL:
    """The C kernels of `folder` (csrc's file names), built with the committed kernels'
    compiler and flags, their functions typed as the committed ones are."""
    base = cpu_kernels.library()
    compiler = cpu_kernels._compiler()
    if base is None or compiler is None:
        raise SystemExit("--b-kernels needs the committed C kernels and a C compiler here")
    out = Path(tempfile.mkdtemp()) / "variant.so"
    sources = [str(folder / name) for name in cpu_kernels.SOURCES]
    subprocess.run([compiler, *cpu_kernels.FLAGS, "-o", str(out), *sources, "-lm"], check=True)
    lib = ctypes.CDLL(str(out))
    for path in sources:
        for name in re.findall(r"^(?:int|void) (inferhub_\w+)\(", Path(path).read_text(), re.M):
            theirs, ours = getattr(lib, name), getattr(base, name, None)
            if ours is not None:
                theirs.argtypes, theirs.restype = ours.argtypes, ours.restype
    if cpu_kernels.amx_available():
        lib.inferhub_amx_init()
    return lib


def kernels_for(lib: ctypes.CDLL) -> Callable[[], ctypes.CDLL]:
    return lambda: lib


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--a", action="append", default=[], help="EngineConfig field=value for A")
    ap.add_argument("--b", action="append", default=[], help="EngineConfig field=value for B")
    ap.add_argument("--b-kernels", type=Path, default=None, help="csrc variant folder for B")
    ap.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of fresh prompts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = args.model or str(default_model_path())
    base: dict[str, Any] = {
        "model": model,
        "dtype": "bfloat16",
        "max_num_seqs": args.requests,
        "kv_cache_memory": 2 << 30,
        "show_progress": False,
    }
    committed = cpu_kernels._lib
    kernels = {"A": committed, "B": committed}
    if args.b_kernels is not None:
        kernels["B"] = kernels_for(variant_kernels(args.b_kernels))
    engines: dict[str, LLM] = {}
    for name, pairs in (("A", args.a), ("B", args.b)):
        cpu_kernels._lib = kernels[name]  # type: ignore[assignment]
        llm = LLM(EngineConfig(**{**base, **overrides(pairs)}))
        warm = random_prompts(2, args.input_len, llm.engine.vocab_size, set(), args.seed + 99)
        llm.generate(warm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        engines[name] = llm
    vocab = engines["A"].engine.vocab_size
    special = set(engines["A"].tokenizer.hf.all_special_ids)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    ratios: dict[str, list[float]] = {"decode": [], "prefill": []}
    totals = {"A": 0.0, "B": 0.0}
    same = True
    for rep in range(args.repeats):
        # fresh prompts per round: no prefix-cache hits from the round before
        prompts = random_prompts(args.requests, args.input_len, vocab, special, args.seed + rep)
        outputs: dict[str, dict[str, list[int]]] = {"A": {}, "B": {}}
        for llm in engines.values():
            for i, p in enumerate(prompts):
                llm.engine.add_request(f"{rep}-{i}", p, params)
        step = 0
        while any(llm.engine.has_unfinished_requests() for llm in engines.values()):
            order = ["A", "B"] if step % 2 == 0 else ["B", "A"]
            took: dict[str, float] = {}
            kinds: set[str] = set()
            for name in order:
                engine = engines[name].engine
                if not engine.has_unfinished_requests():
                    continue
                decode_only = (
                    all(
                        s.num_computed_tokens >= len(s.prompt_token_ids)
                        for s in engine.scheduler.running
                    )
                    and not engine.scheduler.waiting
                )
                kinds.add("decode" if decode_only else "prefill")
                cpu_kernels._lib = kernels[name]  # type: ignore[assignment]
                t0 = time.perf_counter()
                for out in engine.step():
                    for choice in out.outputs:
                        got = outputs[name].setdefault(out.request_id, [])
                        got.extend(choice.token_ids_delta)
                took[name] = time.perf_counter() - t0
            if len(took) == 2 and len(kinds) == 1:
                ratios[kinds.pop()].append(took["B"] / took["A"])
                totals["A"] += took["A"]
                totals["B"] += took["B"]
            step += 1
        same = same and outputs["A"] == outputs["B"]
    rows: list[dict[str, Any]] = []
    for kind, values in ratios.items():
        q1, median, q3 = quartiles(values)
        rows.append({"steps": kind, "paired": len(values), "B/A median": median,
                     "B/A q1": q1, "B/A q3": q3})  # fmt: skip
    rows.append(
        {"steps": "all (summed)", "paired": sum(len(v) for v in ratios.values()),
         "B/A median": totals["B"] / totals["A"] if totals["A"] else float("nan")}
    )  # fmt: skip
    cpu_kernels._lib = committed  # type: ignore[assignment]
    b_what = f"{args.b or 'defaults'}" + (f" on {args.b_kernels}" if args.b_kernels else "")
    print(f"A: {args.a or 'defaults'}  B: {b_what}  same tokens: {same}")
    print_table(rows, ["steps", "paired", "B/A median", "B/A q1", "B/A q3"])
    given = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = write_json(
        "bench_steps_ab", {"args": given, "model": model, "same_tokens": same, "rows": rows}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
