"""The fast path of the inference routes (serving/fastpath.py) answers exactly as the FastAPI routes do.

In process: the same ModelServer behind both, the same requests, the same statuses and
bodies; the full stack is never entered for POST /predict, /predict/image and the v2 infer
routes, and always for the rest. The
HTTP tests (test_serving_http, test_serving_ops) run every client mistake, 429 and 504
through it under `bentoml serve`.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from serving import ServingConfig
from serving.app import create_app
from serving.fastpath import InferenceFastPath
from serving.schemas import only_numbers, validate_instances
from serving.server import ModelServer
from tests.serving_fixtures import build_model_dir, digit_png, onnx_probabilities, sample_instances

KEY = "s3cret"


class Recorder:
    """The full stack behind the fast path, recording which requests reached it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.paths: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.paths.append(f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Recorder, Path]:
    model_dir = build_model_dir(tmp_path_factory.mktemp("fastpath") / "model")
    app = create_app()
    app.state.server = ModelServer(ServingConfig(model_dir=model_dir, provider="cpu", api_key=KEY,
                                                 max_instances=4, max_body_bytes=4096, warmup_runs=0))
    full = Recorder(app)
    return InferenceFastPath(full, app.state), full, model_dir


async def _ask(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fluxo") as client:
        return await client.request(method, path, **kwargs)


AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = sample_instances(3).tolist()
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("three digits", {"json": {"instances": GOOD}, "headers": AUTH}),
    ("no key", {"json": {"instances": GOOD}}),
    ("wrong key", {"json": {"instances": GOOD}, "headers": {"X-API-Key": "nope"}}),
    ("wrong shape", {"json": {"instances": [[1.0, 2.0]]}, "headers": AUTH}),
    ("a string", {"json": {"instances": [[[["1"] * 8] * 8]]}, "headers": AUTH}),
    ("a boolean", {"content": b'{"instances": [[[' + b",".join([b"[" + b",".join([b"true"] * 8) + b"]"] * 8) + b"]]]}",
                   "headers": {**AUTH, "Content-Type": "application/json"}}),
    ("NaN", {"content": b'{"instances": [[[' + b",".join([b"[" + b",".join([b"NaN"] * 8) + b"]"] * 8) + b"]]]}",
             "headers": {**AUTH, "Content-Type": "application/json"}}),
    ("beyond float32", {"json": {"instances": [[[[1e39] * 8] * 8]]}, "headers": AUTH}),
    ("too many instances", {"json": {"instances": sample_instances(5).tolist()}, "headers": AUTH}),
    ("too large a body", {"json": {"instances": GOOD, "pad": "x" * 5000}, "headers": AUTH}),
    ("no instances", {"json": {"inputs": []}, "headers": AUTH}),
    ("not JSON", {"content": b"{instances", "headers": {**AUTH, "Content-Type": "application/json"}}),
    ("an image", {"content": b"\x89PNG", "headers": {**AUTH, "Content-Type": "image/png"}}),
    ("empty", {"content": b"", "headers": {**AUTH, "Content-Type": "application/json"}}),
]


V2 = "/v2/models/fluxo/infer"
V2_PINNED = "/v2/models/fluxo/versions/3/infer"
TENSOR = {"name": "input", "shape": [3, 1, 8, 8], "datatype": "FP32", "data": sample_instances(3).ravel().tolist()}
RAW = sample_instances(3).astype("<f4").tobytes()


def _binary_body(header: dict[str, Any], blob: bytes, length_delta: int = 0) -> dict[str, Any]:
    text = json.dumps(header).encode()
    return {"content": text + blob,
            "headers": {**AUTH, "Inference-Header-Content-Length": str(len(text) + length_delta)}}


BINARY_INPUT = {**{k: v for k, v in TENSOR.items() if k != "data"}, "parameters": {"binary_data_size": len(RAW)}}
V2_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("json tensor", V2, {"json": {"inputs": [TENSOR]}, "headers": AUTH}),
    ("json tensor, pinned", V2_PINNED, {"json": {"inputs": [TENSOR], "id": "r1"}, "headers": AUTH}),
    ("json tensor, nested data", V2, {"json": {"inputs": [{**TENSOR, "data": sample_instances(3).tolist()}]},
                                      "headers": AUTH}),
    ("binary in, json out", V2, _binary_body({"inputs": [BINARY_INPUT]}, RAW)),
    ("binary in and out", V2, _binary_body({"inputs": [BINARY_INPUT], "parameters": {"binary_data_output": True}},
                                           RAW)),
    ("binary out for one", V2, _binary_body({"inputs": [BINARY_INPUT], "outputs": [
        {"name": "label", "parameters": {"binary_data": True}}, {"name": "probabilities"}]}, RAW)),
    ("binary, short", V2, _binary_body({"inputs": [BINARY_INPUT]}, RAW[:-4])),
    ("binary, extra bytes", V2, _binary_body({"inputs": [BINARY_INPUT]}, RAW + b"\0\0\0\0")),
    ("binary, ragged", V2, _binary_body({"inputs": [{**BINARY_INPUT, "parameters": {"binary_data_size": 7}}]},
                                        RAW[:7])),
    ("binary, header past the end", V2, _binary_body({"inputs": [BINARY_INPUT]}, RAW, length_delta=len(RAW) + 1)),
    ("binary, NaN", V2, _binary_body({"inputs": [BINARY_INPUT]}, np.full(192, np.nan, "<f4").tobytes())),
    ("binary, INT64 input", V2, _binary_body({"inputs": [{**BINARY_INPUT, "datatype": "INT64"}]}, RAW)),
    ("json tensor, a string", V2, {"json": {"inputs": [{**TENSOR, "data": ["1"] * 192}]}, "headers": AUTH}),
    ("json tensor, a boolean", V2, {"json": {"inputs": [{**TENSOR, "data": [True] * 192}]}, "headers": AUTH}),
    ("json tensor, beyond float32", V2, {"json": {"inputs": [{**TENSOR, "data": [1e39] * 192}]}, "headers": AUTH}),
    ("json tensor, too big an integer", V2, {"json": {"inputs": [{**TENSOR, "data": [10**400] + [0] * 191}]},
                                             "headers": AUTH}),
    ("unknown model", "/v2/models/other/infer", {"json": {"inputs": [TENSOR]}, "headers": AUTH}),
    ("no key", V2, {"json": {"inputs": [TENSOR]}}),
    ("from another site", V2, {"json": {"inputs": [TENSOR]}, "headers": {**AUTH, "Origin": "https://evil.example"}}),
    ("too many instances", V2, {"json": {"inputs": [{**TENSOR, "shape": [5, 1, 8, 8],
                                                     "data": [0.0] * 320}]}, "headers": AUTH}),
]
IMAGE = "/predict/image"


def _gif() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (8, 8), 255).save(out, "GIF")
    return out.getvalue()


V2_REQUESTS += [
    ("one PNG", IMAGE, {"content": digit_png(sample_instances(1)[0]), "headers": {**AUTH, "Content-Type": "image/png"}}),
    ("two PNGs, multipart", IMAGE, {"files": [("file", ("a.png", digit_png(sample_instances(1)[0]), "image/png")),
                                              ("file", ("b.png", digit_png(sample_instances(2)[1]), "image/png"))],
                                    "headers": AUTH}),
    ("not an image", IMAGE, {"content": b"\x89PNG", "headers": {**AUTH, "Content-Type": "image/png"}}),
    ("a GIF", IMAGE, {"content": _gif(), "headers": {**AUTH, "Content-Type": "image/png"}}),
    ("images from another site", IMAGE, {"files": [("file", ("a.png", digit_png(sample_instances(1)[0]), "image/png"))],
                                         "headers": {**AUTH, "Origin": "null"}}),
]
ROUTED: list[tuple[str, str, dict[str, Any]]] = [(name, "/predict", request) for name, request in REQUESTS] + V2_REQUESTS


@pytest.mark.parametrize("name,path,request_", ROUTED, ids=[name for name, _, _ in ROUTED])
def test_the_fast_path_answers_as_the_route_does(apps: tuple[Any, Recorder, Path], name: str, path: str,
                                                  request_: dict[str, Any]) -> None:
    fast, full, _ = apps
    before = len(full.paths)
    through_fast = asyncio.run(_ask(fast, "POST", path, **request_))
    assert len(full.paths) == before, f"{name}: POST {path} went down the full stack"
    through_route = asyncio.run(_ask(full.app, "POST", path, **request_))
    assert through_fast.status_code == through_route.status_code, (name, through_fast.text, through_route.text)
    assert through_fast.content == through_route.content
    assert through_fast.headers.get("www-authenticate") == through_route.headers.get("www-authenticate")
    assert through_fast.headers["content-type"] == through_route.headers["content-type"]
    assert through_fast.status_code < 500, (name, through_fast.text)


@pytest.mark.parametrize("name,path,request_,status", [
    ("json tensor", V2, {"json": {"inputs": [TENSOR]}, "headers": AUTH}, 200),
    ("binary in and out", *V2_REQUESTS[4][1:], 200),
    ("binary, short", *V2_REQUESTS[6][1:], 400),
    ("binary, extra bytes", *V2_REQUESTS[7][1:], 400),
    ("binary, NaN", *V2_REQUESTS[10][1:], 400),
    ("json tensor, a string", *V2_REQUESTS[12][1:], 400),
    ("json tensor, too big an integer", *V2_REQUESTS[15][1:], 400),
    ("unknown model", *V2_REQUESTS[16][1:], 404),
    ("from another site", *V2_REQUESTS[18][1:], 403),
    ("too many instances", *V2_REQUESTS[19][1:], 413),
    ("one PNG", *V2_REQUESTS[20][1:], 200),
    ("a GIF", *V2_REQUESTS[23][1:], 415),
    ("images from another site", *V2_REQUESTS[24][1:], 403),
])
def test_statuses(apps: tuple[Any, Recorder, Path], name: str, path: str, request_: dict[str, Any],
                  status: int) -> None:
    fast, _, _ = apps
    answer = asyncio.run(_ask(fast, "POST", path, **request_))
    assert answer.status_code == status, (name, answer.text)


def test_binary_tensors_in_and_out_carry_the_models_answer(apps: tuple[Any, Recorder, Path]) -> None:
    fast, _, model_dir = apps
    answer = asyncio.run(_ask(fast, "POST", V2, **V2_REQUESTS[4][2]))
    header_length = int(answer.headers["inference-header-content-length"])
    header = json.loads(answer.content[:header_length])
    blob = answer.content[header_length:]
    outputs = {tensor["name"]: tensor for tensor in header["outputs"]}
    assert "data" not in outputs["probabilities"] and "data" not in outputs["label"]
    size = outputs["probabilities"]["parameters"]["binary_data_size"]
    probabilities = np.frombuffer(blob[:size], "<f4").reshape(outputs["probabilities"]["shape"])
    expected = onnx_probabilities(model_dir, sample_instances(3))
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    labels, rest = [], blob[size:]
    while rest:
        (n,), rest = struct.unpack("<I", rest[:4]), rest[4:]
        labels.append(rest[:n].decode())
        rest = rest[n:]
    assert labels == [str(i) for i in expected.argmax(axis=1)]
    assert len(rest) == 0 and size + outputs["label"]["parameters"]["binary_data_size"] == len(blob)


def test_a_page_of_the_server_itself_may_call_it(apps: tuple[Any, Recorder, Path]) -> None:
    fast, _, _ = apps
    same = asyncio.run(_ask(fast, "POST", "/predict", json={"instances": GOOD},
                            headers={**AUTH, "Origin": "http://fluxo"}))  # the client's base URL: Host is "fluxo"
    assert same.status_code == 200, same.text
    other = asyncio.run(_ask(fast, "POST", "/predict", json={"instances": GOOD},
                             headers={**AUTH, "Origin": "http://fluxo.evil.example"}))
    assert other.status_code == 403 and "Origin" in other.json()["error"]


def test_the_answer_is_the_models(apps: tuple[Any, Recorder, Path]) -> None:
    fast, _, model_dir = apps
    answer = asyncio.run(_ask(fast, "POST", "/predict", json={"instances": GOOD}, headers=AUTH))
    served = np.array([p["probabilities"] for p in answer.json()["predictions"]])
    np.testing.assert_allclose(served, onnx_probabilities(model_dir, np.array(GOOD, dtype=np.float32)), atol=1e-6)


@pytest.mark.parametrize("method,path", [("GET", "/metadata"), ("GET", "/predict"), ("GET", V2),
                                         ("GET", "/metrics"), ("POST", "/predict/"), ("POST", "/v2/models//infer"),
                                         ("POST", "/v2/models/fluxo/versions//infer"), ("POST", "/v2/models/fluxo")])
def test_everything_else_goes_down_the_full_stack(apps: tuple[Any, Recorder, Path], method: str, path: str) -> None:
    fast, full, _ = apps
    asyncio.run(_ask(fast, method, path, headers=AUTH))
    assert full.paths[-1] == f"{method} {path}"


def test_a_request_beyond_the_limit_gets_429_on_either_path(apps: tuple[Any, Recorder, Path]) -> None:
    fast, full, _ = apps
    server = full.app.state.server
    server.metrics.in_flight += server.config.max_concurrency  # as if the worker were full
    try:
        for app in (fast, full.app):
            refused = asyncio.run(_ask(app, "POST", "/predict", json={"instances": GOOD}, headers=AUTH))
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert "FLUXO_MAX_CONCURRENCY" in refused.json()["error"]
        assert asyncio.run(_ask(full.app, "GET", "/metrics")).status_code == 200  # a scrape is never refused
    finally:
        server.metrics.in_flight -= server.config.max_concurrency


def test_a_server_fault_answers_500_with_a_sentence(apps: tuple[Any, Recorder, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fast, full, _ = apps

    async def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("the session is gone")

    monkeypatch.setattr(full.app.state.server.live.batcher, "submit", broken)
    answer = asyncio.run(_ask(fast, "POST", "/predict", json={"instances": GOOD}, headers=AUTH))
    assert answer.status_code == 500 and "server log" in answer.json()["error"]


@pytest.mark.parametrize("body,numbers", [
    (b'{"instances": [[1, 2.5, -3e-2, 4E+1]]}', True),
    (b'{"instances": [[1, true]]}', False),
    (b'{"instances": [["1", 2]]}', False),
    (b'{"instances": [[null, 2]]}', False),
    (b'{"instances": [[NaN, 2]]}', False),
    (b'{"instances": [[1, 2]], "id": "a"}', False),
    (b'{"instan\\u0063es": [[1, 2]]}', False),
])
def test_only_numbers_is_true_only_for_bodies_of_json_numbers(body: bytes, numbers: bool) -> None:
    assert only_numbers(body) is numbers


def test_the_numbers_only_conversion_equals_the_checked_one() -> None:
    rng = np.random.default_rng(0)
    instances = (rng.normal(size=(7, 1, 8, 8)) * 1e3).tolist()
    fast = validate_instances(instances, (1, 8, 8), 10, numbers_only=True)
    assert fast.dtype == np.float32 and np.array_equal(fast, validate_instances(instances, (1, 8, 8), 10))
    # A valid value whose float32 sum overflows still passes (through the full check).
    big = [[3e38, 3e38]]
    assert np.array_equal(validate_instances(big, (2,), 1, numbers_only=True), np.array(big, dtype=np.float32))


def test_a_tally_writes_what_direct_observations_would() -> None:
    """The tally (serving/metrics.py) writes sums into prometheus_client's buckets: the same numbers as observe()."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from serving.metrics import FLUSH_S, Tally

    def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in registry.collect() for s in m.samples
                if not s.name.endswith("_created")}

    values = [0.0005, 0.001, 0.0042, 0.03, 0.03, 7.0, 99.0, 1e-9]
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram("latency", "l", buckets=(0.001, 0.005, 0.05, 10.0), registry=direct)
    counter = Counter("requests", "r", registry=direct)
    for value in values:
        histogram.observe(value)
        counter.inc()

    async def tally_on_a_loop() -> tuple[float, float]:
        tally = Tally()
        histogram = Histogram("latency", "l", buckets=(0.001, 0.005, 0.05, 10.0), registry=tallied)
        counter = Counter("requests", "r", registry=tallied)
        for value in values:
            tally.observe(histogram, value)
            tally.inc(counter)
        unwritten = counter._value.get()
        await asyncio.sleep(FLUSH_S + 0.1)  # the scheduled flush
        return unwritten, counter._value.get()

    unwritten, written = asyncio.run(tally_on_a_loop())
    assert (unwritten, written) == (0, len(values))
    assert samples(tallied) == samples(direct)
