"""Start ``bentoml serve`` for a model directory and wait until it answers.

Used by the CLI (``fluxo serve``) and the HTTP tests. The server runs as a
child process, not in-process: BentoML spawns its own worker processes and
owns signals, so a subprocess is the one way to start and stop it cleanly.

Each server gets a Prometheus folder of its own. BentoML 1.4 ignores an inherited
``PROMETHEUS_MULTIPROC_DIR``: every ``bentoml serve`` hands its workers
``$BENTOML_HOME/prometheus_multiproc_dir`` (``bentoml.serving.ensure_prometheus_dir``, called by
``_bentoml_impl.server.serving.serve_http``), one folder for every server of a user, emptied by
each as it starts. Two servers then summed each other's requests on ``/metrics``, and a server
started later erased an earlier one's counts. So the server runs BentoML's command line through
this module (:func:`_bentoml`), which first sets that path in BentoML's container, as BentoML's
own pytest plugin does: BentoML itself empties the folder, gives it to its workers, and the
folder is removed when the server stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import httpx
import psutil

from serving import ServingConfig, ServingError

logger = logging.getLogger(__name__)

SERVICE_IMPORT = "serving.service:Fluxo"
# The directory that holds the ``serving`` package: BentoML imports the service from here.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PARENT_ENV = "FLUXO_SERVER_PARENT"
"""The pid of the process that started the server: the server stops once it is gone (:func:`_stop_when_orphaned`)."""
METRICS_DIR_ENV = "FLUXO_PROMETHEUS_DIR"
"""The server's own Prometheus folder, from :func:`start_server` to :func:`_bentoml` (see the module docstring)."""
STOP_TIMEOUT_S = 15.0
"""How long :func:`stop_server` lets the server drain before it kills what is left."""


class ServerProcess(subprocess.Popen[bytes]):
    """A started server, and its Prometheus folder, which :func:`stop_server` removes if the server could not."""

    def __init__(self, command: list[str], metrics_dir: Path, **kwargs: Any) -> None:
        self.metrics_dir = metrics_dir
        super().__init__(command, **kwargs)


def serve_command(model_dir: Path | str, port: int, host: str = "127.0.0.1") -> list[str]:
    """The ``bentoml serve`` argv for this model directory, run through :func:`_bentoml`.

    ``model_dir`` reaches the server through ``FLUXO_MODEL_DIR`` (see
    :func:`serve_env`), not argv: BentoML re-imports the service in each worker.
    The argument is kept so the caller's intent is explicit and checked.
    """
    if not Path(model_dir).is_dir():
        raise ServingError(f"model directory {model_dir}: no such directory; run the export step or `fluxo serve`")
    return [
        sys.executable,
        "-m",
        "serving.launch",  # this module as a program: :func:`_bentoml`
        "serve",
        SERVICE_IMPORT,
        "--working-dir",
        str(PROJECT_ROOT),
        "--host",
        host,
        "--port",
        str(port),
    ]


def serve_env(config: ServingConfig, extra: Mapping[str, str] | None = None,
              inherit: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ``inherit`` (default ours), then ``config`` as its ``FLUXO_*`` variables,
    then ``extra`` (which wins).

    Every worker gets a copy, so a caller that holds credentials the server needs not (``fluxo
    serve``: MLflow's and Prefect's) passes ``inherit`` without them.

    The result is read back the way each worker will read it, so a value no worker would
    accept (a share of 2, an unknown rollout) raises ServingError naming its variable here,
    before anything is spawned; so does a challenger with the rollout 'champion'.
    """
    env = dict(os.environ if inherit is None else inherit)
    env.update(config.to_env())
    # BentoML's usage analytics phone home; a local model server has no reason to.
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env.update(extra or {})
    served = ServingConfig.from_env(env)
    served.require_model_dir()
    if served.challenger_dir is not None and served.rollout == "champion":
        raise ServingError("a challenger was given but the rollout is 'champion', which never uses it; "
                           "choose rollout 'shadow' or 'canary'")
    return env


def check_model_dir(model_dir: Path | str, max_batch_size: int = 1) -> dict[str, Any]:
    """Load the model once on CPU here, before spawning anything, and return its metadata.

    ``model_dir`` may also be a model root (serving/reload.py); its live directory is checked.
    ``max_batch_size``: the server's ``FLUXO_MAX_BATCH_SIZE``; the graph is run at 1 row and at that
    many, as each worker will, so a graph fixed at batch 1 is refused here rather than in every worker.

    A broken directory otherwise surfaces only as a worker traceback in the
    server log while ``/readyz`` never turns ready; here it raises ServingError
    naming the file and the fix. onnxruntime is imported only now, not on import.
    """
    from serving.reload import resolve_model_dir
    from serving.runtime import CPU, OnnxModel

    return OnnxModel(resolve_model_dir(model_dir), providers=[CPU], max_batch_size=max_batch_size).metadata


def check_rollout(env: Mapping[str, str], champion: Mapping[str, Any]) -> None:
    """Check the rollout settings ``env`` gives the server, and its challenger if one is there already.

    ``champion`` is the champion's metadata (:func:`check_model_dir`). The server
    itself serves the champion alone when its challenger fails to load (the
    champion must not go down for it); at start-up, with a person watching, a
    broken or mismatched challenger is an error instead. A root without
    ``current.json`` yet is fine: the server waits for it.
    """
    from serving.contract import is_model_dir
    from serving.reload import is_model_root
    from serving.rollout import contract_mismatch

    config = ServingConfig.from_env(env)  # names the variable of a malformed value
    check_variant(config, champion)
    source = config.challenger_dir
    if config.rollout == "champion" or source is None or not (is_model_root(source) or is_model_dir(source)):
        return
    challenger = check_model_dir(source, config.max_batch_size)
    problem = contract_mismatch(_contract(champion), _contract(challenger))
    if problem is not None:
        raise ServingError(f"challenger {source} cannot stand in for the champion: {problem}")


def check_variant(config: ServingConfig, champion: Mapping[str, Any]) -> None:
    """``FLUXO_VARIANT`` against the champion's kept variants, before anything is spawned (the workers
    would refuse it the same way, in a log instead of the terminal)."""
    from serving.reload import resolve_model_dir
    from serving.runtime import choose_variant, providers_for

    if config.variant in ("auto", "fp32") or config.model_dir is None:
        return
    choose_variant(champion, config.variant, providers_for(config.provider)[0], resolve_model_dir(config.model_dir))


def _contract(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The fields :func:`serving.rollout.contract_mismatch` compares, as the server's ``/metadata`` has them."""
    from serving.images import image_spec

    spec = image_spec(metadata)
    return {**metadata, "image": spec.as_dict() if spec else None}


def start_server(
    config: ServingConfig,
    port: int,
    host: str = "127.0.0.1",
    *,
    env: Mapping[str, str] | None = None,
    log_file: IO[bytes] | None = None,
    inherit: Mapping[str, str] | None = None,
) -> ServerProcess:
    """Spawn ``bentoml serve`` for ``config.model_dir``; returns at once, see :func:`wait_ready`.

    The directory is checked first (:func:`check_model_dir`), so a broken one raises
    ServingError here instead of hanging the server. ``config`` reaches the workers as
    ``FLUXO_*`` variables (:func:`serve_env`); ``env`` adds or overrides variables (a test's
    FLUXO_MAX_BATCH_SIZE), ``inherit`` is what they start from (default: this process's
    environment). A challenger that is already there is checked like the champion
    (:func:`check_rollout`). Output goes to ``log_file`` when given, else to this process's
    stdout/stderr. The server gets its own session, so a Ctrl+C reaches only the caller, which
    then calls :func:`stop_server` in a ``finally``. Its Prometheus folder is its own, new and
    empty (see the module docstring).
    """
    model_dir = config.require_model_dir()
    server_env = serve_env(config, env, inherit)
    champion = check_model_dir(model_dir, ServingConfig.from_env(server_env).max_batch_size)
    check_rollout(server_env, champion)
    command = serve_command(model_dir, port, host)
    # Short and under the system's temporary folder: the workers' Unix sockets live in it too (serving/metrics.py).
    metrics_dir = Path(tempfile.mkdtemp(prefix="fluxo-metrics-"))
    server_env[METRICS_DIR_ENV] = str(metrics_dir)
    server_env[PARENT_ENV] = str(os.getpid())
    logger.info("starting %s (Prometheus files in %s)", " ".join(command), metrics_dir)
    try:
        return ServerProcess(
            command,
            metrics_dir,
            cwd=PROJECT_ROOT,
            env=server_env,
            stdout=log_file,
            stderr=subprocess.STDOUT if log_file is not None else None,
            start_new_session=True,
        )
    except BaseException:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        raise


def wait_ready(url: str, timeout: float = 60.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``{url}/readyz`` until it answers 200; raise ServingError on timeout or server exit."""
    deadline = time.monotonic() + timeout
    probe = url.rstrip("/") + "/readyz"
    last = "no answer yet"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise ServingError(
                    f"the server exited with code {process.returncode} before {probe} answered; "
                    "its log names the cause (often a bad FLUXO_MODEL_DIR)"
                )
            try:
                response = client.get(probe)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.TransportError as error:
                last = type(error).__name__
            time.sleep(0.2)
    raise ServingError(f"{probe} not ready after {timeout:.0f} s (last: {last}); check the server log")


def stop_server(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop the server and every worker it spawned; SIGKILL whatever outlives ``timeout``.

    SIGTERM lets each worker finish the requests in flight first (drain), so
    ``timeout`` should exceed the slowest request. Calling it again once the server has
    stopped does nothing more.

    BentoML's workers run in sessions of their own, so signalling the process
    group misses them; they are collected as descendants before the arbiter goes.
    An arbiter that died by itself (SIGKILL, the OOM killer) left its workers to nobody:
    they are found by the server's own Prometheus folder in their environment, and stopped.
    """
    try:
        workers = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    if process.poll() is None:
        process.terminate()  # the arbiter stops its workers gracefully on SIGTERM
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("server %d ignored SIGTERM for %.0f s; killing it", process.pid, timeout)
            process.kill()
            process.wait(timeout)
    elif not workers and isinstance(process, ServerProcess):
        workers = _orphans(process.metrics_dir)
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.terminate()  # no arbiter to drain them: each finishes its own requests
    _, alive = psutil.wait_procs(workers, timeout=timeout / 3)
    for worker in alive:
        logger.warning("server worker %d outlived the server; killing it", worker.pid)
        worker.kill()
    psutil.wait_procs(alive, timeout=timeout / 3)
    if isinstance(process, ServerProcess):
        shutil.rmtree(process.metrics_dir, ignore_errors=True)  # the server removes it itself, unless it was killed


def _orphans(metrics_dir: Path) -> list[psutil.Process]:
    """The processes of the server whose Prometheus folder is ``metrics_dir`` (each server's own, see
    :func:`start_server`), wherever they now hang: read from their environment, where visible to us."""
    found = []
    for candidate in psutil.process_iter():
        try:
            env = candidate.environ()
        except psutil.Error:  # another user's process, or one gone meanwhile
            continue
        if str(metrics_dir) in (env.get(METRICS_DIR_ENV), env.get("PROMETHEUS_MULTIPROC_DIR")):
            found.append(candidate)
    return found


def _stop_when_orphaned(parent: int, every_s: float = 1.0) -> None:
    """SIGTERM this server once the process that started it is gone.

    The server runs in a session of its own (a Ctrl-C must reach only `fluxo serve`, which then
    drains it), so when `fluxo serve` is killed outright (SIGKILL, the OOM killer) no signal
    reaches the server, and it kept answering and holding the port with nobody to stop it. A
    thread watching the parent pid is used rather than PR_SET_PDEATHSIG, which fires when the
    *thread* that started the server ends, not the process.
    """
    import signal
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        logger.warning("the process that started this server (pid %d) is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="fluxo-orphan-watch", daemon=True).start()


def _bentoml(argv: list[str]) -> None:
    """BentoML's command line in this process, with the Prometheus folder ``METRICS_DIR_ENV`` names.

    BentoML reads the folder from its container when the server starts, empties it and passes
    it to every worker as ``PROMETHEUS_MULTIPROC_DIR`` (the module docstring says why this way).
    Without the variable it is plain ``bentoml``. The folder is removed when the server exits.
    """
    parent = os.environ.get(PARENT_ENV)
    if parent:
        _stop_when_orphaned(int(parent))
    folder = os.environ.get(METRICS_DIR_ENV)
    if folder:
        from bentoml._internal.configuration.containers import BentoMLContainer

        BentoMLContainer.prometheus_multiproc_dir.set(folder)
    from bentoml_cli.cli import cli

    try:
        cli(args=argv, prog_name="bentoml")
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    _bentoml(sys.argv[1:])

