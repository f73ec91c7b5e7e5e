"""Every `fluxo` command of the README's table, run as users run it: the installed console script, a fresh
process, a clone-shaped project; once on its success path and once on a user's mistake (exit 2, one line,
no traceback). Commands whose own tests already do this are named in ELSEWHERE, and a test checks that
the table holds no command missing from both."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.users import Project, one_error_line

README = Path(__file__).resolve().parents[2] / "README.md"
SMOKE = "configs/smoke.yaml"

# Commands run as subprocesses of the installed `fluxo` by other tests (success and mistake).
ELSEWHERE = {
    "run": "tests/project/test_first_hour.py (success), tests/project/test_cli.py (a mistake inside the flow)",
    "serve": "tests/project/test_first_hour.py, tests/serving/test_serve_process.py",
    "predict": "tests/project/test_first_hour.py",
    "status": "tests/project/test_first_hour.py",
    "monitor": "tests/project/test_first_hour.py (success); here (a mistake)",
    "ui": "tests/project/test_first_hour.py (--prefect), tests/serving/test_serve_process.py (MLflow's)",
    "schedule": "tests/project/test_schedule.py (success); here (a mistake)",
    "prefect": "tests/project/test_orchestration.py (status and stop, with and without a server)",
}


def _json(result) -> dict:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads(result.stdout[result.stdout.index("{"):])


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return Project.clone_shaped(tmp_path_factory.mktemp("commands"))


def test_the_readme_table_names_no_command_left_untested() -> None:
    tested_here = {"data", "train", "export", "promote", "rollback", "tune", "models", "monitor", "schedule"}
    table = set(re.findall(r"^\| `fluxo ([a-z]+)", README.read_text(), flags=re.M))
    assert table <= tested_here | set(ELSEWHERE), table - tested_here - set(ELSEWHERE)


def test_data_ingest(user: Project) -> None:
    line = one_error_line(user.fluxo("data", "ingest", "--dataset", "no-such-folder"))
    assert "no-such-folder" in line, line
    summary = _json(user.fluxo("data", "ingest", "--config", SMOKE))
    assert summary["dataset"] == "digits" and summary["splits"] == {"train": 1077, "val": 360, "test": 360}


@pytest.mark.slow  # 49 s: four trainings and exports as subprocesses; tests/project/test_cli.py's promote and rollback run in make test
def test_train_export_promote_rollback(user: Project) -> None:
    line = one_error_line(user.fluxo("train", "--config", "configs/mnist1d-cnn.yaml"))
    assert "fluxo data ingest --config configs/mnist1d-cnn.yaml" in line, line
    _json(user.fluxo("data", "ingest", "--config", SMOKE))  # done by the ingest test too, when make test runs both
    first = _json(user.fluxo("train", "--config", SMOKE))
    second = _json(user.fluxo("train", "--config", SMOKE, "--set", "train.epochs=1",
                              "--set", "train.learning_rate=1e-6"))

    line = one_error_line(user.fluxo("export", "--run-id", "0123456789abcdef"))
    assert "0123456789abcdef" in line, line
    # Exported with the preset it was trained with: a smoke run is not held to the baselines (configs/smoke.yaml).
    exported = _json(user.fluxo("export", "--run-id", first["run_id"], "--config", SMOKE))
    assert exported["version"] == "1" and exported["parity"]["passed"], exported
    worse = _json(user.fluxo("export", "--run-id", second["run_id"], "--config", SMOKE))
    assert worse["version"] == "2" and "challenger" in worse["promotion"], worse

    line = one_error_line(user.fluxo("promote", "7"))
    assert "has no version '7'" in line, line
    promoted = _json(user.fluxo("promote", "2"))
    assert promoted["previous"] == "1", promoted
    rolled = _json(user.fluxo("rollback"))
    assert rolled["version"] == "1" and rolled["rolled_back_from"] == "2", rolled
    line = one_error_line(user.fluxo("rollback"))
    assert "no earlier one to roll back to" in line, line


def test_tune(user: Project) -> None:
    line = one_error_line(user.fluxo("tune", "--config", SMOKE, "--set", "tune.space={train.nope: [1, 2]}"))
    assert "train.nope" in line, line
    summary = _json(user.fluxo("tune", "--config", "configs/digits-cnn-tune.yaml", "--trials", "2",
                               "--set", "train.epochs=1", "--set", "tune.startup_trials=1"))
    assert sum(summary["trials"].values()) == 2 and Path(user.root / summary["preset"]).is_file(), summary


def test_models(user: Project) -> None:
    listed = user.fluxo("models")
    assert listed.returncode == 0 and {"mlp", "lenet", "cnn2d", "gru"} <= set(re.findall(r"^(\w+) ", listed.stdout,
                                                                                          flags=re.M)), listed.stdout
    line = one_error_line(user.fluxo("models", "show", "lenet", "--input-shape", "1,x,28"))
    assert "--input-shape '1,x,28'" in line, line


def test_monitor_and_schedule_mistakes(user: Project) -> None:
    line = one_error_line(user.fluxo("monitor", "--config", SMOKE))
    assert "serve.payload_log" in line, line
    line = one_error_line(user.fluxo("schedule", "--cron", "every day"))
    assert "not a cron expression" in line, line
