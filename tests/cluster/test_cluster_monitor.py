"""`fluxo monitor`'s window read by a local Ray cluster's tasks (pipelines/monitor/on_cluster.py): the same
window as the one-process reader, each task in memory bounded by the window, not by the files it reads.

A fresh process per check, as a command runs; the log is bench/monitor_memory.py's synthetic day.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from bench.monitor_memory import write_day
from tests.conftest import REPO

READ_BOTH_WAYS = """
import json, sys
from datetime import datetime, timedelta
import numpy as np
import ray
from pipelines.cluster import ray_cluster
from pipelines.monitor.on_cluster import _newest_of_run, newest_on_cluster, runs_of
from pipelines.monitor.window import Wanted, read_window
from pipelines.settings.cluster import ClusterSettings
from serving.payload_store import payload_parts

log, now, limit = sys.argv[1], datetime.fromisoformat(sys.argv[2]), int(sys.argv[3])
one = read_window(log, "fluxo", "1", (1, 28, 28), hours=2, max_instances=limit, now=now)
with ray_cluster(ClusterSettings(address="local", cpus=2)):
    spread = read_window(log, "fluxo", "1", (1, 28, 28), hours=2, max_instances=limit, now=now, reader=newest_on_cluster)

    @ray.remote(max_calls=1)  # a fresh worker each: its pool's peak is this read's alone
    def measured(parts, wanted):
        import pyarrow as pa
        table = _newest_of_run(log, parts, wanted)
        return pa.default_memory_pool().max_memory(), 0 if table is None else table.num_rows

    _, parts = payload_parts(log)
    wanted = Wanted("fluxo", "1", (1, 28, 28), now - timedelta(hours=2), limit)
    peaks = ray.get([measured.remote(run, wanted) for run in runs_of(parts, 2)])
print(json.dumps({"same_inputs": bool(np.array_equal(one.inputs, spread.inputs)),
                  "same_probabilities": bool(np.array_equal(one.probabilities, spread.probabilities)),
                  "requests": [one.requests, spread.requests], "instances": [len(one), len(spread)],
                  "seen": [str(one.first_seen), str(spread.first_seen), str(one.last_seen), str(spread.last_seen)],
                  "runs": len(peaks), "peaks": [peak for peak, _ in peaks]}))
"""


def test_the_cluster_reads_the_same_window_each_task_bounded_by_the_window(tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    written = write_day(tmp_path / "log", size_mb=64, file_mb=8, now=now)
    file_bytes = written["disk_mb"] * 2**20 / written["files"]
    run = subprocess.run([sys.executable, "-c", READ_BOTH_WAYS, str(tmp_path / "log"), now.isoformat(), "500"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-4000:]
    read = json.loads(run.stdout.strip().splitlines()[-1])
    assert read["same_inputs"] and read["same_probabilities"], read
    assert read["instances"] == [500, 500] and read["requests"][0] == read["requests"][1], read
    assert read["seen"][0] == read["seen"][1] and read["seen"][2] == read["seen"][3], read
    # Four tasks each read two ~8 MiB files, keeping the 1.5 MiB window and a ~3 MiB record batch (a few times over,
    # as the one-process reader does): each stays under 16 MiB, less than the files it reads, a quarter of the day.
    runs_files = written["files"] // read["runs"]  # the fewest files a run holds
    assert read["runs"] == 4 and runs_files >= 2, read
    for peak in read["peaks"]:
        assert peak < 16 * 2**20 and peak < runs_files * file_bytes, f"{peak / 2**20:.1f} MiB for a run of " \
            f"{runs_files:.0f} files of {file_bytes / 2**20:.1f} MiB"
