"""Soak and load test: many concurrent clients against the real server for a bounded time,
mixing stream and non-stream requests, n > 1, stop strings, disconnects and invalid requests;
then a report (requests served, errors by type, latency, server RSS over time, KV blocks in
use at the end) and a billing reconciliation against the gateway's usage rows.

    python benchmarks/soak.py                          # 64 clients, 10 minutes, own server
    python benchmarks/soak.py --clients 16 --duration 60

It starts `inferhub serve` itself (the database gateway on SQLite in a temporary folder, the
embedded model, loopback only), creates an account and a key through the admin API, and
writes the JSON to docs/results/soak.json. `run_soak()` is what the short form in the test
suite (tests/server/test_soak.py) runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

MODEL = "SmolLM2-135M-Instruct"
RESULTS = Path(__file__).parents[1] / "docs" / "results"
PROMPTS = [
    "Count from one to twenty, separated by commas.",
    "Write a short poem about the sea.",
    "What is the capital of France? Answer in one sentence.",
    "List three colors.",
    "Explain what a CPU does, briefly.",
    "Say hello in five languages.",
]
# Invalid requests and what they must get: (status, error code or type).
INVALID: list[tuple[str, dict[str, Any] | bytes, dict[str, str] | None, int, str]] = [
    ("temperature", {"temperature": 3.5}, None, 400, "invalid_request_error"),
    ("n", {"n": 0}, None, 400, "invalid_request_error"),
    ("stop", {"stop": ["a", "b", "c", "d", "e"]}, None, 400, "invalid_request_error"),
    ("model", {"model": "no-such-model"}, None, 404, "model_not_found"),
    ("key", {}, {"Authorization": "Bearer sk-not-a-key"}, 401, "invalid_api_key"),
    ("json", b'{"model": "x", "messages": [', None, 400, "invalid_request_error"),
    ("context", {"max_tokens": 10_000_000}, None, 400, "context_length_exceeded"),
]


@dataclass
class Outcome:
    """One request as its client saw it."""

    kind: str
    status: int
    latency_s: float
    request_id: str | None = None
    prompt_tokens: int | None = None  # from the response's usage (completed requests)
    completion_tokens: int | None = None
    content_chunks: int = 0  # streamed chunks with content (a lower bound on tokens)
    completed: bool = False  # the client read the whole answer
    error: str | None = None  # code or type of an error body
    unexpected: str | None = None  # what was wrong, if anything


@dataclass
class SoakReport:
    clients: int
    duration_s: float
    requests: int = 0
    served: int = 0  # 200 and read to the end
    disconnected: int = 0  # the client left on purpose
    expected_errors: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    p50_s: float = 0.0
    p99_s: float = 0.0
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MiB)
    rss_growth_after_warmup_mb: float = 0.0
    kv_blocks_in_use_at_end: float = -1.0
    requests_running_at_end: float = -1.0
    usage_rows: int = 0
    admitted: int = 0
    billing_mismatches: list[str] = field(default_factory=list)
    engine_generation_tokens: int = 0
    billed_completion_tokens: int = 0
    client_seen_completion_tokens: int = 0
    billed_completion_tokens_of_served: int = 0


def _body(kind: str, rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": rng.randint(4, 40),
        "temperature": rng.choice([0.0, 0.7, 1.0]),
    }
    if kind == "n":
        body["n"] = rng.randint(2, 3)
    if kind == "stop":
        body["stop"] = [",", "."]
    if kind in ("stream", "disconnect"):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        if kind == "disconnect":
            body["max_tokens"] = 200
    return body


async def _chat(client: httpx.AsyncClient, kind: str, rng: random.Random) -> Outcome:
    body = _body(kind, rng)
    start = time.monotonic()
    r = await client.post("/v1/chat/completions", json=body)
    out = Outcome(kind, r.status_code, time.monotonic() - start)
    if r.status_code != 200:
        out.unexpected = f"{kind}: {r.status_code} {r.text[:200]}"
        return out
    data = r.json()
    out.request_id = data["id"]
    out.prompt_tokens = data["usage"]["prompt_tokens"]
    out.completion_tokens = data["usage"]["completion_tokens"]
    out.completed = True
    choices = data["choices"]
    if len(choices) != body.get("n", 1):
        out.unexpected = f"{kind}: {len(choices)} choices for n={body.get('n', 1)}"
    if kind == "stop":
        for c in choices:
            text = c["message"]["content"] or ""
            if c["finish_reason"] == "stop" and ("," in text or "." in text):
                out.unexpected = f"stop string left in the text: {text!r}"
    return out


async def _stream(client: httpx.AsyncClient, kind: str, rng: random.Random) -> Outcome:
    body = _body(kind, rng)
    start = time.monotonic()
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        out = Outcome(kind, r.status_code, 0.0, request_id=r.headers.get("x-request-id"))
        if r.status_code != 200:
            await r.aread()
            out.unexpected = f"{kind}: {r.status_code}"
            return out
        leave_after = rng.randint(1, 5) if kind == "disconnect" else None
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                done = True
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                out.unexpected = f"{kind}: error event {chunk['error']}"
                break
            if chunk.get("usage"):
                out.prompt_tokens = chunk["usage"]["prompt_tokens"]
                out.completion_tokens = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                if c["delta"].get("content"):
                    out.content_chunks += 1
            if leave_after is not None and out.content_chunks >= leave_after:
                break  # leaving the block closes the connection mid-stream
        out.completed = done
        if kind == "stream" and not done and out.unexpected is None:
            out.unexpected = "stream: ended without [DONE]"
    out.latency_s = time.monotonic() - start
    return out


async def _invalid(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    name, change, headers, status, code = rng.choice(INVALID)
    start = time.monotonic()
    if isinstance(change, bytes):
        r = await client.post(
            "/v1/chat/completions", content=change, headers={"Content-Type": "application/json"}
        )
    else:
        body = {**_body("chat", rng), **change}
        r = await client.post("/v1/chat/completions", json=body, headers=headers)
    out = Outcome(f"invalid-{name}", r.status_code, time.monotonic() - start)
    try:
        error = r.json()["error"]
        out.error = error.get("code") or error.get("type")
        shape_ok = set(error) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        shape_ok = False
    if r.status_code != status or code not in (error.get("code"), error.get("type")):
        out.unexpected = f"invalid-{name}: {r.status_code} {r.text[:200]}"
    elif not shape_ok:
        out.unexpected = f"invalid-{name}: not OpenAI-shaped: {r.text[:200]}"
    return out


KINDS = ["chat", "stream", "n", "stop", "disconnect", "invalid"]
WEIGHTS = [30, 30, 10, 10, 10, 10]


async def _client(
    base: str, key: str, seed: int, deadline: float, budget: list[int], outcomes: list[Outcome]
) -> None:
    rng = random.Random(seed)
    timeout = httpx.Timeout(300.0)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout) as client:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            kind = rng.choices(KINDS, WEIGHTS)[0]
            try:
                if kind == "invalid":
                    out = await _invalid(client, rng)
                elif kind in ("stream", "disconnect"):
                    out = await _stream(client, kind, rng)
                else:
                    out = await _chat(client, kind, rng)
            except (httpx.HTTPError, ValueError) as exc:
                out = Outcome(kind, 0, 0.0, unexpected=f"{kind}: {type(exc).__name__}: {exc}")
            outcomes.append(out)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def gauges(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics").text
    pattern = rf'^inferhub_(\w+)\{{model="{MODEL}"\}} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def wait_idle(base: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        g = gauges(base)
        busy = g["num_requests_running"] + g["num_requests_waiting"] + g["kv_cache_used_blocks"]
        if busy == 0 or time.monotonic() > deadline:
            return g
        time.sleep(0.1)


def usage_rows(base: str, admin_key: str, account: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    while True:
        r = httpx.get(
            base + "/admin/usage/requests",
            params={"account": account, "limit": 1000, "offset": len(rows)},
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=60,
        )
        r.raise_for_status()
        page = r.json()["data"]
        rows += page
        if len(page) < 1000:
            return rows


def reconcile(report: SoakReport, outcomes: list[Outcome], rows: list[dict[str, Any]]) -> None:
    """Every admitted request has exactly one closed usage row with the tokens its client saw."""
    by_id: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["request_id"] in by_id:
            report.billing_mismatches.append(f"two usage rows for {row['request_id']}")
        by_id[row["request_id"]] = row
    admitted = [o for o in outcomes if o.status == 200 and o.request_id]
    report.admitted = len(admitted)
    report.usage_rows = len(rows)
    if len(rows) != len(admitted):
        report.billing_mismatches.append(f"{len(rows)} usage rows for {len(admitted)} requests")
    for o in admitted:
        row = by_id.get(o.request_id or "")
        if row is None:
            report.billing_mismatches.append(f"no usage row for {o.request_id}")
            continue
        if row["status"] != "closed":
            report.billing_mismatches.append(f"{o.request_id} is still open")
        if o.completed and o.completion_tokens is not None:
            seen = (o.prompt_tokens, o.completion_tokens)
            billed = (row["prompt_tokens"], row["completion_tokens"])
            report.client_seen_completion_tokens += o.completion_tokens
            report.billed_completion_tokens_of_served += row["completion_tokens"]
            if seen != billed or row["end_state"] != "completed":
                report.billing_mismatches.append(
                    f"{o.request_id}: client saw {seen}, billed {billed} ({row['end_state']})"
                )
        elif row["completion_tokens"] < o.content_chunks:
            report.billing_mismatches.append(
                f"{o.request_id}: {o.content_chunks} chunks seen, "
                f"{row['completion_tokens']} tokens billed"
            )
    report.billed_completion_tokens = sum(int(r["completion_tokens"]) for r in rows)


async def run_soak(
    base: str,
    admin_key: str,
    *,
    clients: int,
    duration_s: float,
    max_requests: int = 1_000_000,
    server_pid: int | None = None,
    seed: int = 0,
    rss_every_s: float = 5.0,
    log: Any = print,
) -> SoakReport:
    """Run the mix against a server in gateway mode; returns the report (billing checked)."""
    admin = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=base, headers=admin, timeout=60) as a:
        name = "soak-" + secrets.token_hex(4)
        account = (
            await a.post("/admin/accounts", json={"name": name, "credit_micros": 10**12})
        ).json()
        created = (await a.post(f"/admin/accounts/{account['id']}/keys", json={})).json()
    key = created["secret"]
    engine_before = int(gauges(base).get("engine_generation_tokens_total", 0))

    report = SoakReport(clients=clients, duration_s=duration_s)
    outcomes: list[Outcome] = []
    started = time.monotonic()
    deadline = started + duration_s
    budget = [max_requests]

    async def sample_rss() -> None:
        while server_pid is not None:
            report.rss_mb.append(
                (round(time.monotonic() - started, 1), round(rss_mib(server_pid), 1))
            )
            done = len(outcomes)
            log(
                f"  t={time.monotonic() - started:6.0f}s requests={done} rss={report.rss_mb[-1][1]} MiB"
            )
            await asyncio.sleep(rss_every_s)

    sampler = asyncio.ensure_future(sample_rss())
    await asyncio.gather(
        *(_client(base, key, seed * 1000 + i, deadline, budget, outcomes) for i in range(clients))
    )
    sampler.cancel()
    report.duration_s = round(time.monotonic() - started, 1)
    if server_pid is not None:
        report.rss_mb.append((report.duration_s, round(rss_mib(server_pid), 1)))

    g = await asyncio.to_thread(wait_idle, base)
    report.kv_blocks_in_use_at_end = g["kv_cache_used_blocks"]
    report.requests_running_at_end = g["num_requests_running"] + g["num_requests_waiting"]
    report.engine_generation_tokens = int(g["engine_generation_tokens_total"]) - engine_before

    report.requests = len(outcomes)
    report.served = sum(o.completed for o in outcomes if o.status == 200)
    report.disconnected = sum(o.kind == "disconnect" and not o.completed for o in outcomes)
    report.statuses = dict(Counter(str(o.status) for o in outcomes))
    report.expected_errors = dict(Counter(f"{o.status} {o.error}" for o in outcomes if o.error))
    report.unexpected = [o.unexpected for o in outcomes if o.unexpected][:50]
    latencies = sorted(o.latency_s for o in outcomes if o.completed and o.status == 200)
    if latencies:
        report.p50_s = round(statistics.median(latencies), 3)
        report.p99_s = round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)
    if len(report.rss_mb) >= 3:
        warm = report.rss_mb[max(1, len(report.rss_mb) // 5)][1]
        report.rss_growth_after_warmup_mb = round(report.rss_mb[-1][1] - warm, 1)

    rows = await asyncio.to_thread(usage_rows, base, admin_key, account["id"])
    reconcile(report, outcomes, rows)
    if report.billed_completion_tokens != report.engine_generation_tokens:
        report.billing_mismatches.append(
            f"billed {report.billed_completion_tokens} completion tokens, the engine generated "
            f"{report.engine_generation_tokens}"
        )
    return report


def start_server(
    data_dir: Path, admin_key: str, extra: list[str]
) -> tuple[subprocess.Popen[str], str]:
    cmd = [
        sys.executable,
        "-m",
        "inferhub.cli",
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
    ]
    env = {**os.environ, "INFERHUB_ADMIN_KEY": admin_key, "PYTHONUNBUFFERED": "1"}
    log = open(data_dir / "server.log", "w")  # noqa: SIM115 - the server's whole life
    proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line):
            return proc, m.group(1)
    raise RuntimeError("the server did not start: " + (data_dir / "server.log").read_text()[-2000:])


def print_report(r: SoakReport) -> None:
    rows = [
        ("clients", r.clients),
        ("duration (s)", r.duration_s),
        ("requests", r.requests),
        ("served to the end", r.served),
        ("disconnected on purpose", r.disconnected),
        ("statuses", r.statuses),
        ("expected errors", r.expected_errors),
        ("unexpected (must be 0)", len(r.unexpected)),
        ("latency p50 / p99 (s)", f"{r.p50_s} / {r.p99_s}"),
        ("RSS first / last (MiB)", f"{r.rss_mb[0][1] if r.rss_mb else '-'} / {r.rss_mb[-1][1] if r.rss_mb else '-'}"),
        ("RSS growth after warm-up (MiB)", r.rss_growth_after_warmup_mb),
        ("KV blocks in use at the end", r.kv_blocks_in_use_at_end),
        ("usage rows / admitted requests", f"{r.usage_rows} / {r.admitted}"),
        ("completion tokens billed / generated", f"{r.billed_completion_tokens} / {r.engine_generation_tokens}"),
        ("billing mismatches (must be 0)", len(r.billing_mismatches)),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)} | {v}")
    for line in r.unexpected[:10] + r.billing_mismatches[:10]:
        print("  !", line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds")
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--url", help="a running server in gateway mode (with --admin-key)")
    parser.add_argument("--admin-key", default=os.environ.get("INFERHUB_ADMIN_KEY"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "soak.json"))
    parser.add_argument("serve_args", nargs="*", help="extra `inferhub serve` arguments")
    args = parser.parse_args()

    proc = None
    with tempfile.TemporaryDirectory(prefix="inferhub-soak-") as tmp:
        if args.url:
            base, admin_key, pid = args.url.rstrip("/"), args.admin_key, None
            if not admin_key:
                parser.error("--url needs --admin-key (or INFERHUB_ADMIN_KEY)")
        else:
            admin_key = "sk-soak-admin-" + secrets.token_urlsafe(24)
            proc, base = start_server(Path(tmp), admin_key, args.serve_args)
            pid = proc.pid
            print(f"server {base} (pid {pid})")
        try:
            report = asyncio.run(
                run_soak(
                    base, admin_key, clients=args.clients, duration_s=args.duration,
                    max_requests=args.max_requests, server_pid=pid, seed=args.seed,
                )
            )  # fmt: skip
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    print_report(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import platform

    payload = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.node(),
               "cores": os.cpu_count(), **asdict(report)}  # fmt: skip
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    ok = not report.unexpected and not report.billing_mismatches
    ok = ok and report.kv_blocks_in_use_at_end == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
