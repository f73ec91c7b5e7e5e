"""Peak memory of `fluxo monitor`'s window read: streamed newest first (now) against the whole day in one table (before).

    .venv/bin/python bench/monitor_memory.py                      # days of ~200 and ~800 MB on disk
    .venv/bin/python bench/monitor_memory.py --sizes-mb 50 --work /tmp/mm

For each size a synthetic payload day is written through the logger's own journal and seal
(serving/payload_log.py): files of ``--file-mb`` each, one model's MNIST-sized requests a
fraction of a second apart, a challenger's and another model's records mixed in. Each read
then runs in a fresh process (so its peak is its own) and reports its peak RSS, the peak of
pyarrow's memory pool and its wall time:

- ``streamed``: :func:`pipelines.monitor.window.read_window`, file by file, newest first;
- ``whole-day`` (the baseline, the read before this change): ``read_payloads`` of the day into
  one table, then filter, sort and take the newest, as ``read_window`` used to;
- ``imports``: the same imports and nothing read, the floor both stand on.

Both reads must return the same window (checked). Writes bench/results/monitor_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = (1, 28, 28)
LABELS = [str(i) for i in range(10)]
MODEL = "fluxo"


def write_day(directory: Path, size_mb: float, file_mb: float, now: datetime, seed: int = 0) -> dict[str, float]:
    """A payload log of one day under ``directory`` of about ``size_mb`` MiB of records, newest at ``now``.

    Files hold consecutive records and carry the time of their last record as their mtime, as
    sealed files do. Every tenth record is a challenger's, every seventh another model's: a
    window must skip both. Returns what was written (records, files, bytes on disk).
    """
    from serving.payload_log import PARTIAL, _batch, _Journal, seal_journal

    rng = np.random.default_rng(seed)
    row_bytes = int(np.prod(SHAPE)) * 4 + 10 * 4
    per_file = max(int(file_mb * 1024 * 1024 / row_bytes), 1)
    records = max(int(size_mb * 1024 * 1024 / row_bytes), 1)
    span = timedelta(hours=1).total_seconds()
    first = now.timestamp() - span
    folder = directory / now.strftime("%Y-%m-%d")
    folder.mkdir(parents=True, exist_ok=True)
    files = 0
    for begin in range(0, records, per_file):
        count = min(per_file, records - begin)
        times = first + (np.arange(begin, begin + count) + 1) * span / records
        path = folder / f"payload-1-20000101T000000-{files:05d}-bench0000{PARTIAL}"
        journal = _Journal(path)
        for chunk in range(0, count, 1000):  # the writer's flush_records
            rows = [_row(rng, int(i), float(times[i - begin])) for i in range(begin + chunk, begin + min(chunk + 1000, count))]
            journal.append(_batch(rows))
        journal.close()
        sealed = seal_journal(path)
        os.utime(sealed, (times[-1], times[-1]))
        files += 1
    disk = sum(p.stat().st_size for p in folder.iterdir())
    return {"records": records, "files": files, "disk_mb": disk / 2**20}


def _row(rng: np.random.Generator, i: int, when: float) -> tuple:
    """One logged request as the request path queues it (serving/payload_log.py ``record``), at ``when``."""
    x = rng.random((1, *SHAPE), dtype=np.float32)
    p = rng.dirichlet(np.ones(10)).astype(np.float32)[None]
    variant = "challenger" if i % 10 == 9 else "champion"
    model = "other" if i % 7 == 6 else MODEL
    return (f"r{i}", when, "/predict", model, "1", variant, 1.0, x, p, LABELS, 0)


def old_read_window(location: Path, hours: float, max_instances: int, now: datetime) -> tuple[np.ndarray, int]:
    """The read before streaming: the whole day as one table, filtered, sorted, the newest taken (the baseline)."""
    import pyarrow.compute as pc

    from serving.payload_log import read_payloads

    start = now - timedelta(hours=hours)
    table = read_payloads(location, since=start.date())
    keep = pc.and_(pc.equal(table["model_name"], MODEL), pc.greater_equal(table["time"], start))
    keep = pc.and_(pc.and_(keep, pc.not_equal(table["variant"], "challenger")), pc.equal(table["model_version"], "1"))
    table = table.filter(keep).sort_by([("time", "descending")])
    inputs, kept, requests = [], 0, 0
    for row_inputs, shape in zip(table["inputs"].to_numpy(zero_copy_only=False),
                                 table["input_shape"].to_numpy(zero_copy_only=False)):
        if kept >= max_instances:
            break
        if tuple(int(s) for s in shape[1:]) != SHAPE:
            continue
        x = np.asarray(row_inputs, np.float32).reshape(-1, *SHAPE)[: max_instances - kept]
        inputs.append(x)
        kept += len(x)
        requests += 1
    return np.concatenate(inputs), requests


def measure(mode: str, location: Path, max_instances: int, now: datetime) -> dict[str, float]:
    """One read in this process (started for it): peak RSS, pyarrow's peak and seconds."""
    import pyarrow as pa

    from pipelines.monitor.window import read_window

    began = time.perf_counter()
    digest, requests = 0.0, 0
    if mode == "streamed":
        window = read_window(location, MODEL, "1", SHAPE, hours=2, max_instances=max_instances, now=now)
        digest, requests = float(window.inputs.sum()), window.requests
    elif mode == "whole-day":
        inputs, requests = old_read_window(location, 2, max_instances, now)
        digest = float(inputs.sum())
    seconds = time.perf_counter() - began
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_rss_mb": peak_rss, "arrow_peak_mb": pa.default_memory_pool().max_memory() / 2**20,
            "seconds": seconds, "requests": requests, "digest": digest}


def _child(mode: str, location: Path, max_instances: int, now: datetime) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--measure", mode, "--work", str(location),
                          "--max-instances", str(max_instances), "--now", now.isoformat()],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[200.0, 800.0])
    parser.add_argument("--file-mb", type=float, default=64.0, help="records per sealed file (FLUXO_PAYLOAD_ROTATE_MB)")
    parser.add_argument("--max-instances", type=int, default=1000, help="the window (monitor.max_instances)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--measure", choices=("streamed", "whole-day", "imports"), default=None)
    parser.add_argument("--now", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "monitor_memory.json")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.work, args.max_instances, datetime.fromisoformat(args.now))))
        return 0
    now = datetime.now(UTC).replace(microsecond=0)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        for size in args.sizes_mb:
            day = Path(scratch) / f"day-{size:g}"
            began = time.perf_counter()
            written = write_day(day, size, args.file_mb, now)
            print(f"wrote {written['disk_mb']:.0f} MiB in {written['files']} files ({time.perf_counter() - began:.0f} s)",
                  file=sys.stderr)
            reads = {mode: _child(mode, day, args.max_instances, now) for mode in ("imports", "whole-day", "streamed")}
            same = (reads["streamed"]["requests"] == reads["whole-day"]["requests"]
                    and np.isclose(reads["streamed"]["digest"], reads["whole-day"]["digest"], rtol=1e-6))
            assert same, f"the two reads returned different windows: {reads}"
            rows.append({"day_mb_in_records": size, **written, "window": args.max_instances, "reads": reads})
    _print(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": _machine(), "file_mb": args.file_mb, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _print(rows: list[dict]) -> None:
    print(f"{'day on disk':>12} {'files':>6} {'read':>10} {'peak RSS MiB':>13} {'arrow peak MiB':>15} {'seconds':>8}")
    for row in rows:
        for mode, read in row["reads"].items():
            print(f"{row['disk_mb']:>10.0f}MB {row['files']:>6} {mode:>10} {read['peak_rss_mb']:>13.0f} "
                  f"{read['arrow_peak_mb']:>15.1f} {read['seconds']:>8.2f}")


def _machine() -> dict[str, object]:
    import pyarrow as pa

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpus": os.cpu_count(), "memory_gb": round(memory, 1), "python": platform.python_version(),
            "pyarrow": pa.__version__, "platform": platform.platform()}


if __name__ == "__main__":
    sys.exit(main())
