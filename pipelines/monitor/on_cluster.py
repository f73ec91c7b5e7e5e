"""``fluxo monitor``'s window read on a Ray cluster: the payload log's files in runs, one task per run.

A busy service's day is many files; one process reads them one after another. Here each task reads a
run of consecutive files (newest first, as the one-process reader does) and keeps only their newest
records holding the window's instances (pipelines/monitor/window.py ``newest_records``), so a task
holds its window plus one row group, never its files. The driver merges the tasks' answers in the
files' order, which keeps the one-process tie rule (on equal times, the newer file's record first):
the window is the one the one-process reader finds, record for record.

Workers read the log themselves: a path every node sees, or the ``s3://`` bucket with the AWS
variables set on each node (a local cluster's workers inherit the command's). Reading is idempotent,
so a task whose process dies is run again; a user's mistake (an unreadable file) is raised once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipelines.errors import FluxoError
from pipelines.monitor.window import Newest, Wanted, newest_records

log = logging.getLogger(__name__)

FILES_PER_CPU = 2  # runs per CPU of the cluster: a slow file holds one task up, not the whole read


def runs_of(parts: list[Any], cpus: int) -> list[list[Any]]:
    """``parts`` (newest first) cut into consecutive runs, ``FILES_PER_CPU`` runs per CPU of the cluster (fewer
    when there are fewer files)."""
    count = max(1, min(len(parts), cpus * FILES_PER_CPU))
    bounds = [len(parts) * index // count for index in range(count + 1)]  # as even as can be: sizes differ by one
    return [parts[begin:end] for begin, end in zip(bounds, bounds[1:])]


def _newest_of_run(location: str, parts: list[Any], wanted: Wanted) -> Any:
    """A task: the newest records of one run of files, read where the task runs."""
    from serving.payload_store import is_url, s3_filesystem

    try:
        return newest_records(s3_filesystem() if is_url(location) else None, parts, wanted)
    except OSError as error:
        raise FluxoError(str(error)) from error


def newest_on_cluster(location: Path | str, parts: list[Any], wanted: Wanted) -> Any:
    """The newest records of ``parts`` holding ``wanted.max_instances`` instances, read by the cluster's tasks."""
    import ray

    from pipelines.cluster import carried_mistake, trial_task

    if not parts:
        return None
    runs = runs_of(parts, int(ray.cluster_resources().get("CPU", 1)))
    log.info("%s: %d file(s) in the window, read by %d task(s) on the cluster", location, len(parts), len(runs))
    read = trial_task(_newest_of_run, cpus=1)
    pending = [read.remote(str(location), run, wanted) for run in runs]
    newest = Newest(wanted.max_instances)
    try:
        for answer in pending:  # in the files' order: the merge keeps the one-process tie rule
            table = ray.get(answer)
            if table is not None:
                newest.add(table)
    except ray.exceptions.RayTaskError as error:
        mistake = carried_mistake(error)
        if mistake is not None:
            raise mistake from None
        raise
    return newest.table
