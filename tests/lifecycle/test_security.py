"""Secure by default beyond one machine, against the real servers on loopback.

- MLflow: `mlflow server --app-name basic-auth` started through the image's entrypoint
  (mlflow/entrypoint.py) with a SQLite store, its accounts made by mlflow/accounts.py, both as the
  compose stack runs them. A client without an account can neither register a version nor move an
  alias; fluxo's pipeline runs as the worker account; a reader with the serving account follows an
  alias move and cannot move one itself.
- Prefect: `prefect server start` with PREFECT_SERVER_API_AUTH_STRING refuses a client without the
  string; `fluxo schedule` with it (from PREFECT_API_AUTH_STRING_FILE) serves its deployment.
- Secrets as files: the `_FILE` variables of fluxo, the service and the entrypoint, and the refusals
  the `fluxo` command prints as one line with exit status 2.

The two servers are shared by the module (each takes ~20 s to start on a loaded 2-core machine).
"""

from __future__ import annotations

from pipelines.context import open_run
import base64
import contextlib
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import REPO, SMOKE
from tests.serving_fixtures import free_port as _free_port
from tests.lifecycle.test_follow import _wait

FLUXO = Path(sys.executable).with_name("fluxo")
MODEL = "fluxo-digits"
ACCOUNT_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_PASSWORD_FILE",
                     "MLFLOW_TRACKING_AUTH")


# ---------------------------------------------------------------- helpers


def _stop(process: subprocess.Popen, grace: float = 30) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _secret(folder: Path, name: str, value: str | None = None) -> Path:
    path = folder / name
    path.write_text((secrets.token_hex(24) if value is None else value) + "\n")
    return path


def _load_script(name: str):
    """mlflow/<name>.py as a module (the folder is not a package: it ships in the MLflow image)."""
    spec = importlib.util.spec_from_file_location(f"fluxo_mlflow_{name}", REPO / "mlflow" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _as_account(username: str | None, password_file: Path | None) -> Iterator[None]:
    """This process talks to MLflow as ``username``, its password read from the file as `fluxo` does."""
    from pipelines.secret_files import load_mlflow_secrets

    saved = {key: os.environ.get(key) for key in ACCOUNT_VARIABLES}
    for key in ACCOUNT_VARIABLES:
        os.environ.pop(key, None)
    if username:
        os.environ.update(MLFLOW_TRACKING_USERNAME=username, MLFLOW_TRACKING_PASSWORD_FILE=str(password_file))
        load_mlflow_secrets()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _cli_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLUXO_", "PREFECT_API_", "MLFLOW_TRACKING_")) and k != "MLFLOW_TRACKING_URI"}
    return {**env, **values}


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """A user's error as the `fluxo` command reports it: exit status 2, one line, no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# ---------------------------------------------------------------- secrets as files (no server)


def test_secret_files_are_read_as_mlflow_and_prefect_need_them(tmp_path: Path) -> None:
    """Prefect's auth string becomes its variable; MLflow's password stays in its file, which fluxo's
    request auth provider reads (the environment only names the provider)."""
    from pipelines.errors import FluxoError
    from pipelines.secret_files import PASSWORD_FILE_AUTH, load_client_secrets

    password, auth = _secret(tmp_path, "pw", "s3cret"), _secret(tmp_path, "auth", "fluxo:abc")
    env = {"MLFLOW_TRACKING_USERNAME": "fluxo-worker", "MLFLOW_TRACKING_PASSWORD_FILE": str(password),
           "PREFECT_API_AUTH_STRING_FILE": str(auth)}
    load_client_secrets(env)
    assert "MLFLOW_TRACKING_PASSWORD" not in env and "s3cret" not in env.values()
    assert env["MLFLOW_TRACKING_AUTH"] == PASSWORD_FILE_AUTH and env["PREFECT_API_AUTH_STRING"] == "fluxo:abc"
    load_client_secrets(env)  # again: no conflict
    load_client_secrets({**env, "MLFLOW_TRACKING_PASSWORD": "s3cret"})  # the same password twice is no conflict

    def refused(**values: str) -> str:
        with pytest.raises(FluxoError) as caught:
            load_client_secrets(dict(values))
        return str(caught.value)

    assert "MLFLOW_TRACKING_PASSWORD_FILE=/nonexistent" in refused(
        MLFLOW_TRACKING_USERNAME="u", MLFLOW_TRACKING_PASSWORD_FILE="/nonexistent")
    assert "empty" in refused(MLFLOW_TRACKING_USERNAME="u", MLFLOW_TRACKING_PASSWORD_FILE=str(_secret(tmp_path, "e", " ")))
    assert "unset one of them" in refused(PREFECT_API_AUTH_STRING="other", PREFECT_API_AUTH_STRING_FILE=str(auth))
    assert "unset one of them" in refused(MLFLOW_TRACKING_USERNAME="u", MLFLOW_TRACKING_PASSWORD="other",
                                          MLFLOW_TRACKING_PASSWORD_FILE=str(password))
    assert "MLFLOW_TRACKING_AUTH=kubernetes" in refused(MLFLOW_TRACKING_USERNAME="u", MLFLOW_TRACKING_AUTH="kubernetes",
                                                        MLFLOW_TRACKING_PASSWORD_FILE=str(password))
    assert "MLFLOW_TRACKING_USERNAME" in refused(MLFLOW_TRACKING_PASSWORD_FILE=str(password))


def test_the_service_reads_its_api_key_from_a_file(tmp_path: Path) -> None:
    from serving import ServingConfig, ServingError

    key = _secret(tmp_path, "key", "k3y")
    assert ServingConfig.from_env({"FLUXO_API_KEY_FILE": str(key)}).api_key == "k3y"
    assert ServingConfig.from_env({"FLUXO_API_KEY": "plain"}).api_key == "plain"
    assert ServingConfig.from_env({}).api_key is None
    for env, says in (({"FLUXO_API_KEY_FILE": str(tmp_path / "missing")}, "no such file"),
                      ({"FLUXO_API_KEY_FILE": str(_secret(tmp_path, "blank", ""))}, "empty"),
                      ({"FLUXO_API_KEY_FILE": str(key), "FLUXO_API_KEY": "other"}, "unset one")):
        with pytest.raises(ServingError, match=says) as caught:
            ServingConfig.from_env(env)
        assert "FLUXO_API_KEY" in str(caught.value)


def test_the_mlflow_entrypoint_builds_uris_from_files_not_arguments(tmp_path: Path) -> None:
    entrypoint = _load_script("entrypoint")
    password = _secret(tmp_path, "postgres_password", "p@ss/word%")
    env = {"POSTGRES_HOST": "postgres", "POSTGRES_USER": "fluxo", "POSTGRES_PASSWORD_FILE": str(password),
           "MLFLOW_DB": "mlflow", "MLFLOW_AUTH_DB": "mlflow_auth",
           "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(_secret(tmp_path, "admin", "adm1n")),
           "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE": str(_secret(tmp_path, "flask", "fl4sk"))}
    added = entrypoint.configure(env)
    assert added["MLFLOW_BACKEND_STORE_URI"] == "postgresql+psycopg2://fluxo:p%40ss%2Fword%25@postgres:5432/mlflow"
    assert added["MLFLOW_AUTH_ADMIN_PASSWORD"] == "adm1n" and added["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "fl4sk"
    ini = Path(added["MLFLOW_AUTH_CONFIG_PATH"])
    assert oct(ini.stat().st_mode & 0o777) == oct(0o600) and oct(ini.parent.stat().st_mode & 0o777) == oct(0o700)
    import configparser

    parsed = configparser.ConfigParser()  # as MLflow reads it: '%' must survive interpolation
    parsed.read(ini)
    assert parsed["mlflow"]["database_uri"].endswith("p%40ss%2Fword%25@postgres:5432/mlflow_auth")
    assert parsed["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    for broken, says in (({**env, "POSTGRES_PASSWORD_FILE": str(tmp_path / "nope")}, "POSTGRES_PASSWORD_FILE="),
                         ({**env, "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(_secret(tmp_path, "e", ""))}, "empty"),
                         ({"MLFLOW_AUTH_DB": "a"}, "POSTGRES_HOST")):
        with pytest.raises(entrypoint.SetupError, match=says):
            entrypoint.configure(broken)
    assert entrypoint.configure({}) == {}  # standalone: nothing configured, nothing changed


def test_a_broken_secret_file_is_one_line_before_any_command(tmp_path: Path) -> None:
    result = subprocess.run([str(FLUXO), "status", "--help"], capture_output=True, text=True, timeout=120,
                            env=_cli_env(MLFLOW_TRACKING_USERNAME="u", MLFLOW_TRACKING_PASSWORD_FILE=str(tmp_path / "x")))
    assert f"MLFLOW_TRACKING_PASSWORD_FILE={tmp_path / 'x'}: no such file" in _one_line_error(result)


# ---------------------------------------------------------------- MLflow with basic-auth


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen
    secrets: Path
    values: list[str]  # every secret the server and its accounts were given
    tool_env: dict[str, str]  # what the compose stack gives mlflow/accounts.py

    def tool(self, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
        """mlflow/accounts.py, as `docker compose run mlflow-accounts ARGS` runs it."""
        return subprocess.run([sys.executable, str(REPO / "mlflow" / "accounts.py"), *args], input=stdin,
                              capture_output=True, text=True, timeout=300, env={**self.tool_env, **env})

    def account(self, name: str) -> tuple[str, Path]:
        return {"admin": ("admin", self.secrets / "mlflow_admin_password"),
                "worker": ("fluxo-worker", self.secrets / "mlflow_worker_password"),
                "serving": ("fluxo-serving", self.secrets / "mlflow_serving_password")}[name]

    def as_(self, name: str):
        return _as_account(*self.account(name))

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[MlflowServer]:
    """The compose stack's MLflow, on loopback: entrypoint.py + `mlflow server --app-name basic-auth`, then accounts.py."""
    if any("prefect_server" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("prefect_process")  # it starts meanwhile: ~20 s less in all
    home = tmp_path_factory.mktemp("mlflow-auth")
    folder = home / "secrets"
    folder.mkdir()
    names = ("mlflow_admin_password", "mlflow_flask_secret_key", "mlflow_worker_password", "mlflow_serving_password")
    values = [_secret(folder, name).read_text().strip() for name in names]
    port, log = _free_port(), home / "server.log"
    env = {**_cli_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{home / 'mlflow.db'}",
           "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{home / 'users.db'}",
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
           "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(folder / "mlflow_admin_password"),
           "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE": str(folder / "mlflow_flask_secret_key")}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "mlflow" / "entrypoint.py"), "mlflow", "server", "--app-name", "basic-auth",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--artifacts-destination", str(home / "artifacts")],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    tool_env = {**_cli_env(), "MLFLOW_TRACKING_URI": url, "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
                "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(folder / "mlflow_admin_password"),
                "MLFLOW_WORKER_USERNAME": "fluxo-worker",
                "MLFLOW_WORKER_PASSWORD_FILE": str(folder / "mlflow_worker_password"),
                "MLFLOW_SERVING_USERNAME": "fluxo-serving",
                "MLFLOW_SERVING_PASSWORD_FILE": str(folder / "mlflow_serving_password")}
    server = MlflowServer(url, process, folder, values, tool_env)
    try:
        _wait(f"{url}/health", process, log)
        made = server.tool()
        assert made.returncode == 0, made.stdout + made.stderr + log.read_text()[-3000:]
        assert "fluxo-worker: created" in made.stdout and "fluxo-serving: created" in made.stdout, made.stdout
        yield server
    finally:
        _stop(process, grace=5)  # its state dies with tmp_path: no need to wait for a clean stop


@dataclass
class Pipeline:
    root: Path
    settings: object
    run_id: str


@pytest.fixture(scope="module")
def pipeline(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """fluxo's pipeline (ingest, train one epoch, export, register, gate) as the worker account."""
    from pipelines.data.ingest import ingest, version
    from pipelines.release import export_run
    from pipelines.settings import load_settings
    from pipelines.train.run import train

    home = tmp_path_factory.mktemp("pipeline")
    root = home / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    settings = load_settings(SMOKE, [f"data.dvc_remote={home / 'dvc-remote'}",
                                     f"tracking.tracking_uri={mlflow_server.url}", "train.epochs=1"])
    with mlflow_server.as_("worker"):
        ingest(root, settings.data)
        result = train(open_run(root, settings), version(root, settings.data))
        exported = export_run(open_run(root, settings), result.run_id)
        versions = [(v.version, v.run_id) for v in mlflow_server.client().search_model_versions(f"name='{MODEL}'")]
        import mlflow
        where = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(),
                 {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "FLUXO_"))})
    with mlflow_server.as_("admin"):
        seen = [(v.name, v.version, v.run_id, v.source) for v in mlflow_server.client().search_model_versions()]
    assert (exported.registered_model, exported.model_version, exported.promotion.alias) == (MODEL, "1", "champion"), (
        f"this run {result.run_id}; the worker sees {versions} on {mlflow_server.url}, the admin {seen}; "
        f"tracking, registry, environment: {where}")
    return Pipeline(root, settings, result.run_id)


@pytest.mark.e2e
def test_no_secret_on_the_servers_command_lines(mlflow_server: MlflowServer) -> None:
    processes = [psutil.Process(mlflow_server.process.pid), *psutil.Process(mlflow_server.process.pid).children(True)]
    lines = [" ".join(p.cmdline()) for p in processes]
    assert any("basic-auth" in line for line in lines), lines
    for value in mlflow_server.values:
        assert not any(value in line for line in lines), "a secret is on a command line"


@pytest.mark.e2e
def test_an_unauthenticated_client_can_neither_register_a_version_nor_move_an_alias(
    mlflow_server: MlflowServer, pipeline: Pipeline
) -> None:
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import tracking_refusal

    url, api = mlflow_server.url, f"{mlflow_server.url}/api/2.0/mlflow"
    with mlflow_server.as_("worker"):
        v1 = mlflow_server.client().get_model_version(MODEL, "1")
    register = {"name": MODEL, "source": v1.source, "run_id": v1.run_id}
    move = {"name": MODEL, "alias": "champion", "version": "1"}
    for auth in (None, ("fluxo-worker", "wrong"), ("nobody", "nothing")):
        assert httpx.post(f"{api}/model-versions/create", json=register, auth=auth, timeout=30).status_code == 401
        assert httpx.post(f"{api}/registered-models/alias", json=move, auth=auth, timeout=30).status_code == 401
        assert httpx.get(f"{api}/registered-models/get", params={"name": MODEL}, auth=auth, timeout=30).status_code == 401
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # probes need no login

    with _as_account(None, None):  # MLflow's own client, as fluxo uses it, without an account
        with pytest.raises(MlflowException) as caught:
            mlflow_server.client().set_registered_model_alias(MODEL, "challenger", "1")
    refusal = str(tracking_refusal(caught.value))
    assert "401" in refusal and "MLFLOW_TRACKING_USERNAME" in refusal and url in refusal, refusal
    with mlflow_server.as_("worker"):
        client = mlflow_server.client()
        assert [v.version for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
        assert client.get_registered_model(MODEL).aliases == {"champion": "1"}


@pytest.mark.e2e
def test_a_reader_follows_an_alias_move_and_cannot_move_one(
    mlflow_server: MlflowServer, pipeline: Pipeline, tmp_path: Path
) -> None:
    from mlflow.exceptions import MlflowException

    from pipelines.registry.aliases import promote_version
    from pipelines.registry.follow import RegistryFollower
    from pipelines.registry.store import materialize_model
    from pipelines.registry.publish import model_root
    from serving.reload import read_pointer

    settings, replica = pipeline.settings, tmp_path / "replica"
    replica.mkdir()
    with mlflow_server.as_("admin"):
        experiments = len(mlflow_server.client().search_experiments())
    # The replica, as `fluxo serve` starts one: fetch the champion, then follow the registry.
    with mlflow_server.as_("serving"):
        served = materialize_model(open_run(replica, settings), None, MODEL)
        assert served.version == "1"
        follower = RegistryFollower(open_run(replica, settings), MODEL, ["champion"], 1.0)
        follower.seen["champion"] = "1"
        assert follower.poll() == []
    with mlflow_server.as_("admin"):  # a reader creates no experiment (it would own it)
        assert len(mlflow_server.client().search_experiments()) == experiments

    # The worker registers v2 (the same files) and promotes it with fluxo's own command.
    with mlflow_server.as_("worker"):
        client = mlflow_server.client()
        v1 = client.get_model_version(MODEL, "1")
        assert client.create_model_version(MODEL, source=v1.source, run_id=v1.run_id).version == "2"
        promote_version(open_run(pipeline.root, settings), MODEL, "2")
    with mlflow_server.as_("serving"):
        assert follower.poll() == ["champion"]
        assert read_pointer(model_root(replica, settings, MODEL)).name == f"{MODEL}-v2"

        # ... and cannot move it back itself, however it tries.
        with pytest.raises(MlflowException) as caught:
            promote_version(open_run(replica, settings), MODEL, "1")
        assert caught.value.error_code == "PERMISSION_DENIED"
        for attempt in (lambda c: c.set_registered_model_alias(MODEL, "champion", "1"),
                        lambda c: c.delete_registered_model_alias(MODEL, "champion"),
                        lambda c: c.create_model_version(MODEL, source=v1.source, run_id=v1.run_id)):
            with pytest.raises(MlflowException, match="403"):
                attempt(mlflow_server.client())

    # The `fluxo` command says so in one line (exit 2), naming the account and what it may not do.
    serving_user, serving_password = mlflow_server.account("serving")
    result = subprocess.run(
        [str(FLUXO), "promote", "1", "--model", MODEL, "--root", str(replica), "--config", str(SMOKE),
         "--set", f"tracking.tracking_uri={mlflow_server.url}"],
        cwd=replica, capture_output=True, text=True, timeout=300,
        env=_cli_env(MLFLOW_TRACKING_USERNAME=serving_user, MLFLOW_TRACKING_PASSWORD_FILE=str(serving_password)))
    line = _one_line_error(result)
    assert "'fluxo-serving' may not move or remove an alias" in line and "403" in line, line

    with mlflow_server.as_("worker"):
        assert mlflow_server.client().get_registered_model(MODEL).aliases["champion"] == "2"


@pytest.mark.e2e
def test_results_on_stdout_stay_json_with_a_tracking_server(mlflow_server: MlflowServer, pipeline: Pipeline) -> None:
    """MLflow writes "View run ... at: URL" to stdout when a run against a server ends: `fluxo export`
    and `fluxo monitor --json` printed unparseable output against the compose stack's MLflow."""
    user, password = mlflow_server.account("worker")
    result = subprocess.run(
        [str(FLUXO), "export", "--run-id", pipeline.run_id, "--root", str(pipeline.root), "--config", str(SMOKE),
         "--set", f"tracking.tracking_uri={mlflow_server.url}", "--set", f"data.dvc_remote={pipeline.root.parent / 'dvc-remote'}"],
        cwd=pipeline.root, capture_output=True, text=True, timeout=300,
        env=_cli_env(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD_FILE=str(password)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["run_id"] == pipeline.run_id, result.stdout[:2000]

@pytest.mark.e2e
def test_the_accounts_tool_runs_again_adds_a_person_and_rotates_the_admin(
    mlflow_server: MlflowServer, pipeline: Pipeline, tmp_path: Path
) -> None:
    api = f"{mlflow_server.url}/api/2.0/mlflow"
    again = mlflow_server.tool()  # every `docker compose up`: same accounts, passwords from the files
    assert again.returncode == 0 and again.stdout.count(": password set;") == 2, again.stdout + again.stderr

    person = ("alice", secrets.token_hex(12))
    added = mlflow_server.tool("add-user", "alice", "READ", stdin=person[1] + "\n")
    assert added.returncode == 0, added.stderr
    assert httpx.get(f"{api}/registered-models/get", params={"name": MODEL}, auth=person, timeout=30).status_code == 200
    move = {"name": MODEL, "alias": "champion", "version": "1"}
    assert httpx.post(f"{api}/registered-models/alias", json=move, auth=person, timeout=30).status_code == 403

    # The admin's password: a new file, the old one on stdin; then back, for the other tests.
    old_file = mlflow_server.secrets / "mlflow_admin_password"
    old, new_file = old_file.read_text().strip(), _secret(tmp_path, "new_admin_password")
    me = {"username": "admin"}
    for current, target in ((old, new_file), (new_file.read_text().strip(), old_file)):
        rotated = mlflow_server.tool("rotate-admin", stdin=current + "\n", MLFLOW_AUTH_ADMIN_PASSWORD_FILE=str(target))
        assert rotated.returncode == 0, rotated.stderr
        assert httpx.get(f"{api}/users/get", params=me, auth=("admin", current), timeout=30).status_code == 401
        new = target.read_text().strip()
        assert httpx.get(f"{api}/users/get", params=me, auth=("admin", new), timeout=30).status_code == 200
    wrong = mlflow_server.tool("rotate-admin", stdin="not-the-password\n")
    assert wrong.returncode == 1 and "401" in wrong.stderr and wrong.stderr.count("\n") == 1, wrong.stderr


# ---------------------------------------------------------------- Prefect with an auth string


@dataclass
class PrefectServer:
    url: str
    auth_string: str
    auth_file: Path

    def headers(self, auth: str | None) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


@pytest.fixture(scope="module")
def prefect_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Path, PrefectServer]]:
    """`prefect server start` with PREFECT_SERVER_API_AUTH_STRING, as the compose stack starts it; not awaited."""
    home = tmp_path_factory.mktemp("prefect-auth")
    auth_file = _secret(home, "prefect_auth_string", f"fluxo:{secrets.token_hex(24)}")
    port, log = _free_port(), home / "server.log"
    env = {**_cli_env(), "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
           "PREFECT_SERVER_API_AUTH_STRING": auth_file.read_text().strip()}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process, log, PrefectServer(f"http://127.0.0.1:{port}/api", auth_file.read_text().strip(), auth_file)
    finally:
        _stop(process, grace=5)


@pytest.fixture(scope="module")
def prefect_server(prefect_process: tuple[subprocess.Popen, Path, PrefectServer]) -> PrefectServer:
    process, log, server = prefect_process
    _wait(f"{server.url}/health", process, log)
    return server


def _deployments(server: PrefectServer) -> list[dict]:
    answer = httpx.post(f"{server.url}/deployments/filter", json={}, headers=server.headers(server.auth_string),
                        timeout=30)
    answer.raise_for_status()
    return answer.json()


@pytest.mark.e2e
def test_prefect_refuses_a_client_without_the_auth_string(prefect_server: PrefectServer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from pipelines.scheduling import prefect_refusal

    version = f"{prefect_server.url}/admin/version"
    for auth in (None, "fluxo:wrong"):
        assert httpx.get(version, headers=prefect_server.headers(auth), timeout=30).status_code == 401
    assert httpx.get(version, headers=prefect_server.headers(prefect_server.auth_string), timeout=30).status_code == 200
    assert httpx.get(f"{prefect_server.url}/health", timeout=30).status_code == 200  # probes need none

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}, restore_defaults={PREFECT_API_AUTH_STRING}):
        with get_client(sync_client=True) as client, pytest.raises(Exception) as caught:
            client.read_deployments()
    monkeypatch.setenv("PREFECT_API_URL", prefect_server.url)  # what fluxo's commands run with
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    refusal = prefect_refusal(caught.value)
    assert refusal is not None and "PREFECT_API_AUTH_STRING" in str(refusal), caught.value
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url,
                                     PREFECT_API_AUTH_STRING: prefect_server.auth_string}):
        with get_client(sync_client=True) as client:
            assert isinstance(client.read_deployments(), list)


def _schedule(project: Path, tmp_path: Path, cron: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(FLUXO), "schedule", "--cron", cron, "--root", str(project), "--config", str(SMOKE),
             "--set", "train.epochs=1", "--set", f"data.dvc_remote={tmp_path / 'dvc-remote'}",
             "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
            cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.e2e
def test_fluxo_schedule_authenticates_to_prefect(prefect_server: PrefectServer, project: Path, tmp_path: Path) -> None:
    without = subprocess.run(
        [str(FLUXO), "schedule", "--cron", "0 3 * * *", "--root", str(project), "--config", str(SMOKE)],
        cwd=project, capture_output=True, text=True, timeout=300, env=_cli_env(PREFECT_API_URL=prefect_server.url))
    assert "PREFECT_API_AUTH_STRING" in _one_line_error(without) and "401" in without.stderr

    log = tmp_path / "schedule.log"
    process = _schedule(project, tmp_path, "0 3 * * *", _cli_env(
        PREFECT_API_URL=prefect_server.url, PREFECT_API_AUTH_STRING_FILE=str(prefect_server.auth_file)), log)
    try:
        deadline, found = time.monotonic() + 180, []
        while time.monotonic() < deadline and not found:
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(2)
            found = [d for d in _deployments(prefect_server) if d["name"] == "scheduled"]
        assert found, "fluxo schedule registered no deployment within 180 s:\n" + log.read_text()[-3000:]
        assert [s["schedule"]["cron"] for s in found[0]["schedules"]] == ["0 3 * * *"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        _stop(process)
    assert prefect_server.auth_string not in log.read_text()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_scheduled_run_against_the_authenticated_server_trains(
    prefect_server: PrefectServer, project: Path, tmp_path: Path
) -> None:
    """The whole way: the flow run the runner starts inherits the auth string and reports back."""
    from tests.conftest import store_client

    log = tmp_path / "schedule.log"
    process = _schedule(project, tmp_path, "* * * * *", _cli_env(
        PREFECT_API_URL=prefect_server.url, PREFECT_API_AUTH_STRING_FILE=str(prefect_server.auth_file)), log)
    try:
        deadline, versions, db = time.monotonic() + 240, [], tmp_path / "mlflow.db"
        while time.monotonic() < deadline and not versions:
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(3)
            if db.exists():
                with contextlib.suppress(Exception):
                    versions = store_client(db).search_model_versions(f"name='{MODEL}'")
        assert versions, "no scheduled run registered a model within 240 s:\n" + log.read_text()[-3000:]
        runs = httpx.post(f"{prefect_server.url}/flow_runs/filter", json={},
                          headers=prefect_server.headers(prefect_server.auth_string), timeout=30).json()
        assert runs, "the flow run did not report to the authenticated server"
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        _stop(process)
    assert prefect_server.auth_string not in log.read_text()
