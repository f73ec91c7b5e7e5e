"""End-to-end `fluxo run` on a preset, this checkout against an earlier commit, in one run.

    .venv/bin/python bench/pipeline.py [--baseline-ref 8c9a2ee] [--config configs/digits-cnn.yaml] [--repeats 2]

Each side runs in a fresh clone of its commit (a new user's project: no data/, no MLflow
store, its own DVC remote and Prefect home under a temporary directory), started as a
new `fluxo run` process with the same interpreter; the sides alternate so both see the
same machine load. Wall time includes Python start-up, Prefect's embedded server,
ingest, DVC, training, export and registration. Prints a table and writes
bench/results/pipeline.json. Only local processes and files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def clone(ref: str, target: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    subprocess.run(["git", "checkout", "-q", ref], cwd=target, check=True)
    return target


def run_once(project: Path, config: str, stores: Path) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUXO_", "MLFLOW_", "PREFECT_API_URL"))}
    env.update(PYTHONPATH=str(project), PREFECT_HOME=str(stores / "prefect"))
    command = [sys.executable, "-m", "pipelines.cli", "run", "--config", config,
               "--set", f"data.dvc_remote={stores / 'dvc-remote'}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{project}: fluxo run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    return seconds, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", default="8c9a2ee")
    parser.add_argument("--config", default="configs/digits-cnn.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    runs: dict[str, list[dict]] = {"fluxo": [], "baseline": []}
    with tempfile.TemporaryDirectory() as scratch:
        for attempt in range(args.repeats):
            for side, ref in (("fluxo", "HEAD"), ("baseline", args.baseline_ref)):
                base = Path(scratch) / f"{side}-{attempt}"
                project = clone(head if ref == "HEAD" else ref, base / "project")
                seconds, summary = run_once(project, args.config, base)
                runs[side].append({"seconds": seconds, "test_accuracy": summary["test_metrics"].get("test_accuracy"),
                                   "train_seconds": summary.get("train_seconds")})
                print(f"{side:9} run {attempt + 1}: {seconds:6.1f} s (training {summary.get('train_seconds')} s, "
                      f"test accuracy {summary['test_metrics'].get('test_accuracy'):.4f})", flush=True)

    medians = {side: statistics.median(r["seconds"] for r in rows) for side, rows in runs.items()}
    train = {side: statistics.median(r["train_seconds"] for r in rows) for side, rows in runs.items()}
    print(f"\n{'':10} {'wall (s)':>9} {'training (s)':>13} {'other (s)':>10}")
    for side in runs:
        label = head if side == "fluxo" else args.baseline_ref
        print(f"{label:10} {medians[side]:9.1f} {train[side]:13.1f} {medians[side] - train[side]:10.1f}")
    print(f"wall-time ratio baseline/fluxo: {medians['baseline'] / medians['fluxo']:.2f}")
    result = {
        "benchmark": "pipeline",
        "config": args.config,
        "fluxo_ref": head,
        "baseline_ref": args.baseline_ref,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "runs": runs,
        "median_wall_s": medians,
        "median_train_s": train,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
