"""BentoML services: the public REST API and the batched model behind it.

Two services because BentoML 1.4 batches calls *into* a ``batchable`` API:
``Fluxo`` (public) validates each request and calls ``FluxoModel.predict``
through ``bentoml.depends``; ``FluxoModel`` runs in its own process, where the
dispatcher merges concurrent calls into one ONNX Runtime run. Serve with
``bentoml serve serving.service:Fluxo`` and ``FLUXO_MODEL_DIR`` set.

Batching limits are decorator arguments, so the configuration is read here, at
import time; every BentoML process imports this module with the same environment.
"""

from __future__ import annotations

import logging
from typing import Any

import bentoml
import numpy as np
from fastapi import FastAPI
from starlette.responses import JSONResponse

from serving import MODEL_DIR_ENV, ServingConfig
from serving.runtime import OnnxModel, load_metadata
from serving.schemas import (
    InvalidInstances,
    MetadataResponse,
    Prediction,
    PredictRequest,
    PredictResponse,
    validate_instances,
)

logger = logging.getLogger(__name__)

CONFIG = ServingConfig.from_env()
_TIMEOUT_S = 30

# GET routes live in a mounted FastAPI app: @bentoml.api routes accept POST only.
metadata_app = FastAPI(title="fluxo metadata", docs_url=None, redoc_url=None, openapi_url=None)


class JsonBodyMiddleware:
    """Read every ``POST /predict`` body as JSON, whatever its Content-Type says.

    BentoML picks a parser by Content-Type: ``curl -d`` sends a form type, so a
    valid JSON body came back "instances: Field required", and a multipart type
    without a boundary made BentoML answer 500. The API takes JSON only, so a
    non-JSON body now fails as invalid JSON, with 400.
    """

    def __init__(self, app: Any, path: str = "/predict") -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == self.path:
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def _show_our_logs() -> None:
    """Let this package's INFO lines through BentoML's server logging, whose root level is WARNING.

    Called from the services' constructors, which run only inside server processes.
    """
    ours = logging.getLogger("serving")
    if ours.level == logging.NOTSET and logging.getLogger().getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)


@bentoml.service(
    name="fluxo_model",
    workers=1,
    traffic={"timeout": _TIMEOUT_S},
    # BentoML 1.4.39's caller-side client recycles its session every 100 requests or
    # 300 s and closes it under requests still in flight (500s under load); over a
    # local socket there is nothing to gain from recycling, so it never happens.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9},
)
class FluxoModel:
    """Owns the ONNX Runtime session; ``predict`` receives the merged batch."""

    def __init__(self) -> None:
        _show_our_logs()
        self.model = OnnxModel(CONFIG.require_model_dir(), threads=CONFIG.ort_threads)
        logger.info("serving %s", self.model.describe())

    @bentoml.api(
        batchable=CONFIG.max_batch_size > 1,
        max_batch_size=max(CONFIG.max_batch_size, 2),  # BentoML insists on > 1 even when batching is off
        max_latency_ms=CONFIG.max_latency_ms,
    )
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (n, n_labels) for a float32 batch (n, *input_shape) merged from many requests."""
        logger.debug("model batch of %d instances", len(batch))
        return self.model.predict_proba(batch)

    @bentoml.api
    def predict_direct(self, batch: np.ndarray) -> np.ndarray:
        """Like ``predict`` for a request that is a full batch already, run as it comes."""
        return self.model.predict_proba(batch)

    @bentoml.api
    def info(self) -> dict[str, Any]:
        """Public metadata plus the execution provider, which only this process knows."""
        return self.model.info()


@bentoml.service(
    name="fluxo",
    workers=1,
    traffic={"timeout": _TIMEOUT_S},
    envs=[{"name": MODEL_DIR_ENV}],
)
@bentoml.asgi_app(metadata_app, path="/")
class Fluxo:
    """Public API: ``POST /predict`` and ``GET /metadata``."""

    model = bentoml.depends(FluxoModel)

    def __init__(self) -> None:
        _show_our_logs()
        # Only metadata here: the session lives in FluxoModel's process.
        self.metadata = load_metadata(CONFIG.require_model_dir())
        self.input_shape: tuple[int, ...] = tuple(self.metadata["input_shape"])
        self.labels: list[str] = list(self.metadata["labels"])
        version = self.metadata.get("model_version")
        self.model_version: str | None = None if version is None else str(version)
        self._info: dict[str, Any] | None = None

    async def _model_call(self, name: str, *args: Any) -> Any:
        """Call FluxoModel without blocking the event loop, whether it is remote or in-process."""
        if hasattr(self.model, "to_async"):
            return await getattr(self.model.to_async, name)(*args)
        import anyio  # in-process (tests without `bentoml serve`): the plain method, in a thread

        return await anyio.to_thread.run_sync(getattr(self.model, name), *args)

    @bentoml.api(route="/predict", input_spec=PredictRequest)
    async def predict(self, instances: list[Any]) -> PredictResponse:
        """Classify instances; each must be a nested list shaped like GET /metadata's input_shape."""
        try:
            batch = validate_instances(instances, self.input_shape, CONFIG.max_instances)
        except InvalidInstances as error:
            # A returned response keeps the body {"error": ...}; a raised InvalidArgument
            # would arrive as [{"error": ...}] and log a traceback per client mistake.
            logger.info("rejected /predict request: %s", error)
            return JSONResponse({"error": str(error)}, status_code=400)  # type: ignore[return-value]
        # A request larger than a model batch gains nothing from the dispatcher, which would
        # split it and refuse (503) the rest once the whole outlasts the latency budget.
        method = "predict" if len(batch) <= CONFIG.max_batch_size else "predict_direct"
        probabilities = np.asarray(await self._model_call(method, batch))
        best = probabilities.argmax(axis=1)
        return PredictResponse(
            predictions=[
                Prediction(label=self.labels[int(i)], probabilities=row.tolist())
                for i, row in zip(best, probabilities)
            ],
            model_version=self.model_version,
        )

    @metadata_app.get("/metadata", response_model=MetadataResponse)
    async def metadata_view(self) -> dict[str, Any]:
        """Model identity, data version, input contract, test metrics and the provider in use."""
        if self._info is None:
            self._info = dict(await self._model_call("info"))
        return self._info


Fluxo.add_asgi_middleware(JsonBodyMiddleware)
