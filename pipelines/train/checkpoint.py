"""Checkpoints written atomically, so a crash mid-write never leaves a corrupt file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models import build_model
from models.preprocess import inner_input_shape, wrap_model
from pipelines.errors import FluxoError


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write to a temporary file, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True``: a checkpoint is data, never code to execute."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise FluxoError(f"checkpoint {path}: no such file") from error
    except Exception as error:  # torch raises several types for truncated or foreign files.
        raise FluxoError(f"checkpoint {path}: unreadable ({error}); retrain or pick another run") from error


def model_payload(model: nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    """What it takes to rebuild the model anywhere: registry name, config, shape, labels, weights."""
    return {"spec": spec, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def rebuild_model(payload: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model with its preprocessing (:func:`models.preprocess.wrap_model`) from
    :func:`model_payload` output, in eval mode."""
    spec = payload["spec"]
    outputs = spec.get("num_outputs", len(spec["labels"]))
    inner = build_model(spec["architecture"], inner_input_shape(spec), outputs, **spec["params"])
    model = wrap_model(inner, spec)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), spec


# --- Resumable training state -------------------------------------------------------------

STATE_PATTERN = "state-*.pt"


def rng_states() -> dict[str, Any]:
    """Every global RNG a training step can touch: Python, NumPy, torch CPU and CUDA."""
    import random

    import numpy as np

    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        # As a tensor: weights_only loading refuses raw NumPy arrays.
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(_as_tuple(states["python"]))
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype("uint32"), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_state(directory: Path, global_step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state-<step>.pt`` atomically and keep only the newest ``keep`` of them."""
    directory = Path(directory)
    path = save_checkpoint(directory / f"state-{global_step:09d}.pt", state)
    for old in sorted(directory.glob(STATE_PATTERN))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest_state(directory: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest state that loads; a truncated or corrupt newest one falls back to the one before."""
    import logging

    for path in sorted(Path(directory).glob(STATE_PATTERN), reverse=True):
        try:
            return load_checkpoint(path), path
        except FluxoError as error:
            logging.getLogger(__name__).warning("skipping %s: %s", path, error)
    return None
