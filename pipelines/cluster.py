"""Start or join the Ray cluster that ``cluster.address`` names, for the length of one command.

``local`` starts Ray inside the command's process on this machine, every server bound to loopback:
left to itself, Ray on Linux advertises and listens on the machine's external address even when told
127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is what keeps it on 127.0.0.1, read when Ray is
imported). A head's address joins a running cluster (the compose ``ray`` profile, KubeRay) whose
workers have fluxo installed. Either way the command stops what it started when it ends, also on
Ctrl-C or SIGTERM, and a cluster that cannot be reached is a :class:`FluxoError` naming the address.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipelines.errors import FluxoError
from pipelines.settings.cluster import LOCAL, ClusterSettings

log = logging.getLogger(__name__)

LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class ClusterInfo:
    """What the command runs on: where, with how many CPUs on how many nodes, and how long it took to get there."""

    address: str
    cpus: int
    nodes: int
    started: bool  # True: this command started it (local); False: it joined a running one
    seconds: float

    def describe(self) -> str:
        how = "started in this process" if self.started else "joined"
        return f"Ray cluster {self.address} ({how}): {self.nodes} node(s), {self.cpus} CPU(s), ready in {self.seconds:.1f} s"


def _import_ray(local: bool) -> Any:
    """Ray, with the loopback switch in place before its constants are read (a user's own value kept)."""
    if local:
        os.environ.setdefault(LOOPBACK_ONLY, "0")
    try:
        import ray
    except ImportError as error:
        raise FluxoError("cluster.address is set but Ray is not installed; pip install 'fluxo[cluster]' "
                         "(or unset cluster.address to run in this process)") from error
    if local and "ray._private.ray_constants" in sys.modules and os.environ.get(LOOPBACK_ONLY) == "0":
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False  # Ray imported earlier in this process
    return ray


def _info(ray: Any, address: str, started: bool, began: float) -> ClusterInfo:
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return ClusterInfo(address, int(resources.get("CPU", 0)), nodes, started, time.perf_counter() - began)


@contextmanager
def ray_cluster(settings: ClusterSettings) -> Iterator[ClusterInfo]:
    """Ray connected for the ``with`` block, per ``settings.address``; shut down (and, if started here, stopped) after."""
    if not settings.enabled:
        raise ValueError("ray_cluster needs cluster.address")  # callers check settings.enabled first
    local = settings.address == LOCAL
    ray = _import_ray(local)
    began = time.perf_counter()
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
             "configure_logging": False}
    try:
        if local:
            ray.init(num_cpus=settings.cpus, _node_ip_address="127.0.0.1", **quiet)
        else:
            ray.init(address=settings.address, **quiet)
    except (ConnectionError, TimeoutError, RuntimeError) as error:
        ray.shutdown()
        raise FluxoError(f"cluster.address={settings.address}: cannot join that Ray cluster ({error}); check the head "
                         "is running and reachable from here (`ray status --address ...`), or unset cluster.address "
                         "to run in this process") from error
    try:
        info = _info(ray, "local" if local else settings.address, local, began)
        log.info("%s", info.describe())
        yield info
    finally:
        started_here = _local_cluster_processes(ray) if local else []
        ray.shutdown()
        if local:
            _stop_leftovers(started_here)


LEFTOVER_GRACE_S = 5.0  # how long a process Ray left behind gets to exit on SIGTERM before SIGKILL


def _local_cluster_processes(ray: Any) -> list[Any]:
    """The processes of the cluster this command started: those of ours that name its session folder (the GCS,
    the raylet, Ray's monitors) and their children (the raylet's agents and workers). Not every child of ours:
    a Prefect server the command also started is not Ray's to stop."""
    import psutil

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:  # not connected after all
        return []
    session = node.get_session_dir_path()
    found: dict[int, Any] = {}
    for process in psutil.Process().children(recursive=True):
        try:
            if session in " ".join(process.cmdline()):
                found[process.pid] = process
                found.update((child.pid, child) for child in process.children(recursive=True))
        except psutil.Error:  # gone meanwhile
            continue
    return list(found.values())


def _stop_leftovers(started_here: list[Any]) -> None:
    """Stop what the local cluster left running after ``ray.shutdown()``.

    Shutdown kills the GCS and the raylet, but the raylet's own children (the dashboard and runtime-env
    agents, a worker still starting) only notice their parent is gone when a reconnect times out, a
    minute or more later on a busy machine, and a stopped ``fluxo`` command must leave nothing behind.
    They are ``started_here`` (found before shutdown), or orphans that name a raylet of ours in
    ``RAY_RAYLET_PID``.
    """
    import psutil

    raylets = {str(process.pid) for process in started_here if _name(process) == "raylet"}
    leftovers = {process.pid: process for process in started_here if process.is_running()}
    if raylets:
        for process in psutil.process_iter():
            try:
                if process.pid not in leftovers and process.environ().get("RAY_RAYLET_PID") in raylets:
                    leftovers[process.pid] = process
            except psutil.Error:  # another user's process, or one gone meanwhile
                continue
    for process in leftovers.values():
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(list(leftovers.values()), timeout=LEFTOVER_GRACE_S)
    for process in alive:
        log.debug("Ray process %d outlived SIGTERM; killing it", process.pid)
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=LEFTOVER_GRACE_S)


def _name(process: Any) -> str:
    import psutil

    try:
        return process.name()
    except psutil.Error:
        return ""


TASK_RETRIES = 2  # a trial's attempts after the first when the process running it dies (never for its own errors)


def trial_task(function: Any, cpus: int) -> Any:
    """``function`` as a Ray task of ``cpus`` CPUs, run again (``TASK_RETRIES`` times) only when its process dies."""
    import ray

    return ray.remote(num_cpus=cpus, max_retries=TASK_RETRIES, retry_exceptions=False)(function)


def carried_mistake(error: Any) -> FluxoError | None:
    """The user's mistake a trial raised, out of the ``RayTaskError`` that carries it; None for any other error."""
    return FluxoError(str(error.cause)) if isinstance(error.as_instanceof_cause(), FluxoError) else None


def lost_reason(error: Exception) -> str:
    """Why a trial is given up: its worker or node kept dying (for the log and the run's tag)."""
    return f"{type(error).__name__} after {TASK_RETRIES + 1} attempts: {str(error).splitlines()[0][:300]}"

