"""What the gateway adds to each request: authenticate + admit (rate limits, reservation) +
record_tokens + settle, with no engine, on SQLite by default (or --database-url, --redis-url).

One client in a loop gives the added latency (p50/p99); several concurrent clients give the
throughput. Prints a table and writes benchmarks/results/bench_gateway.json.

    python benchmarks/bench_gateway.py [--requests 2000 --concurrency 1,16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_json
from inferhub.gateway import accounts
from inferhub.gateway.factory import create_gateway
from inferhub.gateway.gateway import DatabaseGateway
from inferhub.gateway.records import KeyLimits


async def one_request(gw: DatabaseGateway, header: str, request_id: str) -> float:
    start = time.perf_counter()
    principal = await gw.authenticate(header)
    admission = await gw.admit(
        principal,
        request_id=request_id,
        model="bench",
        prompt_tokens=100,
        max_completion_tokens=200,
    )
    await gw.record_tokens(admission, 50)
    await gw.settle(
        admission,
        prompt_tokens=100,
        completion_tokens=50,
        end_state="completed",
        finish_reasons=["stop"],
    )
    return time.perf_counter() - start


async def run(
    gw: DatabaseGateway, header: str, requests: int, clients: int, tag: str
) -> dict[str, Any]:
    latencies: list[float] = []
    counter = iter(range(requests))

    async def client() -> None:
        for i in counter:
            latencies.append(await one_request(gw, header, f"{tag}-{i}"))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)
    return {
        "clients": clients,
        "requests": requests,
        "requests_per_s": requests / elapsed,
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "mean_ms": statistics.fmean(ms),
    }


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        gw = create_gateway(args.database_url, Path(tmp), args.redis_url, announce=lambda _: None)
        await gw.start()
        try:
            accounts.set_price(gw.db, "bench", 150_000, 600_000)
            account = accounts.create_account(gw.db, "bench")
            accounts.add_credit(gw.db, account.id, 10**15)
            limits = KeyLimits(rpm=10**9, tpm=10**12, concurrency=10**6)  # checked, never hit
            secret = accounts.create_key(gw.db, account.id, limits=limits).secret
            header = f"Bearer {secret}"
            await run(gw, header, min(200, args.requests), 4, "warmup")
            rows = []
            for clients in args.concurrency:
                row = await run(gw, header, args.requests, clients, f"c{clients}")
                row["database"] = "postgresql" if args.database_url else "sqlite"
                row["limiter"] = "redis" if args.redis_url else "memory"
                rows.append(row)
        finally:
            await gw.close()
    columns = [
        "database",
        "limiter",
        "clients",
        "requests",
        "requests_per_s",
        "p50_ms",
        "p99_ms",
        "mean_ms",
    ]
    print_table(rows, columns)
    path = write_json(
        "bench_gateway", {"workload": "authenticate+admit+record_tokens+settle", "results": rows}
    )
    print(f"wrote {path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16]
    )
    parser.add_argument("--database-url", help="postgresql://... (default: SQLite in a temp dir)")
    parser.add_argument("--redis-url", help="redis://... for the shared rate limiter")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
