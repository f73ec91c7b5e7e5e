"""The train step: setup → fit → evaluate → record, as one MLflow run.

``train_and_evaluate`` reads as those stages, each a helper below, so that what is
recorded about the setup, and about the results, is each in one place rather than
between the training lines. The tracker is MLflow in a run and nothing in a
benchmark. What a run will train (model, task, checks) is settled in
``pipelines.train.preflight``; the training loop is ``pipelines.train.engine``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from models import build_model
from models.preprocess import inner_input_shape, wrap_model
from pipelines.data.augment import augmentation_grid, build_augmenter
from pipelines.context import RunContext
from pipelines.train.result import TrainResult
from pipelines.data.store import Dataset, Split, read_dataset, read_validation
from pipelines.data.versioning import DataVersion
from pipelines.errors import FluxoError
from pipelines.identity import REGISTERED_MODEL_TAG, default_registered_model
from pipelines.settings import FluxoSettings
from pipelines.settings.auto import AUTO
from pipelines.train import distributed
from pipelines.train.batches import batches_for
from pipelines.train.callbacks import Callback, Checkpointing, SaveBest, Tracking
from pipelines.train.checkpoint import model_payload, save_checkpoint
from pipelines.train.engine import (
    Augment,
    Batches,
    FitConfig,
    FitResult,
    TaskStep,
    evaluate,
    fit,
    resolve_device,
    seed_everything,
)
from pipelines.train.lock import training_lock
from pipelines.train.losses import Task
from pipelines.train.metrics import (
    classification_metrics,
    confusion_matrix_figure,
    learning_curves_figure,
    per_class_table,
)
from pipelines.train.preflight import (  # noqa: F401 - check_data_matches, split_statistics: imported from here
    check_data_matches,
    check_model_fits_data,
    check_trainable,
    input_statistics,
    model_spec,
    resolve_model,
    resolve_task,
    split_statistics,
)
from pipelines.train.tracker import MLflowTracker, NullTracker, PrefixedTracker, Tracker

if TYPE_CHECKING:
    # Only for the annotation: warm_start loads when a run starts from other weights.
    from pipelines.train.warm_start import WarmStart

log = logging.getLogger(__name__)
# Set on a run whose model.name was chosen from the data (resolve_model), saying why.
MODEL_CHOICE_TAG = "fluxo.model.default"


@dataclass
class _Prepared:
    """What setup hands the later stages: resolved settings, the data, the task and the model on its device."""

    settings: FluxoSettings
    dataset: Dataset
    task: Task
    spec: dict[str, Any]
    model: torch.nn.Module  # the network behind its input preprocessing (models/preprocess.py)
    device: torch.device
    started_from: WarmStart | None = None  # None: trained from scratch

    def batches(self, split: str | Split, balance: str = "none") -> Batches:
        """A split (by name, or built) as batches on the training device; under DDP, this rank's shard."""
        ranks = distributed.current()
        train = self.settings.train
        return batches_for(
            self.dataset.splits[split] if isinstance(split, str) else split, train.batch_size, self.device,
            train.seed, train.resident_limit_mb, balance, shard=(ranks.rank, ranks.world),
        )


def _retrain_on_train_val(run: _Prepared, config: FitConfig, result: FitResult, augmenter: Augment | None,
                          tracker: Tracker) -> torch.nn.Module:
    """Goodfellow et al., algorithm 7.2: retrain from scratch on train+val for the best epoch count.

    Early stopping found how long to train; the validation samples then become training
    data too. With no held-out data left, the final weights are kept, not "the best".
    """
    settings, spec = run.settings, run.spec
    seed_everything(settings.train.seed)
    inner = build_model(settings.model.name, inner_input_shape(spec), spec["num_outputs"], **settings.model.params)
    model = wrap_model(inner, spec).to(run.device)
    train, val = run.dataset.splits["train"], run.dataset.splits["val"]
    lengths = None if train.lengths is None else np.concatenate([train.lengths, val.lengths])
    combined = Split(train.shards + val.shards, np.concatenate([train.y, val.y]), lengths)
    epochs = max(result.best_epoch, 1)
    log.info("retraining on train+val for %d epochs (algorithm 7.2)", epochs)
    fit(
        model,
        run.batches(combined, settings.train.balance),
        run.batches("val"),
        dataclasses.replace(config, epochs=epochs, patience=epochs + 1, keep_last=True),
        callbacks=[Tracking(PrefixedTracker(tracker, "retrain_"))],  # no checkpoints: nothing to resume or export
        step=TaskStep(run.task),
        augment=augmenter,
    )
    tracker.log_metrics({"retrain_epochs": epochs})
    return model


def _baseline(run: _Prepared, result: FitResult, tracker: Tracker) -> None:
    """Fit the baselines (pipelines/train/baseline.py) and log them beside the model's best validation score.

    The MLP for classification; for a table also the scaled linear model (logistic or ridge
    regression), for regression too. The run's tag ``fluxo.baseline`` is what the gate reads.
    """
    from pipelines.train.baseline import BASELINE, BASELINE_TAG, LINEAR, compare, fit_baseline, fit_linear

    settings = run.settings
    epochs = settings.train.baseline_epochs
    classifier = run.task.name in ("multiclass", "binary")
    table = run.dataset.kind == "table"
    if epochs == 0 or not (classifier or (table and run.task.name == "regression")) or not len(run.dataset.splits["val"]):
        return
    metric = "accuracy" if classifier else "r2"
    best = next((r for r in result.history if r["epoch"] == result.best_epoch), None)
    if best is None or f"val_{metric}" not in best:
        return
    baselines = []
    if classifier and settings.model.name != BASELINE:
        baselines.append(fit_baseline(run.dataset, run.spec, settings.train.seed, epochs))
    if table and settings.model.name != LINEAR:
        baselines.append(fit_linear(run.dataset, run.spec, settings.train.seed))
    if not baselines:
        return
    verdict = compare(settings.model.name, best[f"val_{metric}"], baselines, metric, len(run.dataset.splits["val"]))
    tracker.log_metrics({f"best_val_{metric}": best[f"val_{metric}"],
                         **{f"{'baseline' if b.name == BASELINE else 'linear'}_val_{metric}": b.val_score
                            for b in baselines},
                         **{f"{'baseline' if b.name == BASELINE else 'linear'}_seconds": b.seconds for b in baselines}})
    tracker.set_tags({BASELINE_TAG: verdict})


def git_commit(root: Path) -> str:
    """The code version a run was trained with (``-dirty`` when uncommitted changes exist), or "unknown"."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        # check=False: a failing git (no repository) is read from the return code below, not raised.
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                                check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _set_up(root: Path, settings: FluxoSettings, dataset: Dataset, warm_start: bool) -> _Prepared:
    """Seed, pick the device and task, build the model (warm-started and frozen as the settings say)."""
    check_model_fits_data(settings.model.name, dataset)
    seed_everything(settings.train.seed)
    device = resolve_device(settings.train.device)
    task = resolve_task(settings, dataset)
    mean, std = input_statistics(dataset, settings.model.name)
    spec = model_spec(settings, dataset, mean, std, task)
    try:
        inner = build_model(settings.model.name, inner_input_shape(spec), spec["num_outputs"], **settings.model.params)
    except (TypeError, ValueError) as error:
        raise FluxoError(f"model.params for {settings.model.name!r}: {error}") from error
    started_from = None
    if warm_start and distributed.current().rank == 0:  # DDP hands rank 0's weights to the others
        from pipelines.train.warm_start import warm_start as load_initial_weights

        registered = default_registered_model(settings.tracking.registered_model, dataset.manifest["name"])
        started_from = load_initial_weights(root, settings, inner, spec, registered)
    if settings.train.freeze:
        from pipelines.train.warm_start import freeze

        frozen = freeze(inner, settings.train.freeze)
        log.info("frozen: %d parameter tensors under %s", len(frozen), ", ".join(settings.train.freeze))
    model = wrap_model(inner, spec).to(device)
    return _Prepared(settings, dataset, task, spec, model, device, started_from)


def _record_setup(root: Path, run: _Prepared, data_version: DataVersion, tracker: Tracker) -> None:
    """What the run trains, on what, from where: tags, params, the model spec, warm start and data checks."""
    settings, dataset = run.settings, run.dataset
    tracker.set_tags(
        {
            "git_commit": git_commit(root),
            "task": run.task.name,
            "data_version": data_version.md5,
            "dataset": dataset.manifest["name"],
            "model": settings.model.name,
            "device": str(run.device),
        }
    )
    tracker.log_params(
        {
            **{f"data.{k}": v for k, v in settings.data.model_dump(mode="json").items() if k != "dvc_remote"},
            **{f"train.{k}": v for k, v in settings.train.model_dump(mode="json").items()},
            "model.name": settings.model.name,
            "model.params": settings.model.params,
            "model.parameters": sum(p.numel() for p in run.model.parameters()),
            "data.version": data_version.md5,
            "data.input_shape": list(dataset.input_shape),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
    )
    tracker.log_dict(run.spec, "model_spec.json")
    started_from = run.started_from
    if started_from is not None:
        tracker.set_tags({"fluxo.init_from": started_from.source, "fluxo.init_from_run": started_from.run_id})
        tracker.log_dict({"source": started_from.source, "run_id": started_from.run_id, "loaded": started_from.loaded,
                          "replaced": started_from.replaced, "frozen": settings.train.freeze}, "warm_start.json")
    validation = read_validation(root / settings.data.data_dir)
    if validation is not None:
        tracker.log_dict(validation, "data/validation.json")
        tracker.log_metrics({"data_samples_kept": validation["samples_kept"],
                             "data_samples_found": validation["samples_found"]})


def _augmenter(run: _Prepared, tracker: Tracker) -> Augment | None:
    """The training-batch augmentation the settings ask for, recorded with a grid of augmented samples."""
    settings, dataset = run.settings, run.dataset
    augmenter = build_augmenter(settings.augment, dataset.kind, len(dataset.labels))
    if augmenter is not None:
        tracker.log_params({"augment": settings.augment.model_dump(mode="json")})
        sample = dataset.splits["train"]
        preview_x = torch.as_tensor(np.array(sample.shards[0][:32]), dtype=torch.float32)
        preview_y = torch.as_tensor(sample.y[:32])
        figure = augmentation_grid(augmenter, preview_x, preview_y, n=32, generator=torch.Generator().manual_seed(0))
        tracker.log_figure(figure, "plots/augmentation.png")
        plt.close(figure)
    return augmenter


def _evaluate_test(run: _Prepared, model: torch.nn.Module) -> tuple[dict[str, float], np.ndarray, torch.Tensor]:
    """The test split scored by the final model: its ``test_*`` metrics, the true targets and the logits."""
    _, _, logits, test_y = evaluate(model, run.batches("test"), TaskStep(run.task))
    truth, scores = test_y.cpu().numpy(), run.task.scores(logits).detach().cpu().numpy()
    return {f"test_{k}": v for k, v in run.task.metrics(truth, scores).items()}, truth, logits


def _record_results(run: _Prepared, result: FitResult, test: tuple[dict[str, float], np.ndarray, torch.Tensor],
                    best_path: Path, tracker: Tracker) -> None:
    """How training went and how the model scores on test: metrics, plots, the confusion matrix, the checkpoint."""
    test_metrics, truth, logits = test
    labels = run.dataset.labels
    run_metrics = {
        **test_metrics,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": result.seconds,
        "train_samples_per_second": result.samples_per_second,
    }
    if run.device.type == "cuda":
        run_metrics["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
    tracker.log_metrics(run_metrics)
    figures = [("learning_curves.png", learning_curves_figure(result.history))]
    if run.task.name in ("multiclass", "binary"):
        predicted = run.task.predict(logits).cpu().numpy()
        matrix = classification_metrics(truth, predicted, len(labels))["confusion_matrix"]
        tracker.log_dict({"labels": labels, "matrix": matrix.tolist()}, "confusion_matrix.json")
        tracker.log_dict(per_class_table(truth, predicted, labels), "metrics/per_class.json")
        figures.append(("confusion_matrix.png", confusion_matrix_figure(matrix, labels, "test set")))
    for name, figure in figures:
        tracker.log_figure(figure, f"plots/{name}")
        plt.close(figure)
    tracker.log_artifact(best_path, "checkpoints")
    log.info(
        "trained %s on %s (%s): %s (best epoch %d of %d, %.1f s)",
        run.settings.model.name,
        run.dataset.manifest["name"],
        run.task.name,
        ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()),
        result.best_epoch,
        result.epochs_run,
        result.seconds,
    )


def train_and_evaluate(
    root: Path,
    settings: FluxoSettings,
    data_version: DataVersion,
    tracker: Tracker | None = None,
    run_key: str = "local",
    resume: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    dataset: Dataset | None = None,
) -> tuple[dict[str, Any], dict[str, float], Path, Any]:
    """Train on the dataset under ``root``, evaluate on its test split; usable without MLflow.

    Returns the model spec, the test metrics, the best checkpoint's path and the fit result.
    ``dataset`` is the already opened ``data/`` when the caller has it (it is read once per run).
    ``callbacks`` run after the run's own at each epoch end (tuning prunes trials there).
    """
    root = Path(root)
    tracker = tracker or MLflowTracker()
    dataset = dataset or read_dataset(root / settings.data.data_dir)
    settings, chosen = resolve_model(settings, dataset)
    if chosen is not None:
        tracker.set_tags({MODEL_CHOICE_TAG: chosen})
    run = _set_up(root, settings, dataset, warm_start=resume is None)
    _record_setup(root, run, data_version, tracker)
    augmenter = _augmenter(run, tracker)

    checkpoint_dir = root / settings.train.checkpoint_dir / run_key
    best_path = checkpoint_dir / "best.pt"
    extra_state = {"run_key": run_key, "settings": settings.model_dump(mode="json"), "data_version": data_version.md5}
    config = FitConfig.from_settings(settings.train)
    result = fit(
        run.model,
        run.batches("train", settings.train.balance),
        run.batches("val"),
        config,
        callbacks=[
            Tracking(tracker),
            SaveBest(best_path, run.spec),
            Checkpointing(checkpoint_dir / "state", extra_state),
            *callbacks,
        ],
        step=TaskStep(run.task),
        augment=augmenter,
        resume=resume,
    )
    if distributed.current().rank == 0:
        _baseline(run, result, tracker)
    model = run.model
    if settings.train.retrain_on_train_val:
        model = _retrain_on_train_val(run, config, result, augmenter, tracker)
        save_checkpoint(best_path, {**model_payload(model, run.spec), "epoch": result.best_epoch})

    test = _evaluate_test(run, model)
    _record_results(run, result, test, best_path, tracker)
    return run.spec, test[0], best_path, result


def run_name(dataset: Dataset, settings: FluxoSettings) -> str:
    """A training run's MLflow name: the dataset and the model."""
    return f"{dataset.manifest['name']}-{settings.model.name}"


def train(ctx: RunContext, data_version: DataVersion, callbacks: Sequence[Callback] = (),
          run_id: str | None = None) -> TrainResult:
    """Train and evaluate inside a new MLflow run that records the data version as its input.

    Under ``torchrun`` (or Ray Train) every rank trains; only rank 0 opens the MLflow run and writes
    checkpoints. ``callbacks`` run on every rank after the run's own, at each epoch. ``run_id``: an
    MLflow run created for this training beforehand (a cluster's driver does), instead of a new one.
    """
    import mlflow

    root, settings = ctx.root, ctx.settings
    dataset = read_dataset(Path(root) / settings.data.data_dir)
    settings, chosen = resolve_model(settings, dataset)
    search = None
    if settings.model.name == AUTO:  # race a portfolio first (pipelines/train/auto.py); the winner trains here
        from pipelines.train.auto import choose

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise FluxoError("model.name=auto runs in one process; drop --nproc, or name a model to train with DDP")
        settings, search = choose(root, settings, data_version, dataset, train_and_evaluate)
    check_trainable(settings, dataset)
    ranks = distributed.init_distributed()
    try:
        if not ranks.main:
            _, test_metrics, checkpoint, result = train_and_evaluate(
                root, settings, data_version, NullTracker(), run_key=f"rank{ranks.rank}", dataset=dataset,
                callbacks=callbacks,
            )
            return TrainResult("", checkpoint, test_metrics, result.best_epoch, result.seconds)
        dataset_name = dataset.manifest["name"]
        registered = default_registered_model(settings.tracking.registered_model, dataset_name)
        train_split = dataset.splits["train"]
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name(dataset, settings)) as run:
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
                    root, settings, data_version, MLflowTracker(), run_key=run.info.run_id, dataset=dataset,
                    callbacks=callbacks,
                )
        return TrainResult(run.info.run_id, checkpoint, test_metrics, result.best_epoch, result.seconds, registered)
    finally:
        distributed.shutdown()

