"""Payload logging: settings, the logger in-process (queue, rotation, crash journal), then real HTTP.

The HTTP tests start `bentoml serve` with tiny model dirs: one server at 100% sampling
stopped with SIGTERM (every request must be in the files, answers equal), one at 30%,
and one killed with SIGKILL (what was flushed before must be readable).
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from serving import ServingConfig, ServingError
from serving.launch import serve_env
from serving.payload_log import PARTIAL, PayloadLogger, read_payloads
from tests.serving_fixtures import (
    RunningServer,
    build_model_dir,
    digit_png,
    sample_instances,
)
from tests.waiting import wait_for

LABELS = [str(i) for i in range(10)]


# --- settings -----------------------------------------------------------------------------


def test_payload_settings_from_env(tmp_path: Path) -> None:
    default = ServingConfig.from_env({})
    assert (default.payload_log, default.payload_sample, default.payload_rotate_mb) == (None, 1.0, 64.0)
    assert (default.payload_rotate_s, default.payload_queue) == (300.0, 10_000)
    config = ServingConfig.from_env({"FLUXO_PAYLOAD_LOG": str(tmp_path), "FLUXO_PAYLOAD_SAMPLE": "0.3",
                                     "FLUXO_PAYLOAD_ROTATE_MB": "8", "FLUXO_PAYLOAD_ROTATE_S": "60",
                                     "FLUXO_PAYLOAD_QUEUE": "500"})
    assert (config.payload_log, config.payload_sample, config.payload_rotate_mb) == (tmp_path, 0.3, 8.0)
    assert (config.payload_rotate_s, config.payload_queue) == (60.0, 500)
    assert (default.payload_queue_mb, default.payload_keep_days, default.payload_keep_mb) == (64.0, 30.0, 10_240.0)
    bounded = ServingConfig.from_env({"FLUXO_PAYLOAD_QUEUE_MB": "0.5", "FLUXO_PAYLOAD_KEEP_DAYS": "0",
                                      "FLUXO_PAYLOAD_KEEP_MB": "100"})
    assert (bounded.payload_queue_mb, bounded.payload_keep_days, bounded.payload_keep_mb) == (0.5, 0.0, 100.0)
    assert ServingConfig.from_env(bounded.to_env()) == bounded


@pytest.mark.parametrize(
    ("name", "value"),
    [("FLUXO_PAYLOAD_SAMPLE", "1.5"), ("FLUXO_PAYLOAD_SAMPLE", "some"), ("FLUXO_PAYLOAD_SAMPLE", "nan"),
     ("FLUXO_PAYLOAD_ROTATE_MB", "0"), ("FLUXO_PAYLOAD_ROTATE_S", "soon"), ("FLUXO_PAYLOAD_QUEUE", "0"),
     ("FLUXO_PAYLOAD_QUEUE", "1.5"), ("FLUXO_PAYLOAD_LOG", "gs://bucket/prefix"), ("FLUXO_PAYLOAD_LOG", "s3://"),
     ("FLUXO_PAYLOAD_QUEUE_MB", "0"), ("FLUXO_PAYLOAD_KEEP_DAYS", "-1"), ("FLUXO_PAYLOAD_KEEP_MB", "lots")],
)
def test_bad_payload_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ServingError, match=rf"environment variable {name}="):
        ServingConfig.from_env({name: value})


def test_serve_env_sets_payload_variables_only_when_given(tmp_path: Path) -> None:
    model = build_model_dir(tmp_path / "m")
    env = serve_env(ServingConfig.for_model_dir(model, payload_log=tmp_path / "log", payload_sample=0.25))
    assert env["FLUXO_PAYLOAD_LOG"] == str((tmp_path / "log").resolve()) and env["FLUXO_PAYLOAD_SAMPLE"] == "0.25"
    os.environ.pop("FLUXO_PAYLOAD_LOG", None)
    plain = serve_env(ServingConfig.for_model_dir(model))
    assert "FLUXO_PAYLOAD_LOG" not in plain and "FLUXO_PAYLOAD_SPOOL" not in plain
    with pytest.raises(ServingError, match="FLUXO_PAYLOAD_SAMPLE=2.0"):
        serve_env(ServingConfig.for_model_dir(model, payload_sample=2.0))


# --- the logger in-process ----------------------------------------------------------------


def _record(log: PayloadLogger, request_id: str, n: int = 1) -> None:
    x = sample_instances(n)
    probabilities = np.full((n, 10), 0.1, dtype=np.float32)
    probabilities[:, 3] = 0.5
    log.record(request_id, "/predict", "fluxo", "1", "champion", 1.5, x, probabilities, LABELS)


def test_a_full_queue_drops_and_counts_without_blocking_or_raising(tmp_path: Path) -> None:
    log = PayloadLogger(tmp_path, queue_size=3, start=False)  # no writer thread: nothing drains the queue
    # Nothing ever drains the queue, so a record that blocked would block for good: the recording thread
    # must finish on its own (within a deadline no busy machine comes near).
    recording = threading.Thread(target=lambda: [_record(log, f"r{i}") for i in range(50)], daemon=True)
    recording.start()
    recording.join(timeout=60)
    assert not recording.is_alive(), "a record into a full queue blocked"
    assert log.dropped == 47 and len(log.queue) == 3
    log.record("bad", "/predict", "fluxo", None, "champion", 0.0, None, None, None)  # type: ignore[arg-type]
    log.close()  # writes the three it kept; the malformed record is skipped with the batch, not raised
    assert log.dropped == 48



def test_two_loggers_with_one_pid_and_start_second_write_files_of_their_own(tmp_path: Path) -> None:
    """Two replicas (own pid namespaces, one bucket) can share a pid and a start second: neither
    file may take the other's name, or one upload replaces the other in the bucket."""
    loggers = [PayloadLogger(tmp_path, flush_records=1, flush_s=0.05) for _ in range(2)]
    loggers[1]._started = loggers[0]._started  # the same second, as two replicas starting together
    for k, log in enumerate(loggers):
        _record(log, f"replica-{k}")
    for log in loggers:
        log.close()
    files = list(tmp_path.glob("*/*.parquet"))
    assert len(files) == 2, files
    assert sorted(read_payloads(tmp_path).to_pandas().request_id) == ["replica-0", "replica-1"]

def test_records_round_trip_and_rotate_into_complete_files(tmp_path: Path) -> None:
    log = PayloadLogger(tmp_path, rotate_mb=0.001, flush_records=10, flush_s=0.05)
    for i in range(100):
        _record(log, f"r{i}", n=1 + i % 3)
    log.close()
    files = list(tmp_path.glob("*/*.parquet"))
    assert len(files) > 1 and not list(tmp_path.glob(f"*/*{PARTIAL}"))
    assert all(f.name.startswith(f"payload-{os.getpid()}-") for f in files)
    table = read_payloads(tmp_path).to_pandas()
    assert sorted(table.request_id) == sorted(f"r{i}" for i in range(100))
    row = table.set_index("request_id").loc["r2"]
    assert list(row.input_shape) == [3, 1, 8, 8] and list(row.labels) == ["3", "3", "3"]
    np.testing.assert_array_equal(np.asarray(row.inputs).reshape(3, 1, 8, 8), sample_instances(3))
    assert (table.model_version == "1").all() and (table.variant == "champion").all()


def test_a_crash_leaves_a_journal_that_is_read_up_to_its_last_flush(tmp_path: Path) -> None:
    log = PayloadLogger(tmp_path, flush_records=5, flush_s=0.05)
    for i in range(12):
        _record(log, f"r{i}")
    wait_for(lambda: len(read_payloads(tmp_path)) >= 12, "all 12 records flushed to the journal", timeout=60)
    # The "crash": the writer is never closed; a torn tail is appended as a SIGKILL mid-write would leave.
    (partial,) = tmp_path.glob(f"*/*{PARTIAL}")
    with partial.open("ab") as f:
        f.write(b"\xff\xff\xff\xff\x40\x00\x00\x00garbage")
    table = read_payloads(tmp_path)
    assert sorted(table.column("request_id").to_pylist()) == sorted(f"r{i}" for i in range(12))
    assert not list(tmp_path.glob("*/*.parquet"))


# --- bounded: bytes queued, a failed write or seal, retention -------------------------------


def test_the_queue_is_bounded_by_bytes_and_drops_are_counted(tmp_path: Path) -> None:
    log = PayloadLogger(tmp_path, queue_mb=0.1, start=False)  # no writer thread: what fits stays queued
    before = log.counters.dropped._value.get()
    huge = np.zeros((8, 1, 64, 64), np.float32)  # 128 KiB: over the whole cap on its own
    log.record("huge", "/predict", "fluxo", "1", "champion", 1.0, huge, np.full((8, 10), 0.1, np.float32), LABELS)
    assert len(log.queue) == 0 and log.dropped == 1
    for i in range(400):
        _record(log, f"r{i}")  # 256 B of inputs and 40 of probabilities each, far under the record cap
    kept = len(log.queue)
    assert 0 < kept < 400 and kept * 296 <= log.queued_bytes <= log.queue_bytes
    assert log.dropped == 1 + 400 - kept and log.counters.dropped._value.get() - before == log.dropped
    log.close()
    assert log.queued_bytes == 0  # taken by the writer, so the cap frees up again
    assert sorted(read_payloads(tmp_path).column("request_id").to_pylist()) == sorted(f"r{i}" for i in range(kept))


# The disk fills: RLIMIT_FSIZE makes every write past `limit` bytes of one file fail (EFBIG) partway, as ENOSPC would.
FULL_DISK_WORKER = """
import json, resource, signal, sys
import numpy as np
from serving.payload_log import PayloadLogger
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process being killed
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
log = PayloadLogger(sys.argv[1], flush_records=1, start=False)
rng = np.random.default_rng(0)
for i in range(int(sys.argv[3])):
    log.record(f"r{i}", "/predict", "fluxo", "1", "champion", 1.0, rng.random((1, 1, 8, 8), dtype=np.float32),
               np.full((1, 10), 0.1, np.float32), [str(d) for d in range(10)])
log.close()
print(json.dumps({"dropped": log.dropped, "files": log.counters.files._value.get()}))
"""


def test_a_failed_write_seals_the_torn_file_and_goes_on_in_a_new_one(tmp_path: Path) -> None:
    """Before, the writer kept appending after a torn batch, and a reader stopped at the tear: all later records lost."""
    import json
    import subprocess
    import sys

    n = 200
    run = subprocess.run([sys.executable, "-c", FULL_DISK_WORKER, str(tmp_path), str(32 * 1024), str(n)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["dropped"] >= 2, result  # the limit was hit more than once: each time one record was lost
    files = list(tmp_path.glob("*/*.parquet"))
    assert len(files) == result["files"] == result["dropped"] + 1  # each tear sealed, and the last file at close
    assert not list(tmp_path.glob("*/*.partial")) and not list(tmp_path.glob("*/*.tmp"))
    logged = read_payloads(tmp_path).column("request_id").to_pylist()
    assert len(logged) == n - result["dropped"] and f"r{n - 1}" in logged  # records after every tear are kept


SEALING_ON_A_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from serving.payload_log import seal_journal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    seal_journal(Path(sys.argv[1]))
except OSError as error:
    print("seal failed:", error)
"""


def test_a_failed_seal_leaves_no_tmp_file_and_keeps_the_journal(tmp_path: Path) -> None:
    import subprocess
    import sys

    import pyarrow as pa

    from serving.payload_log import _batch, _Journal

    log = PayloadLogger(tmp_path, start=False)
    for i in range(50):
        _record(log, f"r{i}", n=2)
    journal = _Journal(tmp_path / f"payload-1-20000101T000000-00001-abcdef01{PARTIAL}")
    journal.append(_batch(list(log.queue)))
    journal.close()
    run = subprocess.run([sys.executable, "-c", SEALING_ON_A_FULL_DISK, str(journal.path)], capture_output=True,
                         text=True, timeout=120)
    assert "seal failed" in run.stdout, run.stdout + run.stderr
    assert [p.name for p in tmp_path.iterdir()] == [journal.path.name]  # no .tmp beside it, no half .parquet
    with pa.OSFile(str(journal.path), "rb") as source:
        assert pa.ipc.open_stream(source).read_all().num_rows == 50  # the journal is whole, for the next try


def _aged(files: list[Path], now: float) -> None:
    """File k of n made n - k days old."""
    for k, path in enumerate(files):
        os.utime(path, (now - (len(files) - k) * 86400,) * 2)


def test_retention_deletes_the_too_old_then_the_oldest_over_the_cap_never_a_live_journal(tmp_path: Path) -> None:
    import subprocess
    import time

    from serving.payload_store import Retention

    log = PayloadLogger(tmp_path, rotate_mb=0.001, flush_records=10, start=False)  # a file per flush
    for i in range(60):
        _record(log, f"r{i}", n=2)
    log.close()
    files = sorted(tmp_path.glob("*/*.parquet"))  # names carry a sequence number: oldest first
    assert len(files) == 6
    now = time.time()
    _aged(files, now)
    day = files[0].parent
    live = day / f"payload-{os.getpid()}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-00099-live0000{PARTIAL}"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid nobody has any more: its journal is a dead worker's
    dead = day / f"payload-{gone.pid}-20000101T000000-00001-dead0000{PARTIAL}"
    for journal in (live, dead):
        journal.write_bytes(b"not read here")
        os.utime(journal, (now - 100 * 86400,) * 2)
    removed = Retention(keep_days=3.5, keep_mb=0).enforce(tmp_path, now=now)
    assert sorted(removed) == sorted([*files[:3], dead]) and live.exists()
    cap = (files[5].stat().st_size + live.stat().st_size + 1) / 2**20
    assert sorted(Retention(keep_days=0, keep_mb=cap).enforce(tmp_path, now=now)) == files[3:5]
    assert sorted(p.name for p in day.iterdir()) == sorted([files[5].name, live.name])
    assert Retention(keep_days=0, keep_mb=0).enforce(tmp_path) == []  # both off: keeps everything


def test_a_running_log_keeps_its_folder_under_the_size_cap(tmp_path: Path) -> None:
    from serving.payload_store import Retention

    log = PayloadLogger(tmp_path, rotate_mb=0.001, flush_records=5, flush_s=0.02,
                        retention=Retention(keep_days=0, keep_mb=0.02))
    expired = log.counters.expired._value.get()
    for i in range(100):
        _record(log, f"r{i}")
    wait_for(lambda: log.counters.expired._value.get() > expired, "retention to delete files on the keeper's thread")
    log.close()
    sizes = [p.stat().st_size for p in tmp_path.glob("*/*.parquet")]
    assert sum(sizes) <= 0.02 * 2**20 and not list(tmp_path.glob(f"*/*{PARTIAL}"))
    assert "r99" in read_payloads(tmp_path).column("request_id").to_pylist()  # the newest stay


# --- real HTTP ------------------------------------------------------------------------------


def _server(tmp: Path, **env: str) -> RunningServer:
    model = build_model_dir(tmp / "model", model_version="7")
    base = {"FLUXO_WORKERS": "2", "FLUXO_RELOAD_INTERVAL_S": "0", "FLUXO_PAYLOAD_LOG": str(tmp / "payloads"),
            "FLUXO_PAYLOAD_FLUSH_S": "0.2"}
    return RunningServer(model, {**base, **env}, tmp / "server.log")


def _ask(client: httpx.Client, url: str, i: int) -> tuple[str, list[list[float]]]:
    """One request on one of the three routes; (request id, probabilities answered)."""
    x = sample_instances(1, seed=i)
    rid = f"req-{i}-{uuid.uuid4().hex[:6]}"
    headers = {"X-Request-Id": rid}
    route = i % 3
    if route == 0:
        r = client.post(f"{url}/predict", json={"instances": x.tolist()}, headers=headers)
        probabilities = [p["probabilities"] for p in r.json()["predictions"]]
    elif route == 1:
        r = client.post(f"{url}/predict/image", content=digit_png(x[0, 0]), headers={**headers,
                        "Content-Type": "image/png"})
        probabilities = [p["probabilities"] for p in r.json()["predictions"]]
    else:
        body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
        r = client.post(f"{url}/v2/models/fluxo/infer", json=body, headers=headers)
        out = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")
        probabilities = np.asarray(out["data"]).reshape(out["shape"]).tolist()
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == rid
    return rid, probabilities


def _load(url: str, threads: int, per_thread: int) -> dict[str, list[list[float]]]:
    def worker(t: int) -> list[tuple[str, list[list[float]]]]:
        with httpx.Client(timeout=30) as client:
            return [_ask(client, url, t * per_thread + j) for j in range(per_thread)]

    with ThreadPoolExecutor(threads) as pool:
        return dict(pair for chunk in pool.map(worker, range(threads)) for pair in chunk)


def test_every_request_is_logged_after_a_graceful_stop(tmp_path: Path) -> None:
    with _server(tmp_path) as running:
        answers = _load(running.url, threads=8, per_thread=50)
        routes = {0: "/predict", 1: "/predict/image", 2: "/v2/models/{model_name}/infer"}
    table = read_payloads(tmp_path / "payloads").to_pandas()  # after SIGTERM: all sealed
    assert not list((tmp_path / "payloads").glob(f"*/*{PARTIAL}"))
    assert len(table) == 400 and set(table.request_id) == set(answers)
    assert (table.model_version == "7").all() and (table.variant == "champion").all()
    assert len(set(table.route)) == 3 and set(table.route) == set(routes.values())
    for row in table.itertuples():
        np.testing.assert_allclose(np.asarray(row.probabilities), np.ravel(answers[row.request_id]), atol=1e-6)
        assert list(row.input_shape) == [1, 1, 8, 8] and row.latency_ms > 0


def test_sampling_logs_its_share(tmp_path: Path) -> None:
    n = 600
    with _server(tmp_path, FLUXO_PAYLOAD_SAMPLE="0.3") as running:
        answers = _load(running.url, threads=8, per_thread=n // 8)
    table = read_payloads(tmp_path / "payloads")
    assert set(table.column("request_id").to_pylist()) <= set(answers)
    assert abs(len(table) - 0.3 * n) <= 4 * np.sqrt(n * 0.3 * 0.7)


def kill_server(running: RunningServer, journals: Path, expected: Iterable[str]) -> None:
    """SIGKILL the server and every worker at once, once every ``expected`` request id is in a journal under ``journals``.

    Journals are written every FLUSH_S (0.2 s here) by each worker's writer thread, which a busy machine can hold
    up for longer than any fixed sleep: this reads them until they hold every record, then kills.
    """
    wanted = set(expected)
    wait_for(lambda: wanted <= set(read_payloads(journals).column("request_id").to_pylist()),
             f"all {len(wanted)} records in the journals under {journals}", timeout=60,
             detail=lambda: running.log()[-3000:])
    workers = psutil.Process(running.process.pid).children(recursive=True)
    for process in [psutil.Process(running.process.pid), *workers]:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(workers, timeout=10)
    running.process.wait(10)


def test_sigkill_leaves_readable_files_with_everything_flushed(tmp_path: Path) -> None:
    running = _server(tmp_path)
    with running:
        answers = _load(running.url, threads=4, per_thread=25)
        kill_server(running, tmp_path / "payloads", answers)
    table = read_payloads(tmp_path / "payloads")
    assert set(table.column("request_id").to_pylist()) == set(answers)
    assert list((tmp_path / "payloads").glob(f"*/*{PARTIAL}"))  # nothing sealed them: recovered from journals
