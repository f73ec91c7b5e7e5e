"""``fluxo ui`` and ``fluxo prefect``: the MLflow and Prefect UIs over this project's stores, and its Prefect server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from pipelines.cli.app import Invocation, RootOption, app, command, echo_json, prefect_app


@app.command()
@command
def ui(
    port: Annotated[Optional[int], typer.Option("--port", help="HTTP port: 5000 for MLflow, 4200 for Prefect.")] = None,
    host: Annotated[str, typer.Option("--host", help="Interface to bind.")] = "127.0.0.1",
    prefect: Annotated[bool, typer.Option("--prefect", help="Prefect's UI over the flow runs of this project "
                                          "(its Prefect server), instead of MLflow's.")] = False,
    root: RootOption = Path("."),
) -> None:
    """Open the MLflow UI on the local store (or MLFLOW_TRACKING_URI); Ctrl+C or SIGTERM stops all of it."""
    if prefect:
        _prefect_ui(host, port or 4200, root)
    from pipelines.redact import redact_uri
    from pipelines.ui import run_ui, runs_url

    ctx = Invocation(root=root).context()  # creates or tags the experiment as a training one
    typer.echo(f"MLflow UI on {runs_url(host, port or 5000, ctx.experiment_id)} for {redact_uri(ctx.tracking_uri)}")
    raise typer.Exit(code=run_ui(ctx.tracking_uri, host, port or 5000))


def _prefect_ui(host: str, port: int, root: Path) -> NoReturn:
    """Prefect's own UI where fluxo's flow runs are: a real server's, the project's running one, or one started
    here over the project's Prefect home (recorded as the project's server while it runs, so flow runs use it)."""
    from pipelines.orchestration import clear_record, home, leases_held, running_server, stop_server, write_record
    from pipelines.redact import redact_uri
    from pipelines.ui import browser_url, prefect_ui_command, prefect_ui_env, run_server

    remote = redact_uri(os.environ.get("PREFECT_API_URL", "").strip())
    if remote:
        typer.echo(f"fluxo's flow runs are on the Prefect server at {remote}; its UI is at "
                   f"{remote.rstrip('/').removesuffix('/api')}")
        raise typer.Exit(code=0)
    running = running_server(root)
    if running is not None and (running.get("owner") != "keeper" or leases_held(root)):
        # One database, one server: a schedule or a run in progress keeps its own, which has the UI.
        typer.echo(f"Prefect UI on {str(running['url']).removesuffix('/api')}/ (this project's Prefect server)")
        raise typer.Exit(code=0)
    if running is not None:
        stop_server(root)  # idle: the UI's server takes its place until it stops
    folder = home(root)
    folder.mkdir(parents=True, exist_ok=True)
    url = f"{browser_url(host, port)}/api"
    write_record(root, {"url": url, "port": port, "home": str(folder), "keeper": os.getpid(), "owner": "ui"})
    typer.echo(f"Prefect UI on {browser_url(host, port)}/ for the flow runs in {folder}")
    try:
        code = run_server(prefect_ui_command(host, port), {**prefect_ui_env(host, port), "PREFECT_HOME": str(folder)})
    finally:
        clear_record(root, os.getpid())
    raise typer.Exit(code=code)


@prefect_app.command("status")
@command
def prefect_status(root: RootOption = Path(".")) -> None:
    """Where this project's Prefect server answers, if it runs (PREFECT_API_URL: that one)."""
    from pipelines.orchestration import home, running_server
    from pipelines.redact import redact_uri

    remote = redact_uri(os.environ.get("PREFECT_API_URL", "").strip())
    record = running_server(root)
    echo_json({"api_url": remote or (record or {}).get("url"), "project_server": record is not None and not remote,
               "home": str(home(root)), "keeper_pid": (record or {}).get("keeper")})


@prefect_app.command("stop")
@command
def prefect_stop(root: RootOption = Path(".")) -> None:
    """Stop this project's Prefect server now (the next flow run starts it again)."""
    from pipelines.orchestration import stop_server

    typer.echo("stopped this project's Prefect server" if stop_server(root) else "no Prefect server runs for this project")
