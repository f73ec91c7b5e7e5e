"""serving/ without a server: request validation, model loading and its errors, provider choice."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from serving import ServingConfig, ServingError
from serving.client import example_request, zero_instance
from serving.launch import PROJECT_ROOT, check_model_dir, serve_command, serve_env
from serving.runtime import (
    CPU,
    CUDA,
    OnnxModel,
    choose_providers,
    cuda_device_present,
    load_metadata,
    providers_for,
    softmax,
)
from serving.schemas import InvalidInstances, validate_instances
from tests.serving_fixtures import build_model_dir, sample_instances, tiny_classifier

SHAPE = (1, 8, 8)


def grid(value: Any = 1.0) -> list:
    """One (1, 8, 8) instance filled with ``value``."""
    return [[[value] * 8 for _ in range(8)]]


def with_element(value: Any) -> list:
    """A valid (1, 8, 8) instance whose element [0][3][5] is ``value``."""
    instance = grid(0.0)
    instance[0][3][5] = value
    return instance


# --- request validation ------------------------------------------------------------------


def test_valid_instances_become_a_float32_batch() -> None:
    instances = [grid(1), grid(2.5), with_element(-3)]
    batch = validate_instances(instances, SHAPE, max_instances=10)
    assert batch.dtype == np.float32 and batch.shape == (3, 1, 8, 8)
    assert batch[1, 0, 7, 7] == 2.5 and batch[2, 0, 3, 5] == -3.0


@pytest.mark.parametrize(
    ("instances", "message"),
    [
        ([list(range(64))], "instances[0] has shape (64,), expected (1, 8, 8)"),
        ([grid(), [[[0.0] * 8] * 8] * 1 + [[[0.0] * 8] * 8]], "instances[1] has shape (2, 8, 8), expected (1, 8, 8)"),
        ([[[0.0] * 8] * 8], "instances[0] has shape (8, 8), expected (1, 8, 8)"),
        ([grid(), grid(), grid(), [[[[0.0]] * 8] * 8]], "instances[3] has shape (1, 8, 8, 1), expected (1, 8, 8)"),
        ([5.0], "instances[0] is a number (5.0), expected a nested list of shape (1, 8, 8)"),
        ([[]], "instances[0] has shape (0,), expected (1, 8, 8)"),
        ([with_element("7")], "instances[0][0][3][5] is a string ('7'), expected a number"),
        ([with_element(True)], "instances[0][0][3][5] is a boolean (true), expected a number"),
        ([with_element(None)], "instances[0][0][3][5] is null, expected a number"),
        ([with_element({"x": 1})], "instances[0][0][3][5] is an object, expected a number"),
        ([with_element([1.0])], "instances[0][0][3][5] is a list, expected a number"),
        ([with_element(float("nan"))], "instances[0][0][3][5] is NaN"),
        ([with_element(float("inf"))], "instances[0][0][3][5] is Infinity"),
        ([with_element(float("-inf"))], "instances[0][0][3][5] is -Infinity"),
        ([with_element(1e39)], "outside the float32 range"),
        ([with_element(10**400)], "too large for float32"),
        ([[[[0.0] * 8] * 7 + [[0.0] * 7]]], "instances[0][0][7] has 7 items, expected 8"),
        ([], "instances is empty"),
        ({"a": 1}, "instances must be a list"),
        ([grid()] * 11, "more than the limit of 10"),
    ],
    ids=[
        "flat-same-count", "extra-row", "missing-axis", "extra-axis", "scalar", "empty-instance",
        "string", "bool", "null", "object", "list-leaf", "nan", "inf", "-inf", "float32-overflow",
        "huge-int", "ragged", "no-instances", "not-a-list", "too-many",
    ],
)
def test_bad_instances_are_named_with_index_and_problem(instances: Any, message: str) -> None:
    with pytest.raises(InvalidInstances) as caught:
        validate_instances(instances, SHAPE, max_instances=10)
    assert message in str(caught.value)


def test_first_bad_instance_is_reported() -> None:
    instances = [grid(), grid(), grid(), list(range(64)), with_element("x")]
    with pytest.raises(InvalidInstances, match=r"instances\[3\] has shape \(64,\)"):
        validate_instances(instances, SHAPE, max_instances=10)


def test_non_square_shapes_are_enforced_per_axis() -> None:
    assert validate_instances([[1, 2, 3]], (3,), 5).shape == (1, 3)
    with pytest.raises(InvalidInstances, match=r"has shape \(3, 2\), expected \(2, 3\)"):
        validate_instances([[[1, 2], [3, 4], [5, 6]]], (2, 3), 5)


# --- configuration -------------------------------------------------------------------------


def test_config_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = ServingConfig.from_env()
    assert (defaults.model_dir, defaults.ort_threads, defaults.max_instances) == (None, 1, 1024)
    assert (defaults.workers, defaults.provider, defaults.api_key, defaults.trace_requests) == (2, "auto", None, False)
    assert defaults.max_batch_size == ServingConfig.max_batch_size and defaults.batch_wait_ms == 0.0
    monkeypatch.setenv("FLUXO_MODEL_DIR", "/models/x")
    monkeypatch.setenv("FLUXO_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("FLUXO_BATCH_WAIT_MS", "2.5")
    monkeypatch.setenv("FLUXO_TIMEOUT_S", "0.5")
    monkeypatch.setenv("FLUXO_API_KEY", "s3cret")
    monkeypatch.setenv("FLUXO_PROVIDER", "CPU")
    config = ServingConfig.from_env()
    assert config.model_dir == Path("/models/x") and config.max_batch_size == 8
    assert (config.batch_wait_ms, config.timeout_s, config.api_key, config.provider) == (2.5, 0.5, "s3cret", "cpu")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("FLUXO_ORT_THREADS", "lots", "expected an integer"),
        ("FLUXO_ORT_THREADS", "0", "must be at least 1"),
        ("FLUXO_BATCH_WAIT_MS", "soon", "expected a number"),
        ("FLUXO_MAX_BODY_BYTES", "10", "must be at least 1024"),
        ("FLUXO_PROVIDER", "tpu", "expected one of auto, cpu, cuda"),
    ],
)
def test_config_rejects_bad_values(monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ServingError, match=f"{name}.*{message}"):
        ServingConfig.from_env()


def test_missing_model_dir_says_how_to_set_it() -> None:
    with pytest.raises(ServingError, match="FLUXO_MODEL_DIR is not set"):
        ServingConfig.from_env().require_model_dir()


# --- runtime -----------------------------------------------------------------------------


def test_model_matches_onnxruntime_and_softmax(tmp_path: Path) -> None:
    model_dir = build_model_dir(tmp_path / "m")
    model = OnnxModel(model_dir)
    batch = sample_instances(5)
    reference = ort.InferenceSession(str(model_dir / "model.onnx"), providers=[CPU]).run(None, {"input": batch})[0]
    np.testing.assert_allclose(model.predict_logits(batch), reference, rtol=1e-5, atol=1e-5)
    proba = model.predict_proba(batch)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert (proba.argmax(1) == reference.argmax(1)).all()
    assert model.info()["provider"] == model.provider and model.info()["labels"] == model.labels


def test_softmax_is_stable_for_large_logits() -> None:
    out = softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    assert np.isfinite(out).all() and math.isclose(out[0, 0], 0.5)


def test_predict_logits_refuses_wrong_batch_shape(tmp_path: Path) -> None:
    model = OnnxModel(build_model_dir(tmp_path / "m"))
    with pytest.raises(ValueError, match="expected"):
        model.predict_logits(np.zeros((2, 64), dtype=np.float32))


def _break(model_dir: Path, what: str) -> None:
    meta_path = model_dir / "metadata.json"
    meta = json.loads(meta_path.read_text())
    if what == "no-model":
        (model_dir / "model.onnx").unlink()
    elif what == "no-metadata":
        meta_path.unlink()
    elif what == "corrupt-model":
        (model_dir / "model.onnx").write_bytes(b"not a protobuf")
    elif what == "corrupt-metadata":
        meta_path.write_text("{ not json")
    elif what == "metadata-list":
        meta_path.write_text("[]")
    elif what == "bad-shape":
        meta_path.write_text(json.dumps({**meta, "input_shape": [1, "8", 8]}))
    elif what == "no-labels":
        meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "labels"}))
    elif what == "shape-mismatch":
        meta_path.write_text(json.dumps({**meta, "input_shape": [1, 28, 28]}))
    elif what == "label-count":
        meta_path.write_text(json.dumps({**meta, "labels": ["a", "b"]}))
    elif what == "input-name":
        meta_path.write_text(json.dumps({**meta, "input_name": "pixels"}))
    elif what == "dtype":
        meta_path.write_text(json.dumps({**meta, "input_dtype": "float16"}))


@pytest.mark.parametrize(
    ("what", "names"),
    [
        ("no-model", "model.onnx: no such file"),
        ("no-metadata", "metadata.json: no such file"),
        ("corrupt-model", "model.onnx: ONNX Runtime cannot load it"),
        ("corrupt-metadata", "metadata.json: not valid JSON"),
        ("metadata-list", "metadata.json: expected a JSON object"),
        ("bad-shape", "input_shape must be a non-empty list of positive integers"),
        ("no-labels", "labels must be a non-empty list of strings"),
        ("shape-mismatch", "metadata input_shape is [1, 28, 28]"),
        ("label-count", "has 10 classes, metadata lists 2 labels"),
        ("input-name", "metadata names 'pixels'"),
        ("dtype", "input_dtype 'float16' is not supported"),
    ],
)
def test_broken_model_dirs_name_the_file_and_the_fix(tmp_path: Path, what: str, names: str) -> None:
    model_dir = build_model_dir(tmp_path / "m")
    _break(model_dir, what)
    with pytest.raises(ServingError) as caught:
        OnnxModel(model_dir)
    assert names in str(caught.value)
    assert "re-run the export step" in str(caught.value)
    with pytest.raises(ServingError):  # the launcher refuses it before spawning a server
        check_model_dir(model_dir)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ServingError, match="no such directory"):
        OnnxModel(tmp_path / "nope")
    with pytest.raises(ServingError, match="no such directory"):
        serve_command(tmp_path / "nope", 3000)


def test_metadata_defaults_the_tensor_names(tmp_path: Path) -> None:
    model_dir = build_model_dir(tmp_path / "m")
    meta = json.loads((model_dir / "metadata.json").read_text())
    del meta["input_name"], meta["output_name"]
    (model_dir / "metadata.json").write_text(json.dumps(meta))
    assert (load_metadata(model_dir)["input_name"], load_metadata(model_dir)["output_name"]) == ("input", "logits")


# --- provider choice ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("available", "device", "expected"),
    [
        ([CUDA, CPU], True, [CUDA, CPU]),
        ([CUDA, CPU], False, [CPU]),
        (["TensorrtExecutionProvider", CUDA, CPU], True, [CUDA, CPU]),
        ([CPU], True, [CPU]),
    ],
)
def test_cuda_only_with_provider_and_device(available: list[str], device: bool, expected: list[str]) -> None:
    assert choose_providers(available, has_cuda_device=device) == expected


def test_this_machine_gets_the_provider_it_can_run(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    gpu = cuda_device_present() and CUDA in ort.get_available_providers()
    model = OnnxModel(build_model_dir(tmp_path / "m"))
    assert model.provider == (CUDA if gpu else CPU)
    if not gpu:  # asking for CUDA without a device makes onnxruntime-gpu print an error; we must not
        assert "CUDA" not in capfd.readouterr().err


# --- client and launcher helpers ---------------------------------------------------------------


def test_example_request_is_a_valid_request(tmp_path: Path) -> None:
    meta = load_metadata(build_model_dir(tmp_path / "m"))
    example = example_request(meta, "http://127.0.0.1:3000/")
    assert example["url"] == "http://127.0.0.1:3000/predict"
    assert validate_instances(example["body"]["instances"], SHAPE, 1).shape == (1, 1, 8, 8)
    assert "-H 'Content-Type: application/json'" in example["curl"]
    assert json.loads(example["curl"].split("-d '", 1)[1].rstrip("'")) == example["body"]
    custom = example_request(meta, instances=[grid(3.0)])
    assert custom["body"] == {"instances": [grid(3.0)]}
    assert zero_instance([2, 1]) == [[0], [0]]


def test_serve_command_and_env(tmp_path: Path) -> None:
    model_dir = build_model_dir(tmp_path / "m")
    command = serve_command(model_dir, 3123, host="0.0.0.0")
    assert command[-8:] == ["serve", "serving.service:Fluxo", "--working-dir", str(PROJECT_ROOT),
                            "--host", "0.0.0.0", "--port", "3123"]
    env = serve_env(ServingConfig.for_model_dir(model_dir), {"FLUXO_MAX_BATCH_SIZE": "8"})
    assert env["FLUXO_MODEL_DIR"] == str(model_dir.resolve()) and env["FLUXO_MAX_BATCH_SIZE"] == "8"


def test_serving_never_imports_torch_or_pipelines() -> None:
    code = (
        "import sys, serving.service, serving.client, serving.launch, serving.app, serving.reload\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.split('.')[0] == 'pipelines')\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_fixture_graph_is_valid() -> None:
    assert tiny_classifier((3,), 2).graph.input[0].name == "input"


def test_service_logic_in_process(tmp_path: Path) -> None:
    """The BentoML service class builds the app's state without `bentoml serve`."""
    model_dir = build_model_dir(tmp_path / "m")
    code = (
        "from serving.service import Fluxo, app\n"
        "svc = Fluxo()\n"
        "assert app.state.server is svc.server and svc.server.live.version == '3'\n"
        "assert svc.server.live.batcher.max_batch_size == 4\n"
    )
    env = {**serve_env(ServingConfig.for_model_dir(model_dir)), "FLUXO_MAX_BATCH_SIZE": "4"}
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_provider_preference(monkeypatch: pytest.MonkeyPatch) -> None:
    assert providers_for("cpu") == [CPU]
    if not cuda_device_present():
        with pytest.raises(ServingError, match="FLUXO_PROVIDER=cuda"):
            providers_for("cuda")
        assert providers_for("auto") == [CPU]


def test_a_silent_provider_fallback_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Asked for CUDA without a GPU, onnxruntime-gpu quietly runs on the CPU: we log it, or refuse when strict."""
    if CUDA not in ort.get_available_providers() or cuda_device_present():
        pytest.skip("needs onnxruntime-gpu on a machine without a GPU")
    model_dir = build_model_dir(tmp_path / "m")
    with caplog.at_level("WARNING", logger="serving.runtime"):
        model = OnnxModel(model_dir, providers=[CUDA, CPU])
    assert model.provider == CPU and model.info()["provider"] == CPU
    assert "asked ONNX Runtime for CUDAExecutionProvider but it fell back to CPUExecutionProvider" in caplog.text
    with pytest.raises(ServingError, match="asked ONNX Runtime for CUDAExecutionProvider but it runs on"):
        OnnxModel(model_dir, providers=[CUDA, CPU], strict=True)


def test_warmup_runs_each_batch_size_and_the_server_warms_every_session_it_loads(tmp_path: Path) -> None:
    from serving.runtime import OnnxModel
    from serving.server import ModelServer

    model = OnnxModel(build_model_dir(tmp_path / "m"))
    seen: list[tuple[int, ...]] = []
    real = model.predict_proba
    model.predict_proba = lambda batch: seen.append(batch.shape) or real(batch)  # type: ignore[method-assign]
    assert model.warmup([1, 8], 2) > 0
    assert seen == [(1, 1, 8, 8)] * 2 + [(8, 1, 8, 8)] * 2
    warmed: list[str] = []
    original = OnnxModel.warmup

    def spy(self: OnnxModel, sizes: list[int], runs: int) -> float:
        warmed.append(f"{sizes} x{runs}")
        return original(self, sizes, runs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(OnnxModel, "warmup", spy)
        ModelServer(ServingConfig(model_dir=tmp_path / "m", provider="cpu", max_batch_size=16)).close()
        assert warmed == ["[1, 16] x3"]
        ModelServer(ServingConfig(model_dir=tmp_path / "m", provider="cpu", warmup_runs=0)).close()
        assert warmed == ["[1, 16] x3"]  # FLUXO_WARMUP_RUNS=0: off
    assert ServingConfig.from_env({"FLUXO_WARMUP_RUNS": "0"}).warmup_runs == 0
    with pytest.raises(ServingError, match="FLUXO_WARMUP_RUNS"):
        ServingConfig.from_env({"FLUXO_WARMUP_RUNS": "-1"})


def _with_variants(path: Path, **variants: dict[str, Any]) -> Path:
    """A model directory whose metadata records ``variants``; a kept one gets its own graph (another seed)."""
    model_dir = build_model_dir(path, variants=variants)
    import onnx

    for name, decision in variants.items():
        if decision.get("kept"):
            onnx.save(tiny_classifier((1, 8, 8), 10, seed=7), str(model_dir / f"model.{name}.onnx"))
    return model_dir


def test_the_served_variant_is_the_fastest_kept_one_and_an_unkept_one_is_refused_saying_why(tmp_path: Path) -> None:
    from serving.runtime import OnnxModel

    plain = OnnxModel(build_model_dir(tmp_path / "plain"), variant="auto")
    assert plain.variant == "fp32" and plain.info()["variant"] == "fp32" and plain.info()["variants"] == {}
    kept = {"kept": True, "provider": "CPUExecutionProvider", "speedup": 1.6, "reason": "kept"}
    model_dir = _with_variants(tmp_path / "kept", int8=kept)
    model = OnnxModel(model_dir, variant="auto")
    assert model.variant == "int8" and "(int8)" in model.describe()
    batch = sample_instances(4, seed=1)
    int8_graph = ort.InferenceSession(str(model_dir / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(model.predict_logits(batch), int8_graph.run(None, {"input": batch})[0], rtol=1e-6)
    assert model.info()["variants"]["int8"]["speedup"] == 1.6
    assert OnnxModel(model_dir, variant="fp32").variant == "fp32"

    refused = {"kept": False, "reason": "speedup 1.05x at batch 32 is below export.min_speedup 1.2x"}
    with pytest.raises(ServingError, match=r"FLUXO_VARIANT=int8: .* export's gate refused it: speedup 1.05x .*"
                                           r"usable here: fp32; set FLUXO_VARIANT=auto or fp32"):
        OnnxModel(_with_variants(tmp_path / "refused", int8=refused), variant="int8")
    with pytest.raises(ServingError, match="export did not build one"):
        OnnxModel(model_dir, variant="fp16")
    elsewhere = _with_variants(tmp_path / "cuda", fp16={**kept, "provider": "CUDAExecutionProvider"})
    assert OnnxModel(elsewhere, variant="auto").variant == "fp32"  # measured on CUDA says nothing about the CPU
    with pytest.raises(ServingError, match="measured and kept on CUDAExecutionProvider"):
        OnnxModel(elsewhere, variant="fp16")
    assert ServingConfig.from_env({"FLUXO_VARIANT": "INT8"}).variant == "int8"
    with pytest.raises(ServingError, match="FLUXO_VARIANT"):
        ServingConfig.from_env({"FLUXO_VARIANT": "int4"})


def test_the_launcher_refuses_a_variant_that_was_not_kept_before_spawning(tmp_path: Path) -> None:
    from serving.launch import check_model_dir, check_rollout

    model_dir = build_model_dir(tmp_path / "m")
    env = serve_env(ServingConfig.for_model_dir(model_dir), {"FLUXO_VARIANT": "int8"})
    with pytest.raises(ServingError, match="FLUXO_VARIANT=int8: .* export did not build one"):
        check_rollout(env, check_model_dir(model_dir))
    check_rollout(serve_env(ServingConfig.for_model_dir(model_dir), {"FLUXO_VARIANT": "auto"}),
                  check_model_dir(model_dir))
