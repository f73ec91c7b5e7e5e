"""``fluxo serve``'s life cycle: the model from the store, its live root, the follower, the server, the stop.

The service itself (serving/) knows nothing of MLflow; this is the part that does: it
fetches the champion (or ``--model``) through the model store, publishes it to the alias's
model root the server watches, follows the registry so promotions elsewhere reach this
server, starts ``bentoml serve`` with the one :class:`serving.ServingConfig` the settings
build, and on SIGTERM or Ctrl-C drains it and leaves nothing behind, however many signals come.
A server that dies by itself makes ``fluxo serve`` fail with it (:class:`ServerExited`). The
server's environment holds none of MLflow's or Prefect's credentials: only this process talks to them.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from pipelines.errors import FluxoError

if TYPE_CHECKING:
    from pipelines.cli.app import Invocation
    from pipelines.context import RunContext
    from pipelines.registry.follow import RegistryFollower
    from serving.contract import ModelDir

log = logging.getLogger(__name__)

CHAMPION_POLL_S = 5.0
READY_TIMEOUT_S = 120.0


class _Stop(Exception):
    """SIGTERM or Ctrl-C: leave the wait through the `finally` that drains the server."""


class ServerExited(FluxoError):
    """The model server stopped by itself while serving: ``fluxo serve`` fails with its exit status.

    Exiting 0 then told a supervisor (``make run``, systemd, a container runtime) that all was
    well, and nothing restarted a replica that no longer served. The status is the server's, or
    128+N for signal N as a shell reports it (137 for the OOM killer's SIGKILL).
    """

    def __init__(self, pid: int, returncode: int) -> None:
        from pipelines.ui import exit_status

        if returncode < 0:
            name = signal.Signals(-returncode).name
            how = f"was killed by {name}" + (" (the kernel's OOM killer or a `kill -9`: `dmesg` says which)"
                                               if -returncode == signal.SIGKILL else "")
        else:
            how = f"exited with status {returncode}; its output above says why"
        super().__init__(f"the model server (pid {pid}) {how}; fluxo serve stopped with it")
        self.exit_code = exit_status(returncode)


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


def start_following(ctx: RunContext, name: str, champion: str | None) -> RegistryFollower | None:
    """The registry follower for a served alias root; its first look publishes the current challenger."""
    from pipelines.registry.follow import RegistryFollower

    tracking, serve = ctx.settings.tracking, ctx.settings.serve
    aliases = [tracking.champion_alias] + ([tracking.challenger_alias] if serve.rollout != "champion" else [])
    follower = RegistryFollower(ctx, name, aliases, serve.follow_interval_s or 3600.0)
    follower.seen[tracking.champion_alias] = champion
    follower.poll()
    return follower.start() if serve.follow_interval_s > 0 else None


def wait_for_champion(ctx: RunContext, name: str) -> ModelDir:
    """The champion's model directory, once there is one: a replica started before the first training
    waits here (SIGTERM still stops it) instead of failing and being restarted in a loop."""
    from pipelines.registry.store import NotRegisteredYet, materialize_model

    said = False
    while True:
        try:
            return materialize_model(ctx, None, name)
        except NotRegisteredYet as error:
            if not said:
                log.info("waiting for a champion: %s (looking every %.0f s)", error, CHAMPION_POLL_S)
                said = True
            time.sleep(CHAMPION_POLL_S)


def _served_roots(ctx: RunContext, model: str | None, name: str, wait: bool) -> tuple[ModelDir, Path, Path | None]:
    """(the model directory, the path the server watches, the challenger's root or None).

    The champion is served through its model root: each later promotion republishes the
    root and the server switches without a restart. An explicit ``--model`` stays fixed.
    """
    from pipelines.registry.publish import model_root
    from pipelines.registry.store import materialize_model
    from serving.reload import publish

    served_dir = wait_for_champion(ctx, name) if wait and model is None else materialize_model(ctx, model, name)
    rollout = ctx.settings.serve.rollout
    if model is not None:
        if rollout != "champion":
            raise FluxoError(f"serve.rollout={rollout} needs the registry's challenger; serve without --model")
        return served_dir, served_dir.path, None
    root = model_root(ctx.root, ctx.settings, name)
    publish(root, served_dir.path)
    challenger = (model_root(ctx.root, ctx.settings, name, ctx.settings.tracking.challenger_alias)
                  if rollout != "champion" else None)
    return served_dir, root, challenger


def start(ctx: RunContext, model: str | None, host: str, port: int, name: str, wait: bool) -> tuple[Any, Any, ModelDir]:
    """Fetch, publish, follow and spawn: (the server process, the follower or None, the model directory)."""
    from pipelines.monitor.status import status_path
    from pipelines.secret_files import without_client_secrets
    from serving import ServingConfig
    from serving.launch import start_server

    served_dir, served, challenger = _served_roots(ctx, model, name, wait)
    follower = start_following(ctx, name, served_dir.version) if model is None else None
    try:
        # The verdicts of `fluxo monitor` for this model become the server's fluxo_drift_* gauges.
        config = ctx.settings.serve.serving_config(ctx.root, ServingConfig.from_env(), served, challenger,
                                                   drift_status=status_path(ctx.root, name))
        # Each web worker gets a copy of the server's environment: none of MLflow's or Prefect's credentials.
        return (start_server(config, port=port, host=host, inherit=without_client_secrets(os.environ)),
                follower, served_dir)
    except BaseException:
        if follower is not None:
            follower.stop()
        raise


def serve_model(invocation: Invocation, model: str | None, host: str, port: int, name: str,
                wait_for_champion: bool = False) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain; a user's mistake is raised once the server is stopped.

    A server that stops by itself (a crash, the OOM killer) is a failure: :class:`ServerExited`,
    once everything it left is stopped too, never a normal end with exit status 0.
    """
    from serving.launch import stop_server, wait_ready

    ctx = invocation.context(experiment=False)  # a reader of the registry: it may not create the experiment
    process, follower, served_dir = start(ctx, model, host, port, name, wait_for_champion)
    # `kill`, systemd and container runtimes stop us with SIGTERM, a person with Ctrl-C: leave through
    # the `finally` below, so the server drains its requests, no worker is left holding the port, and a
    # normal stop exits 0, however many signals come.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_stop_signal)
    record, asked_to_stop = None, False
    try:
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        wait_ready(url, timeout=READY_TIMEOUT_S, process=process)
        metadata = served_dir.as_dict()
        record = record_server(ctx, url, str(metadata["model_name"]), model)
        _print_welcome(ctx, url, served_dir, metadata, following=follower is not None if model is None else None)
        process.wait()
    except (KeyboardInterrupt, _Stop):
        log.info("stopping the server")
        asked_to_stop = True
    finally:
        _keep_draining_on_signals()
        if record is not None:
            record.unlink(missing_ok=True)
        if follower is not None:
            follower.stop()
        stop_server(process)
    # Status 0 unasked: it was stopped on request all the same (systemd's SIGTERM to the whole group).
    if not asked_to_stop and process.returncode:
        raise ServerExited(process.pid, process.returncode)


def _print_welcome(ctx: RunContext, url: str, served_dir: ModelDir, metadata: dict[str, Any],
                   following: bool | None) -> None:
    """Where it serves, a ready-to-paste request, the report; whether promotions will reach it."""
    from serving.client import example_request
    from serving.contract import REPORT_FILE

    typer.echo(f"\nfluxo is serving {metadata['model_name']} v{metadata['model_version']} at {url}")
    instance = example_instance(ctx, metadata)
    example = example_request(metadata, url, instances=[instance] if instance is not None else None)
    report = f"\n  report:   {url}/report (open it in a browser)" if (served_dir.path / REPORT_FILE).is_file() else ""
    answers = (f'\n            (a regression model: answers {{"value"}} per instance, in the units of '
               f'{metadata["labels"][0]})' if metadata.get("task") == "regression" else "")
    typer.echo(f"  metadata: curl -s {url}/metadata\n  predict:  {example['curl']}{answers}{report}\n")
    if following is not None:
        typer.echo(f"  following {'the registry and ' if following else ''}local promotions: "
                   "a new champion is served within seconds\n")


def example_instance(ctx: RunContext, metadata: dict[str, Any]) -> list[Any] | dict[str, Any] | None:
    """A real held-out sample for the printed example: the model directory's, else data/'s if it is the model's.

    A table model's row is an object keyed by column name, a category as its text, as POST /predict takes it.
    """
    from pipelines.data.store import read_dataset
    from pipelines.data.versioning import read_data_version
    from serving.contract import TableInput
    from serving.table_rows import row_object

    if metadata.get("example_instance") is not None:
        return metadata["example_instance"]
    data_dir = ctx.settings.data.data_dir
    try:
        if read_data_version(ctx.root / f"{data_dir}.dvc").md5 != metadata.get("data_version"):
            return None
        test = read_dataset(ctx.root / data_dir).splits["test"]
    except FluxoError:
        return None
    if len(test.y) == 0:
        return None
    if metadata.get("kind") == "table" and metadata.get("table"):
        return row_object(test.x[0], TableInput.model_validate(metadata["table"]))
    return test.x[0].tolist()


def record_server(ctx: RunContext, url: str, name: str, model: str | None) -> Path:
    """This server's note in .fluxo/servers/, read by `fluxo monitor` and `fluxo status` (pipelines/live.py)."""
    from pipelines.live import ServerRecord, record_server as write_record

    payload_log = ctx.settings.serve.payload_log_under(ctx.root)
    if payload_log and "://" not in payload_log:
        payload_log = str(Path(payload_log).resolve())
    if model is not None and not model.startswith("models:/"):
        model = str(Path(model).resolve())
    return write_record(ctx.root, ServerRecord(url=url, pid=os.getpid(), model_name=name, model=model,
                                               payload_log=payload_log))
