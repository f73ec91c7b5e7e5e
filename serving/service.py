"""The BentoML service: ``bentoml serve serving.service:Fluxo`` with ``FLUXO_MODEL_DIR`` set.

One service, one process per worker; each worker loads the model into its own
ONNX Runtime session and batches concurrent requests in-process
(serving/batching.py). The routes are a FastAPI app (serving/app.py, routers in serving/routes_*.py) mounted
at ``/``; BentoML contributes the server and its workers, ``/healthz``,
``/livez``, ``/readyz`` and the request timeout (504); ``/metrics`` and the
concurrency limit (429) are fluxo's (serving/metrics.py, serving/admission.py). SIGTERM makes uvicorn stop accepting, finish the
requests in flight (the batcher keeps running for them), then exit.

Worker count and limits are decorator arguments, so the configuration is read
at import time; every BentoML process imports this module with the same environment.
"""

from __future__ import annotations

import logging

import bentoml

from serving import API_KEY_ENV, MODEL_DIR_ENV, ServingConfig
from serving.app import create_app
from serving.fastpath import InferenceFastPath
from serving.server import ModelServer

logger = logging.getLogger(__name__)

CONFIG = ServingConfig.from_env()
PREDICTION_ROUTES = ["/predict", "/v2/models/"]

app = create_app()


def _show_our_logs() -> None:
    """Let this package's INFO lines through BentoML's server logging, whose root level is WARNING."""
    ours = logging.getLogger("serving")
    if ours.level == logging.NOTSET and logging.getLogger().getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)


_service_config: dict = {
    "workers": CONFIG.workers,
    # The timeout (504) is BentoML's; the concurrency limit (429) is fluxo's own (serving/admission.py, over_capacity):
    # BentoML's took a semaphore per request. BentoML cannot turn its timeout off (it takes a positive number).
    "traffic": {"timeout": CONFIG.timeout_s},
    # One log line per request costs more CPU than the model run on a small box; the
    # request counters and latency histograms on /metrics say the same in aggregate.
    "logging": {"access": {"enabled": False}},
    # fluxo counts and times every request itself (serving/metrics.py, GET /metrics); BentoML's
    # middleware counted them again at more CPU per request than the model run (serving/README.md).
    "metrics": {"enabled": False},
}
if not CONFIG.trace_requests:
    # BentoML wraps every request in OpenTelemetry spans, exported nowhere unless tracing
    # is configured; skipping them on the prediction routes saves CPU on each request.
    _service_config["tracing"] = {"excluded_urls": PREDICTION_ROUTES}


@bentoml.service(name="fluxo", envs=[{"name": MODEL_DIR_ENV}], **_service_config)
@bentoml.asgi_app(app, path="/")
class Fluxo:
    """Loads the model in each worker; the routes live in serving/routes_*.py (assembled by serving/app.py), POST /predict's fast path in fastpath.py."""

    def __init__(self) -> None:
        _show_our_logs()
        self.server = ModelServer(CONFIG)
        app.state.server = self.server
        if CONFIG.api_key:
            logger.info("prediction routes need the API key from %s", API_KEY_ENV)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.server.close()


# Inside BentoML's timeout and concurrency limit, outside its context middleware and the mount (fastpath.py).
Fluxo.add_asgi_middleware(InferenceFastPath, state=app.state)
