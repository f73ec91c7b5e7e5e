"""What the README tells a new user to paste must work as pasted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _curl_bodies() -> list[str]:
    return re.findall(r"curl [^\n]*? -d '([^']*)'", README.read_text())


def test_the_readme_predict_request_is_complete_and_real() -> None:
    from sklearn.datasets import load_digits

    bodies = _curl_bodies()
    assert bodies, "the README shows no request to paste"
    for body in bodies:
        assert "..." not in body
        instances = np.asarray(json.loads(body)["instances"], dtype=np.float32)
        assert instances.shape[1:] == (1, 8, 8)  # the digits model's input_shape
        np.testing.assert_array_equal(instances[0, 0], load_digits().images[0])


def test_every_fluxo_command_in_the_readme_table_exists() -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    commands = set(re.findall(r"^\| `fluxo ([a-z]+)", README.read_text(), flags=re.M))
    assert {"run", "data", "train", "export", "serve", "tune", "schedule", "ui"} <= commands
    for command in commands:
        assert CliRunner().invoke(app, [command, "--help"]).exit_code == 0, command
