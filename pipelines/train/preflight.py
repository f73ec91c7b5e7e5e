"""What a run will train, settled from the settings and the data before anything trains.

The model (chosen from the data when unset), the task, the input statistics and the
checks a run can fail: kept apart from ``pipelines.train.run`` so that callers which
only decide (the CLI checking a preset against ``data/``, tuning choosing the model
once for every trial) need not read the training code, and so the train step stays
the sequence of its stages.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from models import MODEL_REGISTRY
from pipelines.data.store import Dataset, Split
from pipelines.errors import FluxoError
from pipelines.settings import FluxoSettings, ModelSettings
from pipelines.train.losses import Task, build_task

# The train step's logger: the model choice is part of its narrative, and callers filter or
# quieten it under that name (pipelines/train/auto.py, Prefect's flow logs).
log = logging.getLogger("pipelines.train.run")


def resolve_task(settings: FluxoSettings, dataset: Dataset) -> Task:
    """The task by setting, or by the dataset's targets when ``auto``; refuses contradictions."""
    name = settings.train.task
    if name == "auto":
        name = "regression" if dataset.task == "regression" else "multiclass"
    if (name == "regression") != (dataset.task == "regression"):
        raise FluxoError(
            f"train.task={name} but dataset {dataset.manifest['name']!r} has {dataset.task} targets; "
            "use train.task=auto or re-ingest with data.sequence.target set"
        )
    if name == "binary" and len(dataset.labels) != 2:
        raise FluxoError(f"train.task=binary needs two classes; {dataset.manifest['name']!r} has {len(dataset.labels)}")
    if name == "multilabel":
        raise FluxoError("train.task=multilabel needs multi-hot targets, which ingest does not produce yet")
    if name == "regression" and settings.train.monitor == "val_accuracy":
        raise FluxoError("train.monitor=val_accuracy means nothing for regression; use train.monitor=val_loss")
    options = dict(settings.train.task_options)
    if name == "multiclass":
        options.setdefault("num_classes", len(dataset.labels))
    return build_task(name, **options)


def model_spec(settings: FluxoSettings, dataset: Dataset, mean: float | list[float], std: float | list[float],
               task: Task) -> dict[str, Any]:
    """Everything needed to rebuild the network; saved in checkpoints, MLflow and export metadata.

    A table's spec also holds its columns with the training split's statistics (``table``),
    from which models/preprocess.py builds the encoding in front of the network.
    """
    table = table_statistics(dataset, task.name == "regression") if dataset.kind == "table" else None
    return {
        **({"table": table} if table is not None else {}),
        "input_kind": MODEL_REGISTRY[settings.model.name].input_kind,
        "task": task.name,
        "num_outputs": task.num_outputs(len(dataset.labels)),
        "architecture": settings.model.name,
        "params": dict(settings.model.params),
        "input_shape": list(dataset.input_shape),
        "labels": dataset.labels,
        "mean": mean,
        "std": std,
        "dataset": dataset.manifest["name"],
        "kind": dataset.kind,
    }


def split_statistics(split: Split, chunk: int = 65_536) -> tuple[float, float]:
    """Mean and standard deviation over every value of a split, chunk by chunk (it may not fit in RAM)."""
    total, total_sq, count = 0.0, 0.0, 0
    for shard in split.shards:
        for start in range(0, len(shard), chunk):
            values = np.asarray(shard[start : start + chunk], dtype=np.float64)
            total += float(values.sum())
            total_sq += float(np.square(values).sum())
            count += values.size
    mean = total / max(count, 1)
    return mean, float(np.sqrt(max(total_sq / max(count, 1) - mean**2, 0.0)))


# A sequence's channels are scaled one by one when one scalar would leave them on scales this far apart
# (the ratio of their standard deviations), or their means further apart than the pooled deviation.
PER_CHANNEL_RATIO = 10.0


def input_statistics(dataset: Dataset, model_name: str | None = None) -> tuple[float | list[float], float | list[float]]:
    """The standardisation in front of the network: one mean and deviation over the training split,
    or, for a multichannel sequence whose channels are on different scales, one per channel.

    An accelerometer's channel in g beside a temperature in kelvin: one scalar would leave the
    first nearly constant. Tables are scaled column by column elsewhere (:func:`table_statistics`).
    """
    if dataset.kind == "table" and not reads_steps(model_name, dataset):
        return 0.0, 1.0
    train = dataset.splits["train"]
    mean, std = split_statistics(train)
    if dataset.kind != "sequence" or dataset.input_shape[0] < 2:
        return mean, std
    x = np.asarray(train.x, dtype=np.float64)  # (N, C, L); padding included, as the scalar statistics
    means, stds = x.mean(axis=(0, 2)), x.std(axis=(0, 2))
    spread = stds.max() / max(stds.min(), 1e-12)
    if spread <= PER_CHANNEL_RATIO and np.ptp(means) <= std:
        return mean, std
    log.info("per-channel scaling: the %d channels' standard deviations range from %.3g to %.3g, their means "
             "from %.3g to %.3g", len(means), stds.min(), stds.max(), means.min(), means.max())
    return [float(v) for v in means], [float(v) if v > 0 else 1.0 for v in stds]


def table_statistics(dataset: Dataset, regression: bool) -> dict[str, Any]:
    """The manifest's table schema with each number column's median, center and scale fitted on the
    training split (after imputing the median), and a regression target's mean and std.

    ``data.sequence.scaling``: standard (mean, standard deviation) or robust (median,
    interquartile range), recorded in the schema at ingest.
    """
    schema = dataset.manifest["preprocessing"]["table"]
    train = dataset.splits["train"]
    x = np.asarray(train.x, dtype=np.float64)
    columns = []
    for index, column in enumerate(schema["columns"]):
        column = dict(column)
        if column["type"] == "number":
            values = x[:, index]
            present = values[~np.isnan(values)]
            median = float(np.median(present)) if len(present) else 0.0
            filled = np.where(np.isnan(values), median, values)
            if schema.get("scaling") == "robust":
                low, high = np.percentile(filled, [25, 75])
                center, scale = median, float(high - low)
            else:
                center, scale = float(filled.mean()), float(filled.std())
            column.update(median=median, center=float(center), scale=scale if scale > 1e-12 else 1.0)
        columns.append(column)
    out = {**schema, "columns": columns}
    if regression:
        y = np.asarray(train.y, dtype=np.float64)
        out["target"] = {"mean": float(y.mean()), "std": float(y.std()) or 1.0}
    return out


def resolve_model(settings: FluxoSettings, dataset: Dataset) -> tuple[FluxoSettings, str | None]:
    """``settings`` with ``model.name`` filled in from the data when the user left it unset, and why.

    A name set anywhere (a preset, ``--set``, the environment) is kept as it is. Only an unset
    one is chosen here, at train time, because only the ingested dataset says what the model
    will see (an image folder's size is ``data.image.size``, a sequence's length the file's).
    The reason is ``None`` when nothing was chosen; the choice is logged once, here.
    """
    if settings.model.name is not None:
        return settings, None
    name, why = ModelSettings.default_for(dataset.kind, tuple(dataset.input_shape))
    reason = f"default for {why}"
    _check_params_fit_default(name, reason, settings.model.params, dataset.kind)
    log.info("model.name is unset: training %s, the %s; set model.name to choose another (`fluxo models`)",
             name, reason)
    model = settings.model.model_copy(update={"name": name})
    return settings.model_copy(update={"model": model}), reason


def _check_params_fit_default(name: str, reason: str, params: dict[str, Any], kind: str) -> None:
    """model.params given without model.name were meant for some model: say which ones take them.

    Without this the builder's TypeError would blame a model the user never named.
    """
    takes = MODEL_REGISTRY[name].parameters()
    unknown = sorted(set(params) - set(takes)) if takes is not None else []
    if not unknown:
        return
    fitting = [m for m, spec in sorted(MODEL_REGISTRY.items()) if spec.input_kind in (kind, "any")
               and ((args := spec.parameters()) is None or set(params) <= set(args))]
    hint = f"--set model.name={fitting[0]}" if fitting else "set model.name (`fluxo models`)"
    raise FluxoError(
        f"model.params {', '.join(unknown)} are not arguments of {name}, the {reason}, because model.name is "
        f"unset; name the model they are for: {hint}"
        + (f" (models that take them: {', '.join(fitting)})" if len(fitting) > 1 else "")
    )


def steps_allowed(dataset: Dataset) -> bool:
    """A table whose columns sequence models may read as steps (pipelines/data/table_file.py's ``as_steps``)."""
    return dataset.kind == "table" and bool(dataset.manifest.get("preprocessing", {}).get("table", {}).get("as_steps"))


def reads_steps(model_name: str | None, dataset: Dataset) -> bool:
    """A sequence model trained on a table's columns as steps (models/preprocess.py's ColumnsAsSteps)."""
    spec = MODEL_REGISTRY.get(model_name or "")
    return spec is not None and spec.input_kind == "sequence" and steps_allowed(dataset)


def check_model_fits_data(name: str, dataset: Dataset) -> None:
    if name not in MODEL_REGISTRY:
        raise FluxoError(f"model.name={name!r} is not registered; choose one of {', '.join(sorted(MODEL_REGISTRY))}")
    wanted = MODEL_REGISTRY[name].input_kind
    if reads_steps(name, dataset):
        return
    if wanted == "sequence" and dataset.kind == "table":
        raise FluxoError(
            f"model.name={name!r} reads sequences but data/ holds {dataset.manifest['name']!r} as a table (named "
            "columns, text or empty cells, or data.sequence.kind=table); pick a table model (tabular_mlp, linear, mlp) "
            "or, if its columns are steps, ingest it with --set data.sequence.kind=sequence"
        )
    if wanted not in ("any", dataset.kind):
        raise FluxoError(
            f"model.name={name!r} takes {wanted} inputs but dataset {dataset.manifest['name']!r} is a {dataset.kind} "
            "dataset; pick a matching preset under configs/"
        )


def check_trainable(settings: FluxoSettings, dataset: Dataset) -> Task:
    """Every check a run can fail before it starts: model against data, task against targets.

    Run before an MLflow run is opened, so a refused run leaves nothing behind.
    """
    check_model_fits_data(settings.model.name, dataset)
    return resolve_task(settings, dataset)


def check_data_matches(wanted: str | None, dataset: Dataset, source: str) -> None:
    """A preset that names another dataset than ``data/`` holds is a mistake, not a reason to train on data/."""
    from pipelines.settings import dataset_display_name

    if wanted is None or dataset_display_name(wanted) == dataset.manifest["name"]:
        return
    raise FluxoError(
        f"{source} trains on data.dataset={wanted!r} but data/ holds {dataset.manifest['name']!r}; "
        f"run `fluxo data ingest{' --config ' + source if source.endswith(('.yaml', '.yml')) else ''}` first "
        "(or `fluxo run`, which ingests), or train without that preset"
    )


__all__ = ["check_data_matches", "check_trainable", "input_statistics", "model_spec", "resolve_model", "resolve_task",
           "split_statistics", "table_statistics"]
