"""``fluxo serve``, ``monitor``, ``predict`` and ``schedule``: the commands about the live model."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipelines.cli.app import (
    ConfigOption, Invocation, ModelUriOption, RootOption, SetOption, app, command, echo_json, log,
)
from pipelines.errors import FluxoError


@app.command()
@command
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
    from pipelines.serve import serve_model

    chosen = {"serve.rollout": rollout, "serve.canary_share": canary_share, "serve.variant": variant}
    invocation = Invocation(config, [*(overrides or []), *(f"{key}={value}" for key, value in chosen.items()
                                                           if value is not None)], root)
    settings = invocation.settings
    serve_model(invocation, model, host or settings.serve.host, port or settings.serve.port,
                invocation.model_name(), wait_for_champion)


@app.command()
@command
def monitor(
    model: ModelUriOption = None,
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
    from pipelines.monitor.run import payload_dir
    from pipelines.orchestration import prefect_api

    invocation = Invocation(config, overrides or [], root)
    live = None
    if model is None:
        live = invocation.live_model(url)
        invocation = Invocation(config, [*invocation.overrides, *_served_payload_log(invocation, live)], root)
    payload_dir(root, invocation.settings, live.url if live else None)  # no log: say so now, not after Prefect started
    with prefect_api(root, invocation.settings.orchestration, prepare=lambda: import_module("pipelines.flows")):
        from pipelines.flows import monitor_flow

        summary = monitor_flow(**invocation.flow_parameters(), model=live.model if live else model,
                               name=live.name if live else None, window_hours=window_hours)
    if live is not None:
        summary["chosen"] = live.why
    if as_json:
        echo_json(summary)
    else:
        _print_verdict(summary, live)


def _print_verdict(summary: dict[str, Any], live: Any) -> None:
    if live is not None:
        typer.echo(f"model: {live.why}")
    verdict = {True: "drift detected", False: "no drift", None: "no decision"}[summary["drift_detected"]]
    window = summary["window"]
    typer.echo(f"{summary['model']} v{summary['model_version']}: {verdict}; window {window['start']} .. "
               f"{window['end']}, {window['instances']} instances")
    for signal, score in summary["scores"].items():
        typer.echo(f"  {signal:<10} MMD {score['statistic']:.5f}  p={score['p_value']:.3g}  (level {score['level']:.3g})")
    if summary.get("reason"):
        typer.echo(f"  {summary['reason']}")


def _served_payload_log(invocation: Invocation, live: Any) -> list[str]:
    """``monitor.payload_log=`` the served model's log, unless the user chose one (theirs is kept, with a note)."""
    from pipelines.monitor.run import payload_dir

    settings = invocation.settings
    if live.payload_log is None:
        return []
    if not (settings.monitor.payload_log or settings.serve.payload_log):
        return [f"monitor.payload_log={live.payload_log}"]
    chosen = payload_dir(invocation.root, settings)
    if str(Path(chosen).resolve() if isinstance(chosen, Path) else chosen) != live.payload_log:
        log.warning("reading the payload log you set, %s; the server at %s writes %s", chosen, live.url,
                    live.payload_log)
    return []


@app.command()
@command
def predict(
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT", help="Image folder (PNG/JPEG), or a .npy, .npz, .csv or .parquet file.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Parquet file to write: id, label, probability, ...")],
    model: ModelUriOption = None,
    on_error: Annotated[
        str, typer.Option("--on-error", help="Bad rows (wrong shape, NaN, unreadable image): skip (listed) or fail.")
    ] = "skip",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Instances read and run per chunk.")] = 4096,
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
) -> None:
    """Predict a whole file or folder offline with the served model; writes Parquet and records an MLflow run."""
    from pipelines.predict.run import check_input, predict as predict_step

    invocation = Invocation(config, overrides or [], root)
    # Only the champion needs the default name; working it out reads data/ (and loads scikit-learn).
    name = invocation.model_name() if model is None else ""
    check_input(Path(input_path))  # a missing file is the user's to fix, before any store is opened
    result = predict_step(invocation.context(), input_path, output, model, name, on_error, batch_size)  # type: ignore[arg-type]
    echo_json(result.summary())


@app.command()
@command
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
    if not (cron or monitor_cron or retrain_on_drift):
        raise FluxoError("nothing to schedule: give --cron, --monitor-cron or --retrain-on-drift")
    _check_cron("--cron", cron)
    _check_cron("--monitor-cron", monitor_cron)
    from pipelines.scheduling import has_champion, serve_scheduled

    invocation = Invocation(config, overrides or [], root)
    invocation.settings  # noqa: B018 - fail now, not at 3 a.m.
    model_name = invocation.model_name() if (monitor_cron or retrain_on_drift or run_if_no_champion) else None
    first_run = run_if_no_champion and not has_champion(invocation.context(experiment=False), model_name)
    parameters = invocation.flow_parameters()
    serve_scheduled(cron, parameters["config"], parameters["overrides"], str(Path(root).resolve()), name,
                    monitor_cron=monitor_cron, retrain_on_drift=model_name if retrain_on_drift else None,
                    model_name=model_name, first_run=first_run)


def _check_cron(option: str, value: str | None) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    if value is None:
        return
    try:
        CronSchedule(cron=value)
    except ValueError:
        raise FluxoError(f'{option} {value!r}: not a cron expression; five fields, e.g. "0 3 * * *" for 03:00 daily') from None
