"""The train step: setup → build → fit → evaluate, recorded as one MLflow run."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import matplotlib.pyplot as plt
import numpy as np
import torch

from models import MODEL_REGISTRY, build_model
from models.preprocess import Standardized
from pipelines.settings import FluxoSettings, ModelSettings
from pipelines.settings.auto import AUTO
from pipelines.data.augment import augmentation_grid, build_augmenter
from pipelines.data.store import Dataset, Split, read_dataset, read_validation
from pipelines.data.versioning import DataVersion
from pipelines.errors import FluxoError
from pipelines.identity import REGISTERED_MODEL_TAG, default_registered_model
from pipelines.train.checkpoint import model_payload, save_checkpoint
from pipelines.train import distributed
from pipelines.train.batches import batches_for
from pipelines.train.lock import training_lock
from pipelines.train.engine import FitConfig, TaskStep, evaluate, fit, resolve_device, seed_everything
from pipelines.train.losses import Task, build_task
from pipelines.train.metrics import (
    classification_metrics,
    confusion_matrix_figure,
    learning_curves_figure,
    per_class_table,
)
from pipelines.train.tracker import MLflowTracker, NullTracker, PrefixedTracker, Tracker

log = logging.getLogger(__name__)
# Set on a run whose model.name was chosen from the data (resolve_model), saying why.
MODEL_CHOICE_TAG = "fluxo.model.default"


@dataclass
class TrainResult:
    run_id: str
    checkpoint: Path
    test_metrics: dict[str, float]
    best_epoch: int
    seconds: float
    registered_model: str = ""


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


def model_spec(settings: FluxoSettings, dataset: Dataset, mean: float, std: float, task: Task) -> dict[str, Any]:
    """Everything needed to rebuild the network; saved in checkpoints, MLflow and export metadata."""
    return {
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


def _retrain_on_train_val(settings, dataset, spec, config, result, batches, task, augmenter, tracker, device):
    """Goodfellow et al., algorithm 7.2: retrain from scratch on train+val for the best epoch count.

    Early stopping found how long to train; the validation samples then become training
    data too. With no held-out data left, the final weights are kept, not "the best".
    """
    seed_everything(settings.train.seed)
    inner = build_model(settings.model.name, dataset.input_shape, spec["num_outputs"], **settings.model.params)
    model = Standardized(inner, spec["mean"], spec["std"]).to(device)
    train, val = dataset.splits["train"], dataset.splits["val"]
    lengths = None if train.lengths is None else np.concatenate([train.lengths, val.lengths])
    combined = Split(train.shards + val.shards, np.concatenate([train.y, val.y]), lengths)
    epochs = max(result.best_epoch, 1)
    log.info("retraining on train+val for %d epochs (algorithm 7.2)", epochs)
    fit(
        model,
        batches(combined, settings.train.balance),
        batches("val"),
        dataclasses.replace(config, epochs=epochs, patience=epochs + 1, checkpoint_dir=None, keep_last=True),
        tracker=PrefixedTracker(tracker, "retrain_"),
        step=TaskStep(task),
        augment=augmenter,
    )
    tracker.log_metrics({"retrain_epochs": epochs})
    return model


def _baseline(settings: FluxoSettings, dataset: Dataset, task: Task, result: Any, mean: float, std: float,
              tracker: Tracker) -> None:
    """Fit the MLP baseline (pipelines/train/baseline.py) and log it beside the model's best validation accuracy."""
    from pipelines.train.baseline import BASELINE, compare, fit_baseline

    epochs = settings.train.baseline_epochs
    if epochs == 0 or settings.model.name == BASELINE or task.name not in ("multiclass", "binary"):
        return
    best = next((r for r in result.history if r["epoch"] == result.best_epoch), None)
    if best is None or "val_accuracy" not in best:
        return
    score = fit_baseline(dataset, mean, std, settings.train.seed, epochs)
    beaten = compare(settings.model.name, best["val_accuracy"], score)
    tracker.log_metrics({"baseline_val_accuracy": score.val_accuracy, "baseline_seconds": score.seconds,
                         "best_val_accuracy": best["val_accuracy"]})
    tracker.set_tags({"fluxo.baseline": "beaten" if beaten else "not beaten"})


def git_commit(root: Path) -> str:
    """The code version a run was trained with (``-dirty`` when uncommitted changes exist), or "unknown"."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


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


def _check_model_fits_data(name: str, dataset: Dataset) -> None:
    if name not in MODEL_REGISTRY:
        raise FluxoError(f"model.name={name!r} is not registered; choose one of {', '.join(sorted(MODEL_REGISTRY))}")
    wanted = MODEL_REGISTRY[name].input_kind
    if wanted not in ("any", dataset.kind):
        raise FluxoError(
            f"model.name={name!r} takes {wanted} inputs but dataset {dataset.manifest['name']!r} is a {dataset.kind} "
            "dataset; pick a matching preset under configs/"
        )


def check_trainable(settings: FluxoSettings, dataset: Dataset) -> Task:
    """Every check a run can fail before it starts: model against data, task against targets.

    Run before an MLflow run is opened, so a refused run leaves nothing behind.
    """
    _check_model_fits_data(settings.model.name, dataset)
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


def train_and_evaluate(
    root: Path,
    settings: FluxoSettings,
    data_version: DataVersion,
    tracker: Tracker | None = None,
    run_key: str = "local",
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    dataset: Dataset | None = None,
) -> tuple[dict[str, Any], dict[str, float], Path, Any]:
    """Train on the dataset under ``root``, evaluate on its test split; usable without MLflow.

    Returns the model spec, the test metrics, the best checkpoint's path and the fit result.
    ``dataset`` is the already opened ``data/`` when the caller has it (it is read once per run).
    """
    tracker = tracker or MLflowTracker()
    dataset = dataset or read_dataset(Path(root) / settings.data.data_dir)
    settings, chosen = resolve_model(settings, dataset)
    if chosen is not None:
        tracker.set_tags({MODEL_CHOICE_TAG: chosen})
    _check_model_fits_data(settings.model.name, dataset)
    seed_everything(settings.train.seed)
    device = resolve_device(settings.train.device)

    task = resolve_task(settings, dataset)
    mean, std = split_statistics(dataset.splits["train"])
    spec = model_spec(settings, dataset, mean, std, task)
    try:
        inner = build_model(settings.model.name, dataset.input_shape, spec["num_outputs"], **settings.model.params)
    except (TypeError, ValueError) as error:
        raise FluxoError(f"model.params for {settings.model.name!r}: {error}") from error
    started_from = None
    if resume is None and distributed.current().rank == 0:  # DDP hands rank 0's weights to the others
        from pipelines.train.warm_start import warm_start

        registered = default_registered_model(settings.tracking.registered_model, dataset.manifest["name"])
        started_from = warm_start(root, settings, inner, spec, registered)
    if settings.train.freeze:
        from pipelines.train.warm_start import freeze

        frozen = freeze(inner, settings.train.freeze)
        log.info("frozen: %d parameter tensors under %s", len(frozen), ", ".join(settings.train.freeze))
    model = Standardized(inner, mean, std).to(device)
    parameters = sum(p.numel() for p in model.parameters())

    tracker.set_tags(
        {
            "git_commit": git_commit(Path(root)),
            "task": task.name,
            "data_version": data_version.md5,
            "dataset": dataset.manifest["name"],
            "model": settings.model.name,
            "device": str(device),
        }
    )
    tracker.log_params(
        {
            **{f"data.{k}": v for k, v in settings.data.model_dump(mode="json").items() if k != "dvc_remote"},
            **{f"train.{k}": v for k, v in settings.train.model_dump(mode="json").items()},
            "model.name": settings.model.name,
            "model.params": settings.model.params,
            "model.parameters": parameters,
            "data.version": data_version.md5,
            "data.input_shape": list(dataset.input_shape),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
    )
    tracker.log_dict(spec, "model_spec.json")
    if started_from is not None:
        tracker.set_tags({"fluxo.init_from": started_from.source, "fluxo.init_from_run": started_from.run_id})
        tracker.log_dict({"source": started_from.source, "run_id": started_from.run_id, "loaded": started_from.loaded,
                          "replaced": started_from.replaced, "frozen": settings.train.freeze}, "warm_start.json")
    validation = read_validation(Path(root) / settings.data.data_dir)
    if validation is not None:
        tracker.log_dict(validation, "data/validation.json")
        tracker.log_metrics({"data_samples_kept": validation["samples_kept"], "data_samples_found": validation["samples_found"]})

    checkpoint_dir = Path(root) / settings.train.checkpoint_dir / run_key
    state_dir = checkpoint_dir / "state"
    extra_state = {"run_key": run_key, "settings": settings.model_dump(mode="json"), "data_version": data_version.md5}
    best_path = checkpoint_dir / "best.pt"

    def save_best(current: torch.nn.Module, epoch: int) -> None:
        save_checkpoint(best_path, {**model_payload(current, spec), "epoch": epoch})

    augmenter = build_augmenter(settings.augment, dataset.kind, len(dataset.labels))
    if augmenter is not None:
        tracker.log_params({"augment": settings.augment.model_dump(mode="json")})
        sample = dataset.splits["train"]
        preview_x = torch.as_tensor(np.array(sample.shards[0][:32]), dtype=torch.float32)
        preview_y = torch.as_tensor(sample.y[:32])
        figure = augmentation_grid(augmenter, preview_x, preview_y, n=32, generator=torch.Generator().manual_seed(0))
        tracker.log_figure(figure, "plots/augmentation.png")
        plt.close(figure)

    ranks = distributed.current()

    def batches(split: str | Split, balance: str = "none"):
        return batches_for(
            dataset.splits[split] if isinstance(split, str) else split, settings.train.batch_size, device,
            settings.train.seed, settings.train.resident_limit_mb, balance, shard=(ranks.rank, ranks.world),
        )

    config = FitConfig(
        epochs=settings.train.epochs,
        batch_size=settings.train.batch_size,
        learning_rate=settings.train.learning_rate,
        weight_decay=settings.train.weight_decay,
        patience=settings.train.patience,
        seed=settings.train.seed,
        monitor=settings.train.monitor,
        optimizer=settings.train.optimizer,
        momentum=settings.train.momentum,
        nesterov=settings.train.nesterov,
        scheduler=settings.train.scheduler,
        scheduler_options=settings.train.scheduler_options,
        l1=settings.train.l1,
        clip_norm=settings.train.clip_norm,
        checkpoint_dir=state_dir,
        checkpoint_every=settings.train.checkpoint_every,
        precision=settings.train.precision,
        compile=settings.train.compile,
        compile_mode=settings.train.compile_mode,
    )
    result = fit(
        model,
        batches("train", settings.train.balance),
        batches("val"),
        config,
        tracker=tracker,
        on_best=save_best,
        step=TaskStep(task),
        augment=augmenter,
        resume=resume,
        extra_state=extra_state,
        on_epoch=on_epoch,
    )
    if ranks.rank == 0:
        _baseline(settings, dataset, task, result, mean, std, tracker)
    if settings.train.retrain_on_train_val:
        model = _retrain_on_train_val(settings, dataset, spec, config, result, batches, task, augmenter, tracker, device)
        save_checkpoint(best_path, {**model_payload(model, spec), "epoch": result.best_epoch})

    _, _, logits, test_y = evaluate(model, batches("test"), TaskStep(task))
    truth, scores = test_y.cpu().numpy(), task.scores(logits).detach().cpu().numpy()
    test_metrics = {f"test_{k}": v for k, v in task.metrics(truth, scores).items()}
    run_metrics = {
        **test_metrics,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": result.seconds,
        "train_samples_per_second": result.samples_per_second,
    }
    if device.type == "cuda":
        run_metrics["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    tracker.log_metrics(run_metrics)
    figures = [("learning_curves.png", learning_curves_figure(result.history))]
    if task.name in ("multiclass", "binary"):
        predicted = task.predict(logits).cpu().numpy()
        matrix = classification_metrics(truth, predicted, len(dataset.labels))["confusion_matrix"]
        tracker.log_dict({"labels": dataset.labels, "matrix": matrix.tolist()}, "confusion_matrix.json")
        tracker.log_dict(per_class_table(truth, predicted, dataset.labels), "metrics/per_class.json")
        figures.append(("confusion_matrix.png", confusion_matrix_figure(matrix, dataset.labels, "test set")))
    for name, figure in figures:
        tracker.log_figure(figure, f"plots/{name}")
        plt.close(figure)
    tracker.log_artifact(best_path, "checkpoints")
    log.info(
        "trained %s on %s (%s): %s (best epoch %d of %d, %.1f s)",
        settings.model.name,
        dataset.manifest["name"],
        task.name,
        ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()),
        result.best_epoch,
        result.epochs_run,
        result.seconds,
    )
    return spec, test_metrics, best_path, result


def train(root: Path, settings: FluxoSettings, data_version: DataVersion) -> TrainResult:
    """Train and evaluate inside a new MLflow run that records the data version as its input.

    Under ``torchrun`` every rank trains; only rank 0 opens the MLflow run and writes checkpoints.
    """
    import mlflow

    from pipelines.tracking import configure_mlflow

    dataset = read_dataset(Path(root) / settings.data.data_dir)
    settings, chosen = resolve_model(settings, dataset)
    search = None
    if settings.model.name == AUTO:  # race a portfolio first (pipelines/train/auto.py); the winner trains here
        from pipelines.train.auto import choose

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise FluxoError("model.name=auto runs in one process; drop --nproc, or name a model to train with DDP")
        configure_mlflow(root, settings)
        settings, search = choose(root, settings, data_version, dataset, train_and_evaluate)
    check_trainable(settings, dataset)
    ranks = distributed.init_distributed()
    try:
        if not ranks.main:
            _, test_metrics, checkpoint, result = train_and_evaluate(
                root, settings, data_version, NullTracker(), run_key=f"rank{ranks.rank}", dataset=dataset
            )
            return TrainResult("", checkpoint, test_metrics, result.best_epoch, result.seconds)
        configure_mlflow(root, settings)
        dataset_name = dataset.manifest["name"]
        registered = default_registered_model(settings.tracking.registered_model, dataset_name)
        train_split = dataset.splits["train"]
        with mlflow.start_run(run_name=f"{dataset_name}-{settings.model.name}") as run:
            with warnings.catch_warnings():
                # A local path matches two equivalent MLflow source types; it picks one and warns.
                warnings.simplefilter("ignore", UserWarning)
                source = mlflow.data.from_numpy(
                    np.asarray(train_split.shards[0][:1]),
                    targets=train_split.y[:1],
                    source=str(data_version.dvc_file),
                    name=dataset_name,
                    digest=data_version.md5,
                )
            mlflow.log_input(source, context="training")
            # The run's identity: export, registry and promotion read it from here, not from a preset.
            mlflow.set_tags({"world_size": str(ranks.world), REGISTERED_MODEL_TAG: registered})
            if search is not None:
                mlflow.set_tags({"fluxo.auto.search": search})
            if chosen is not None:
                mlflow.set_tags({MODEL_CHOICE_TAG: chosen})
            # Held while training, so a `--resume` of this run from another process is refused.
            with training_lock(Path(root) / settings.train.checkpoint_dir / run.info.run_id, run.info.run_id):
                _, test_metrics, checkpoint, result = train_and_evaluate(
                    root, settings, data_version, MLflowTracker(), run_key=run.info.run_id, dataset=dataset
                )
        return TrainResult(run.info.run_id, checkpoint, test_metrics, result.best_epoch, result.seconds, registered)
    finally:
        distributed.shutdown()

