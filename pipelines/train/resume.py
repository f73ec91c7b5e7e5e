"""``fluxo train --resume``: continue an interrupted run from its newest good state, in the same MLflow run.

Under ``torchrun`` every rank resumes from the same state, rank 0's (only rank 0 writes
checkpoints): rank 0 picks the run, takes its lock and finds the newest state that
loads, then tells the other ranks which file that is. Only rank 0 reopens the MLflow run
and writes checkpoints, exactly as in a fresh ``train()``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pipelines.context import RunContext, open_run
from pipelines.data.versioning import DataVersion
from pipelines.errors import FluxoError
from pipelines.identity import REGISTERED_MODEL_TAG
from pipelines.settings import FluxoSettings
from pipelines.train import distributed
from pipelines.train.callbacks import Callback
from pipelines.train.checkpoint import load_checkpoint, load_latest_state
from pipelines.train.distributed import DistInfo
from pipelines.train.lock import training_lock
from pipelines.train.run import TrainResult, train_and_evaluate
from pipelines.train.tracker import MLflowTracker, NullTracker

log = logging.getLogger(__name__)


def resume_training(ctx: RunContext, data_version: DataVersion, run_id: str | None = None,
                    callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Continue an interrupted run from its newest good state, inside the same MLflow run.

    The run's own settings (saved in the state) are used, so the continuation is the
    same training; the data must still be the version it started on. A run another
    process is still training is refused (see :mod:`pipelines.train.lock`).
    """
    ranks = distributed.init_distributed()
    try:
        with ExitStack() as held:  # rank 0's run lock, released when training ends or fails
            state = _shared_state(ctx.root, ctx.settings, data_version, run_id, ranks, held)
            saved = FluxoSettings.model_validate(state["settings"])
            if ranks.main:
                return _resume_main(_saved_context(ctx, saved), data_version, state, ranks, callbacks)
            return _resume_follower(ctx.root, saved, data_version, state, ranks, callbacks)
    finally:
        distributed.shutdown()


def find_run_dir(runs_dir: Path, run_id: str | None) -> Path:
    """The run's checkpoint directory, or the one whose state changed last when no run is named."""
    candidates = [runs_dir / run_id] if run_id else sorted(
        (d for d in runs_dir.glob("*") if (d / "state").is_dir()), key=lambda d: (d / "state").stat().st_mtime
    )
    if not candidates or not (candidates[-1] / "state").is_dir():
        raise FluxoError(f"{runs_dir / (run_id or '*')}/state: no resumable training state; start with `fluxo train`")
    return candidates[-1]


def newest_state(run_dir: Path, data_version: DataVersion) -> tuple[dict[str, Any], Path]:
    """The newest state that loads (a torn newest one falls back), refused if the data changed since."""
    loaded = load_latest_state(run_dir / "state")
    if loaded is None:
        raise FluxoError(f"{run_dir / 'state'}: every saved state is unreadable; start again with `fluxo train`")
    state, path = loaded
    if state["data_version"] != data_version.md5:
        raise FluxoError(
            f"{path} was trained on data version {state['data_version']} but data/ holds {data_version.md5}; "
            "check out the matching data.dvc and run `dvc checkout`"
        )
    return state, path


def _claim(root: Path, settings: FluxoSettings, data_version: DataVersion, run_id: str | None,
           held: ExitStack) -> tuple[dict[str, Any], Path]:
    """Rank 0: lock the run before reading its state, so no live trainer can write it meanwhile."""
    run_dir = find_run_dir(Path(root) / settings.train.checkpoint_dir, run_id)
    held.enter_context(training_lock(run_dir, run_dir.name))
    state, path = newest_state(run_dir, data_version)
    log.info("resuming run %s from %s", state["run_key"], path)
    return state, path


def _shared_state(root: Path, settings: FluxoSettings, data_version: DataVersion, run_id: str | None,
                  ranks: DistInfo, held: ExitStack) -> dict[str, Any]:
    """The state every rank resumes from: the file rank 0 chose, loaded by each rank.

    Failures are shared too, so a refusal on rank 0 (or an unreadable file on another
    rank) stops every rank instead of leaving the others waiting in a collective.
    """
    state: dict[str, Any] | None = None
    if ranks.main:
        try:
            state, path = _claim(root, settings, data_version, run_id, held)
        except Exception as error:
            distributed.broadcast_from_main((None, str(error)))
            raise
        distributed.broadcast_from_main((str(path), None))
        error = distributed.first_error(None)
    else:
        chosen, message = distributed.broadcast_from_main((None, None))
        if message is not None:
            raise FluxoError(f"rank 0 could not resume: {message}")
        try:
            state, error = load_checkpoint(Path(chosen)), None
        except FluxoError as failure:
            error = f"rank {ranks.rank}: {failure}"
        error = distributed.first_error(error)
    if error is not None:
        raise FluxoError(error)
    assert state is not None
    return state


def _saved_context(ctx: RunContext, saved: FluxoSettings) -> RunContext:
    """The run's own settings in the command's context; its own store if the run was tracked elsewhere."""
    same_store = saved.resolved_tracking_uri(ctx.root) == ctx.tracking_uri
    if same_store and saved.tracking.experiment == ctx.settings.tracking.experiment:
        return ctx.with_settings(saved)
    return open_run(ctx.root, saved)


def _resume_main(ctx: RunContext, data_version: DataVersion, state: dict[str, Any], ranks: DistInfo,
                 callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Rank 0 (or the single process): reopen the run's MLflow run and train on, writing checkpoints."""
    import mlflow

    root, saved = ctx.root, ctx.settings
    with mlflow.start_run(run_id=state["run_key"]) as run:
        tags = run.data.tags
        _warn_on_new_world_size(tags.get("world_size"), ranks.world)
        _, test_metrics, checkpoint, result = train_and_evaluate(
            root, saved, data_version, MLflowTracker(), run_key=state["run_key"], resume=state, callbacks=callbacks
        )
    # The registry entry is the run's identity, set when it started; a resume never renames it.
    registered = tags.get(REGISTERED_MODEL_TAG, "")
    return TrainResult(run.info.run_id, checkpoint, test_metrics, result.best_epoch, result.seconds, registered)


def _resume_follower(root: Path, saved: FluxoSettings, data_version: DataVersion, state: dict[str, Any],
                     ranks: DistInfo, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Ranks 1…N-1: the same state, no MLflow and no checkpoints, as in a fresh ``train()``."""
    _, test_metrics, checkpoint, result = train_and_evaluate(
        root, saved, data_version, NullTracker(), run_key=f"rank{ranks.rank}", resume=state, callbacks=callbacks
    )
    return TrainResult("", checkpoint, test_metrics, result.best_epoch, result.seconds)


def _warn_on_new_world_size(recorded: str | None, world: int) -> None:
    """Another process count splits every batch differently: a valid continuation, but not the same training."""
    if recorded is not None and recorded != str(world):
        log.warning("run was trained on %s process(es) and resumes on %d: it will not match an uninterrupted run",
                    recorded, world)
