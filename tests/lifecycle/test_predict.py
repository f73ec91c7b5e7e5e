"""`fluxo predict`: real model directory, real files, real MLflow store in tmp_path; tiny sizes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from tests.conftest import REPO, SMOKE, store_client
from tests.serving_fixtures import build_model_dir, digit_png, sample_instances


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny (1, 8, 8) digits classifier; its metadata names the digits recipe, so it takes PNGs too."""
    return build_model_dir(tmp_path_factory.mktemp("model") / "m", model_version="7")


def _invoke(project: Path, *args: str):
    stores = project.parent
    result = CliRunner().invoke(app, [
        "predict", *args, "--root", str(project), "--config", str(SMOKE),
        "--set", f"tracking.tracking_uri=sqlite:///{stores / 'mlflow.db'}",
        "--set", f"data.dvc_remote={stores / 'dvc-remote'}",
    ])
    return result


def _predict(project: Path, *args: str) -> dict:
    result = _invoke(project, *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


def _served(model_dir: Path, instances: np.ndarray) -> dict:
    """The service's own answer for ``instances``: POST /predict on the app, in process."""
    import httpx

    from serving import ServingConfig
    from serving.app import create_app
    from serving.server import ModelServer

    service = create_app()
    service.state.server = ModelServer(ServingConfig(model_dir=model_dir, provider="cpu"))

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=service), base_url="http://fluxo") as client:
            return await client.post("/predict", json={"instances": instances.tolist()})

    try:
        answer = asyncio.run(post())
    finally:
        service.state.server.close()
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_npy_predictions_equal_the_runtime_and_the_service_and_the_run_is_recorded(
    project: Path, model_dir: Path
) -> None:
    from serving.runtime import CPU, OnnxModel

    x = sample_instances(300)
    source = project / "batch.npy"
    np.save(source, x)
    out = project / "out" / "preds.parquet"
    summary = _predict(project, str(source), "-o", str(out), "--model", str(model_dir), "--batch-size", "128")
    assert summary["rows"] == 300 and summary["skipped"] == 0 and summary["version"] == "7"
    table = pq.read_table(out).to_pydict()
    assert table["id"] == [str(i) for i in range(300)] and set(table["model_version"]) == {"7"}

    expected = OnnxModel(model_dir, providers=[CPU]).predict_proba(x)
    np.testing.assert_allclose(np.array(table["probabilities"]), expected, rtol=1e-6, atol=1e-7)
    labels = [str(i) for i in expected.argmax(1)]
    assert table["label"] == labels
    np.testing.assert_allclose(table["probability"], expected.max(1), rtol=1e-6)

    served = _served(model_dir, x[:20])
    assert [p["label"] for p in served["predictions"]] == labels[:20]
    np.testing.assert_allclose([p["probabilities"] for p in served["predictions"]], table["probabilities"][:20],
                               rtol=1e-5, atol=1e-6)
    assert served["model_version"] == "7"

    client = store_client(project.parent / "mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="tags.`fluxo.kind` = 'batch-predict'")
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.params["input_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert run.data.params["model_version"] == "7" and run.data.params["data_version"] == "4b1a0000c2.dir"
    assert run.data.metrics["rows"] == 300 and run.data.metrics["rows_skipped"] == 0
    assert "preds.errors.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def _csv_with_bad_rows(path: Path) -> np.ndarray:
    """Ten digit rows (plus the label column, which prediction ignores); row 3 holds NaN, row 5 is short."""
    x = sample_instances(10).reshape(10, 64)
    lines = ["label," + ",".join(f"p{i}" for i in range(64))]
    for i, row in enumerate(x):
        cells = [f"{v:g}" for v in row]
        if i == 3:
            cells[10] = "nan"
        if i == 5:
            cells[-1] = ""
        lines.append(f"{i % 10}," + ",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return x


def test_csv_bad_rows_are_skipped_and_named_with_the_services_reason(project: Path, model_dir: Path) -> None:
    from serving.runtime import CPU, OnnxModel

    source = project / "rows.csv"
    x = _csv_with_bad_rows(source)
    out = project / "rows.parquet"
    summary = _predict(project, str(source), "-o", str(out), "--model", str(model_dir))
    assert summary["rows"] == 8 and summary["skipped"] == 2
    reasons = {e["id"]: e["reason"] for e in summary["skipped_examples"]}
    assert set(reasons) == {"3", "5"}
    assert "NaN" in reasons["3"] and "[0][1][2]" in reasons["3"]  # the service's path to the element
    assert "has 63 values, expected 64" in reasons["5"]
    sidecar = json.loads((project / "rows.errors.json").read_text())
    assert sidecar["skipped"] == 2 and [r["id"] for r in sidecar["rows"]] == ["3", "5"]
    table = pq.read_table(out).to_pydict()
    keep = [i for i in range(10) if i not in (3, 5)]
    assert table["id"] == [str(i) for i in keep]
    expected = OnnxModel(model_dir, providers=[CPU]).predict_proba(x[keep].reshape(-1, 1, 8, 8))
    np.testing.assert_allclose(np.array(table["probabilities"]), expected, rtol=1e-6, atol=1e-7)


def test_on_error_fail_exits_2_naming_the_row_and_writes_nothing(project: Path, model_dir: Path) -> None:
    source = project / "rows.csv"
    _csv_with_bad_rows(source)
    out = project / "rows.parquet"
    result = _invoke(project, str(source), "-o", str(out), "--model", str(model_dir), "--on-error", "fail")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "row 3" in lines[0] and "NaN" in lines[0], lines
    assert "--on-error skip" in lines[0]
    assert not out.exists() and not list(project.glob(".rows.parquet.*"))


def test_an_image_folder_gives_the_upload_answers_and_skips_a_corrupt_file(project: Path, model_dir: Path) -> None:
    from serving.runtime import CPU, OnnxModel

    counts = sample_instances(4)
    folder = project / "images"
    (folder / "b").mkdir(parents=True)
    names = ["a0.png", "a1.png", "b/c2.png", "b/c3.png"]
    for name, digit in zip(names, counts):
        (folder / name).write_bytes(digit_png(digit))
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.txt").write_text("not an image, not an instance")
    out = project / "images.parquet"
    summary = _predict(project, str(folder), "-o", str(out), "--model", str(model_dir))
    assert summary["rows"] == 4 and summary["skipped"] == 1
    assert summary["skipped_examples"][0]["id"] == "b/broken.png"
    table = pq.read_table(out).to_pydict()
    assert table["id"] == sorted(names)
    order = [names.index(i) for i in table["id"]]
    expected = OnnxModel(model_dir, providers=[CPU]).predict_proba(counts[order])
    # The box filter gives the counts up to float rounding (serving/images.py), hence the tolerance.
    np.testing.assert_allclose(np.array(table["probabilities"]), expected, atol=1e-5)


STREAM = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from pipelines.predict.chunk import contract_for
    from pipelines.predict.run import _load_model, predict_to_parquet

    model_dir, small, big, out = map(Path, sys.argv[1:5])
    model = _load_model(model_dir)
    contract = contract_for(model, "label")
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    predict_to_parquet(model, contract, small, out)
    baseline = peak()
    done = predict_to_parquet(model, contract, big, out)
    print(json.dumps({"baseline": baseline, "peak": peak(), "rows": done.rows, "skipped": done.skipped,
                      "sha256": done.sha256}))
""")


def test_an_npy_larger_than_the_memory_allowance_streams(tmp_path: Path) -> None:
    model_dir = build_model_dir(tmp_path / "m28", input_shape=(1, 28, 28), dataset="mnist")
    rows = 64_000  # 1x28x28 float32: about 200 MB
    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(rows, 1, 28, 28))
    for start in range(0, rows, 8_000):
        big[start:start + 8_000] = (np.arange(8_000, dtype=np.float32) % 255)[:, None, None, None]
    big.flush()
    del big
    np.save(tmp_path / "small.npy", np.zeros((10, 1, 28, 28), dtype=np.float32))
    size = (tmp_path / "big.npy").stat().st_size
    done = subprocess.run([sys.executable, "-c", STREAM, str(model_dir), str(tmp_path / "small.npy"),
                           str(tmp_path / "big.npy"), str(tmp_path / "out.parquet")],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rows"] == rows and report["skipped"] == 0
    growth = report["peak"] - report["baseline"]
    # One 4,096-row chunk is 13 MB; reading the whole file would add 200 MB.
    print(f"peak RSS growth {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB file")
    assert growth < size / 4, (growth, size)
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_rows == rows
    digest = hashlib.sha256()
    with (tmp_path / "big.npy").open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    assert report["sha256"] == digest.hexdigest()  # hashed in the same single pass


def test_export_still_takes_the_training_run_after_a_prediction(project: Path, model_dir: Path) -> None:
    import mlflow
    from pipelines.export.package import latest_run_id
    from pipelines.tracking import configure_mlflow
    from tests.conftest import make_settings

    settings = make_settings(project)
    configure_mlflow(project, settings)
    with mlflow.start_run(run_name="training") as training:
        mlflow.log_metric("test_accuracy", 0.9)
    source = project / "few.npy"
    np.save(source, sample_instances(5))
    summary = _predict(project, str(source), "-o", str(project / "few.parquet"), "--model", str(model_dir))
    assert summary["mlflow_run_id"] != training.info.run_id
    configure_mlflow(project, settings)
    assert latest_run_id(settings.tracking.experiment) == training.info.run_id


def test_a_wrong_input_names_the_file_and_the_fix(project: Path, model_dir: Path) -> None:
    source = project / "wrong.npy"
    np.save(source, np.zeros((3, 1, 4, 4), dtype=np.float32))
    result = _invoke(project, str(source), "-o", str(project / "w.parquet"), "--model", str(model_dir))
    assert result.exit_code == 2
    assert f"{source}: the array has shape (3, 1, 4, 4), the model takes (N, 1, 8, 8)" in result.stderr


def test_npz_ids_and_parquet_rows_are_read_like_the_other_inputs(project: Path, model_dir: Path) -> None:
    import pandas as pd

    from serving.runtime import CPU, OnnxModel

    x = sample_instances(6)
    expected = OnnxModel(model_dir, providers=[CPU]).predict_proba(x)
    np.savez(project / "few.npz", x=x, ids=np.array([f"s{i}" for i in range(6)]))
    frame = pd.DataFrame(x.reshape(6, 64), columns=[f"p{i}" for i in range(64)])
    frame.insert(0, "id", [f"r{i}" for i in range(6)])
    frame.to_parquet(project / "few.parquet")
    for name, ids in (("few.npz", [f"s{i}" for i in range(6)]), ("few.parquet", [f"r{i}" for i in range(6)])):
        out = project / f"{name}.out.parquet"
        _predict(project, str(project / name), "-o", str(out), "--model", str(model_dir), "--batch-size", "4")
        table = pq.read_table(out).to_pydict()
        assert table["id"] == ids, name
        np.testing.assert_allclose(np.array(table["probabilities"]), expected, rtol=1e-6, atol=1e-7)


def test_without_model_it_predicts_with_the_registry_champion(project: Path, model_dir: Path) -> None:
    import mlflow
    from pipelines.tracking import configure_mlflow
    from tests.conftest import make_settings

    configure_mlflow(project, make_settings(project))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_dir), "model")
    client = mlflow.MlflowClient()
    client.create_registered_model("fluxo-predict-test")  # as pipelines/registry/versions.py registers a version
    version = client.create_model_version("fluxo-predict-test", source=f"runs:/{run.info.run_id}/model",
                                          run_id=run.info.run_id)
    client.set_registered_model_alias("fluxo-predict-test", "champion", version.version)
    source = project / "few.npy"
    np.save(source, sample_instances(3))
    summary = _predict(project, str(source), "-o", str(project / "c.parquet"),
                       "--set", "tracking.registered_model=fluxo-predict-test")
    assert summary["model"] == "fluxo-predict-test" and summary["version"] == str(version.version)
    assert set(pq.read_table(project / "c.parquet").column("model_version").to_pylist()) == {str(version.version)}


def test_predict_help_never_imports_torch_or_the_heavy_stack() -> None:
    from tests.project.test_imports import CLI, _loaded_after

    assert _loaded_after(CLI.format(args=["predict", "--help"])) == set()


def test_the_fast_row_check_flags_exactly_what_the_service_refuses() -> None:
    """float32 rows are screened by their sums; a sum that overflows on good values must not refuse them."""
    from pipelines.predict.sources import validate_rows
    from serving.schemas import InvalidInstances, validate_instances

    big = np.finfo(np.float32).max
    rows = np.zeros((7, 1, 2, 2), dtype=np.float32)
    rows[1, 0, 0, 0] = np.nan
    rows[2, 0, 1, 1] = np.inf
    rows[3, 0, 0, 1] = -np.inf
    rows[4, 0] = big  # finite, but the row's sum overflows to inf
    rows[5, 0, 0] = [big, -big]  # finite, sums to 0
    rows[6, 0, 0] = [np.inf, -np.inf]  # sums to NaN
    ids = [f"r{i}" for i in range(7)]

    def accepted(row: np.ndarray) -> bool:
        try:
            validate_instances([row.tolist()], (1, 2, 2), 1)
        except InvalidInstances:
            return False
        return True

    for values in (rows, rows.astype(np.float64)):
        chunk = validate_rows(values, ids, (1, 2, 2))
        assert chunk.ids == [ids[i] for i in range(7) if accepted(rows[i])] == ["r0", "r4", "r5"]
        assert [row for row, _ in chunk.errors] == ["r1", "r2", "r3", "r6"]
        np.testing.assert_array_equal(chunk.batch, rows[[0, 4, 5]])
    too_big = np.full((1, 1, 2, 2), 1e39)  # float64 beyond float32's range
    assert validate_rows(too_big, ["x"], (1, 2, 2)).ids == []


def _fluxo_predict(project: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed `fluxo predict`, in a fresh process, as a user runs it."""
    stores = project.parent
    return subprocess.run([str(Path(sys.executable).with_name("fluxo")), "predict", *args, "--root", str(project),
                           "--set", f"tracking.tracking_uri=sqlite:///{stores / 'mlflow.db'}"],
                          capture_output=True, text=True, cwd=project, timeout=300)


def test_a_folder_of_parts_is_each_part_in_turn_its_rows_named_by_part(project: Path, model_dir: Path) -> None:
    """What a Spark or Ray job writes: .npy and Parquet parts below one folder. Each row is answered as when its
    part is given alone, under the id ``part:id``; a bad row is skipped by that name; the folder's hash covers
    every part."""
    import pandas as pd

    x = sample_instances(30, seed=2)
    x[4, 0, 1, 1] = np.nan  # a bad row in the first part
    folder = project / "parts"
    (folder / "day=1").mkdir(parents=True)
    np.save(folder / "day=1" / "part-0.npy", x[:12])
    frame = pd.DataFrame(x[12:].reshape(18, 64), columns=[f"p{i}" for i in range(64)])
    frame.insert(0, "id", [f"r{i}" for i in range(18)])
    frame.to_parquet(folder / "part-1.parquet", row_group_size=5)
    alone = {}
    for name in ("day=1/part-0.npy", "part-1.parquet"):
        done = _fluxo_predict(project, str(folder / name), "-o", str(project / f"{name.replace('/', '_')}.out.parquet"),
                              "--model", str(model_dir), "--batch-size", "7")
        assert done.returncode == 0, done.stderr[-3000:]
        alone[name] = pq.read_table(project / f"{name.replace('/', '_')}.out.parquet").to_pydict()
    done = _fluxo_predict(project, str(folder), "-o", str(project / "folder.parquet"), "--model", str(model_dir),
                          "--batch-size", "7")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    table = pq.read_table(project / "folder.parquet").to_pydict()
    assert table["id"] == [f"day=1/part-0.npy:{i}" for i in alone["day=1/part-0.npy"]["id"]] + \
        [f"part-1.parquet:{i}" for i in alone["part-1.parquet"]["id"]]
    assert table["id"][:5] == ["day=1/part-0.npy:0", "day=1/part-0.npy:1", "day=1/part-0.npy:2",
                               "day=1/part-0.npy:3", "day=1/part-0.npy:5"]
    assert table["probabilities"] == alone["day=1/part-0.npy"]["probabilities"] + alone["part-1.parquet"]["probabilities"]
    assert summary["rows"] == 29 and summary["skipped"] == 1
    assert [e["id"] for e in summary["skipped_examples"]] == ["day=1/part-0.npy:4"]
    # A folder holding images beside parts is refused, naming both.
    (folder / "stray.png").write_bytes(digit_png(np.zeros((8, 8))))
    done = _fluxo_predict(project, str(folder), "-o", str(project / "mixed.parquet"), "--model", str(model_dir))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{folder}: holds both images (1, e.g. stray.png) and .npy/Parquet parts (2" in done.stderr
    assert not (project / "mixed.parquet").exists()
