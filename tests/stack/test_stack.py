"""The compose stack for real (`make test-stack`): built, brought up from clean by `make stack`'s own
script, used through its published ports as a user would, and put through the faults a deployment
meets. Each fault counts what was lost; the counts are printed at the end (pytest -s) and written
to bench/results/stack_faults.json.

Needs a Docker engine (`make docker-engine` starts one as root); .ci/run starts it and stops it.
The stack runs with a 5-second payload rotation (FLUXO_PAYLOAD_ROTATE_S) so payload files reach
the bucket within the test's patience; everything else is the compose file's defaults.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import need
from tests.waiting import wait_for

# The first test also waits for `make stack` from clean: a cold build of every image is minutes.
pytestmark = [pytest.mark.stack, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
STACK = [sys.executable, str(ROOT / "deploy" / "stack.py")]
SECRETS = ROOT / "deploy" / "secrets"
PORT = 3000
TLS_PORT = 3443
MLFLOW = "http://127.0.0.1:5000"
MODEL = "fluxo-digits"
DIGIT = [[[[0, 0, 5, 13, 9, 1, 0, 0], [0, 0, 13, 15, 10, 15, 5, 0], [0, 3, 15, 2, 0, 11, 8, 0],
           [0, 4, 12, 0, 0, 8, 8, 0], [0, 5, 8, 0, 0, 9, 8, 0], [0, 4, 11, 0, 1, 12, 7, 0],
           [0, 2, 14, 5, 10, 12, 0, 0], [0, 0, 6, 13, 10, 0, 0, 0]]]]
RESULTS = ROOT / "bench" / "results" / "stack_faults.json"
FAULTS: dict[str, dict] = {}


def stack(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*STACK, *args], cwd=ROOT, text=True, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def compose(*args: str, timeout: float = 300) -> str:
    done = stack("compose", *args, timeout=timeout)
    assert done.returncode == 0, f"compose {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def container(service: str, index: int = 1) -> str:
    return f"fluxo-{service}-{index}"


def docker(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["docker", *args], text=True, capture_output=True, timeout=timeout)
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


def s3(credentials: str = "s3_credentials"):
    """A boto3 client on the stack's S3 store, at its address on the stack's network (not published), with
    one of the stack's accounts (the app's by default)."""
    import configparser

    import boto3

    networks = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container("minio")))
    account = configparser.ConfigParser()
    account.read(SECRETS / credentials)
    return boto3.client("s3", endpoint_url=f"http://{networks['fluxo_default']['IPAddress']}:9000",
                        region_name="us-east-1", aws_access_key_id=account["default"]["aws_access_key_id"],
                        aws_secret_access_key=account["default"]["aws_secret_access_key"])


def keys(bucket: str) -> list[str]:
    return [item["Key"] for page in s3().get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for item in page.get("Contents", [])]


def api_key() -> str:
    return (SECRETS / "fluxo_api_key").read_text().strip()


def request(method: str, path: str, body: dict | None = None, key: str | None = None,
            timeout: float = 10) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json", **({"X-API-Key": key} if key else {})}
        connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = connection.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw or b"{}")
        except ValueError:
            return response.status, {"raw": raw[:200].decode(errors="replace")}
    finally:
        connection.close()


def served_versions(samples: int = 8) -> set[str]:
    """The versions answering behind the balancer, over a few requests (leastconn reaches each replica)."""
    versions = set()
    for _ in range(samples):
        status, body = request("GET", "/metadata", key=api_key())
        if status == 200:
            versions.add(str(body.get("model_version")))
    return versions


def seconds_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.5) -> float:
    """tests/waiting.py's wait_for, returning how long it took (the figures this module records)."""
    started = time.monotonic()
    wait_for(condition, what, timeout=timeout, interval=interval)
    return time.monotonic() - started


def fluxo_on_host(*args: str, tmp_path: Path, account: str = "fluxo-worker",
                  password: str = "mlflow_worker_password") -> subprocess.CompletedProcess:
    """`fluxo ...` from the host, in a fresh project, logged into the stack's MLflow as ``account``."""
    project = tmp_path / "host-project"
    project.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUXO_", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=MLFLOW, MLFLOW_TRACKING_USERNAME=account,
               MLFLOW_TRACKING_PASSWORD_FILE=str(SECRETS / password))
    return subprocess.run([str(Path(sys.executable).with_name("fluxo")), *args], cwd=project, env=env, text=True,
                          capture_output=True, timeout=180)


@dataclass
class Load:
    """``clients`` threads sending /predict through the balancer until stopped; every answer counted."""

    clients: int = 8
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self) -> None:
        key, body = api_key(), json.dumps({"instances": DIGIT})
        connection = None
        while not self._stop.is_set():
            try:
                connection = connection or http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
                connection.request("POST", "/predict", body=body,
                                   headers={"Content-Type": "application/json", "X-API-Key": key})
                response = connection.getresponse()
                response.read()
                outcome = "ok" if response.status == 200 else f"HTTP {response.status}"
            except (OSError, http.client.HTTPException) as error:
                outcome = type(error).__name__
                if connection is not None:
                    connection.close()
                connection = None
            with self._lock:
                if outcome == "ok":
                    self.ok += 1
                else:
                    self.failed += 1
                    self.errors[outcome] = self.errors.get(outcome, 0) + 1

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def answered(self) -> int:
        with self._lock:
            return self.ok


@pytest.fixture(scope="module")
def up() -> Iterator[dict]:
    """`make stack`'s script from clean: secrets, images, up, first champion; `stack-clean` at the end."""
    need(shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0,
         "a Docker engine (`make docker-engine` as root installs and starts Debian's docker.io)")
    stack("clean", timeout=300)
    started = time.monotonic()
    done = stack("up", timeout=3000, env={"FLUXO_PAYLOAD_ROTATE_S": "5"})
    seconds = time.monotonic() - started
    assert done.returncode == 0, f"make stack failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    FAULTS["make stack from clean"] = {"seconds": round(seconds), "said": done.stdout.strip().splitlines()[-8:]}
    try:
        yield {"output": done.stdout}
    finally:
        logs = stack("compose", "logs", "--no-color", "--tail", "40", timeout=120).stdout
        (ROOT / ".fluxo" / "stack").mkdir(parents=True, exist_ok=True)
        (ROOT / ".fluxo" / "stack" / "test-logs.txt").write_text(logs)
        stack("clean", timeout=300)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(FAULTS, indent=1) + "\n")
        print("\nstack faults:\n" + json.dumps(FAULTS, indent=1))


def test_make_stack_serves_the_first_champion_behind_the_balancer_with_the_key(up: dict) -> None:
    assert "prediction API  http://127.0.0.1:3000" in up["output"]
    status, body = request("POST", "/predict", {"instances": DIGIT}, key=api_key())
    assert status == 200, body
    assert body["predictions"][0]["label"] == "0" and body["model_version"] == "1"
    status, body = request("POST", "/predict", {"instances": DIGIT})
    assert status == 401, body
    status, body = request("POST", "/predict", {"instances": DIGIT}, key="not-the-key")
    assert status == 401, body
    assert served_versions() == {"1"}
    replicas = [line for line in compose("ps", "--format", "{{.Name}} {{.State}}", "serving").splitlines() if line]
    assert len(replicas) == 2 and all(line.endswith("running") for line in replicas), replicas



def test_the_api_over_tls_with_the_certificate_make_secrets_made(up: dict) -> None:
    import ssl

    trusted = ssl.create_default_context(cafile=str(SECRETS / "tls_certificate"))
    connection = http.client.HTTPSConnection("127.0.0.1", TLS_PORT, context=trusted, timeout=10)
    try:
        connection.request("POST", "/predict", body=json.dumps({"instances": DIGIT}),
                           headers={"Content-Type": "application/json", "X-API-Key": api_key()})
        response = connection.getresponse()
        body = json.loads(response.read())
        assert response.status == 200 and body["predictions"][0]["label"] == "0", body
        connection.request("POST", "/predict", body=json.dumps({"instances": DIGIT}),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        assert response.status == 401
    finally:
        connection.close()
    untrusted = http.client.HTTPSConnection("127.0.0.1", TLS_PORT, context=ssl.create_default_context(), timeout=10)
    with pytest.raises(ssl.SSLCertVerificationError):
        untrusted.request("GET", "/readyz")
    untrusted.close()

def test_the_worker_trained_through_its_accounts_and_stored_artifacts_in_s3(up: dict, tmp_path: Path) -> None:
    done = fluxo_on_host("status", "--model", MODEL, "--url", f"http://127.0.0.1:{PORT}", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["aliases"]["champion"] == "1", report
    assert any(key.endswith("model.onnx") for key in keys("mlflow")), keys("mlflow")[:20]
    assert any(key.startswith("fluxo/") for key in keys("dvc")), "no DVC object in the dvc bucket"


def test_the_serving_account_cannot_move_an_alias(up: dict) -> None:
    code = ("import sys; from mlflow import MlflowClient; from mlflow.exceptions import MlflowException\n"
            "from pipelines.secret_files import load_mlflow_secrets\n"
            "load_mlflow_secrets()  # the password from its file, as fluxo serve reads it\n"
            "client = MlflowClient()\n"
            f"assert client.get_model_version_by_alias('{MODEL}', 'champion').version == '1'\n"
            f"try:\n    client.set_registered_model_alias('{MODEL}', 'champion', '1')\n"
            "except MlflowException as error:\n    print(error.error_code); sys.exit(0)\n"
            "sys.exit('the serving account moved an alias')\n")
    said = compose("exec", "-T", "serving", "python", "-c", code)
    assert "PERMISSION_DENIED" in said, said


def test_the_serving_s3_key_writes_payloads_and_nothing_else(up: dict) -> None:
    from botocore.exceptions import ClientError

    if docker("inspect", "-f", "{{.Config.Image}}", container("minio")).strip() == "fluxo-s3:local":
        pytest.skip("the S3 stand-in (moto, where MinIO cannot be pulled) checks no policies; MinIO enforces "
                    "deploy/minio-init.sh's")
    serving = s3("s3_serving_credentials")
    serving.put_object(Bucket="payloads", Key="live/probe", Body=b"x")
    for bucket in ("mlflow", "dvc"):
        with pytest.raises(ClientError, match="AccessDenied"):
            serving.put_object(Bucket=bucket, Key="probe", Body=b"x")
    for bucket in ("mlflow", "dvc", "payloads"):
        with pytest.raises(ClientError, match="AccessDenied"):
            serving.list_objects_v2(Bucket=bucket)


def test_payload_logs_reach_the_payloads_bucket(up: dict) -> None:
    for _ in range(20):
        assert request("POST", "/predict", {"instances": DIGIT}, key=api_key())[0] == 200

    waited = seconds_until(lambda: any(key.endswith(".parquet") for key in keys("payloads")), 90,
                      "a sealed payload file in s3://payloads", interval=3)
    FAULTS["payload file in the bucket after the first requests"] = {"seconds": round(waited, 1)}


def payload_instances() -> int:
    """Instances logged in the payloads bucket's sealed files (one row per request, a label per instance)."""
    import io

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    client = s3()
    return sum(pc.sum(pc.list_value_length(pq.read_table(io.BytesIO(
        client.get_object(Bucket="payloads", Key=key)["Body"].read()), columns=["labels"])["labels"])).as_py() or 0
        for key in keys("payloads") if key.endswith(".parquet"))


def test_monitor_in_the_worker_finds_drift_in_inverted_digits_sent_through_the_port(up: dict) -> None:
    from sklearn.datasets import load_digits

    inverted = (16.0 - load_digits().images[:200]).reshape(-1, 1, 8, 8)
    before, started = payload_instances(), time.time()
    for start in range(0, len(inverted), 10):
        status, body = request("POST", "/predict", {"instances": inverted[start:start + 10].tolist()}, key=api_key())
        assert status == 200, body
    seconds_until(lambda: payload_instances() >= before + len(inverted), 90, "the inverted digits in s3://payloads", interval=3)
    # A window reaching back past the first inverted digit (the monitor's own start-up takes seconds);
    # it may hold a few of the earlier tests' requests too, far fewer than monitor.min_instances (100):
    # without the inverted digits there would be no decision at all.
    hours = (time.time() - started + 120) / 3600
    said = compose("exec", "-T", "worker", "fluxo", "monitor", "--json", "--window-hours", f"{hours:.6f}",
                   timeout=600)
    summary = json.loads(said)
    assert summary["drift_detected"] is True, json.dumps(summary)[-3000:]
    assert len(inverted) <= summary["window"]["instances"] <= payload_instances(), summary["window"]
    FAULTS["fluxo monitor in the worker on 200 inverted digits"] = {
        "drift_detected": True, "p_values": {name: score["p_value"] for name, score in summary["scores"].items()}}


def _second_version() -> None:
    """v2 by a second pipeline run in the worker (it beats or ties v1 on the same split, or is challenger)."""
    said = compose("exec", "-T", "worker", "fluxo", "run", "--force", "--set", "train.seed=7", timeout=900)
    assert '"model_version": "2"' in said, said[-3000:]


def test_promote_and_rollback_from_the_host_reach_every_replica_within_seconds(up: dict, tmp_path: Path) -> None:
    _second_version()
    done = fluxo_on_host("promote", "2", "--model", MODEL, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    promoted = seconds_until(lambda: served_versions() == {"2"}, 30, "every replica serving v2")
    done = fluxo_on_host("rollback", "--model", MODEL, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rolled_back = seconds_until(lambda: served_versions() == {"1"}, 30, "every replica back on v1")
    FAULTS["alias moved from the host, until every replica serves it"] = {
        "promote_s": round(promoted, 1), "rollback_s": round(rolled_back, 1)}
    refused = fluxo_on_host("promote", "2", "--model", MODEL, tmp_path=tmp_path, account="fluxo-serving",
                            password="mlflow_serving_password")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "'fluxo-serving' may not move or remove an alias" in refused.stderr
    assert served_versions() == {"1"}


def test_a_replica_killed_under_load_is_routed_around(up: dict) -> None:
    with Load() as load:
        seconds_until(lambda: load.answered() > 200, 60, "load through the balancer")
        docker("kill", container("serving", 1))
        killed_at = load.ok + load.failed
        seconds_until(lambda: load.answered() > killed_at + 500, 60, "answers after the kill")
    FAULTS["one serving replica killed under load (8 clients)"] = {
        "requests": load.ok + load.failed, "failed": load.failed, "errors": load.errors}
    assert load.failed <= 8, load.errors  # at most the requests in flight on the killed replica
    docker("start", container("serving", 1))
    seconds_until(lambda: "healthy" in docker("inspect", "-f", "{{.State.Health.Status}}", container("serving", 1)),
             180, "the restarted replica healthy again", interval=2)


def test_replicas_keep_serving_while_mlflow_is_down_and_follow_when_it_returns(up: dict, tmp_path: Path) -> None:
    compose("stop", "mlflow")
    try:
        with Load(clients=4) as load:
            seconds_until(lambda: load.answered() > 300, 60, "answers with MLflow down")
    finally:
        compose("start", "mlflow")
    FAULTS["MLflow stopped while replicas serve"] = {"requests": load.ok + load.failed, "failed": load.failed,
                                                     "errors": load.errors}
    assert load.failed == 0, load.errors
    seconds_until(lambda: fluxo_on_host("promote", "2", "--model", MODEL, tmp_path=tmp_path).returncode == 0, 120,
             "MLflow answering again", interval=3)
    caught_up = seconds_until(lambda: served_versions() == {"2"}, 60, "replicas following the registry again")
    FAULTS["MLflow stopped while replicas serve"]["caught_up_s"] = round(caught_up, 1)


def test_a_replica_cut_off_from_mlflow_and_s3_keeps_serving(up: dict, tmp_path: Path) -> None:
    network = "fluxo_default"
    replicas = [container("serving", 1), container("serving", 2)]
    for name in replicas:
        docker("network", "disconnect", network, name)
    try:
        with Load(clients=4) as load:
            seconds_until(lambda: load.answered() > 300, 60, "answers while cut off")
    finally:
        for name in replicas:
            docker("network", "connect", network, name)
    FAULTS["serving cut off from MLflow and S3 (docker network disconnect)"] = {
        "requests": load.ok + load.failed, "failed": load.failed, "errors": load.errors}
    assert load.failed == 0, load.errors
    done = fluxo_on_host("rollback", "--model", MODEL, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    caught_up = seconds_until(lambda: served_versions() == {"1"}, 60, "replicas following the registry after reconnecting")
    FAULTS["serving cut off from MLflow and S3 (docker network disconnect)"]["caught_up_s"] = round(caught_up, 1)


def test_payloads_wait_in_the_spool_while_s3_is_away_and_none_are_lost(up: dict) -> None:
    def spooled() -> list[str]:
        return [line for index in (1, 2) for line in docker(
            "exec", container("serving", index), "find", "/app/.fluxo/payload-spool", "-name", "*.parquet").splitlines()
            if line]

    seconds_until(lambda: not spooled(), 60, "every replica's spool empty before the outage", interval=2)
    before = payload_instances()
    docker("pause", container("minio", 1))
    sent = 0
    try:
        for _ in range(60):
            assert request("POST", "/predict", {"instances": DIGIT}, key=api_key())[0] == 200
            sent += 1
    finally:
        docker("unpause", container("minio", 1))
    waited = seconds_until(lambda: payload_instances() >= before + sent, 120, f"the {sent} payloads sent during the outage in "
                                                                 "the bucket", interval=3)
    FAULTS["S3 store paused while replicas log payloads"] = {"sent": sent, "lost": max(0, before + sent - payload_instances()),
                                                             "arrived_after_s": round(waited, 1)}


def _versions(tmp_path: Path) -> list[dict]:
    done = fluxo_on_host("status", "--model", MODEL, "--url", f"http://127.0.0.1:{PORT}", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)["versions"]


LONG_TRAINING = ["--set", "train.epochs=150", "--set", "train.patience=150"]
TRAINING = "epoch 3/150:"  # the line fluxo logs at the third epoch's end; 147 more to go (tens of seconds)


def _training_in_worker(log: Path, seed: int) -> subprocess.Popen:
    """A pipeline run in the worker whose training takes tens of seconds (150 epochs, no early stop),
    its output in ``log`` as it comes (unbuffered: the test acts on the line that training began)."""
    with log.open("w") as out:
        return subprocess.Popen([*STACK, "compose", "exec", "-T", "-e", "PYTHONUNBUFFERED=1", "worker", "fluxo", "run",
                                 "--force", *LONG_TRAINING, "--set", f"train.seed={seed}"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)


def _assert_whole(versions: list[dict]) -> None:
    """No run registered twice, and every version carries what registration writes (no half-made one)."""
    run_ids = [version["run_id"] for version in versions]
    assert len(run_ids) == len(set(run_ids)), f"a run registered twice: {run_ids}"
    assert all(version.get("data_version") for version in versions), versions


def test_postgres_restarted_during_a_training_run(up: dict, tmp_path: Path) -> None:
    before = _versions(tmp_path)
    log = tmp_path / "run.log"
    run = _training_in_worker(log, seed=11)
    seconds_until(lambda: TRAINING in log.read_text(), 180, "training under way", interval=0.2)
    compose("restart", "postgres")
    assert "epoch 150/150" not in log.read_text(), "the restart came too late: training had ended"
    returncode = run.wait(900)
    said = log.read_text()
    after = _versions(tmp_path)
    _assert_whole(after)
    outcome = "completed" if returncode == 0 else "failed"
    if returncode != 0:
        assert "error:" in said, said[-3000:]  # a failure says what, in one line (prefect's traces aside)
    again = compose("exec", "-T", "worker", "fluxo", "run", "--force", "--set", "train.seed=12", timeout=900)
    assert '"model_version"' in again, again[-3000:]
    final = _versions(tmp_path)
    _assert_whole(final)
    FAULTS["PostgreSQL restarted during a training run"] = {
        "run": outcome, "versions_added_by_it": len(after) - len(before), "next_run": "completed",
        "duplicated_versions": 0}


def test_the_worker_killed_mid_training_leaves_no_duplicate_and_the_next_run_succeeds(up: dict, tmp_path: Path) -> None:
    before = _versions(tmp_path)
    log = tmp_path / "run.log"
    run = _training_in_worker(log, seed=13)
    seconds_until(lambda: TRAINING in log.read_text(), 180, "training under way", interval=0.2)
    docker("kill", container("worker"))
    run.wait(120)
    docker("start", container("worker"))
    seconds_until(lambda: docker("inspect", "-f", "{{.State.Running}}", container("worker")).strip() == "true", 60,
             "the worker running again")
    killed_while = "after training" if "epoch 150/150" in log.read_text() else "training"
    again = compose("exec", "-T", "worker", "fluxo", "run", "--force", "--set", "train.seed=13", *LONG_TRAINING,
                    timeout=900)
    assert '"model_version"' in again, again[-3000:]
    after = _versions(tmp_path)
    _assert_whole(after)
    assert len(after) == len(before) + 1, (before, after)
    assert killed_while == "training", log.read_text()[-3000:]
    FAULTS["worker killed mid-training"] = {"versions_added": len(after) - len(before), "next_run": "completed",
                                            "resumed": "resum" in again.lower(), "duplicated_versions": 0}
