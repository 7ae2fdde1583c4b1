"""Prometheus metrics of the server, named `pagedllm:*`.

Three kinds, kept in one registry per server:
- engine numbers (queue lengths, KV usage, token and preemption counters) are read from
  `AsyncLLM.get_metrics()` at scrape time, so /metrics shows exactly what the offline
  `LLM.get_metrics()` shows: keys ending in `_total` are counters, the rest gauges. Beside
  them `engine_alive` (1/0); once the core is dead its last report's load gauges (running,
  waiting, swapped, KV usage) read 0, not the load of a server that no longer serves;
- `request_success_total{finished_reason}`: requests by how they ended, counted once each
  by `AsyncLLM` (see `FINISHED_REASONS`);
- per-request latency histograms, observed when a request finishes, from the monotonic
  timestamps in `RequestOutput.metrics`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pagedllm.outputs import RequestOutput

PREFIX = "pagedllm:"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_HELP = {
    "num_requests_running": "Requests in the running queue.",
    "num_requests_waiting": "Requests waiting to be scheduled.",
    "num_requests_swapped": "Requests swapped out to the CPU pool.",
    "kv_cache_usage_perc": "Fraction of KV cache blocks in use (1 = full).",
    "num_preemptions_total": "Preemptions (recompute or swap) since start.",
    "prefix_cache_queries_total": "Prefix cache lookups (blocks) since start.",
    "prefix_cache_hits_total": "Prefix cache hits (blocks) since start.",
    "prompt_tokens_total": "Prompt tokens prefilled since start.",
    "generation_tokens_total": "Tokens generated since start.",
    "num_requests_failed_total": "Requests the engine core failed (too large, or a step "
                                 "failed on them).",
    "num_requests_refused_total": "Requests refused with 429: the waiting queue was full.",
    "step_failures_total": "Engine steps that raised; each failed only the requests that "
                           "caused it.",
    # The paper's Fig. 2 split of the KV cache (core/kv_accounting.py), averaged over the steps
    # since start, as fractions of the KV memory in use or lost.
    "kv_memory_token_states": "Share of KV memory holding token states (step average).",
    "kv_memory_reserved": "Share of KV memory reserved for tokens still to come (step average).",
    "kv_memory_internal_frag": "Share of KV memory reserved but never to be filled: internal "
                               "fragmentation (step average).",
    "kv_memory_external_frag": "Share of KV memory lost to external fragmentation: allocator "
                               "rounding, and free slots while a request waited for memory "
                               "(step average).",
    "kv_memory_unused": "Share of the whole KV pool free while no request waited for memory "
                        "(step average; not in the other shares' denominator).",
    "sim_clock_s": "load_format=simulate: the virtual clock, seconds.",
    "sim_steps_total": "load_format=simulate: steps priced by the cost model.",
    "sim_batched_seqs_total": "load_format=simulate: sequences in those steps, summed.",
}

# The core's gauges that describe load; a dead core's last values are stale, so they read 0.
LOAD_GAUGES = ("num_requests_running", "num_requests_waiting", "num_requests_swapped",
               "kv_cache_usage_perc")

# How a request ended (vLLM's `request_success_total{finished_reason}`): "stop" (EOS, a stop
# token or string), "length" (max_tokens or the context), "abort" (the client closed the
# stream or disconnected), "error" (the engine failed it, or the core died or shut down).
FINISHED_REASONS = ("stop", "length", "abort", "error")

# Seconds; CPU decode steps are tens of ms, a long CPU request takes minutes.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class _EngineCollector:
    """Yields the engine's counters and gauges from a fresh `get_metrics()` on each scrape."""

    def __init__(self, get_stats: Callable[[], dict], is_alive: Callable[[], bool]) -> None:
        self._get_stats, self._is_alive = get_stats, is_alive

    def describe(self) -> list:
        return []  # names are only known at scrape time; skip the registry's duplicate check

    def collect(self):
        alive = self._is_alive()
        yield GaugeMetricFamily(PREFIX + "engine_alive",
                                "1 while the engine core runs, 0 once it died or stopped.",
                                value=int(alive))
        for key, value in self._get_stats().items():
            if not alive and key in LOAD_GAUGES:
                value = 0
            doc = _HELP.get(key, key.replace("_", " ") + ".")
            if key.endswith("_total"):
                # prometheus_client appends `_total` to counter samples itself.
                yield CounterMetricFamily(PREFIX + key[: -len("_total")], doc, value=value)
            else:
                yield GaugeMetricFamily(PREFIX + key, doc, value=value)


class ServingMetrics:
    """One registry: engine numbers at scrape time, finished requests by reason, latency
    histograms."""

    def __init__(self, get_stats: Callable[[], dict], is_alive: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(get_stats, is_alive))
        self.request_success = Counter(
            PREFIX + "request_success", "Finished requests, by how they ended.",
            labelnames=("finished_reason",), registry=self.registry)
        for reason in FINISHED_REASONS:  # every series from the start: rate() needs a zero
            self.request_success.labels(reason)
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Arrival to first generated token.",
            buckets=_TTFT_BUCKETS, registry=self.registry)
        self.time_per_output_token = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Mean time between output tokens of a request (after the first).",
            buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Arrival to last generated token.",
            buckets=_E2E_BUCKETS, registry=self.registry)
        # The latest finished requests' (finish time, TTFT, TPOT or None): the dashboard's
        # exact percentiles over a recent window (the histograms keep buckets only).
        self.recent_latencies: collections.deque = collections.deque(maxlen=1024)

    def count_finished(self, reason: str) -> None:
        assert reason in FINISHED_REASONS, reason
        self.request_success.labels(reason).inc()

    def observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        arrival, first, last = (m.get("arrival_time"), m.get("first_token_time"),
                                m.get("last_token_time"))
        if arrival is None or first is None or last is None:
            return
        self.time_to_first_token.observe(first - arrival)
        self.e2e_request_latency.observe(last - arrival)
        # With n > 1 the sequences decode in lockstep: the longest one spans first..last.
        num_tokens = max((len(o.token_ids) for o in out.outputs), default=0)
        tpot = (last - first) / (num_tokens - 1) if num_tokens > 1 else None
        if tpot is not None:
            self.time_per_output_token.observe(tpot)
        self.recent_latencies.append((last, first - arrival, tpot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
