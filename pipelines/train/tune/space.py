"""The search space: dotted setting paths, checked before a study starts and sampled for each trial.

A key of ``tune.space`` is a dotted path into the settings (``train.learning_rate``,
``model.params.channels``); this module turns sampled values into validated settings,
refuses a space that could only fail later (an unknown key, a refused value, a
condition that never holds) and samples it, conditional keys only when their ``when`` holds.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipelines.errors import FluxoError
from pipelines.settings.tune import ParamSpace, TuneSettings

if TYPE_CHECKING:
    import optuna

    from pipelines.settings import FluxoSettings


def settings_dict(settings: FluxoSettings) -> dict[str, Any]:
    """The settings as a tree to set dotted paths in, without their ``tune`` section."""
    # The tune section stays out: a trial's settings are a training configuration, and
    # validating them must not validate (and so recurse into) the search space again.
    dumped = settings.model_dump()
    dumped.pop("tune", None)
    return dumped


def set_path(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise FluxoError(
                f"tune.space[{key!r}]: {'.'.join(parts[: depth + 1])} is a single setting, not a section; "
                "keys are dotted setting paths such as train.learning_rate or model.params.channels"
            )
        node = child
    node[parts[-1]] = value


def get_path(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def apply_params(settings: FluxoSettings, params: dict[str, Any]) -> FluxoSettings:
    """``settings`` with each dotted key set to its value, validated as a whole."""
    from pipelines.settings import FluxoSettings

    tree = settings_dict(settings)
    for key, value in params.items():
        set_path(tree, key, value)
    try:
        return FluxoSettings.model_validate(tree)
    except ValidationError as error:
        raise FluxoError(f"settings {params}: {_problems(error)}") from error


def _problems(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())


def _when_holds(when: dict[str, Any] | None, chosen: dict[str, Any], base: dict[str, Any]) -> bool:
    for key, wanted in (when or {}).items():
        current = chosen[key] if key in chosen else get_path(base, key)
        if current not in (wanted if isinstance(wanted, list) else [wanted]):
            return False
    return True


def validate_space(settings: FluxoSettings, tune_settings: TuneSettings) -> None:
    """Fail before any training when a space key is not a setting or a value would be refused.

    Each key is applied, at every candidate value (each choice, both ends of a range), to
    ``settings`` and the result validated like a preset; ``model.params.*`` keys are
    also checked against the model builder's arguments.
    """
    space = tune_settings.space
    if not space:
        raise FluxoError(
            "tune.space is empty: add the settings to search to the preset's tune section, e.g. "
            "tune: {space: {train.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}}}"
        )
    base = settings_dict(settings)
    builder_arguments = _builder_arguments(settings.model.name) if "model.name" not in space else None
    for index, (key, spec) in enumerate(space.items()):
        _check_conditions(key, index, spec, space, base)
        if key.startswith("model.params.") and builder_arguments is not None:
            name = key.removeprefix("model.params.")
            if name not in builder_arguments:
                raise FluxoError(
                    f"tune.space[{key!r}]: model {settings.model.name!r} takes no argument {name!r}; "
                    f"it takes {', '.join(sorted(builder_arguments))}"
                )
        _check_candidates(key, spec, base)


def _check_conditions(key: str, index: int, spec: ParamSpace, space: dict[str, ParamSpace],
                      base: dict[str, Any]) -> None:
    """A ``when`` must name another key searched earlier, at a value it can take, or a setting at a valid value."""
    from pipelines.settings import FluxoSettings

    for condition, wanted in (spec.when or {}).items():
        values = wanted if isinstance(wanted, list) else [wanted]
        if condition == key:
            raise FluxoError(f"tune.space[{key!r}].when: a setting cannot depend on itself")
        if condition in space:
            if list(space).index(condition) > index:
                raise FluxoError(
                    f"tune.space[{key!r}].when names {condition}, which is searched later; "
                    f"move {condition} above {key} in the space"
                )
            if not any(space[condition].contains(v) for v in values):
                raise FluxoError(
                    f"tune.space[{key!r}].when: {condition} is never {wanted!r} in the space, so {key} "
                    "would never be searched"
                )
            continue
        for value in values:
            tree = copy.deepcopy(base)
            set_path(tree, condition, value)
            try:
                FluxoSettings.model_validate(tree)
            except ValidationError as error:
                raise FluxoError(
                    f"tune.space[{key!r}].when: {condition}={value!r} is not a setting and value "
                    f"({_problems(error)})"
                ) from error


def _check_candidates(key: str, spec: ParamSpace, base: dict[str, Any]) -> None:
    """Every value the key can take (each choice, both ends of a range) validates as settings."""
    from pipelines.settings import FluxoSettings

    # Conditions are applied with the value, so a conditional value is checked in the
    # company it will keep (first allowed value of each condition).
    context = {
        c: (w[0] if isinstance(w, list) and w else w) for c, w in (spec.when or {}).items()
    }
    for value in spec.candidates():
        tree = copy.deepcopy(base)
        for path, fixed in {**context, key: value}.items():
            set_path(tree, path, fixed)
        try:
            FluxoSettings.model_validate(tree)
        except ValidationError as error:
            problems = _problems(error)
            unknown = any(e["type"] == "extra_forbidden" for e in error.errors())
            hint = (
                "not a setting; keys are dotted setting paths such as train.learning_rate, "
                "train.optimizer or model.params.channels (see pipelines/settings)"
                if unknown
                else f"the value {value!r} is refused"
            )
            raise FluxoError(f"tune.space[{key!r}]: {hint} ({problems})") from error


def _builder_arguments(model_name: str) -> set[str] | None:
    """Keyword arguments a registered builder takes, or None when it takes any (``**config``)."""
    from models import MODEL_REGISTRY

    if model_name not in MODEL_REGISTRY:
        return None  # training reports the unknown model with the registered names
    parameters = MODEL_REGISTRY[model_name].parameters()
    return None if parameters is None else set(parameters)


def suggest(trial: optuna.trial.Trial, space: dict[str, ParamSpace], base: FluxoSettings) -> dict[str, Any]:
    """Sample the space in order; a conditional key is sampled only when its ``when`` holds."""
    tree = settings_dict(base)
    chosen: dict[str, Any] = {}
    for key, spec in space.items():
        if not _when_holds(spec.when, chosen, tree):
            continue
        if spec.choices is not None:
            chosen[key] = trial.suggest_categorical(key, spec.choices)
        elif spec.integer:
            chosen[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)  # type: ignore[arg-type]
        else:
            chosen[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)  # type: ignore[arg-type]
    return chosen


__all__ = ["apply_params", "get_path", "set_path", "settings_dict", "suggest", "validate_space"]
