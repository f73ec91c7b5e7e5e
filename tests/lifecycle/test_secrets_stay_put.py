"""Secrets stay put: a password read from its file reaches no other process's environment, no URI's
password is printed or put on a command line, and `fluxo serve` fails when its server dies.

Every command runs as users run it: the installed `fluxo` in a fresh process (tests/users.py),
its children read back from /proc (their command lines and environments, through psutil).
"""

from __future__ import annotations

import secrets
import signal
from pathlib import Path

import httpx
import psutil
import pytest

from pipelines.redact import redact, redact_uri
from pipelines.secret_files import PASSWORD_FILE_AUTH, without_client_secrets
from serving.launch import wait_ready
from tests.serving_fixtures import build_model_dir, free_port
from tests.users import Project, wait_for


@pytest.mark.parametrize(("uri", "shown"), [
    ("postgresql://fluxo:pw@db:5432/mlflow", "postgresql://fluxo:***@db:5432/mlflow"),
    ("postgresql+psycopg2://fluxo:p@ss@db/mlflow?sslmode=require&sslpassword=k",  # an unescaped "@" in it
     "postgresql+psycopg2://fluxo:***@db/mlflow?sslmode=require&sslpassword=***"),
    ("https://user:token@mlflow.example.com/", "https://user:***@mlflow.example.com/"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Date=1&X-Amz-Credential=AKIA%2F&X-Amz-Signature=abc",
     "https://b.s3.amazonaws.com/k?X-Amz-Date=1&X-Amz-Credential=***&X-Amz-Signature=***"),
    ("s3://bucket/data?aws_secret_access_key=zz&region=eu", "s3://bucket/data?aws_secret_access_key=***&region=eu"),
    ("https://host/api?access_token=t#id_token=u", "https://host/api?access_token=***#id_token=***"),
    ("mysql://root:@db/x", "mysql://root:***@db/x"),
    # nothing secret: unchanged, so the user still recognises the store
    ("sqlite:////home/me/project/mlflow/mlflow.db", "sqlite:////home/me/project/mlflow/mlflow.db"),
    ("http://user@host:5000/path?page=2", "http://user@host:5000/path?page=2"),
    ("/home/me/dvc-remote", "/home/me/dvc-remote"),
])
def test_redact_uri_masks_the_password_and_secret_parameters(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown
    assert redact_uri(shown) == shown  # idempotent: a message redacted twice reads the same


def test_redact_masks_every_uri_in_a_message() -> None:
    message = ("API request to https://u:pw1@h:1/api/2.0/mlflow/runs/get failed; "
               "DVC remote 's3://k:pw2@bucket/p' (see postgresql://a:pw3@db/x).")
    shown = redact(message)
    assert not any(f"pw{n}" in shown for n in (1, 2, 3)), shown
    assert "https://u:***@h:1/api/2.0/mlflow/runs/get failed" in shown and "'s3://k:***@bucket/p'" in shown
    assert redact("no uri: a:b@c") == "no uri: a:b@c"


def test_children_that_are_no_client_get_no_client_credentials() -> None:
    env = {"PATH": "/bin", "MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p",
           "MLFLOW_TRACKING_PASSWORD_FILE": "/run/secrets/p", "MLFLOW_TRACKING_TOKEN": "t",
           "MLFLOW_TRACKING_AUTH": PASSWORD_FILE_AUTH, "PREFECT_API_AUTH_STRING": "a:b", "PREFECT_API_KEY": "k",
           "AWS_SECRET_ACCESS_KEY": "s3"}  # the server's payload log may write to S3: that one stays
    assert without_client_secrets(env) == {"PATH": "/bin", "MLFLOW_TRACKING_USERNAME": "u",
                                           "AWS_SECRET_ACCESS_KEY": "s3"}
    assert without_client_secrets({"MLFLOW_TRACKING_AUTH": "kubernetes"}) == {"MLFLOW_TRACKING_AUTH": "kubernetes"}


def _user(project: Path, tmp_path: Path) -> tuple[Project, str, str]:
    """`fluxo` run in ``project`` with an MLflow password in a file and a Prefect auth string: (user, both)."""
    home = tmp_path / "home"
    home.mkdir()
    password, auth = secrets.token_hex(16), f"fluxo:{secrets.token_hex(16)}"
    (tmp_path / "mlflow_password").write_text(password + "\n")
    user = Project(project, home)
    user.env.update(MLFLOW_TRACKING_USERNAME="fluxo-serving", PREFECT_API_AUTH_STRING=auth,
                    MLFLOW_TRACKING_PASSWORD_FILE=str(tmp_path / "mlflow_password"))
    return user, password, auth


def _seen(processes: list[psutil.Process]) -> list[tuple[str, dict[str, str]]]:
    """Each process's command line and environment, as anyone on the machine reads them from /proc."""
    seen = []
    for process in processes:
        try:
            seen.append((" ".join(process.cmdline()), process.environ()))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return seen


def test_fluxo_serve_keeps_credentials_from_its_workers_and_fails_when_its_server_is_killed(
    project: Path, tmp_path: Path
) -> None:
    user, password, auth = _user(project, tmp_path)
    user.env["FLUXO_WORKERS"] = "1"
    port = free_port()
    store = f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"
    process, log = user.start("serve", "--model", str(build_model_dir(tmp_path / "model")), "--port", str(port),
                              "--root", str(project), "--set", store)
    descendants: list[psutil.Process] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=120, process=process)
        descendants = psutil.Process(process.pid).children(recursive=True)
        seen = _seen(descendants)
        assert any("_bentoml_impl.worker" in line for line, _ in seen), [line for line, _ in seen]
        for line, env in seen:
            assert not any(password in value or auth in value for value in env.values()), f"a secret reached {line}"
            assert not {"MLFLOW_TRACKING_PASSWORD_FILE", "MLFLOW_TRACKING_AUTH", "PREFECT_API_AUTH_STRING"} & set(env)

        # The server dies under it (the OOM killer's SIGKILL): `fluxo serve` fails with it, saying so.
        wait_for(lambda: "fluxo is serving" in log.read_text(errors="replace"), "fluxo serve's welcome",
                 timeout=60, process=process)  # it found the server ready itself: now it only waits on it
        (arbiter,) = psutil.Process(process.pid).children()
        arbiter.send_signal(signal.SIGKILL)
        assert process.wait(60) == 128 + signal.SIGKILL
        output = log.read_text(errors="replace")
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
        assert f"the model server (pid {arbiter.pid}) was killed by SIGKILL" in errors[0], errors[0]
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive, f"left running: {[p.pid for p in alive]}"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)  # nothing holds the port
    finally:
        for leftover in [process, *descendants]:
            try:
                leftover.kill()
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        process.wait(30)


@pytest.mark.slow  # half a minute or more: `make test-slow` (make test stays under 20 minutes)
def test_fluxo_ui_puts_no_store_on_its_command_lines_and_no_password_in_its_errors(
    project: Path, tmp_path: Path
) -> None:
    user, password, _ = _user(project, tmp_path)
    # A tracking server that does not answer: the error quotes its URI, without the password.
    user.env.update(MLFLOW_TRACKING_URI=f"https://fluxo:{password}@127.0.0.1:{free_port()}/",
                    MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    failed = user.fluxo("ui", "--port", str(free_port()), "--root", str(project), timeout=120)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "fluxo:***@127.0.0.1" in output, output[-3000:]
    assert password not in output, output[-3000:]

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    user.env["MLFLOW_TRACKING_URI"] = store
    port = free_port()
    ui, log = user.start("ui", "--port", str(port), "--root", str(project))
    try:
        wait_for(lambda: any("uvicorn" in line for line, _ in _seen(psutil.Process(ui.pid).children(True))),
                 "the MLflow UI's web server", timeout=240, process=ui)
        seen = _seen(psutil.Process(ui.pid).children(recursive=True))
        assert seen
        for line, env in seen:
            assert str(tmp_path / "mlflow.db") not in line and "--backend-store-uri" not in line, line
            assert not any(password in value for value in env.values()), f"the password reached {line}"
        (server,) = psutil.Process(ui.pid).children()
        assert " ui " in " ".join(server.cmdline()) and server.environ()["MLFLOW_BACKEND_STORE_URI"] == store
        # ... and that store is the one it serves: the experiment `fluxo ui` made in it.
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name"
        found = wait_for(lambda: httpx.get(api, params={"experiment_name": "fluxo"}, timeout=5).json(),
                         "the MLflow UI's API", timeout=240, process=ui)
        assert found["experiment"]["name"] == "fluxo", found
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(60) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.wait(30)
