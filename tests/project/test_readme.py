"""What the README tells a new user to paste must work as pasted."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.readme_walk import fresh_copy, walk, walk_plan

README = Path(__file__).resolve().parents[2] / "README.md"


def _curl_bodies() -> list[str]:
    return re.findall(r"curl (?:[^\n]|\\\n)*? -d '([^']*)'", README.read_text())  # a line may end with a backslash


def test_the_readme_predict_request_is_complete_and_real() -> None:
    from sklearn.datasets import load_digits

    bodies = _curl_bodies()
    assert bodies, "the README shows no request to paste"
    from sklearn.datasets import load_wine

    for body in bodies:
        assert "..." not in body
        instances = json.loads(body)["instances"]
        if isinstance(instances[0], dict):  # "Your own table": wine.csv's first row, keyed by its columns
            assert instances[0] == load_wine(as_frame=True).frame.drop(columns="target").iloc[0].to_dict()
            continue
        values = np.asarray(instances, dtype=np.float32)
        assert values.shape[1:] == (1, 8, 8)  # the digits model's input_shape
        np.testing.assert_array_equal(values[0, 0], load_digits().images[0])


def test_every_fluxo_command_in_the_readme_table_exists() -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    commands = set(re.findall(r"^\| `fluxo ([a-z]+)", README.read_text(), flags=re.M))
    assert {"run", "data", "train", "export", "serve", "tune", "schedule", "ui"} <= commands
    for command in commands:
        assert CliRunner().invoke(app, [command, "--help"]).exit_code == 0, command


def test_every_bash_block_of_the_readme_says_how_each_command_is_run() -> None:
    """A command added to the README without a readme-test directive fails here, in the fast suite."""
    plan = walk_plan(README.read_text())
    assert any(step.command == "make run" and step.how == "serve" for step in plan)
    for step in plan:
        if step.how == "skip":
            assert len(step.detail) > 10, f"README.md:{step.line}: say why `{step.command}` is not run"


def test_the_readme_walk_refuses_a_block_it_cannot_account_for() -> None:
    with pytest.raises(ValueError, match="without a `<!-- readme-test"):
        walk_plan("text\n```bash\nfluxo run\n```\n")
    with pytest.raises(ValueError, match="2 commands but 1"):
        walk_plan("<!-- readme-test: run -->\n```bash\nfluxo run\nfluxo serve   # comment\n```\n")
    plan = walk_plan("<!-- readme-test: run | serve http://x/readyz -->\n```bash\n# a comment\nmake \\\n  run\n"
                     "fluxo serve\n```\n")
    assert [(s.command, s.how, s.detail) for s in plan] == [("make    run", "run", ""),
                                                             ("fluxo serve", "serve", "http://x/readyz")]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.readme
def test_every_command_the_readme_shows_runs_as_pasted_in_a_fresh_clone(tmp_path: Path) -> None:
    """`make test-readme`: a fresh copy, a fresh HOME, a fresh .venv made by `make run` itself."""
    busy = [port for port in (3000, 4200, 5000) if not _port_free(port)]
    if busy:
        pytest.fail(f"ports {busy} are taken; the README's commands use them as shown")
    copy = fresh_copy(tmp_path / "fluxo")
    home = tmp_path / "home"
    home.mkdir()
    pip_cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True).stdout
    venv = str(Path(sys.executable).parent)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("FLUXO_", "MLFLOW_", "PREFECT_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv)
    env["HOME"] = str(home)  # a fresh machine's ~/.prefect, ~/.cache/fluxo and ~/bentoml
    if pip_cache.strip():
        env["PIP_CACHE_DIR"] = pip_cache.strip()  # what pip downloaded is not the user's state
    log = tmp_path / "walk.log"
    try:
        skipped = walk(copy, log, env)
    except AssertionError as error:
        pytest.fail(f"{error}\n--- the last of {log} ---\n{log.read_text(errors='replace')[-6000:]}")
    print("\n".join(f"not run: {line}" for line in skipped))


def test_make_run_and_serve_take_the_port_the_readme_names() -> None:
    """`make run PORT=3001` (the README) serves on 3001; without PORT the setting's default stays."""
    for target in ("run", "serve"):
        chosen = subprocess.run(["make", "-n", target, "PORT=3001"], cwd=README.parent, capture_output=True,
                                text=True, check=True).stdout
        plain = subprocess.run(["make", "-n", target], cwd=README.parent, capture_output=True, text=True,
                               check=True).stdout
        command = [line for line in chosen.splitlines() if "fluxo " in line]
        assert command and command[-1].endswith("--set serve.port=3001"), chosen
        assert "serve.port" not in plain, plain
