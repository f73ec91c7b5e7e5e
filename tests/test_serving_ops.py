"""serving/ in operation, through real `bentoml serve`: hot reload, 429, 504 and draining on SIGTERM."""

from __future__ import annotations

import math
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from serving.reload import publish
from serving.runtime import CPU, session_options, softmax
from tests.serving_fixtures import RunningServer, build_model_dir, build_slow_model_dir, sample_instances

pytestmark = pytest.mark.e2e


def reference(model_dir: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=[CPU])
    return softmax(session.run(None, {"input": batch})[0])


# --- hot reload -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reload")
    return {
        "1": build_model_dir(root / "fluxo-v1", seed=0, model_version="1"),
        "2": build_model_dir(root / "fluxo-v2", seed=1, model_version="2"),
        "live": root / "live",
        "root": root,
    }


@pytest.fixture(scope="module")
def reloading(models: dict[str, Path]) -> Iterator[RunningServer]:
    publish(models["live"], models["1"])
    env = {"FLUXO_RELOAD_INTERVAL_S": "0.2", "FLUXO_MAX_BATCH_SIZE": "8", "FLUXO_TIMEOUT_S": "60"}
    with RunningServer(models["live"], env, models["root"] / "server.log") as running:
        yield running


def test_a_published_model_is_picked_up_without_dropping_requests(
    reloading: RunningServer, models: dict[str, Path]
) -> None:
    pool = sample_instances(32, seed=3)
    expected = {v: reference(models[v], pool) for v in ("1", "2")}
    stop = threading.Event()
    answers: list[tuple[int, int, object]] = []

    def client(index: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = index
            while not stop.is_set():
                row = i % len(pool)
                response = http.post(f"{reloading.url}/predict", json={"instances": [pool[row].tolist()]})
                answers.append((row, response.status_code, response.json()))
                i += 7

    with ThreadPoolExecutor(4) as executor:
        for k in range(4):
            executor.submit(client, k)
        time.sleep(0.5)
        publish(models["live"], models["2"])
        deadline = time.monotonic() + 30
        while not any(isinstance(a, dict) and a.get("model_version") == "2" for _, _, a in answers):
            assert time.monotonic() < deadline, "the new model was not picked up within 30 s"
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()

    assert answers and all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:3]
    versions = [body["model_version"] for _, _, body in answers]
    assert {"1", "2"} <= set(versions)
    for row, _, body in answers:
        served = np.array(body["predictions"][0]["probabilities"])
        np.testing.assert_allclose(served, expected[body["model_version"]][row], atol=1e-6)
    # Every worker watches the pointer on its own: soon all of them answer with the new version.
    deadline = time.monotonic() + 30
    while {httpx.get(f"{reloading.url}/metadata", timeout=10).json()["model_version"] for _ in range(10)} != {"2"}:
        assert time.monotonic() < deadline, "some worker kept the old model"
        time.sleep(0.1)
    metrics = httpx.get(f"{reloading.url}/metrics", timeout=10).text
    assert re.search(r'^fluxo_model_info\{model_name="fluxo",model_version="2",provider="\w+"\} 1.0', metrics, re.M)
    assert re.search(r'^fluxo_model_info\{model_name="fluxo",model_version="1",provider="\w+"\} 0.0', metrics, re.M)
    assert re.search(r'^fluxo_model_reloads_total\{outcome="ok"\} [1-9]', metrics, re.M)

    # Warmup: the new session ran its warmup batches before the switch, the first one before ready.
    log = reloading.log()
    warmed = log.find(f"warmed up {models['2']} (champion)")
    assert warmed != -1 and warmed < log.find("hot reload: now serving"), log[-3000:]
    assert f"warmed up {models['1']} (champion)" in log  # in the worker's set-up, which /readyz waits for
    assert re.search(r'^fluxo_warmup_seconds\{variant="champion"\} [0-9.e-]+$', metrics, re.M)


def test_a_broken_publish_keeps_the_live_model(reloading: RunningServer, models: dict[str, Path]) -> None:
    broken = build_model_dir(models["root"] / "fluxo-v3", model_version="3")
    (broken / "model.onnx").write_bytes(b"not a model")
    live_before = httpx.get(f"{reloading.url}/metadata", timeout=10).json()["model_version"]
    publish(models["live"], broken)
    deadline = time.monotonic() + 30
    while "cannot load it" not in reloading.log():
        assert time.monotonic() < deadline, reloading.log()[-3000:]
        time.sleep(0.1)
    time.sleep(0.5)  # every worker has had its turn at the broken pointer
    assert {httpx.get(f"{reloading.url}/metadata", timeout=10).json()["model_version"] for _ in range(6)} == {live_before}
    response = httpx.post(f"{reloading.url}/predict", json={"instances": [[[[0.0] * 8] * 8]]}, timeout=30)
    assert response.status_code == 200 and response.json()["model_version"] == live_before


# --- limits and drain on a slow model --------------------------------------------------------

TIMEOUT_S = 2.0
MAX_CONCURRENCY = 6


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, float]]:
    """A server whose model takes a measured time per instance: requests are sized in seconds."""
    root = tmp_path_factory.mktemp("slow")
    model_dir = build_slow_model_dir(root / "model")
    session = ort.InferenceSession(str(model_dir / "model.onnx"), sess_options=session_options(1), providers=[CPU])
    batch = sample_instances(128)
    session.run(None, {"input": batch})
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        session.run(None, {"input": batch})
        timings.append((time.perf_counter() - started) / len(batch))
    per_instance = float(np.median(timings))
    env = {
        # One worker: requests are sized against one session's speed, and the abandoned run
        # behind the 504 must hold up the requests that follow, not hide in another worker.
        "FLUXO_WORKERS": "1",
        "FLUXO_TIMEOUT_S": str(TIMEOUT_S),
        "FLUXO_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
        "FLUXO_MAX_INSTANCES": "1000000",
        "FLUXO_MAX_BODY_BYTES": str(256 * 1024 * 1024),
    }
    with RunningServer(model_dir, env, root / "server.log") as running:
        yield running, per_instance


def instances_for(seconds: float, per_instance: float) -> list:
    return sample_instances(max(1, math.ceil(seconds / per_instance)), seed=9).tolist()


def wait_until_idle(url: str) -> None:
    """After a 504 the abandoned model run still finishes in the background; wait it out."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = httpx.post(f"{url}/predict", json={"instances": [[[[0.0] * 8] * 8]]}, timeout=30)
        if response.status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError("the slow server did not recover")


def test_requests_beyond_the_concurrency_limit_get_429(slow: tuple[RunningServer, float]) -> None:
    running, per_instance = slow
    body = {"instances": instances_for(0.06, per_instance)}  # MAX_CONCURRENCY of them fit well in TIMEOUT_S

    def ask(_: int) -> httpx.Response:
        return httpx.post(f"{running.url}/predict", json=body, timeout=30)

    with ThreadPoolExecutor(3 * MAX_CONCURRENCY) as executor:
        responses = list(executor.map(ask, range(3 * MAX_CONCURRENCY)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
    assert all("Too many requests" in r.json()["error"] for r in responses if r.status_code == 429)
    assert httpx.get(f"{running.url}/healthz", timeout=10).status_code == 200


def test_a_request_past_the_timeout_gets_504(slow: tuple[RunningServer, float]) -> None:
    running, per_instance = slow
    started = time.monotonic()
    response = httpx.post(f"{running.url}/predict", json={"instances": instances_for(2.5 * TIMEOUT_S, per_instance)},
                          timeout=60)
    assert response.status_code == 504, response.text
    assert "seconds" in response.json()["error"]
    assert time.monotonic() - started < 2 * TIMEOUT_S, "the 504 came only when the run ended"
    wait_until_idle(running.url)


def in_progress(url: str) -> float:
    """Requests the server is working on now, from fluxo's gauge (the scrape itself excluded)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(r"^fluxo_requests_in_progress (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_sigterm_drains_requests_in_flight(slow: tuple[RunningServer, float]) -> None:
    """Must run last in this module: it stops the slow server."""
    running, per_instance = slow
    body = {"instances": instances_for(0.15, per_instance)}
    finished: list[tuple[float, int]] = []

    def ask(_: int) -> None:
        response = httpx.post(f"{running.url}/predict", json=body, timeout=60)
        finished.append((time.monotonic(), response.status_code))

    with ThreadPoolExecutor(MAX_CONCURRENCY - 1) as executor:
        futures = [executor.submit(ask, i) for i in range(MAX_CONCURRENCY - 1)]
        # "In flight" means the server is working on them: uvicorn closes connections whose
        # request it has not begun (as any server must, once it stops accepting).
        deadline = time.monotonic() + 30
        while in_progress(running.url) < 3:
            assert time.monotonic() < deadline and len(finished) < 3, "the requests never were in progress together"
            time.sleep(0.01)
        signalled = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        for future in futures:
            future.result()
    assert [status for _, status in finished] == [200] * (MAX_CONCURRENCY - 1)
    assert any(at > signalled for at, _ in finished), "every request ended before SIGTERM: nothing was drained"
    assert running.process.wait(timeout=30) is not None
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{running.url}/predict", json=body, timeout=5)
