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
        ray.shutdown()


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

