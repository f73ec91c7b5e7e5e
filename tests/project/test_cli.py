"""The `fluxo` command as a user types it: each stage alone, and clear errors for bad input."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
from typer.testing import CliRunner

from pipelines.cli import app
from serving.launch import wait_ready
from tests.conftest import SMOKE
from tests.waiting import wait_for

runner = CliRunner()


def _stores(project: Path) -> list[str]:
    stores = project.parent
    return ["--set", f"data.dvc_remote={stores / 'dvc-remote'}", "--set", f"tracking.tracking_uri=sqlite:///{stores / 'mlflow.db'}"]


def _json_tail(output: str) -> dict:
    return json.loads(output[output.index("{") :])


def test_help_lists_every_subcommand() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "data", "train", "export", "serve", "schedule", "ui"):
        assert command in result.output


def test_stages_one_by_one(project: Path) -> None:
    common = ["--root", str(project), "--config", str(SMOKE), *_stores(project)]
    ingested = runner.invoke(app, ["data", "ingest", "--dataset", "digits", *common])
    assert ingested.exit_code == 0, ingested.output
    summary = _json_tail(ingested.stdout)
    assert summary["splits"]["test"] == 360 and summary["data_version"].endswith(".dir")

    trained = runner.invoke(app, ["train", *common])
    assert trained.exit_code == 0, trained.output
    run_id = _json_tail(trained.stdout)["run_id"]

    exported = runner.invoke(app, ["export", "--run-id", run_id, *common])
    assert exported.exit_code == 0, exported.output
    result = _json_tail(exported.stdout)
    assert result["parity"]["passed"] and result["model"] == "fluxo-digits" and result["version"] == "1"
    assert (project / ".fluxo" / "export" / run_id / "model.onnx").is_file()

    # `fluxo serve` as a user runs it, stopped the way kill, systemd or a container runtime stop it.
    port = _free_port()
    fluxo = Path(sys.executable).with_name("fluxo")
    log = project.parent / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen([str(fluxo), "serve", "--port", str(port), *common], stdout=out,
                                  stderr=subprocess.STDOUT)
    descendants: list[psutil.Process] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=120, process=server)
        answer = httpx.post(f"http://127.0.0.1:{port}/predict", json={"instances": [[[[0.0] * 8] * 8]]}, timeout=10)
        assert answer.status_code == 200 and answer.json()["model_version"] == "1"
        # Its welcome (where it serves, a request to paste) comes once it found the server ready itself.
        wait_for(lambda: "fluxo is serving fluxo-digits v1" in log.read_text(errors="replace"),
                 "fluxo serve's welcome", timeout=60)
        descendants = psutil.Process(server.pid).children(recursive=True)
        assert descendants, "fluxo serve started no server"
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0  # a normal stop, not an error (`make run` used to end with Error 143)
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert not alive, f"left running after SIGTERM: {[p.pid for p in alive]}"
    finally:
        if server.poll() is None:
            server.kill()
        for process in descendants:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        server.wait(30)
    output = log.read_text(errors="replace")
    assert "Traceback" not in output, output[-2000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_inputs_exit_2_with_the_reason(project: Path) -> None:
    cases = [
        (["train", "--set", "train.epoch=3"], "--set train.epoch=3: train.epoch is not a setting; did you mean train.epochs?"),
        (["data", "ingest", "--dataset", "imagenet"], "digits, mnist, mnist1d"),
        (["schedule", "--cron", "every night"], "not a cron expression"),
        (["run", "--config", "configs/missing.yaml"], "no such file"),
        (["serve", "--model", "ftp://x", *_stores(project)], "expected an export directory"),
        (["export", "--root", str(project), *_stores(project)], "no finished run"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_mistakes_after_ingest_are_one_line_and_leave_no_run_behind(project: Path) -> None:
    from mlflow.tracking import MlflowClient

    common = ["--root", str(project), *_stores(project)]
    assert runner.invoke(app, ["data", "ingest", "--config", str(SMOKE), *common]).exit_code == 0
    cases = [
        # A preset for another dataset must not train on whatever data/ holds.
        (["train", "--config", "configs/mnist1d-gru.yaml"], "fluxo data ingest --config configs/mnist1d-gru.yaml"),
        (["tune", "--config", "configs/mnist1d-gru.yaml"], "data/ holds 'digits'"),
        # A model that cannot read the data is refused before an MLflow run is opened.
        (["train", "--set", "model.name=gru"], "model.name='gru' takes sequence inputs"),
        (["export", "--run-id", "deadbeef"], "--run-id deadbeef: no such run"),
    ]
    for args, message in cases:
        result = runner.invoke(app, [*args, *common])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output, result.output
    client = MlflowClient(f"sqlite:///{project.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fluxo")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []


def test_a_mistake_inside_fluxo_run_is_one_line_without_traceback(project: Path, tmp_path: Path) -> None:
    """As a user sees it: the real command, Prefect's embedded server, a sequence file with labels elsewhere."""
    from tests.data.test_ingest_sources import _sequences_csv

    path = _sequences_csv(tmp_path / "walk.csv", rows=40)
    env = {k: v for k, v in __import__("os").environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    fluxo = Path(sys.executable).with_name("fluxo")
    result = subprocess.run(
        [str(fluxo), "run", "--root", str(project), "--set", f"data.dataset={path}",
         "--set", "data.sequence.label_column=target", *_stores(project)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "data.sequence.label_column" in last, output[-3000:]
    assert output.count("Retry") == 0, output[-3000:]


def test_tune_writes_a_best_preset_and_exports_it(project: Path) -> None:
    common = ["--root", str(project), *_stores(project)]
    assert runner.invoke(app, ["data", "ingest", "--config", str(SMOKE), *common]).exit_code == 0
    preset = project / "best.yaml"
    result = runner.invoke(app, ["tune", "--config", str(SMOKE.parent / "digits-cnn-tune.yaml"), "--trials", "2",
                                 "--set", "train.epochs=1", "--preset", str(preset), "--export", *common])
    assert result.exit_code == 0, result.output
    summary = _json_tail(result.stdout)
    assert summary["trials"]["complete"] + summary["trials"].get("pruned", 0) == 2
    assert preset.is_file() and summary["export"]["version"] == "1"
    exported = runner.invoke(app, ["export", *common])  # newest *training* run, not a trial
    assert _json_tail(exported.stdout)["run_id"] == summary["export"]["run_id"]


def test_promote_rollback_and_status(project: Path) -> None:
    """Two runs: v1 champion, a worse v2 the challenger; promote v2 by hand, roll back, and look at it all."""
    from serving.contract import read_model_dir
    from serving.reload import read_pointer

    common = ["--root", str(project), "--config", str(SMOKE), *_stores(project)]
    assert runner.invoke(app, ["data", "ingest", *common]).exit_code == 0
    for extra in ([], ["--set", "train.epochs=1", "--set", "train.learning_rate=1e-6"]):
        trained = runner.invoke(app, ["train", *common, *extra])
        assert trained.exit_code == 0, trained.output
        exported = runner.invoke(app, ["export", "--run-id", _json_tail(trained.stdout)["run_id"], *common])
        assert exported.exit_code == 0, exported.output
    champion_root = project / ".fluxo" / "serve" / "fluxo-digits"

    seen = _json_tail(runner.invoke(app, ["status", "--url", "http://127.0.0.1:9", *common]).stdout)
    assert seen["aliases"] == {"champion": "1", "challenger": "2"}
    assert [v["version"] for v in seen["versions"]] == ["2", "1"]
    assert seen["versions"][0]["gate"]["promoted"] is False and seen["server"]["reachable"] is False

    promoted = runner.invoke(app, ["promote", "2", *common])
    assert promoted.exit_code == 0, promoted.output
    assert _json_tail(promoted.stdout)["previous"] == "1"
    assert read_model_dir(read_pointer(champion_root)).version == "2"  # running servers follow
    seen = _json_tail(runner.invoke(app, ["status", *common]).stdout)
    assert seen["aliases"] == {"champion": "2"}  # no longer also the challenger

    rolled = runner.invoke(app, ["rollback", *common])
    assert rolled.exit_code == 0, rolled.output
    assert _json_tail(rolled.stdout)["version"] == "1"
    assert read_model_dir(read_pointer(champion_root)).version == "1"
    again = runner.invoke(app, ["rollback", *common])  # v1 was the first champion
    assert again.exit_code == 2 and "no earlier one to roll back to" in again.output

    for args, message in ((["promote", "7"], "has no version '7'"), (["promote", "1", "--challenger"], "is the champion"),
                          (["status", "--model", "fluxo-nope"], "not in the model registry")):
        result = runner.invoke(app, [*args, *common])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
