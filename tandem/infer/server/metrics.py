"""/metrics in Prometheus' text format, kept by `prometheus_client`.

Counters of tokens and of ended or refused sequences, HTTP responses by path and status, two
latency histograms (time to first token, time between tokens), and values read when scraped
(`live`: the admission count, the engine thread's snapshots, and recovery.py's fault counts:
faults by kind, sequences restarted and failed, engine rebuilds and the seconds those took, as a
summary). Each app has its own registry,
not prometheus_client's global one, so several apps can live in one process (the tests do).
prometheus_client also writes a `<counter>_created` sample (the counter's start time) beside each
`<counter>_total`, as every Prometheus client library does.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

# name (after "tandem_") -> (help, value), and the EngineLoop (None while loading) for its counts
Live = Callable[[], tuple[dict[str, tuple[str, float]], Any]]


class Metrics:
    PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")

    def __init__(self, live: Live):
        self.registry = registry = CollectorRegistry()
        self.responses = Counter("tandem_http_responses_total", "HTTP responses by path and status.",
                                 ("path", "status"), registry=registry)
        self.prompt_tokens = Counter("tandem_prompt_tokens_total", "Prompt tokens of admitted requests.",
                                     registry=registry)
        self.generation_tokens = Counter("tandem_generation_tokens_total", "Tokens generated.", registry=registry)
        self.cancelled = Counter("tandem_requests_cancelled_total",
                                 "Sequences ended early (client gone, error, shutdown).", registry=registry)
        self.rejected = Counter("tandem_requests_rejected_total", "Requests answered 429 (server full).",
                                registry=registry)
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "Request arrival to its first generated token.",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=registry)
        self.itl = Histogram("tandem_inter_token_latency_seconds", "Time between consecutive tokens of a sequence.",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=registry)
        registry.register(_LiveCollector(live))

    def response(self, path: str, status: int) -> None:
        self.responses.labels(path if path in self.PATHS else "other", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    """The values read at scrape time: the gauges, and the engine thread's counts (it keeps them
    as plain numbers and knows nothing of metrics)."""

    def __init__(self, live: Live):
        self.live = live

    def collect(self):
        gauges, engine_loop = self.live()
        counts = engine_loop.recovery if engine_loop is not None else _NoEngine
        yield CounterMetricFamily("tandem_engine_steps_total", "Engine decode steps run.",
                                  value=engine_loop.steps if engine_loop is not None else 0)
        yield CounterMetricFamily("tandem_engine_sequence_steps_total",
                                  "Sequences advanced by engine steps, summed over steps (/ steps: the mean batch).",
                                  value=engine_loop.sequence_steps if engine_loop is not None else 0)
        yield CounterMetricFamily("tandem_engine_faults_total", "Engine faults detected (all kinds).",
                                  value=counts.faults)
        by_kind = CounterMetricFamily("tandem_engine_faults_by_kind", "Engine faults detected: device_error (the "
                                      "step raised), hang (it outlasted --step-timeout), nonfinite (NaN/inf logits).",
                                      labels=("kind",))
        for kind, value in counts.kinds.items():
            by_kind.add_metric((kind,), value)
        yield by_kind
        yield CounterMetricFamily("tandem_requests_restarted_total",
                                  "Sequences restarted from their prompt on a fresh engine after a fault.",
                                  value=counts.restarted)
        yield CounterMetricFamily("tandem_requests_failed_total", "Sequences ended with an error by engine faults.",
                                  value=counts.failed)
        yield CounterMetricFamily("tandem_engine_recoveries_total", "Engines rebuilt after a fault.",
                                  value=counts.rebuilds)
        yield SummaryMetricFamily("tandem_engine_recovery_seconds", "Time taken by the engine rebuilds.",
                                  count_value=counts.rebuilds, sum_value=counts.rebuild_seconds)
        for name, (help, value) in gauges.items():
            yield GaugeMetricFamily(f"tandem_{name}", help, value=value)


class _NoEngine:
    """The fault counts before the model has loaded."""
    faults = restarted = failed = rebuilds = 0
    kinds = {"device_error": 0, "hang": 0, "nonfinite": 0}
    rebuild_seconds = 0.0
