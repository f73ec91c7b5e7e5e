"""Name → builder registry, so a run's model can be rebuilt from its saved name and config."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture and the kind of input it accepts ("image" or "sequence")."""

    name: str
    builder: Builder
    input_kind: str
    summary: str

    def parameters(self) -> dict[str, Any] | None:
        """The config keys the builder takes and their defaults; None when it takes any (``**config``)."""
        taken = list(inspect.signature(self.builder).parameters.values())[2:]  # after input_shape, num_classes
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in taken):
            return None
        return {p.name: p.default for p in taken}


MODEL_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, input_kind: str) -> Callable[[Builder], Builder]:
    """Register ``builder(input_shape, num_classes, **config)`` under ``name``."""

    def decorate(builder: Builder) -> Builder:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        summary = (builder.__doc__ or "").strip().splitlines()[0] if builder.__doc__ else ""
        MODEL_REGISTRY[name] = ModelSpec(name, builder, input_kind, summary)
        return builder

    return decorate


def expect_rank(name: str, input_shape: tuple[int, ...], rank: int, layout: str) -> None:
    """Fail at build time, naming the layout, rather than with a shape error deep in forward."""
    if len(input_shape) != rank:
        raise ValueError(f"model {name!r} expects input shaped {layout}, got {input_shape}")


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, **config: Any
) -> nn.Module:
    """Build a registered model; unknown names and config keys fail with the valid choices."""
    if name not in MODEL_REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODEL_REGISTRY))}")
    _check_config(MODEL_REGISTRY[name], config)
    try:
        return MODEL_REGISTRY[name].builder(tuple(input_shape), num_classes, **config)
    except TypeError as error:
        raise TypeError(f"bad config for model {name!r}: {error}") from error


def _check_config(spec: ModelSpec, config: dict[str, Any]) -> None:
    """An unknown key is named with the closest real one and every key the model takes, with its default."""
    known = spec.parameters()
    unknown = sorted(set(config) - set(known)) if known is not None else []
    if not unknown:
        return
    close = difflib.get_close_matches(unknown[0], list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    takes = ", ".join(f"{key}={default!r}" for key, default in known.items()) or "no parameters"
    raise TypeError(f"model {spec.name!r} takes no parameter {', '.join(map(repr, unknown))}{hint}; "
                    f"its parameters (with defaults): {takes}")
