"""serving/ through real HTTP: one `bentoml serve` on a free loopback port for the whole module."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from serving import ServingError
from serving.client import fetch_metadata, main, predict
from serving.runtime import CPU, CUDA, cuda_device_present, softmax
from serving.launch import start_server, stop_server, wait_ready
from tests.serving_fixtures import build_model_dir, free_port, metadata_for, sample_instances

pytestmark = pytest.mark.e2e

MAX_INSTANCES = 50
MAX_BATCH = 8  # small, so concurrent requests get split across model runs


@dataclass
class Server:
    url: str
    model_dir: Path
    session: ort.InferenceSession

    def expected(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities straight from onnxruntime, the reference the service must match."""
        return softmax(self.session.run(None, {"input": batch})[0])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serving")
    model_dir = build_model_dir(root / "model")
    port = free_port()
    env = {
        "FLUXO_MAX_INSTANCES": str(MAX_INSTANCES),
        "FLUXO_MAX_BATCH_SIZE": str(MAX_BATCH),
        # Load shedding (503 past the latency budget) is tuning, not correctness; a
        # generous budget keeps these tests steady on a busy 2-core CI box.
        "FLUXO_MAX_LATENCY_MS": "5000",
        "FLUXO_ORT_THREADS": "1",
    }
    log_path = root / "server.log"
    with log_path.open("wb") as log_file:
        process = start_server(model_dir, port, env=env, log_file=log_file)
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                wait_ready(url, timeout=60, process=process)
            except ServingError as error:
                raise RuntimeError(f"{error}\n--- server log ---\n{log_path.read_text()[-4000:]}") from error
            session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=[CPU])
            yield Server(url, model_dir, session)
        finally:
            stop_server(process)


def post(server: Server, body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", json=body, timeout=30)


@pytest.mark.parametrize("n", [1, 3, MAX_BATCH, 40])
def test_predict_matches_onnxruntime(server: Server, n: int) -> None:
    """Up to MAX_BATCH instances go through the batcher; larger requests run whole."""
    batch = sample_instances(n, seed=n)
    response = post(server, {"instances": batch.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = server.expected(batch)
    served = np.array([p["probabilities"] for p in body["predictions"]])
    np.testing.assert_allclose(served, expected, atol=1e-6)
    assert [p["label"] for p in body["predictions"]] == [str(i) for i in expected.argmax(1)]
    assert body["model_version"] == "3"


def _batch_histogram(server: Server) -> tuple[float, float]:
    """(requests, model runs) so far, from BentoML's adaptive batch size histogram."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    total = {}
    for kind in ("sum", "count"):
        match = re.search(rf'^bentoml_service_adaptive_batch_size_{kind}\{{[^}}]*method_name="predict"[^}}]*\}} (\S+)$',
                          text, re.M)
        total[kind] = float(match.group(1)) if match else 0.0
    return total["sum"], total["count"]


def test_concurrent_requests_get_their_own_answers_in_shared_batches(server: Server) -> None:
    """32 clients, 1 to 5 instances each: batches merge and split requests, answers must not mix."""
    pool = sample_instances(64, seed=7)
    expected = server.expected(pool)
    before = _batch_histogram(server)

    def ask(client_index: int) -> list[tuple[slice, np.ndarray]]:
        answers = []
        with httpx.Client(timeout=30) as client:
            for round_ in range(4):
                start = (client_index + 11 * round_) % 59
                rows = slice(start, start + 1 + (client_index + round_) % 5)
                response = client.post(f"{server.url}/predict", json={"instances": pool[rows].tolist()})
                assert response.status_code == 200, response.text
                answers.append((rows, np.array([p["probabilities"] for p in response.json()["predictions"]])))
        return answers

    with ThreadPoolExecutor(max_workers=32) as executor:
        results = [answer for answers in executor.map(ask, range(32)) for answer in answers]
    for rows, answer in results:
        np.testing.assert_allclose(answer, expected[rows], atol=1e-6)

    after = _batch_histogram(server)
    jobs, runs = after[0] - before[0], after[1] - before[1]
    assert jobs >= len(results), "the model service did not see every request"
    assert runs < jobs, f"no adaptive batching: {jobs:.0f} requests took {runs:.0f} model runs"


FLAT = [0.0] * 64
ROW = [0.0] * 8


def _grid_with(value: str) -> str:
    """A (1, 8, 8) instance as JSON text whose first element is ``value`` verbatim (NaN, Infinity...)."""
    return "[[[" + ",".join([value] + ["0"] * 7) + "]" + ",[0,0,0,0,0,0,0,0]" * 7 + "]]"


MALFORMED = {
    "same-count-wrong-shape": (json.dumps({"instances": [FLAT]}), "instances[0] has shape (64,), expected (1, 8, 8)"),
    "wrong-shape": (json.dumps({"instances": [[ROW] * 8]}), "instances[0] has shape (8, 8), expected (1, 8, 8)"),
    "nan": ('{"instances": [' + _grid_with("NaN") + "]}", "instances[0][0][0][0] is NaN"),
    "infinity": ('{"instances": [' + _grid_with("Infinity") + "]}", "is Infinity"),
    "overflow": ('{"instances": [' + _grid_with("1e999") + "]}", "is Infinity"),
    "string": ('{"instances": [' + _grid_with('"3"') + "]}", "is a string"),
    "bool": ('{"instances": [' + _grid_with("true") + "]}", "is a boolean"),
    "null": ('{"instances": [' + _grid_with("null") + "]}", "is null"),
    "empty": ('{"instances": []}', "instances is empty"),
    "too-many": (json.dumps({"instances": [[[ROW] * 8]] * (MAX_INSTANCES + 1)}), f"limit of {MAX_INSTANCES}"),
    "missing-key": ('{"inputs": [[1]]}', "Field required"),
    "instances-not-list": ('{"instances": 5}', "Input should be a valid"),
    "body-is-a-list": ("[1, 2]", "Input should be an object"),
    "not-json": ("this is not json", "Invalid JSON"),
    "empty-body": ("", "Field required"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_client_mistakes_answer_400_with_the_problem(server: Server, case: str) -> None:
    body, message = MALFORMED[case]
    response = httpx.post(
        f"{server.url}/predict", content=body.encode(), headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 400, response.text
    assert message in response.text
    assert "error" in response.json()


@pytest.mark.parametrize(
    "content_type", [None, "application/x-www-form-urlencoded", "text/plain", "multipart/form-data"]
)
def test_body_is_read_as_json_whatever_the_content_type(server: Server, content_type: str | None) -> None:
    """`curl -d` sends a form Content-Type; BentoML would parse it as a form (or answer 500)."""
    headers = {"Content-Type": content_type} if content_type else {}
    good = json.dumps({"instances": [[[ROW] * 8]]}).encode()
    response = httpx.post(f"{server.url}/predict", content=good, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    bad = httpx.post(f"{server.url}/predict", content=b"junk", headers=headers, timeout=30)
    assert bad.status_code == 400, bad.text


def test_metadata_describes_the_served_model(server: Server) -> None:
    response = httpx.get(f"{server.url}/metadata", timeout=10)
    assert response.status_code == 200
    body = response.json()
    meta = metadata_for((1, 8, 8), [str(i) for i in range(10)])
    for key in ("model_name", "model_version", "data_version", "input_shape", "labels", "test_metrics"):
        assert body[key] == meta[key], key
    gpu = cuda_device_present() and CUDA in ort.get_available_providers()
    assert body["provider"] == (CUDA if gpu else CPU)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/livez", "/metrics"])
def test_builtin_endpoints(server: Server, path: str) -> None:
    response = httpx.get(f"{server.url}{path}", timeout=10)
    assert response.status_code == 200
    if path == "/metrics":
        assert "bentoml_service_adaptive_batch_size" in response.text


def test_example_client(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert fetch_metadata(server.url)["input_shape"] == [1, 8, 8]
    assert main(["--url", server.url]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["label"] in [str(i) for i in range(10)]
    with pytest.raises(ServingError, match=r"HTTP 400.*has shape \(64,\)"):
        predict([FLAT], server.url)
