"""The HTTP API (a FastAPI app) and the per-process state behind it.

Three ways in, one model run and one answer:

- ``POST /predict``: JSON ``{"instances": [...]}``, each instance shaped like the input;
- ``POST /predict/image``: PNG/JPEG files (multipart/form-data, or one raw ``image/png``
  / ``image/jpeg`` body), preprocessed by the recipe in metadata.json;
- ``POST /v2/models/{model_name}/infer``: the Open Inference Protocol, plus its
  ``/v2``, ``/v2/health/*`` and ``/v2/models/{model_name}[/ready]`` routes.

Every body is read against a size limit, parsed and validated before anything is
queued for the model; every client mistake answers 4xx with ``{"error": ...}``.
BentoML (serving/service.py) mounts this app and adds what it already does
well: the timeout (504), ``/healthz``, ``/livez`` and ``/readyz``; the concurrency
limit (429) and ``/metrics`` are this app's. The app works without BentoML too
(tests drive it in-process).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from serving import ServingConfig, ServingError
from serving import v2 as oip
from serving.batching import Batcher
from serving.contract import REPORT_FILE, is_model_dir
from serving.docs import add_docs
from serving.images import ImageSpec, InvalidImage, UnsupportedImage, decode_image, image_spec
from serving.metrics import exposition, get_metrics
from serving.payload_log import REQUEST_ID_HEADER, PayloadLogger, new_request_id
from serving.reload import PointerWatcher, is_model_root, resolve_model_dir, watch_pending_root
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
    contract_mismatch,
)
from serving.runtime import CPU, OnnxModel, nan_padded, providers_for, public_metadata
from serving.schemas import (
    ErrorResponse,
    InvalidInstances,
    MetadataResponse,
    PredictRequest,
    PredictResponse,
    TooManyInstances,
    only_numbers,
    validate_instances,
    validate_sequences,
)

logger = logging.getLogger(__name__)

JSON_TYPES = ("application/json", "text/json")
_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode("latin-1")
IMAGE_TYPES = ("image/png", "image/jpeg")


class ApiError(Exception):
    """An answer other than 200: status, the sentence for ``{"error": ...}`` and extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


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
        self.metrics = get_metrics(config.max_batch_size)
        self._canary = config.rollout == CANARY
        self._shadow = config.rollout == SHADOW  # before the champion loads: its batcher mirrors in shadow mode
        self.challenger: LiveModel | None = None
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
        )
        if self.config.warmup_runs:  # before it answers anyone: at start (readiness waits) or before a reload switches
            seconds = model.warmup(sorted({1, self.config.max_batch_size}), self.config.warmup_runs)
            self.metrics.warmup(variant, seconds)
            logger.info("warmed up %s (%s) in %.0f ms", model_dir, variant, seconds * 1000)
        spec = image_spec(model.metadata)
        champion = variant == CHAMPION
        batcher = Batcher(
            model.predict_proba,
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
        except ServingError as error:
            logger.error("challenger: %s; serving the champion alone", error)
            self.metrics.challenger_reload("failed")
            target = source  # a root is watched from its present pointer on; a plain directory is not watched
        if is_model_root(source):
            self.challenger_watcher = PointerWatcher(source, target)

    def _load_challenger(self, model_dir: Path) -> LiveModel:
        """Load a challenger; it must read the champion's inputs and name its labels (else ServingError)."""
        fresh = self._load(model_dir, CHALLENGER)
        problem = contract_mismatch(self.live.info, fresh.info)
        if problem is not None:
            raise ServingError(f"challenger {model_dir} cannot stand in for the champion: {problem}")
        return fresh

    def _set_challenger(self, fresh: LiveModel | None, previous: LiveModel | None) -> None:
        self.challenger = fresh
        self.metrics.challenger_loaded(fresh.info if fresh else None, previous.info if previous else None)
        if fresh is not None:
            logger.info("challenger (%s): %s", self.config.rollout, fresh.model.describe())

    # --- hot reload --------------------------------------------------------------------------

    async def _load_published(
        self, watcher: PointerWatcher, load: Callable[[Path], LiveModel], what: str, count: Callable[[str], None],
        label: str = "hot reload",
    ) -> LiveModel | None:
        """What ``watcher`` newly points at, loaded in a thread; None when unchanged or broken (logged, counted)."""
        try:
            target = watcher.poll()
            if target is None:
                return None
            logger.info("%s: loading %s", label, target)
            fresh = await asyncio.to_thread(load, target)
        except ServingError as error:
            logger.error("%s: %s; still serving %s", label, error, what)
            count("failed")
            return None
        watcher.accept(target)
        count("ok")
        return fresh

    async def reload_if_published(self) -> bool:
        """Load a newly published model beside the live one and switch; False when nothing changed.

        Requests already queued finish on the model they were validated against;
        a directory that fails to load is logged and the live model stays.
        """
        if self.watcher is None:
            return False
        fresh = await self._load_published(self.watcher, self._load, str(self.live.model.model_dir),
                                           self.metrics.reload)
        if fresh is None:
            return False
        previous, self.live = self.live, fresh
        self.metrics.model_loaded(fresh.info, previous.info)
        logger.info("hot reload: now serving %s (was version %s)", fresh.model.describe(), previous.version)
        challenger = self.challenger
        if challenger is not None and (problem := contract_mismatch(fresh.info, challenger.info)) is not None:
            logger.warning("challenger version %s no longer fits the champion (%s): serving the champion alone "
                           "until another challenger is published", challenger.version, problem)
            self._set_challenger(None, challenger)
        return True

    async def reload_challenger_if_published(self) -> bool:
        """The challenger's twin of :meth:`reload_if_published`, on its own root; also its first load."""
        if self.challenger_watcher is None:
            return False
        current = self.challenger
        what = f"challenger {current.model.model_dir}" if current else "the champion alone"
        fresh = await self._load_published(self.challenger_watcher, self._load_challenger, what,
                                           self.metrics.challenger_reload, "hot reload (challenger)")
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
        except Exception:  # noqa: BLE001 - the watcher must outlive any one bad publish
            logger.exception("hot reload: unexpected error; still serving %s", self.live.model.model_dir)

    # --- rollout on the request path (shadow and canary only) ---------------------------------

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
        request_id = headers.get("x-request-id") or new_request_id()
        response.raw_headers.append((_REQUEST_ID_KEY, request_id.encode("latin-1")))  # no MutableHeaders scan
        if payload.sampled():
            payload.record(request_id, route, live.name, live.version, live.variant,
                           (time.perf_counter() - started) * 1000.0, batch, rows, live.model.labels)
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
            if not challenger.model.takes_lengths:  # a champion's ragged rows are NaN-padded; it reads zeros
                batch = np.nan_to_num(batch, nan=0.0)
            rows = await challenger.batcher.submit(batch)
            agree = agreements(champion_rows, rows)
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
        self._executor.shutdown(wait=True)
        if self._challenger_executor is not None:
            self._challenger_executor.shutdown(wait=True)


def _payload_logger(config: ServingConfig) -> PayloadLogger | None:
    """This worker's payload logger, or None (off: each route pays one attribute check)."""
    if config.payload_log is None:
        return None
    upload = None
    if config.payload_upload is not None:
        from serving.payload_store import S3Upload

        upload = S3Upload(config.payload_upload, config.payload_log)
        logger.info("payload log: %.0f%% of answers to %s (spooled in %s)", config.payload_sample * 100,
                    config.payload_upload, config.payload_log)
    else:
        logger.info("payload log: %.0f%% of answers to %s", config.payload_sample * 100, config.payload_log)
    return PayloadLogger(config.payload_log, config.payload_sample, config.payload_rotate_mb, config.payload_rotate_s,
                         config.payload_queue, flush_s=config.payload_flush_s, upload=upload)


async def _respond(server: ModelServer, headers: Mapping[str, str], route: str, live: LiveModel, batch: np.ndarray,
                   started: float, build: Callable[[np.ndarray], Response]) -> Response:
    """The slow path of a prediction route (rollout or payload log on): answer, name the variant, log."""
    rows = await server.answer(live, batch) if server.rollout is not None else await live.batcher.submit(batch)
    response = build(rows)
    if server.rollout is not None:
        server.answered(live, response)
    if server.payload is not None:
        server.log_payload(headers, route, live, batch, rows, started, response)
    return response


async def predict_response(server: ModelServer, headers: Mapping[str, str],
                           receive: Callable[[], Awaitable[dict[str, Any]]]) -> Response:
    """``POST /predict``, whole: the FastAPI route and the fast path (serving/fastpath.py) both answer with this.

    ``receive`` is the request's ASGI channel; nothing is read before the key and the content type pass.
    """
    started = time.perf_counter() if server.payload is not None else 0.0
    require_api_key(headers, server)
    _require_json(headers)
    raw = await read_limited(receive, headers.get("content-length"), server.config.max_body_bytes)
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise ApiError(400, 'the body must be a JSON object like {"instances": [x1, x2, ...]}')
    if "instances" not in body:
        hint = " (Open Inference Protocol requests go to POST /v2/models/{name}/infer)" if "inputs" in body else ""
        raise ApiError(400, 'the body has no "instances": send {"instances": [x1, x2, ...]}' + hint)
    rollout = server.rollout
    live = server.live if rollout is None else server.pick(headers)
    try:  # the champion's contract, whichever variant answers (ModelServer.answer)
        validate = validate_sequences if server.live.model.takes_lengths else validate_instances
        batch = validate(body["instances"], live.model.input_shape, server.config.max_instances, only_numbers(raw))
    except InvalidInstances as error:
        raise _invalid(error) from None
    if rollout is None and server.payload is None:
        return _predictions(live, await live.batcher.submit(batch))
    return await _respond(server, headers, "/predict", live, batch, started, lambda rows: _predictions(live, rows))


# --- request helpers ---------------------------------------------------------------------


def _server(request: Request) -> ModelServer:
    server = getattr(request.app.state, "server", None)
    if server is None:
        raise ApiError(503, "the model is not loaded yet; retry shortly")
    return server


def _media_type(headers: Mapping[str, str]) -> str | None:
    raw = headers.get("content-type")
    return raw.split(";", 1)[0].strip().lower() if raw else None


def _require_json(headers: Mapping[str, str]) -> None:
    media = _media_type(headers)
    if media is None or media in JSON_TYPES or media.endswith("+json"):
        return
    hint = " (images go to POST /predict/image)" if media.startswith(("image/", "multipart/")) else ""
    raise ApiError(415, f"Content-Type {media!r} is not accepted here; send JSON with "
                        f"'Content-Type: application/json'{hint}")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body of a routed request; see :func:`read_limited`."""
    return await read_limited(request.receive, request.headers.get("content-length"), limit)


async def read_limited(receive: Callable[[], Awaitable[dict[str, Any]]], declared: str | None, limit: int) -> bytes:
    """The whole body from the ASGI ``receive``, or 413 as soon as it is known to exceed ``limit``
    (before reading it when declared). A plain loop over ``receive``, not Starlette's ``stream()``
    generator: this is on every request's path, and the generator's machinery cost more than the loop."""
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise ApiError(413, f"request body is {size} bytes, more than the limit of {limit} bytes "
                                "(FLUXO_MAX_BODY_BYTES); send fewer instances per request")
    received: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is more than the limit of {limit} bytes (FLUXO_MAX_BODY_BYTES); "
                                    "send fewer instances per request")
            received.append(chunk)
        if not message.get("more_body", False):
            return received[0] if len(received) == 1 else b"".join(received)


def parse_json(body: bytes) -> Any:
    """orjson for speed; on failure the standard parser, which reads NaN/Infinity so the validator can name them."""
    if not body.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error})") from None


def _invalid(error: InvalidInstances) -> ApiError:
    return ApiError(413 if isinstance(error, TooManyInstances) else 400, str(error))


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def _predictions(live: LiveModel, probabilities: np.ndarray) -> Response:
    labels = live.model.labels
    best = probabilities.argmax(axis=1).tolist()
    predictions = [{"label": labels[i], "probabilities": row} for i, row in zip(best, probabilities)]
    return _json({"predictions": predictions, "model_version": live.version})


# --- API key ---------------------------------------------------------------------------------

SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <FLUXO_API_KEY>"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The key in FLUXO_API_KEY."},
}


def require_api_key(headers: Mapping[str, str], server: ModelServer) -> None:
    """Prediction routes need the key when FLUXO_API_KEY is set; compared in constant time.

    A plain call rather than a FastAPI dependency: dependency resolution cost
    about 5% of the CPU of a request (py-spy); the OpenAPI document declares it.
    """
    expected = server.config.api_key
    if expected is None:
        return
    given = headers.get("x-api-key")
    if given is None:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        given = credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None
    challenge = {"WWW-Authenticate": "Bearer"}
    if given is None:
        raise ApiError(401, "this route needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                       challenge)
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "the API key is not valid", challenge)


# --- metrics middleware ------------------------------------------------------------------


METRICS_ROUTE = "/metrics"


def over_capacity(metrics: Any, server: ModelServer | None) -> Response | None:
    """The 429 for a request beyond ``FLUXO_MAX_CONCURRENCY`` in this worker, else None.

    fluxo's own limit, not BentoML's ``MaxConcurrencyMiddleware``: that one is an asyncio
    semaphore whose ``locked()`` scans its waiters on every request; this is one integer
    compare (serving/README.md, "Request path"). Probes never reach the app, and
    ``/metrics`` is not limited, as with BentoML's.
    """
    if server is None or metrics.in_flight < server.config.max_concurrency:
        return None
    return Response(orjson.dumps({"error": f"Too many requests: this worker is answering {metrics.in_flight} "
                                           "already (FLUXO_MAX_CONCURRENCY); retry shortly"}),
                    status_code=429, headers={"Retry-After": "1"}, media_type="application/json")


class RequestAccounting:
    """Every request of the app: admitted or 429 (:func:`over_capacity`), counted in progress while it
    runs, then counted and timed by route template (never by raw path, which clients control)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        metrics = get_metrics()
        counted = scope["path"] != METRICS_ROUTE  # a scrape is neither limited nor counted in progress
        if counted:
            refused = over_capacity(metrics, getattr(scope["app"].state, "server", None))
            if refused is not None:
                metrics.request("limited", scope["method"], 429, time.perf_counter() - started)
                await refused(scope, receive, send)
                return
            metrics.enter()
        accounted = False

        def account() -> None:
            nonlocal accounted
            if accounted:
                return
            accounted = True
            if counted:
                metrics.leave()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics.request(route, scope["method"], status, time.perf_counter() - started)

        async def record_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                account()  # before the last byte goes out: a client holding its answer finds it counted
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        except asyncio.CancelledError:
            status = 499  # the client or the timeout gave up; nginx's name for it
            raise
        finally:
            account()  # an answer never completed (an error, a cancellation) is counted here


# --- the app -------------------------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Malformed request: the message names the field, instance or element.",
        401: "Missing or wrong API key (only when FLUXO_API_KEY is set).",
        413: "Body larger than FLUXO_MAX_BODY_BYTES, or more instances than FLUXO_MAX_INSTANCES.",
        415: "Wrong Content-Type, or an image that is not PNG/JPEG.",
        429: "The server is at FLUXO_MAX_CONCURRENCY requests; retry later.",
        504: "Not answered within FLUXO_TIMEOUT_S.",
    }.items()
}

_REQUEST_BODIES: dict[str, dict[str, Any]] = {
    "/predict": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}},
    "/predict/image": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                "required": ["file"],
            }
        },
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    },
    "/v2/models/{model_name}/infer": {"application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}},
    "/v2/models/{model_name}/versions/{model_version}/infer": {
        "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}
    },
}


# A report is a static page with inline styles and data: images; it may load nothing else and run nothing.
REPORT_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'",
                  "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


async def _report(server: ModelServer, variant: str) -> Response:
    if variant not in (CHAMPION, CHALLENGER):
        raise ApiError(400, f"variant={variant!r}: use {CHAMPION!r} (the default) or {CHALLENGER!r}")
    live = server.live if variant == CHAMPION else server.challenger
    if live is None:
        raise ApiError(404, "no challenger is loaded (FLUXO_ROLLOUT=champion); GET /report shows the champion's")
    path = live.model.model_dir / REPORT_FILE
    try:
        page = await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        raise ApiError(404, f"{live.name} v{live.version or '?'} has no report: it was exported before fluxo wrote "
                            f"them; re-export its run with `fluxo export --run-id {live.info.get('run_id')}`") from None
    return Response(page, media_type="text/html; charset=utf-8", headers={**REPORT_HEADERS, VARIANT_HEADER: live.variant})


def _live_named(server: ModelServer, model_name: str, model_version: str | None = None,
                pinnable: bool = False) -> LiveModel:
    """The model a v2 route names; ``pinnable``: in canary mode the challenger's version may be named too."""
    live = server.live
    if model_name != live.name:
        raise ApiError(404, f"unknown model {model_name!r}; this server serves {live.name!r} (GET /v2/models/{live.name})")
    if model_version is not None and model_version != live.version:
        challenger = server.challenger
        if pinnable and server.config.rollout == CANARY and challenger is not None and challenger.version == model_version:
            return challenger
        raise ApiError(404, f"model {live.name!r} has no version {model_version!r}; the live version is {live.version!r}")
    return live


async def _watch_drift(path: Path, interval_s: float = 5.0) -> None:
    """Keep the ``fluxo_drift_*`` gauges at the last verdict ``fluxo monitor`` wrote (serving/drift_status.py)."""
    from serving.drift_status import DriftStatus

    status = DriftStatus(path)
    while True:
        try:
            status.refresh()
        except Exception:  # noqa: BLE001 - the gauges must never take the server down
            logger.exception("drift status: could not read %s", path)
        await asyncio.sleep(interval_s)


def create_app() -> FastAPI:
    """The API; ``app.state.server`` must hold a :class:`ModelServer` before requests arrive."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server: ModelServer | None = getattr(app.state, "server", None)
        watcher = None
        # Everything alive now (BentoML, FastAPI, onnxruntime, the model) lives as long as the
        # process: freezing it keeps the collector from re-scanning it in every full collection,
        # which stalled all requests for 100-200 ms about once a second under load (README).
        gc.collect()
        gc.freeze()
        if server is not None and server.watching:
            watcher = asyncio.create_task(server.watch(), name="fluxo-hot-reload")
        drift = None
        if server is not None and server.config.drift_status is not None:
            drift = asyncio.create_task(_watch_drift(server.config.drift_status, server.config.reload_interval_s or 5.0),
                                        name="fluxo-drift-status")
        channel = server.metrics.channel if server is not None else None
        if channel is not None:
            await channel.open()  # other workers' scrapes ask this one to write its counts (serving/metrics.py)
        try:
            yield
        finally:
            for task in (watcher, drift):
                if task is not None:
                    task.cancel()
            if server is not None:
                await server.drain()
            if channel is not None:
                await channel.close()  # after drain's last flush: a scrape meanwhile still got this worker's counts

    app = FastAPI(
        title="fluxo",
        summary="Predictions from the champion model, on ONNX Runtime.",
        version="1",
        docs_url=None,  # serving/docs.py: the same page, without a CDN
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.add_middleware(RequestAccounting)
    add_docs(app)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> Response:
        return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, error: HTTPException) -> Response:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=400)

    @app.post("/predict", response_model=None, tags=["predict"],
              responses={200: {"model": PredictResponse}, **_ERRORS})
    async def predict(request: Request) -> Response:
        """Classify instances: each a nested list shaped like GET /metadata's input_shape, raw values."""
        return await predict_response(_server(request), request.headers, request.receive)

    @app.post("/predict/image", response_model=None, tags=["predict"],
              responses={200: {"model": PredictResponse}, **_ERRORS})
    async def predict_image(request: Request) -> Response:
        """Classify PNG/JPEG files: multipart/form-data (one or more files), or one raw image/png|jpeg body."""
        server = _server(request)
        started = time.perf_counter() if server.payload is not None else 0.0
        require_api_key(request.headers, server)
        rollout = server.rollout
        live = server.live if rollout is None else server.pick(request.headers)
        if live.image is None:
            raise ApiError(400, f"model {live.name!r} takes no images (input shape {list(live.model.input_shape)}); "
                                "send numbers to POST /predict")
        media = _media_type(request.headers)
        if media != "multipart/form-data" and media not in IMAGE_TYPES:
            raise ApiError(415, f"Content-Type {media!r} is not accepted here; upload files as multipart/form-data "
                                "or send one image with Content-Type image/png or image/jpeg")
        body = await read_body(request, server.config.max_body_bytes)
        limit = server.config.max_instances
        if media in IMAGE_TYPES:
            files = [("the request body", body)]
        else:
            files = await _uploaded_files(request, body, limit)
        if not files:
            raise ApiError(400, "no file in the upload; send the image(s) as multipart/form-data file fields")
        if len(files) > limit:
            raise ApiError(413, f"{len(files)} files, more than the limit of {limit} per request (FLUXO_MAX_INSTANCES)")
        spec = live.image

        def decode_all() -> np.ndarray:
            return np.stack([decode_image(data, spec, name) for name, data in files])

        try:
            batch = await asyncio.to_thread(decode_all)
        except UnsupportedImage as error:
            raise ApiError(415, str(error)) from None
        except InvalidImage as error:
            raise ApiError(400, str(error)) from None
        if rollout is None and server.payload is None:
            return _predictions(live, await live.batcher.submit(batch))
        return await _respond(server, request.headers, "/predict/image", live, batch, started,
                              lambda rows: _predictions(live, rows))

    @app.get(METRICS_ROUTE, response_class=PlainTextResponse, tags=["operations"],
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}})
    async def metrics() -> Response:
        """Prometheus metrics summed over the workers (serving/metrics.py lists them)."""
        await get_metrics().flush_all()  # every worker's counts of the requests answered before this scrape
        text, content_type = await asyncio.to_thread(exposition)
        return Response(text, media_type=content_type)

    @app.get("/metadata", response_model=MetadataResponse, tags=["model"])
    async def metadata(request: Request) -> Response:
        """Model identity, data version, input contract, image recipe, test metrics, the provider in use,
        and the rollout (mode, shares, and the challenger's metadata or null)."""
        server = _server(request)
        return _json({**server.live.info, "rollout": server.rollout_info()})

    @app.get("/report", response_class=HTMLResponse, tags=["model"],
             responses={200: {"content": {"text/html": {}}, "description": "The model report (self-contained HTML)."},
                        404: {"model": ErrorResponse, "description": "No report for this model or variant."},
                        400: {"model": ErrorResponse, "description": "Unknown variant."}})
    async def report(request: Request, variant: str = CHAMPION) -> Response:
        """The live model's report, written at export: test metrics with intervals, per-class table,
        confusion matrix, calibration, confident mistakes, parity, latency, data, learning curves and
        the comparison with the champion it replaced. ``?variant=challenger`` for the challenger's."""
        return await _report(_server(request), variant)

    # --- Open Inference Protocol ---------------------------------------------------------

    @app.get("/v2", response_model=oip.ServerMetadata, tags=["v2"])
    async def v2_server() -> Response:
        return _json({"name": "fluxo", "version": "1", "extensions": []})

    @app.get("/v2/health/live", tags=["v2"])
    async def v2_live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready", tags=["v2"], responses={503: {"model": ErrorResponse}})
    async def v2_ready(request: Request) -> Response:
        _server(request)
        return _json({"ready": True})

    async def _model_metadata(request: Request, model_name: str, model_version: str | None) -> Response:
        live = _live_named(_server(request), model_name, model_version)
        return _json(oip.model_metadata(live.name, live.version, live.model.input_name, live.model.input_shape,
                                        len(live.model.labels), live.model.takes_lengths))

    async def _model_ready(request: Request, model_name: str, model_version: str | None) -> Response:
        live = _live_named(_server(request), model_name, model_version)
        return _json({"name": live.name, "ready": True})

    async def _infer(request: Request, model_name: str, model_version: str | None) -> Response:
        server = _server(request)
        started = time.perf_counter() if server.payload is not None else 0.0
        require_api_key(request.headers, server)
        rollout = server.rollout
        live = _live_named(server, model_name, model_version, pinnable=rollout is not None)
        if rollout is not None and model_version is None:
            live = server.pick(request.headers)
        if (_media_type(request.headers) == "application/octet-stream"
                or "inference-header-content-length" in request.headers):
            raise ApiError(415, "the binary tensor extension is not supported; send the tensors as JSON")
        _require_json(request.headers)
        body = parse_json(await read_body(request, server.config.max_body_bytes))
        try:
            tensor, lengths, request_id, outputs = oip.parse_request(body)
            batch = oip_tensor(tensor, live, server.config.max_instances)
            if lengths is not None:
                addressed = live if model_version is not None else server.live  # a pinned version, or the champion's contract
                if not addressed.model.takes_lengths:
                    raise InvalidInstances(f"inputs[1] 'lengths': model {live.name!r} takes no lengths; send only "
                                           f"{live.model.input_name!r}")
                steps = oip.lengths_values(lengths, len(batch), batch.shape[-1])
                batch = nan_padded(batch, steps)
        except InvalidInstances as error:
            raise _invalid(error) from None
        if rollout is None and server.payload is None:
            probabilities = await live.batcher.submit(batch)
            return _json(oip.infer_response(live.name, live.version, request_id, outputs, probabilities,
                                            live.model.labels))
        # Under the champion's name whichever variant answered: clients address the model, not the variant.
        return await _respond(server, request.headers, "/v2/models/{model_name}/infer", live, batch, started,
                              lambda rows: _json(oip.infer_response(model_name, live.version, request_id, outputs,
                                                                    rows, live.model.labels)))

    missing = {404: {"model": ErrorResponse, "description": "No such model or version."}}

    @app.get("/v2/models/{model_name}", response_model=oip.ModelMetadata, tags=["v2"], responses=missing)
    async def v2_model(request: Request, model_name: str) -> Response:
        return await _model_metadata(request, model_name, None)

    @app.get("/v2/models/{model_name}/versions/{model_version}", response_model=oip.ModelMetadata, tags=["v2"],
             responses=missing)
    async def v2_model_version(request: Request, model_name: str, model_version: str) -> Response:
        return await _model_metadata(request, model_name, model_version)

    @app.get("/v2/models/{model_name}/ready", tags=["v2"], responses=missing)
    async def v2_model_ready(request: Request, model_name: str) -> Response:
        return await _model_ready(request, model_name, None)

    @app.get("/v2/models/{model_name}/versions/{model_version}/ready", tags=["v2"], responses=missing)
    async def v2_model_version_ready(request: Request, model_name: str, model_version: str) -> Response:
        return await _model_ready(request, model_name, model_version)

    @app.post("/v2/models/{model_name}/infer", response_model=None, tags=["v2"],
              responses={200: {"model": oip.InferResponse}, **missing, **_ERRORS})
    async def v2_infer(request: Request, model_name: str) -> Response:
        """Open Inference Protocol inference: one FP32 input tensor, outputs probabilities and label."""
        return await _infer(request, model_name, None)

    @app.post("/v2/models/{model_name}/versions/{model_version}/infer", response_model=None,
              tags=["v2"], responses={200: {"model": oip.InferResponse}, **missing, **_ERRORS})
    async def v2_infer_version(request: Request, model_name: str, model_version: str) -> Response:
        return await _infer(request, model_name, model_version)

    def openapi() -> dict[str, Any]:
        """FastAPI's document plus the request bodies the handlers parse themselves (for clients and schemathesis)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (PredictRequest, oip.InferRequest):
                document = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(document.pop("$defs", {}))
                components[model.__name__] = document
            schema["components"]["securitySchemes"] = SECURITY_SCHEMES
            for path, content in _REQUEST_BODIES.items():
                operation = schema["paths"][path]["post"]
                operation["requestBody"] = {"required": True, "content": content}
                operation["security"] = [{"bearer": []}, {"apiKey": []}, {}]  # {}: when no key is configured
            server: ModelServer | None = getattr(app.state, "server", None)
            if server is not None:  # the one model name (and version) this server answers to
                live = server.live
                for operations in schema["paths"].values():
                    for operation in operations.values():
                        for parameter in operation.get("parameters", []):
                            if parameter["name"] == "model_name":
                                parameter["schema"] = {"type": "string", "enum": [live.name]}
                            elif parameter["name"] == "model_version" and live.version is not None:
                                parameter["schema"] = {"type": "string", "enum": [live.version]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def oip_tensor(tensor: Any, live: LiveModel, max_instances: int) -> np.ndarray:
    from serving.schemas import validate_tensor

    return validate_tensor(tensor, "inputs[0]", live.model.input_name, live.model.input_shape, max_instances)


async def _uploaded_files(request: Request, body: bytes, limit: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of every file part, in order; the body was already read against the size limit."""
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request as StarletteRequest

    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replayed = StarletteRequest({k: v for k, v in request.scope.items() if k != "app"}, replay)
    try:
        form = await replayed.form(max_files=limit + 1, max_fields=limit + 1)
    except MultiPartException as error:
        status = 413 if "Too many" in str(error) else 400
        raise ApiError(status, f"malformed multipart upload: {error}") from None
    except HTTPException as error:
        raise ApiError(400, f"malformed multipart upload: {error.detail}") from None
    files = []
    try:
        for field, value in form.multi_items():
            if hasattr(value, "read"):
                files.append((f"file {value.filename or field!r}", await value.read()))
    finally:
        await form.close()
    return files
