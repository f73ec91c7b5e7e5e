"""Logging for the ``fluxo`` command, configured once here: library code only calls ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import os

from pipelines.redact import redact

# Libraries that narrate every step at INFO; their warnings still come through.
NOISY_LOGGERS = ("dvc", "onnx_ir", "onnxscript", "torch.onnx", "mlflow", "alembic", "httpx", "prefect.events")
# A warnings filter (action:message:category:module) for the MLflow UI's workers; see configure_logging.
MLFLOW_UI_WSGI_WARNING = "ignore:starlette.middleware.wsgi is deprecated:UserWarning:mlflow.server.fastapi_app"


def configure_logging(verbose: bool) -> None:
    """Configured once, here: library code only ever calls ``logging.getLogger(__name__)``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for handler in logging.getLogger().handlers:  # whoever logs a URI (DVC, MLflow, a traceback): no password
        if not isinstance(handler.formatter, _Redacting):
            handler.setFormatter(_Redacting(handler.formatter))
    # MLflow draws a progress bar for every artifact download, even a single small file, and
    # configures its own logger on import, so its level is set through its variable.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The embedded Prefect server and BentoML report usage home; offline, that only logs errors.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives its embedded server 20 s to start; on a busy 2-core machine (a training run
    # beside it, a test suite) it can need more, and "Timed out while attempting to connect to
    # ephemeral Prefect API server" would end a run that had nothing wrong with it.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    # MLflow's UI server (`fluxo ui`) imports Starlette's deprecated WSGI middleware in each of its
    # four workers: four StarletteDeprecationWarnings nobody here can act on. The workers are other
    # interpreters, so the filter goes through the environment; it matches that one import only.
    inherited = os.environ.get("PYTHONWARNINGS", "")
    if MLFLOW_UI_WSGI_WARNING not in inherited.split(","):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (inherited, MLFLOW_UI_WSGI_WARNING)))
    # fluxo's own lines (the gate's decision, the baseline warning) belong in the flow run's logs
    # in Prefect's UI beside Prefect's; outside a flow run they only go to the terminal.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipelines,models")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    logging.getLogger("prefect").addFilter(_TemporaryServerNote())
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        # The ONNX exporter warns that torchvision's detection ops are unavailable; no model here uses them.
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


class _TemporaryServerNote(logging.Filter):
    """Prefect's "Starting temporary server" line ends with a link to its docs on every run; it says
    instead where the runs are kept and how to see them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Starting temporary server on"):
            from pipelines.ui import prefect_home

            first = record.msg.split("\n", 1)[0]
            record.msg = (f"{first} for this run (flow runs are kept in {prefect_home()}; "
                          "`fluxo ui --prefect` shows them)")
        return True


class _Redacting(logging.Formatter):
    """The handler's own format, every URI in the finished line (traceback included) redacted."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))
