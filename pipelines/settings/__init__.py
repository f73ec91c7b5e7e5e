"""Typed settings: one home per setting, importing only pydantic and PyYAML (never torch or a step).

Precedence, lowest first: the defaults below → ``FLUXO_*`` environment variables
(``FLUXO_TRAIN__EPOCHS=3``) → a YAML preset → ``--set key=value`` overrides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.errors import FluxoError
from pipelines.settings.augment import AugmentSettings
from pipelines.settings.data import (  # noqa: F401 - the data section, importable from here
    DataSettings, ImageSettings, SequenceSettings, ValidationSettings,
)
from pipelines.settings.data import Section
from pipelines.settings.auto import AutoSettings
from pipelines.settings.cluster import ClusterSettings
from pipelines.settings.monitor import MonitorSettings
from pipelines.settings.orchestration import OrchestrationSettings
from pipelines.settings.serve import ServeSettings
from pipelines.settings.tune import TuneSettings


class ModelSettings(Section):
    """Which registered architecture to build, and its constructor arguments.

    Left unset, the model is chosen when training starts, from what the data turned out to
    be (``default_for``): no single model suits 8×8 digits, 28×28 scans and sequences alike,
    and an image folder's size is only known once it is ingested.
    """

    # The models trained when name is unset: per size class, the one whose worst shortfall against
    # the best model of each dataset measured is smallest (bench/image_default.py, default training
    # settings, 3 seeds; bench/results/image_default.json). On 8×8 digits cnn2d is best. From 28×28
    # up, each cnn2d feature sees a 10×10-pixel patch before global pooling: it fell to 0.56 on a
    # 90-image folder and 0.79 at 64×64, resnet_small to 0.83 on that folder; lenet stays within 3.7
    # points of the best on every folder (resnet_small is 1-2.5 points better on 1,000+ images, at
    # 4-65× lenet's training time on a CPU). For sequences, and CSV tables read as sequences,
    # resnet1d: 0.98 on MNIST-1D where cnn1d reaches 0.65 and the GRU 0.54 at these settings.
    SMALL_IMAGE_SIDE: ClassVar[int] = 16
    SMALL_IMAGE_MODEL: ClassVar[str] = "cnn2d"
    IMAGE_MODEL: ClassVar[str] = "lenet"
    SEQUENCE_MODEL: ClassVar[str] = "resnet1d"
    # Tables: a feed-forward network on standardised columns (batch norm, dropout), the course's
    # first model; recurrent and convolutional models see an order the columns do not have.
    TABLE_MODEL: ClassVar[str] = "tabular_mlp"

    name: str | None = Field(
        None,
        description="Model name in the models registry (`fluxo models`), or auto: race a portfolio of them on the "
        "validation split and train the winner (auto.*). Unset: chosen from the ingested data when training "
        f"starts: {SMALL_IMAGE_MODEL} for images under {SMALL_IMAGE_SIDE} pixels a side, {IMAGE_MODEL} for larger "
        f"ones, {SEQUENCE_MODEL} for sequences, {TABLE_MODEL} for tables; the run logs the choice and records it as its model.name.",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the model builder.")

    @classmethod
    def default_for(cls, kind: str, input_shape: tuple[int, ...]) -> tuple[str, str]:
        """The model trained when ``name`` is unset, and why, in words for the log and the run.

        ``kind`` and ``input_shape`` are the ingested dataset's ((C, H, W) for images, (C, L)
        for sequences): the size a model sees is known only after ingest.
        """
        if kind == "image":
            shape = "x".join(str(s) for s in input_shape[-2:])
            if min(input_shape[-2:]) < cls.SMALL_IMAGE_SIDE:
                return cls.SMALL_IMAGE_MODEL, f"{shape} images (under {cls.SMALL_IMAGE_SIDE} pixels a side)"
            return cls.IMAGE_MODEL, f"{shape} images ({cls.SMALL_IMAGE_SIDE} pixels a side or more)"
        if kind == "sequence":
            return cls.SEQUENCE_MODEL, f"sequences of {input_shape[-1]} steps"
        if kind == "table":
            return cls.TABLE_MODEL, f"tables ({input_shape[-1]} columns)"
        raise FluxoError(f"no default model for {kind} data; set model.name (see `fluxo models`)")


class TrainSettings(Section):
    """Optimisation and early stopping."""

    epochs: int = Field(30, ge=1, description="Upper bound on epochs; early stopping usually ends sooner.")
    batch_size: int = Field(64, ge=1, description="Mini-batch size.")
    task: Literal["auto", "multiclass", "binary", "multilabel", "regression"] = Field(
        "auto",
        description="auto: regression for numeric targets, else multiclass (softmax + cross-entropy); binary and "
        "multilabel use sigmoid + BCE.",
    )
    task_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Task options: label_smoothing (multiclass), pos_weight/threshold (binary, multilabel), "
        "criterion mse|mae|huber and huber_delta (regression).",
    )
    optimizer: Literal["sgd", "adagrad", "adadelta", "rmsprop", "adam", "adamw"] = Field(
        "adam", description="Optimiser by name; adam's weight decay is L2 in the gradient, adamw's is decoupled."
    )
    learning_rate: float = Field(1e-3, gt=0, description="Learning rate (the peak for onecycle).")
    momentum: float = Field(0.0, ge=0, lt=1, description="Momentum for sgd and rmsprop.")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd with momentum only).")
    scheduler: Literal["none", "step", "cosine", "onecycle"] = Field("none", description="Learning-rate schedule.")
    scheduler_options: dict[str, Any] = Field(
        default_factory=dict, description="Schedule options, e.g. {step_size: 10, gamma: 0.1} or {pct_start: 0.3}."
    )
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay (not applied to biases and norm layers).")
    l1: float = Field(0.0, ge=0, description="L1 penalty weight added to the loss (sparser weights).")
    clip_norm: float | None = Field(None, gt=0, description="Clip the global gradient norm to this; None: off.")
    checkpoint_every: int = Field(
        0, ge=0, description="Also save the resumable state every N optimiser steps (0: at epoch ends only)."
    )
    patience: int = Field(5, ge=1, description="Epochs without improvement of `monitor` before stopping.")
    monitor: Literal["val_loss", "val_accuracy"] = Field(
        "val_loss",
        description="What early stopping and the best checkpoint follow. val_accuracy suits models whose "
        "validation loss rises from over-confidence while accuracy still improves.",
    )
    seed: int = Field(0, description="Seed for weights and batch order.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available.")
    checkpoint_dir: Path = Field(Path(".fluxo/checkpoints"), description="Where best/last checkpoints are written.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: autocast the forward pass to bfloat16 (fast on GPUs with tensor cores)."
    )
    compile: bool = Field(
        False,
        description="torch.compile the model's forward/backward and the optimiser step; the learning rate then "
        "lives in a tensor, so schedules change it without recompiling (pays off on long GPU runs).",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default",
        description="torch.compile mode for the model: reduce-overhead replays CUDA graphs on the GPU, "
        "removing the per-step launch cost that dominates small models.",
    )
    init_from: str | None = Field(
        None,
        description="Start from another model's weights (pipelines/train/warm_start.py): 'champion' (this "
        "dataset's registered champion when its architecture, model.params and input shape match, else from "
        "scratch; scheduled runs default to it), models:/NAME@ALIAS, models:/NAME/VERSION or an MLflow run id "
        "(these must match); labels that differ replace the head. 'scratch' or unset: random weights.",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Layers whose weights stay fixed, by name prefix in the model (e.g. features; "
        "`fluxo models show` lists them); usually with init_from.",
    )
    baseline_epochs: int = Field(
        10, ge=0,
        description="Epochs of the MLP baseline fitted beside every classification run (CPU, no augmentation, at "
        "most 20,000 training samples): its validation accuracy is logged as baseline_val_accuracy, and a model "
        "that does not beat it is warned about. 0: no baseline.",
    )
    retrain_on_train_val: bool = Field(
        False,
        description="After early stopping, retrain from scratch on train+val for the best epoch count "
        "(Goodfellow et al., algorithm 7.2): more data, same length of training.",
    )
    balance: Literal["none", "weighted", "oversample"] = Field(
        "none",
        description="Class imbalance: weighted draws batches with per-class weights; oversample repeats "
        "minority samples up to the majority count each epoch (pair it with augmentation).",
    )
    resident_limit_mb: int = Field(
        1024, ge=0, description="Datasets up to this size live on the training device; larger ones stream from disk."
    )


class TrackingSettings(Section):
    """MLflow tracking and registry."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; MLFLOW_TRACKING_URI wins, else SQLite under mlflow/."
    )
    experiment: str = Field("fluxo", description="MLflow experiment name.")
    registered_model: str | None = Field(
        None, description="Model Registry name; default fluxo-<dataset>, since only same-data models compete."
    )
    champion_alias: str = Field("champion", description="Alias that marks the served model version.")
    challenger_alias: str = Field(
        "challenger", description="Alias of a version that passed parity but not the gate: served as shadow or canary."
    )


class GateSettings(Section):
    """When a candidate takes the champion alias.

    Both sides are scored as served (ONNX Runtime, the exported graphs) on the candidate's
    test split, so the champion is re-scored whenever the data changed.
    """

    # The metric the gate decides on when gate.metric is auto, per task.
    DEFAULT_METRIC: ClassVar[dict[str, str]] = {"classification": "accuracy", "regression": "r2"}
    CLASSIFICATION_METRICS: ClassVar[tuple[str, ...]] = ("accuracy", "f1_macro", "precision_macro", "recall_macro")
    REGRESSION_METRICS: ClassVar[tuple[str, ...]] = ("r2", "mae", "rmse")
    LOWER_IS_BETTER: ClassVar[tuple[str, ...]] = ("mae", "rmse")

    metric: Literal["auto", "accuracy", "f1_macro", "precision_macro", "recall_macro", "r2", "mae", "rmse"] = Field(
        "auto", description="Served test metric that decides: auto is accuracy for classifiers and r2 for "
        "regression; mae and rmse (regression) win lower, the others higher.",
    )
    min_value: float | None = Field(
        None, description="The candidate's metric must reach this (for mae and rmse: stay at or below it); "
        "None: no floor.",
    )
    min_improvement: float = Field(
        0.0, description="Candidate minus champion must be at least this; 0 lets a tie promote, 0.01 asks a point more."
    )
    def metric_for(self, task: str) -> str:
        """The metric that decides for a dataset of ``task`` (classification or regression); a metric of
        the other kind of task is an error naming the ones that fit."""
        if self.metric == "auto":
            return self.DEFAULT_METRIC[task]
        fitting = self.REGRESSION_METRICS if task == "regression" else self.CLASSIFICATION_METRICS
        if self.metric not in fitting:
            raise FluxoError(f"gate.metric={self.metric} does not apply to a {task} model; use one of "
                             f"{', '.join(('auto',) + fitting)}")
        return self.metric

    max_class_regression: float | None = Field(
        None, ge=0, le=1,
        description="Largest drop in any one class's recall against the champion; None: not checked.",
    )
    beat_baselines: bool = Field(
        True, description="Refuse a candidate whose best validation score is below a baseline its run trained "
        "beside it (the MLP, and for a table the scaled linear model) by more than the validation split's sampling "
        "noise (two standard errors of the difference; 0.02 of R²): a model at chance level is never champion. The "
        "refused version becomes the challenger. false: not checked.",
    )


class ExportSettings(Section):
    """ONNX export, the parity check against PyTorch, and the lower-precision variants' gate."""

    export_dir: Path = Field(Path(".fluxo/export"), description="Where model.onnx and metadata.json are written.")
    opset: int = Field(18, ge=13, description="ONNX opset version.")
    parity_atol: float = Field(1e-4, gt=0, description="Max abs logit difference allowed between ONNX and PyTorch.")
    variants: list[Literal["int8", "fp16"]] = Field(
        ["int8", "fp16"],
        description="Lower-precision graphs export tries beside model.onnx (pipelines/export/variants.py): int8 "
        "(static quantization calibrated on training samples) and fp16 (only where a CUDA device serves); each is "
        "kept only when it passes the two limits below. [] turns variants off.",
    )
    max_accuracy_drop: float = Field(
        0.5, ge=0, le=100,
        description="Most test-accuracy points a variant may lose against the fp32 graph (0.5: 98.0% → 97.5%).",
    )
    min_speedup: float = Field(
        1.2, ge=0,
        description="Least speedup over the fp32 graph a variant must show at batch 32 (the batcher's default size) "
        "on the provider that will serve it; 0 keeps any variant accurate enough.",
    )

    @field_validator("variants")
    @classmethod
    def _each_once(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class FluxoSettings(BaseSettings):
    """All settings of one pipeline run."""

    model_config = SettingsConfigDict(env_prefix="FLUXO_", env_nested_delimiter="__", extra="forbid")

    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    auto: AutoSettings = Field(default_factory=AutoSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    orchestration: OrchestrationSettings = Field(default_factory=OrchestrationSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)

    @field_validator("data")
    @classmethod
    def _splits_leave_training_data(cls, data: DataSettings) -> DataSettings:
        if data.val_fraction + data.test_fraction >= 0.9:
            raise ValueError("data.val_fraction + data.test_fraction must leave at least 10% for training")
        if data.folds is not None and data.fold >= data.folds:
            raise ValueError(f"data.fold={data.fold} must be below data.folds={data.folds}")
        return data

    def registered_name_for(self, dataset_name: str) -> str:
        return self.tracking.registered_model or f"fluxo-{dataset_name}"

    def registered_model_name(self) -> str:
        """The registry entry this run's model joins: one per dataset unless set explicitly.

        A dataset given as a path is named after its folder or file stem.
        """
        return self.registered_name_for(dataset_display_name(self.data.dataset))

    def resolved_tracking_uri(self, root: Path) -> str:
        """MLFLOW_TRACKING_URI, then the setting, then the local SQLite store under ``mlflow/``."""
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.tracking.tracking_uri
        if uri:
            return uri
        return f"sqlite:///{(root / 'mlflow' / 'mlflow.db').resolve()}"


def dataset_display_name(dataset: str) -> str:
    """``digits`` stays ``digits``; ``/data/flowers/`` becomes ``flowers``, ``ecg.csv`` becomes ``ecg``."""
    if "/" not in dataset and "." not in dataset:
        return dataset
    return Path(dataset.rstrip("/")).stem or dataset


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.epochs=3`` → (["train", "epochs"], 3); the value is read as YAML so types survive."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise FluxoError(f"--set {text!r}: expected key=value, for example --set train.epochs=3")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def merge_tree(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` laid over ``base``, mapping by mapping (how a preset overrides the defaults)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_tree(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_preset(config: Path) -> dict[str, Any]:
    if not Path(config).is_file():
        raise FluxoError(f"config {config}: no such file; presets live in configs/*.yaml")
    try:
        loaded = yaml.safe_load(Path(config).read_text()) or {}
    except yaml.YAMLError as error:
        raise FluxoError(f"config {config}: not valid YAML ({error})") from error
    if not isinstance(loaded, dict):
        raise FluxoError(f"config {config}: expected a mapping of sections (data, model, train, ...)")
    return loaded


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted setting path (``train.epochs``, ``augment.image.rotation``), for suggestions."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, path + "."))
    return keys


def _suggestion(path: str) -> str:
    import difflib

    close = difflib.get_close_matches(path, _known_keys(FluxoSettings), n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def _has_path(tree: dict[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _blame(path: tuple[str, ...], config: Path | None, layer: dict[str, Any], overrides: list[str]) -> str:
    """Who set the offending value: the last --set for it, else the preset, else the environment."""
    dotted = ".".join(path)
    for text in reversed(overrides):
        key = text.partition("=")[0].strip()
        if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return f"--set {text}"
    if config is not None and _has_path(layer, path):
        return f"config {config}"
    env = "FLUXO_" + "__".join(part.upper() for part in path[:2])
    if env in os.environ:
        return f"environment variable {env}"
    return "settings"


def _explain(error: ValidationError, config: Path | None, layer: dict[str, Any], overrides: list[str]) -> str:
    problems = []
    for item in error.errors():
        path = tuple(str(p) for p in item["loc"])
        dotted = ".".join(path)
        source = _blame(path, config, layer, overrides)
        if item["type"] == "extra_forbidden":
            problems.append(f"{source}: {dotted} is not a setting{_suggestion(dotted)}")
        else:
            message = str(item["msg"]).removeprefix("Value error, ")
            problems.append(f"{source}: {dotted}: {message}" if dotted else f"{source}: {message}")
    return "; ".join(problems)


def explicit_dataset(config: Path | None, overrides: list[str] | None) -> tuple[str, str] | None:
    """(dataset, who named it) when a preset, ``--set`` or the environment names one, else None.

    Commands that train on whatever ``data/`` holds check it against this: a preset that
    names another dataset means the user expects that dataset, not the one on disk.
    """
    for text in reversed(overrides or []):
        key, _, value = text.partition("=")
        if key.strip() == "data.dataset":
            return str(yaml.safe_load(value)), f"--set {text}"
    if config is not None:
        data = _read_preset(config).get("data")
        if isinstance(data, dict) and data.get("dataset"):
            return str(data["dataset"]), str(config)
    if os.environ.get("FLUXO_DATA__DATASET"):
        return os.environ["FLUXO_DATA__DATASET"], "FLUXO_DATA__DATASET"
    return None


def load_settings(config: Path | None = None, overrides: list[str] | None = None) -> FluxoSettings:
    """Build settings from defaults, environment, an optional YAML preset and ``key=value`` overrides.

    A mistake names where it was made (the preset, the ``--set`` or the environment
    variable) and, for a misspelt key, the closest real setting.
    """
    overrides = list(overrides or [])
    layer: dict[str, Any] = _read_preset(config) if config is not None else {}
    try:
        base = FluxoSettings().model_dump()
    except ValidationError as error:
        raise FluxoError(_explain(error, None, {}, [])) from None
    merged = merge_tree(base, layer)
    for text in overrides:
        # An override replaces what is at its path: `--set model.params={}` clears the preset's
        # params, `--set model.params.hidden=16` changes one of them.
        path, value = parse_override(text)
        node = merged
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
    try:
        return FluxoSettings.model_validate(merged)
    except ValidationError as error:
        raise FluxoError(_explain(error, config, layer, overrides)) from None
