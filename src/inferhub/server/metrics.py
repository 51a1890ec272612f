"""Prometheus metrics of one app (its own CollectorRegistry): requests by status, latency
histograms (TTFT, time per output token, end to end), token counters, and the engines' live
state (running and waiting sequences, KV cache use) read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from inferhub.server.state import ServingEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector(Collector):
    """Reads each engine's `stats()` when Prometheus scrapes."""

    def __init__(self, engines: Callable[[], Mapping[str, ServingEngine]]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[Metric]:
        gauges = {
            "num_requests_running": "Sequences in the running batch.",
            "num_requests_waiting": "Sequences waiting to be scheduled.",
            "kv_cache_usage_perc": "Fraction of KV cache blocks in use (0..1).",
            "kv_cache_used_blocks": "KV cache blocks in use.",
            "kv_cache_total_blocks": "KV cache blocks in all.",
            "prefix_cache_hit_rate": "Fraction of prefix-cache lookups that hit.",
        }
        families = {
            name: GaugeMetricFamily(f"inferhub_{name}", doc, labels=["model"])
            for name, doc in gauges.items()
        }
        # The engine's own counts (every prompt it took, every token it sampled, whatever
        # became of the request): billing is checked against these.
        engine_prompt = CounterMetricFamily(
            "inferhub_engine_prompt_tokens", "Prompt tokens the engine took.", labels=["model"]
        )
        engine_generation = CounterMetricFamily(
            "inferhub_engine_generation_tokens", "Tokens the engine sampled.", labels=["model"]
        )
        for model, engine in self._engines().items():
            s = engine.stats()
            values = {
                "num_requests_running": s.num_running,
                "num_requests_waiting": s.num_waiting,
                "kv_cache_usage_perc": s.kv_cache_usage,
                "kv_cache_used_blocks": s.num_used_blocks,
                "kv_cache_total_blocks": s.num_blocks,
                "prefix_cache_hit_rate": s.prefix_cache_hit_rate,
            }
            for name, value in values.items():
                families[name].add_metric([model], float(value))
            engine_prompt.add_metric([model], float(s.total_prompt_tokens))
            engine_generation.add_metric([model], float(s.total_generation_tokens))
        yield from families.values()
        yield engine_prompt
        yield engine_generation


class ServerMetrics:
    """The metrics of one app; handlers call `observe_*`, `/metrics` calls `render()`."""

    def __init__(self, engines: Callable[[], Mapping[str, ServingEngine]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "inferhub_http_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.finished = Counter(
            "inferhub_request_finished",
            "Generation requests by model and end state.",
            ["model", "end_state"],
            registry=r,
        )
        self.ttft = Histogram(
            "inferhub_time_to_first_token_seconds",
            "Time to first token.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "inferhub_time_per_output_token_seconds",
            "Time per output token after the first.",
            ["model"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "inferhub_e2e_request_latency_seconds",
            "End-to-end request latency.",
            ["model"],
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "inferhub_prompt_tokens", "Prompt tokens of served requests.", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "inferhub_generation_tokens",
            "Generated tokens of served requests.",
            ["model"],
            registry=r,
        )
        self.overloaded = Counter(
            "inferhub_overload_refusals",
            "Requests refused with 503 because too many were already waiting for the model.",
            ["model"],
            registry=r,
        )
        r.register(_EngineCollector(engines))

    def observe_request(
        self,
        model: str,
        end_state: str,
        *,
        e2e: float,
        ttft: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        num_choices: int,
    ) -> None:
        self.finished.labels(model, end_state).inc()
        self.e2e.labels(model).observe(e2e)
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
            per_choice = completion_tokens / max(1, num_choices)
            if per_choice > 1:
                self.tpot.labels(model).observe((e2e - ttft) / (per_choice - 1))

    def observe_overload(self, model: str) -> None:
        self.overloaded.labels(model).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware: counts every HTTP response by route template and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_count(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, str(status)).inc()
