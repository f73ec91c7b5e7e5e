"""Prometheus metrics of the service, next to BentoML's own on ``GET /metrics``.

prometheus_client is imported on first use, inside the server process: BentoML
sets ``PROMETHEUS_MULTIPROC_DIR`` before it loads the service, and the client
picks multiprocess mode only if that is set when it is imported, which is what
lets every worker's numbers add up on ``/metrics``.

- ``fluxo_requests_total{route, method, status}`` and
  ``fluxo_request_duration_seconds{route, method}``: per route *template*
  (``/v2/models/{model_name}/infer``), so clients cannot mint label values;
- ``fluxo_batch_size`` (instances per model run), ``fluxo_batch_requests``
  (requests merged into one run) and ``fluxo_model_run_seconds``;
- ``fluxo_model_info{model_name, model_version, provider}``: 1 for the live model;
- ``fluxo_model_reloads_total{outcome}``.
"""

from __future__ import annotations

import threading
from typing import Any

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _powers_of_two(limit: int) -> tuple[float, ...]:
    buckets = [1.0]
    while buckets[-1] < limit:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


class Metrics:
    """The service's metric objects; one per process (see :func:`get_metrics`)."""

    def __init__(self, max_batch_size: int) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("fluxo_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"])
        self.latency = Histogram("fluxo_request_duration_seconds", "HTTP request latency by route template",
                                 ["route", "method"], buckets=_LATENCY_BUCKETS)
        batch_buckets = _powers_of_two(max(max_batch_size, 1))
        self.batch_size = Histogram("fluxo_batch_size", "Instances per model run", buckets=batch_buckets)
        self.batch_requests = Histogram("fluxo_batch_requests", "Requests merged into one model run",
                                        buckets=batch_buckets)
        self.run_seconds = Histogram("fluxo_model_run_seconds", "Duration of one model run",
                                     buckets=_LATENCY_BUCKETS)
        self.model_info = Gauge("fluxo_model_info", "1 for the model being served",
                                ["model_name", "model_version", "provider"], multiprocess_mode="max")
        self.reloads = Counter("fluxo_model_reloads", "Hot reloads by outcome", ["outcome"])

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def batch(self, instances: int, requests: int, seconds: float) -> None:
        self.batch_size.observe(instances)
        self.batch_requests.observe(requests)
        self.run_seconds.observe(seconds)

    def model_loaded(self, info: dict[str, Any], previous: dict[str, Any] | None) -> None:
        def labels(i: dict[str, Any]) -> tuple[str, str, str]:
            return (str(i.get("model_name")), str(i.get("model_version")), str(i.get("provider")))

        if previous is not None and labels(previous) != labels(info):
            self.model_info.labels(*labels(previous)).set(0)
        self.model_info.labels(*labels(info)).set(1)

    def reload(self, outcome: str) -> None:
        self.reloads.labels(outcome).inc()


_lock = threading.Lock()
_metrics: Metrics | None = None


def get_metrics(max_batch_size: int = 64) -> Metrics:
    """This process's metrics, created on first call (prometheus_client refuses duplicate names)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = Metrics(max_batch_size)
        return _metrics
