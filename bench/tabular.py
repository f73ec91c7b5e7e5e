"""``fluxo run --auto`` on real tables against a scaled linear model and gradient-boosted trees.

    .venv/bin/python bench/tabular.py [--datasets breast_cancer wine iris diabetes autompg] [--seeds 0 1 2]

For each dataset (each ships with an installable package: scikit-learn's breast cancer, wine,
iris and diabetes, mlxtend's Auto MPG) and seed, in a fresh project directory: the table is
written as a CSV of its named columns and a ``label`` column, and the installed ``fluxo run
--auto --set data.split_seed=SEED --set train.seed=SEED`` runs as a user runs it (ingest, the
race, the winner's training, export, gate). Its test score is the run's own (JSON on stdout).
The baselines are then fitted on the very splits fluxo wrote under ``data/``: scikit-learn's
``StandardScaler`` + ``LogisticRegression`` (or ``Ridge``) and ``HistGradientBoosting`` with
its defaults, each fitted on train+validation (they tune nothing on validation) and scored on
the same test rows. Accuracy for classification, R² for regression; mean ± spread over the
seeds and wall time per fit. Prints a table and writes bench/results/tabular.json.
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
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLUXO = Path(sys.executable).with_name("fluxo")


def _sklearn(name: str) -> Callable[[], Any]:
    def load() -> Any:
        from sklearn import datasets

        frame = getattr(datasets, f"load_{name}")(as_frame=True).frame
        return frame.rename(columns={"target": "label"})

    return load


def _autompg() -> Any:
    import pandas as pd
    from mlxtend.data import autompg_data

    x, y = autompg_data()
    names = ["cylinders", "displacement", "horsepower", "weight", "acceleration", "model_year", "origin"]
    frame = pd.DataFrame(x[:, : len(names)], columns=names)  # the eighth, the car's name, is NaN in mlxtend's copy
    frame["label"] = y
    return frame


# name → (loader, task)
DATASETS: dict[str, tuple[Callable[[], Any], str]] = {
    "breast_cancer": (_sklearn("breast_cancer"), "classification"),
    "wine": (_sklearn("wine"), "classification"),
    "iris": (_sklearn("iris"), "classification"),
    "diabetes": (_sklearn("diabetes"), "regression"),
    "autompg": (_autompg, "regression"),
}


def _split(data: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    shards = sorted((data / name).glob("x-*.npy"))
    x = np.concatenate([np.load(s) for s in shards]).astype(np.float64)
    return x.reshape(len(x), -1), np.load(data / name / "y.npy")


def _baselines(data: Path, task: str, seed: int) -> dict[str, dict[str, float]]:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, val, test = (_split(data, s) for s in ("train", "val", "test"))
    x, y = np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]])
    if task == "regression":
        models = {"linear": make_pipeline(StandardScaler(), Ridge()),
                  "boosted_trees": HistGradientBoostingRegressor(random_state=seed)}
    else:
        models = {"linear": make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
                  "boosted_trees": HistGradientBoostingClassifier(random_state=seed)}
    out = {}
    for name, model in models.items():
        started = time.perf_counter()
        model.fit(x, y)
        out[name] = {"score": float(model.score(*test)), "seconds": time.perf_counter() - started}
    return out


def _fluxo(project: Path, csv: Path, seed: int, budget: float, extra: list[str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUXO_", "MLFLOW_"))}
    started = time.perf_counter()
    done = subprocess.run(
        [str(FLUXO), "run", "--auto", "--budget", str(budget), "--set", f"data.dataset={csv}",
         "--set", f"data.split_seed={seed}", "--set", f"train.seed={seed}", *(a for e in extra for a in ("--set", e))],
        cwd=project, env=env, capture_output=True, text=True, timeout=3600,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"fluxo run failed in {project}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout[done.stdout.index("{"):])
    metrics = result["test_metrics"]
    score = metrics["test_r2"] if "test_r2" in metrics else metrics["test_accuracy"]
    winner = ""
    for line in done.stderr.splitlines():
        if "auto: training the winner," in line:
            winner = line.split("auto: training the winner, ", 1)[1].split(", for up to")[0]
    return {"score": float(score), "seconds": seconds, "winner": winner, "promoted": bool(result.get("promoted"))}


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0, "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=5.0, help="minutes for each race (auto.budget_minutes)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tabular.json"))
    parser.add_argument("--fluxo-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="settings for the fluxo runs, e.g. train.retrain_on_train_val=true (recorded)")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for name in args.datasets:
        load, task = DATASETS[name]
        frame = load()
        runs: dict[str, list[dict[str, Any]]] = {"fluxo_auto": [], "linear": [], "boosted_trees": []}
        for seed in args.seeds:
            with tempfile.TemporaryDirectory(prefix=f"fluxo-tabular-{name}-") as folder:
                project = Path(folder)
                csv = project / f"{name}.csv"
                frame.to_csv(csv, index=False)
                runs["fluxo_auto"].append({"seed": seed, **_fluxo(project, csv, seed, args.budget, args.fluxo_set)})
                for method, scored in _baselines(project / "data", task, seed).items():
                    runs[method].append({"seed": seed, **scored})
            print(f"{name} seed {seed}: " + ", ".join(f"{m} {r[-1]['score']:.4f} ({r[-1]['seconds']:.1f} s)"
                                                      for m, r in runs.items()), flush=True)
        results[name] = entry = {
            "task": task, "rows": len(frame), "columns": frame.shape[1] - 1,
            "metric": "test R²" if task == "regression" else "test accuracy",
            "methods": {m: {"score": _spread([r["score"] for r in rs]),
                            "seconds": _spread([r["seconds"] for r in rs]), "runs": rs} for m, rs in runs.items()},
        }
        record = _write(args, {name: entry})  # after each dataset: a later failure keeps what was measured
    _print(record, args.out)


def _write(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """Merge ``results`` into ``args.out`` (the other datasets' entries of this commit are kept)."""
    out = Path(args.out)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    previous = json.loads(out.read_text()) if out.is_file() else {}
    same = previous.get("commit") == commit.strip() and previous.get("fluxo_settings", []) == args.fluxo_set
    kept = previous.get("datasets", {}) if same else {}
    record = {"benchmark": "tabular", "commit": commit.strip(), "seeds": args.seeds, "budget_minutes": args.budget,
              "fluxo_settings": args.fluxo_set,
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version()},
              "baselines_fitted_on": "train+val", "datasets": {**kept, **results}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _print(record: dict[str, Any], out: str) -> None:
    print("\n| data | task | fluxo --auto | scaled linear | boosted trees | fluxo - best | times (s): fluxo, linear, trees |")
    print("|---|---|---|---|---|---|---|")
    for name, entry in record["datasets"].items():
        m = entry["methods"]
        scores = {k: v["score"] for k, v in m.items()}
        best = max(scores["linear"]["mean"], scores["boosted_trees"]["mean"])
        cells = [f"{scores[k]['mean']:.4f} ± {scores[k]['std']:.4f}" for k in ("fluxo_auto", "linear", "boosted_trees")]
        times = ", ".join(f"{m[k]['seconds']['mean']:.1f}" for k in ("fluxo_auto", "linear", "boosted_trees"))
        print(f"| {name} ({entry['rows']} × {entry['columns']}) | {entry['metric']} | {' | '.join(cells)} | "
              f"{scores['fluxo_auto']['mean'] - best:+.4f} | {times} |")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
