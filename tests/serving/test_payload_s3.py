"""The payload log to S3: a real S3 API (moto's server on a loopback port), the real logger and `bentoml serve`.

moto stands in for the compose stack's MinIO: the same S3 calls over HTTP, with the
endpoint given the way MinIO's is (``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipelines.monitor.window import read_window
from serving import ServingConfig, ServingError
from serving.payload_log import PARTIAL, PayloadLogger, read_payloads
from serving.payload_store import S3Upload, s3_filesystem
from tests.serving_fixtures import free_port
from tests.serving.test_payload_log import _load, _record, _server, kill_server
from tests.waiting import wait_for

BUCKET = "fluxo-payloads"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh prefix in the bucket, with this process's AWS variables pointing at the server."""
    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    from pyarrow.fs import S3FileSystem

    S3FileSystem(endpoint_override=s3_endpoint.removeprefix("http://"), scheme="http", allow_bucket_creation=True,
                 **_keys()).create_dir(BUCKET)
    return f"s3://{BUCKET}/{request.node.name[:40]}"


def _objects(url: str) -> list[str]:
    from pyarrow.fs import FileSelector, FileType

    prefix = url.removeprefix("s3://")
    infos = s3_filesystem().get_file_info(FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(info.path for info in infos if info.type == FileType.File)


def test_an_s3_url_configures_a_spool_and_the_upload() -> None:
    config = ServingConfig.from_env({"FLUXO_PAYLOAD_LOG": "s3://bucket/live/payloads"})
    assert config.payload_upload == "s3://bucket/live/payloads"
    assert config.payload_log is not None and config.payload_log.name == "bucket_live_payloads"
    spooled = ServingConfig.from_env({"FLUXO_PAYLOAD_LOG": "s3://bucket/p", "FLUXO_PAYLOAD_SPOOL": "/var/spool/x"})
    assert spooled.payload_log == Path("/var/spool/x")
    for bad in ("s3://", "gs://bucket/p"):
        with pytest.raises(ServingError, match="s3://bucket/prefix"):
            ServingConfig.from_env({"FLUXO_PAYLOAD_LOG": bad})


def test_sealed_files_go_to_the_bucket_and_leave_the_spool(s3: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    log = PayloadLogger(spool, rotate_mb=0.001, start=False, upload=S3Upload(s3, spool))  # rotate on every flush
    for i in range(30):
        _record(log, f"r{i}", n=2)
    log.close()
    objects = _objects(s3)
    assert objects and all(o.endswith(".parquet") for o in objects)
    assert objects[0].split("/")[-2] == datetime.now(UTC).strftime("%Y-%m-%d")  # the same <date>/ folders
    assert not list(spool.glob("*/*.parquet*"))
    table = read_payloads(s3)
    assert sorted(table.column("request_id").to_pylist()) == sorted(f"r{i}" for i in range(30))
    assert table.column("inputs").combine_chunks().flatten().to_numpy().size == 30 * 2 * 64


def test_an_unreachable_store_keeps_the_files_until_it_is_back(s3: str, tmp_path: Path) -> None:
    from pyarrow.fs import AwsStandardS3RetryStrategy, S3FileSystem

    spool = tmp_path / "spool"
    down = S3FileSystem(endpoint_override=f"127.0.0.1:{free_port()}", scheme="http", connect_timeout=0.5,
                        request_timeout=1, retry_strategy=AwsStandardS3RetryStrategy(max_attempts=1), **_keys())
    log = PayloadLogger(spool, start=False, upload=S3Upload(s3, spool, filesystem=down))
    for i in range(5):
        _record(log, f"kept{i}")
    log.close()
    assert _objects(s3) == [] and len(list(spool.glob("*/*.parquet"))) == 1  # sealed, waiting in the spool
    # The next worker to start on this spool sends what is waiting before anything else.
    later = PayloadLogger(spool, start=False, upload=S3Upload(s3, spool))
    later.close()
    assert sorted(read_payloads(s3).column("request_id").to_pylist()) == [f"kept{i}" for i in range(5)]
    assert not list(spool.glob("*/*.parquet*"))


class _HangingStore:
    """The real S3 file system behind a gate: each upload waits until the test opens it (a store that hangs)."""

    def __init__(self, filesystem: object) -> None:
        self.filesystem = filesystem
        self.gate = threading.Event()
        self.waiting = 0

    def open_output_stream(self, key: str) -> object:
        self.waiting += 1
        self.gate.wait(120)
        return self.filesystem.open_output_stream(key)


def test_a_hanging_store_does_not_hold_up_the_writer(s3: str, tmp_path: Path) -> None:
    """Before, the writer thread uploaded after each seal: while the store hung, nothing more was written."""
    spool = tmp_path / "spool"
    store = _HangingStore(s3_filesystem())
    log = PayloadLogger(spool, rotate_mb=0.001, flush_records=5, flush_s=0.02,
                        upload=S3Upload(s3, spool, filesystem=store))
    for i in range(5):
        _record(log, f"a{i}")
    wait_for(lambda: store.waiting, "an upload to hang on the store")
    for i in range(40):
        _record(log, f"b{i}")
    wait_for(lambda: len(list(spool.glob("*/*.parquet"))) >= 5 and len(read_payloads(spool)) == 45,
             "the writer to write and seal every record while the upload hangs", timeout=30)
    store.gate.set()
    log.close()
    assert len(read_payloads(s3)) == 45 and not list(spool.glob("*/*.parquet*"))


def test_the_default_spool_is_this_users_and_private(tmp_path: Path) -> None:
    """Not a predictable folder in the shared temporary directory: one per user, mode 0700, closed if opened."""
    import stat
    import tempfile

    state = tmp_path / "state"
    config = ServingConfig.from_env({"FLUXO_PAYLOAD_LOG": "s3://bucket/live", "XDG_STATE_HOME": str(state)})
    assert config.payload_log == state / "fluxo" / "payload-spool" / "bucket_live"
    plain = ServingConfig.from_env({"FLUXO_PAYLOAD_LOG": "s3://bucket/live"}).payload_log
    assert plain is not None and Path(tempfile.gettempdir()) not in plain.parents and Path.home() in plain.parents
    for _ in range(2):
        PayloadLogger(config.payload_log, start=False, upload=S3Upload("s3://bucket/live", config.payload_log)).close()
        assert stat.S_IMODE(config.payload_log.stat().st_mode) == 0o700
        config.payload_log.chmod(0o777)  # opened by someone: the next start closes it again


def test_the_stacks_s3_stand_in_expires_payload_objects(s3_endpoint: str, tmp_path: Path) -> None:
    """deploy/images/s3/s3_init.py (compose.local.yml's minio-init) puts one expiry rule on `payloads`, idempotently."""
    import subprocess
    import sys

    import boto3

    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    env = {**os.environ, "S3_ENDPOINT": s3_endpoint, "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
           "AWS_DEFAULT_REGION": "us-east-1", "PAYLOAD_EXPIRE_DAYS": "9"}
    script = Path(__file__).resolve().parents[2] / "deploy" / "images" / "s3" / "s3_init.py"
    for _ in range(2):
        run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    (rule,) = client.get_bucket_lifecycle_configuration(Bucket="payloads")["Rules"]
    assert rule["Status"] == "Enabled" and rule["Expiration"] == {"Days": 9}
    refused = subprocess.run([sys.executable, str(script)], env={**env, "PAYLOAD_EXPIRE_DAYS": "0"},
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "PAYLOAD_EXPIRE_DAYS" in refused.stderr


def _keys() -> dict[str, str]:
    return {"access_key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}


CRASHING_WORKER = """
import os, signal, sys, time
import numpy as np
from serving.payload_log import PayloadLogger
log = PayloadLogger(sys.argv[1], flush_s=0.05)
for i in range(4):
    log.record(f"dead{i}", "/predict", "fluxo", "1", "champion", 1.0, np.zeros((1, 1, 8, 8), np.float32),
               np.full((1, 10), 0.1, np.float32), [str(d) for d in range(10)])
# Killed once the records are in the journal (a busy machine can take longer than any fixed sleep).
deadline = time.monotonic() + 60
while log.counters.records._value.get() < 4 and time.monotonic() < deadline:
    time.sleep(0.02)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_dead_workers_journal_is_sealed_and_sent_a_live_ones_is_left(s3: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    spool = tmp_path / "spool"
    crashed = subprocess.run([sys.executable, "-c", CRASHING_WORKER, str(spool)], capture_output=True, text=True)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    orphan = next(spool.glob(f"*/*{PARTIAL}"))
    # The same bytes under the pid of a process that is alive (this test's parent) stand for a live worker's file.
    live = orphan.with_name(orphan.name.replace(f"payload-{orphan.name.split('-')[1]}-", f"payload-{os.getppid()}-"))
    live.write_bytes(orphan.read_bytes())
    PayloadLogger(spool, start=False, upload=S3Upload(s3, spool)).close()
    assert sorted(read_payloads(s3).column("request_id").to_pylist()) == [f"dead{i}" for i in range(4)]
    assert [p.name for p in spool.glob("*/*")] == [live.name]


def test_monitor_reads_its_window_from_the_bucket(s3: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    log = PayloadLogger(spool, start=False, upload=S3Upload(s3, spool))
    for i in range(7):
        _record(log, f"w{i}", n=3)
    log.close()
    window = read_window(s3, "fluxo", "1", (1, 8, 8), hours=1, max_instances=100)
    assert len(window) == 21 and window.requests == 7 and window.inputs.shape == (21, 1, 8, 8)
    np.testing.assert_allclose(window.probabilities[:, 3], 0.5)


@pytest.mark.e2e
def test_a_server_logging_to_s3_sends_every_request_and_a_restart_sends_what_a_sigkill_left(
    s3: str, s3_endpoint: str, tmp_path: Path
) -> None:
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint, "FLUXO_PAYLOAD_LOG": s3,
           "FLUXO_PAYLOAD_SPOOL": str(tmp_path / "spool")}
    with _server(tmp_path, **env) as running:
        answers = _load(running.url, threads=4, per_thread=30)
    assert set(read_payloads(s3).column("request_id").to_pylist()) == set(answers)  # SIGTERM: sealed and sent

    killed = _server(tmp_path, **env)
    with killed:
        more = _load(killed.url, threads=4, per_thread=10)
        kill_server(killed, tmp_path / "spool", more)
    assert list((tmp_path / "spool").glob(f"*/*{PARTIAL}"))  # nothing reached the bucket
    assert set(read_payloads(s3).column("request_id").to_pylist()) == set(answers)
    with _server(tmp_path, **env):  # the next start seals the dead workers' journals and sends them
        wait_for(lambda: set(more) <= set(read_payloads(s3).column("request_id").to_pylist()),
                 "the dead workers' records in the bucket", timeout=60, interval=0.2)
    assert set(read_payloads(s3).column("request_id").to_pylist()) == set(answers) | set(more)


def test_a_zombie_or_a_reused_pid_is_not_the_writer(tmp_path: Path) -> None:
    """A killed worker can linger unreaped (a container's init may not reap), or its pid go to a later process."""
    import subprocess
    import time as clock

    from serving.payload_store import _writer_alive

    zombie = subprocess.Popen(["true"])
    deadline = clock.monotonic() + 5
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE and clock.monotonic() < deadline:
        clock.sleep(0.05)
    now = clock.strftime("%Y%m%dT%H%M%S", clock.gmtime())
    try:
        assert not _writer_alive(tmp_path / f"payload-{zombie.pid}-{now}-00001{PARTIAL}")
    finally:
        zombie.wait()
    assert _writer_alive(tmp_path / f"payload-{os.getpid()}-{now}-00001{PARTIAL}")  # this process: alive
    assert not _writer_alive(tmp_path / f"payload-{os.getpid()}-20000101T000000-00001{PARTIAL}")  # pid reused since
    assert _writer_alive(tmp_path / "someone-elses-file.parquet.partial")  # not ours to judge: left alone
