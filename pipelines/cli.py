"""The ``fluxo`` command: thin subcommands over the pipeline steps.

Only typer is imported here: every step (and torch, MLflow, Prefect, BentoML behind
it) loads inside the command that needs it, so ``fluxo --help``, ``fluxo serve`` and
``fluxo ui`` start without torch.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer

from pipelines.errors import FluxoError

if TYPE_CHECKING:
    from pipelines.settings import FluxoSettings

class _App(typer.Typer):
    """The ``fluxo`` console script: a tracking or Prefect server's refusal (401/403) is the user's to fix.

    Such an error can come from deep inside a step or a flow, as MLflow's or httpx's own
    exception; here, where every command ends, it becomes one line and exit status 2 like any
    FluxoError, never a traceback (unless -v) and never a retry.
    """

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return super().__call__(*args, **kwargs)
        except Exception as error:
            refused = _refusal(error)
            if refused is None:
                raise
            log.debug("the error in full", exc_info=error)
            typer.secho(f"error: {refused}", fg=typer.colors.RED, err=True)
            raise SystemExit(2) from None


def _refusal(error: BaseException) -> FluxoError | None:
    from pipelines.tracking import tracking_refusal

    refused = tracking_refusal(error)
    if refused is None and "httpx" in sys.modules:
        from pipelines.scheduling import prefect_refusal

        refused = prefect_refusal(error)
    return refused


app = _App(help="fluxo: versioned data → tracked training → ONNX → REST.", no_args_is_help=True)
data_app = typer.Typer(help="Dataset steps.", no_args_is_help=True)
app.add_typer(data_app, name="data")

log = logging.getLogger("fluxo")

ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="YAML preset under configs/ that overrides the defaults.")
]
SetOption = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override one setting, e.g. --set train.epochs=3.")
]
RootOption = Annotated[Path, typer.Option("--root", help="Project root holding data/, data.dvc and mlflow/.")]

# Libraries that narrate every step at INFO; their warnings still come through.
NOISY_LOGGERS = ("dvc", "onnx_ir", "onnxscript", "torch.onnx", "mlflow", "alembic", "httpx", "prefect.events")
# A warnings filter (action:message:category:module) for the MLflow UI's workers; see configure_logging.
MLFLOW_UI_WSGI_WARNING = "ignore:starlette.middleware.wsgi is deprecated:UserWarning:mlflow.server.fastapi_app"


def configure_logging(verbose: bool) -> None:
    """Configured once, here: library code only ever calls ``logging.getLogger(__name__)``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # MLflow draws a progress bar for every artifact download, even a single small file, and
    # configures its own logger on import, so its level is set through its variable.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The embedded Prefect server and BentoML report usage home; offline, that only logs errors.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives its embedded server 20 s to start; on a busy 2-core machine (a training run
    # beside it, a test suite) it can need more, and "Timed out while attempting to connect to
    # ephemeral Prefect API server" would end a run that had nothing wrong with it.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    # MLflow's UI server (`fluxo ui`) imports Starlette's deprecated WSGI middleware in each of its
    # four workers: four StarletteDeprecationWarnings nobody here can act on. The workers are other
    # interpreters, so the filter goes through the environment; it matches that one import only.
    inherited = os.environ.get("PYTHONWARNINGS", "")
    if MLFLOW_UI_WSGI_WARNING not in inherited.split(","):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (inherited, MLFLOW_UI_WSGI_WARNING)))
    # fluxo's own lines (the gate's decision, the baseline warning) belong in the flow run's logs
    # in Prefect's UI beside Prefect's; outside a flow run they only go to the terminal.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipelines,models")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    logging.getLogger("prefect").addFilter(_TemporaryServerNote())
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        # The ONNX exporter warns that torchvision's detection ops are unavailable; no model here uses them.
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


class _TemporaryServerNote(logging.Filter):
    """Prefect's "Starting temporary server" line ends with a link to its docs on every run; it says
    instead where the runs are kept and how to see them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Starting temporary server on"):
            from pipelines.ui import prefect_home

            first = record.msg.split("\n", 1)[0]
            record.msg = (f"{first} for this run (flow runs are kept in {prefect_home()}; "
                          "`fluxo ui --prefect` shows them)")
        return True


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging, and tracebacks of errors.")] = False,
) -> None:
    configure_logging(verbose)
    atexit.register(_freeze_before_teardown)
    from pipelines.secret_files import load_client_secrets

    try:
        load_client_secrets()  # before any command imports Prefect, which reads its settings once
    except FluxoError as error:
        _fail(error)


def _freeze_before_teardown() -> None:
    """Registered first, so it runs after every other exit handler (MLflow, Prefect, logging).

    With MLflow, pandas and onnxruntime loaded, the interpreter's final garbage collections
    walk millions of objects: 0.65 s of a 3.3 s `fluxo predict` (measured, 2 CPUs). Frozen
    objects are skipped by those walks; nothing else of the exit changes.
    """
    import gc

    gc.freeze()


def _settings(config: Path | None, overrides: list[str] | None) -> FluxoSettings:
    from pipelines.settings import load_settings

    return load_settings(config, overrides or [])


def _fail(error: BaseException) -> NoReturn:
    """A user's mistake: one line naming the file, field or value and the fix; the trace only with -v."""
    log.debug("the error in full", exc_info=error)
    message = str(error).strip() or type(error).__name__
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _user_errors() -> tuple[type[BaseException], ...]:
    """FluxoError, the service's ServingError and a pydantic ValidationError: all the user's to fix."""
    from pydantic import ValidationError

    from serving import ServingError

    return (FluxoError, ServingError, ValidationError)


@app.command()
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
    overrides = [*(overrides or []), *(["model.name=auto"] if auto else []),
                 *([f"auto.budget_minutes={budget}"] if budget is not None else [])]
    try:
        settings = _settings(config, overrides)  # a mistake in the settings fails before Prefect starts
        from pipelines.flows import pipeline_flow, stop_temporary_server

        try:
            summary = pipeline_flow(config=str(config) if config else None, overrides=overrides or [], root=str(root),
                                    force=force)
        finally:
            stop_temporary_server()
    except _user_errors() as error:
        _fail(error)
    typer.echo(json.dumps(summary, indent=2))
    if serve:
        _serve(root, settings, None, settings.serve.host, settings.serve.port, summary["registered_model"])


@data_app.command("ingest")
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
    try:
        extra = [f"data.dataset={dataset}"] if dataset else []
        settings = _settings(config, (overrides or []) + extra)
        from pipelines.data.ingest import ingest, push
        from pipelines.data.store import read_dataset

        ingested = ingest(root, settings.data)
        pushed = push(root, settings.data)
        manifest = read_dataset(root / settings.data.data_dir).manifest
    except _user_errors() as error:
        _fail(error)
    report, data_version = ingested.report, ingested.version
    problems = {
        name: {"policy": check["policy"], "count": check["count"], "examples": check["examples"]}
        for name, check in report["checks"].items()
        if check["count"]
    }
    summary = {
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
        "data_version": data_version.md5,
        "pushed": pushed,
    }
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def train(
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the newest interrupted run in its MLflow run.")] = False,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="With --resume: the run to continue.")] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Data-parallel processes (torchrun, DDP).")] = 1,
) -> None:
    """Train and evaluate on the current data/ as a new MLflow run (or --resume an interrupted one)."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(code=_relaunch_with_torchrun(nproc))
    try:
        settings = _settings(config, overrides)
        _check_preset_matches_data(root, settings, config, overrides)
        from pipelines.data.ingest import version
        from pipelines.train.resume import resume_training
        from pipelines.train.run import train as train_step

        # `dvc add` is idempotent: it records the version of whatever data/ holds right now.
        data_version = version(root, settings.data)
        if resume:
            result = resume_training(root, settings, data_version, run_id)
        else:
            result = train_step(root, settings, data_version)
    except _user_errors() as error:
        _fail(error)
    if result.run_id:  # rank 0 only under torchrun
        typer.echo(json.dumps({"run_id": result.run_id, **result.test_metrics}, indent=2))


def _check_preset_matches_data(root: Path, settings: FluxoSettings, config: Path | None, overrides: list[str] | None) -> None:
    """Commands that train on data/ refuse a preset naming another dataset, instead of training on data/."""
    from pipelines.data.store import MANIFEST, read_dataset
    from pipelines.settings import explicit_dataset
    from pipelines.train.run import check_data_matches

    named = explicit_dataset(config, overrides)
    if named is None:
        return
    data_dir = Path(root) / settings.data.data_dir
    if not (data_dir / MANIFEST).is_file():
        raise FluxoError(f"{data_dir}: no dataset yet; run `fluxo data ingest{' --config ' + str(config) if config else ''}` first")
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
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pipelines.cli", *args]
    log.info("launching %s", " ".join(command))
    return subprocess.call(command)


@app.command()
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
    try:
        settings = _settings(config, overrides)
        from pipelines.export.step import export_run

        result = export_run(root, settings, run_id)
    except _user_errors() as error:
        _fail(error)
    typer.echo(
        json.dumps(
            {"run_id": result.run_id, "export_dir": str(result.export_dir), "model": result.registered_model,
             "version": result.model_version, "parity": result.parity.as_dict(), "promotion": result.promotion.reason,
             "served_dir": str(result.served_dir) if result.served_dir else None},
            indent=2,
        )
    )


def _example_instance(root: Path, settings: FluxoSettings, metadata: dict) -> list | None:
    """A real held-out sample for the printed example: the model directory's, else data/'s if it is the model's."""
    from pipelines.data.store import read_dataset
    from pipelines.data.versioning import read_data_version

    if metadata.get("example_instance") is not None:
        return metadata["example_instance"]
    try:
        if read_data_version(root / f"{settings.data.data_dir}.dvc").md5 != metadata.get("data_version"):
            return None
        test = read_dataset(root / settings.data.data_dir).splits["test"]
    except FluxoError:
        return None
    return test.x[0].tolist()


def _default_model_name(root: Path, settings: FluxoSettings, config: Path | None, overrides: list[str] | None) -> str:
    """Which registry entry `fluxo serve` follows: the setting, the preset's dataset, else what data/ holds."""
    from pipelines.data.store import MANIFEST
    from pipelines.identity import default_registered_model
    from pipelines.settings import dataset_display_name, explicit_dataset

    named = explicit_dataset(config, overrides)
    dataset = dataset_display_name(named[0]) if named else None
    manifest = Path(root) / settings.data.data_dir / MANIFEST
    if dataset is None and manifest.is_file():
        dataset = json.loads(manifest.read_text()).get("name")
    return default_registered_model(settings.tracking.registered_model, dataset or dataset_display_name(settings.data.dataset))


class _Stop(Exception):
    """SIGTERM or Ctrl-C: leave `_serve`'s wait through the `finally` that drains the server."""


def _on_stop_signal(signum: int, frame: object) -> None:
    """The first SIGTERM or SIGINT: stop serving. Any later one must not cut the drain short."""
    _keep_draining_on_signals()  # before raising: a second signal can land as soon as this one is handled
    raise _Stop()


def _keep_draining_on_signals() -> None:
    """From now on SIGTERM and SIGINT only say that the server is stopping.

    Raised again inside the `finally` that stops the server, a second signal abandoned the drain
    half-way: two tracebacks, exit status 1, and workers possibly left holding the port.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _while_stopping)


def _while_stopping(signum: int, frame: object) -> None:
    from serving.launch import STOP_TIMEOUT_S

    log.info("already stopping: the server is finishing its requests; whatever still runs after %.0f s is killed",
             STOP_TIMEOUT_S)


def _start_following(root: Path, settings: FluxoSettings, name: str, champion: str | None, rollout: str):
    """The registry follower for a served alias root; its first look publishes the current challenger."""
    from pipelines.export.follow import RegistryFollower

    tracking = settings.tracking
    aliases = [tracking.champion_alias] + ([tracking.challenger_alias] if rollout != "champion" else [])
    follower = RegistryFollower(root, settings, name, aliases, settings.serve.follow_interval_s or 3600.0)
    follower.seen[tracking.champion_alias] = champion
    follower.poll()
    return follower.start() if settings.serve.follow_interval_s > 0 else None


CHAMPION_POLL_S = 5.0


def _wait_for_champion(root: Path, settings: FluxoSettings, name: str):
    """The champion's model directory, once there is one: a replica started before the first training
    waits here (SIGTERM still stops it) instead of failing and being restarted in a loop."""
    from pipelines.export.publish import NotRegisteredYet, materialize_model

    said = False
    while True:
        try:
            return materialize_model(root, settings, None, name)
        except NotRegisteredYet as error:
            if not said:
                log.info("waiting for a champion: %s (looking every %.0f s)", error, CHAMPION_POLL_S)
                said = True
            time.sleep(CHAMPION_POLL_S)


def _serve(root: Path, settings: FluxoSettings, model: str | None, host: str, port: int, name: str,
           wait_for_champion: bool = False) -> None:
    rollout = settings.serve.rollout
    follower = None
    try:
        from pipelines.export.publish import materialize_model, model_root
        from serving.client import example_request
        from serving.contract import REPORT_FILE
        from serving.launch import start_server, stop_server, wait_ready
        from serving.reload import publish

        if wait_for_champion and model is None:
            served_dir = _wait_for_champion(root, settings, name)
        else:
            served_dir = materialize_model(root, settings, model, name)
        challenger = None
        if model is None:
            # Serve the champion through its model root: each later promotion republishes
            # the root and this server switches to the new version without a restart.
            served = model_root(root, settings, name)
            publish(served, served_dir.path)
            if rollout != "champion":
                challenger = model_root(root, settings, name, settings.tracking.challenger_alias)
            follower = _start_following(root, settings, name, served_dir.version, rollout)
        else:
            served = served_dir.path  # an explicit model stays fixed for the server's lifetime
            if rollout != "champion":
                raise FluxoError(f"serve.rollout={rollout} needs the registry's challenger; serve without --model")
        from pipelines.monitor.status import status_path
        from serving import DRIFT_STATUS_ENV

        # The verdicts of `fluxo monitor` for this model become the server's fluxo_drift_* gauges.
        drift_status = os.environ.get(DRIFT_STATUS_ENV) or str(status_path(Path(root).resolve(), name))
        process = start_server(served, port=port, host=host, challenger=challenger, rollout=rollout,
                               canary_share=settings.serve.canary_share, shadow_sample=settings.serve.shadow_sample,
                               payload_log=settings.serve.payload_log_under(root), payload_sample=settings.serve.payload_sample,
                               env={DRIFT_STATUS_ENV: drift_status, "FLUXO_VARIANT": settings.serve.variant})
    except _user_errors() as error:
        if follower is not None:
            follower.stop()
        _fail(error)

    # `kill`, systemd and container runtimes stop us with SIGTERM, a person with Ctrl-C: leave through
    # the `finally` below, so the server drains its requests, no worker is left holding the port, and a
    # normal stop exits 0, however many signals come.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_stop_signal)
    failure = None
    record = None
    try:
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        wait_ready(url, timeout=120, process=process)
        metadata = served_dir.as_dict()
        record = _record_server(root, settings, url, str(metadata["model_name"]), model)
        instance = _example_instance(root, settings, metadata)
        example = example_request(metadata, url, instances=[instance] if instance is not None else None)
        typer.echo(f"\nfluxo is serving {metadata['model_name']} v{metadata['model_version']} at {url}")
        report = f"\n  report:   {url}/report (open it in a browser)" if (served_dir.path / REPORT_FILE).is_file() else ""
        typer.echo(f"  metadata: curl -s {url}/metadata\n  predict:  {example['curl']}{report}\n")
        if model is None:
            following = "the registry and " if follower is not None else ""
            typer.echo(f"  following {following}local promotions: a new champion is served within seconds\n")
        process.wait()
    except _user_errors() as error:
        failure = error  # reported once the server is stopped
    except (KeyboardInterrupt, _Stop):
        log.info("stopping the server")
    finally:
        _keep_draining_on_signals()
        if record is not None:
            record.unlink(missing_ok=True)
        if follower is not None:
            follower.stop()
        stop_server(process)
    if failure is not None:
        _fail(failure)


def _record_server(root: Path, settings: FluxoSettings, url: str, name: str, model: str | None) -> Path:
    """This server's note in .fluxo/servers/, read by `fluxo monitor` and `fluxo status` (pipelines/live.py)."""
    from pipelines.live import ServerRecord, record_server

    payload_log = settings.serve.payload_log_under(root)
    if payload_log and "://" not in payload_log:
        payload_log = str(Path(payload_log).resolve())
    if model is not None and not model.startswith("models:/"):
        model = str(Path(model).resolve())
    return record_server(root, ServerRecord(url=url, pid=os.getpid(), model_name=name, model=model,
                                            payload_log=payload_log))


@app.command()
def serve(
    model: Annotated[
        Optional[str], typer.Option("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or an export directory.")
    ] = None,
    host: Annotated[Optional[str], typer.Option("--host", help="Interface to bind.")] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="HTTP port.")] = None,
    rollout: Annotated[
        Optional[str], typer.Option("--rollout", help="champion, shadow or canary (serve.rollout).")
    ] = None,
    canary_share: Annotated[
        Optional[float], typer.Option("--canary-share", help="canary: share answered by the challenger (serve.canary_share).")
    ] = None,
    variant: Annotated[
        Optional[str], typer.Option("--variant", help="auto, fp32, int8 or fp16: the precision served (serve.variant).")
    ] = None,
    wait_for_champion: Annotated[
        bool, typer.Option("--wait-for-champion", help="With no champion yet, wait for the first one instead of "
                                                       "failing (a replica started beside the first training).")
    ] = False,
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
) -> None:
    """Serve the champion (or --model) over REST with BentoML on ONNX Runtime, following the registry's aliases."""
    extra = ([f"serve.rollout={rollout}"] if rollout else []) + (
        [f"serve.canary_share={canary_share}"] if canary_share is not None else []) + (
        [f"serve.variant={variant}"] if variant else [])
    overrides = (overrides or []) + extra
    try:
        settings = _settings(config, overrides)
        name = _default_model_name(root, settings, config, overrides)
    except _user_errors() as error:
        _fail(error)
    _serve(root, settings, model, host or settings.serve.host, port or settings.serve.port, name, wait_for_champion)


ModelNameOption = Annotated[
    Optional[str], typer.Option("--model", help="Registered model; default fluxo-<dataset of the preset, else of data/>.")
]


def _echo_json(data: dict) -> None:
    typer.echo(json.dumps(data, indent=2))


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Registry version to promote, e.g. 3.")],
    challenger: Annotated[bool, typer.Option("--challenger", help="Make it the challenger instead of the champion.")] = False,
    model: ModelNameOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
) -> None:
    """Give a version the champion (or challenger) alias by hand; running servers switch to it."""
    try:
        settings = _settings(config, overrides)
        from pipelines.export.aliases import promote_version

        _echo_json(promote_version(root, settings, model or _default_model_name(root, settings, config, overrides),
                                   version, challenger))
    except _user_errors() as error:
        _fail(error)


@app.command()
def rollback(
    model: ModelNameOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
) -> None:
    """Give the champion alias back to the version that held it before; running servers switch back."""
    try:
        settings = _settings(config, overrides)
        from pipelines.export.aliases import rollback as rollback_step

        _echo_json(rollback_step(root, settings, model or _default_model_name(root, settings, config, overrides)))
    except _user_errors() as error:
        _fail(error)


@app.command()
def status(
    model: ModelNameOption = None,
    url: Annotated[
        Optional[str], typer.Option("--url", help="A running server to ask what it serves; default this project's "
                                                  "running server, else the configured address.")
    ] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
) -> None:
    """Which versions hold which alias, their gate scores, and what a running server reports serving."""
    try:
        settings = _settings(config, overrides)
        from pipelines.export.aliases import status as status_step

        live = None if model else _live_model(root, settings, config, overrides, url, url_may_be_down=True)
        server = url or (live.url if live else None) or f"http://{settings.serve.host}:{settings.serve.port}"
        report = status_step(root, settings, model or live.name, server)
        _echo_json({**report, "chosen": live.why if live else "--model"})
    except _user_errors() as error:
        _fail(error)


def _live_model(root: Path, settings: FluxoSettings, config: Path | None, overrides: list[str] | None,
                url: str | None, url_may_be_down: bool = False):
    """The model `fluxo monitor` and `fluxo status` act on: what is served, then the preset's, then data/'s."""
    from pipelines.live import choose_live_model
    from pipelines.settings import explicit_dataset

    def by_settings() -> str:
        return _default_model_name(root, settings, config, overrides)

    named = by_settings() if explicit_dataset(config, overrides) or settings.tracking.registered_model else None
    live = choose_live_model(Path(root), url, named, by_settings, url_may_be_down)
    log.info("model: %s", live.why)
    return live


@app.command()
def schedule(
    cron: Annotated[
        Optional[str], typer.Option("--cron", help='Cron expression for the pipeline, e.g. "0 3 * * *".')
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Deployment name.")] = "scheduled",
    monitor_cron: Annotated[
        Optional[str], typer.Option("--monitor-cron", help='Also run `fluxo monitor` on this cron, e.g. "0 * * * *".')
    ] = None,
    retrain_on_drift: Annotated[
        bool, typer.Option("--retrain-on-drift", help="Run the pipeline on every drift event of the served model.")
    ] = False,
    run_if_no_champion: Annotated[
        bool, typer.Option("--run-if-no-champion", help="Also run the pipeline once now when the registry has no "
                                                         "champion yet (a fresh deployment).")
    ] = False,
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
) -> None:
    """Run the pipeline on a cron schedule (and the drift check, and retraining on drift) until stopped.

    Without PREFECT_API_URL a local Prefect server with its scheduler and triggers is started
    for it (state in .fluxo/prefect) and stopped with it (Ctrl-C or SIGTERM); with
    PREFECT_API_URL the deployments are served against that server.
    """
    from prefect.client.schemas.schedules import CronSchedule

    if not (cron or monitor_cron or retrain_on_drift):
        _fail(FluxoError("nothing to schedule: give --cron, --monitor-cron or --retrain-on-drift"))
    for option, value in (("--cron", cron), ("--monitor-cron", monitor_cron)):
        if value is None:
            continue
        try:
            CronSchedule(cron=value)
        except ValueError:
            _fail(FluxoError(f'{option} {value!r}: not a cron expression; five fields, e.g. "0 3 * * *" for 03:00 daily'))
    try:
        settings = _settings(config, overrides)  # fail now, not at 3 a.m.
        model_name = (_default_model_name(root, settings, config, overrides)
                      if (monitor_cron or retrain_on_drift or run_if_no_champion) else None)
    except _user_errors() as error:
        _fail(error)
    from pipelines.scheduling import has_champion, serve_scheduled

    try:
        first_run = run_if_no_champion and not has_champion(Path(root), settings, model_name)
        serve_scheduled(cron, str(config) if config else None, overrides or [], str(Path(root).resolve()), name,
                        monitor_cron=monitor_cron, retrain_on_drift=model_name if retrain_on_drift else None,
                        model_name=model_name, first_run=first_run)
    except _user_errors() as error:
        _fail(error)


@app.command()
def monitor(
    model: Annotated[
        Optional[str], typer.Option("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or an export directory; "
                                                    "default the champion.")
    ] = None,
    window_hours: Annotated[
        Optional[float], typer.Option("--window-hours", help="How far back to read the payload log; default "
                                                             "monitor.window_hours.")
    ] = None,
    url: Annotated[
        Optional[str], typer.Option("--url", help="The running server whose model and payload log to check; "
                                                  "default this project's running server.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON only.")] = False,
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
) -> None:
    """Compare the live model's logged inputs and answers with its training data version (a Prefect flow).

    The model and its payload log are the served ones (--url, else this project's running server),
    else the champion of the dataset --config names, else of the dataset in data/; the first line
    says which and why.

    Logs a drift report (HTML and metrics) to MLflow, updates the service's fluxo_drift_* gauges and,
    on drift, emits the Prefect event `fluxo.drift.detected` (see `fluxo schedule --retrain-on-drift`).
    Exit status 0 either way; the verdict is `drift_detected` (null: too few logged requests).
    """
    try:
        settings = _settings(config, overrides)
        from pipelines.monitor.run import payload_dir

        live = None
        if model is None:
            live = _live_model(root, settings, config, overrides, url)
            overrides = [*(overrides or []), *_served_payload_log(root, settings, live)]
            settings = _settings(config, overrides)
        payload_dir(root, settings, live.url if live else None)  # no log: say so now, not after Prefect started
        name = live.name if live else None
        model = live.model if live else model
        from pipelines.flows import monitor_flow, stop_temporary_server

        try:
            summary = monitor_flow(config=str(config) if config else None, overrides=overrides or [],
                                   root=str(root), model=model, name=name, window_hours=window_hours)
        finally:
            stop_temporary_server()
    except _user_errors() as error:
        _fail(error)
    if live is not None:
        summary["chosen"] = live.why
    if as_json:
        _echo_json(summary)
        return
    if live is not None:
        typer.echo(f"model: {live.why}")
    verdict = {True: "drift detected", False: "no drift", None: "no decision"}[summary["drift_detected"]]
    typer.echo(f"{summary['model']} v{summary['model_version']}: {verdict}; window {summary['window']['start']} .. "
               f"{summary['window']['end']}, {summary['window']['instances']} instances")
    for name_of_signal, score in summary["scores"].items():
        typer.echo(f"  {name_of_signal:<10} MMD {score['statistic']:.5f}  p={score['p_value']:.3g}  (level {score['level']:.3g})")
    if summary.get("reason"):
        typer.echo(f"  {summary['reason']}")


def _served_payload_log(root: Path, settings: FluxoSettings, live) -> list[str]:
    """``monitor.payload_log=`` the served model's log, unless the user chose one (theirs is kept, with a note)."""
    from pipelines.monitor.run import payload_dir

    if live.payload_log is None:
        return []
    if not (settings.monitor.payload_log or settings.serve.payload_log):
        return [f"monitor.payload_log={live.payload_log}"]
    chosen = payload_dir(root, settings)
    if str(Path(chosen).resolve() if isinstance(chosen, Path) else chosen) != live.payload_log:
        log.warning("reading the payload log you set, %s; the server at %s writes %s", chosen, live.url,
                    live.payload_log)
    return []


@app.command()
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
    try:
        settings = _settings(config, (overrides or []) + ([f"tune.trials={trials}"] if trials else []))
        _check_preset_matches_data(root, settings, config, overrides)
        from pipelines.data.ingest import version
        from pipelines.export.step import export_run
        from pipelines.train.run import train as train_step
        from pipelines.train.tune import best_overrides, write_best_preset
        from pipelines.train.tune import tune as tune_step

        data_version = version(root, settings.data)
        result = tune_step(root, settings, settings.tune, data_version)
        written = write_best_preset(result, preset or root / ".fluxo" / "tune" / f"{result.parent_run_id}.yaml")
        summary = {
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
            trained = train_step(root, result.best_settings, data_version)
            exported = export_run(root, result.best_settings, trained.run_id, trained.checkpoint)
            summary["export"] = {
                "run_id": trained.run_id,
                **trained.test_metrics,
                "model": exported.registered_model,
                "version": exported.model_version,
                "promotion": exported.promotion.reason,
            }
    except _user_errors() as error:
        _fail(error)
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def ui(
    port: Annotated[Optional[int], typer.Option("--port", help="HTTP port: 5000 for MLflow, 4200 for Prefect.")] = None,
    host: Annotated[str, typer.Option("--host", help="Interface to bind.")] = "127.0.0.1",
    prefect: Annotated[bool, typer.Option("--prefect", help="Prefect's UI over the database `fluxo run` records "
                                          "its flow runs in (PREFECT_HOME), instead of MLflow's.")] = False,
    root: RootOption = Path("."),
) -> None:
    """Open the MLflow UI on the local store (or MLFLOW_TRACKING_URI); Ctrl+C or SIGTERM stops all of it."""
    if prefect:
        _prefect_ui(host, port or 4200)
    port = port or 5000
    try:
        settings = _settings(None, None)
        from pipelines.tracking import configure_experiment
        from pipelines.ui import run_ui, runs_url

        uri = settings.resolved_tracking_uri(root)
        experiment_id = configure_experiment(root, settings)  # creates or tags the experiment as a training one
    except _user_errors() as error:
        _fail(error)
    typer.echo(f"MLflow UI on {runs_url(host, port, experiment_id)} for {uri}")
    raise typer.Exit(code=run_ui(uri, host, port))


def _prefect_ui(host: str, port: int) -> NoReturn:
    """Prefect's own UI where fluxo's flow runs are: a real server's, or one started over PREFECT_HOME."""
    from pipelines.ui import browser_url, prefect_home, prefect_ui_command, prefect_ui_env, run_server

    remote = os.environ.get("PREFECT_API_URL", "").strip()
    if remote:
        typer.echo(f"fluxo's flow runs are on the Prefect server at {remote}; its UI is at "
                   f"{remote.rstrip('/').removesuffix('/api')}")
        raise typer.Exit(code=0)
    typer.echo(f"Prefect UI on {browser_url(host, port)}/ for the flow runs in {prefect_home()} "
               "(`fluxo schedule` keeps its own in .fluxo/prefect and prints its UI's address)")
    raise typer.Exit(code=run_server(prefect_ui_command(host, port), prefect_ui_env(host, port)))


@app.command()
def predict(
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT", help="Image folder (PNG/JPEG), or a .npy, .npz, .csv or .parquet file.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Parquet file to write: id, label, probability, ...")],
    model: Annotated[
        Optional[str], typer.Option("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or an export directory; "
                                                    "default the champion.")
    ] = None,
    on_error: Annotated[
        str, typer.Option("--on-error", help="Bad rows (wrong shape, NaN, unreadable image): skip (listed) or fail.")
    ] = "skip",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Instances read and run per chunk.")] = 4096,
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
) -> None:
    """Predict a whole file or folder offline with the served model; writes Parquet and records an MLflow run."""
    try:
        settings = _settings(config, overrides)
        # Only the champion needs the default name; working it out reads data/ (and loads scikit-learn).
        name = _default_model_name(root, settings, config, overrides) if model is None else ""
        from pipelines.predict.run import predict as predict_step

        result = predict_step(root, settings, input_path, output, model, name, on_error, batch_size)  # type: ignore[arg-type]
    except _user_errors() as error:
        _fail(error)
    _echo_json(result.summary())


# --- fluxo models -----------------------------------------------------------------------------

models_app = typer.Typer(help="The model registry: what `model.name` can be, and what each one looks like.")
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def models_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """List the registered models: name, the inputs they take, what they are."""
    if ctx.invoked_subcommand is not None:
        return
    from models import MODEL_REGISTRY

    specs = sorted(MODEL_REGISTRY.values(), key=lambda spec: (spec.input_kind, spec.name))
    if as_json:
        typer.echo(json.dumps([{"name": s.name, "input_kind": s.input_kind, "summary": s.summary} for s in specs],
                              indent=2))
        return
    width = max(len(spec.name) for spec in specs)
    typer.echo(f"{'model'.ljust(width)}  {'inputs':8}  summary")
    for spec in specs:
        typer.echo(f"{spec.name.ljust(width)}  {spec.input_kind:8}  {spec.summary}")
    typer.echo("\n`fluxo models show NAME --input-shape C,H,W` prints its layers and parameter counts.")


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="A registered model, e.g. cnn2d (see `fluxo models`).")],
    input_shape: Annotated[str, typer.Option("--input-shape", help="One instance's shape, e.g. 1,28,28 (C,H,W) "
                                             "or 1,40 (C,L).")],
    classes: Annotated[int, typer.Option("--classes", min=1, help="Number of labels (the head's width).")] = 10,
    params: Annotated[Optional[str], typer.Option("--params", help="The model's config as YAML/JSON, as in "
                                                  "model.params, e.g. '{channels: 8}'.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Each layer's output shape and parameter count for NAME on inputs of --input-shape, without training."""
    try:
        summary = _model_summary(name, input_shape, classes, params)
    except _user_errors() as error:
        _fail(error)
    typer.echo(json.dumps(summary.as_dict(), indent=2) if as_json else summary.table())


def _model_summary(name: str, input_shape: str, classes: int, params: str | None):
    import yaml

    from models import MODEL_REGISTRY, build_model
    from models.summary import summarize

    if name not in MODEL_REGISTRY:
        raise FluxoError(f"unknown model {name!r}; registered: {', '.join(sorted(MODEL_REGISTRY))} (`fluxo models`)")
    parts = [part.strip() for part in input_shape.replace("x", ",").split(",")]  # 1,28,28 or 1x28x28
    shape = tuple(int(part) for part in parts) if all(part.isdigit() for part in parts) else ()
    if not shape or any(size < 1 for size in shape):
        raise FluxoError(f"--input-shape {input_shape!r}: give positive sizes separated by commas, e.g. 1,28,28")
    config = yaml.safe_load(params) if params else {}
    if not isinstance(config, dict):
        raise FluxoError(f"--params {params!r}: give a mapping, e.g. '{{channels: 8}}'")
    try:
        model = build_model(name, shape, classes, **config)
        return summarize(name, model, shape, classes)
    except (ValueError, TypeError, RuntimeError) as error:
        raise FluxoError(f"{name} on inputs of shape {shape}: {error}") from None


if __name__ == "__main__":
    app()
