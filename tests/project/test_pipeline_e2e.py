"""The whole path on real parts: Prefect flow (test harness) → DVC → MLflow → ONNX → `bentoml serve` over HTTP."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from mlflow.tracking import MlflowClient

from pipelines.context import open_run
from pipelines.data.store import read_dataset
from pipelines.data.versioning import read_data_version
from pipelines.registry.store import materialize_model
from pipelines.registry.publish import model_root
from pipelines.release import export_run
from serving.reload import read_pointer
from tests.conftest import SMOKE, make_settings, store_client

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_flow_trains_registers_and_serves_what_it_exported(project: Path, tmp_path: Path) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.flows import pipeline_flow
    from serving import ServingConfig
    from serving.launch import start_server, stop_server, wait_ready

    overrides = [
        f"data.dvc_remote={tmp_path / 'dvc-remote'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.epochs=3",
    ]
    with prefect_test_harness(server_startup_timeout=120):
        summary = pipeline_flow(config=str(SMOKE), overrides=overrides, root=str(project))

    data_version = read_data_version(project / "data.dvc").md5
    assert summary["data_version"] == data_version
    assert summary["promoted"] and summary["model_version"] == "1"
    assert summary["parity_max_abs_diff"] <= 1e-4
    assert any(Path(tmp_path / "dvc-remote").rglob("*")), "nothing was pushed to the DVC remote"
    run = MlflowClient().get_run(summary["run_id"])
    assert run.data.tags["data_version"] == data_version

    settings = make_settings(project, "train.epochs=3")
    model_dir = materialize_model(open_run(project, settings), None, summary["registered_model"]).path
    assert Path(summary["served_dir"]) == model_dir
    # The promotion published the champion: `fluxo serve` starts on this root and follows it.
    champion_root = model_root(project, settings, "fluxo-digits")
    assert read_pointer(champion_root) == model_dir.resolve()
    port = _free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log_file:
        server = start_server(ServingConfig.for_model_dir(champion_root), port, log_file=log_file)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, timeout=120, process=server)
            test = read_dataset(project / "data").splits["test"]
            held_out = test.x[:40]
            session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
            logits = session.run(None, {"input": held_out})[0]
            expected = np.exp(logits - logits.max(1, keepdims=True))
            expected /= expected.sum(1, keepdims=True)

            response = httpx.post(f"{url}/predict", json={"instances": held_out.tolist()}, timeout=30)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model_version"] == "1"
            labels = [p["label"] for p in body["predictions"]]
            assert labels == [str(i) for i in logits.argmax(1)]
            served = np.array([p["probabilities"] for p in body["predictions"]])
            np.testing.assert_allclose(served, expected, atol=1e-5)

            metadata = httpx.get(f"{url}/metadata", timeout=10).json()
            assert metadata["data_version"] == data_version
            assert metadata["input_shape"] == [1, 8, 8]

            # The README's request, pasted as shown, is answered.
            from tests.project.test_readme import _curl_bodies

            pasted = httpx.post(f"{url}/predict", content=_curl_bodies()[0],
                                headers={"Content-Type": "application/json"}, timeout=10)
            assert pasted.status_code == 200 and pasted.json()["predictions"][0]["label"] in metadata["labels"]

            bad = httpx.post(f"{url}/predict", json={"instances": [[0.0] * 64]}, timeout=10)
            assert bad.status_code == 400 and "(1, 8, 8)" in bad.text

            # Exporting the same run again registers nothing new (registration is idempotent)...
            assert export_run(open_run(project, settings), summary["run_id"]).model_version == "1"
            # ...a second run with the same settings registers v2 with an equal test metric, which takes
            # the alias; the running server switches to it by itself and keeps answering meanwhile.
            from pipelines.data.ingest import version
            from pipelines.train.run import train

            second = train(open_run(project, settings), version(project, settings.data))
            assert export_run(open_run(project, settings), second.run_id).promotion.promoted
            # Each worker polls on its own, so wait for a long run of answers all from v2.
            deadline, versions, streak = time.monotonic() + 60, set(), 0
            while time.monotonic() < deadline and streak < 20:
                answer = httpx.post(f"{url}/predict", json={"instances": held_out[:2].tolist()}, timeout=30)
                assert answer.status_code == 200, answer.text
                versions.add(answer.json()["model_version"])
                streak = streak + 1 if answer.json()["model_version"] == "2" else 0
                time.sleep(0.05)
            assert streak >= 20, f"the server did not settle on the new champion (saw versions {versions})"
            assert versions <= {"1", "2"}
            assert httpx.get(f"{url}/metadata", timeout=10).json()["model_version"] == "2"
        except Exception:
            print(log_path.read_text()[-4000:])
            raise
        finally:
            stop_server(server)


def test_schedule_builds_a_cron_deployment(tmp_path: Path) -> None:
    from pipelines.flows import scheduled_deployment

    deployment = scheduled_deployment("0 3 * * *", str(SMOKE), ["train.epochs=1"], str(tmp_path), "nightly")
    assert deployment.name == "nightly"
    assert deployment.schedules[0].schedule.cron == "0 3 * * *"
    # A scheduled retrain starts from a compatible champion's weights (pipelines/train/warm_start.py).
    assert deployment.parameters == {"config": str(SMOKE), "overrides": ["train.epochs=1", "train.init_from=champion"],
                                     "root": str(tmp_path.resolve()), "force": False}
    assert json.dumps(deployment.parameters)  # a deployment's parameters must be JSON


def test_a_user_mistake_inside_the_flow_is_not_retried_and_prints_no_traceback(
    project: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sequence file whose label column is not where the settings say: one task run, one clear error."""
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.errors import FluxoError
    from pipelines.flows import pipeline_flow
    from tests.data.test_ingest_sources import _sequences_csv

    path = _sequences_csv(tmp_path / "walk.csv", rows=60)
    overrides = [
        f"data.dvc_remote={tmp_path / 'dvc-remote'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"data.dataset={path}",
        "data.sequence.label_column=target",
        "model.name=cnn1d",
    ]
    with prefect_test_harness(server_startup_timeout=120):
        with pytest.raises(FluxoError, match="data.sequence.label_column"):
            pipeline_flow(config=str(SMOKE), overrides=overrides, root=str(project))
        with get_client(sync_client=True) as client:
            runs = [run for run in client.read_task_runs() if run.name.startswith("ingest")]
    assert len(runs) == 1 and runs[0].run_count == 1, [(r.name, r.run_count) for r in runs]
    assert runs[0].state.is_failed()
    failures = [r for r in caplog.records if r.name.startswith("prefect") and r.levelname == "ERROR"]
    assert failures, "Prefect should still say that the task failed"
    assert all(r.exc_info is None for r in failures), "a user error must not be logged with its traceback"


@pytest.mark.slow  # 15 s: a whole flow run with a fault
def test_a_transient_fault_after_registration_is_retried_and_registers_once(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The register task meets a dropped connection after it created the version: Prefect retries
    it, the retry finds that version, and the run ends with one version, promoted."""
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.registry import versions as registry
    from pipelines.flows import pipeline_flow

    real_tag, calls = registry._tag_version, {"n": 0}

    def flaky_tag(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("tracking server went away")
        return real_tag(*args, **kwargs)

    monkeypatch.setattr(registry, "_tag_version", flaky_tag)
    overrides = [
        f"data.dvc_remote={tmp_path / 'dvc-remote'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.epochs=1",
    ]
    with prefect_test_harness(server_startup_timeout=120):
        summary = pipeline_flow(config=str(SMOKE), overrides=overrides, root=str(project))
        with get_client(sync_client=True) as client:
            registers = [run for run in client.read_task_runs() if run.name.startswith("register")]
    assert summary["model_version"] == "1" and summary["promoted"]
    assert len(registers) == 1 and registers[0].run_count == 2
    versions = store_client(tmp_path / "mlflow.db").search_model_versions("name='fluxo-digits'")
    assert [str(v.version) for v in versions] == ["1"]


# Half a minute; tests/project/test_orchestration.py reruns unchanged through the installed `fluxo` in `make test`.
@pytest.mark.slow
def test_an_unchanged_rerun_reuses_the_run_and_a_changed_source_retrains(project: Path, tmp_path: Path) -> None:
    """Prefect's cache keyed on data version, settings and code: the second run trains nothing and
    registers nothing; a new row in the user's CSV is new data, so the third run trains again."""
    import pandas as pd
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.flows import pipeline_flow
    from tests.data.test_ingest_sources import _sequences_csv

    path = _sequences_csv(tmp_path / "walk.csv", rows=60)
    overrides = [
        f"data.dvc_remote={tmp_path / 'dvc-remote'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"data.dataset={path}",
        "model.name=mlp",
        "model.params={hidden: 8}",
        "train.epochs=2",
    ]

    def run(**extra):
        return pipeline_flow(config=None, overrides=overrides, root=str(project), **extra)

    with prefect_test_harness(server_startup_timeout=120):
        first = run()
        started = time.monotonic()
        second = run()
        unchanged_seconds = time.monotonic() - started
        frame = pd.read_csv(path)
        pd.concat([frame, frame.iloc[[0]].assign(t0=9.5)]).to_csv(path, index=False)  # one new row
        third = run()
        forced = run(force=True)
        with get_client(sync_client=True) as client:
            trainings = [r for r in client.read_task_runs() if r.name.startswith("train-evaluate")]
    assert not first["unchanged"] and first["model_version"] == "1"
    assert second["unchanged"] and second["run_id"] == first["run_id"] and second["model_version"] == "1"
    assert "unchanged since run " + first["run_id"] in second["promotion"] and "champion v1 stays" in second["promotion"]
    assert unchanged_seconds < 30, unchanged_seconds
    assert not third["unchanged"] and third["data_version"] != first["data_version"] and third["model_version"] == "2"
    assert not forced["unchanged"] and forced["run_id"] != third["run_id"] and forced["model_version"] == "3"
    assert sorted(r.state.name for r in trainings) == ["Cached", "Completed", "Completed", "Completed"]
    versions = store_client(tmp_path / "mlflow.db").search_model_versions("name='fluxo-walk'")
    assert sorted(str(v.version) for v in versions) == ["1", "2", "3"]
