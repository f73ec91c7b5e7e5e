"""Export's int8/fp16 variants: built, checked, timed and gated for real, then served over real HTTP.

One tiny digits CNN is trained once (MLflow and DVC in tmp_path) and exported twice: with a
gate it passes (any speedup, any accuracy drop) and with one it cannot (1000x faster). The
kept int8 graph is registered, published and served by `bentoml serve`; its answers must be
the in-process ``OnnxModel(variant="int8")``'s, and fp32's those of fp32.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlflow.tracking import MlflowClient

from pipelines.context import open_run
from pipelines.data.ingest import ingest, version
from pipelines.data.store import Dataset, Split, read_dataset
from pipelines.export import variants
from pipelines.export.package import export_model
from pipelines.registry.publish import model_root
from pipelines.release import export_run
from pipelines.settings import ExportSettings
from pipelines.train.run import train
from serving import ServingError
from serving.contract import read_metadata
from serving.reload import read_pointer
from serving.runtime import CPU, OnnxModel
from tests.conftest import make_settings
from tests.serving_fixtures import RunningServer

KEPT = ("export.variants=[int8,fp16]", "export.min_speedup=0", "export.max_accuracy_drop=100")  # every int8 passes
DECISION_KEYS = {"kept", "reason", "provider", "test_accuracy", "accuracy_drop", "latency_ms_batch1",
                 "latency_ms_batch32", "speedup"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, object, str]]:
    """(project, data version, run id) of a tiny CNN trained on digits."""
    root = tmp_path_factory.mktemp("variants") / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    with pytest.MonkeyPatch.context() as env:  # set up before conftest's per-test isolation: clear it here
        for key in [k for k in os.environ if k.startswith("FLUXO_") or k == "MLFLOW_TRACKING_URI"]:
            env.delenv(key)
        settings = make_settings(root)
        ingest(root, settings.data)
        result = train(open_run(root, settings), version(root, settings.data))
        yield root, settings, result.run_id


@pytest.fixture(scope="module")
def kept(digits):
    """The run exported, registered and published with a gate that keeps int8; the run's metrics right after."""
    root, _, run_id = digits
    settings = make_settings(root, *KEPT)
    with pytest.MonkeyPatch.context() as env:
        for key in [k for k in os.environ if k.startswith("FLUXO_") or k == "MLFLOW_TRACKING_URI"]:
            env.delenv(key)
        exported = export_run(open_run(root, settings), run_id)
        return settings, exported, MlflowClient().get_run(run_id).data.metrics


def test_a_variant_the_gate_passes_is_kept_with_its_numbers_everywhere(digits, kept) -> None:
    root, _, run_id = digits
    settings, exported, metrics = kept
    model_dir = exported.export_dir
    decisions = read_metadata(model_dir).variants
    assert list(decisions) == ["int8", "fp16"]  # export.variants' order
    int8 = decisions["int8"]
    assert int8["kept"] is True and DECISION_KEYS <= set(int8) and int8["file"] == "model.int8.onnx"
    assert int8["provider"] == CPU and "kept" in int8["reason"] and "export.min_speedup 0x" in int8["reason"]
    assert int8["calibration"] == {"splits": ["train"], "rows": 256}  # never the test split that scores it
    assert int8["size_bytes"] < int8["fp32_size_bytes"] and 0.9 <= int8["argmax_agreement"] <= 1
    assert decisions["fp16"] == {"kept": False, "reason": variants.NO_CUDA, "provider": CPU}
    assert (model_dir / "model.int8.onnx").is_file() and not (model_dir / "model.fp16.onnx").exists()
    # The recorded test accuracy is the served int8 graph's, on the test split.
    test = read_dataset(root / "data").splits["test"]
    model = OnnxModel(model_dir, variant="auto", providers=[CPU])
    assert model.variant == "int8"  # auto: the fastest kept variant
    served = float((model.predict_proba(np.asarray(test.x)).argmax(1) == np.asarray(test.y)).mean())
    assert served == pytest.approx(int8["test_accuracy"])
    fp32 = OnnxModel(model_dir, variant="fp32", providers=[CPU])
    fp32_accuracy = float((fp32.predict_proba(np.asarray(test.x)).argmax(1) == np.asarray(test.y)).mean())
    assert int8["accuracy_drop"] == pytest.approx((fp32_accuracy - served) * 100, abs=1e-3)
    # MLflow: the numbers on the run, the decisions as a file, the variant in the registered artifact.
    client = MlflowClient()
    assert metrics["variant_int8_kept"] == 1.0 and metrics["variant_fp16_kept"] == 0.0
    assert metrics["variant_int8_speedup"] == pytest.approx(int8["speedup"])
    assert metrics["variant_int8_test_accuracy"] == pytest.approx(int8["test_accuracy"])
    assert {a.path for a in client.list_artifacts(run_id, "export")} >= {"export/variants.json"}
    assert "model/model.int8.onnx" in {a.path for a in client.list_artifacts(run_id, "model")}
    assert "<h2>Variants</h2>" in (model_dir / "report.html").read_text()


def test_a_variant_short_of_the_speedup_is_refused_saying_by_how_much(digits, tmp_path: Path) -> None:
    root, _, run_id = digits
    settings = make_settings(root, f"export.export_dir={tmp_path / 'export'}", "export.min_speedup=1000",
                             "export.max_accuracy_drop=100",  # only the speedup can refuse it
                             "export.variants=[int8]")
    exported = export_model(open_run(root, settings), run_id)
    int8 = exported.metadata.variants["int8"]
    assert int8["kept"] is False and DECISION_KEYS <= set(int8) and "file" not in int8
    assert f"speedup {int8['speedup']:.2f}x at batch 32 is below export.min_speedup 1000x" in int8["reason"]
    assert not (exported.model_dir / "model.int8.onnx").exists()
    assert list(exported.metadata.variants) == ["int8"]
    assert OnnxModel(exported.model_dir, variant="auto", providers=[CPU]).variant == "fp32"
    with pytest.raises(ServingError, match=r"FLUXO_VARIANT=int8: .* export's gate refused it: speedup .* 1000x"):
        OnnxModel(exported.model_dir, variant="int8", providers=[CPU])
    assert MlflowClient().get_run(run_id).data.metrics["variant_int8_kept"] == 0.0


def test_the_gate_names_the_accuracy_it_lost_and_the_setting() -> None:
    kept, reason = variants._gate(0.8, 2.0, CPU, ExportSettings())
    assert not kept and reason.startswith("test accuracy 0.80 points below fp32's is more than "
                                          "export.max_accuracy_drop 0.5")
    kept, reason = variants._gate(0.5, 1.2, CPU, ExportSettings())  # both limits are inclusive
    assert kept and "1.20x" in reason
    kept, reason = variants._gate(3.0, 1.0, CPU, ExportSettings())
    assert not kept and "export.max_accuracy_drop" in reason and "export.min_speedup 1.2x" in reason
    assert variants.build_variants(Path("/nonexistent"), None, ExportSettings(variants=[])) == {}  # off: nothing


def test_int8_is_calibrated_on_training_rows_never_on_test_rows(digits) -> None:
    root, _, _ = digits
    dataset = read_dataset(root / "data")
    reader = variants.calibration_reader(dataset)
    rows = np.concatenate([batch["input"] for batch in iter(reader.get_next, None)])
    assert reader.splits == ("train",) and len(rows) == 256
    as_set = lambda x: {r.tobytes() for r in np.asarray(x, dtype=np.float32)}  # noqa: E731
    assert as_set(rows) <= as_set(dataset.splits["train"].x)
    assert not as_set(rows) & as_set(dataset.splits["test"].x)
    with pytest.raises(ValueError, match="not \\['test'\\]: the test split scores the variant"):
        variants.CalibrationReader(rows, ["test"])
    # A training split too small for the sample is topped up from validation, still never from test.
    small = Dataset(dataset.manifest, {**dataset.splits, "train": Split([dataset.splits["train"].x[:100]],
                                                                        dataset.splits["train"].y[:100])})
    assert variants.calibration_reader(small).describe() == {"splits": ["train", "val"], "rows": 256}


def _sequence_dataset(n: int = 64, length: int = 12) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 1, length)).astype(np.float32)
    y = (x.mean(axis=(1, 2)) > 0).astype(np.int64)
    manifest = {"input_shape": [1, length], "labels": ["down", "up"], "kind": "sequence"}
    return Dataset(manifest, {"train": Split([x], y), "val": Split([x], y), "test": Split([x], y)})


def test_a_recurrent_model_is_not_quantized_and_says_why(tmp_path: Path) -> None:
    from models import build_model
    from models.preprocess import Standardized
    from pipelines.export.onnx_export import export_onnx

    model = Standardized(build_model("gru", (1, 12), 2, hidden=8), 0.0, 1.0).eval()
    export_onnx(model, (1, 12), tmp_path / "model.onnx", 18)
    decisions = variants.build_variants(tmp_path, _sequence_dataset(), ExportSettings(min_speedup=0),
                                        providers=[CPU])
    int8 = decisions["int8"]
    assert not int8.kept and int8.provider == CPU
    assert "recurrent layers (GRU)" in int8.reason and "serving fp32" in int8.reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert "takes lengths" in variants.why_not("int8", {"Gemm"}, True, CPU)


def test_fp16_keeps_the_float32_contract_and_goes_through_the_same_gate(digits, kept, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Built and timed here on the CPU by posing it as the CUDA provider: the path a GPU machine takes."""
    root, _, _ = digits
    _, exported, _ = kept
    dataset = read_dataset(root / "data")
    monkeypatch.setattr(variants, "CUDA", CPU)
    # The default accuracy limit, which refuses a graph that loses more than half a point; no speed limit,
    # since a CPU only emulates fp16 (the speed leg of the gate refuses below).
    accurate = ExportSettings(variants=["fp16"], min_speedup=0, max_accuracy_drop=0.5)
    for directory in (tmp_path / "accurate", tmp_path / "fast"):
        directory.mkdir()
        (directory / "model.onnx").write_bytes((exported.export_dir / "model.onnx").read_bytes())
    fp16 = variants.build_variants(tmp_path / "accurate", dataset, accurate, providers=[CPU], budget_s=0.1)["fp16"]

    # The drop, scored here: fp32's and the kept fp16 graph's test accuracy, straight from onnxruntime.
    test_x, test_y = np.asarray(dataset.splits["test"].x, dtype=np.float32), np.asarray(dataset.splits["test"].y)

    def accuracy(path: Path) -> float:
        session = ort.InferenceSession(str(path), providers=[CPU])
        return float((session.run(None, {"input": test_x})[0].argmax(1) == test_y).mean())

    assert fp16.kept, fp16.reason
    drop = (accuracy(tmp_path / "accurate" / "model.onnx") - accuracy(tmp_path / "accurate" / "model.fp16.onnx")) * 100
    assert fp16.accuracy_drop == pytest.approx(drop, abs=1e-3) and drop <= 0.5  # what keeping it implies
    assert "export.max_accuracy_drop 0.5" in fp16.reason
    assert fp16.file == "model.fp16.onnx" and fp16.max_abs_diff < 0.05
    session = ort.InferenceSession(str(tmp_path / "accurate" / "model.fp16.onnx"), providers=[CPU])
    assert [i.type for i in session.get_inputs()] == ["tensor(float)"]
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"]
    weights = onnx.load(str(tmp_path / "accurate" / "model.fp16.onnx")).graph.initializer
    assert any(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)

    # The same graph against a speed limit no CPU reaches: refused on its measured speedup, and not written.
    fast = ExportSettings(variants=["fp16"], min_speedup=1000, max_accuracy_drop=0.5)
    slow = variants.build_variants(tmp_path / "fast", dataset, fast, providers=[CPU], budget_s=0.1)["fp16"]
    assert slow.speedup < 1000 and not slow.kept
    assert re.fullmatch(rf"speedup [0-9.]+x at batch 32 is below export.min_speedup 1000x \(on {CPU}\)", slow.reason)
    assert sorted(p.name for p in (tmp_path / "fast").iterdir()) == ["model.onnx"]


def test_each_variant_served_over_http_answers_as_it_does_in_process(digits, kept, tmp_path: Path) -> None:
    """Served from the published model root (the registry's copy), so the variant file must travel with it."""
    root, _, _ = digits
    settings, exported, _ = kept
    served_root = model_root(root, settings, exported.registered_model)
    assert (read_pointer(served_root) / "model.int8.onnx").is_file()  # materialised with the version
    test = read_dataset(root / "data").splits["test"]
    batch = np.asarray(test.x[:40], dtype=np.float32)
    servers = {variant: RunningServer(served_root, {"FLUXO_VARIANT": variant, "FLUXO_WORKERS": "1"},
                                      tmp_path / f"{variant}.log") for variant in ("int8", "fp32")}
    with ThreadPoolExecutor(2) as pool:  # both start at once: a start takes seconds on a busy box
        started = list(pool.map(lambda s: s.__enter__(), servers.values()))
    try:
        answers = {}
        for variant, server in servers.items():
            meta = httpx.get(f"{server.url}/metadata", timeout=10).json()
            assert meta["variant"] == variant and meta["variants"]["int8"]["kept"] is True
            response = httpx.post(f"{server.url}/predict", json={"instances": batch.tolist()}, timeout=30)
            assert response.status_code == 200, response.text
            answers[variant] = np.array([p["probabilities"] for p in response.json()["predictions"]])
            expected = OnnxModel(exported.export_dir, variant=variant, providers=[CPU]).predict_proba(batch)
            np.testing.assert_allclose(answers[variant], expected, atol=1e-5)
        assert not np.allclose(answers["int8"], answers["fp32"], atol=1e-4)  # the int8 graph really answered
    finally:
        for server in started:
            server.__exit__(None, None, None)
