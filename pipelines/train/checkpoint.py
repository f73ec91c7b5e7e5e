"""Checkpoints written atomically, so a crash mid-write never leaves a corrupt file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models import build_model
from models.preprocess import Standardized
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


def model_payload(model: Standardized, spec: dict[str, Any]) -> dict[str, Any]:
    """What it takes to rebuild the model anywhere: registry name, config, shape, labels, weights."""
    return {"spec": spec, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def rebuild_model(payload: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a :class:`Standardized` model from :func:`model_payload` output, in eval mode."""
    spec = payload["spec"]
    inner = build_model(spec["architecture"], tuple(spec["input_shape"]), len(spec["labels"]), **spec["params"])
    model = Standardized(inner, spec["mean"], spec["std"])
    model.load_state_dict(payload["state_dict"])
    return model.eval(), spec
