"""``model.name: auto``: race a portfolio of models on the validation split, then train the winner.

The portfolio (pipelines/settings/auto.py) is every registered model that takes the
dataset's input kind, at a couple of widths, times ``auto.learning_rates``, with and without
the preset's augmentation: the MLP baseline is always in it, so the leaderboard says what
the deep models add. That grid races by successive halving: every candidate trains
``auto.first_epochs`` epochs, the best ``1/eta`` (validation accuracy) go on for ``eta`` times
as many, until one is left; that one then trains to completion (``train.epochs`` with early
stopping), as the winner would.

The shipped presets for the input kind (``auto.with_presets``) do not enter the halving: a
tuned recipe (a one-cycle schedule, augmentation, a long patience) is built to be good at
its end, not after one epoch, and early rungs cut exactly those. So each preset trains its
own recipe to completion once: the presets tuned for this very dataset (their
``data.dataset``) right after the grid's first rung, being the strongest prior; the others,
tuned for another dataset, after the grid's halving, as time allows (on MNIST, 2 cores, the
digits preset alone takes 3 minutes and never wins). The finished grid leader and the
finished presets are then compared on equal terms, the best validation accuracy winning and
a preset winning a tie (it is the prior: a grid candidate must do better to displace it).
When the budget runs out first, whatever finished is ranked, and the grid's leader competes
with the rung it reached.

Candidates are trained in a fixed order with the run's seed, so for a seed the race is the
same whenever the budget does not bind; a faster machine finishes more, nothing else changes.

Every candidate is a nested MLflow run under one parent (tagged ``fluxo.kind=auto-search``,
so ``fluxo export`` never takes either); the leaderboard goes to the terminal and to the
parent as ``auto/leaderboard.json``. The winner's settings (model, width, learning rate,
augmentation, or the preset's whole recipe) then go through the ordinary training run,
export and gate.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.data.store import Dataset
from pipelines.data.versioning import DataVersion
from pipelines.errors import FluxoError
from pipelines.settings import FluxoSettings
from pipelines.settings.auto import AUTO, LEARNING_RATE_SCALE, PORTFOLIO  # noqa: F401 - AUTO re-exported

log = logging.getLogger(__name__)
KIND_TAG = "fluxo.kind"
SEARCH, CANDIDATE = "auto-search", "auto-candidate"
BASELINE = "mlp"


PRESETS = Path(__file__).resolve().parents[2] / "configs"
# Presets that are not a training recipe of their own: the smoke test's, and tuning studies (their
# training sections repeat the preset they search around).
NOT_RECIPES = ("smoke.yaml", "*-tune.yaml")
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


def portfolio(settings: FluxoSettings, dataset: Dataset) -> list[Candidate]:
    """The candidates for this dataset, in the fixed order they are trained.

    A table is raced with table models only, unless nobody said it is a table and its columns
    are all numbers without empty cells (``as_steps``): then the sequence models race too,
    reading the columns as steps, and the validation split decides which reading wins.
    """
    from models import MODEL_REGISTRY
    from pipelines.train.preflight import steps_allowed

    kind = dataset.kind
    if kind not in PORTFOLIO:
        raise FluxoError(f"model.name=auto: no portfolio for {kind} data; name a model (`fluxo models`)")
    wanted = settings.auto.models
    if wanted is not None:
        unknown = [m for m in wanted if m not in MODEL_REGISTRY]
        if unknown:
            raise FluxoError(f"auto.models: {', '.join(unknown)} not registered; choose from "
                             f"{', '.join(sorted(MODEL_REGISTRY))}")
    offered = list(PORTFOLIO[kind])
    if steps_allowed(dataset):  # a table whose columns may be steps: sequence models race beside, validation decides
        offered += [(m, p) for m, p in PORTFOLIO["sequence"] if (m, p) not in offered]
    entries = [(m, p) for m, p in offered if wanted is None or m in wanted or m == BASELINE]
    augmented = (False, True) if settings.auto.with_augmentation and _augments(settings, kind) else (False,)
    regression = dataset.task == "regression"
    candidates = [Candidate(model, dict(params), lr * LEARNING_RATE_SCALE.get(model, 1.0), aug, regression=regression)
                  for model, params in entries for lr in settings.auto.learning_rates for aug in augmented]
    return candidates + (preset_candidates(kind, wanted) if settings.auto.with_presets else [])


def preset_candidates(kind: str, wanted: list[str] | None, folder: Path | None = None) -> list[Candidate]:
    """The shipped presets whose model takes ``kind`` inputs, each raced with its own recipe.

    A preset is a tuned recipe (schedule, augmentation, regularisation) that the grid above
    does not reproduce; in the race, the best of them is always a candidate to beat.
    """
    import yaml

    from models import MODEL_REGISTRY

    folder = folder or PRESETS
    if not folder.is_dir():
        return []
    skipped = {path for pattern in NOT_RECIPES for path in folder.glob(pattern)}
    out = []
    for path in sorted(set(folder.glob("*.yaml")) - skipped):
        recipe = yaml.safe_load(path.read_text()) or {}
        model = (recipe.get("model") or {}).get("name")
        spec = MODEL_REGISTRY.get(model)
        # A table races only table models' recipes: the "any" presets (an MLP's) are tuned with image augmentation.
        takes = (kind,) if kind == "table" else (kind, "any")
        if spec is None or spec.input_kind not in takes or (wanted is not None and model not in wanted):
            continue
        sections = {key: recipe.get(key) or {} for key in ("model", "train", "augment")}
        train = sections["train"]
        out.append(Candidate(model, dict(sections["model"].get("params") or {}),
                             float(train.get("learning_rate", 1e-3)), bool(sections["augment"]), sections, path.name,
                             home=(recipe.get("data") or {}).get("dataset")))
    return out


def _augments(settings: FluxoSettings, kind: str) -> bool:
    from pipelines.data.augment import build_augmenter

    return build_augmenter(settings.augment, kind, 2) is not None


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


def race(root: Path, settings: FluxoSettings, data_version: DataVersion, dataset: Dataset,
         train_and_evaluate: Callable[..., Any]) -> list[Candidate]:
    """The race inside one parent MLflow run (see the module docstring); candidates best first.

    ``train_and_evaluate`` is pipelines.train.run's, handed in (run.py calls this module).
    """
    import mlflow

    candidates = portfolio(settings, dataset)
    grid = [c for c in candidates if c.preset is None]
    presets = [c for c in candidates if c.preset is not None]
    own = [c for c in presets if c.home == settings.data.dataset]  # tuned for this dataset: right after rung one
    others = [c for c in presets if c not in own]  # tuned elsewhere: after the halving, as time allows
    budget = settings.auto.budget_minutes * 60
    started = time.perf_counter()

    def out_of_time() -> bool:
        return time.perf_counter() - started > budget and any(c.trained for c in candidates)

    with mlflow.start_run(run_name=f"auto-{dataset.manifest['name']}", tags={KIND_TAG: SEARCH}) as parent:
        mlflow.log_params({"auto.candidates": len(candidates), "auto.budget_minutes": settings.auto.budget_minutes,
                           "auto.eta": settings.auto.eta, "auto.first_epochs": settings.auto.first_epochs})
        trainer = _trainer(root, settings, data_version, dataset, train_and_evaluate)
        alive, epochs, presets_done = list(grid), settings.auto.first_epochs, False
        while alive and not out_of_time():
            top = epochs >= settings.train.epochs  # the top rung is training to completion
            trainer.train_all(alive, None if top else epochs, out_of_time)
            if not presets_done:  # every grid candidate has a score: now this dataset's recipes, each to its end
                presets_done = True
                _complete_while_time(trainer, own, out_of_time)
            finished = sorted((c for c in alive if epochs in c.scores), key=lambda c: -c.scores[epochs])
            if top or not finished:
                break
            if len(finished) == 1:
                if not out_of_time():
                    trainer.complete(finished[0])  # the grid's leader, trained as the winner would be
                break
            alive, epochs = finished[: max(1, math.ceil(len(finished) / settings.auto.eta))], epochs * settings.auto.eta
        _complete_while_time(trainer, others, out_of_time)
        ranked = rank(candidates)
        board = leaderboard(ranked, score_metric(dataset))
        mlflow.log_dict({"leaderboard": board, "seconds": round(time.perf_counter() - started, 1)},
                        "auto/leaderboard.json")
        metric = score_metric(dataset)
        mlflow.log_metrics({f"auto_best_val_{metric}": ranked[0].best()[1],
                            f"auto_baseline_val_{metric}": _baseline(ranked).best()[1],
                            "auto_seconds": time.perf_counter() - started})
        mlflow.set_tags({"fluxo.auto.winner": ranked[0].label})
    log.info("auto leaderboard (%d candidates, %.0f s):\n%s", len(ranked), time.perf_counter() - started,
             format_leaderboard(board))
    for candidate in ranked:
        candidate.run_ids = [parent.info.run_id, *candidate.run_ids]
    return ranked


def _complete_while_time(trainer: _Trainer, candidates: list[Candidate], out_of_time: Callable[[], bool]) -> None:
    trainer.train_all(candidates, None, out_of_time)


def _trainer(root: Path, settings: FluxoSettings, data_version: DataVersion, dataset: Dataset,
             train_and_evaluate: Callable[..., Any]) -> _Trainer:
    """One candidate after another in this process, or each rung's candidates at once on the cluster
    (``cluster.address``: pipelines/train/spread.py)."""
    if settings.cluster.enabled:
        from pipelines.train.spread import ClusterTrainer

        return ClusterTrainer(root, settings, data_version, dataset, train_and_evaluate)
    return _Trainer(root, settings, data_version, dataset, train_and_evaluate)


def score_metric(dataset: Dataset) -> str:
    """What the race ranks by: validation accuracy, or R² for a regression target (pipelines/train/engine.py)."""
    return "r2" if dataset.task == "regression" else "accuracy"


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """Best first: the finished presets and the grid's leader by validation accuracy, then the rest.

    Within the grid a higher rung ranks first (a candidate stopped at a lower rung lost to those
    above at that rung). The grid's leader, finished or at its highest rung, then meets the
    finished presets on score alone, a preset winning a tie.
    """
    grid = sorted((c for c in candidates if c.preset is None and c.trained),
                  key=lambda c: (0, 0, -c.full[1]) if c.full is not None else (1, -max(c.scores), -c.best()[1]))
    finished_presets = [c for c in candidates if c.preset is not None and c.full is not None]
    contenders = sorted(grid[:1] + finished_presets, key=lambda c: (-c.best()[1], c.preset is None))
    return contenders + grid[1:]


@dataclass
class _Trainer:
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


def _baseline(ranked: list[Candidate]) -> Candidate:
    return next(c for c in ranked if c.model == BASELINE)


def leaderboard(ranked: list[Candidate], metric: str = "accuracy") -> list[dict[str, Any]]:
    baseline = _baseline(ranked)
    rows = []
    for place, candidate in enumerate(ranked, 1):
        epochs, score = candidate.best()
        role = "winner" if place == 1 else "baseline" if candidate is baseline else ""
        rows.append({"rank": place, "candidate": candidate.label, "epochs": epochs, "finished": candidate.full is not None,
                     f"val_{metric}": round(score, 4),
                     "role": role if candidate is not baseline or place != 1 else "winner (the baseline)"})
    return rows


def format_leaderboard(rows: list[dict[str, Any]]) -> str:
    width = max(len(r["candidate"]) for r in rows)
    metric = next(key for key in rows[0] if key.startswith("val_"))
    lines = [f"  {'#':>2}  {'candidate'.ljust(width)}  epochs  {'val R²' if metric == 'val_r2' else 'val acc'}"]
    for r in rows:
        epochs = f"{r['epochs']}{'*' if r['finished'] else ''}"
        lines.append(f"  {r['rank']:>2}  {r['candidate'].ljust(width)}  {epochs:>6}  {r[metric]:.4f}"
                     f"  {r['role']}")
    lines.append("  (* trained to completion, early stopping included)")
    return "\n".join(lines)


def choose(root: Path, settings: FluxoSettings, data_version: DataVersion, dataset: Dataset,
           train_and_evaluate: Callable[..., Any]) -> tuple[FluxoSettings, str]:
    """Run the race; (the winner's settings for a full training run, the search's parent run id)."""
    if settings.train.task == "multilabel":
        raise FluxoError("model.name=auto races on validation accuracy or R²: it cannot rank multilabel models; "
                         "name a model for this one (`fluxo models`)")
    if settings.cluster.enabled:
        from pipelines.cluster import ray_cluster

        with ray_cluster(settings.cluster):
            ranked = race(root, settings, data_version, dataset, train_and_evaluate)
    else:
        ranked = race(root, settings, data_version, dataset, train_and_evaluate)
    winner = ranked[0]
    chosen = candidate_settings(settings, winner, None)  # trained to completion, as the run (or preset) says
    log.info("auto: training the winner, %s, for up to %d epochs", winner.label, chosen.train.epochs)
    return chosen, winner.run_ids[0]
