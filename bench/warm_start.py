"""Warm start vs from scratch when new data arrives: epochs and seconds to the champion's accuracy.

    .venv/bin/python bench/warm_start.py [--config configs/mnist1d-cnn.yaml] [--epochs 40] [--seeds 0 1 2]

A user's sequence file ``sensor.npz`` holds MNIST-1D sequences from the generator with seed
0; the preset trains on it and is exported: the champion ``fluxo-sensor``. Then the file is
replaced by fresh sequences of the same kind (generator seed 1, as a week of new data would
be), ingested as a new data version, and trained on twice per seed with the same preset and
epochs: from random weights and with ``train.init_from=champion``. Each run's per-epoch
validation accuracy (MLflow) gives the first epoch at which it reaches the champion's own
best validation accuracy, and the seconds to get there (its mean epoch time x epochs).

Prints a table and writes bench/results/warm_start.json.
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_sequences(path: Path, seed: int) -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)[:, None, :]
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    np.savez(path, x=x, y=y)


def curve(client, run_id: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, "val_accuracy"), key=lambda m: m.step)]


def to_target(values: list[float], target: float, seconds: float) -> tuple[int | None, float | None]:
    epoch = next((i + 1 for i, v in enumerate(values) if v >= target), None)
    return epoch, (None if epoch is None else round(seconds / len(values) * epoch, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "mnist1d-cnn.yaml"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    from mlflow.tracking import MlflowClient

    from pipelines.context import open_run
    from pipelines.data.ingest import ingest, version
    from pipelines.release import export_run
    from pipelines.settings import load_settings
    from pipelines.train.run import train

    with tempfile.TemporaryDirectory(prefix="fluxo-warm-bench-") as scratch:
        work = Path(scratch)
        root = work / "project"
        root.mkdir()
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        source = work / "sensor.npz"

        def settings(*extra: str):
            return load_settings(Path(args.config), [f"data.dataset={source}", f"data.dvc_remote={work / 'remote'}",
                                                     f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
                                                     f"train.epochs={args.epochs}", *extra])

        write_sequences(source, seed=0)
        first = settings()
        ingest(root, first.data)
        champion = train(open_run(root, first), version(root, first.data))
        export_run(open_run(root, first), champion.run_id)
        client = MlflowClient()
        target = max(curve(client, champion.run_id))

        write_sequences(source, seed=1)  # new data of the same kind replaces the file
        ingest(root, first.data)
        data_version = version(root, first.data)
        rows: dict[str, list[dict]] = {"scratch": [], "warm": []}
        for seed in args.seeds:
            for way, extra in (("scratch", ()), ("warm", ("train.init_from=champion",))):
                result = train(open_run(root, settings(f"train.seed={seed}", *extra)), data_version)
                values = curve(client, result.run_id)
                metrics = client.get_run(result.run_id).data.metrics
                epoch, seconds = to_target(values, target, metrics["train_seconds"])
                rows[way].append({"seed": seed, "epochs_to_target": epoch, "seconds_to_target": seconds,
                                  "first_epoch_val_accuracy": round(values[0], 4),
                                  "best_val_accuracy": round(max(values), 4),
                                  "test_accuracy": round(result.test_metrics["test_accuracy"], 4),
                                  "train_seconds": round(metrics["train_seconds"], 2)})

    def mean(way: str, key: str) -> float | None:
        values = [r[key] for r in rows[way] if r[key] is not None]
        return round(statistics.mean(values), 3) if values else None

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_relative_to(ROOT) else args.config,
        "epochs": args.epochs, "seeds": args.seeds,
        "champion": {"run_id": champion.run_id, "best_val_accuracy": round(target, 4),
                     "test_accuracy": round(champion.test_metrics["test_accuracy"], 4)},
        "runs": rows,
        "summary": {way: {key: mean(way, key) for key in ("epochs_to_target", "seconds_to_target",
                                                           "first_epoch_val_accuracy", "best_val_accuracy",
                                                           "test_accuracy")} for way in rows},
    }
    out = ROOT / "bench" / "results" / "warm_start.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nchampion ({result['config']}, {args.epochs} epochs on generator seed 0): best val accuracy {target:.4f}")
    print(f"new data (generator seed 1), {len(args.seeds)} seeds, {args.epochs} epochs each, on {os.cpu_count()} CPUs")
    print(f"{'start':10} {'epochs to target':>17} {'s to target':>12} {'epoch-1 val':>12} {'best val':>9} {'test':>7}")
    for way in rows:
        s = result["summary"][way]
        reached = sum(r["epochs_to_target"] is not None for r in rows[way])
        print(f"{way:10} {str(s['epochs_to_target']) + f' ({reached}/{len(rows[way])})':>17} "
              f"{str(s['seconds_to_target']):>12} {s['first_epoch_val_accuracy']:>12} {s['best_val_accuracy']:>9} "
              f"{s['test_accuracy']:>7}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
