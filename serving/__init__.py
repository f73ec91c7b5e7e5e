"""fluxo's REST service: BentoML on ONNX Runtime, fed from a model directory.

This package never imports ``pipelines`` or torch, so a serving image needs only
onnxruntime, numpy and bentoml. Importing it reads configuration and nothing
else; onnxruntime and bentoml load only in the modules that need them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MODEL_DIR_ENV = "FLUXO_MODEL_DIR"


class ServingError(Exception):
    """A user-fixable serving problem: the message names the file, field or value and the fix.

    ``serving`` cannot import ``pipelines.errors.FluxoError``, so it has its own
    type; the CLI catches both the same way.
    """


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ServingError(f"environment variable {name}={raw!r}: expected an integer, for example {default}") from None
    if value < minimum:
        raise ServingError(f"environment variable {name}={value}: must be at least {minimum}")
    return value


@dataclass(frozen=True)
class ServingConfig:
    """Every serving setting, read from ``FLUXO_*`` environment variables.

    The service runs in processes that BentoML spawns, so the environment is the
    one channel that reaches all of them; this class is the single home of the
    names and defaults.
    """

    model_dir: Path | None
    """``FLUXO_MODEL_DIR``: directory holding ``model.onnx`` and ``metadata.json``."""
    ort_threads: int = 1
    """``FLUXO_ORT_THREADS``: ONNX Runtime intra-op threads; 1 suits small CPU boxes."""
    max_instances: int = 1024
    """``FLUXO_MAX_INSTANCES``: most instances accepted in one request."""
    max_batch_size: int = 64
    """``FLUXO_MAX_BATCH_SIZE``: most instances per model run; larger requests are split; 1 turns batching off."""
    max_latency_ms: int = 100
    """``FLUXO_MAX_LATENCY_MS``: adaptive batching latency budget in milliseconds.

    In BentoML 1.4 this is not the batching window (that adapts on its own) but
    the most a request may wait in the model's queue before it is refused with
    503. On a 2-core box with 32 concurrent clients, 20 ms refused about a fifth
    of requests and 100 ms none, with no change to single-request latency.
    """

    @classmethod
    def from_env(cls) -> ServingConfig:
        """Read the settings; a malformed value raises :class:`ServingError` naming the variable."""
        raw_dir = os.environ.get(MODEL_DIR_ENV, "").strip()
        return cls(
            model_dir=Path(raw_dir) if raw_dir else None,
            ort_threads=_env_int("FLUXO_ORT_THREADS", cls.ort_threads, 1),
            max_instances=_env_int("FLUXO_MAX_INSTANCES", cls.max_instances, 1),
            max_batch_size=_env_int("FLUXO_MAX_BATCH_SIZE", cls.max_batch_size, 1),
            max_latency_ms=_env_int("FLUXO_MAX_LATENCY_MS", cls.max_latency_ms, 1),
        )

    def require_model_dir(self) -> Path:
        """The model directory, or a :class:`ServingError` saying how to set it."""
        if self.model_dir is None:
            raise ServingError(
                f"{MODEL_DIR_ENV} is not set: point it at a directory with model.onnx and "
                "metadata.json (written by the export step), or start the service with `fluxo serve`"
            )
        return self.model_dir


__all__ = ["MODEL_DIR_ENV", "ServingConfig", "ServingError"]
