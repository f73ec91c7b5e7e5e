"""A study's outcome and the configuration it found, written as a preset ``fluxo run --config`` trains.

The preset says only what differs from the defaults (plus what it must always name),
so it reads like a hand-written one and stays valid where stores live elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipelines.settings import merge_tree
from pipelines.train.tune.space import get_path, set_path

if TYPE_CHECKING:
    from pipelines.settings import FluxoSettings

# Where a run keeps its stores, not what it trains: a written preset leaves these to the
# environment of whoever runs it (presets outrank FLUXO_* variables).
_LOCATION_KEYS = {"data": {"dvc_remote", "dvc_remote_endpoint_url"}, "tracking": {"tracking_uri"}}
# A preset says what it trains even where that is the default.
_ALWAYS_WRITTEN = (("data", "dataset"), ("model", "name"))


@dataclass
class TuneResult:
    best_params: dict[str, Any]
    best_value: float
    best_settings: FluxoSettings
    parent_run_id: str
    trials: list[dict[str, Any]]
    metric: str = "val_loss"
    best_trial: int = 0
    best_run_id: str = ""
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


def format_value(value: Any) -> str:
    """A value as ``--set`` reads it back (YAML): ``1.0e-05`` stays a float, ``adam`` a string."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("...").strip()


def best_overrides(result: TuneResult) -> list[str]:
    """The best parameters as ``key=value`` strings for ``--set`` on top of the tuned preset."""
    return [f"{key}={format_value(value)}" for key, value in result.best_params.items()]


def preset_dict(settings: FluxoSettings, keep: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """What a preset must say to reproduce ``settings``: the non-default values, minus store locations.

    The dataset, the model name and each dotted key in ``keep`` (the tuned ones) are
    written even where they equal today's default, so the preset keeps its meaning if a
    default changes.
    """
    from pipelines.settings import FluxoSettings

    exclude: dict[str, Any] = {section: set(keys) for section, keys in _LOCATION_KEYS.items()}
    if "tune" in FluxoSettings.model_fields:
        exclude["tune"] = True
    changed = settings.model_dump(mode="json", exclude_defaults=True, exclude=exclude)
    full = settings.model_dump(mode="json")
    preset: dict[str, Any] = {}
    for path in [".".join(p) for p in _ALWAYS_WRITTEN] + list(keep):
        value = get_path(full, path)
        if value is not None:
            set_path(preset, path, value)
    preset = _ordered_like(merge_tree(preset, changed), full)
    return {section: values for section, values in preset.items() if values}


def _ordered_like(tree: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``tree``'s keys in the order ``reference`` (a full dump) has them: sections read as in config.py."""
    order = {key: index for index, key in enumerate(reference)}
    ordered = sorted(tree, key=lambda key: order.get(key, len(order)))
    return {
        key: _ordered_like(tree[key], reference[key])
        if isinstance(tree[key], dict) and isinstance(reference.get(key), dict)
        else tree[key]
        for key in ordered
    }


def write_best_preset(result: TuneResult, path: Path) -> Path:
    """Write the best trial's configuration as a preset: ``fluxo run --config PATH`` trains and exports it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Best of fluxo tune study {result.parent_run_id}: {result.metric} {result.best_value:.4f} "
        f"in trial {result.best_trial} (run {result.best_run_id}).\n"
        f"# Tuned: {', '.join(best_overrides(result))}\n"
        f"# Train, export and register it: fluxo run --config {path}\n"
    )
    body = yaml.safe_dump(preset_dict(result.best_settings, list(result.best_params)), sort_keys=False)
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(header + body)
    scratch.replace(path)
    return path


__all__ = ["TuneResult", "best_overrides", "format_value", "preset_dict", "write_best_preset"]
