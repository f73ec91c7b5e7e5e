"""The model report: its numbers against scikit-learn, its place in MLflow and the model directory,
and the page as a real headless Chromium renders it from a real `bentoml serve`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from pipelines.context import open_run
from pipelines.data.ingest import ingest, version
from pipelines.report.evaluation import bootstrap_intervals, calibration, confident_mistakes, evaluate, softmax
from pipelines.registry.publish import model_root
from pipelines.release import export_run
from pipelines.train.run import train
from serving.contract import REPORT_FILE
from tests.conftest import make_settings, need, store_client
from tests.serving_fixtures import RunningServer

SECTIONS = ["Model", "Test metrics", "Against the champion", "Per class", "Confusion matrix", "Calibration",
            "Most confident mistakes", "Learning curves", "Parity", "Latency", "Variants", "Data"]


# --- the numbers ---------------------------------------------------------------------------


def test_bootstrap_point_values_are_scikit_learns_and_the_interval_holds_them() -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 4, 300)
    predicted = np.where(rng.random(300) < 0.7, truth, rng.integers(0, 4, 300))
    predicted[predicted == 3] = 2  # class 3 is never predicted: precision 0 by scikit-learn's zero_division=0
    intervals = bootstrap_intervals(truth, predicted, classes=4, resamples=500)
    precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, labels=range(4), average="macro",
                                                               zero_division=0)
    expected = {"accuracy": accuracy_score(truth, predicted), "precision_macro": precision,
                "recall_macro": recall, "f1_macro": f1}
    for name, value in expected.items():
        interval = intervals[name]
        assert interval.value == pytest.approx(value, abs=1e-12), name
        assert interval.low < value < interval.high, name
        assert 0.02 < interval.high - interval.low < 0.25, name  # about ±2 standard errors on 300 samples


def test_the_interval_narrows_with_more_samples() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 5000):
        truth = rng.integers(0, 10, n)
        predicted = np.where(rng.random(n) < 0.9, truth, rng.integers(0, 10, n))
        accuracy = bootstrap_intervals(truth, predicted, classes=10, resamples=400)["accuracy"]
        widths.append(accuracy.high - accuracy.low)
    assert widths[1] < widths[0] / 3  # the width shrinks as 1/sqrt(n): 5 times narrower here


def test_expected_calibration_error_is_zero_when_calibrated_and_the_gap_when_not() -> None:
    n = 1000
    probabilities = np.tile([0.9, 0.1], (n, 1))
    calibrated = np.where(np.arange(n) < 900, 0, 1)  # right 90% of the time at confidence 0.9
    overconfident = np.where(np.arange(n) < 500, 0, 1)  # right 50% of the time at confidence 0.9
    assert calibration(calibrated, probabilities).ece == pytest.approx(0.0, abs=1e-9)
    result = calibration(overconfident, probabilities)
    assert result.ece == pytest.approx(0.4)
    assert sum(result.bin_count) == n and result.bin_accuracy[13] == pytest.approx(0.5)  # 0.9 is in (0.867, 0.933]


def test_confident_mistakes_come_most_confident_first() -> None:
    logits = np.array([[5.0, 0.0], [0.0, 1.0], [0.0, 9.0], [3.0, 0.0], [0.0, 2.0]])
    result = evaluate(np.array([1, 1, 0, 0, 0]), softmax(logits), classes=2)
    assert confident_mistakes(result) == [2, 0, 4]
    assert result.per_class[0]["support"] == 3 and result.confusion.sum() == 5


# --- export, MLflow and the registry ----------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory):
    """Two digits models of one name: v1 the champion, v2 trained with another seed and compared with it."""
    root = tmp_path_factory.mktemp("report") / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    with pytest.MonkeyPatch.context() as env:  # set up before conftest's per-test isolation: clear it here
        for key in [k for k in os.environ if k.startswith("FLUXO_") or k == "MLFLOW_TRACKING_URI"]:
            env.delenv(key)
        settings = make_settings(root, "train.epochs=3")
        ingest(root, settings.data)
        data_version = version(root, settings.data)
        exports = []
        for seed in (0, 1):
            seeded = make_settings(root, "train.epochs=3", f"train.seed={seed}")
            result = train(open_run(root, seeded), data_version)
            exports.append(export_run(open_run(root, seeded), result.run_id, result.checkpoint))
    return root, settings, exports


def test_export_writes_the_report_into_the_model_directory_the_run_and_the_registry(digits, tmp_path: Path) -> None:
    root, settings, (first, second) = digits
    client = store_client(root.parent / "mlflow.db")
    for exported in (first, second):
        assert (exported.export_dir / REPORT_FILE).is_file()
        assert "export/report.html" in {a.path for a in client.list_artifacts(exported.run_id, "export")}
        metrics = client.get_run(exported.run_id).data.metrics
        assert 0 <= metrics["report_test_ece"] < 1
        assert metrics["report_test_accuracy_ci95_low"] <= metrics["served_test_accuracy"]
        assert metrics["served_test_accuracy"] <= metrics["report_test_accuracy_ci95_high"]
        assert metrics["report_latency_ms_batch1"] > 0 and metrics["report_latency_ms_batch32"] > 0
    # The registered version carries it, so a replica that downloads the version can serve it.
    import mlflow

    mlflow.set_registry_uri(f"sqlite:///{root.parent / 'mlflow.db'}")
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/fluxo-digits/2", dst_path=str(tmp_path)))
    assert (downloaded / REPORT_FILE).read_bytes() == (second.export_dir / REPORT_FILE).read_bytes()


def test_the_report_shows_the_served_numbers_and_the_champion_it_was_compared_with(digits) -> None:
    root, _, (first, second) = digits
    client = store_client(root.parent / "mlflow.db")
    page = (second.export_dir / REPORT_FILE).read_text()
    accuracy = client.get_run(second.run_id).data.metrics["served_test_accuracy"]
    assert f"{accuracy * 100:.2f}%" in page
    assert "champion v1" in page and first.model_version == "1"
    assert (first.export_dir / REPORT_FILE).read_text().count("it is the first of its name") == 1
    assert first.promotion.alias == "champion"
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in page


# --- GET /report in a real browser -------------------------------------------------------------


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright  # noqa: F401
    except ImportError:
        path = None
    need(path, "chromium and the playwright package (`make setup` installs both)")
    return path


@pytest.mark.e2e
def test_the_served_report_renders_in_a_headless_browser_with_every_image_and_no_errors(digits, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    root, settings, (first, _) = digits
    champion_root = model_root(root, settings, "fluxo-digits", "champion")
    with RunningServer(champion_root, {}, tmp_path / "server.log") as server:
        response = httpx.get(f"{server.url}/report", timeout=10)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert response.content == (first.export_dir / REPORT_FILE).read_bytes()  # the live champion's
        missing = httpx.get(f"{server.url}/report", params={"variant": "challenger"}, timeout=10)
        assert missing.status_code == 404 and "no challenger" in missing.json()["error"]
        assert httpx.get(f"{server.url}/report", params={"variant": "x"}, timeout=10).status_code == 400

        errors: list[str] = []
        requests: list[str] = []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.on("requestfailed", lambda request: errors.append(f"failed: {request.url}"))
                page.on("request", lambda request: requests.append(request.url))
                answer = page.goto(f"{server.url}/report", wait_until="load")
                assert answer is not None and answer.ok
                images = page.evaluate(
                    "Array.from(document.images).map(i => ({ok: i.complete && i.naturalWidth > 0, alt: i.alt}))")
                headings = page.eval_on_selector_all("h2", "nodes => nodes.map(n => n.textContent)")
                title = page.title()
                screenshot = tmp_path / "report.png"
                page.screenshot(path=str(screenshot), full_page=True)
            finally:
                browser.close()
    assert errors == []
    assert requests == [f"{server.url}/report"]  # everything is inline: nothing else is fetched
    assert headings == SECTIONS
    assert title.startswith("fluxo-digits")
    assert len(images) >= 6 and all(i["ok"] for i in images), [i["alt"] for i in images if not i["ok"]]
    assert screenshot.stat().st_size > 50_000
    if os.environ.get("REPORT_SCREENSHOT_PATH"):
        shutil.copy(screenshot, os.environ["REPORT_SCREENSHOT_PATH"])
