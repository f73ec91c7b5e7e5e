"""`fluxo serve` as a process on a shared machine: its own metrics, an exact `/metrics`, a clean stop,
errors that fit what was typed, and no library warnings around it (issue 20, "The first hour").

Every command runs as a user runs it: the installed `fluxo` in a fresh process, in a fresh project,
serving a tiny model directory over real HTTP (tests/serving_fixtures.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from serving.launch import wait_ready
from tests.serving_fixtures import build_model_dir, free_port, metric_value

FLUXO = Path(sys.executable).with_name("fluxo")
INSTANCE = [[[0.0] * 8] * 8]


def _stores(project: Path) -> list[str]:
    return ["--root", str(project), "--set", f"tracking.tracking_uri=sqlite:///{project.parent / 'mlflow.db'}"]


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Served:
    """One `fluxo serve --model DIR` process, its output in a file, its URL, and the processes it started."""

    def __init__(self, project: Path, model_dir: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._out = log.open("wb")
        self.process = subprocess.Popen(
            [str(FLUXO), "serve", "--model", str(model_dir), "--port", str(self.port), *_stores(project)],
            stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        self.descendants: list[psutil.Process] = []

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> Served:
        try:
            wait_ready(self.url, timeout=120, process=self.process)
        except Exception as error:
            raise AssertionError(f"{error}\n--- output ---\n{self.output()[-3000:]}") from error
        self.descendants = psutil.Process(self.process.pid).children(recursive=True)
        return self

    def workers_metrics_dirs(self) -> set[str]:
        """PROMETHEUS_MULTIPROC_DIR as BentoML handed it to each worker process (their environment)."""
        found = set()
        for child in self.descendants:
            folder = child.environ().get("PROMETHEUS_MULTIPROC_DIR")
            if folder and "_bentoml_impl.worker" in " ".join(child.cmdline()):
                found.add(folder)
        return found

    def close(self) -> None:
        """Whatever a failed test left running is killed, so nothing holds the port or the output file."""
        if self.process.poll() is None:
            self.process.kill()
        for child in self.descendants:
            try:
                child.kill()  # psutil checks it is still the same process first
            except psutil.NoSuchProcess:
                pass
        self.process.wait(30)
        self._out.close()


@contextmanager
def served(project: Path, model_dir: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[Served]:
    server = Served(project, model_dir, log, env)
    try:
        yield server.ready()
    finally:
        server.close()


def _predict(url: str) -> int:
    # A connection of its own each: the kernel hands connections to whichever worker accepts first,
    # so a burst lands on both workers.
    with httpx.Client(timeout=30) as client:
        return client.post(f"{url}/predict", json={"instances": [INSTANCE]}).status_code


def _answered(url: str) -> float:
    """``fluxo_requests_total`` of 200s on /predict, from one scrape on a connection of its own."""
    with httpx.Client(timeout=30) as client:
        return metric_value(client.get(f"{url}/metrics").text, "fluxo_requests_total", route="/predict", status="200")


def _stopped(server: Served) -> None:
    """SIGTERM, as `kill` sends it: exit status 0, and no worker left behind."""
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0, server.output()[-3000:]
    _, alive = psutil.wait_procs(server.descendants, timeout=15)
    assert not alive, f"left running: {[p.pid for p in alive]}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("served") / "model")


@pytest.mark.slow  # 13 s: two servers
def test_two_servers_count_their_own_requests_and_a_scrape_right_after_a_burst_shows_all(
    project: Path, model_dir: Path, tmp_path: Path
) -> None:
    # Two workers (the default) on the first server: a scrape answered by one worker must include
    # what the other answered an instant before. The second server, one worker, shares the machine.
    with served(project, model_dir, tmp_path / "a.log") as first, \
            served(project, model_dir, tmp_path / "b.log", {"FLUXO_WORKERS": "1"}) as second:
        folders = first.workers_metrics_dirs(), second.workers_metrics_dirs()
        assert all(len(found) == 1 for found in folders), folders  # one folder per server, every worker in it
        (first_dir,), (second_dir,) = folders
        assert first_dir != second_dir
        default = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml")) / "prometheus_multiproc_dir"
        assert Path(default) not in (Path(first_dir), Path(second_dir))
        assert any(Path(first_dir).glob("flush-*.sock")), os.listdir(first_dir)

        total = 0
        with ThreadPoolExecutor(4) as pool:
            for _ in range(10):  # ten bursts, each followed at once by a scrape
                codes = list(pool.map(lambda _: _predict(first.url), range(8)))
                assert codes == [200] * 8
                total += 8
                assert _answered(first.url) == total
        for _ in range(7):
            assert _predict(second.url) == 200
        assert _answered(second.url) == 7
        assert _answered(first.url) == 80  # the second server's requests are not the first's

        _stopped(first)
        _stopped(second)
        assert not Path(first_dir).exists() and not Path(second_dir).exists()  # removed with their servers


def test_ctrl_c_then_more_signals_while_draining_exit_0_without_a_traceback(
    project: Path, model_dir: Path, tmp_path: Path
) -> None:
    with served(project, model_dir, tmp_path / "serve.log", {"FLUXO_WORKERS": "1"}) as server:
        assert _predict(server.url) == 200
        # BentoML's arbiter is held (SIGSTOP) so the drain lasts until the test lets it go: the
        # later signals are then certain to arrive while `fluxo serve` is stopping the server.
        (arbiter,) = psutil.Process(server.process.pid).children()
        arbiter.suspend()
        try:
            server.process.send_signal(signal.SIGINT)  # Ctrl-C
            _wait_for(lambda: "stopping the server" in server.output(), "the first signal to be handled")
            server.process.send_signal(signal.SIGTERM)
            _wait_for(lambda: server.output().count("already stopping") == 1, "the second signal to be noted")
            server.process.send_signal(signal.SIGINT)
            _wait_for(lambda: server.output().count("already stopping") == 2, "the third signal to be noted")
            assert server.process.poll() is None  # still draining, not cut short
        finally:
            arbiter.resume()
        assert server.process.wait(60) == 0, server.output()[-3000:]
        _, alive = psutil.wait_procs(server.descendants, timeout=15)
        assert not alive, f"left running: {[p.pid for p in alive]}"
        output = server.output()
        assert "Traceback" not in output and "_Stop" not in output, output[-3000:]
        assert "already stopping: the server is finishing its requests; whatever still runs after 15 s is killed" \
            in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/readyz", timeout=5)  # nothing holds the port


def test_a_server_whose_fluxo_serve_is_killed_outright_stops_and_frees_the_port(
    project: Path, model_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL (or the OOM killer) gives `fluxo serve` no chance to stop its server, which runs in a
    session of its own: it used to keep answering and holding the port with nobody to stop it."""
    with served(project, model_dir, tmp_path / "serve.log") as server:
        assert _predict(server.url) == 200
        server.process.kill()
        server.process.wait(30)
        _, alive = psutil.wait_procs(server.descendants, timeout=60)
        assert not alive, f"left running after `fluxo serve` was killed: {[p.cmdline() for p in alive]}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/readyz", timeout=5)


def _fluxo_error(*args: str) -> str:
    result = subprocess.run([str(FLUXO), *args], capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output
    assert output.startswith("error: "), output
    return output


def test_serve_a_registry_model_that_does_not_exist_names_it_and_what_exists(project: Path, model_dir: Path) -> None:
    from tests.conftest import store_client

    stores = _stores(project)
    client = store_client(project.parent / "mlflow.db")
    client.create_registered_model("fluxo-digits")
    client.create_model_version("fluxo-digits", source=model_dir.as_uri())
    client.create_model_version("fluxo-digits", source=model_dir.as_uri())
    client.set_registered_model_alias("fluxo-digits", "champion", "2")

    other = _fluxo_error("serve", "--model", "models:/nope@champion", *stores)
    assert "--model models:/nope@champion: the model registry at sqlite:///" in other
    assert "has no model named 'nope'; it holds fluxo-digits (`fluxo status --model NAME` lists one's versions" in other
    version = _fluxo_error("serve", "--model", "models:/fluxo-digits/9", *stores)
    assert "--model models:/fluxo-digits/9: fluxo-digits has no version 9 in the model registry at" in version
    assert "its versions: v2, v1; its aliases: @champion = v2 (`fluxo status --model fluxo-digits`" in version
    assert "pass --model" not in other + version


def test_the_mlflow_ui_workers_import_print_no_starlette_warning() -> None:
    """What each of `fluxo ui`'s MLflow workers imports, in an interpreter that `fluxo` started.

    The full command takes half a minute to bring its four workers up: see the slow test below.
    """
    program = ("import subprocess, sys\n"
               "from pipelines.cli import configure_logging\n"
               "configure_logging(False)  # what every `fluxo` command does first\n"
               "sys.exit(subprocess.run([sys.executable, '-c', 'import mlflow.server.fastapi_app']).returncode)\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "StarletteDeprecationWarning" not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_fluxo_ui_prints_no_starlette_warning(project: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        ui = subprocess.Popen([str(FLUXO), "ui", "--port", str(port), "--root", str(project)], stdout=out,
                              stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: log.read_text().count("Application startup complete") == 4, "the four MLflow workers",
                      timeout=180)
        finally:
            ui.send_signal(signal.SIGTERM)
            assert ui.wait(60) == 0
    output = log.read_text()
    assert "StarletteDeprecationWarning" not in output, output
