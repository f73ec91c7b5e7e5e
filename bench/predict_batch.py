"""Batch prediction vs the REST service: the same MNIST-sized instances, two ways.

    .venv/bin/python bench/predict_batch.py                    # 100,000 instances, 10 s of HTTP load
    .venv/bin/python bench/predict_batch.py --rows 20000 --seconds 5

(a) ``fluxo predict big.npy -o out.parquet --model DIR``, run as a user runs it (a fresh
process: imports, model load, MLflow record and all), on 100,000 instances of 1x28x28
float32 read from an .npy; (b) ``bentoml serve`` on the same model directory, one
instance per ``POST /predict``, 32 keep-alive clients (bench/serve.py's closed-loop
load client), for a fixed duration over a 10,000-instance subset; its time for
100,000 instances is extrapolated from the measured rate. The model is the tiny
28x28 classifier of tests/serving_fixtures.py, so both sides measure the plumbing
(reading, validation, JSON, HTTP), not the network.

Prints a table and writes bench/results/predict_batch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve import Load, fluxo_label, http_request, start_fluxo

from serving.launch import stop_server
from serving.runtime import CPU, OnnxModel
from tests.serving_fixtures import build_model_dir

SHAPE = (1, 28, 28)


def write_instances(path: Path, rows: int) -> None:
    """MNIST-like raw pixels 0..255, written in slices so the generator never holds the whole file."""
    rng = np.random.default_rng(0)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, *SHAPE))
    for start in range(0, rows, 10_000):
        stop = min(rows, start + 10_000)
        out[start:stop] = rng.integers(0, 256, size=(stop - start, *SHAPE)).astype(np.float32)
    out.flush()
    del out


def _predict_command(work: Path, model_dir: Path, source: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "predict", str(source), "-o", str(work / "out.parquet"),
            "--model", str(model_dir), "--root", str(work),
            "--set", f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}"]


def run_batch(work: Path, model_dir: Path, source: Path) -> dict:
    """`fluxo predict` end to end in a fresh process; the summary's own rows/s is the loop alone.

    A first run on ten instances creates the MLflow store (its schema migrations take seconds,
    once per store), as a user's project already has one; the HTTP side likewise leaves out
    the server's start.
    """
    tiny = work / "tiny.npy"
    np.save(tiny, np.zeros((10, *SHAPE), dtype=np.float32))
    subprocess.run(_predict_command(work, model_dir, tiny), cwd=ROOT, capture_output=True, check=True, timeout=300)
    started = time.perf_counter()
    subprocess.run(_predict_command(work, model_dir, tiny), cwd=ROOT, capture_output=True, check=True, timeout=300)
    fixed = time.perf_counter() - started  # imports, model load, MLflow record: paid once per command
    started = time.perf_counter()
    done = subprocess.run(_predict_command(work, model_dir, source), check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"fluxo predict failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    return {"rows": summary["rows"], "wall_s": round(wall, 2), "rows_per_s_wall": round(summary["rows"] / wall, 1),
            "loop_s": summary["seconds"], "rows_per_s_loop": summary["rows_per_s"], "fixed_s_10_rows": round(fixed, 2)}


def run_http(work: Path, model_dir: Path, instances: np.ndarray, concurrency: int, seconds: float) -> dict:
    """One instance per request, ``concurrency`` clients, against a real `bentoml serve`."""
    expected = [str(i) for i in OnnxModel(model_dir, providers=[CPU]).predict_proba(instances).argmax(1)]
    started = time.perf_counter()
    server = start_fluxo("fluxo", model_dir, {"FLUXO_PROVIDER": "cpu"}, work / "server.log")
    start_s = time.perf_counter() - started
    try:
        bodies = [http_request(server.port, "/predict", orjson.dumps({"instances": [x.astype(int).tolist()]}))
                  for x in instances]
        load = Load(server.port, bodies, expected, fluxo_label)
        load.run(concurrency, 1.0)  # warm-up: connections, first batches
        return {**load.run(concurrency, seconds), "server_start_s": round(start_s, 2)}
    finally:
        stop_server(server.process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--http-subset", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fluxo-predict-bench-") as scratch:
        work = Path(scratch)
        model_dir = build_model_dir(work / "model", input_shape=SHAPE, dataset="mnist")
        source = work / "instances.npy"
        write_instances(source, args.rows)
        batch = run_batch(work, model_dir, source)
        subset = np.load(source, mmap_mode="r")[: args.http_subset]
        http = run_http(work, model_dir, np.asarray(subset), args.concurrency, args.seconds)
    http_rate = http["requests_per_s"]
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "rows": args.rows,
        "instance_shape": list(SHAPE),
        "batch": batch,
        "http": {**{k: http[k] for k in ("concurrency", "seconds", "requests_per_s", "p50_ms", "p99_ms", "ok",
                                          "errors", "wrong_answers", "answers_checked", "server_start_s")},
                 "subset": args.http_subset,
                 "extrapolated_s_for_rows": round(args.rows / http_rate, 1) if http_rate else None},
        "speedup_wall": round(batch["rows_per_s_wall"] / http_rate, 1) if http_rate else None,
        "speedup_loop": round(batch["rows_per_s_loop"] / http_rate, 1) if http_rate else None,
    }
    out = ROOT / "bench" / "results" / "predict_batch.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("fluxo predict (process wall)", batch["rows_per_s_wall"], batch["wall_s"]),
        ("fluxo predict (loop only)", batch["rows_per_s_loop"], batch["loop_s"]),
        (f"POST /predict, 1/request, {args.concurrency} clients", http_rate, result["http"]["extrapolated_s_for_rows"]),
    ]
    print(f"\n{args.rows:,} instances of {SHAPE} on {os.cpu_count()} CPUs (HTTP measured on {args.http_subset:,} "
          f"for {args.seconds:g} s, extrapolated)")
    print(f"{'way':44} {'instances/s':>12} {'seconds':>9}")
    for name, rate, seconds in rows:
        print(f"{name:44} {rate:>12,.0f} {seconds:>9}")
    print(f"fixed cost of one `fluxo predict` (10 rows): {batch['fixed_s_10_rows']} s; "
          f"server start (not counted above): {http['server_start_s']} s")
    print(f"speed-up: {result['speedup_wall']}x (wall), {result['speedup_loop']}x (loop); "
          f"HTTP errors {http['errors']}, wrong answers {http['wrong_answers']}/{http['answers_checked']}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
