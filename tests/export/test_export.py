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

from pipelines.context import open_run
from pipelines.data.ingest import ingest, version
from pipelines.data.store import read_dataset
from pipelines.errors import FluxoError
from pipelines.export.image_recipe import DIGITS
from pipelines.registry.store import materialize_model
from pipelines.registry.publish import model_root
from pipelines.release import export_run
from pipelines.train.run import train
from serving.checksums import damage, read_checksums
from serving.contract import read_model_dir
from serving.reload import read_pointer


@pytest.fixture
def trained(project: Path, settings_for):
    settings = settings_for("train.epochs=4")
    ingest(project, settings.data)
    data_version = version(project, settings.data)
    return settings, data_version, train(open_run(project, settings), data_version)


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
    exported = export_run(open_run(project, settings), result.run_id)
    onnx.checker.check_model(onnx.load(str(exported.export_dir / "model.onnx")))
    recorded = read_checksums(exported.export_dir)  # sealed last: every file's sha256, so a torn copy is told apart
    assert {"model.onnx", "metadata.json", "report.html"} <= set(recorded) and not damage(exported.export_dir, recorded)
    assert exported.parity.passed and exported.parity.samples == len(read_dataset(project / "data").splits["test"].y)
    assert exported.promotion.promoted and exported.promotion.champion_version is None

    client = MlflowClient()
    champion = client.get_model_version_by_alias("fluxo-digits", "champion")
    assert str(champion.version) == exported.model_version == "1"
    assert "first version" in champion.tags["fluxo.promotion"]
    run = client.get_run(result.run_id)
    assert run.data.metrics["parity_max_abs_diff"] <= 1e-4

    assert exported.export_dir == project / ".fluxo" / "export" / result.run_id
    metadata = json.loads((exported.export_dir / "metadata.json").read_text())
    assert metadata["data_version"] == data_version.md5 and metadata["input_shape"] == [1, 8, 8]
    assert metadata["model_name"] == "fluxo-digits" and metadata["run_id"] == result.run_id
    # /predict/image preprocesses uploads the way scikit-learn made the digits.
    assert metadata["preprocessing"]["image"] == DIGITS
    assert metadata["preprocessing"]["upload_background"] == "light"  # a white-on-black upload is flipped first
    assert metadata["served_test_accuracy"] is None  # fixed-size inputs: served exactly as tested
    assert "model_version" not in metadata  # the registry's number lives in registry.json, beside it
    # The promotion published v1 as the live champion for running servers: the exported files
    # byte for byte, plus the registry entry.
    live = read_pointer(model_root(project, settings, "fluxo-digits"))
    assert live.name == "fluxo-digits-v1" and read_model_dir(live).version == "1"
    for name in ("model.onnx", "metadata.json"):
        assert (live / name).read_bytes() == (exported.export_dir / name).read_bytes()
    # The registered artifact is the model directory itself.
    registered = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/fluxo-digits/1", dst_path=str(project.parent / "dl")))
    assert (registered / "metadata.json").read_bytes() == (exported.export_dir / "metadata.json").read_bytes()

    # A worse model is registered but does not take the alias; the decision is recorded.
    worse_settings = settings_for("train.epochs=1", "train.learning_rate=1e-6")
    worse = train(open_run(project, worse_settings), data_version)
    second = export_run(open_run(project, worse_settings), worse.run_id)
    assert second.model_version == "2" and not second.promotion.promoted
    assert str(client.get_model_version_by_alias("fluxo-digits", "champion").version) == "1"
    assert "kept champion v1" in client.get_model_version("fluxo-digits", "2").tags["fluxo.promotion"]
    assert read_pointer(model_root(project, settings, "fluxo-digits")) == live  # not promoted, not published
    # It passed parity, so it is the challenger, published to its own root for shadow or canary serving.
    assert second.promotion.alias == "challenger"
    assert str(client.get_model_version_by_alias("fluxo-digits", "challenger").version) == "2"
    assert read_pointer(model_root(project, settings, "fluxo-digits", "challenger")).name == "fluxo-digits-v2"

    # The champion materialises as model.onnx + metadata.json + registry.json for the service.
    served = materialize_model(open_run(project, settings), None, "fluxo-digits")
    assert served.version == "1" and served.metadata.run_id == result.run_id
    test = read_dataset(project / "data").splits["test"]
    session = ort.InferenceSession(str(served.onnx_path), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(second.export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    # The served v1 must be the first export, not the latest file on disk.
    assert not np.allclose(session.run(None, {"input": test.x})[0], reference.run(None, {"input": test.x})[0])


def test_export_refuses_a_run_trained_on_other_data(project: Path, trained, settings_for) -> None:
    settings, _, result = trained
    changed = settings_for("data.split_seed=7")
    ingest(project, changed.data)
    version(project, changed.data)
    with pytest.raises(FluxoError, match=r"trained on data version .* `dvc checkout`"):
        export_run(open_run(project, settings), result.run_id)


def test_serving_an_unknown_model_is_explained(project: Path, trained) -> None:
    settings, _, _ = trained
    with pytest.raises(FluxoError, match="has no model named .nope."):
        materialize_model(open_run(project, settings), "models:/nope@champion", "fluxo-digits")
    with pytest.raises(FluxoError, match="expected an export directory"):
        materialize_model(open_run(project, settings), "s3://bucket/model", "fluxo-digits")


def test_variable_length_export_records_accuracy_as_served(project: Path, settings_for, tmp_path: Path) -> None:
    """An RNN trained on packed sequences is exported with a lengths input: served exactly as trained."""
    import pandas as pd

    from tests.data.test_ingest_sources import _sequences_csv

    path = _sequences_csv(tmp_path / "walk.csv", rows=90)
    frame = pd.read_csv(path)
    frame.loc[::2, ["t8", "t9", "t10", "t11"]] = np.nan  # every other sequence is 8 steps long
    frame.to_csv(path, index=False)
    settings = settings_for(f"data.dataset={path}", "model.name=gru", "model.params={hidden: 8, bidirectional: true}",
                            "train.epochs=2")
    ingest(project, settings.data)
    result = train(open_run(project, settings), version(project, settings.data))
    exported = export_run(open_run(project, settings), result.run_id)

    test = read_dataset(project / "data").splits["test"]
    session = ort.InferenceSession(str(exported.export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input", "lengths"]
    feeds = {"input": np.asarray(test.x, dtype=np.float32), "lengths": np.asarray(test.lengths, dtype=np.int64)}
    as_served = float((session.run(None, feeds)[0].argmax(1) == test.y).mean())
    run = MlflowClient().get_run(result.run_id)
    assert run.data.metrics["served_test_accuracy"] == pytest.approx(as_served)
    assert as_served == pytest.approx(run.data.metrics["test_accuracy"])  # served exactly as trained
    assert exported.parity.passed and exported.parity.max_abs_diff <= 1e-4  # against the packed PyTorch model
    metadata = json.loads((exported.export_dir / "metadata.json").read_text())
    assert metadata["variable_length"] is True and metadata["takes_lengths"] is True
    assert metadata["served_test_accuracy"] == pytest.approx(as_served)
    assert metadata["preprocessing"]["image"] is None  # sequences take no uploads
    assert exported.registered_model == "fluxo-walk"  # named after the user's file, from the run itself


def _mnist1d_run(project: Path, settings_for):
    # One epoch names a registry entry, it does not beat an MLP: no baseline, so the gate's floor does not apply.
    settings = settings_for("data.dataset=mnist1d", "model.name=cnn1d", "model.params={channels: 4}", "train.epochs=1",
                            "train.baseline_epochs=0", config=None)
    ingest(project, settings.data)
    return train(open_run(project, settings), version(project, settings.data))


def test_export_takes_the_registry_name_from_the_run_not_the_preset(project: Path, settings_for) -> None:
    """An MNIST-1D run exported with the default (digits) settings still joins fluxo-mnist1d."""
    result = _mnist1d_run(project, settings_for)
    exported = export_run(open_run(project, settings_for(config=None)), result.run_id)  # no preset: data.dataset=digits
    assert exported.registered_model == "fluxo-mnist1d" and exported.model_version == "1"
    client = MlflowClient()
    assert client.search_registered_models(filter_string="name='fluxo-digits'") == []
    assert str(client.get_model_version_by_alias("fluxo-mnist1d", "champion").version) == "1"


def test_a_model_with_another_input_contract_never_becomes_champion(project: Path, trained, settings_for) -> None:
    settings, _, result = trained
    export_run(open_run(project, settings), result.run_id)
    # Same registry entry, other inputs: MNIST-1D sequences forced into fluxo-digits.
    other = settings_for("data.dataset=mnist1d", "model.name=cnn1d", "model.params={channels: 4}", "train.epochs=1",
                         "tracking.registered_model=fluxo-digits", config=None)
    ingest(project, other.data)
    intruder = train(open_run(project, other), version(project, other.data))
    with pytest.raises(FluxoError, match=r"another input contract can never take the 'champion' alias"):
        export_run(open_run(project, other), intruder.run_id)
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("fluxo-digits", "champion").version) == "1"
    assert [str(v.version) for v in client.search_model_versions("name='fluxo-digits'")] == ["1"]


def test_a_retried_registration_finds_the_version_it_made(project: Path, trained, monkeypatch) -> None:
    """A transient fault after the version was created: the retry registers nothing new."""
    from pipelines.registry import versions as registry
    from pipelines.export.package import export_model
    from pipelines.registry.steps import promote_step, register_step

    settings, _, result = trained
    exported = export_model(open_run(project, settings), result.run_id)
    real_tag = registry._tag_version
    calls = {"n": 0}

    def flaky_tag(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("tracking server went away")  # after create_model_version
        return real_tag(*args, **kwargs)

    monkeypatch.setattr(registry, "_tag_version", flaky_tag)
    with pytest.raises(ConnectionError):
        register_step(open_run(project, settings), exported)
    again = register_step(open_run(project, settings), exported)  # what the retry does
    assert (again.version, again.created) == ("1", False)
    assert promote_step(open_run(project, settings), exported, again).promoted
    assert promote_step(open_run(project, settings), exported, again).reason.startswith("v1 is already the champion")
    assert [str(v.version) for v in MlflowClient().search_model_versions("name='fluxo-digits'")] == ["1"]


def test_failed_parity_leaves_the_previous_model_directory_untouched(project: Path, trained, settings_for) -> None:
    settings, _, result = trained
    first = export_run(open_run(project, settings), result.run_id)
    before = {p.name: p.read_bytes() for p in first.export_dir.iterdir()}
    strict = settings_for("train.epochs=4", "export.parity_atol=1e-30")
    from pipelines.export.package import ParityFailed

    with pytest.raises(ParityFailed, match=r"export.parity_atol.*unchanged"):
        export_run(open_run(project, strict), result.run_id)
    assert {p.name: p.read_bytes() for p in first.export_dir.iterdir()} == before
    assert sorted(p.name for p in first.export_dir.parent.iterdir()) == [result.run_id]  # no staging left behind
    assert [str(v.version) for v in MlflowClient().search_model_versions("name='fluxo-digits'")] == ["1"]


def test_an_unknown_gate_metric_is_a_clear_error(settings_for) -> None:
    with pytest.raises(FluxoError, match=r"--set gate.metric=test_acc: gate.metric: Input should be 'auto'"):
        settings_for("gate.metric=test_acc")


def test_the_gate_floor_refuses_only_a_model_worse_than_its_baselines_and_scores_regression_its_way() -> None:
    from pipelines.registry.gate import BaselineVerdict, ServedScore, decide
    from pipelines.settings import GateSettings

    score = ServedScore("1", {"accuracy": 0.12, "f1_macro": 0.1, "precision_macro": 0.1, "recall_macro": 0.1},
                        [0.1] * 10, 500)
    worse = BaselineVerdict.of_run({"fluxo.baseline": "worse"}, {"best_val_accuracy": 0.117,
                                                                  "baseline_val_accuracy": 0.208})
    refused = decide(score, None, GateSettings(), baselines=worse)
    assert not refused.promoted and "worse than a baseline" in refused.reasons[0] and "mlp 0.2080" in refused.reasons[0]
    assert decide(score, None, GateSettings(beat_baselines=False), baselines=worse).promoted
    within = BaselineVerdict.of_run({"fluxo.baseline": "not beaten"}, {"best_val_accuracy": 0.95,
                                                                        "linear_val_accuracy": 0.96})
    assert decide(score, None, GateSettings(), baselines=within).promoted  # within the split's noise

    # Regression: R² by default; MAE wins lower, against the champion and against a ceiling.
    mine, theirs = ServedScore("2", {"r2": 0.5, "mae": 40.0, "rmse": 50.0}, [], 89), \
        ServedScore("1", {"r2": 0.45, "mae": 42.0, "rmse": 52.0}, [], 89)
    assert decide(mine, theirs, GateSettings()).metric == "r2" and decide(mine, theirs, GateSettings()).promoted
    assert decide(mine, theirs, GateSettings(metric="mae")).promoted
    assert not decide(theirs, mine, GateSettings(metric="mae")).promoted
    assert not decide(mine, None, GateSettings(metric="mae", min_value=30)).promoted
    with pytest.raises(FluxoError, match="gate.metric=accuracy does not apply to a regression model"):
        decide(mine, theirs, GateSettings(metric="accuracy"))


def _onnx_accuracy(model_dir: Path, project: Path) -> float:
    test = read_dataset(project / "data").splits["test"]
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": np.asarray(test.x)})[0].argmax(1) == np.asarray(test.y)).mean())


def test_new_data_rescores_the_champion_on_the_candidates_test_split(project: Path, trained, settings_for) -> None:
    """After new data the gate compares both models on the same samples, as served."""
    settings, _, result = trained
    first = export_run(open_run(project, settings), result.run_id)
    reshuffled = settings_for("train.epochs=1", "data.split_seed=7")
    ingest(project, reshuffled.data)
    candidate = train(open_run(project, reshuffled), version(project, reshuffled.data))
    second = export_run(open_run(project, reshuffled), candidate.run_id)

    gate = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=candidate.run_id, artifact_path="export/gate.json",
                                                                dst_path=str(project.parent / "gate"))).read_text())
    champion_now = _onnx_accuracy(first.export_dir, project)  # v1 on v2's test split
    assert gate["champion"]["version"] == "1"
    assert gate["champion"]["metrics"]["accuracy"] == pytest.approx(champion_now)
    assert gate["candidate"]["metrics"]["accuracy"] == pytest.approx(_onnx_accuracy(second.export_dir, project))
    assert second.promotion.champion_value == pytest.approx(champion_now)
    assert second.promotion.promoted == (gate["candidate"]["metrics"]["accuracy"] >= champion_now)
    tags = MlflowClient().get_model_version("fluxo-digits", "1").tags
    assert json.loads(tags["fluxo.gate.rescored_for_v2"])["accuracy"] == pytest.approx(champion_now)
    assert MlflowClient().get_run(candidate.run_id).data.metrics["served_test_accuracy"] == pytest.approx(
        gate["candidate"]["metrics"]["accuracy"])


def test_the_gate_conditions_each_keep_the_champion(project: Path, trained, settings_for) -> None:
    """A floor, a required improvement and a per-class limit; each failure is named with its setting."""
    from pipelines.registry.gate import ServedScore, decide
    from pipelines.settings import GateSettings

    settings, _, result = trained
    floor = settings_for("train.epochs=4", "gate.min_value=0.9999")
    first = export_run(open_run(project, floor), result.run_id)
    assert first.promotion.alias == "challenger" and "gate.min_value=0.9999" in first.promotion.reason
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("fluxo-digits", "challenger").version) == "1"
    assert {k: str(v) for k, v in client.get_registered_model("fluxo-digits").aliases.items()} == {"challenger": "1"}

    champion = ServedScore("1", {"accuracy": 0.90}, [0.9, 0.9], 100)
    better_but_one_class_worse = ServedScore("2", {"accuracy": 0.92}, [1.0, 0.8], 100)
    strict = GateSettings(max_class_regression=0.05)
    assert decide(better_but_one_class_worse, champion, GateSettings()).promoted
    refused = decide(better_but_one_class_worse, champion, strict)
    assert not refused.promoted and "class 1 recall fell by 0.1000" in refused.reasons[0]
    demanding = decide(better_but_one_class_worse, champion, GateSettings(min_improvement=0.05))
    assert not demanding.promoted and "gate.min_improvement=0.05" in demanding.reasons[0]


def test_an_unknown_run_id_is_one_clear_line(project: Path, trained, settings_for) -> None:
    settings, _, _ = trained
    with pytest.raises(FluxoError, match=r"--run-id deadbeef: no such run .* omit --run-id"):
        export_run(open_run(project, settings), "deadbeef")


def test_two_runs_gated_against_the_same_champion_do_not_both_take_it(project: Path, trained, settings_for) -> None:
    """Compare-and-set: run A and run B both pass the gate against "no champion"; A promotes first,
    so B's promotion scores B again against A and takes the champion only if it beats A."""
    from pipelines.export.package import export_model
    from pipelines.registry.steps import gate_step, promote_step, register_step

    settings, data_version, strong = trained
    weak_settings = settings_for("train.epochs=1", "model.params={channels: 1, dropout: 0.0}")
    weak = train(open_run(project, weak_settings), data_version)
    exported_strong, exported_weak = export_model(open_run(project, settings), strong.run_id), export_model(
        open_run(project, weak_settings), weak.run_id)
    registered_strong = register_step(open_run(project, settings), exported_strong)
    registered_weak = register_step(open_run(project, weak_settings), exported_weak)
    gate_weak = gate_step(open_run(project, weak_settings), exported_weak, registered_weak)  # both gated now: no champion yet
    gate_strong = gate_step(open_run(project, settings), exported_strong, registered_strong)
    assert gate_weak.promoted and gate_strong.promoted and gate_weak.champion is None is gate_strong.champion
    assert gate_strong.value > gate_weak.value  # the race below only means something if A beats B

    first = promote_step(open_run(project, settings), exported_strong, registered_strong, gate_strong)
    second = promote_step(open_run(project, weak_settings), exported_weak, registered_weak, gate_weak)  # its gate is stale

    client = MlflowClient()
    assert first.promoted and first.champion_version is None
    assert not second.promoted and second.champion_version == registered_strong.version
    assert second.champion_value == pytest.approx(gate_strong.value)  # re-scored against A, not "no champion"
    assert str(client.get_model_version_by_alias("fluxo-digits", "champion").version) == registered_strong.version
    assert str(client.get_model_version_by_alias("fluxo-digits", "challenger").version) == registered_weak.version
    assert json.loads(client.get_model_version("fluxo-digits", registered_weak.version).tags["fluxo.gate"])["promoted"] is False


def test_promotion_without_a_regate_refuses_a_stale_gate(project: Path, trained, settings_for) -> None:
    from pipelines.export.package import export_model
    from pipelines.registry.versions import promote
    from pipelines.registry.steps import gate_step, register_step

    settings, data_version, first_run = trained
    exported = export_model(open_run(project, settings), first_run.run_id)
    registered = register_step(open_run(project, settings), exported)
    stale = gate_step(open_run(project, settings), exported, registered)
    other = train(open_run(project, settings_for("train.epochs=1")), data_version)
    export_run(open_run(project, settings), other.run_id)  # v2 takes the champion first
    with pytest.raises(FluxoError, match=r"the champion moved to v2 after v1 was gated against no champion"):
        promote(MlflowClient(), registered, exported.metadata, stale, "champion", "challenger")
    assert str(MlflowClient().get_model_version_by_alias("fluxo-digits", "champion").version) == "2"
