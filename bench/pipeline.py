"""Start-up of the commands a user types most, this checkout against an earlier commit, in one run.

    .venv/bin/python bench/pipeline.py [--baseline-ref 6d67dfc] [--config configs/digits-cnn.yaml] [--repeats 3]

Three timings per side, each a new process of `python -m pipelines.cli` with the same interpreter:

- ``fluxo run`` in a fresh clone of the side's commit (a new user's project: no data/, no MLflow
  store, its own DVC remote and Prefect home under a temporary directory);
- the same ``fluxo run`` again, unchanged (data, settings and code as before: it only has to say so);
- ``fluxo status`` in that project (the registry's versions and aliases).

The sides alternate so both see the same machine load. Wall time includes Python start-up,
Prefect's server (the baseline's temporary one; this checkout's project server, stopped after
each repetition), ingest, DVC, training, export and registration. Prints a table and writes
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
STEPS = ("run", "rerun", "status")


def clone(ref: str, target: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    subprocess.run(["git", "checkout", "-q", ref], cwd=target, check=True)
    return target


def _fluxo(project: Path, stores: Path, args: list[str]) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUXO_", "MLFLOW_", "PREFECT_API_URL"))}
    env.update(PYTHONPATH=str(project), PREFECT_HOME=str(stores / "prefect"))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=900)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{project}: fluxo {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def measure(project: Path, config: str, stores: Path) -> dict[str, float | None]:
    run = ["run", "--config", config, "--set", f"data.dvc_remote={stores / 'dvc-remote'}"]
    first, out = _fluxo(project, stores, run)
    summary = json.loads(out[out.index("{"):])
    again, out = _fluxo(project, stores, run)
    if not json.loads(out[out.index("{"):]).get("unchanged"):
        raise SystemExit(f"{project}: the second run was not recognised as unchanged")
    status, _ = _fluxo(project, stores, ["status"])
    if (project / "pipelines" / "orchestration.py").is_file():  # the project's Prefect server: gone before the next side
        _fluxo(project, stores, ["prefect", "stop"])
    return {"run": first, "rerun": again, "status": status, "train_seconds": summary.get("train_seconds"),
            "test_accuracy": summary["test_metrics"].get("test_accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", default="6d67dfc")
    parser.add_argument("--config", default="configs/digits-cnn.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    runs: dict[str, list[dict]] = {"fluxo": [], "baseline": []}
    with tempfile.TemporaryDirectory() as scratch:
        for attempt in range(args.repeats):
            for side, ref in (("fluxo", head), ("baseline", args.baseline_ref)):
                base = Path(scratch) / f"{side}-{attempt}"
                row = measure(clone(ref, base / "project"), args.config, base)
                runs[side].append(row)
                print(f"{side:9} {attempt + 1}: run {row['run']:5.1f} s (training {row['train_seconds']} s), "
                      f"rerun {row['rerun']:4.1f} s, status {row['status']:4.1f} s", flush=True)

    medians = {side: {step: statistics.median(r[step] for r in rows) for step in (*STEPS, "train_seconds")}
               for side, rows in runs.items()}
    labels = {"fluxo": head, "baseline": args.baseline_ref}
    print(f"\n{'median (s)':12} {'run':>7} {'training':>9} {'rerun':>7} {'status':>7}")
    for side in runs:
        m = medians[side]
        print(f"{labels[side]:12} {m['run']:7.1f} {m['train_seconds']:9.1f} {m['rerun']:7.1f} {m['status']:7.1f}")
    ratios = {step: medians["baseline"][step] / medians["fluxo"][step] for step in STEPS}
    print("baseline/fluxo: " + ", ".join(f"{step} {ratio:.2f}" for step, ratio in ratios.items()))
    result = {
        "benchmark": "pipeline",
        "config": args.config,
        "fluxo_ref": head,
        "baseline_ref": args.baseline_ref,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "runs": runs,
        "median_s": medians,
        "baseline_over_fluxo": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
