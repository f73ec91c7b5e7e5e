"""``model.name: auto`` against the MLP baseline and the shipped presets, per built-in dataset.

    .venv/bin/python bench/auto.py [--datasets digits mnist mnist1d] [--seeds 0 1 2] [--budget 5]

For each dataset and seed, in one temporary project (SQLite MLflow, local DVC remote):
``train()`` with ``model.name=auto`` (the race within ``--budget`` minutes, then the winner
trained to completion), as the baseline the registry's ``mlp`` trained with the same epochs,
and every shipped preset for the dataset trained as ``bench/accuracy.py`` trains it (its own
config, the same seed, the same data version). The presets' numbers recorded in
bench/results/accuracy.json are kept beside as a reference. Prints mean ± spread of test
accuracy and writes bench/results/auto.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {"digits": ["digits-cnn"], "mnist": ["mnist-cnn", "mnist-lenet"],
           "mnist1d": ["mnist1d-cnn", "mnist1d-gru", "mnist1d-lstm", "mnist1d-resnet"]}
EPOCHS = {"digits": 40, "mnist": 40, "mnist1d": 60}


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0, "n": len(values)}


def recorded_presets(dataset: str) -> dict[str, dict]:
    path = ROOT / "bench" / "results" / "accuracy.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    table = data.get("presets") if isinstance(data.get("presets"), dict) else data
    out = {}
    for name in PRESETS[dataset]:
        entry = table.get(name)
        if isinstance(entry, dict) and "test_accuracy_mean" in entry:
            out[name] = {"mean": entry["test_accuracy_mean"], "std": entry.get("test_accuracy_std"),
                         "commit": data.get("commit")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(PRESETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=5.0, help="minutes for each race")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "auto.json"))
    args = parser.parse_args()
    if len(args.datasets) > 1:  # one process per dataset: each its own MLflow store, nothing cached across
        merged: dict = {}
        for dataset in args.datasets:
            part = Path(tempfile.mkdtemp()) / f"{dataset}.json"
            subprocess.run([sys.executable, __file__, "--datasets", dataset, "--seeds", *map(str, args.seeds),
                            "--budget", str(args.budget), "--out", str(part)], check=True)
            merged = {**json.loads(part.read_text()), "datasets": {**merged.get("datasets", {}),
                                                                   **json.loads(part.read_text())["datasets"]}}
        Path(args.out).write_text(json.dumps(merged, indent=2) + "\n")
        _print(merged, args.out)
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("pipelines.train.auto").setLevel(logging.INFO)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    from mlflow.tracking import MlflowClient

    from pipelines.context import open_run
    from pipelines.data.ingest import ingest, version
    from pipelines.settings import load_settings
    from pipelines.train.run import train, train_and_evaluate
    from pipelines.train.tracker import NullTracker

    results: dict[str, dict] = {}
    for dataset in args.datasets:
        with tempfile.TemporaryDirectory(prefix=f"fluxo-auto-{dataset}-") as scratch:
            work = Path(scratch)
            root = work / "project"
            root.mkdir()
            subprocess.run(["git", "init", "-q", str(root)], check=True)

            def settings(*extra: str):
                return load_settings(None, [f"data.dataset={dataset}", f"data.dvc_remote={work / 'remote'}",
                                            f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
                                            f"train.epochs={EPOCHS[dataset]}", "train.patience=8",
                                            "train.monitor=val_accuracy", *extra])

            base = settings()
            ingest(root, base.data)
            data_version = version(root, base.data)
            auto_rows, mlp_rows = [], []
            preset_rows: dict[str, list[dict]] = {name: [] for name in PRESETS[dataset]}
            for seed in args.seeds:
                started = time.perf_counter()
                chosen = train(open_run(root, settings("model.name=auto", f"auto.budget_minutes={args.budget}",
                                              f"train.seed={seed}")), data_version)
                seconds = time.perf_counter() - started
                client = MlflowClient()
                final = client.get_run(chosen.run_id)
                search = client.get_run(final.data.tags["fluxo.auto.search"])
                auto_rows.append({"seed": seed, "test_accuracy": round(chosen.test_metrics["test_accuracy"], 4),
                                  "winner": search.data.tags.get("fluxo.auto.winner"), "seconds": round(seconds, 1),
                                  "race_seconds": round(search.data.metrics["auto_seconds"], 1)})
                baseline = train(open_run(root, settings("model.name=mlp", f"train.seed={seed}")), data_version)
                mlp_rows.append({"seed": seed, "test_accuracy": round(baseline.test_metrics["test_accuracy"], 4)})
                for name, rows in preset_rows.items():
                    recipe = load_settings(ROOT / "configs" / f"{name}.yaml", [
                        f"data.dvc_remote={work / 'remote'}", f"train.seed={seed}",
                        f"train.checkpoint_dir={work / 'checkpoints'}"])
                    _, metrics, _, fit = train_and_evaluate(root, recipe, data_version, NullTracker(),
                                                            run_key=f"{name}-seed{seed}")
                    rows.append({"seed": seed, "test_accuracy": round(metrics["test_accuracy"], 4),
                                 "train_seconds": round(fit.seconds, 1)})
                presets_text = ", ".join(f"{name} {rows[-1]['test_accuracy']:.4f}" for name, rows in preset_rows.items())
                print(f"{dataset} seed {seed}: auto {auto_rows[-1]['test_accuracy']:.4f} "
                      f"({auto_rows[-1]['winner']}, {seconds:.0f} s), mlp {mlp_rows[-1]['test_accuracy']:.4f}, "
                      f"{presets_text}", flush=True)
            results[dataset] = {
                "auto": {**_spread([r["test_accuracy"] for r in auto_rows]), "runs": auto_rows},
                "mlp_baseline": {**_spread([r["test_accuracy"] for r in mlp_rows]), "runs": mlp_rows},
                "presets": {name: {**_spread([r["test_accuracy"] for r in rows]), "runs": rows}
                            for name, rows in preset_rows.items()},
                "presets_recorded": recorded_presets(dataset),
            }
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
           "budget_minutes": args.budget, "seeds": args.seeds, "datasets": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    _print(out, args.out)


def _print(out: dict, path: str) -> None:
    results = out["datasets"]
    print(f"\nmodel.name=auto, race budget {out['budget_minutes']:g} min, seeds {out['seeds']}, "
          f"{out['machine']['cpus']} CPUs: test accuracy")
    print(f"{'dataset':9} {'auto':>16} {'mlp baseline':>16} {'best preset (this run)':>33} "
          f"{'(recorded)':>10}  winners")
    for dataset, row in results.items():
        presets = row.get("presets") or {}
        best = max(presets.items(), key=lambda kv: kv[1]["mean"]) if presets else None
        best_text = f"{best[0]} {best[1]['mean']:.4f} ± {best[1]['std']:.4f}" if best else "—"
        recorded = row["presets_recorded"].get(best[0]) if best else None
        recorded_text = f"{recorded['mean']:.4f}" if recorded else "—"
        winners = "; ".join(sorted({r["winner"] for r in row["auto"]["runs"]}))
        print(f"{dataset:9} {row['auto']['mean']:.4f} ± {row['auto']['std']:.4f} "
              f"{row['mlp_baseline']['mean']:.4f} ± {row['mlp_baseline']['std']:.4f} {best_text:>33} "
              f"{recorded_text:>10}  {winners}")
    print(f"wrote {Path(path).relative_to(ROOT) if Path(path).is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
