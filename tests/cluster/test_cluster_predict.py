"""`fluxo predict` on a Ray cluster started in the process (cluster.address=local): the installed `fluxo`,
a fresh process each run, the same input through the one-process path and the cluster's actors.

The cluster's answer must be the one-process answer row for row (ids, labels, probabilities, the
skipped rows and why), and a user's mistake found by a worker must still be one clear line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.serving_fixtures import build_model_dir, digit_png, sample_instances
from tests.users import Project, one_error_line, wait_for

# Several shares from a small input, so two actors each get more than one and order is tested.
SMALL_SHARES = ("--set", "cluster.rows_per_task=97", "--set", "cluster.cpus=2")


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Project:
    base = tmp_path_factory.mktemp("cluster-predict")
    user = Project.clone_shaped(base)
    build_model_dir(base / "model", model_version="3")
    return user


def _predict(user: Project, source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    model = user.root.parent / "model"
    return user.fluxo("predict", str(source), "-o", str(out), "--model", str(model), "--batch-size", "32",
                      "--set", f"tracking.tracking_uri=sqlite:///{user.root.parent / 'mlflow.db'}", *extra)


def _both(user: Project, source: Path, name: str) -> tuple[dict, dict]:
    """The one-process run and the cluster run of ``source``: their summaries (both must succeed)."""
    summaries = []
    for where, extra in (("one", ()), ("cluster", ("--set", "cluster.address=local", *SMALL_SHARES))):
        result = _predict(user, source, user.root / f"{name}-{where}.parquet", *extra)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        summaries.append(json.loads(result.stdout[result.stdout.index("{"):]))
    return summaries[0], summaries[1]


def _same_output(user: Project, name: str, one: dict, cluster: dict) -> pa.Table:
    single, spread = (pq.read_table(user.root / f"{name}-{where}.parquet") for where in ("one", "cluster"))
    assert spread.schema == single.schema
    assert spread.column("id").to_pylist() == single.column("id").to_pylist()
    assert spread.equals(single), "the cluster's rows differ from the one-process rows"
    for key in ("rows", "skipped", "skipped_examples", "version"):
        assert cluster[key] == one[key], key
    errors = [json.loads((user.root / f"{name}-{where}.errors.json").read_text()) for where in ("one", "cluster")]
    assert errors[0]["rows"] == errors[1]["rows"] and errors[0]["skipped"] == errors[1]["skipped"]
    return single


def test_npy_on_the_cluster_equals_the_one_process_output_row_for_row(user: Project) -> None:
    x = sample_instances(1000)
    x[5, 0, 0, 0] = np.nan  # a bad row in the first share
    x[900, 0, 3, 3] = np.inf  # and one in the last
    source = user.root / "batch.npy"
    np.save(source, x)
    one, cluster = _both(user, source, "npy")
    table = _same_output(user, "npy", one, cluster)
    assert table.num_rows == 998 and one["skipped"] == 2
    assert [e["id"] for e in cluster["skipped_examples"]] == ["5", "900"]


def test_a_folder_of_parts_is_spread_part_by_part_and_named_as_in_one_process(user: Project) -> None:
    x = sample_instances(900, seed=6)
    x[450, 0, 2, 2] = np.nan  # a bad row in the second part
    folder = user.root / "parts"
    (folder / "b").mkdir(parents=True)
    np.save(folder / "a.npy", x[:300])
    np.save(folder / "b" / "c.npy", x[300:700])
    flat = x[700:].reshape(200, 64)
    pq.write_table(pa.table({f"v{i}": pa.array(flat[:, i]) for i in range(64)}), folder / "d.parquet", row_group_size=50)
    one, cluster = _both(user, folder, "parts")
    table = _same_output(user, "parts", one, cluster)
    ids = table.column("id").to_pylist()
    assert table.num_rows == 899 and ids[0] == "a.npy:0" and ids[-1] == "d.parquet:199"
    assert [e["id"] for e in cluster["skipped_examples"]] == ["b/c.npy:150"]


@pytest.mark.slow  # 14 s: the .npy test covers the spread in make test
def test_parquet_row_groups_are_spread_and_come_back_in_order(user: Project) -> None:
    x = sample_instances(700, seed=4).reshape(700, 64)
    frame = pa.table({f"v{i}": pa.array(x[:, i]) for i in range(64)} | {"id": pa.array([f"r{i}" for i in range(700)])})
    source = user.root / "wide.parquet"
    pq.write_table(frame, source, row_group_size=50)  # 14 row groups, gathered two by two into shares
    one, cluster = _both(user, source, "parquet")
    table = _same_output(user, "parquet", one, cluster)
    assert table.column("id").to_pylist()[:3] == ["r0", "r1", "r2"] and table.num_rows == 700


@pytest.mark.slow  # 12 s
def test_an_image_folder_on_the_cluster_skips_the_same_broken_file(user: Project) -> None:
    folder = user.root / "images"
    digits = sample_instances(230, seed=7)
    for index, digit in enumerate(digits):
        target = folder / f"d{index // 100}" / f"{index:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(digit_png(digit[0]))
    (folder / "d1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    one, cluster = _both(user, folder, "images")
    table = _same_output(user, "images", one, cluster)
    assert table.num_rows == 230 and [e["id"] for e in cluster["skipped_examples"]] == ["d1/broken.png"]


@pytest.mark.slow  # 21 s: four cluster starts
def test_a_bad_row_under_on_error_fail_and_a_truncated_file_are_one_line_each(user: Project) -> None:
    x = sample_instances(400)
    x[300, 0, 0, 0] = np.nan
    source = user.root / "bad.npy"
    np.save(source, x)
    out = user.root / "bad.parquet"
    line = one_error_line(_predict(user, source, out, "--on-error", "fail", "--set", "cluster.address=local",
                                   *SMALL_SHARES))
    assert "row 300" in line and "--on-error skip" in line, line
    truncated = user.root / "truncated.npy"
    truncated.write_bytes(source.read_bytes()[:-5000])
    line = one_error_line(_predict(user, truncated, out, "--set", "cluster.address=local", *SMALL_SHARES))
    assert "truncated" in line and str(truncated) in line, line
    assert not out.exists() and not list(user.root.glob(".bad.parquet.*")), "a failed run leaves no file behind"


def test_a_cluster_that_cannot_be_reached_or_named_is_one_line(user: Project) -> None:
    source = user.root / "few.npy"
    np.save(source, sample_instances(10))
    line = one_error_line(_predict(user, source, user.root / "few.parquet", "--set", "cluster.address=not a host"))
    assert "cluster.address" in line and "'not a host'" in line, line


def test_a_local_cluster_listens_on_loopback_only_and_stops_with_the_command(tmp_path: Path) -> None:
    """Ray's servers, left to themselves, bind the machine's external address (ss -ltnp shows what listens)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os, subprocess, sys\n"
        "from pipelines.cluster import ray_cluster\n"
        "from pipelines.settings.cluster import ClusterSettings\n"
        "with ray_cluster(ClusterSettings(address='local', cpus=1)) as info:\n"
        "    import psutil\n"
        "    ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}\n"
        "    sockets = [c for c in psutil.net_connections('inet') if c.status == 'LISTEN' and c.pid in ours]\n"
        "    print(json.dumps({'cpus': info.cpus, 'addresses': sorted({c.laddr.ip for c in sockets}),\n"
        "                      'children': sorted(ours - {os.getpid()})}))\n"
    )
    result = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["cpus"] == 1 and seen["addresses"], seen
    assert set(seen["addresses"]) <= {"127.0.0.1", "::ffff:127.0.0.1"}, f"Ray listens beyond loopback: {seen}"
    import psutil

    alive = [pid for pid in seen["children"] if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not alive, f"Ray processes left running after the command: {alive}"


@pytest.mark.parametrize("stop", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_stop_mid_prediction_leaves_no_ray_process_and_no_partial_file(user: Project, stop: int) -> None:
    source = user.root / "long.npy"
    if not source.exists():
        np.save(source, sample_instances(200_000, seed=9))
    out = user.root / "long.parquet"
    process, log = user.start("predict", str(source), "-o", str(out), "--model", str(user.root.parent / "model"),
                              "--set", f"tracking.tracking_uri=sqlite:///{user.root.parent / 'mlflow.db'}",
                              "--set", "cluster.address=local", "--set", "cluster.rows_per_task=500")
    try:
        wait_for(lambda: "predicted" in log.read_text(errors="replace"), "the first shares predicted", timeout=180)
        ours = _ray_processes()
        assert ours, "a local cluster runs while the command predicts"
        process.send_signal(stop)
        assert process.wait(timeout=60) != 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    wait_for(lambda: not _alive(ours), "the cluster's processes gone", timeout=60,
             detail=lambda: "\n".join(f"{p.pid} {' '.join(p.cmdline())[:200]}" for p in _alive(ours)))
    assert not out.exists() and not list(user.root.glob(".long.parquet.*")), "no output, no temporary file"
    assert "Traceback" not in log.read_text(errors="replace")


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


def _ray_processes() -> list[psutil.Process]:
    """Ray's own processes on this machine (only this test's cluster runs now)."""
    found = []
    for process in psutil.process_iter():
        try:
            if any(name in " ".join(process.cmdline()) for name in ("raylet", "gcs_server", "ray::")):
                found.append(process)
        except psutil.Error:
            continue
    return found
