"""Loads that fail recover: a bad challenger, a failed hot reload, a graph fixed at batch 1, a half-synced publish.

In process (``ModelServer`` and the app without bentoml) with real ONNX graphs built by
onnx.helper: a graph that runs a zero batch but fails on warmup's rows, one whose batch
axis is fixed at 1, one that reshapes every batch to one row. The hot-reload loop is
driven either one poll at a time (deterministic backoff) or by ``ModelServer.watch``
itself, waited on with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from serving import ServingConfig, ServingError
from serving.launch import check_model_dir
from serving.reload import RETRIES, PointerWatcher, publish
from serving.runtime import OnnxModel
from serving.server import ModelServer
from tests.serving_fixtures import DIGIT_LABELS, build_model_dir, metadata_for, sample_instances, tiny_classifier

SHAPE = (1, 8, 8)


def _save(path: Path, graph: onnx.GraphProto, inits: list[onnx.TensorProto]) -> Path:
    """A model directory holding ``graph`` (input "input", output "logits") and digits metadata."""
    graph.initializer.extend(inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="fluxo-tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path / "model.onnx"))
    (path / "metadata.json").write_text(json.dumps(metadata_for(SHAPE, DIGIT_LABELS, model_version="2")))
    return path


def _weights(seed: int = 0) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(seed)
    return [numpy_helper.from_array(rng.normal(0, 1, (64, 10)).astype(np.float32), "weight"),
            numpy_helper.from_array(np.zeros(10, np.float32), "bias")]


def warmup_breaker(path: Path) -> Path:
    """Runs a zero batch (the load check) but fails on any other rows: Gather's index is the input's sum."""
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "weight", "bias"], ["scores"]),
        helper.make_node("ReduceSum", ["flat", "axis1"], ["total"], keepdims=1),
        helper.make_node("Mul", ["total", "big"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["one", "index"], ["picked"], axis=0),  # index 0 only: zeros pass
        helper.make_node("Add", ["scores", "picked"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "warmup_breaker",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *SHAPE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])])
    extra = [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array(1000.0, np.float32), "big"),
             numpy_helper.from_array(np.zeros(1, np.float32), "one")]
    return _save(path, graph, _weights() + extra)


def fixed_batch(path: Path) -> Path:
    """The tiny classifier with its batch axis fixed at 1, as torch.onnx.export writes it without dynamic_axes."""
    model = tiny_classifier(SHAPE, 10)
    for tensor in (*model.graph.input, *model.graph.output):
        dim = tensor.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 1
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path / "model.onnx"))
    (path / "metadata.json").write_text(json.dumps(metadata_for(SHAPE, DIGIT_LABELS)))
    return path


def one_row_reshape(path: Path) -> Path:
    """A symbolic batch axis, but a Reshape to (1, 64) inside: one row runs, any merged batch fails."""
    nodes = [helper.make_node("Reshape", ["input", "rows"], ["flat"]),
             helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"])]
    graph = helper.make_graph(nodes, "one_row",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *SHAPE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])])
    return _save(path, graph, _weights() + [numpy_helper.from_array(np.array([1, 64], np.int64), "rows")])


def _sample(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- a challenger that fails warmup ----------------------------------------------------------------


def test_a_challenger_whose_warmup_fails_leaves_the_champion_serving(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    champion = build_model_dir(tmp_path / "champion", model_version="1")
    challenger = warmup_breaker(tmp_path / "challenger")
    OnnxModel(challenger)  # loads and passes its zero-batch check: only warmup's rows break it
    failed = _sample("fluxo_challenger_reloads_total", outcome="failed")
    from serving.app import create_app

    app = create_app()
    with caplog.at_level("ERROR", logger="serving.server"):
        server = ModelServer(ServingConfig(model_dir=champion, provider="cpu", rollout="canary", canary_share=1.0,
                                           challenger_dir=challenger, max_batch_size=4))
    app.state.server = server
    try:
        assert server.challenger is None
        assert "warmup fails on a batch of 1 rows" in caplog.text and "the champion serves alone" in caplog.text
        assert str(challenger) in caplog.text
        assert _sample("fluxo_challenger_reloads_total", outcome="failed") == failed + 1

        async def run() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fluxo") as client:
                answer = await client.post("/predict", json={"instances": sample_instances(2).tolist()})
                return answer, await client.get("/metadata")

        answer, metadata = asyncio.run(run())
        assert answer.status_code == 200 and answer.headers["x-fluxo-variant"] == "champion"
        rollout = metadata.json()["rollout"]
        assert rollout["challenger"] is None and "warmup fails" in rollout["challenger_error"]
    finally:
        server.close()


def test_a_failed_challenger_reload_keeps_the_champion_and_the_previous_challenger(tmp_path: Path) -> None:
    champion = build_model_dir(tmp_path / "champion", model_version="1")
    good = build_model_dir(tmp_path / "good", seed=1, model_version="2")
    root = tmp_path / "challenger-root"
    publish(root, good)
    server = ModelServer(ServingConfig(model_dir=champion, provider="cpu", rollout="shadow", challenger_dir=root,
                                       max_batch_size=4))
    try:
        assert server.challenger is not None and server.challenger.version == "2"
        failed = _sample("fluxo_challenger_reloads_total", outcome="failed")
        publish(root, warmup_breaker(tmp_path / "bad"))
        assert asyncio.run(server.reload_challenger_if_published()) is False
        assert server.challenger.version == "2" and "warmup fails" in server.rollout_info()["challenger_error"]
        assert _sample("fluxo_challenger_reloads_total", outcome="failed") == failed + 1
    finally:
        server.close()


# --- the batch axis ---------------------------------------------------------------------------------


def test_a_graph_fixed_at_batch_one_is_refused_at_load_naming_the_dir_and_the_fix(tmp_path: Path) -> None:
    model_dir = fixed_batch(tmp_path / "fixed")
    with pytest.raises(ServingError) as error:
        OnnxModel(model_dir, max_batch_size=32)
    message = str(error.value)
    assert str(model_dir) in message and "batch axis is fixed at 1" in message
    assert "1 and 32 rows" in message and "re-export the model with a dynamic batch axis" in message
    with pytest.raises(ServingError, match="dynamic batch axis"):
        ModelServer(ServingConfig(model_dir=model_dir, provider="cpu"))  # the server asks for its own max batch
    assert OnnxModel(model_dir, max_batch_size=1).batch_sizes == (1,)  # batching off: one row per run is all
    with pytest.raises(ServingError, match="dynamic batch axis"):  # and before anything is spawned
        check_model_dir(model_dir, ServingConfig(model_dir=model_dir).max_batch_size)


def test_a_graph_that_runs_one_row_only_is_refused_at_load(tmp_path: Path) -> None:
    model_dir = one_row_reshape(tmp_path / "one-row")
    OnnxModel(model_dir)  # one row: fine
    with pytest.raises(ServingError) as error:
        OnnxModel(model_dir, max_batch_size=8)
    assert str(model_dir) in str(error.value) and "shape (8, 1, 8, 8)" in str(error.value)
    assert "dynamic batch axis" in str(error.value)


# --- hot reload: counted, retried with backoff, never marked seen before it loads ---------------------


def _corrupt(path: Path) -> bytes:
    """Truncate a file as a half-synced volume shows it; returns the bytes to restore."""
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 3])
    return whole


def test_a_failed_hot_reload_is_counted_and_retried_with_backoff_until_it_loads(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    v1 = build_model_dir(tmp_path / "v1", model_version="1")
    v2 = build_model_dir(tmp_path / "v2", seed=1, model_version="2")
    root = tmp_path / "live"
    publish(root, v1)
    server = ModelServer(ServingConfig(model_dir=root, provider="cpu", max_batch_size=4, reload_interval_s=1.0))
    try:
        publish(root, v2)
        whole = _corrupt(v2 / "model.onnx")  # the pointer synced, the directory not yet
        failed, ok = _sample("fluxo_model_reloads_total", outcome="failed"), _sample("fluxo_model_reloads_total",
                                                                                    outcome="ok")
        with caplog.at_level("ERROR", logger="serving.server"):
            tries = [asyncio.run(server.reload_if_published()) for _ in range(4)]  # one poll each
        # Tried at once, then after 1 poll, then after 2: polls 1, 2 and 4 load; 3 waits.
        assert tries == [False] * 4 and server.live.version == "1"
        assert _sample("fluxo_model_reloads_total", outcome="failed") == failed + 3
        assert "still serving" in caplog.text and "trying it again in 4 s" in caplog.text
        (v2 / "model.onnx").write_bytes(whole)  # the volume caught up; nobody publishes again
        polls = 0
        while not asyncio.run(server.reload_if_published()):
            polls += 1
            assert polls <= 4, "the publish was never retried"
        assert server.live.version == "2" and polls == 3  # the fourth backoff: 4 polls after the third failure
        assert _sample("fluxo_model_reloads_total", outcome="ok") == ok + 1
        assert asyncio.run(server.reload_if_published()) is False  # loaded: seen now
    finally:
        server.close()


async def _until(condition, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` on the loop until true; fail naming ``what`` at the deadline (no fixed sleep)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_the_watch_loop_heals_a_half_synced_publish_without_another(tmp_path: Path) -> None:
    v1 = build_model_dir(tmp_path / "v1", model_version="1")
    v2 = build_model_dir(tmp_path / "v2", seed=1, model_version="2")
    root = tmp_path / "live"
    publish(root, v1)
    server = ModelServer(ServingConfig(model_dir=root, provider="cpu", max_batch_size=4, reload_interval_s=0.1))
    failed = _sample("fluxo_model_reloads_total", outcome="failed")
    publish(root, v2)
    whole = _corrupt(v2 / "metadata.json")  # the pointer synced, the directory not yet

    async def run() -> None:
        watching = asyncio.create_task(server.watch())
        try:
            await _until(lambda: _sample("fluxo_model_reloads_total", outcome="failed") > failed, "a failed reload")
            assert server.live.version == "1"
            (v2 / "metadata.json").write_bytes(whole)
            await _until(lambda: server.live.version == "2", "the retried reload")
        finally:
            watching.cancel()

    try:
        asyncio.run(run())
    finally:
        server.close()


def test_the_watcher_backs_off_then_gives_up_until_the_next_publish(tmp_path: Path) -> None:
    v1 = build_model_dir(tmp_path / "v1")
    v2 = build_model_dir(tmp_path / "v2", seed=1)
    root = tmp_path / "live"
    publish(root, v1)
    watcher = PointerWatcher(root, v1)
    publish(root, v2)
    pattern = []
    for _ in range(40):
        target = watcher.poll()
        pattern.append(target is not None)
        if target is not None:
            watcher.failed()
    tries = [i for i, tried in enumerate(pattern) if tried]
    assert len(tries) == RETRIES + 1, "bounded: the first try and RETRIES retries"
    assert [b - a for a, b in zip(tries, tries[1:])] == [2 ** n for n in range(RETRIES)]  # 1, 2, 4, 8, 16 polls
    assert watcher.poll() is None
    publish(root, v2)  # a new publish is tried at once
    assert watcher.poll() == v2.resolve()
    watcher.accept(v2)
    assert watcher.poll() is None


def test_an_unreadable_pointer_is_retried_too(tmp_path: Path) -> None:
    v1 = build_model_dir(tmp_path / "v1")
    root = tmp_path / "live"
    publish(root, v1)
    server = ModelServer(ServingConfig(model_dir=root, provider="cpu", max_batch_size=4))
    try:
        pointer = root / "current.json"
        good = pointer.read_text()
        pointer.write_text(good[: len(good) // 2])  # a half-synced pointer
        failed = _sample("fluxo_model_reloads_total", outcome="failed")
        assert asyncio.run(server.reload_if_published()) is False
        assert _sample("fluxo_model_reloads_total", outcome="failed") == failed + 1
        build_model_dir(tmp_path / "v2", seed=1, model_version="2")
        pointer.write_text(good.replace("../v1", "../v2"))  # the whole pointer arrives (naming a new model)
        assert asyncio.run(server.reload_if_published()) and server.live.version == "2"
    finally:
        server.close()
