"""Prometheus metrics of the service, on ``GET /metrics`` (:func:`exposition`).

prometheus_client is imported on first use, inside the server process: BentoML
sets ``PROMETHEUS_MULTIPROC_DIR`` before it loads the service, and the client
picks multiprocess mode only if that is set when it is imported, which is what
lets every worker's numbers add up on ``/metrics``.

BentoML's own request metrics (``bentoml_service_*``) are turned off (serving/service.py):
they counted the same requests again, per request, in a middleware that cost more CPU
than the model run, and made up most of a 91 KB scrape. These are the service's metrics:

- ``fluxo_requests_total{route, method, status}`` and
  ``fluxo_request_duration_seconds{route, method}``: per route *template*
  (``/v2/models/{model_name}/infer``), so clients cannot mint label values;
- ``fluxo_requests_in_progress``: requests the workers are answering now (``/metrics`` excluded);
- ``fluxo_batch_size`` (instances per model run), ``fluxo_batch_requests``
  (requests merged into one run) and ``fluxo_model_run_seconds``;
- ``fluxo_model_info{model_name, model_version, provider}``: 1 for the live model;
- ``fluxo_model_reloads_total{outcome}``.

In shadow and canary mode (serving/rollout.py), also:

- ``fluxo_variant_requests_total{variant}`` and ``fluxo_variant_latency_seconds{variant}``
  (``champion`` / ``challenger``): model answers per variant, and the time from
  handing a validated batch to the variant's batcher to its rows coming back
  (queue + model run), the one span both variants share in both modes;
- ``fluxo_shadow_comparisons_total{outcome}``: one per mirrored instance,
  ``agree`` / ``disagree`` (argmax equal or not) or ``error`` (the challenger failed);
  ``fluxo_shadow_skipped_total``: requests not mirrored because the worker's cap of
  mirrors in flight was reached (a challenger slower than the traffic);
- ``fluxo_challenger_info{model_name, model_version, provider}`` and
  ``fluxo_challenger_reloads_total{outcome}``: the challenger's twins of the two above.

For a table model: ``fluxo_unseen_categories_total{column}``, category values training never saw,
encoded as no category (``unseen_category: ignore``; serving/table_rows.py), per column of the model.

With ``FLUXO_PAYLOAD_LOG`` set (serving/payload_log.py): ``fluxo_payload_records_total``,
``fluxo_payload_dropped_total`` (the bounded queue was full, or a write failed), ``fluxo_payload_files_total``
and ``fluxo_payload_expired_files_total`` (deleted by retention).

The rollout series are created in every mode but only touched in shadow and canary, so
champion mode pays nothing for them per request.

The per-request and per-batch series are *tallied*: the request path adds to plain Python
numbers, and :class:`Tally` writes the sums to prometheus_client's shared files at most every
``FLUSH_S`` (and at shutdown). In multiprocess mode each ``inc``/``observe`` is a lock, a
``getpid()`` and an mmap write, four to six per request, which profiled at about 8% of a
request's CPU.

A scrape must still show every request answered before it, whichever worker answered it, and
whichever answers the scrape. So each worker listens on a Unix socket in the Prometheus folder
(:class:`FlushChannel`, one ``flush-<pid>.sock`` per worker), and the worker answering
``/metrics`` writes its own tally, asks every other worker over its socket to write theirs, and
reads the files once all have acknowledged, or after ``SCRAPE_WAIT_S`` (a worker too busy to
answer by then is read as it stands, at most ``FLUSH_S`` behind). The request path pays nothing
for this; a scrape pays one local connection per other worker. A request is counted before its
answer is sent (serving/admission.py, shared by the routes and serving/fastpath.py), so a client holding an answer finds it counted.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FLUSH_S = 0.25
"""Longest a tallied count waits before it is written to the shared files (see the module docstring)."""

SCRAPE_WAIT_S = 1.0
"""Longest a scrape waits for the other workers to write their tallies; bounds a scrape behind a stuck worker."""

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's folder of per-process files, set by BentoML in every worker (serving/launch.py)."""

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
        self.in_progress = Gauge("fluxo_requests_in_progress", "Requests being answered now (GET /metrics excluded)",
                                 multiprocess_mode="livesum")
        self.in_flight = 0  # this worker's share of fluxo_requests_in_progress, published with each flush
        self.tally = Tally(self._publish_in_flight)
        folder = os.environ.get(MULTIPROC_DIR_ENV)
        self.channel = FlushChannel(Path(folder), self.tally) if folder else None
        # Children by label values, bound on first use: ``labels()`` hashes and locks on every call.
        self._route_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        batch_buckets = _powers_of_two(max(max_batch_size, 1))
        self.batch_size = Histogram("fluxo_batch_size", "Instances per model run", buckets=batch_buckets)
        self.batch_requests = Histogram("fluxo_batch_requests", "Requests merged into one model run",
                                        buckets=batch_buckets)
        self.run_seconds = Histogram("fluxo_model_run_seconds", "Duration of one model run",
                                     buckets=_LATENCY_BUCKETS)
        self.model_info = Gauge("fluxo_model_info", "1 for the model being served",
                                ["model_name", "model_version", "provider"], multiprocess_mode="max")
        self.reloads = Counter("fluxo_model_reloads", "Hot reloads by outcome", ["outcome"])
        self.warmup_seconds = Gauge("fluxo_warmup_seconds", "Warmup of the last session loaded, per rollout variant "
                                    "(FLUXO_WARMUP_RUNS), before it answered", ["variant"], multiprocess_mode="max")
        self._rollout_metrics(Counter, Gauge, Histogram)
        self.payload_records = Counter("fluxo_payload_records", "Payload records written to the payload log")
        self.payload_dropped = Counter("fluxo_payload_dropped", "Payload records dropped: the log's queue was full "
                                       "(FLUXO_PAYLOAD_QUEUE records or FLUXO_PAYLOAD_QUEUE_MB) or its file failed to write")
        self.unseen = Counter("fluxo_unseen_categories", "Category values training never saw, encoded as no "
                              "category (unseen_category: ignore), by column", ["column"])
        self._unseen_children: dict[str, Any] = {}
        self.payload_files = Counter("fluxo_payload_files", "Payload log files completed (.parquet)")
        self.payload_expired = Counter("fluxo_payload_expired_files", "Payload files deleted from local disk by "
                                       "retention (FLUXO_PAYLOAD_KEEP_DAYS, FLUXO_PAYLOAD_KEEP_MB)")

    def _rollout_metrics(self, counter: Any, gauge: Any, histogram: Any) -> None:
        """Per-variant and shadow series; children bound once, so a request does no label lookup."""
        from serving.rollout import OUTCOMES, VARIANTS

        requests = counter("fluxo_variant_requests", "Model answers per rollout variant", ["variant"])
        latency = histogram("fluxo_variant_latency_seconds", "Batch submitted to rows back, per rollout variant",
                            ["variant"], buckets=_LATENCY_BUCKETS)
        self._variants = {v: (requests.labels(v), latency.labels(v)) for v in VARIANTS}
        comparisons = counter("fluxo_shadow_comparisons", "Mirrored instances by outcome against the champion",
                              ["outcome"])
        self._outcomes = {o: comparisons.labels(o) for o in OUTCOMES}
        self.shadow_skipped = counter("fluxo_shadow_skipped", "Requests not mirrored: too many mirrors in flight")
        self.challenger_info = gauge("fluxo_challenger_info", "1 for the challenger being served",
                                     ["model_name", "model_version", "provider"], multiprocess_mode="max")
        self.challenger_reloads = counter("fluxo_challenger_reloads", "Challenger loads by outcome", ["outcome"])

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._route_children.get(key)
        if children is None:
            children = self._route_children[key] = (self.requests.labels(route, method, str(status)),
                                                    self.latency.labels(route, method))
        tally = self.tally
        tally.inc(children[0])
        tally.observe(children[1], seconds)

    def unseen_categories(self, counts: dict[str, int]) -> None:
        """Unseen category values of one request, per column (the model's column names: a bounded label set)."""
        for column, count in counts.items():
            child = self._unseen_children.get(column)
            if child is None:
                child = self._unseen_children[column] = self.unseen.labels(column)
            self.tally.inc(child, count)

    def batch(self, instances: int, requests: int, seconds: float) -> None:
        tally = self.tally
        tally.observe(self.batch_size, instances)
        tally.observe(self.batch_requests, requests)
        tally.observe(self.run_seconds, seconds)

    def enter(self) -> None:
        """A request begins (``fluxo_requests_in_progress``)."""
        self.in_flight += 1
        if not self.tally.scheduled:
            self.tally.schedule()

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.tally.scheduled:
            self.tally.schedule()

    def _publish_in_flight(self) -> None:
        self.in_progress.set(self.in_flight)

    async def flush_all(self) -> None:
        """Every worker's tally written to the shared files: this one's now, the others' on request (bounded)."""
        self.tally.flush()
        if self.channel is not None:
            await self.channel.flush_others()

    def model_loaded(self, info: dict[str, Any], previous: dict[str, Any] | None) -> None:
        _swap_info(self.model_info, info, previous)

    def warmup(self, variant: str, seconds: float) -> None:
        self.warmup_seconds.labels(variant).set(seconds)

    def reload(self, outcome: str) -> None:
        self.reloads.labels(outcome).inc()

    def variant(self, variant: str, seconds: float, requests: int = 1) -> None:
        """``requests`` answers from ``variant`` (champion or challenger), each ``seconds`` in its batcher.

        A mirrored champion batch is one challenger run for several requests: each is
        observed, so the histogram's count stays the request count for both variants.
        """
        counter, latency = self._variants[variant]
        counter.inc(requests)
        for _ in range(requests):
            latency.observe(seconds)

    def shadow(self, agree: int, disagree: int, error: int) -> None:
        """The outcome of one mirrored batch, counted per instance."""
        for outcome, count in (("agree", agree), ("disagree", disagree), ("error", error)):
            if count:
                self._outcomes[outcome].inc(count)

    def challenger_loaded(self, info: dict[str, Any] | None, previous: dict[str, Any] | None) -> None:
        """``info`` None: the challenger was dropped (it no longer fits the champion)."""
        _swap_info(self.challenger_info, info, previous)

    def challenger_reload(self, outcome: str) -> None:
        self.challenger_reloads.labels(outcome).inc()


def _info_labels(info: dict[str, Any]) -> tuple[str, str, str]:
    return (str(info.get("model_name")), str(info.get("model_version")), str(info.get("provider")))


def _swap_info(gauge: Any, info: dict[str, Any] | None, previous: dict[str, Any] | None) -> None:
    """Set the info gauge to 1 for ``info`` (if any) and to 0 for the model it replaced."""
    if previous is not None and (info is None or _info_labels(previous) != _info_labels(info)):
        gauge.labels(*_info_labels(previous)).set(0)
    if info is not None:
        gauge.labels(*_info_labels(info)).set(1)


class Tally:
    """Counter increments and histogram observations summed in memory, written out in bulk.

    Only the event loop's thread tallies (the request path and the batcher's drain task);
    a flush is scheduled on that loop ``FLUSH_S`` after the first pending write. Called
    with no running loop (a script, a test without a server), it writes at once.
    """

    def __init__(self, before_flush: Any = None) -> None:
        self._counts: dict[Any, float] = {}
        self._histograms: dict[Any, list[float]] = {}  # child -> [count per bucket..., sum]
        self.scheduled = False
        self._before_flush = before_flush

    def inc(self, counter: Any, amount: float = 1.0) -> None:
        self._counts[counter] = self._counts.get(counter, 0.0) + amount
        if not self.scheduled:
            self.schedule()

    def observe(self, histogram: Any, value: float) -> None:
        pending = self._histograms.get(histogram)
        if pending is None:
            pending = self._histograms[histogram] = [0.0] * (len(histogram._upper_bounds) + 1)
        pending[bisect.bisect_left(histogram._upper_bounds, value)] += 1  # the first bound >= value, as observe()
        pending[-1] += value
        if not self.scheduled:
            self.schedule()

    def schedule(self) -> None:
        """Make sure a flush comes within ``FLUSH_S``."""
        if self.scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self.scheduled = True
        loop.call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        """Write everything pending: one ``inc`` per counter and per histogram bucket touched."""
        self.scheduled = False
        if self._before_flush is not None:
            self._before_flush()
        counts, self._counts = self._counts, {}
        histograms, self._histograms = self._histograms, {}
        for counter, amount in counts.items():
            counter.inc(amount)
        for histogram, pending in histograms.items():
            histogram._sum.inc(pending[-1])
            for bucket, count in zip(histogram._buckets, pending[:-1]):
                if count:
                    bucket.inc(count)


class FlushChannel:
    """How the worker answering a scrape gets every other worker's tally written first.

    Each worker listens on ``flush-<pid>.sock`` in the Prometheus folder (the folder is the
    server's own: serving/launch.py), so finding the others is one listing and every server
    asks only its own workers. A request is one byte; the peer flushes on its event loop (the
    only thread that tallies) and answers one byte, so once it has answered, every request it
    had answered is in the files. Sockets of workers that have gone refuse at once and are skipped.
    """

    PREFIX = "flush-"

    def __init__(self, folder: Path, tally: Tally) -> None:
        self.folder = folder
        self.tally = tally
        self.path = folder / f"{self.PREFIX}{os.getpid()}.sock"
        self._server: asyncio.AbstractServer | None = None

    async def open(self) -> None:
        """Start answering flush requests; on the worker's event loop, before it serves requests."""
        try:
            self._server = await asyncio.start_unix_server(self._answer, path=str(self.path))
        except OSError as error:  # e.g. a folder path too long for a Unix socket: scrapes lag by FLUSH_S
            logger.warning("metrics: cannot listen on %s (%s); a scrape may miss up to %.2f s of other "
                           "workers' requests", self.path, error, FLUSH_S)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._server = None
        self.path.unlink(missing_ok=True)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(1):
                self.tally.flush()
                writer.write(b"k")
                await writer.drain()
        except OSError:
            pass  # the asking worker gave up (SCRAPE_WAIT_S) or went away
        finally:
            writer.close()

    async def flush_others(self) -> None:
        """Ask every other worker to flush and wait for each acknowledgement, ``SCRAPE_WAIT_S`` at most."""
        peers = [path for path in self.folder.glob(f"{self.PREFIX}*.sock") if path != self.path]
        if not peers:
            return
        asks = [asyncio.ensure_future(self._ask(path)) for path in peers]
        _, late = await asyncio.wait(asks, timeout=SCRAPE_WAIT_S)
        for ask in late:
            ask.cancel()
        if late:
            logger.warning("metrics: %d of %d other workers did not write their counts within %.1f s; "
                           "this scrape may miss up to %.2f s of their requests", len(late), len(peers),
                           SCRAPE_WAIT_S, FLUSH_S)

    @staticmethod
    async def _ask(path: Path) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError:  # a worker that has stopped (refused) or a socket being removed
            return
        try:
            writer.write(b"f")
            await writer.drain()
            await reader.readexactly(1)
        except (OSError, asyncio.IncompleteReadError):
            pass  # it stopped while asked: what it wrote at shutdown is in the files
        finally:
            writer.close()


def exposition() -> tuple[bytes, str]:
    """The text ``GET /metrics`` answers and its content type: every worker's numbers when multiprocess.

    Reads files only, so it may run in a thread; call :meth:`Metrics.flush_all` first, on the loop.
    """
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    if os.environ.get(MULTIPROC_DIR_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


_lock = threading.Lock()
_metrics: Metrics | None = None


def get_metrics(max_batch_size: int = 64) -> Metrics:
    """This process's metrics, created on first call (prometheus_client refuses duplicate names)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = Metrics(max_batch_size)
        return _metrics
