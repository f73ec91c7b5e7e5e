"""The per-worker state behind every route: the model server and the live models it holds.

One :class:`ModelServer` per worker, set on ``app.state.server`` by the service once the
model is loaded; every route and the fast path reach the model through it. It knows
nothing of HTTP routes: the routers (serving/routes_*.py) turn requests into batches and
batches into answers, and this object decides which variant runs them, runs them,
mirrors them (shadow mode), logs them (payload log) and keeps the models current
(hot reload), so those rules exist once whichever route the request came by.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from serving import ServingConfig, ServingError
from serving.batching import Batcher
from serving.contract import is_model_dir
from serving.http import ApiError, client_request_id
from serving.image_work import ImageWork
from serving.images import ImageSpec, image_spec
from serving.metrics import get_metrics
from serving.ops_pool import run_ops
from serving.payload_log import REQUEST_ID_HEADER, PayloadLogger, new_request_id
from serving.reload import (
    PointerWatcher,
    is_model_root,
    resolve_model_dir,
    watch_pending_root,
)
from serving.rollout import (
    CANARY,
    CHALLENGER,
    CHAMPION,
    REQUEST_KEY_HEADER,
    SHADOW,
    VARIANT_HEADER,
    RolloutPolicy,
    ShadowBook,
    agreements,
    rollout_mismatch,
    value_tolerance,
)
from serving.runtime import CPU, OnnxModel, providers_for, public_metadata

logger = logging.getLogger(__name__)

_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode("latin-1")


@dataclass
class LiveModel:
    """One loaded model directory and the batcher in front of its session."""

    model: OnnxModel
    batcher: Batcher
    image: ImageSpec | None
    info: dict[str, Any]
    variant: str = CHAMPION
    """``champion`` or ``challenger`` (serving/rollout.py): what ``X-Fluxo-Variant`` says when it answers."""

    @property
    def name(self) -> str:
        return str(self.model.metadata.get("model_name") or "model")

    @property
    def version(self) -> str | None:
        return self.info["model_version"]


class ModelServer:
    """What one server process holds: the live model(s), their batchers, the reload watchers and the limits.

    ``rollout`` is None in champion mode, and every route tests that one attribute
    before touching anything else of the rollout: champion mode pays no allocation
    and no lock for it per request (serving/README.md has the measurement).
    """

    def __init__(self, config: ServingConfig) -> None:
        self.config = config
        source = config.require_model_dir()
        self.source = source
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fluxo-model")
        self.images = ImageWork(config.image_threads, config.image_queue_pixels, config.max_request_pixels)
        self.metrics = get_metrics(config.max_batch_size)
        self._canary = config.rollout == CANARY
        self._shadow = config.rollout == SHADOW  # before the champion loads: its batcher mirrors in shadow mode
        self.challenger: LiveModel | None = None
        self.challenger_error: str | None = None
        """Why the last challenger load failed (``GET /metadata``'s ``rollout``); None once one loads."""
        self.live = self._load(resolve_model_dir(source))
        self.watcher = (
            PointerWatcher(source, self.live.model.model_dir) if is_model_root(source) else None
        )
        self.metrics.model_loaded(self.live.info, None)
        logger.info("serving %s", self.live.model.describe())
        logger.info(
            "batching: up to %d instances per run, %.1f ms wait; limits: %d instances, %d body bytes; "
            "hot reload: %s",
            config.max_batch_size, config.batch_wait_ms, config.max_instances, config.max_body_bytes,
            f"watching {source}/current.json every {config.reload_interval_s:g} s" if self.watcher else "off",
        )
        self.payload = _payload_logger(config)
        self.rollout: RolloutPolicy | None = None
        self.challenger_watcher: PointerWatcher | None = None
        self._challenger_executor: ThreadPoolExecutor | None = None
        self.shadow_book = ShadowBook(config.max_concurrency)
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._shadow_error_logged: LiveModel | None = None
        if config.rollout != CHAMPION:
            self._start_rollout()
        elif config.challenger_dir is not None:
            logger.warning("FLUXO_CHALLENGER_DIR is set but FLUXO_ROLLOUT=champion: the challenger is not loaded")

    def _load(self, model_dir: Path, variant: str = CHAMPION) -> LiveModel:
        model = OnnxModel(
            model_dir,
            threads=self.config.ort_threads,
            providers=providers_for(self.config.provider),
            strict=self.config.provider == "cuda",
            variant=self.config.variant,
            max_batch_size=self.config.max_batch_size,  # the batcher merges up to this many rows: checked at load
        )
        if self.config.warmup_runs:  # before it answers anyone: at start (readiness waits) or before a reload switches
            seconds = model.warmup(list(model.batch_sizes), self.config.warmup_runs)  # the sizes checked at load
            self.metrics.warmup(variant, seconds)
            logger.info("warmed up %s (%s) in %.0f ms", model_dir, variant, seconds * 1000)
        spec = image_spec(model.metadata)
        champion = variant == CHAMPION
        batcher = Batcher(
            model.predict_outputs,  # probabilities, or a regression model's values
            # The challenger runs in its own thread: a slow challenger never queues ahead of the champion.
            self._executor if champion else self._challenger_executor,
            max_batch_size=self.config.max_batch_size,
            max_wait_ms=self.config.batch_wait_ms,
            # One-thread CPU runs are judged by their CPU time (serving/batching.py): preemption is not model cost.
            cost_clock=time.thread_time if model.provider == CPU and self.config.ort_threads == 1 else time.perf_counter,
            observe=self.metrics.batch if champion else None,  # fluxo_batch_* stay the champion's
            on_output=self._mirror if champion and self._shadow else None,
        )
        info = public_metadata(model.metadata, model.provider, model.variant)
        info["image"] = spec.as_dict() if spec else None
        return LiveModel(model, batcher, spec, info, variant)

    # --- the challenger ----------------------------------------------------------------------

    def _start_rollout(self) -> None:
        """Shadow or canary: the policy, the mirror cap, and the challenger if there is one yet."""
        config = self.config
        self.rollout = RolloutPolicy(config.rollout, config.canary_share, config.shadow_sample)
        self._challenger_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fluxo-challenger")
        source = config.challenger_dir
        alone = f"FLUXO_ROLLOUT={config.rollout} but"
        if source is None:
            logger.warning("%s FLUXO_CHALLENGER_DIR is not set: serving the champion alone", alone)
            return
        if not is_model_root(source) and not is_model_dir(source):
            self.challenger_watcher = watch_pending_root(source)
            later = (f"it is checked every {config.reload_interval_s:g} s and used once published"
                     if config.reload_interval_s > 0 else "hot reload is off (FLUXO_RELOAD_INTERVAL_S=0), so it never will be")
            logger.warning("%s the challenger root %s has no current.json yet: serving the champion alone; %s",
                           alone, source, later)
            return
        try:
            target = resolve_model_dir(source)
            self._set_challenger(self._load_challenger(target), None)
        except Exception as error:  # noqa: BLE001 - a bad challenger never takes the champion down
            self._load_failed("challenger", error, "dropped it; the champion serves alone", challenger=True)
            target = source  # a root is watched from its present pointer on (so retried); a plain directory is not
        if is_model_root(source):
            self.challenger_watcher = PointerWatcher(source, target)

    def _load_challenger(self, model_dir: Path) -> LiveModel:
        """Load a challenger; it must read the champion's inputs, name its labels and share its task (else ServingError)."""
        fresh = self._load(model_dir, CHALLENGER)
        problem = rollout_mismatch(self.live.info, fresh.info)
        if problem is not None:
            raise ServingError(f"challenger {model_dir} cannot stand in for the champion: {problem}")
        return fresh

    def _load_failed(self, label: str, error: Exception, then: str, challenger: bool) -> None:
        """Log a failed load, count it (``fluxo_*reloads_total{outcome="failed"}``) and, for a challenger,
        keep why for ``GET /metadata``: an operator sees a dropped challenger without reading logs."""
        if isinstance(error, ServingError):
            logger.error("%s: %s; %s", label, error, then)
        else:  # not a failure the runtime foresaw: the traceback helps
            logger.exception("%s: unexpected error (%s); %s", label, error, then)
        (self.metrics.challenger_reload if challenger else self.metrics.reload)("failed")
        if challenger:
            self.challenger_error = str(error) if isinstance(error, ServingError) else f"{type(error).__name__}: {error}"

    def _set_challenger(self, fresh: LiveModel | None, previous: LiveModel | None) -> None:
        if fresh is not None:
            self.challenger_error = None
        self.challenger = fresh
        self.metrics.challenger_loaded(fresh.info if fresh else None, previous.info if previous else None)
        if fresh is not None:
            logger.info("challenger (%s): %s", self.config.rollout, fresh.model.describe())

    # --- hot reload --------------------------------------------------------------------------

    async def _load_published(
        self, watcher: PointerWatcher, load: Callable[[Path], LiveModel], what: str, challenger: bool = False,
    ) -> LiveModel | None:
        """What ``watcher`` newly points at, loaded and warmed in a thread; None when unchanged or broken.

        Any failure (an unreadable pointer, a directory that does not load, check or warm up) is
        logged, counted as failed and left to the watcher to retry with backoff (serving/reload.py):
        the publish is not marked seen until it loads, and what is live keeps serving meanwhile.
        """
        label = "hot reload (challenger)" if challenger else "hot reload"
        try:
            target = watcher.poll()
            if target is None:
                return None
            logger.info("%s: loading %s", label, target)
            fresh = await run_ops(load, target)
        except Exception as error:  # noqa: BLE001 - whatever a publish holds, the live model stays
            polls = watcher.failed()
            then = (f"trying it again in {polls * self.config.reload_interval_s:g} s" if polls is not None
                    else f"gave up after {watcher.retries + 1} tries; publish it again to retry")
            self._load_failed(label, error, f"still serving {what}; {then}", challenger)
            return None
        watcher.accept(target)
        (self.metrics.challenger_reload if challenger else self.metrics.reload)("ok")
        return fresh

    async def reload_if_published(self) -> bool:
        """Load a newly published model beside the live one and switch; False when nothing changed.

        Requests already queued finish on the model they were validated against;
        a directory that fails to load is logged and the live model stays.
        """
        if self.watcher is None:
            return False
        fresh = await self._load_published(self.watcher, self._load, str(self.live.model.model_dir))
        if fresh is None:
            return False
        previous, self.live = self.live, fresh
        self.metrics.model_loaded(fresh.info, previous.info)
        logger.info("hot reload: now serving %s (was version %s)", fresh.model.describe(), previous.version)
        challenger = self.challenger
        if challenger is not None and (problem := rollout_mismatch(fresh.info, challenger.info)) is not None:
            logger.warning("challenger version %s no longer fits the champion (%s): serving the champion alone "
                           "until another challenger is published", challenger.version, problem)
            self._set_challenger(None, challenger)
            self.challenger_error = f"challenger version {challenger.version} no longer fits the champion: {problem}"
        return True

    async def reload_challenger_if_published(self) -> bool:
        """The challenger's twin of :meth:`reload_if_published`, on its own root; also its first load."""
        if self.challenger_watcher is None:
            return False
        current = self.challenger
        what = f"challenger {current.model.model_dir}" if current else "the champion alone"
        fresh = await self._load_published(self.challenger_watcher, self._load_challenger, what, challenger=True)
        if fresh is None:
            return False
        self._set_challenger(fresh, current)
        return True

    @property
    def watching(self) -> bool:
        """True when some model root is to be polled (champion's or challenger's)."""
        has_root = self.watcher is not None or self.challenger_watcher is not None
        return has_root and self.config.reload_interval_s > 0

    async def watch(self) -> None:
        """Poll the pointers until cancelled."""
        while True:
            await asyncio.sleep(self.config.reload_interval_s)
            await self._reload_safely(self.reload_if_published)
            await self._reload_safely(self.reload_challenger_if_published)

    async def _reload_safely(self, reload: Callable[[], Awaitable[bool]]) -> None:
        try:
            await reload()
        except Exception:  # the watcher must outlive any one bad publish
            logger.exception("hot reload: unexpected error; still serving %s", self.live.model.model_dir)

    # --- the request path when a rollout or the payload log is on -----------------------------

    def pick(self, headers: Mapping[str, str]) -> LiveModel:
        """The variant that answers: in canary mode the challenger for its share (sticky by X-Request-Key)."""
        challenger = self.challenger
        if challenger is not None and self._canary and self.rollout.challenger_answers(headers.get(REQUEST_KEY_HEADER)):
            return challenger
        return self.live

    async def answer(self, live: LiveModel, batch: np.ndarray) -> np.ndarray:
        """``live``'s rows for ``batch``, counted and timed per variant.

        Requests are validated against the champion's contract (the one ``/metadata`` states):
        a champion that takes lengths admits ragged instances, NaN-padded; a challenger trained
        on zero padding gets the zeros it was trained on, as in shadow mode.
        """
        if live is not self.live and self.live.model.takes_lengths and not live.model.takes_lengths:
            batch = np.nan_to_num(batch, nan=0.0)
        started = time.perf_counter()
        rows = await live.batcher.submit(batch)
        self.metrics.variant(live.variant, time.perf_counter() - started)
        return rows

    def answered(self, live: LiveModel, response: Response) -> Response:
        """Name the variant that answered on the response."""
        response.headers[VARIANT_HEADER] = live.variant
        return response

    def log_payload(self, headers: Mapping[str, str], route: str, live: LiveModel, batch: np.ndarray,
                    rows: np.ndarray, started: float, response: Response) -> Response:
        """Payload logging on (``self.payload`` set): echo or mint ``X-Request-Id``, queue the sampled record."""
        payload = self.payload
        request_id, refused = client_request_id(headers)
        if request_id is None:
            request_id = new_request_id()
        response.raw_headers.append((_REQUEST_ID_KEY, request_id.encode("latin-1")))  # no MutableHeaders scan
        if refused is not None:  # said, not silently swapped: the client's own id is not in the log
            response.raw_headers.append((b"x-request-id-replaced", refused.encode("latin-1")))
        if payload.sampled():
            payload.record(request_id, route, live.name, live.version, live.variant,
                           (time.perf_counter() - started) * 1000.0, batch, rows, live.model.labels)
        return response

    async def respond(self, headers: Mapping[str, str], route: str, live: LiveModel, batch: np.ndarray,
                      started: float, build: Callable[[np.ndarray], Response]) -> Response:
        """The slow path of a prediction route (rollout or payload log on): answer, name the variant, log."""
        rows = await self.answer(live, batch) if self.rollout is not None else await live.batcher.submit(batch)
        response = build(rows)
        if self.rollout is not None:
            self.answered(live, response)
        if self.payload is not None:
            self.log_payload(headers, route, live, batch, rows, started, response)
        return response

    def _mirror(self, merged: np.ndarray, output: np.ndarray, sizes: Sequence[int]) -> None:
        """Shadow: the champion's batcher hands over each run once its requests have their rows; the
        (sampled) batch goes to the challenger as one task, so a mirrored request costs no task of its own."""
        challenger = self.challenger
        if challenger is None:
            return
        requests, rows = self.rollout.mirrored_rows(sizes)
        if requests == 0:
            return
        if rows is not None:
            merged, output = merged[rows], output[rows]
        if not self.shadow_book.admit(requests):
            self.metrics.shadow_skipped.inc(requests)
            return
        run = self._shadow_run(challenger, merged, output, requests)
        task = asyncio.get_running_loop().create_task(run)
        self._shadow_tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow_run(self, challenger: LiveModel, batch: np.ndarray, champion_rows: np.ndarray,
                          requests: int) -> None:
        """Run one mirrored batch on the challenger and count how it compares; never raises."""
        try:
            await asyncio.sleep(0)  # one turn of the loop: the champion's responses go out first
            started = time.perf_counter()
            if batch.shape[1:] != challenger.model.input_shape:
                raise ValueError(f"batch of shape {batch.shape} for a challenger reading {challenger.model.input_shape}")
            # A champion's ragged rows are NaN-padded, a challenger without lengths reads zeros; a table's
            # NaN is an empty cell, which its graph imputes.
            if self.live.model.takes_lengths and not challenger.model.takes_lengths:
                batch = np.nan_to_num(batch, nan=0.0)
            rows = await challenger.batcher.submit(batch)
            regression = self.live.model.regression  # a challenger of another task is refused at load
            agree = agreements(champion_rows, rows, regression, value_tolerance(self.live.info) if regression else 0.0)
        except Exception as error:  # noqa: BLE001 - nobody awaits this task: count, log once, move on
            self.metrics.shadow(0, 0, len(batch))
            if self._shadow_error_logged is not challenger:
                self._shadow_error_logged = challenger
                logger.warning("shadow: challenger version %s failed (%s); counted in "
                               "fluxo_shadow_comparisons_total{outcome=\"error\"}, logged once per challenger",
                               challenger.version, error)
            return
        finally:
            self.shadow_book.release(requests)
        self.metrics.variant(CHALLENGER, time.perf_counter() - started, requests)
        self.metrics.shadow(agree, len(batch) - agree, 0)

    def rollout_info(self) -> dict[str, Any]:
        """``GET /metadata``'s ``rollout``: the settings and the challenger's public metadata (or None)."""
        challenger = self.challenger
        return {
            "mode": self.config.rollout,
            "canary_share": self.config.canary_share,
            "shadow_sample": self.config.shadow_sample,
            "challenger": challenger.info if challenger is not None else None,
            "challenger_error": self.challenger_error,
        }

    # --- shutdown ------------------------------------------------------------------------------

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait for queued and running model work (shutdown); mirrors get a few seconds, then are dropped."""
        if not await self.live.batcher.wait_idle(timeout):
            logger.warning("shutdown: model work still queued after %.0f s", timeout)
        challenger = self.challenger
        if challenger is not None and self._canary and not await challenger.batcher.wait_idle(timeout):
            logger.warning("shutdown: challenger work still queued after %.0f s", timeout)
        if self._shadow_tasks:
            _, late = await asyncio.wait(set(self._shadow_tasks), timeout=min(timeout, 5.0))
            for task in late:
                task.cancel()
            if late:
                logger.warning("shutdown: dropped %d shadow runs still in progress", len(late))
        if self.payload is not None:
            await asyncio.to_thread(self.payload.close)  # the last records, and the open file sealed
        self.metrics.tally.flush()  # the last requests' counts, before the loop (and its scheduled flush) stops

    def close(self) -> None:
        if self.payload is not None:
            self.payload.close()
        self.images.close()
        self._executor.shutdown(wait=True)
        if self._challenger_executor is not None:
            self._challenger_executor.shutdown(wait=True)



def server_of(request: Request) -> ModelServer:
    """The worker's server, or 503 while the model is still loading (``app.state.server`` unset)."""
    server = getattr(request.app.state, "server", None)
    if server is None:
        raise ApiError(503, "the model is not loaded yet; retry shortly")
    return server


def _payload_logger(config: ServingConfig) -> PayloadLogger | None:
    """This worker's payload logger, or None (off: each route pays one attribute check)."""
    if config.payload_log is None:
        return None
    if config.payload_upload is not None:
        logger.info("payload log: %.0f%% of answers to %s (spooled in %s)", config.payload_sample * 100,
                    config.payload_upload, config.payload_log)
    else:
        logger.info("payload log: %.0f%% of answers to %s", config.payload_sample * 100, config.payload_log)
    return PayloadLogger.from_config(config)

