"""One trial of the ``model.name: auto`` race: a candidate, the settings it trains with, and its training
inside its own nested MLflow run, to a rung's epochs or to completion.

pipelines/train/auto.py runs the race; :class:`Trainer` trains its trials one after another in this
process, pipelines/train/spread.py all of a rung's at once on a Ray cluster.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.data.store import Dataset
from pipelines.data.versioning import DataVersion
from pipelines.settings import FluxoSettings

log = logging.getLogger("pipelines.train.auto")  # the race's log lines, wherever its trials train
KIND_TAG = "fluxo.kind"
CANDIDATE = "auto-candidate"

# The train fields a preset's recipe owns: a preset raced is trained as `fluxo run --config` trains it,
# so these start from their defaults, not from the run's values; the rest (seed, device, task,
# checkpoints, precision, train+val retraining) stay the run's.
RECIPE_FIELDS = ("epochs", "batch_size", "optimizer", "learning_rate", "momentum", "nesterov", "scheduler",
                 "scheduler_options", "weight_decay", "l1", "clip_norm", "patience", "monitor")


@dataclass
class Candidate:
    model: str
    params: dict[str, Any]
    learning_rate: float
    augment: bool
    preset: dict[str, Any] | None = None  # a shipped preset's model/train/augment sections, raced as they are
    name: str = ""  # the preset's file name
    home: str | None = None  # the preset's data.dataset: the dataset it was tuned for
    scores: dict[int, float] = field(default_factory=dict)  # rung epochs → best validation accuracy
    full: tuple[int, float] | None = None  # trained to completion: (epochs run, best validation accuracy)
    run_ids: list[str] = field(default_factory=list)
    regression: bool = False  # raced on a regression target: ranked by validation R², early rungs follow val_loss

    @property
    def label(self) -> str:
        if self.preset is not None:
            return f"preset {self.name} ({self.model})"
        width = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.model}({width}) lr={self.learning_rate:g}{' +aug' if self.augment else ''}"

    @property
    def trained(self) -> bool:
        return bool(self.scores) or self.full is not None

    def best(self) -> tuple[int, float]:
        """(epochs, score) of the furthest this candidate got: its full training, else its highest rung."""
        if self.full is not None:
            return self.full
        epochs = max(self.scores)
        return epochs, self.scores[epochs]


def candidate_settings(settings: FluxoSettings, candidate: Candidate, epochs: int | None,
                       in_race: bool = False) -> FluxoSettings:
    """The run's settings with the candidate's model, width, learning rate and augmentation.

    ``epochs`` for a rung of the race (monitoring validation accuracy, no early stop before
    the rung's end); None for training to completion (a preset's own epochs, patience and
    schedule; the run's ``train.epochs`` and patience for a grid candidate). ``in_race``: a
    candidate of the race, so no MLP baseline beside it and no warm start.
    """
    from pipelines.settings import AugmentSettings, ModelSettings, TrainSettings

    race = {"baseline_epochs": 0, "init_from": None, "freeze": []} if in_race or epochs is not None else {}
    if epochs is not None:
        regression = settings.train.task == "regression" or candidate.regression
        race.update({"monitor": "val_loss" if regression else "val_accuracy", "epochs": epochs})
    if candidate.preset is not None:
        recipe = candidate.preset
        defaults = TrainSettings().model_dump()
        train = TrainSettings.model_validate({**settings.train.model_dump(),
                                              **{key: defaults[key] for key in RECIPE_FIELDS}, **recipe["train"]})
        model = ModelSettings.model_validate({"name": candidate.model, "params": dict(candidate.params)})
        augment = AugmentSettings.model_validate(recipe["augment"])
    else:
        train = settings.train.model_copy(update={"learning_rate": candidate.learning_rate, "optimizer": "adam"})
        model = settings.model.model_copy(update={"name": candidate.model, "params": dict(candidate.params)})
        augment = copy.deepcopy(settings.augment) if candidate.augment else AugmentSettings()
    if epochs is not None:
        race["patience"] = max(epochs, train.patience)
    return settings.model_copy(update={"model": model, "train": train.model_copy(update=race), "augment": augment})


def score_metric(dataset: Dataset) -> str:
    """What the race ranks by: validation accuracy, or R² for a regression target (pipelines/train/engine.py)."""
    return "r2" if dataset.task == "regression" else "accuracy"


@dataclass
class Trainer:
    """Trains candidates one after another in this process, each as a nested MLflow run, at a rung of the
    race (``epochs``) or to completion (None)."""

    root: Path
    settings: FluxoSettings
    data_version: DataVersion
    dataset: Dataset
    train_and_evaluate: Callable[..., Any]

    def train_all(self, candidates: list[Candidate], epochs: int | None, out_of_time: Callable[[], bool]) -> None:
        """Each candidate in turn, while the budget lasts."""
        for candidate in candidates:
            if out_of_time():
                return
            self.record(candidate, epochs, self._fit(candidate, epochs))

    def record(self, candidate: Candidate, epochs: int | None, result: tuple[int, float]) -> None:
        """A candidate's (epochs run, best validation score), at its rung or as finished, and its log line."""
        metric = score_metric(self.dataset)
        if epochs is None:
            candidate.full = result
            log.info("auto: %-44s %3d epochs (to completion): val %s %.4f", candidate.label, result[0], metric, result[1])
        else:
            candidate.scores[epochs] = result[1]
            log.info("auto: %-44s %3d epochs: val %s %.4f", candidate.label, epochs, metric, result[1])

    def _fit(self, candidate: Candidate, epochs: int | None) -> tuple[int, float]:
        import mlflow

        with mlflow.start_run(run_name=run_name(candidate, epochs), nested=True, tags={KIND_TAG: CANDIDATE}) as run:
            result = fit_candidate(self.root, self.settings, self.data_version, candidate, epochs,
                                   self.train_and_evaluate, self.dataset)
            candidate.run_ids.append(run.info.run_id)
        return result


def run_name(candidate: Candidate, epochs: int | None) -> str:
    return f"{candidate.label} {f'{epochs}ep' if epochs is not None else 'full'}"


def fit_candidate(root: Path, settings: FluxoSettings, data_version: DataVersion, candidate: Candidate,
                  epochs: int | None, train_and_evaluate: Callable[..., Any],
                  dataset: Dataset | None = None) -> tuple[int, float]:
    """Train one candidate inside the active MLflow run (the candidate's own): (epochs run, best validation score).

    ``dataset`` None: read from ``root`` (a cluster worker reads the data itself)."""
    import mlflow

    from pipelines.data.store import read_dataset
    from pipelines.train.tracker import MLflowTracker

    dataset = dataset or read_dataset(root / settings.data.data_dir)
    mlflow.log_params({"auto.model": candidate.model, "auto.params": candidate.params,
                       "auto.learning_rate": candidate.learning_rate, "auto.augment": candidate.augment,
                       "auto.epochs": epochs if epochs is not None else "full", "auto.preset": candidate.name or None})
    with _quiet("pipelines.train.run", "pipelines.train.engine"):  # one line per candidate
        _, _, _, fit = train_and_evaluate(root, candidate_settings(settings, candidate, epochs, in_race=True),
                                          data_version, MLflowTracker(), run_key=mlflow.active_run().info.run_id,
                                          dataset=dataset)
    key = f"val_{score_metric(dataset)}"
    return len(fit.history), max(r[key] for r in fit.history)


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Loggers at WARNING for the block: a candidate's epochs and test line are in its MLflow run."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
