"""`fluxo monitor`'s window: the newest instances, read file by file newest first, in memory bounded by the window.

Real payload files (the logger's own journal and seal), real reads; the memory bound is
measured in a fresh process by pyarrow's pool peak, which the old whole-day read exceeds
many times over (bench/monitor_memory.py measures both).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.monitor_memory import old_read_window, write_day
from pipelines.monitor.window import read_window
from serving.payload_log import PayloadLogger, read_payloads
from tests.conftest import REPO

READ_IN_A_FRESH_PROCESS = """
import json, sys
from datetime import datetime
import pyarrow as pa
from pipelines.monitor.window import read_window
window = read_window(sys.argv[1], "fluxo", "1", (1, 28, 28), hours=2, max_instances=int(sys.argv[3]),
                     now=datetime.fromisoformat(sys.argv[2]))
print(json.dumps({"peak": pa.default_memory_pool().max_memory(), "requests": window.requests,
                  "instances": len(window), "sum": float(window.inputs.sum())}))
"""


def test_a_window_is_read_in_memory_bounded_by_the_window_not_the_day(tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    written = write_day(tmp_path / "log", size_mb=80, file_mb=16, now=now)
    day = written["disk_mb"] * 2**20
    run = subprocess.run([sys.executable, "-c", READ_IN_A_FRESH_PROCESS, str(tmp_path / "log"), now.isoformat(), "500"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    read = json.loads(run.stdout.strip().splitlines()[-1])
    # The window is 500 instances of 3 KiB (1.5 MiB); reading holds it a few times over plus one ~1 MiB batch.
    assert read["peak"] < 24 * 2**20 and read["peak"] < day / 3, f"{read['peak'] / 2**20:.1f} MiB for a {day / 2**20:.0f} MiB day"
    inputs, requests = old_read_window(tmp_path / "log", 2, 500, now)  # the whole day, sorted: the same window
    assert (read["instances"], read["requests"]) == (500, requests)
    np.testing.assert_allclose(read["sum"], float(inputs.sum()), rtol=1e-6)


def _log(folder: Path, flush: int) -> PayloadLogger:
    return PayloadLogger(folder, rotate_mb=0.001, flush_records=flush, start=False)  # a file per flush


def test_the_window_is_the_newest_instances_across_overlapping_files(tmp_path: Path) -> None:
    """Two workers log at once (their files overlap in time), with other versions, a challenger and another
    contract mixed in: the window is exactly what the whole log, filtered and sorted, says is newest."""
    rng = np.random.default_rng(3)
    workers = [_log(tmp_path, 7), _log(tmp_path, 5)]
    labels = [str(i) for i in range(10)]
    for i in range(120):
        n = 1 + i % 3
        shape = (n, 1, 8, 8) if i % 11 else (n, 1, 4, 4)  # every 11th: another input contract
        variant = "challenger" if i % 13 == 0 else "champion"
        version = "2" if i % 17 == 0 else "1"
        x = rng.random(shape, dtype=np.float32)
        workers[i % 2].record(f"r{i}", "/predict", "fluxo", version, variant, 1.0, x,
                              rng.dirichlet(np.ones(10), n).astype(np.float32), labels)
        time.sleep(0.001)  # distinct times, as requests have
    for worker in workers:
        worker.close()
    files = list(tmp_path.glob("*/*.parquet"))
    for path in files:  # each file's mtime: its last record, as when sealed at rotation
        last = max(_times(path)).timestamp()
        os.utime(path, (last, last))
    table = read_payloads(tmp_path).to_pandas()
    wanted = table[(table.model_version == "1") & (table.variant == "champion")
                   & table.input_shape.map(lambda s: list(s[1:]) == [1, 8, 8])].sort_values("time", ascending=False)
    expected = np.concatenate([np.asarray(x, np.float32).reshape(-1, 1, 8, 8) for x in wanted.inputs])
    for limit in (1, 37, 10_000):
        window = read_window(tmp_path, "fluxo", "1", (1, 8, 8), hours=1, max_instances=limit)
        assert len(window) == min(limit, len(expected))
        np.testing.assert_array_equal(window.inputs, expected[:limit])
        assert window.last_seen == wanted.time.iloc[0].to_pydatetime()
    assert len(files) > 10


def _times(path: Path) -> list[datetime]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["time"]).column("time").to_pylist()
