"""Serving benchmark in the style of `vllm bench serve`: N streaming requests at a fixed
concurrency against a running OpenAI-compatible server (or one this script launches), with
request and token throughput and TTFT / TPOT / ITL / end-to-end latency (mean, median, p99).
Prints a table and writes JSON.

With `--offline`, the same workload (same prompts, output lengths and batch size) then runs
through the engine in this process (`LLM.generate`), and the table adds the ratio of serving
to offline output throughput: the cost of the HTTP layer.

    python benchmarks/bench_serving.py --launch --offline --num-prompts 64 --concurrency 16
    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000 --model NAME --api-key sk-...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# Ordinary (non-special) token ids in every vocabulary we serve.
TOKEN_ID_RANGE = (1000, 10000)


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds to the first generated text
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between text chunks
    error: str = ""


def make_prompts(n: int, input_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(*TOKEN_ID_RANGE) for _ in range(input_len)] for _ in range(n)]


async def one_request(
    client: httpx.AsyncClient, args: argparse.Namespace, prompt: list[int] | str
) -> RequestResult:
    body = {
        "model": args.model, "prompt": prompt, "max_tokens": args.output_len,
        "temperature": args.temperature, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
        **(getattr(args, "extra_body", None) or {}),
    }  # fmt: skip
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    # Servers that send no usage chunk (llama_cpp.server): count the text chunks, one per token,
    # or max_tokens when the request finished on its length.
    chunks = 0
    finish = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0].get("finish_reason"):
                    finish = chunk["choices"][0]["finish_reason"]
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    chunks += 1
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        if not result.output_tokens:
            result.output_tokens = args.output_len if finish == "length" else chunks
        result.ok = result.output_tokens > 0
    except httpx.HTTPError as exc:
        result.error = repr(exc)
    return result


async def run_serving(
    args: argparse.Namespace, prompts: list[list[int]] | list[str]
) -> tuple[list[RequestResult], float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, timeout=None, limits=limits
    ) as client:
        warm = await one_request(client, args, prompts[0][:16])  # 16 tokens or characters
        if not warm.ok:
            raise SystemExit(f"warm-up request failed: {warm.error}")
        gate = asyncio.Semaphore(args.concurrency)

        async def limited(prompt: list[int] | str) -> RequestResult:
            async with gate:
                return await one_request(client, args, prompt)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        return list(results), time.perf_counter() - start


def run_offline(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, float]:
    from inferhub.config import EngineConfig
    from inferhub.engine.llm import LLM
    from inferhub.engine.sampling_params import SamplingParams

    llm = LLM(
        EngineConfig(
            model=args.model_path, name=args.model, show_progress=False, **engine_kwargs(args)
        )
    )
    params = SamplingParams(
        max_tokens=args.output_len, temperature=args.temperature, ignore_eos=True
    )
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    duration = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for choices in outputs for c in choices)
    return {"duration_s": duration, "output_tokens": tokens, "output_throughput": tokens / duration}


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings both runs share: batch size = concurrency, same KV cache."""
    return {
        "max_num_seqs": args.max_num_seqs or args.concurrency,
        "kv_cache_memory": args.kv_cache_memory_bytes,
    }


def launch_server(args: argparse.Namespace, in_thread: bool = False) -> subprocess.Popen[str]:
    kw = engine_kwargs(args)
    cmd = [
        sys.executable, "-m", "inferhub.cli", "serve", "--port", "0", "--log-level", "warning",
        "--no-auth", "--model", f"{args.model}={args.model_path}",
        "--max-num-seqs", str(kw["max_num_seqs"]),
        *(["--kv-cache-memory", str(kw["kv_cache_memory"])] if kw["kv_cache_memory"] else []),
        *(["--engine-in-thread"] if in_thread else []),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.search(r"at (http://\S+)/v1", line):
            args.base_url = m.group(1)
            return proc
    raise SystemExit("the server did not start")


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]

    def stats(values: list[float]) -> dict[str, float]:
        if not values:
            return {"mean_ms": 0.0, "median_ms": 0.0, "p99_ms": 0.0}
        ordered = sorted(values)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        return {
            "mean_ms": 1000 * statistics.fmean(values),
            "median_ms": 1000 * statistics.median(values),
            "p99_ms": 1000 * p99,
        }

    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft": stats([r.ttft for r in ok]),
        "tpot": stats(tpot),
        "itl": stats([x for r in ok for x in r.itl]),
        "e2e_latency": stats([r.latency for r in ok]),
    }


def print_table(report: dict[str, Any]) -> None:
    s = report["serving"]
    rows: list[tuple[str, Any]] = [
        ("Successful requests", s["completed"]),
        ("Failed requests", s["failed"]),
        ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
        ("Total input tokens", s["total_input_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
    ]
    for key, title in (
        ("ttft", "TTFT"),
        ("tpot", "TPOT"),
        ("itl", "ITL"),
        ("e2e_latency", "E2E latency"),
    ):
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {title} (ms)", f"{s[key][stat + '_ms']:.2f}"))
    if "offline" in report:
        o = report["offline"]
        rows.append(("Offline output throughput (tok/s)", f"{o['output_throughput']:.2f}"))
        rows.append(("Serving / offline throughput", f"{report['serving_vs_offline']:.3f}"))
    for mode, summary in report.get("serving_by_engine_mode", {}).items():
        rows.append((f"Output tok/s, engine in {mode}", f"{summary['output_throughput']:.2f}"))
    for mode, ratio in report.get("serving_vs_offline_by_engine_mode", {}).items():
        rows.append((f"Serving / offline, engine in {mode}", f"{ratio:.3f}"))
    width = max(len(k) for k, _ in rows) + 2
    print("=" * (width + 14))
    print(" Serving Benchmark Result ".center(width + 14, "="))
    for k, v in rows:
        print(f"{k:<{width}}{v!s:>14}")
    print("=" * (width + 14))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("INFERHUB_API_KEY"))
    p.add_argument("--model", default=None, help="served model name (default: the embedded model)")
    p.add_argument("--model-path", default=None, help="for --launch/--offline (default: embedded)")
    p.add_argument("--launch", action="store_true", help="start `inferhub serve` for the run")
    p.add_argument(
        "--engine-modes",
        default="process",
        help="with --launch: comma-separated engine placements to serve with, one server "
        "each: process (the default of `serve`) and/or thread (--engine-in-thread)",
    )
    p.add_argument(
        "--offline", action="store_true", help="also run the workload offline, in process"
    )
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-num-seqs", type=int, help="engine batch size (default: --concurrency)")
    p.add_argument("--kv-cache-memory", default=None, help="e.g. 1G (--launch/--offline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--extra-body",
        type=json.loads,
        default=None,
        help='JSON merged into every request, e.g. \'{"logit_bias": {"2": -100}}\'',
    )
    p.add_argument("--output", type=Path, help="JSON path (default: benchmarks/results/...)")
    args = p.parse_args()
    if args.model is None or args.model_path is None:
        from inferhub.models.default import DEFAULT_MODEL_NAME, default_model_path

        args.model = args.model or DEFAULT_MODEL_NAME
        args.model_path = args.model_path or default_model_path()
    from inferhub.cli import _size

    args.kv_cache_memory_bytes = _size(args.kv_cache_memory) if args.kv_cache_memory else None

    prompts = make_prompts(args.num_prompts, args.input_len, args.seed)
    modes = args.engine_modes.split(",") if args.launch else ["external"]
    served: dict[str, dict[str, Any]] = {}
    for mode in modes:
        server = launch_server(args, in_thread=mode == "thread") if args.launch else None
        try:
            results, duration = asyncio.run(run_serving(args, prompts))
        finally:
            if server is not None:
                server.terminate()
                server.wait(60)
                assert server.stdout is not None
                server.stdout.close()
        served[mode] = summarize(results, duration)
    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("api_key", "output")},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "serving": served[modes[0]],
    }
    if len(modes) > 1:
        report["serving_by_engine_mode"] = served
    if args.offline:
        report["offline"] = run_offline(args, prompts)
        offline = report["offline"]["output_throughput"]
        report["serving_vs_offline"] = report["serving"]["output_throughput"] / offline
        if len(modes) > 1:
            report["serving_vs_offline_by_engine_mode"] = {
                mode: summary["output_throughput"] / offline for mode, summary in served.items()
            }
    print_table(report)
    out = (
        args.output
        or Path(__file__).parent
        / "results"
        / f"bench_serving-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
