"""fluxo on a Ray cluster against fluxo in one process: batch prediction, training and the auto race.

    .venv/bin/python bench/scale.py                       # 60,000 instances, the whole set
    .venv/bin/python bench/scale.py --rows 300000 --skip-train --skip-auto --output scale_predict_300k.json

Every number is a whole `fluxo` command run as a user runs it (a fresh process, imports, the
cluster's start and stop included), beside the same command without a cluster, in one run:

- **batch prediction**: `fluxo predict` on ``--rows`` MNIST-sized instances (1x28x28 float32, a
  `.npy`) with a LeNet-sized network (models' `lenet`, random weights: throughput, not accuracy) in
  one process, then on a cluster started in the command (``cluster.address=local``) with one actor
  and with two (``cluster.cpus`` 1 and 2, one ONNX Runtime thread each); the summary's own
  seconds are the predicting loop, the cluster's start is the command's log line. The outputs
  are checked equal. Scaling efficiency is T1 / (2 · T2) on the loop.
- **training**: `fluxo train --nproc 2` (torchrun, one host) against `--workers 2` (Ray Train on
  the local cluster), the digits preset for ``--epochs``; seconds per epoch from the MLflow
  metric timestamps, and the final training losses (they must be equal).
- **the auto race**: `fluxo train` with model.name=auto on digits, sequential against each rung
  at once on the cluster; the race's seconds from its leaderboard.

On this machine every "node" is a process on the same 2 cores; the compose ``ray`` profile, with
one core per container, is the multi-node measurement this does not make.

Prints a table and writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = (1, 28, 28)
FLUXO = Path(sys.executable).with_name("fluxo")
READY = re.compile(r"Ray cluster local \(started in this process\): .* ready in ([0-9.]+) s")


def lenet_model_dir(target: Path) -> Path:
    """A LeNet-sized model directory (random weights) as export writes it: model.onnx and metadata.json."""
    import torch

    from models import build_model
    from tests.serving_fixtures import metadata_for

    target.mkdir(parents=True)
    model = build_model("lenet", SHAPE, 10).eval()
    with warnings.catch_warnings():  # the TorchScript exporter: enough for a fixed LeNet, and no onnxscript step
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, torch.zeros(1, *SHAPE), str(target / "model.onnx"), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
    meta = metadata_for(SHAPE, [str(i) for i in range(10)], architecture="lenet", dataset="mnist")
    (target / "metadata.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return target


def fluxo(work: Path, *args: str, timeout: float = 1800) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUXO_", "MLFLOW_"))}
    started = time.perf_counter()
    done = subprocess.run([str(FLUXO), *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"fluxo {' '.join(args)} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return done, wall


def summary(done: subprocess.CompletedProcess) -> dict[str, Any]:
    return json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])


def cluster_start(done: subprocess.CompletedProcess) -> float | None:
    match = READY.search(done.stdout + done.stderr)
    return float(match.group(1)) if match else None


def bench_predict(work: Path, rows: int) -> dict[str, Any]:
    import pyarrow.parquet as pq

    model = lenet_model_dir(work / "model")
    source = work / "instances.npy"
    rng = np.random.default_rng(0)
    np.save(source, rng.integers(0, 256, size=(rows, *SHAPE)).astype(np.float32))
    stores = ("--set", f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}")
    fluxo(work, "predict", str(source), "-o", str(work / "warm.parquet"), "--model", str(model), *stores)  # the store
    cases = {"one process": (), "cluster, 1 actor": ("--set", "cluster.address=local", "--set", "cluster.cpus=1"),
             "cluster, 2 actors": ("--set", "cluster.address=local", "--set", "cluster.cpus=2")}
    out: dict[str, Any] = {}
    for name, extra in cases.items():
        target = work / f"{name.replace(' ', '_').replace(',', '')}.parquet"
        done, wall = fluxo(work, "predict", str(source), "-o", str(target), "--model", str(model), *stores, *extra)
        result = summary(done)
        out[name] = {"loop_s": result["seconds"], "rows_per_s": result["rows_per_s"], "command_s": round(wall, 2),
                     "cluster_start_s": cluster_start(done)}
        print(f"predict {name:18s} loop {result['seconds']:7.2f} s  {result['rows_per_s']:9.0f} rows/s  "
              f"command {wall:6.1f} s", flush=True)
    tables = [pq.read_table(work / f"{n.replace(' ', '_').replace(',', '')}.parquet") for n in cases]
    out["outputs_equal"] = all(t.equals(tables[0]) for t in tables[1:])
    one, two = out["cluster, 1 actor"]["loop_s"], out["cluster, 2 actors"]["loop_s"]
    out["scaling_efficiency"] = round(one / (2 * two), 3)
    return out


def epoch_seconds(db: Path, run_id: str) -> tuple[float, float]:
    """(mean seconds between consecutive epochs' train_loss records, the last train_loss) from MLflow."""
    from mlflow.tracking import MlflowClient

    history = sorted(MlflowClient(f"sqlite:///{db}").get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    gaps = np.diff([m.timestamp for m in history]) / 1000.0
    return float(np.mean(gaps)) if len(gaps) else float("nan"), history[-1].value


def bench_train(work: Path, epochs: int) -> dict[str, Any]:
    project = work / "train"
    project.mkdir()
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    stores = ("--set", f"tracking.tracking_uri=sqlite:///{project / 'mlflow.db'}",
              "--set", f"data.dvc_remote={work / 'dvc-remote'}")
    preset = str(ROOT / "configs" / "digits-cnn.yaml")
    fluxo(project, "data", "ingest", "--config", preset, *stores)
    out: dict[str, Any] = {}
    for name, extra in {"one host, 2 processes (--nproc 2)": ("--nproc", "2"),
                        "cluster, 2 workers (--workers 2)": ("--workers", "2", "--set", "cluster.address=local")}.items():
        done, wall = fluxo(project, "train", "--config", preset, *extra, "--set", f"train.epochs={epochs}",
                           "--set", f"train.patience={epochs}", *stores)
        per_epoch, last = epoch_seconds(project / "mlflow.db", summary(done)["run_id"])
        out[name] = {"seconds_per_epoch": round(per_epoch, 3), "final_train_loss": last, "command_s": round(wall, 1),
                     "cluster_start_s": cluster_start(done)}
        print(f"train {name:36s} {per_epoch:6.2f} s/epoch  final loss {last:.6f}  command {wall:6.1f} s", flush=True)
    return out


def bench_auto(work: Path) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    project = work / "auto"
    project.mkdir()
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    db = project / "mlflow.db"
    stores = ("--set", f"tracking.tracking_uri=sqlite:///{db}", "--set", f"data.dvc_remote={work / 'dvc-remote-auto'}")
    preset = str(ROOT / "configs" / "digits-cnn.yaml")
    race = ("--set", "model.name=auto", "--set", "train.epochs=9", "--set", "auto.with_presets=false",
            "--set", "auto.with_augmentation=false", "--set", "auto.learning_rates=[0.003]")
    fluxo(project, "data", "ingest", "--config", preset, *stores)
    out: dict[str, Any] = {}
    client = MlflowClient(f"sqlite:///{db}")
    for name, extra in {"sequential": (), "cluster, each rung at once": ("--set", "cluster.address=local")}.items():
        done, wall = fluxo(project, "train", "--config", preset, *race, *extra, *stores)
        search = client.get_run(client.get_run(summary(done)["run_id"]).data.tags["fluxo.auto.search"])
        board = json.loads(Path(client.download_artifacts(search.info.run_id, "auto/leaderboard.json")).read_text())
        out[name] = {"race_s": board["seconds"], "command_s": round(wall, 1), "winner": board["leaderboard"][0]["candidate"],
                     "cluster_start_s": cluster_start(done)}
        print(f"auto {name:28s} race {board['seconds']:6.1f} s  command {wall:6.1f} s  "
              f"winner {out[name]['winner']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-auto", action="store_true")
    parser.add_argument("--output", default="scale.json", help="file name under bench/results/")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                               "rows": args.rows}
    with tempfile.TemporaryDirectory(prefix="fluxo-scale-") as folder:
        work = Path(folder)
        results["predict"] = bench_predict(work, args.rows)
        if not args.skip_train:
            results["train"] = bench_train(work, args.epochs)
        if not args.skip_auto:
            results["auto"] = bench_auto(work)
    target = ROOT / "bench" / "results" / args.output
    target.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
