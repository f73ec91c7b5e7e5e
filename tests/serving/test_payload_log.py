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


@pytest.mark.parametrize(
    ("name", "value"),
    [("FLUXO_PAYLOAD_SAMPLE", "1.5"), ("FLUXO_PAYLOAD_SAMPLE", "some"), ("FLUXO_PAYLOAD_SAMPLE", "nan"),
     ("FLUXO_PAYLOAD_ROTATE_MB", "0"), ("FLUXO_PAYLOAD_ROTATE_S", "soon"), ("FLUXO_PAYLOAD_QUEUE", "0"),
     ("FLUXO_PAYLOAD_QUEUE", "1.5"), ("FLUXO_PAYLOAD_LOG", "gs://bucket/prefix"), ("FLUXO_PAYLOAD_LOG", "s3://")],
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
