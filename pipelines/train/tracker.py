"""What the training engine reports to. MLflow is one implementation, a no-op another,
so the engine (and its benchmarks) run where MLflow is not installed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_figure(self, figure: Any, artifact_file: str) -> None: ...
    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None: ...
    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


class NullTracker:
    """Discards everything; for runs that only need the trained weights."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        pass

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        pass

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


class MLflowTracker:
    """Logs to the active MLflow run."""

    def __init__(self) -> None:
        import mlflow

        self._mlflow = mlflow

    def log_params(self, params: dict[str, Any]) -> None:
        # MLflow params are strings of at most 6,000 characters; structured values go in as JSON.
        self._mlflow.log_params(
            {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in params.items()}
        )

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self._mlflow.log_figure(figure, artifact_file)

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_dir)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self._mlflow.log_dict(data, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)


class PrefixedTracker(NullTracker):
    """Forwards metrics under a prefix (e.g. a retraining pass beside the main curves); drops the rest."""

    def __init__(self, inner: Tracker, prefix: str) -> None:
        self.inner = inner
        self.prefix = prefix

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.inner.log_metrics({f"{self.prefix}{k}": v for k, v in metrics.items()}, step=step)
