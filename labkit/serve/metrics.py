"""The engine's state in Prometheus' text format, through ``prometheus_client`` (HELP and TYPE lines, counters and
gauges). Names follow vLLM's (``vllm:num_requests_running`` ...) under a ``labkit:`` prefix where vLLM has one, so a
dashboard built for one reads the other with the prefix changed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# snapshot key -> (metric name, kind, help)
METRICS: dict[str, tuple[str, str, str]] = {
    "num_requests_running": ("labkit:num_requests_running", "gauge", "Requests in the running batch."),
    "num_requests_waiting": ("labkit:num_requests_waiting", "gauge", "Requests waiting to be scheduled."),
    "kv_blocks_used": ("labkit:kv_cache_blocks_used", "gauge", "KV-cache blocks holding tokens."),
    "kv_blocks_total": ("labkit:kv_cache_blocks_total", "gauge", "KV-cache blocks in the pool."),
    "generation_tokens_total": ("labkit:generation_tokens", "counter", "Tokens generated."),
    "requests_finished_total": ("labkit:request_success", "counter", "Requests that finished."),
    "requests_failed_total": ("labkit:request_failure", "counter", "Requests the engine failed while running."),
    "engine_failed_steps_total": ("labkit:engine_failed_steps", "counter", "Engine steps that raised."),
    "spec_draft_tokens_total": ("labkit:spec_decode_num_draft_tokens", "counter", "Tokens speculation guessed."),
    "spec_accepted_tokens_total": ("labkit:spec_decode_num_accepted_tokens", "counter",
                                   "Guessed tokens the model kept."),
    "prefix_cache_queries_total": ("labkit:prefix_cache_queries", "counter",
                                   "Prompt tokens looked up in the prefix cache (with prefix caching on)."),
    "prefix_cache_hits_total": ("labkit:prefix_cache_hits", "counter",
                                "Prompt tokens whose KV came from the prefix cache."),
    "requests_in_flight": ("labkit:num_requests_in_flight", "gauge",
                           "Requests admitted and not yet answered in full (running, waiting or in the inbox)."),
    "requests_rejected_total": ("labkit:request_rejected", "counter",
                                "Requests answered 503 because max_in_flight requests were in flight."),
    "healthy": ("labkit:engine_healthy", "gauge", "1 while the engine serves, 0 once it is unhealthy or stopped."),
}


class _Snapshot:
    """A collector over one snapshot of :meth:`EngineService.metrics` (read once per scrape)."""

    def __init__(self, values: dict[str, float], model_name: str) -> None:
        self.values, self.model_name = values, model_name

    def collect(self) -> Iterator[Any]:
        for key, (name, kind, help_text) in METRICS.items():
            if key not in self.values:
                continue
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_text,
                                                                                       labels=["model_name"])
            family.add_metric([self.model_name], float(self.values[key]))
            yield family
        used, total = self.values.get("kv_blocks_used"), self.values.get("kv_blocks_total")
        if used is not None and total:
            usage = GaugeMetricFamily("labkit:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.",
                                      labels=["model_name"])
            usage.add_metric([self.model_name], used / total)
            yield usage


def prometheus_text(values: dict[str, float], model_name: str) -> tuple[str, str]:
    """``(body, content type)`` of a /metrics answer for one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(values, model_name))
    return generate_latest(registry).decode(), CONTENT_TYPE_LATEST
