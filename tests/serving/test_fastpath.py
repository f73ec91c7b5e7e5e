"""The fast path of POST /predict (serving/fastpath.py) answers exactly as the FastAPI route does.

In process: the same ModelServer behind both, the same requests, the same statuses and
bodies; the full stack is never entered for POST /predict and always for the rest. The
HTTP tests (test_serving_http, test_serving_ops) run every client mistake, 429 and 504
through it under `bentoml serve`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from serving import ServingConfig
from serving.app import create_app
from serving.fastpath import PredictFastPath
from serving.schemas import only_numbers, validate_instances
from serving.server import ModelServer
from tests.serving_fixtures import build_model_dir, onnx_probabilities, sample_instances

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
    return PredictFastPath(full, app.state), full, model_dir


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


@pytest.mark.parametrize("name,request_", REQUESTS, ids=[name for name, _ in REQUESTS])
def test_the_fast_path_answers_as_the_route_does(apps: tuple[Any, Recorder, Path], name: str,
                                                  request_: dict[str, Any]) -> None:
    fast, full, _ = apps
    before = len(full.paths)
    through_fast = asyncio.run(_ask(fast, "POST", "/predict", **request_))
    assert len(full.paths) == before, f"{name}: POST /predict went down the full stack"
    through_route = asyncio.run(_ask(full.app, "POST", "/predict", **request_))
    assert through_fast.status_code == through_route.status_code, (name, through_fast.text, through_route.text)
    assert through_fast.json() == through_route.json()
    assert through_fast.headers.get("www-authenticate") == through_route.headers.get("www-authenticate")
    assert through_fast.headers["content-type"] == "application/json"


def test_the_answer_is_the_models(apps: tuple[Any, Recorder, Path]) -> None:
    fast, _, model_dir = apps
    answer = asyncio.run(_ask(fast, "POST", "/predict", json={"instances": GOOD}, headers=AUTH))
    served = np.array([p["probabilities"] for p in answer.json()["predictions"]])
    np.testing.assert_allclose(served, onnx_probabilities(model_dir, np.array(GOOD, dtype=np.float32)), atol=1e-6)


@pytest.mark.parametrize("method,path", [("GET", "/metadata"), ("GET", "/predict"), ("POST", "/predict/image"),
                                         ("GET", "/metrics"), ("POST", "/predict/")])
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
