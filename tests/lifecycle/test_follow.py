"""A replica on another machine: only a tracking URI, no shared volume, and it follows the aliases."""

from __future__ import annotations

from pipelines.context import open_run
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import SMOKE
from tests.waiting import exceptions_of, raise_if_any_failed, wait_for

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _serving_version(url: str) -> str:
    return httpx.get(f"{url}/metadata", timeout=5).json()["model_version"]


# Half a minute with a real MLflow server; the stack's replicas do the same under load (make test-stack).
@pytest.mark.slow
def test_a_server_with_only_a_tracking_uri_follows_promote_and_rollback(project: Path, tmp_path: Path) -> None:
    from pipelines.data.ingest import ingest, version
    from pipelines.registry.aliases import promote_version, rollback
    from pipelines.release import export_run
    from pipelines.settings import load_settings
    from pipelines.train.run import train

    mlflow_port, serve_port = _free_port(), _free_port()
    tracking = f"http://127.0.0.1:{mlflow_port}"
    mlflow_log = tmp_path / "mlflow.log"
    with mlflow_log.open("wb") as out:
        mlflow_server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'registry.db'}",
             "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(mlflow_port),
             "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    replica = None
    try:
        _wait(f"{tracking}/health", mlflow_server, mlflow_log)
        # The pipeline machine: two runs against the tracking server; v1 champion, the worse v2 challenger.
        base = [f"data.dvc_remote={tmp_path / 'dvc-remote'}", f"tracking.tracking_uri={tracking}"]
        good = load_settings(SMOKE, [*base, "train.epochs=3"])
        worse = load_settings(SMOKE, [*base, "train.epochs=1", "train.learning_rate=1e-6"])
        ingest(project, good.data)
        data_version = version(project, good.data)
        assert export_run(open_run(project, good), train(open_run(project, good), data_version).run_id).promotion.alias == "champion"
        assert export_run(open_run(project, worse), train(open_run(project, worse), data_version).run_id).promotion.alias == "challenger"

        # The replica: another root (no shared .fluxo), only the tracking URI.
        elsewhere = tmp_path / "replica"
        elsewhere.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXO_")}
        env.update(MLFLOW_TRACKING_URI=tracking, FLUXO_SERVE__FOLLOW_INTERVAL_S="1")
        replica_log = tmp_path / "replica.log"
        with replica_log.open("wb") as out:
            replica = subprocess.Popen(
                [str(Path(sys.executable).with_name("fluxo")), "serve", "--root", str(elsewhere),
                 "--port", str(serve_port)],
                cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        url = f"http://127.0.0.1:{serve_port}"
        _wait(f"{url}/readyz", replica, replica_log)
        assert _serving_version(url) == "1"

        failures: list[str] = []
        answered: list[str] = []  # the version of each 200, in order
        sent = [0]
        stop = threading.Event()

        def clients() -> None:
            body = {"instances": [[[[0.0] * 8] * 8]]}
            while not stop.is_set():
                sent[0] += 1
                answer = httpx.post(f"{url}/predict", json=body, timeout=10)
                if answer.status_code != 200:
                    failures.append(answer.text)
                else:
                    answered.append(answer.json()["model_version"])

        def answered_by(version: str, since: int):
            def condition() -> bool:
                raise_if_any_failed([sender])
                return version in answered[since:]
            return condition

        with ThreadPoolExecutor(1) as executor:
            sender = executor.submit(clients)
            try:
                wait_for(answered_by("1", 0), "the client to be answered by version 1", timeout=30)
                for action, expected in ((lambda: promote_version(open_run(project, good), "fluxo-digits", "2"), "2"),
                                         (lambda: rollback(open_run(project, good), "fluxo-digits"), "1")):
                    since = len(answered)
                    action()
                    # Followed within a few polls (FOLLOW_INTERVAL_S=1), and the client answered by it.
                    wait_for(lambda: _serving_version(url) == expected, f"the replica to serve version {expected}",
                             timeout=60, interval=0.2, detail=lambda: replica_log.read_text()[-3000:])
                    wait_for(answered_by(expected, since), f"the client to be answered by version {expected}",
                             timeout=30)
            finally:
                stop.set()
        errors = exceptions_of([sender])
        assert not errors, errors  # the client never lost a connection
        assert not failures, failures[:3]
        assert len(answered) == sent[0]  # every request it sent was answered with a 200
        assert set(answered) == {"1", "2"}
        assert not (elsewhere / ".fluxo" / "export").exists()  # everything came from the registry
    finally:
        if replica is not None:
            _stop(replica)
        _stop(mlflow_server)


def test_a_look_at_an_unreachable_registry_fails_in_seconds_so_the_replica_catches_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's own client retries 7 times, backing off for minutes: a follower that waited in them
    followed minutes late after the registry came back (found cutting a replica off its network)."""
    from pipelines.registry.follow import RegistryFollower
    from tests.conftest import make_settings

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)  # unset now, and unset again after the test
    root = tmp_path / "project"
    root.mkdir()
    # A name no resolver knows: what a replica cut off from the stack's network sees for "mlflow".
    settings = make_settings(root, "tracking.tracking_uri=http://mlflow.fluxo-test.invalid:5000")
    # A replica reads the registry: its context neither needs nor creates an experiment, so opening it asks nothing.
    follower = RegistryFollower(open_run(root, settings, experiment=False), "fluxo-digits", ["champion"],
                                interval_s=3600).start()
    try:
        started = time.monotonic()
        with contextlib.suppress(Exception):
            follower.poll()
        assert time.monotonic() - started < 20
    finally:
        follower.stop()
