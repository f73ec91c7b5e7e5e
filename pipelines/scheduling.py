"""Scheduled runs that run: a Prefect server with its scheduler, and a runner that executes the runs.

Prefect's embedded (temporary) server answers API calls but runs none of its services, so
a deployment served against it never gets a scheduled run. ``fluxo schedule`` therefore
starts ``prefect server start`` on a free loopback port (its database under
``.fluxo/prefect``) unless ``PREFECT_API_URL`` names a real server, then serves the
deployment from this process until stopped; stopping stops the server too.

A server started with ``PREFECT_SERVER_API_AUTH_STRING`` (the compose stack's) answers only
clients that send it: ``PREFECT_API_AUTH_STRING`` or ``PREFECT_API_AUTH_STRING_FILE``. With one
of those set, the local server started here asks for it too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from pipelines.errors import FluxoError
from pipelines.secret_files import load_prefect_secrets

if TYPE_CHECKING:
    from pipelines.context import RunContext

log = logging.getLogger(__name__)


def _wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FluxoError(f"prefect server exited with status {process.returncode}; its log is {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise FluxoError(f"prefect server did not answer {url}/health within {timeout:.0f} s; its log is {log_path}")


def _auth_headers() -> dict[str, str]:
    """The header Prefect's client sends: HTTP basic with the whole auth string as the credentials."""
    import base64

    auth = os.environ.get("PREFECT_API_AUTH_STRING", "")
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


def _refused(url: str) -> FluxoError:
    if os.environ.get("PREFECT_API_AUTH_STRING"):
        return FluxoError(f"the Prefect API at {url} refused PREFECT_API_AUTH_STRING (401): it is not the server's "
                          "PREFECT_SERVER_API_AUTH_STRING; give the right one (deploy/secrets/prefect_auth_string)")
    return FluxoError(f"the Prefect API at {url} wants an auth string (401): set PREFECT_API_AUTH_STRING or "
                      "PREFECT_API_AUTH_STRING_FILE to the server's PREFECT_SERVER_API_AUTH_STRING")


def check_access(url: str) -> None:
    """Refuse now, in one line, when the server wants an auth string this process lacks (instead of mid-serve).

    An unreachable server is left to Prefect's own retries and messages.
    """
    try:
        answer = httpx.get(f"{url.rstrip('/')}/admin/version", headers=_auth_headers(), timeout=10)
    except httpx.HTTPError as error:
        log.debug("could not ask %s whether it wants an auth string: %s", url, error)
        return
    if answer.status_code in (401, 403):
        raise _refused(url)


def prefect_refusal(error: BaseException) -> FluxoError | None:
    """A 401/403 of the Prefect API at ``PREFECT_API_URL`` (an ``httpx.HTTPStatusError`` in the chain) as a
    one-line FluxoError, else None."""
    api = os.environ.get("PREFECT_API_URL", "").strip().rstrip("/")
    seen: list[BaseException] = []
    item: BaseException | None = error
    while api and item is not None and item not in seen:
        seen.append(item)
        if (isinstance(item, httpx.HTTPStatusError) and item.response.status_code in (401, 403)
                and str(item.request.url).startswith(api)):
            return _refused(api)
        item = item.__cause__ or item.__context__
    return None


@contextlib.contextmanager
def scheduling_server(root: Path, scheduler_loop_seconds: float | None = None) -> Iterator[str]:
    """The Prefect API to schedule against: ``PREFECT_API_URL`` if set, the project's running server, else
    a server started here with its scheduler, recorded as the project's while it runs and stopped with it."""
    from pipelines.orchestration import clear_record, free_port, home, lease, running_server, stop_group, write_record

    load_prefect_secrets()
    existing = os.environ.get("PREFECT_API_URL", "").strip()
    if existing:
        check_access(existing)
        log.info("scheduling against the Prefect server at %s", existing)
        yield existing
        return
    shared = running_server(root)
    if shared is not None:  # one database, one server: `fluxo run` left the project's server up
        with lease(root):
            log.info("scheduling against this project's Prefect server at %s", shared["url"])
            yield str(shared["url"])
        return
    folder = home(root)
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    process = _start_server(folder, port, scheduler_loop_seconds)
    write_record(root, {"url": url, "port": port, "home": str(folder), "keeper": os.getpid(), "owner": "schedule"})
    try:
        _wait_healthy(url, process, folder / "server.log")
        log.info("started a Prefect server with its scheduler at %s (state in %s, log %s); its UI, with the "
                 "scheduled runs and their logs: %s/", url, folder, folder / "server.log", url.removesuffix("/api"))
        yield url
    finally:
        stop_group(process)
        clear_record(root, os.getpid())
        log.info("stopped the Prefect server at %s", url)


def _start_server(folder: Path, port: int, scheduler_loop_seconds: float | None) -> subprocess.Popen:
    from pipelines.orchestration import server_command, server_env

    with (folder / "server.log").open("ab") as server_log:
        return subprocess.Popen(server_command(port), env=server_env(folder, port, scheduler_loop_seconds),
                                stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)


def has_champion(ctx: RunContext, model_name: str) -> bool:
    """Whether the registry has a version under the champion alias (a refused login is an error, not "no")."""
    from pipelines.registry.versions import champion_version

    return champion_version(ctx.client(), model_name, ctx.settings.tracking.champion_alias) is not None


def start_first_run(deployment: Any) -> None:
    """Register ``deployment`` and ask for one run of it now; the runner that serves it next executes it.

    The run belongs to the scheduled deployment (same parameters, same page in Prefect's UI)
    rather than being a run beside it; ``serve`` applies the deployment again unchanged.
    """
    from prefect.deployments import run_deployment

    deployment.apply()
    run = run_deployment(f"{deployment.flow_name}/{deployment.name}", timeout=0)
    log.info("no champion yet: started pipeline run %s now, before the first scheduled one", run.name)


def serve_scheduled(cron: str | None, config: str | None, overrides: list[str], root: str, name: str,
                    scheduler_loop_seconds: float | None = None, monitor_cron: str | None = None,
                    retrain_on_drift: str | None = None, model_name: str | None = None,
                    first_run: bool = False) -> None:
    """Serve the deployments until SIGTERM or Ctrl-C; each due or triggered run executes here.

    The pipeline deployment runs on ``cron`` and, with ``retrain_on_drift`` (a model name), on
    every drift event of that model; ``monitor_cron`` adds the drift check as a second
    deployment on its own schedule. ``first_run``: one pipeline run right away as well (the
    caller decides when, e.g. while ``model_name`` has no champion on a fresh stack).
    """
    from prefect import serve
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    def _on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_sigterm)
    with scheduling_server(Path(root), scheduler_loop_seconds) as url:
        os.environ["PREFECT_API_URL"] = url  # the flow-run processes the runner starts inherit it
        # Prefect read its settings on import, perhaps before the auth string was read from its file.
        updates = {PREFECT_API_URL: url, **({PREFECT_API_AUTH_STRING: os.environ["PREFECT_API_AUTH_STRING"]}
                                            if os.environ.get("PREFECT_API_AUTH_STRING") else {})}
        with temporary_settings(updates=updates):
            from pipelines.flows import monitor_deployment, scheduled_deployment  # torch: after the server answered

            deployments = [scheduled_deployment(cron, config, overrides, root, name, retrain_on_drift)]
            if monitor_cron:
                deployments.append(monitor_deployment(monitor_cron, config, overrides, root, name, model_name))
            try:
                if first_run:
                    start_first_run(deployments[0])
                serve(*deployments)
            except KeyboardInterrupt:
                log.info("stopping the scheduled deployment %s", name)
            except Exception as error:
                refused = prefect_refusal(error)
                if refused is None:
                    raise
                raise refused from error
