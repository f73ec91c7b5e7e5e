"""serving/ through real HTTP: one `bentoml serve` on a free loopback port for the whole module.

The server runs with an API key, small limits and small batches, so every
limit and the batching path are reached by small requests.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
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
from tests.serving_fixtures import (
    DIGIT_LABELS,
    RunningServer,
    build_model_dir,
    digit_png,
    metadata_for,
    sample_instances,
    scrape,
)

pytestmark = pytest.mark.e2e

MAX_INSTANCES = 50
MAX_BATCH = 8  # small, so concurrent requests get merged and split across model runs
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "fluxo"  # metadata_for's model_name


@dataclass
class Server:
    url: str
    model_dir: Path
    session: ort.InferenceSession
    running: RunningServer

    def expected(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities straight from onnxruntime, the reference the service must match."""
        return softmax(self.session.run(None, {"input": np.asarray(batch, dtype=np.float32)})[0])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serving")
    model_dir = build_model_dir(root / "model")
    env = {
        "FLUXO_MAX_INSTANCES": str(MAX_INSTANCES),
        "FLUXO_MAX_BATCH_SIZE": str(MAX_BATCH),
        "FLUXO_API_KEY": KEY,
        "FLUXO_TIMEOUT_S": "60",  # a busy 2-core CI box must not turn slow answers into 504s here
    }
    with RunningServer(model_dir, env, root / "server.log") as running:
        session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=[CPU])
        yield Server(running.url, model_dir, session, running)


def post(server: Server, path: str, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers={**AUTH, **(headers or {})}, timeout=30)


def v2_body(batch: np.ndarray, flat: bool = True) -> dict:
    data = batch.ravel().tolist() if flat else batch.tolist()
    return {"id": "req-1", "inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32", "data": data}]}


def probabilities(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    if "outputs" in body:
        out = {o["name"]: o for o in body["outputs"]}["probabilities"]
        return np.array(out["data"], dtype=np.float64).reshape(out["shape"])
    return np.array([p["probabilities"] for p in body["predictions"]])


# --- answers -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, MAX_BATCH, 40])
def test_predict_matches_onnxruntime(server: Server, n: int) -> None:
    """Up to MAX_BATCH instances share the batcher; larger requests run whole."""
    batch = sample_instances(n, seed=n)
    response = post(server, "/predict", {"instances": batch.tolist()})
    expected = server.expected(batch)
    np.testing.assert_allclose(probabilities(response), expected, atol=1e-6)
    body = response.json()
    assert [p["label"] for p in body["predictions"]] == [str(i) for i in expected.argmax(1)]
    assert body["model_version"] == "3"


def test_json_image_and_v2_give_the_same_answer(server: Server) -> None:
    """One digit sent three ways: as numbers, as a PNG/JPEG of the bitmap it came from, and as a v2 tensor."""
    counts = sample_instances(2, seed=11)  # integers 0..16, as the digits dataset stores them
    via_json = probabilities(post(server, "/predict", {"instances": counts.tolist()}))
    files = [("file", ("a.png", digit_png(counts[0]), "image/png")), ("file", ("b.png", digit_png(counts[1]), "image/png"))]
    via_image = probabilities(httpx.post(f"{server.url}/predict/image", files=files, headers=AUTH, timeout=30))
    raw = httpx.post(f"{server.url}/predict/image", content=digit_png(counts[0]),
                     headers={**AUTH, "Content-Type": "image/png"}, timeout=30)
    via_v2 = probabilities(post(server, f"/v2/models/{MODEL}/infer", v2_body(counts)))
    via_v2_nested = probabilities(post(server, f"/v2/models/{MODEL}/versions/3/infer", v2_body(counts, flat=False)))
    expected = server.expected(counts)
    for answer in (via_json, via_image, via_v2, via_v2_nested):
        np.testing.assert_allclose(answer, expected, atol=1e-5)
    np.testing.assert_allclose(probabilities(raw), expected[:1], atol=1e-5)


def test_a_white_on_black_upload_gets_the_answer_of_its_black_on_white_original(server: Server) -> None:
    """MNIST files are white ink on black; the digits recipe expects black on white: the service flips them."""
    import io

    from PIL import Image, ImageOps

    counts = sample_instances(2, seed=8)
    counts[:, :, [0, -1], :] = 0
    counts[:, :, :, [0, -1]] = 0  # a digit inside its frame, as drawings are
    inverted = []
    for row in counts:
        buffer = io.BytesIO()
        ImageOps.invert(Image.open(io.BytesIO(digit_png(row))).convert("L")).save(buffer, format="PNG")
        inverted.append(("file", (f"{len(inverted)}.png", buffer.getvalue(), "image/png")))
    answer = httpx.post(f"{server.url}/predict/image", files=inverted, headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(probabilities(answer), server.expected(counts), atol=1e-5)


def test_jpeg_upload_is_decoded_like_training_images(server: Server) -> None:
    """JPEG is lossy, so the answer is close to, not equal to, the PNG's; the label agrees."""
    import io

    import onnx
    from onnx import numpy_helper
    from PIL import Image

    # A faint digit (0..8 ink pixels a block): the module's model is then unsure enough (top probability 0.9999,
    # not 1.0) that what JPEG loses shows in the answer.
    counts = np.floor(sample_instances(1, seed=32) / 2)
    jpeg = digit_png(counts, "JPEG")
    png = httpx.post(f"{server.url}/predict/image", files={"file": ("d.png", digit_png(counts), "image/png")},
                     headers=AUTH, timeout=30)
    response = httpx.post(f"{server.url}/predict/image", files={"file": ("d.jpg", jpeg, "image/jpeg")},
                          headers=AUTH, timeout=30)
    # The oracle, computed here: ink counted in each 4x4 block of the decoded JPEG, as scikit-learn made digits.
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.float64)
    decoded = ((255.0 - pixels) / 255.0).reshape(8, 4, 8, 4).sum(axis=(1, 3))[None, None]
    assert 0 < np.abs(decoded - counts).max() < 0.5  # lossy (0.34 at PIL's default quality), under half a pixel
    np.testing.assert_allclose(probabilities(response), server.expected(decoded), atol=1e-5)

    # The label is the PNG's. The model is linear, so JPEG's loss moves logit k by exactly shift[k]; the PNG's
    # winner beats every other class by more than twice the largest shift, so no such JPEG can flip it.
    graph = onnx.load(str(server.model_dir / "model.onnx")).graph
    weight = next(numpy_helper.to_array(t) for t in graph.initializer if t.name == "weight")
    shift = np.abs((decoded - counts).reshape(-1) @ weight).max()
    logits = server.session.run(None, {"input": counts.astype(np.float32)})[0][0]
    top = int(logits.argmax())
    gaps = np.delete(logits[top] - logits, top)
    assert gaps.min() > 2 * shift, (gaps.min(), shift)
    labels = [[p["label"] for p in r.json()["predictions"]] for r in (response, png)]
    assert labels == [[str(top)], [str(top)]]
    # And the probabilities are as close as that allows: the winner keeps at least 1 / (1 + sum e^-(gap - 2 shift))
    # in both answers, so no probability moves by more than the rest.
    tolerance = 1 - 1 / (1 + np.exp(-(gaps - 2 * shift)).sum())
    assert tolerance < 0.1
    np.testing.assert_allclose(probabilities(response), probabilities(png), atol=tolerance)
    assert not np.allclose(probabilities(response), probabilities(png), atol=1e-5)  # the JPEG's loss does show


def test_v2_response_follows_the_protocol(server: Server) -> None:
    batch = sample_instances(3, seed=3)
    body = post(server, f"/v2/models/{MODEL}/infer", v2_body(batch)).json()
    assert body["model_name"] == MODEL and body["model_version"] == "3" and body["id"] == "req-1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["probabilities"]["datatype"] == "FP32" and outputs["probabilities"]["shape"] == [3, 10]
    assert outputs["label"] == {"name": "label", "datatype": "BYTES", "shape": [3],
                                "data": [str(i) for i in server.expected(batch).argmax(1)]}
    only_labels = post(server, f"/v2/models/{MODEL}/infer", {**v2_body(batch), "outputs": [{"name": "label"}]}).json()
    assert [o["name"] for o in only_labels["outputs"]] == ["label"]


def _batch_counters(server: Server) -> tuple[float, float]:
    """(requests merged into model runs, model runs) so far, from fluxo_batch_requests."""
    text = scrape(server.url)
    total = {}
    for kind in ("sum", "count"):
        match = re.search(rf"^fluxo_batch_requests_{kind} (\S+)$", text, re.M)
        total[kind] = float(match.group(1)) if match else 0.0
    return total["sum"], total["count"]


def test_concurrent_clients_get_their_own_answers(server: Server) -> None:
    """32 clients, 1 to 5 instances each, over all three routes: batches merge requests, answers never mix."""
    pool = sample_instances(64, seed=7)
    expected = server.expected(pool)
    before = _batch_counters(server)

    def ask(client_index: int) -> list[tuple[slice, np.ndarray]]:
        answers = []
        with httpx.Client(timeout=30, headers=AUTH) as client:
            for round_ in range(6):
                start = (client_index + 11 * round_) % 59
                rows = slice(start, start + 1 + (client_index + round_) % 5)
                route = (client_index + round_) % 3
                if route == 0:
                    response = client.post(f"{server.url}/predict", json={"instances": pool[rows].tolist()})
                elif route == 1:
                    response = client.post(f"{server.url}/v2/models/{MODEL}/infer", json=v2_body(pool[rows]))
                else:
                    files = [("file", (f"{i}.png", digit_png(x), "image/png")) for i, x in enumerate(pool[rows])]
                    response = client.post(f"{server.url}/predict/image", files=files)
                answers.append((rows, probabilities(response)))
        return answers

    with ThreadPoolExecutor(max_workers=32) as executor:
        results = [answer for answers in executor.map(ask, range(32)) for answer in answers]
    for rows, answer in results:
        np.testing.assert_allclose(answer, expected[rows], atol=1e-5)

    after = _batch_counters(server)
    merged, runs = after[0] - before[0], after[1] - before[1]
    assert merged == len(results), "the batcher did not see every request exactly once"
    assert runs < merged, f"no adaptive batching: {merged:.0f} requests took {runs:.0f} model runs"


# --- client mistakes -----------------------------------------------------------------------

FLAT = [0.0] * 64
ROW = [0.0] * 8
GOOD = [[ROW] * 8]


def _grid_with(value: str) -> str:
    """A (1, 8, 8) instance as JSON text whose first element is ``value`` verbatim (NaN, Infinity...)."""
    return "[[[" + ",".join([value] + ["0"] * 7) + "]" + ",[0,0,0,0,0,0,0,0]" * 7 + "]]"


def _v2(**tensor: object) -> str:
    base = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": FLAT}
    return json.dumps({"inputs": [{**base, **tensor}]})


JSON = "application/json"
PREDICT, IMAGE, INFER = "/predict", "/predict/image", f"/v2/models/{MODEL}/infer"
GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,"
       b"\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")

# case: (route, content type, body, expected status, words the message must contain)
MALFORMED: dict[str, tuple[str, str | None, bytes | str, int, str]] = {
    "wrong-shape": (PREDICT, JSON, json.dumps({"instances": [[ROW] * 8]}), 400,
                    "instances[0] has shape (8, 8), expected (1, 8, 8)"),
    "same-count-wrong-shape": (PREDICT, JSON, json.dumps({"instances": [FLAT]}), 400,
                               "instances[0] has shape (64,), expected (1, 8, 8)"),
    "ragged": (PREDICT, JSON, json.dumps({"instances": [[[ROW] * 7 + [[0.0] * 7]]]}), 400, "has 7 items, expected 8"),
    "nan": (PREDICT, JSON, '{"instances": [' + _grid_with("NaN") + "]}", 400, "instances[0][0][0][0] is NaN"),
    "infinity": (PREDICT, JSON, '{"instances": [' + _grid_with("Infinity") + "]}", 400, "is Infinity"),
    "overflow": (PREDICT, JSON, '{"instances": [' + _grid_with("1e999") + "]}", 400, "is Infinity"),
    "float32-overflow": (PREDICT, JSON, '{"instances": [' + _grid_with("1e39") + "]}", 400, "outside the float32 range"),
    "string": (PREDICT, JSON, '{"instances": [' + _grid_with('"3"') + "]}", 400, "is a string"),
    "bool": (PREDICT, JSON, '{"instances": [' + _grid_with("true") + "]}", 400, "is a boolean"),
    "null": (PREDICT, JSON, '{"instances": [' + _grid_with("null") + "]}", 400, "is null"),
    "empty-instances": (PREDICT, JSON, '{"instances": []}', 400, "instances is empty"),
    "too-many-instances": (PREDICT, JSON, json.dumps({"instances": [GOOD] * (MAX_INSTANCES + 1)}), 413,
                           f"limit of {MAX_INSTANCES}"),
    "10MB-body": (PREDICT, JSON, b'{"instances": [' + b" " * (10 * 1024 * 1024) + b"]}", 413, "FLUXO_MAX_BODY_BYTES"),
    "wrong-content-type": (PREDICT, "text/plain", json.dumps({"instances": [GOOD]}), 415, "application/json"),
    "form-content-type": (PREDICT, "application/x-www-form-urlencoded", json.dumps({"instances": [GOOD]}), 415,
                          "Content-Type"),
    "missing-key": (PREDICT, JSON, '{"inputs": [[1]]}', 400, 'no "instances"'),
    "instances-not-list": (PREDICT, JSON, '{"instances": 5}', 400, "instances must be a list"),
    "body-is-a-list": (PREDICT, JSON, "[1, 2]", 400, "must be a JSON object"),
    "not-json": (PREDICT, JSON, "this is not json", 400, "not valid JSON"),
    "empty-body": (PREDICT, JSON, "", 400, "body is empty"),
    "deep-nesting": (PREDICT, JSON, "[" * 100_000 + "]" * 100_000, 400, "not valid JSON"),
    "corrupt-image": (IMAGE, "multipart", b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, 400, "PNG or JPEG"),
    "truncated-png": (IMAGE, "multipart", digit_png(np.full(64, 9))[:60], 400, "file 'digit.png'"),
    "gif-image": (IMAGE, "multipart", GIF, 415, "GIF images are not accepted"),
    "empty-image": (IMAGE, "multipart", b"", 400, "the file is empty"),
    "image-as-json": (IMAGE, JSON, json.dumps({"instances": [GOOD]}), 415, "multipart/form-data"),
    "multipart-without-boundary": (IMAGE, "multipart/form-data", b"xx", 400, "malformed multipart"),
    "v2-wrong-datatype": (INFER, JSON, _v2(datatype="FP64"), 400, "inputs[0].datatype is 'FP64'"),
    "v2-wrong-shape-same-count": (INFER, JSON, _v2(shape=[1, 64]), 400, "inputs[0].shape is [1, 64]"),
    "v2-data-count": (INFER, JSON, _v2(data=FLAT[:-1]), 400, "has 63 values"),
    "v2-nan": (INFER, JSON, _v2(data=[float("nan")] + FLAT[1:]), 400, "inputs[0].data[0] is NaN"),
    "v2-string": (INFER, JSON, _v2(data=["1"] + FLAT[1:]), 400, "inputs[0].data[0] is a string"),
    "v2-wrong-input-name": (INFER, JSON, _v2(name="pixels"), 400, "named 'input'"),
    "v2-two-tensors": (INFER, JSON, json.dumps({"inputs": [{}, {}]}), 400, "the model's input tensor (and, for a model"),
    "v2-unknown-output": (INFER, JSON, json.dumps({**json.loads(_v2()), "outputs": [{"name": "logits"}]}), 400,
                          "outputs[0].name is 'logits'"),
    "v2-too-many": (INFER, JSON, _v2(shape=[MAX_INSTANCES + 1, 1, 8, 8], data=FLAT * (MAX_INSTANCES + 1)), 413,
                    f"limit of {MAX_INSTANCES}"),
    "v2-binary-without-header-length": (INFER, "application/octet-stream", b"\x00" * 256, 415,
                                        "Inference-Header-Content-Length"),
    "v2-unknown-model": ("/v2/models/nope/infer", JSON, _v2(), 404, "unknown model 'nope'"),
    "v2-unknown-version": (f"/v2/models/{MODEL}/versions/9/infer", JSON, _v2(), 404, "no version '9'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_client_mistakes_answer_4xx_with_the_problem(server: Server, case: str) -> None:
    route, content_type, body, status, message = MALFORMED[case]
    payload = body.encode() if isinstance(body, str) else body
    if content_type == "multipart":
        response = httpx.post(f"{server.url}{route}", files={"file": ("digit.png", payload, "image/png")},
                              headers=AUTH, timeout=60)
    else:
        headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
        response = httpx.post(f"{server.url}{route}", content=payload, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    assert message in response.json()["error"], response.text


def test_missing_content_type_is_read_as_json(server: Server) -> None:
    response = httpx.post(f"{server.url}/predict", content=json.dumps({"instances": [GOOD]}).encode(),
                          headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text


def test_chunked_body_over_the_limit_is_refused(server: Server) -> None:
    """No Content-Length to go by: the limit is enforced while reading."""

    def chunks() -> Iterator[bytes]:
        yield b'{"instances": ['
        for _ in range(5 * 1024):
            yield b" " * 1024
        yield b"]}"

    response = httpx.post(f"{server.url}/predict", content=chunks(), headers={**AUTH, "Content-Type": JSON}, timeout=60)
    assert response.status_code == 413, response.text


def test_tritons_own_client_works_with_its_defaults_and_with_json(server: Server, tmp_path: Path) -> None:
    """NVIDIA's tritonclient (HTTP): health, metadata, and inference with binary tensors (its default)
    and with JSON tensors, each giving /predict's answer."""
    batch = sample_instances(5, seed=11)
    np.save(tmp_path / "batch.npy", batch)
    script = Path(__file__).with_name("triton_client_check.py")
    address = server.url.removeprefix("http://")
    run = subprocess.run([sys.executable, str(script), address, MODEL, KEY, str(tmp_path / "batch.npy")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    failed = {name: check for name, check in report.items() if not check["ok"]}
    assert not failed, failed
    assert all(report[name]["value"] is True for name in ("server live", "server ready", "model ready"))
    assert "binary_tensor_data" in report["server metadata"]["value"]["extensions"]
    assert report["model metadata"]["value"]["inputs"][0]["name"] == "input"
    reference = probabilities(post(server, "/predict", {"instances": batch.tolist()}))
    for mode in ("infer, binary tensors", "infer, JSON tensors"):
        served, labels = report[mode]["value"]
        np.testing.assert_allclose(np.array(served), reference, atol=1e-6, err_msg=mode)
        assert labels == [DIGIT_LABELS[i] for i in reference.argmax(axis=1)], mode


# --- API key -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [PREDICT, IMAGE, INFER])
def test_prediction_routes_need_the_api_key(server: Server, path: str) -> None:
    missing = httpx.post(f"{server.url}{path}", json={"instances": [GOOD]}, timeout=10)
    assert missing.status_code == 401 and "API key" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(f"{server.url}{path}", json={"instances": [GOOD]}, headers={"X-API-Key": "nope"}, timeout=10)
    assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]


def test_both_key_headers_work(server: Server) -> None:
    for headers in (AUTH, {"X-API-Key": KEY}):
        response = httpx.post(f"{server.url}/predict", json={"instances": [GOOD]}, headers=headers, timeout=10)
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "path", ["/healthz", "/livez", "/readyz", "/metrics", "/metadata", "/v2", "/v2/health/live", "/v2/health/ready",
             f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/versions/3", "/openapi.json"],
)
def test_health_metadata_and_metrics_stay_open(server: Server, path: str) -> None:
    response = httpx.get(f"{server.url}{path}", timeout=10)
    assert response.status_code == 200, response.text


def test_docs_is_our_swagger_ui_with_its_files_served_locally(server: Server) -> None:
    """Through BentoML's mount, /docs is the app's page, and everything it loads comes from the server."""
    page = httpx.get(f"{server.url}/docs", timeout=10)
    assert page.status_code == 200 and "<title>fluxo - Swagger UI</title>" in page.text
    assert not re.findall(r"https?://", page.text), "the page must load nothing from outside the server"
    paths = re.findall(r'(?:src|href)="(/[^"]+)"', page.text)
    assert len(paths) == 3  # swagger-ui-bundle.js, swagger-ui.css, the favicon
    for path in [*paths, "/openapi.json"]:
        assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 200, path


def test_lengths_for_a_model_that_takes_none_is_a_400(server: Server) -> None:
    body = v2_body(sample_instances(2, seed=4))
    body["inputs"].append({"name": "lengths", "shape": [2], "datatype": "INT64", "data": [8, 8]})
    answer = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, headers=AUTH, timeout=10)
    assert answer.status_code == 400 and "takes no lengths" in answer.json()["error"]
    assert httpx.get(f"{server.url}/metadata", timeout=10).json()["takes_lengths"] is False


def test_a_model_without_a_report_answers_404_with_the_fix_and_an_unknown_variant_400(server: Server) -> None:
    keyless = httpx.get(f"{server.url}/report", timeout=10)  # it shows test samples: keyed like predictions
    assert keyless.status_code == 401 and keyless.headers["www-authenticate"] == "Bearer"
    missing = httpx.get(f"{server.url}/report", headers=AUTH, timeout=10)
    assert missing.status_code == 404
    assert "has no report" in missing.json()["error"] and "fluxo export --run-id" in missing.json()["error"]
    unknown = httpx.get(f"{server.url}/report", params={"variant": "shadow"}, headers=AUTH, timeout=10)
    assert unknown.status_code == 400 and "'champion'" in unknown.json()["error"]


# --- metadata, protocol routes, metrics ----------------------------------------------------


def test_metadata_describes_the_served_model(server: Server) -> None:
    body = httpx.get(f"{server.url}/metadata", timeout=10).json()
    meta = metadata_for((1, 8, 8), DIGIT_LABELS)
    for key in ("model_name", "model_version", "data_version", "input_shape", "labels", "test_metrics"):
        assert body[key] == meta[key], key
    gpu = cuda_device_present() and CUDA in ort.get_available_providers()
    assert body["provider"] == (CUDA if gpu else CPU)
    assert body["image"] == {"mode": "L", "height": 8, "width": 8, "resample": "box", "invert": True,
                             "range": [0.0, 16.0]}
    assert f"on {body['provider']}" in server.running.log(), "the provider in use is logged at start"


def test_v2_metadata_routes(server: Server) -> None:
    model = httpx.get(f"{server.url}/v2/models/{MODEL}", timeout=10).json()
    assert model == {
        "name": MODEL, "versions": ["3"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}],
    }
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/ready", timeout=10).json()["ready"] is True
    assert httpx.get(f"{server.url}/v2/models/other", timeout=10).status_code == 404
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/1/ready", timeout=10).status_code == 404


def test_metrics_per_route_batch_sizes_and_model_version(server: Server) -> None:
    post(server, "/predict", {"instances": [GOOD]})
    post(server, "/predict", {"instances": []})
    post(server, f"/v2/models/{MODEL}/infer", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                                          "data": np.asarray(GOOD, dtype=np.float32).ravel().tolist()}]})
    text = scrape(server.url)
    assert re.search(r'^fluxo_requests_total\{method="POST",route="/predict",status="200"\} [1-9]', text, re.M)
    assert re.search(r'^fluxo_requests_total\{method="POST",route="/predict",status="400"\} [1-9]', text, re.M)
    assert re.search(r'^fluxo_request_duration_seconds_count\{method="POST",route="/predict"\} [1-9]', text, re.M)
    assert re.search(r'^fluxo_batch_size_bucket\{le="8.0"\} [1-9]', text, re.M)
    assert re.search(r'^fluxo_model_info\{model_name="fluxo",model_version="3",provider="\w+"\} 1.0', text, re.M)
    assert "/v2/models/{model_name}/infer" in text, "routes are labelled by template, not by the raw path"


def test_example_client(server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXO_API_KEY", KEY)
    assert fetch_metadata(server.url)["input_shape"] == [1, 8, 8]
    assert main(["--url", server.url]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["label"] in DIGIT_LABELS
    with pytest.raises(ServingError, match=r"HTTP 400.*has shape \(64,\)"):
        predict([FLAT], server.url)


# --- schemathesis over the OpenAPI document -------------------------------------------------
#
# Every operation of /openapi.json, in three modes: this module's server with its key; the same
# server without it (every request to a route that declares the key must answer 401, whatever
# else is wrong with it); and a server started without FLUXO_API_KEY, where every route's checks
# are reached with no key at all. Each run's requests are read back from its HAR report, so a
# run that silently skipped an operation (a multipart or binary body it could not build) fails.

# make test runs one (11 s each); the other two are slow.
SCHEMATHESIS_MODES = ["with the key", pytest.param("without the key", marks=pytest.mark.slow),
                      pytest.param("on a server without a key", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The module's settings less FLUXO_API_KEY: what a server without a key answers (started once, ~10 s)."""
    root = tmp_path_factory.mktemp("open-serving")
    env = {"FLUXO_MAX_INSTANCES": str(MAX_INSTANCES), "FLUXO_MAX_BATCH_SIZE": str(MAX_BATCH), "FLUXO_TIMEOUT_S": "60"}
    with RunningServer(build_model_dir(root / "model"), env, root / "server.log") as running:
        yield running.url


@dataclass
class SchemathesisRun:
    generated: int
    answers: dict[tuple[str, str], dict[int, int]]
    """(method, path template) of every operation of the document → how often each status answered it."""
    protected: set[tuple[str, str]]
    """The operations whose document declares the API key."""


def _schemathesis(request: pytest.FixtureRequest, mode: str, max_time: int, examples: int,
                  work: Path) -> SchemathesisRun:
    url = request.getfixturevalue("open_server") if mode == "on a server without a key" else (
        request.getfixturevalue("server").url)
    har = work / "requests.har"
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json",
        "--checks", "not_a_server_error", "--max-examples", str(examples), "--max-time", str(max_time),
        "--seed", "7", "--request-timeout", "20", "--workers", "1", "--generation-database", "none",
        "--report", "har", "--report-har-path", str(har),
        *(["--header", f"Authorization: Bearer {KEY}"] if mode == "with the key" else []),
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=max_time + 120, cwd=work)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    generated = re.search(r"(\d+) generated, \d+ passed", result.stdout)
    assert generated, result.stdout[-3000:]
    document = httpx.get(f"{url}/openapi.json", timeout=30).json()
    operations = {(method.upper(), path): bool(op.get("security")) for path, ops in document["paths"].items()
                  for method, op in ops.items()}
    return SchemathesisRun(int(generated.group(1)), _answers(har, operations),
                           {operation for operation, keyed in operations.items() if keyed})


def _answers(har: Path, operations: dict[tuple[str, str], bool]) -> dict[tuple[str, str], dict[int, int]]:
    """Statuses per operation of the requests in ``har``; requests with a method the path lacks are left out."""
    patterns = [(operation, re.compile(re.sub(r"\\\{\w+\\\}", "[^/]*", re.escape(operation[1])) + "$"))
                for operation in operations]
    answers: dict[tuple[str, str], dict[int, int]] = {operation: {} for operation in operations}
    for entry in json.loads(har.read_text())["log"]["entries"]:
        method, path = entry["request"]["method"], httpx.URL(entry["request"]["url"]).raw_path.decode().split("?")[0]
        for (op_method, template), pattern in patterns:
            if op_method == method and pattern.match(path):
                counts = answers[(op_method, template)]
                counts[entry["response"]["status"]] = counts.get(entry["response"]["status"], 0) + 1
                break
    return answers


def _check_run(run: SchemathesisRun, mode: str) -> None:
    missed = [operation for operation, counts in run.answers.items() if not counts]
    assert not missed, f"operations schemathesis never requested: {missed}"
    assert run.protected >= {("POST", "/predict"), ("POST", "/predict/image"), ("POST", "/v2/models/{model_name}/infer")}
    for operation, counts in run.answers.items():
        if mode == "without the key" and operation in run.protected:
            assert set(counts) == {401}, (operation, counts)  # the key is checked before anything else
        else:
            assert 401 not in counts, (operation, counts)


@pytest.mark.parametrize("mode", SCHEMATHESIS_MODES)
def test_schemathesis_finds_no_server_errors(request: pytest.FixtureRequest, mode: str, tmp_path: Path) -> None:
    run = _schemathesis(request, mode, max_time=10, examples=10, work=tmp_path)
    logging.getLogger(__name__).info("schemathesis %s: %d cases generated", mode, run.generated)  # --log-cli-level=INFO
    _check_run(run, mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["with the key", "on a server without a key"])
def test_schemathesis_long_run_finds_no_server_errors(request: pytest.FixtureRequest, mode: str,
                                                      tmp_path: Path) -> None:
    run = _schemathesis(request, mode, max_time=120, examples=200, work=tmp_path)
    logging.getLogger(__name__).info("schemathesis %s: %d cases generated", mode, run.generated)
    _check_run(run, mode)
