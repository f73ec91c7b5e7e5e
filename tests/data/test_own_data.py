"""A user's own data, the way the README's "Your own data" walks it: the installed `fluxo`, a fresh
process per command, a clone-shaped project with a fresh HOME (tests/users.py).

An image folder goes ingest → `fluxo run --set data.dataset=FOLDER` → `fluxo serve` → a multipart
upload to /predict/image, trained by the model chosen for its size when no model.name is given
(ModelSettings.default_for, measured by bench/image_default.py); a CSV file goes ingest → run; a
CSV cell that is not a number is one line naming the file, line, column and value.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.settings import load_settings
from tests.conftest import REPO, store_client
from tests.serving_fixtures import free_port
from tests.users import Project, one_error_line, stop, wait_for

pytestmark = pytest.mark.e2e

DIGITS = ("0", "1", "2")


def _json(result) -> dict:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads(result.stdout[result.stdout.index("{"):])


def _run(user: Project, run_id: str):
    """The MLflow run in the project's own store (mlflow/mlflow.db, where `fluxo` put it)."""
    return store_client(user.root / "mlflow" / "mlflow.db").get_run(run_id)


def digit_folder(root: Path, per_class: int = 30, side: int = 32) -> Path:
    """scikit-learn's digits 0, 1 and 2 as side×side PNGs: a folder of the issue's kind."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for label in DIGITS:
        (root / label).mkdir(parents=True)
        images = bunch.images[bunch.target == int(label)][:per_class]
        for index, pixels in enumerate(images):
            image = Image.fromarray((pixels * 255 / 16).round().astype(np.uint8), "L")
            image.resize((side, side), Image.BILINEAR).save(root / label / f"{index:03d}.png")
    return root


@pytest.mark.slow  # half a minute or more: `make test-slow` (make test stays under 20 minutes)
def test_an_image_folder_is_trained_with_the_default_for_its_size_and_served(tmp_path: Path) -> None:
    user = Project.clone_shaped(tmp_path)
    folder = digit_folder(user.root / "digits-png")
    summary = _json(user.fluxo("data", "ingest", "--dataset", "digits-png"))
    assert (summary["kind"], summary["input_shape"], summary["classes"]) == (
        "image", [1, 28, 28], {"0": 30, "1": 30, "2": 30})

    # No model.name anywhere: lenet, measured as the default for 28×28 folders, is chosen, said and recorded.
    ran = user.fluxo("run", "--set", "data.dataset=digits-png", "--set", "train.epochs=20",
                     "--set", "export.variants=[]")
    output = ran.stdout + ran.stderr
    chosen = "default for 28x28 images (16 pixels a side or more)"
    assert f"model.name is unset: training lenet, the {chosen}" in output, output[-3000:]
    run_summary = _json(ran)
    assert run_summary["registered_model"] == "fluxo-digits-png" and run_summary["promoted"], run_summary
    run = _run(user, run_summary["run_id"])
    assert run.data.params["model.name"] == "lenet" and run.data.tags["fluxo.model.default"] == chosen

    # `fluxo serve` (the champion of the dataset in data/) and the README's upload, curl -F files=@...
    port = free_port()
    server, log = user.start("serve", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, "the server to be ready",
                 timeout=180, process=server)
        uploads = [(label, folder / label / f"{i:03d}.png") for label in DIGITS for i in range(0, 30, 5)]
        files = [("files", (path.name, path.read_bytes(), "image/png")) for _, path in uploads]
        answer = httpx.post(f"{url}/predict/image", files=files, timeout=30)
        assert answer.status_code == 200, answer.text
        predicted = [p["label"] for p in answer.json()["predictions"]]
        correct = sum(p == label for p, (label, _) in zip(predicted, uploads))
        assert correct >= 0.8 * len(uploads), (predicted, [label for label, _ in uploads])
    finally:
        code = stop(server)
    assert code == 0, log.read_text()[-3000:]


def test_an_explicit_model_name_is_never_replaced(tmp_path: Path) -> None:
    """`--set model.name` wins over the default for the data, and every shipped preset names its model."""
    user = Project.clone_shaped(tmp_path)
    digit_folder(user.root / "digits-png", per_class=10)
    _json(user.fluxo("data", "ingest", "--dataset", "digits-png"))
    trained = user.fluxo("train", "--set", "model.name=mlp", "--set", "train.epochs=1")
    assert "model.name is unset" not in trained.stdout + trained.stderr
    run = _run(user, _json(trained)["run_id"])
    assert run.data.params["model.name"] == "mlp" and "fluxo.model.default" not in run.data.tags

    # Parameters without a model were meant for some model: the error names the chosen one and those that fit.
    line = one_error_line(user.fluxo("train", "--set", "model.params.channels=8"))
    assert line.startswith("error: model.params channels are not arguments of lenet, the default for 28x28 "
                           "images"), line
    assert "--set model.name=cnn2d" in line, line

    for preset in sorted((REPO / "configs").glob("*.yaml")):
        assert load_settings(preset, []).model.name is not None, f"{preset.name} must name its model"


def _curves_csv(path: Path, rows: int = 90, steps: int = 16) -> Path:
    """Three shapes of curve (rising, falling, a bump) with noise, label first as a user's export has it."""
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, steps)
    shapes = {"rise": t, "fall": 1 - t, "bump": np.exp(-((t - 0.5) ** 2) / 0.02)}
    labels = [list(shapes)[i % 3] for i in range(rows)]
    values = np.stack([shapes[label] for label in labels]) + rng.normal(0, 0.1, (rows, steps))
    frame = pd.DataFrame(values.round(4), columns=[f"t{i}" for i in range(steps)])
    frame.insert(0, "label", labels)
    frame.to_csv(path, index=False)
    return path


# Half a minute; the image folder's twin above stays in make test.
@pytest.mark.slow
def test_a_csv_file_is_ingested_and_trained_with_the_sequence_default(tmp_path: Path) -> None:
    user = Project.clone_shaped(tmp_path)
    _curves_csv(user.root / "curves.csv")
    assert _json(user.fluxo("data", "ingest", "--dataset", "curves.csv"))["kind"] == "sequence"

    ran = user.fluxo("run", "--set", "data.dataset=curves.csv", "--set", "train.epochs=5",
                     "--set", "export.variants=[]")
    output = ran.stdout + ran.stderr
    assert "model.name is unset: training resnet1d, the default for sequences of 16 steps" in output, output[-3000:]
    summary = _json(ran)
    assert summary["registered_model"] == "fluxo-curves" and summary["promoted"], summary
    assert _run(user, summary["run_id"]).data.params["model.name"] == "resnet1d"


def test_a_csv_cell_that_is_not_a_number_is_named_in_one_line(tmp_path: Path) -> None:
    user = Project.clone_shaped(tmp_path)
    path = _curves_csv(user.root / "curves.csv", rows=12)
    lines = path.read_text().splitlines()
    cells = lines[6].split(",")  # line 7 of the file: the header is line 1
    cells[4] = "abc"  # column t3 (label, t0, t1, t2, t3)
    lines[6] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")

    line = one_error_line(user.fluxo("data", "ingest", "--dataset", "curves.csv"))
    assert line.startswith("error: curves.csv, line 7, column 't3': 'abc' is not a number; "), line
    assert "correct the cell" in line, line
    assert not (user.root / "data").exists()  # nothing ingested
