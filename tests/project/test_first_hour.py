"""The first hour of a new user, as they live it: the installed `fluxo`, a fresh process each time,
a fresh project shaped like a clone (its .gitignore included), a fresh HOME, no `--set` for the stores.

One `fluxo run` of the smoke preset makes the champion every test here uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.serving_fixtures import free_port
from tests.users import Project, one_error_line, stop, wait_for

SMOKE = "configs/smoke.yaml"


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A clone-shaped project with the smoke champion, made by `fluxo run` as the README says."""
    project = Project.clone_shaped(tmp_path_factory.mktemp("first-hour"))
    result = project.fluxo("run", "--config", SMOKE)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    project.run_output = result.stdout + result.stderr  # type: ignore[attr-defined]
    return project


def _digits(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images[:n, None].astype(np.float32)


def _served_labels(user: Project, x: np.ndarray) -> list[str]:
    from serving.runtime import CPU, OnnxModel

    model = OnnxModel(user.root / ".fluxo" / "serve" / "fluxo-digits-v1", threads=1, providers=[CPU])
    return [model.labels[i] for i in model.predict_proba(x).argmax(1)]


# --- fluxo predict ------------------------------------------------------------------------------


def test_predict_from_the_registry_works_every_time_and_by_every_way_of_naming_the_model(user: Project) -> None:
    """It crashed every time from the command line (two threads importing MLflow at once)."""
    x = _digits(40)
    np.save(user.root / "batch.npy", x)
    expected = _served_labels(user, x)
    ways = [(), (), (), ("--model", "models:/fluxo-digits@champion"), ("--model", "models:/fluxo-digits/1"),
            ("--config", SMOKE)]
    for i, way in enumerate(ways):
        out = f"out-{i}.parquet"
        result = user.fluxo("predict", "batch.npy", "-o", out, *way)
        output = result.stdout + result.stderr
        assert result.returncode == 0 and "Traceback" not in output, (way, output[-3000:])
        summary = json.loads(result.stdout[result.stdout.index("{"):])
        assert summary["rows"] == 40 and summary["version"] == "1" and summary["mlflow_run_id"], summary
        assert pq.read_table(user.root / out).column("label").to_pylist() == expected


def test_predict_names_a_missing_input_before_anything_else(user: Project) -> None:
    line = one_error_line(user.fluxo("predict", "nope.npy", "-o", "out.parquet"))
    assert line.startswith("error: nope.npy: no such file or folder"), line
    line = one_error_line(user.fluxo("predict", "configs", "-o", "out.parquet"))
    assert "no PNG or JPEG file" in line, line


def test_predict_treats_a_text_cell_like_a_missing_one_a_problem_of_its_row(user: Project) -> None:
    """`abc` failed the whole file while `n/a` skipped its row; both are now one row's problem."""
    rows = _digits(4).reshape(4, 64).astype(object)
    rows[1, 5], rows[2, 7] = "abc", "n/a"
    lines = [",".join(f"p{i}" for i in range(64))] + [",".join(str(v) for v in row) for row in rows]
    (user.root / "batch.csv").write_text("\n".join(lines) + "\n")

    result = user.fluxo("predict", "batch.csv", "-o", "csv.parquet", "--on-error", "skip")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["rows"] == 2 and summary["skipped"] == 2, summary
    reasons = {e["id"]: e["reason"] for e in summary["skipped_examples"]}
    assert "column 'p5' holds 'abc', not a number" in reasons["1"], reasons
    assert "2" in reasons, reasons
    assert pq.read_table(user.root / "csv.parquet").column("id").to_pylist() == ["0", "3"]

    line = one_error_line(user.fluxo("predict", "batch.csv", "-o", "csv.parquet", "--on-error", "fail"))
    assert "batch.csv: row 1: column 'p5' holds 'abc'" in line and "--on-error skip" in line, line


# --- fluxo models show --------------------------------------------------------------------------


def test_models_show_names_the_parameters_a_model_takes(user: Project) -> None:
    line = one_error_line(user.fluxo("models", "show", "gru", "--input-shape", "1,40", "--params",
                                     "{hidden_size: 32}"))
    assert "'hidden_size' (did you mean hidden?)" in line and "hidden=64" in line and "layers=1" in line, line
    shown = user.fluxo("models", "show", "gru", "--input-shape", "1,40", "--params", "{hidden: 32}")
    assert shown.returncode == 0 and "GRU" in shown.stdout, shown.stdout + shown.stderr


# --- Prefect ------------------------------------------------------------------------------------


def test_the_run_says_where_prefect_keeps_it_and_its_flow_logs_hold_fluxos_lines(user: Project) -> None:
    output = user.run_output  # type: ignore[attr-defined]
    assert "prefect.io/docs" not in output and "StarletteDeprecationWarning" not in output, output[-3000:]
    # Its flow runs go to the project's own Prefect server, kept under the project with its other state.
    assert "starting this project's Prefect server at http://127.0.0.1:" in output, output[:3000]
    assert f"(state in {user.root / '.fluxo' / 'prefect'};" in output, output[:3000]

    port = free_port()
    ui, log = user.start("ui", "--prefect", "--port", str(port))
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, "Prefect UI", 180, ui)
        settings = httpx.get(f"http://127.0.0.1:{port}/ui-settings", timeout=5).json()
        assert settings["api_url"] == api  # the UI finds its API on a port other than 4200
        runs = httpx.post(f"{api}/flow_runs/filter", json={"sort": "START_TIME_DESC"}, timeout=10).json()
        pipeline = [r for r in runs if r["state_type"] == "COMPLETED"]
        assert pipeline, runs
        logs = httpx.post(f"{api}/logs/filter", timeout=10, json={
            "logs": {"flow_run_id": {"any_": [pipeline[0]["id"]]}}, "limit": 200}).json()
        names = {entry["name"] for entry in logs}
        messages = "\n".join(entry["message"] for entry in logs)
        assert {"pipelines.train.run", "pipelines.registry.versions"} <= names, names
        assert "promoted v1" in messages and "does not beat the MLP baseline" in messages, messages[-2000:]
    finally:
        code = stop(ui)
    assert code == 0, log.read_text()[-2000:]
    assert f"Prefect UI on http://127.0.0.1:{port}/" in log.read_text()


# --- what is served: fluxo serve, monitor and status ---------------------------------------------


def _records(payloads: Path) -> int:
    from serving.payload_log import read_payloads

    return read_payloads(payloads).num_rows if payloads.is_dir() else 0


@pytest.mark.slow  # half a minute or more: `make test-slow` (make test stays under 20 minutes)
def test_monitor_and_status_follow_the_served_model_after_data_moved_on(user: Project) -> None:
    """A digits model is served and logged; then MNIST-1D is ingested into data/. Both commands, with
    no option, still act on the served digits model, its payload log and its own data version."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server, log = user.start("serve", "--port", str(port), "--set", "serve.payload_log=payloads")
    second = None
    try:
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, "a ready server", 180, server)
        ingested = user.fluxo("data", "ingest", "--dataset", "mnist1d")
        assert ingested.returncode == 0, ingested.stderr[-3000:]

        x = _digits(120)
        with httpx.Client(timeout=30) as client:
            for instance in x:  # one request each: the payload log keeps a record per request
                answer = client.post(f"{url}/predict", json={"instances": [instance.tolist()]})
                assert answer.status_code == 200, answer.text
        wait_for(lambda: _records(user.root / "payloads") == 120, "120 logged requests", 60, server)

        monitored = user.fluxo("monitor", "--json")
        assert monitored.returncode == 0, (monitored.stdout + monitored.stderr)[-4000:]
        summary = json.loads(monitored.stdout[monitored.stdout.index("{"):])
        assert summary["model"] == "fluxo-digits" and summary["model_version"] == "1", summary
        assert summary["window"]["instances"] == 120 and summary["reference_size"] > 0, summary
        assert summary["chosen"].startswith("served by this project: fluxo-digits v1 at"), summary
        assert summary["drift_detected"] is not None

        status = user.fluxo("status")
        assert status.returncode == 0, status.stderr[-3000:]
        report = json.loads(status.stdout[status.stdout.index("{"):])
        assert report["model"] == "fluxo-digits" and report["server"]["reachable"], report
        assert report["server"]["model_version"] == "1" and report["aliases"] == {"champion": "1"}, report

        # A second server: now the commands ask which one, and --url answers.
        port2 = free_port()
        second, _ = user.start("serve", "--port", str(port2), "--model", ".fluxo/serve/fluxo-digits-v1")
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port2}/readyz", timeout=2).status_code == 200,
                 "the second server", 180, second)
        line = one_error_line(user.fluxo("status"))
        assert "2 servers of this project are running" in line and f":{port2}" in line and "--url" in line, line
        picked = user.fluxo("status", "--url", url)
        assert picked.returncode == 0 and json.loads(picked.stdout)["chosen"].startswith("asked at --url")
    finally:
        codes = [stop(p) for p in (second, server) if p is not None]
    assert codes == [0] * len(codes)
    output = log.read_text()
    # The ready-to-paste request is the model's own held-out sample, though data/ now holds MNIST-1D.
    metadata = json.loads((user.root / ".fluxo" / "serve" / "fluxo-digits-v1" / "metadata.json").read_text())
    example = metadata["example_instance"]
    assert np.asarray(example).shape == (1, 8, 8) and np.asarray(example).any()
    pasted = re.search(r"-d '(\{.*\})'", output)
    assert pasted and json.loads(pasted.group(1)) == {"instances": [example]}, output[-3000:]
    assert not list((user.root / ".fluxo" / "servers").glob("*.json")), "a stopped server left its record"


def test_with_no_server_running_the_commands_say_they_fell_back_to_data(user: Project) -> None:
    ingested = user.fluxo("data", "ingest", "--dataset", "mnist1d")  # a no-op when the test above ran
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    result = user.fluxo("status")
    line = one_error_line(result)  # MNIST-1D has no champion here: said, with the way out
    assert "fluxo-mnist1d: not in the model registry" in line, line
    assert "fluxo-mnist1d, the dataset data/ holds (no server of this project is running" in result.stderr
    named = user.fluxo("status", "--config", SMOKE)
    assert named.returncode == 0, (named.stdout + named.stderr)[-3000:]
    assert json.loads(named.stdout)["chosen"].startswith("fluxo-digits, the dataset the preset or --set names")
