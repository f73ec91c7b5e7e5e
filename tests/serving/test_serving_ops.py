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
from tests.waiting import exceptions_of, raise_if_any_failed, wait_for

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
    clients = 4
    sent = [0] * clients
    answers: list[tuple[int, int, int, object]] = []  # (client, row, status, body)

    def client(index: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = index
            while not stop.is_set():
                row = i % len(pool)
                sent[index] += 1
                response = http.post(f"{reloading.url}/predict", json={"instances": [pool[row].tolist()]})
                body = response.json() if response.status_code == 200 else response.text
                answers.append((index, row, response.status_code, body))
                i += 7

    def answered_by(version: str) -> set[int]:
        return {c for c, _, status, body in list(answers) if status == 200 and body["model_version"] == version}

    def every_client_answered_by(version: str):
        def condition() -> bool:
            raise_if_any_failed(futures)
            return answered_by(version) == set(range(clients))
        return condition

    with ThreadPoolExecutor(clients) as executor:
        futures = [executor.submit(client, k) for k in range(clients)]
        try:
            wait_for(every_client_answered_by("1"), "every client answered by version 1", timeout=60)
            publish(models["live"], models["2"])
            # Traffic keeps flowing through the switch until every client has been answered by the new model.
            wait_for(every_client_answered_by("2"), "every client answered by version 2", timeout=60,
                     detail=lambda: reloading.log()[-3000:])
        finally:
            stop.set()
    errors = exceptions_of(futures)
    assert not errors, errors  # no client died: a reset connection is a dropped request
    # Every request every client sent was answered, and with a 200.
    assert [sum(1 for c, *_ in answers if c == k) for k in range(clients)] == sent
    assert all(status == 200 for _, _, status, _ in answers), [a for a in answers if a[2] != 200][:3]
    versions = [body["model_version"] for _, _, _, body in answers]
    assert {"1", "2"} <= set(versions)
    for _, row, _, body in answers:
        served = np.array(body["predictions"][0]["probabilities"])
        np.testing.assert_allclose(served, expected[body["model_version"]][row], atol=1e-6)
    # Every worker watches the pointer on its own: soon all of them answer with the new version.
    wait_for(lambda: {httpx.get(f"{reloading.url}/metadata", timeout=10).json()["model_version"]
                      for _ in range(10)} == {"2"}, "every worker to serve version 2", timeout=30)
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
    # Each worker tags its log lines ("[entry_service:fluxo:2]"); each warmed up the first model as it started.
    workers = set(re.findall(rf"\[(entry_service:[^\]]+)\] warmed up {re.escape(str(models['1']))} \(champion\)",
                             reloading.log()))
    assert workers
    publish(models["live"], broken)

    def refused_by() -> set[str]:
        return set(re.findall(r"\[(entry_service:[^\]]+)\] hot reload: .*cannot load it", reloading.log()))

    wait_for(lambda: refused_by() >= workers, "every worker to have had its turn at the broken pointer",
             timeout=30, detail=lambda: reloading.log()[-3000:])
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
    # The fastest run: a request sized from it takes at least that long. A guide for sizing only: what a test
    # asserts never rests on it (the 429 test grows its requests until the limit shows, the 504 and drain
    # tests check the order of events).
    per_instance = float(np.min(timings))
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

    def ask(body: dict) -> httpx.Response:
        return httpx.post(f"{running.url}/predict", json=body, timeout=30)

    # A burst of 3 x MAX_CONCURRENCY requests at once. If the machine answers them faster than they arrive
    # there is no 429 yet: the next round sends bigger ones. However slow the machine, an admitted request
    # waits behind at most MAX_CONCURRENCY - 1 others: 6 x 0.12 s is far inside TIMEOUT_S, so no 504.
    seen: list[list[int]] = []
    for seconds in (0.03, 0.06, 0.12):
        body = {"instances": instances_for(seconds, per_instance)}
        with ThreadPoolExecutor(3 * MAX_CONCURRENCY) as executor:
            responses = list(executor.map(ask, [body] * (3 * MAX_CONCURRENCY)))
        statuses = [r.status_code for r in responses]
        seen.append(statuses)
        assert set(statuses) <= {200, 429}, seen
        assert all("Too many requests" in r.json()["error"] for r in responses if r.status_code == 429)
        if 429 in statuses:
            break
    assert 429 in statuses and statuses.count(200) >= MAX_CONCURRENCY, seen  # the limit, and not below it
    assert httpx.get(f"{running.url}/healthz", timeout=10).status_code == 200


def test_a_request_past_the_timeout_gets_504(slow: tuple[RunningServer, float]) -> None:
    running, per_instance = slow
    started = time.monotonic()
    response = httpx.post(f"{running.url}/predict", json={"instances": instances_for(2.5 * TIMEOUT_S, per_instance)},
                          timeout=60)
    answered = time.monotonic()
    assert response.status_code == 504, response.text
    assert "seconds" in response.json()["error"]
    assert answered - started >= TIMEOUT_S * 0.95  # not before the timeout
    wait_until_idle(running.url)  # the abandoned run holds the one worker until it ends
    # The 504 came when the timeout did, not when the run ended: the worker stayed busy well after it.
    assert time.monotonic() - answered > TIMEOUT_S / 4, "the 504 came only when the run ended"


def in_progress(url: str) -> float:
    """Requests the server is working on now, from fluxo's gauge (the scrape itself excluded)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(r"^fluxo_requests_in_progress (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def draining(slow: tuple[RunningServer, float], tmp_path: Path) -> Iterator[RunningServer]:
    """A server of its own for the drain test, which stops it: the slow model, one worker, a timeout far off."""
    running, _ = slow
    env = {**running.env, "FLUXO_TIMEOUT_S": "120", "FLUXO_MAX_CONCURRENCY": "256"}
    with RunningServer(running.model_dir, env, tmp_path / "draining.log") as server:
        yield server


def test_sigterm_drains_requests_in_flight(draining: RunningServer, slow: tuple[RunningServer, float]) -> None:
    _, per_instance = slow
    requests = 5

    # "In flight" means the server is working on them: uvicorn closes connections whose request it has
    # not begun (as any server must, once it stops accepting). So SIGTERM is sent only once every request
    # has begun (the gauge counts requests begun and not yet answered) and none has been answered yet.
    # Where one is answered before the last begins, that round was too short for this machine: it is
    # let finish and the next round's requests are twice as long.
    signalled: float | None = None
    for seconds in (0.2, 0.4, 0.8, 1.6):
        body = {"instances": instances_for(seconds, per_instance)}
        finished: list[tuple[float, int]] = []

        def ask(_: int) -> None:
            response = httpx.post(f"{draining.url}/predict", json=body, timeout=120)
            finished.append((time.monotonic(), response.status_code))

        with ThreadPoolExecutor(requests) as executor:
            futures = [executor.submit(ask, i) for i in range(requests)]

            def all_begun_or_one_answered() -> bool:
                raise_if_any_failed(futures)
                return bool(finished) or in_progress(draining.url) >= requests

            wait_for(all_begun_or_one_answered, "the requests to begin", timeout=60)
            if not finished:
                signalled = time.monotonic()
                draining.process.send_signal(signal.SIGTERM)
            errors = exceptions_of(futures)
        assert not errors, errors  # none reset: every request begun before SIGTERM was answered
        assert [status for _, status in finished] == [200] * requests
        if signalled is not None:
            break
    assert signalled is not None, "no round had every request in progress at once"
    assert any(at > signalled for at, _ in finished), "every request ended before SIGTERM: nothing was drained"
    assert draining.process.wait(timeout=30) == 0, draining.log()[-3000:]  # a clean exit, as an orchestrator sees it
    log = draining.log()
    assert "Completed cleanup hook: shutdown" in log and "Traceback" not in log, log[-3000:]
    with pytest.raises(httpx.TransportError):  # and the port is closed
        httpx.post(f"{draining.url}/predict", json=body, timeout=5)
