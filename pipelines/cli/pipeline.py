"""``fluxo run``, ``data ingest``, ``train``, ``export`` and ``tune``: the commands that make a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipelines.cli.app import (
    ConfigOption, Invocation, RootOption, SetOption, app, command, data_app, echo_json, log,
)
from pipelines.errors import FluxoError


@app.command()
@command
def run(
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
    serve: Annotated[bool, typer.Option("--serve", help="Serve the champion when the pipeline is done.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Retrain even when data, settings and code equal an earlier run's.")
    ] = False,
    auto: Annotated[bool, typer.Option("--auto", help="model.name=auto: race a portfolio of models (the MLP "
                                       "baseline among them) on the validation split, then train the winner.")] = False,
    budget: Annotated[Optional[float], typer.Option("--budget", min=0.1, help="With --auto: minutes for the race "
                                                    "(auto.budget_minutes, 5).")] = None,
) -> None:
    """Run the whole pipeline as one Prefect flow: ingest → push → train → export → register → promote → publish."""
    from pipelines.orchestration import prefect_api

    overrides = [*(overrides or []), *(["model.name=auto"] if auto else []),
                 *([f"auto.budget_minutes={budget}"] if budget is not None else [])]
    invocation = Invocation(config, overrides, root)
    settings = invocation.settings  # a mistake in the settings fails before Prefect starts
    with prefect_api(root, settings.orchestration, prepare=lambda: import_module("pipelines.flows")):
        from pipelines.flows import pipeline_flow

        summary = pipeline_flow(**invocation.flow_parameters(), force=force)
    echo_json(summary)
    if serve:
        from pipelines.serve import serve_model

        serve_model(invocation, None, settings.serve.host, settings.serve.port, summary["registered_model"])


@data_app.command("ingest")
@command
def data_ingest(
    dataset: Annotated[
        Optional[str],
        typer.Option("--dataset", help="Built-in name (digits, mnist, mnist1d), an image folder or a sequence file."),
    ] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
) -> None:
    """Validate, split and write the dataset under data/, version it with DVC and push it.

    Prints what it found: counts per class, shapes, and every problem with its policy.
    """
    from pipelines.data.ingest import ingest, push
    from pipelines.data.store import read_dataset

    settings = Invocation(config, [*(overrides or []), *([f"data.dataset={dataset}"] if dataset else [])], root).settings
    ingested = ingest(root, settings.data, settings.model.name)
    pushed = push(root, settings.data)
    echo_json(ingest_summary(ingested, pushed, read_dataset(root / settings.data.data_dir).manifest))


def ingest_summary(ingested: Any, pushed: int, manifest: dict[str, Any]) -> dict[str, Any]:
    """What ``fluxo data ingest`` prints: the data as found, every problem with its policy, the version."""
    report = ingested.report
    problems = {
        name: {"policy": check["policy"], "count": check["count"], "examples": check["examples"]}
        for name, check in report["checks"].items()
        if check["count"]
    }
    return {
        "dataset": manifest["name"],
        "kind": manifest["kind"],
        "task": manifest["task"],
        "input_shape": manifest["input_shape"],
        "dtype": manifest["dtype"],
        "samples": {"found": report["samples_found"], "kept": report["samples_kept"]},
        "classes": report.get("classes"),
        "imbalance_ratio": report.get("imbalance_ratio"),
        "problems": problems or "none",
        "splits": manifest["split"]["sizes"],
        "data_version": ingested.version.md5,
        "pushed": pushed,
    }


@app.command()
@command
def train(
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the newest interrupted run in its MLflow run.")] = False,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="With --resume: the run to continue.")] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Data-parallel processes (torchrun, DDP).")] = 1,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", min=1, help="Data-parallel Ray Train workers on the cluster that cluster.address names (DDP "
        "across nodes)."
    )] = None,
) -> None:
    """Train and evaluate on the current data/ as a new MLflow run (or --resume an interrupted one)."""
    if workers is not None and (nproc > 1 or resume):
        raise FluxoError("--workers trains on a Ray cluster: drop --nproc (processes on this machine); a cluster run "
                         "resumes by itself after a worker dies, so --resume is for runs of one machine")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(code=_relaunch_with_torchrun(nproc))
    from pipelines.data.ingest import version
    from pipelines.train.resume import resume_training
    from pipelines.train.run import train as train_step

    invocation = Invocation(config, overrides or [], root)
    check_preset_matches_data(invocation)
    # `dvc add` is idempotent: it records the version of whatever data/ holds right now.
    data_version = version(root, invocation.settings.data)
    ctx = invocation.context()
    if workers is not None:
        result = _train_on_cluster(ctx, data_version, workers)
    else:
        result = resume_training(ctx, data_version, run_id) if resume else train_step(ctx, data_version)
    if result.run_id:  # rank 0 only under torchrun
        echo_json({"run_id": result.run_id, **result.test_metrics})


def _train_on_cluster(ctx: Any, data_version: Any, workers: int) -> Any:
    """``--workers N``: the training step under Ray Train on the cluster ``cluster.address`` names."""
    from pipelines.cluster import ray_cluster
    from pipelines.settings.auto import AUTO
    from pipelines.train.on_cluster import train_on_cluster

    settings = ctx.settings
    if not settings.cluster.enabled:
        raise FluxoError(f"--workers {workers}: no cluster to train on; set cluster.address (--set cluster.address=local "
                         "starts one on this machine, HOST:PORT joins a running one), or use --nproc for processes "
                         "on this machine")
    if settings.model.name == AUTO:
        raise FluxoError("model.name=auto races its candidates on the cluster by itself: drop --workers, or name a "
                         "model to train with --workers")
    with ray_cluster(settings.cluster) as cluster:
        return train_on_cluster(ctx, data_version, workers, cluster.cpus)


def check_preset_matches_data(invocation: Invocation) -> None:
    """Commands that train on data/ refuse a preset naming another dataset, instead of training on data/."""
    from pipelines.data.store import MANIFEST, read_dataset
    from pipelines.settings import explicit_dataset
    from pipelines.train.run import check_data_matches

    named = explicit_dataset(invocation.config, invocation.overrides)
    if named is None:
        return
    data_dir = Path(invocation.root) / invocation.settings.data.data_dir
    if not (data_dir / MANIFEST).is_file():
        preset = f" --config {invocation.config}" if invocation.config else ""
        raise FluxoError(f"{data_dir}: no dataset yet; run `fluxo data ingest{preset}` first")
    check_data_matches(named[0], read_dataset(data_dir), named[1])


def _relaunch_with_torchrun(nproc: int) -> int:
    """Run this same `fluxo train` under torchrun, N processes on this machine, minus --nproc."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        args.append(arg)
    command_line = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "pipelines.cli", *args]
    log.info("launching %s", " ".join(command_line))
    return subprocess.call(command_line)


@app.command()
@command
def export(
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="MLflow run to export; default the newest.")] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
) -> None:
    """Export a run's best model to ONNX, check parity, register it and decide the champion.

    The registry entry, dataset and input contract come from the run itself; --config only
    says where the stores are and how to export (opset, parity tolerance).
    """
    from pipelines.release import export_run

    result = export_run(Invocation(config, overrides or [], root).context(), run_id)
    echo_json({"run_id": result.run_id, "export_dir": str(result.export_dir), "model": result.registered_model,
               "version": result.model_version, "parity": result.parity.as_dict(),
               "promotion": result.promotion.reason if result.promotion else None,
               "served_dir": str(result.served_dir) if result.served_dir else None})


@app.command()
@command
def tune(
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
    trials: Annotated[Optional[int], typer.Option("--trials", min=1, help="Trials to run; default tune.trials.")] = None,
    export_best: Annotated[
        bool, typer.Option("--export", help="Train the best configuration as a normal run, export it and decide the champion.")
    ] = False,
    preset: Annotated[
        Optional[Path], typer.Option("--preset", help="Where to write the best configuration; default .fluxo/tune/<study run id>.yaml.")
    ] = None,
) -> None:
    """Search the preset's tune.space with Optuna: each trial a nested MLflow run, pruned on the validation metric."""
    from pipelines.data.ingest import version
    from pipelines.train.tune import best_overrides, validate_space, write_best_preset
    from pipelines.train.tune import tune as tune_step

    invocation = Invocation(config, [*(overrides or []), *([f"tune.trials={trials}"] if trials else [])], root)
    check_preset_matches_data(invocation)
    validate_space(invocation.settings, invocation.settings.tune)  # a bad key: before data is versioned or a store opened
    data_version = version(root, invocation.settings.data)
    ctx = invocation.context()
    result = tune_step(ctx, invocation.settings.tune, data_version)
    written = write_best_preset(result, preset or root / ".fluxo" / "tune" / f"{result.parent_run_id}.yaml")
    summary: dict[str, Any] = {
        "study_run_id": result.parent_run_id,
        f"best_{result.metric}": result.best_value,
        "best_trial": result.best_trial,
        "best_run_id": result.best_run_id,
        "trials": result.counts,
        "best_params": result.best_params,
        "set": best_overrides(result),
        "preset": str(written),
    }
    if export_best:
        summary["export"] = _train_and_release(ctx.with_settings(result.best_settings), data_version)
    typer.echo(json.dumps(summary, indent=2))


def _train_and_release(ctx: Any, data_version: Any) -> dict[str, Any]:
    """The best configuration of a study as a normal run: trained, exported, gated."""
    from pipelines.release import export_run
    from pipelines.train.run import train as train_step

    trained = train_step(ctx, data_version)
    exported = export_run(ctx, trained.run_id, trained.checkpoint)
    return {"run_id": trained.run_id, **trained.test_metrics, "model": exported.registered_model,
            "version": exported.model_version, "promotion": exported.promotion.reason if exported.promotion else None}
