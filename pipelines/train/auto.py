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

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.data.store import Dataset
from pipelines.data.versioning import DataVersion
from pipelines.errors import FluxoError
from pipelines.settings import FluxoSettings
from pipelines.settings.auto import AUTO, LEARNING_RATE_SCALE, PORTFOLIO  # noqa: F401 - AUTO re-exported
from pipelines.train.trial import (  # noqa: F401 - Candidate, candidate_settings, RECIPE_FIELDS: imported from here too
    KIND_TAG,
    RECIPE_FIELDS,
    Candidate,
    Trainer,
    candidate_settings,
    score_metric,
)

log = logging.getLogger(__name__)
SEARCH = "auto-search"
BASELINE = "mlp"


PRESETS = Path(__file__).resolve().parents[2] / "configs"
# Presets that are not a training recipe of their own: the smoke test's, and tuning studies (their
# training sections repeat the preset they search around).
NOT_RECIPES = ("smoke.yaml", "*-tune.yaml")


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
                trainer.train_all(own, None, out_of_time)
            finished = sorted((c for c in alive if epochs in c.scores), key=lambda c: -c.scores[epochs])
            if top or not finished:
                break
            if len(finished) == 1:
                trainer.train_all(finished, None, out_of_time)  # the grid's leader, trained as the winner would be
                break
            alive, epochs = finished[: max(1, math.ceil(len(finished) / settings.auto.eta))], epochs * settings.auto.eta
        trainer.train_all(others, None, out_of_time)
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


def _trainer(root: Path, settings: FluxoSettings, data_version: DataVersion, dataset: Dataset,
             train_and_evaluate: Callable[..., Any]) -> Trainer:
    """One candidate after another in this process, or each rung's candidates at once on the cluster
    (``cluster.address``: pipelines/train/spread.py)."""
    if settings.cluster.enabled:
        from pipelines.train.spread import ClusterTrainer

        return ClusterTrainer(root, settings, data_version, dataset, train_and_evaluate)
    return Trainer(root, settings, data_version, dataset, train_and_evaluate)


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
