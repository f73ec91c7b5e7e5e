"""Train → export → registry against a real MLflow (SQLite in tmp_path) and a real DVC repo."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlflow.tracking import MlflowClient

from pipelines.data.ingest import ingest, version
from pipelines.data.store import read_dataset
from pipelines.errors import FluxoError
from pipelines.export.step import export_run
from pipelines.export.image_recipe import DIGITS
from pipelines.serve import materialize_model, model_root
from serving.reload import read_pointer
from pipelines.train.run import train


@pytest.fixture
def trained(project: Path, settings_for):
    settings = settings_for("train.epochs=4")
    ingest(project, settings.data)
    data_version = version(project, settings.data)
    return settings, data_version, train(project, settings, data_version)


def test_run_records_everything_a_person_looks_for(project: Path, trained) -> None:
    settings, data_version, result = trained
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.tags["data_version"] == data_version.md5
    assert run.inputs.dataset_inputs[0].dataset.digest == data_version.md5
    assert run.data.params["model.name"] == "cnn2d"
    assert json.loads(run.data.params["model.params"]) == {"channels": 8, "dropout": 0.0}
    for metric in ("test_accuracy", "test_precision_macro", "test_recall_macro", "test_f1_macro"):
        assert metric in run.data.metrics
    curve = client.get_metric_history(result.run_id, "val_loss")
    assert [m.step for m in curve] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/learning_curves.png"} <= artifacts
    assert client.list_artifacts(result.run_id, "checkpoints")[0].path == "checkpoints/best.pt"


def test_export_registers_checks_parity_and_promotes(project: Path, trained, settings_for) -> None:
    settings, data_version, result = trained
    exported = export_run(project, settings, result.run_id)
    onnx.checker.check_model(onnx.load(str(exported.export_dir / "model.onnx")))
    assert exported.parity.passed and exported.parity.samples == len(read_dataset(project / "data").splits["test"].y)
    assert exported.promotion.promoted and exported.promotion.champion_version is None

    client = MlflowClient()
    champion = client.get_model_version_by_alias("fluxo-digits", "champion")
    assert str(champion.version) == exported.model_version == "1"
    assert "first version" in champion.tags["fluxo.promotion"]
    run = client.get_run(result.run_id)
    assert run.data.metrics["parity_max_abs_diff"] <= 1e-4

    metadata = json.loads((exported.export_dir / "metadata.json").read_text())
    assert metadata["data_version"] == data_version.md5 and metadata["input_shape"] == [1, 8, 8]
    # /predict/image preprocesses uploads the way scikit-learn made the digits.
    assert metadata["preprocessing"]["image"] == DIGITS
    assert "served_test_accuracy" not in metadata  # fixed-size inputs: served exactly as tested
    # The promotion published v1 as the live champion for running servers.
    live = read_pointer(model_root(project, settings))
    assert live.name == "fluxo-digits-v1" and json.loads((live / "metadata.json").read_text())["model_version"] == "1"

    # A worse model is registered but does not take the alias; the decision is recorded.
    worse_settings = settings_for("train.epochs=1", "train.learning_rate=1e-6")
    worse = train(project, worse_settings, data_version)
    second = export_run(project, worse_settings, worse.run_id)
    assert second.model_version == "2" and not second.promotion.promoted
    assert str(client.get_model_version_by_alias("fluxo-digits", "champion").version) == "1"
    assert "kept champion v1" in client.get_model_version("fluxo-digits", "2").tags["fluxo.promotion"]
    assert read_pointer(model_root(project, settings)) == live  # not promoted, not published

    # The champion materialises as model.onnx + metadata.json for the service, with its version.
    served = materialize_model(project, settings)
    served_meta = json.loads((served / "metadata.json").read_text())
    assert served_meta["model_version"] == "1" and served_meta["run_id"] == result.run_id
    test = read_dataset(project / "data").splits["test"]
    session = ort.InferenceSession(str(served / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(exported.export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    # export_dir now holds v2; the served v1 must be the first export, not the latest file on disk.
    assert not np.allclose(session.run(None, {"input": test.x})[0], reference.run(None, {"input": test.x})[0])


def test_export_refuses_a_run_trained_on_other_data(project: Path, trained, settings_for) -> None:
    settings, _, result = trained
    changed = settings_for("data.split_seed=7")
    ingest(project, changed.data)
    version(project, changed.data)
    with pytest.raises(FluxoError, match=r"trained on data version .* `dvc checkout`"):
        export_run(project, settings, result.run_id)


def test_serving_an_unknown_model_is_explained(project: Path, trained) -> None:
    settings, _, _ = trained
    with pytest.raises(FluxoError, match="not in the model registry"):
        materialize_model(project, settings, "models:/nope@champion")
    with pytest.raises(FluxoError, match="expected an export directory"):
        materialize_model(project, settings, "s3://bucket/model")


def test_variable_length_export_records_accuracy_as_served(project: Path, settings_for, tmp_path: Path) -> None:
    """An RNN trained on packed sequences reads the padding once served: the gap is measured, not hidden."""
    import pandas as pd

    from tests.test_ingest_sources import _sequences_csv

    path = _sequences_csv(tmp_path / "walk.csv", rows=90)
    frame = pd.read_csv(path)
    frame.loc[::2, ["t8", "t9", "t10", "t11"]] = np.nan  # every other sequence is 8 steps long
    frame.to_csv(path, index=False)
    settings = settings_for(f"data.dataset={path}", "model.name=gru", "model.params={hidden: 8}", "train.epochs=2")
    ingest(project, settings.data)
    result = train(project, settings, version(project, settings.data))
    exported = export_run(project, settings, result.run_id)

    test = read_dataset(project / "data").splits["test"]
    session = ort.InferenceSession(str(exported.export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    as_served = float((session.run(None, {"input": np.asarray(test.x, dtype=np.float32)})[0].argmax(1) == test.y).mean())
    run = MlflowClient().get_run(result.run_id)
    assert run.data.metrics["served_test_accuracy"] == pytest.approx(as_served)
    metadata = json.loads((exported.export_dir / "metadata.json").read_text())
    assert metadata["variable_length"] is True and metadata["served_test_accuracy"] == pytest.approx(as_served)
    assert "image" not in metadata["preprocessing"]  # sequences take no uploads
