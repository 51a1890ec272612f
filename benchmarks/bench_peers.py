"""inferhub against its CPU peers, in one run on one machine, on one GGUF file.

Peers: `transformers` (`generate` on static batches, bf16, the GGUF dequantized by transformers'
gguf_file support) and llama.cpp through `llama-cpp-python` built from source (its high-level
`Llama` API for the single stream and the prefill; its low-level batch API, `llama_batch_init` /
`llama_decode` with many sequences and a greedy continuous-batching loop written here, for
offline throughput; `python -m llama_cpp.server` for serving).

Workloads (random token ids, fixed seed, greedy, EOS ignored):
  single   one request, 16-token prompt: decode tok/s = N / (T(N+1 tokens) - T(1 token))
  prefill  one request, 512-token prompt: prompt tok/s = 512 / T(1 token)
  fixed    offline, 64 requests of 128 in / 128 out: output tok/s
  random   offline, 256 requests, input and output lengths uniform in [16, 512]: output tok/s
  served   `inferhub serve` and `llama_cpp.server` driven by bench_serving.py at concurrency
           1, 8, 16, 32 (128 in / 128 out): output tok/s, TTFT, TPOT

Single and prefill take the best of --reps runs (distinct prompts, so no prefix cache helps).
Every engine runs in its own process, one after the other, with the same thread count. The peers
live in the benchmark venv (`make bench-env`), never in inferhub's dependencies:

    make bench-env
    .bench-venv/bin/python benchmarks/bench_peers.py --quick          # a check, about 3 min
    .bench-venv/bin/python benchmarks/bench_peers.py --note "idle"     # the full run

Writes docs/results/bench_peers.json and docs/benchmarks_peers.png (with --quick:
benchmarks/results/bench_peers_quick.{json,png}).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

ENGINES = ("inferhub", "transformers", "llama.cpp")
TOKEN_RANGE = (1000, 40000)  # ordinary tokens of the SmolLM2 / Qwen2 vocabularies


# -- workloads ---------------------------------------------------------------------------------
def make_workloads(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(*TOKEN_RANGE) for _ in range(n)]

    q = args.quick
    single_len = 32 if q else 128
    prefill_len = 128 if q else 512
    fixed_n, fixed_in, fixed_out = (8, 64, 32) if q else (64, 128, 128)
    rand_n, rand_lo, rand_hi = (16, 16, 96) if q else (256, 16, 512)
    rand_in = [rng.randint(rand_lo, rand_hi) for _ in range(rand_n)]
    rand_out = [rng.randint(rand_lo, rand_hi) for _ in range(rand_n)]
    reps = args.reps
    return {
        "single": {
            "prompts": [prompt(16) for _ in range(2 * reps + 1)],
            "output_len": single_len,
        },
        "prefill": {"prompts": [prompt(prefill_len) for _ in range(reps + 1)]},
        "fixed": {
            "prompts": [prompt(fixed_in) for _ in range(fixed_n)],
            "output_lens": [fixed_out] * fixed_n,
        },
        "random": {
            "prompts": [prompt(n) for n in rand_in],
            "output_lens": rand_out,
            "range": [rand_lo, rand_hi],
        },
    }


def offline_tokens(w: dict[str, Any]) -> int:
    return int(sum(w["output_lens"]))


# -- inferhub ----------------------------------------------------------------------------------
def worker_inferhub(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from inferhub.config import EngineConfig
    from inferhub.engine.llm import LLM
    from inferhub.engine.sampling_params import SamplingParams

    threads = spec["threads"]
    torch.set_num_threads(threads)
    w = spec["workloads"]
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__}

    def engine(max_seqs: int) -> LLM:
        return LLM(
            EngineConfig(
                model=spec["model"],
                dtype=spec["dtype"],
                max_num_seqs=max_seqs,
                weight_quant="auto",
                max_num_batched_tokens=spec["inferhub_batched_tokens"],
                kv_cache_memory=spec["kv_cache_gib"] << 30,
                num_threads=threads,
                show_progress=False,
            )
        )

    def timed(llm: LLM, prompts: list[list[int]], lens: list[int]) -> tuple[float, int]:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lens]
        t0 = time.perf_counter()
        res = llm.generate(prompts, params)
        dt = time.perf_counter() - t0
        return dt, sum(len(r[0].token_ids) for r in res)

    llm = engine(spec["inferhub_max_seqs"])
    timed(llm, [w["single"]["prompts"][-1]], [4])  # warm-up
    out.update(single_and_prefill(lambda p, n: timed(llm, [p], [n])[0], w))
    for name in spec["offline"]:
        dt, n = timed(llm, w[name]["prompts"], w[name]["output_lens"])
        out[name] = {"tok_s": n / dt, "seconds": dt, "output_tokens": n}
        log(f"inferhub {name}: {n / dt:.1f} tok/s ({dt:.1f} s)")
    return out


def single_and_prefill(gen: Any, w: dict[str, Any]) -> dict[str, Any]:
    """gen(prompt, n_new) -> seconds. Best of the repetitions, each on fresh prompts."""
    sp = w["single"]["prompts"]
    n = w["single"]["output_len"]
    decode = []
    for i in range(0, len(sp) - 1, 2):
        t1 = gen(sp[i], 1)
        tn = gen(sp[i + 1], n + 1)
        decode.append(n / max(tn - t1, 1e-9))
    prefill = []
    pp = w["prefill"]["prompts"]
    gen(pp[-1], 1)  # warm-up at this length
    for p in pp[:-1]:
        prefill.append(len(p) / gen(p, 1))
    log(f"single {max(decode):.1f} tok/s, prefill {max(prefill):.1f} tok/s")
    return {
        "single": {"tok_s": max(decode), "samples": decode, "output_len": n},
        "prefill": {"tok_s": max(prefill), "samples": prefill, "prompt_len": len(pp[0])},
    }


# -- transformers ------------------------------------------------------------------------------
def worker_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    transformers.utils.logging.disable_progress_bar()
    path = Path(spec["model"])
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    hf = hf.to({"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]).eval()
    w = spec["workloads"]
    out: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "batch": spec["hf_batch"],
    }

    def run(prompts: list[list[int]], n_new: int) -> float:
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n_new,
                min_new_tokens=n_new,  # = ignore EOS
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - t0

    run([w["single"]["prompts"][-1]], 4)  # warm-up
    out.update(single_and_prefill(lambda p, n: run([p], n), w))
    for name in spec["offline"]:
        prompts, lens = w[name]["prompts"], w[name]["output_lens"]
        # Static batches of requests sorted by output length; a batch runs to its longest
        # output and only the requested tokens count.
        order = sorted(range(len(prompts)), key=lambda i: lens[i])
        dt = 0.0
        for k in range(0, len(order), spec["hf_batch"]):
            chunk = order[k : k + spec["hf_batch"]]
            dt += run([prompts[i] for i in chunk], max(lens[i] for i in chunk))
        n = sum(lens)
        out[name] = {"tok_s": n / dt, "seconds": dt, "output_tokens": n}
        log(f"transformers {name}: {n / dt:.1f} tok/s ({dt:.1f} s)")
    return out


# -- llama.cpp ---------------------------------------------------------------------------------
class LlamaBatched:
    """Greedy continuous batching over llama.cpp's low-level batch API (as examples/parallel):
    up to n_parallel sequences, one KV stream each; every llama_decode carries one token per
    decoding sequence plus prompt chunks of newly admitted ones, up to n_batch tokens."""

    def __init__(self, model: Any, threads: int, n_parallel: int, ctx_per_seq: int, args: Any):
        import llama_cpp as L

        self.L = L
        self.n_parallel = n_parallel
        self.n_batch = max(args["llama_n_batch"], n_parallel)
        cp = L.llama_context_default_params()
        cp.n_ctx = n_parallel * ctx_per_seq
        cp.n_batch = self.n_batch
        cp.n_ubatch = min(self.n_batch, args["llama_n_ubatch"])
        cp.n_seq_max = n_parallel
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.kv_unified = args["llama_kv_unified"]
        self.ctx = L.llama_init_from_model(model, cp)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        import numpy as np

        self.np = np
        cap = self.n_batch
        self.tok = np.ctypeslib.as_array(self.batch.token, shape=(cap,))
        self.pos = np.ctypeslib.as_array(self.batch.pos, shape=(cap,))
        self.nseq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(cap,))
        self.logit = np.ctypeslib.as_array(self.batch.logits, shape=(cap,))
        self.seq = [self.batch.seq_id[i] for i in range(cap)]

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)

    def generate(self, prompts: list[list[int]], lens: list[int]) -> int:
        L, np = self.L, self.np
        L.llama_memory_clear(self.mem, True)
        queue = deque(range(len(prompts)))
        free = list(range(self.n_parallel))[::-1]
        active: dict[int, dict[str, Any]] = {}  # seq id -> state
        produced = 0
        while queue or active:
            while queue and free:
                r = queue.popleft()
                active[free.pop()] = {"r": r, "done": 0, "pos": 0, "out": 0, "last": -1}
            n = 0
            rows: list[int] = []
            for s, st in active.items():  # one token per decoding sequence
                if st["last"] >= 0:
                    self.tok[n], self.pos[n], self.logit[n] = st["last"], st["pos"], 1
                    self.seq[n][0] = s
                    st["pos"] += 1
                    n += 1
                    rows.append(s)
            for s, st in active.items():  # prompt chunks
                p = prompts[st["r"]]
                if st["done"] >= len(p) or n >= self.n_batch:
                    continue
                k = min(len(p) - st["done"], self.n_batch - n)
                a = st["done"]
                self.tok[n : n + k] = p[a : a + k]
                self.pos[n : n + k] = np.arange(a, a + k)
                self.logit[n : n + k] = 0
                for i in range(n, n + k):
                    self.seq[i][0] = s
                st["done"] += k
                st["pos"] = st["done"]
                n += k
                if st["done"] == len(p):
                    self.logit[n - 1] = 1
                    rows.append(s)
            self.nseq[:n] = 1
            self.batch.n_tokens = n
            rc = L.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            logits = np.ctypeslib.as_array(
                L.llama_get_logits(self.ctx), shape=(len(rows), self.n_vocab)
            )
            for s, t in zip(rows, logits.argmax(axis=1).tolist(), strict=True):
                st = active[s]
                st["last"] = t
                st["out"] += 1
                produced += 1
                if st["out"] >= lens[st["r"]]:
                    L.llama_memory_seq_rm(self.mem, s, -1, -1)
                    del active[s]
                    free.append(s)
        return produced


def worker_llama(spec: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp as L
    from llama_cpp import Llama

    threads = spec["threads"]
    w = spec["workloads"]
    out: dict[str, Any] = {
        "threads": threads,
        "llama_cpp_python": L.__version__,
        "system_info": L.llama_print_system_info().decode(),
    }
    llm = Llama(
        model_path=spec["model"],
        n_ctx=2048,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def gen(prompt: list[int], n_new: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        # generate() yields tokens forever: no EOS check
        for k, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), 1):
            if k >= n_new:
                break
        return time.perf_counter() - t0

    gen(w["single"]["prompts"][-1], 4)  # warm-up
    out.update(single_and_prefill(gen, w))
    model = llm.model  # the loaded llama_model pointer, shared by the batched contexts
    for name in spec["offline"]:
        prompts, lens = w[name]["prompts"], w[name]["output_lens"]
        ctx_per_seq = max(len(p) + n for p, n in zip(prompts, lens, strict=True)) + 16
        configs = spec["llama_parallel"] if name == "fixed" else [out["fixed"]["best_parallel"]]
        runs = []
        for par in configs:
            par = min(par, len(prompts))
            b = LlamaBatched(model, threads, par, ctx_per_seq, spec)
            b.generate([prompts[0][:8]], [4])  # warm-up
            t0 = time.perf_counter()
            n = b.generate(prompts, lens)
            dt = time.perf_counter() - t0
            b.close()
            runs.append({"n_parallel": par, "tok_s": n / dt, "seconds": dt, "output_tokens": n})
            log(f"llama.cpp {name} n_parallel={par}: {n / dt:.1f} tok/s ({dt:.1f} s)")
        best = max(runs, key=lambda r: r["tok_s"])
        out[name] = {**best, "best_parallel": best["n_parallel"], "runs": runs}
    return out


WORKERS = {
    "inferhub": worker_inferhub,
    "transformers": worker_transformers,
    "llama.cpp": worker_llama,
}


# -- serving -----------------------------------------------------------------------------------
def text_prompts(model: str, n: int, length: int, seed: int) -> list[str]:
    """Text that re-tokenizes to `length` tokens (llama_cpp.server takes no token-id prompts)."""
    from inferhub.models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(model)
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        text = tok.decode([rng.randrange(1000, 10000) for _ in range(length + 8)])
        for _ in range(6):
            ids = tok.encode(text)[:length]
            text = tok.decode(ids)
        if len(tok.encode(text)) == length:
            out.append(text)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer")


def start_server(kind: str, args: argparse.Namespace, log_path: Path) -> tuple[Any, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    if kind == "inferhub":
        cmd = [
            sys.executable, "-m", "inferhub.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--no-auth", "--log-level", "warning",
            "--model", f"{args.served_name}={args.model}", "--dtype", args.dtype,
            "--threads", str(args.threads), "--max-num-seqs", str(max(args.concurrency)),
            "--kv-cache-memory", f"{args.kv_cache_gib}G", "--data-dir", tempfile.mkdtemp(),
            "--weight-quant", "auto",
        ]  # fmt: skip
    else:
        cmd = [
            sys.executable, "-m", "llama_cpp.server", "--model", args.model,
            "--model_alias", args.served_name, "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
            "--n_ctx", "2048", "--n_batch", "512",
            # queue concurrent requests instead of aborting the running stream (the default)
            "--interrupt_requests", "False",
        ]  # fmt: skip
    logf = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/v1/models", proc)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"{kind} server failed; see {log_path}") from None
    proc.logf = logf  # type: ignore[attr-defined]
    return proc, base


def stop_server(proc: Any) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.logf.close()


def bench_served(args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    import bench_serving
    from inferhub.models.tokenizer import Tokenizer

    special = sorted(Tokenizer.from_gguf(args.model).hf.all_special_ids)
    q = args.quick
    out_len = 16 if q else 128
    in_len = 32 if q else 128
    prompts = text_prompts(args.model, max(n_prompts(c, q) for c in args.concurrency), in_len, 1)
    result: dict[str, Any] = {"input_len": in_len, "output_len": out_len}
    for kind in ("inferhub", "llama_cpp.server"):
        proc, base = start_server(kind, args, logdir / f"{kind}.log")
        rows = {}
        try:
            for c in args.concurrency:
                ns = argparse.Namespace(
                    base_url=base,
                    api_key=None,
                    model=args.served_name,
                    output_len=out_len,
                    temperature=0.0,
                    concurrency=c,
                    # llama_cpp.server has no ignore_eos: forbid the special tokens instead
                    extra_body={"logit_bias": {str(t): -100.0 for t in special}}
                    if kind != "inferhub"
                    else None,
                )
                res, dur = asyncio.run(bench_serving.run_serving(ns, prompts[: n_prompts(c, q)]))
                s = bench_serving.summarize(res, dur)
                rows[str(c)] = s
                log(
                    f"served {kind} c={c}: {s['output_throughput']:.1f} tok/s, "
                    f"TTFT {s['ttft']['median_ms']:.0f} ms, TPOT {s['tpot']['median_ms']:.1f} ms, "
                    f"failed {s['failed']} {s['errors']}"
                )
        finally:
            stop_server(proc)
        result[kind] = rows
    return result


def n_prompts(c: int, quick: bool) -> int:
    return max(4, c) if quick else max(8, 2 * c)


# -- report ------------------------------------------------------------------------------------
TARGETS = [
    # (label, ours, theirs, target ratio)
    ("offline fixed vs llama.cpp best batched", "fixed", "llama.cpp", 1.5),
    ("offline random vs llama.cpp best batched", "random", "llama.cpp", 1.5),
    ("offline fixed vs transformers", "fixed", "transformers", 3.0),
    ("offline random vs transformers", "random", "transformers", 3.0),
    ("prefill vs llama.cpp", "prefill", "llama.cpp", 3.0),
    ("single stream vs llama.cpp", "single", "llama.cpp", 1.0),
]


def ratios(report: dict[str, Any]) -> list[dict[str, Any]]:
    e = report["engines"]
    out = []
    for label, wl, peer, target in TARGETS:
        if "inferhub" in e and peer in e and wl in e["inferhub"] and wl in e[peer]:
            r = e["inferhub"][wl]["tok_s"] / e[peer][wl]["tok_s"]
            out.append({"target": label, "ratio": r, "goal": target, "met": r >= target})
    s = report.get("served")
    if s and "inferhub" in s and "llama_cpp.server" in s:
        for c, goal in (("1", 1.0), ("8", None), ("16", 3.0), ("32", 3.0)):
            if c in s["inferhub"] and c in s["llama_cpp.server"]:
                r = (
                    s["inferhub"][c]["output_throughput"]
                    / s["llama_cpp.server"][c]["output_throughput"]
                )
                row: dict[str, Any] = {"target": f"served c={c} vs llama_cpp.server", "ratio": r}
                if goal is not None:
                    row.update(goal=goal, met=r >= goal)
                out.append(row)
    return out


def print_report(report: dict[str, Any]) -> None:
    from common import print_table

    e = report["engines"]
    rows = []
    for name, res in e.items():
        row: dict[str, Any] = {"engine": name + (f" ({res['error']})" if "error" in res else "")}
        for wl, col in (
            ("single", "single tok/s"),
            ("prefill", "prefill tok/s"),
            ("fixed", "offline 64x128/128 tok/s"),
            ("random", "offline 256 random tok/s"),
        ):
            if wl in res:
                row[col] = res[wl]["tok_s"]
        if "fixed" in res and "best_parallel" in res["fixed"]:
            row["engine"] = f"{name} (batched n_parallel={res['fixed']['best_parallel']})"
        rows.append(row)
    cols = ["engine", "single tok/s", "prefill tok/s"]
    cols += ["offline 64x128/128 tok/s", "offline 256 random tok/s"]
    print_table(rows, cols)
    s = report.get("served")
    if s:
        print()
        srows = []
        for kind in ("inferhub", "llama_cpp.server"):
            for c, r in s.get(kind, {}).items():
                srows.append(
                    {
                        "server": kind,
                        "concurrency": c,
                        "output tok/s": r["output_throughput"],
                        "median TTFT ms": r["ttft"]["median_ms"],
                        "median TPOT ms": r["tpot"]["median_ms"],
                        "failed": r["failed"],
                    }
                )
        print_table(srows, list(srows[0]))
    print()
    rrows = [
        {**r, "goal": f">= {r['goal']}x" if "goal" in r else "", "met": r.get("met", "")}
        for r in report["ratios"]
    ]
    print_table(rrows, ["target", "ratio", "goal", "met"])


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["served"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for kind, style in (("inferhub", "o-"), ("llama_cpp.server", "s--")):
        cs = sorted(s[kind], key=int)
        ax.plot(
            [int(c) for c in cs], [s[kind][c]["output_throughput"] for c in cs], style, label=kind
        )
    ax.set_xscale("log", base=2)
    cs = sorted({int(c) for k in ("inferhub", "llama_cpp.server") for c in s[k]})
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s")
    m = report["machine"]
    ax.set_title(
        f"Served throughput, {Path(report['model']).name}\n"
        f"{m['cores']} cores, {report['threads']} threads"
        + ("\n" + textwrap.shorten(report["note"], 80) if report.get("note") else ""),
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- driver ------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class LoadSampler(threading.Thread):
    """The 1-minute load average every 15 s: shows whether other jobs shared the machine."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(15):
            self.samples.append(os.getloadavg()[0])


PARTS = HERE / "results" / "bench_peers_parts"


def run_worker(engine: str, spec: dict[str, Any], resume: bool) -> dict[str, Any]:
    """One engine in its own process. Each engine's result is kept (with its spec) under
    benchmarks/results/bench_peers_parts/, and --resume reuses one made with the same spec."""
    PARTS.mkdir(parents=True, exist_ok=True)
    out_path = PARTS / f"{engine}.json"
    if resume and out_path.exists():
        saved = json.loads(out_path.read_text())
        if saved.get("spec") == spec and "result" in saved:
            log(f"{engine}: reusing {out_path}")
            return {**saved["result"], "reused": True}
    spec_path = PARTS / "spec.json"
    spec_path.write_text(json.dumps(spec))
    threads = spec["threads"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--worker", engine, "--spec", str(spec_path)]
    cmd += ["--result", str(out_path)]
    t0 = time.time()
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        log(f"{engine} failed (exit {rc}); going on without it")
        return {"error": f"worker exited with {rc}"}
    result = {**json.loads(out_path.read_text()), "seconds": time.time() - t0}
    out_path.write_text(json.dumps({"spec": spec, "result": result}))
    return dict(result)


def main() -> None:
    from common import add_dtype_arg, cpu_dtype

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    add_dtype_arg(ap, "inferhub's and transformers")
    ap.add_argument("--quick", action="store_true", help="small workloads: checks it all works")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset")
    ap.add_argument("--no-serve", action="store_true", help="skip the served comparison")
    ap.add_argument(
        "--offline",
        default="fixed,random",
        help="offline workloads to run (fixed: 64x128/128; random: 256 of [16, 512])",
    )
    ap.add_argument("--concurrency", default=None, help="served levels (default 1,8,16,32)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of single and prefill")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch", type=int, default=64, help="transformers' static batch")
    ap.add_argument("--inferhub-max-seqs", type=int, default=128)
    ap.add_argument("--inferhub-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-gib", type=int, default=3)
    ap.add_argument("--llama-parallel", default=None, help="n_parallel sweep (default 16,32,64)")
    ap.add_argument("--llama-n-batch", type=int, default=2048)
    ap.add_argument("--llama-n-ubatch", type=int, default=512)
    ap.add_argument("--llama-kv-unified", action="store_true", help="one KV buffer for all seqs")
    ap.add_argument(
        "--resume", action="store_true", help="reuse engines' results of an identical earlier run"
    )
    ap.add_argument("--note", default="", help="e.g. 'machine shared with other jobs'")
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--chart", type=Path, default=None)
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(args.spec.read_text())
        res = WORKERS[args.worker](spec)
        args.result.write_text(json.dumps(res))
        return

    from common import machine
    from inferhub.models.default import DEFAULT_MODEL_NAME, default_model_path

    args.dtype = cpu_dtype(args.dtype)
    args.model = args.model or default_model_path()
    args.served_name = DEFAULT_MODEL_NAME if args.model == default_model_path() else "model"
    default_conc = "1,4" if args.quick else "1,8,16,32"
    args.concurrency = [int(c) for c in (args.concurrency or default_conc).split(",")]
    par = args.llama_parallel or ("8" if args.quick else "16,32,64")
    args.llama_parallel = [int(p) for p in par.split(",")]
    engines = [e for e in args.engines.split(",") if e]
    stem = "bench_peers_quick" if args.quick else "bench_peers"
    output = args.output or (
        HERE / "results" / f"{stem}.json" if args.quick else ROOT / "docs/results/bench_peers.json"
    )
    chart_path = args.chart or (
        HERE / "results" / f"{stem}.png" if args.quick else ROOT / "docs/benchmarks_peers.png"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    sampler = LoadSampler()
    sampler.start()
    load_start = os.getloadavg()
    started = time.time()
    workloads = make_workloads(args)
    spec = {
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "workloads": workloads,
        "hf_batch": args.hf_batch,
        "inferhub_max_seqs": args.inferhub_max_seqs,
        "inferhub_batched_tokens": args.inferhub_batched_tokens,
        "kv_cache_gib": args.kv_cache_gib,
        "llama_parallel": args.llama_parallel,
        "llama_n_batch": args.llama_n_batch,
        "llama_n_ubatch": args.llama_n_ubatch,
        "llama_kv_unified": args.llama_kv_unified,
        "offline": [w for w in args.offline.split(",") if w],
    }
    report: dict[str, Any] = {"engines": {}}
    timings: dict[str, float] = {}
    spec = json.loads(json.dumps(spec))  # as it reads back from disk
    for engine in engines:
        t0 = time.time()
        log(f"{engine} ...")
        report["engines"][engine] = run_worker(engine, spec, args.resume)
        timings[engine] = report["engines"][engine].get("seconds", time.time() - t0)
    if not args.no_serve:
        t0 = time.time()
        logdir = HERE / "results" / "bench_peers_logs"
        logdir.mkdir(parents=True, exist_ok=True)
        report["served"] = bench_served(args, logdir)
        timings["served"] = time.time() - t0
    sampler.stop.set()
    load = sampler.samples or [os.getloadavg()[0]]
    report = {
        "machine": {**machine(), "threads": args.threads},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": args.model,
        "threads": args.threads,
        "quick": args.quick,
        "note": args.note,
        "load_average": {
            "at_start_1_5_15min": list(load_start),
            "during_min": min(load),
            "during_mean": sum(load) / len(load),
            "during_max": max(load),
        },
        # total: every engine and the served part, including ones reused by --resume
        "seconds": {
            **timings,
            "total": sum(timings.values()),
            "this_invocation": time.time() - started,
        },
        "workloads": {
            "single": {"prompt_len": 16, "output_len": workloads["single"]["output_len"]},
            "prefill": {"prompt_len": len(workloads["prefill"]["prompts"][0])},
            "fixed": {
                "requests": len(workloads["fixed"]["prompts"]),
                "input_len": len(workloads["fixed"]["prompts"][0]),
                "output_len": workloads["fixed"]["output_lens"][0],
            },
            "random": {
                "requests": len(workloads["random"]["prompts"]),
                "length_range": workloads["random"]["range"],
                "output_tokens": offline_tokens(workloads["random"]),
            },
            "offline_run": spec["offline"],
            "seed": args.seed,
            "reps": args.reps,
        },
        **report,
    }
    report["ratios"] = ratios(report)
    print(
        f"model={Path(args.model).name} threads={args.threads} quick={args.quick} "
        f"load average during the run {report['load_average']['during_mean']:.2f} "
        f"(max {report['load_average']['during_max']:.2f}) {args.note}"
    )
    print_report(report)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")
    if report.get("served"):
        chart(report, chart_path)
        print(f"wrote {chart_path}")
    sec = report["seconds"]
    print(f"total {sec['total']:.0f} s (this invocation {sec['this_invocation']:.0f} s)")


if __name__ == "__main__":
    main()
