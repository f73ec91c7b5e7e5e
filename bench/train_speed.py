"""Training speed: fluxo's engine vs a plain PyTorch DataLoader loop vs a Lightning Trainer, in one run.

    .venv/bin/python bench/train_speed.py [--steps 6000] [--repeats 1] [--device auto]

All three train the MNIST-1D paper's recipe on the same device, from the same initial
weights: the paper's 1-D CNN (``cnn1d``, 25 channels), Adam lr 1e-2, batch 100, no
weight decay, a fixed number of optimiser steps (the paper's 6,000 by default), on the
generator's 4,000 training sequences; the 1,000 test sequences are evaluated once per
epoch (40 steps) by all three, because fluxo's engine always validates after an epoch
and the comparison should be the same work. Test accuracy is that of the final weights.

- **fluxo**: ``pipelines.train.engine.fit`` over ``ResidentBatches`` (the whole split on
  the device, each step a gather). ``fit`` counts epochs, so steps are rounded up to
  whole epochs and the baselines run the same count. It also keeps the best epoch's
  weights; we read the final weights' accuracy from the last epoch's record instead, so
  all three report the same thing (the test split stands in for validation here).
- **plain**: ``TensorDataset`` + ``DataLoader(shuffle=True)`` on the host, each batch
  copied to the device, the textbook loop.
- **lightning**: a ``LightningModule`` under ``Trainer(max_steps=...)``, no logger,
  no checkpointing, no progress bar, no sanity check.

On CUDA all three run fp32 by default; ``--bf16`` autocasts all three (fluxo's
``train.precision=bf16``, autocast for plain, ``precision="bf16-mixed"`` for Lightning).
``--fluxo-compile reduce-overhead`` runs fluxo with ``train.compile`` (forward/backward
and the optimiser step compiled, the learning rate a tensor, CUDA graphs on a GPU);
the compile time is part of its wall time. ``--threads 1`` pins torch's intra-op threads
(on a CPU shared with other jobs, two spinning threads for a model this small can be
several times slower than one, and far noisier). ``--repeats`` interleaves the three per repeat
and reports the median, since the CPU may be shared. Prints a table and writes
bench/results/train_speed.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH_SIZE = 100
LEARNING_RATE = 1e-2
H100_REFERENCE = {
    "note": "paper recipe (6,000 steps) on one H100, from an earlier throwaway run; not reproduced here",
    "lightning": {"seconds": 23.2, "test_accuracy": 0.940},
    "plain": {"seconds": 17.8, "test_accuracy": 0.929},
}


def machine(device) -> dict:
    from environment import torch_machine  # bench/environment.py

    info = torch_machine(device)
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:
        pass
    return info


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accuracy(model, x, y) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).sum()
    model.train()
    return float(correct) / len(y)


def run_fluxo(model, data: dict, steps: int, device, seed: int, compile_mode: str = "off", bf16: bool = False) -> dict:
    from pipelines.data.store import Split
    from pipelines.train.batches import ResidentBatches
    from pipelines.settings import TrainSettings
    from pipelines.train.callbacks import Callback
    from pipelines.train.engine import FitConfig, fit

    train = ResidentBatches(Split([data["x_train"]], data["y_train"]), BATCH_SIZE, device, seed)
    test = ResidentBatches(Split([data["x_test"]], data["y_test"]), BATCH_SIZE, device, seed)
    epochs = steps // (len(data["y_train"]) // BATCH_SIZE)
    final: dict = {}
    config = FitConfig.from_settings(TrainSettings(
        epochs=epochs, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE, weight_decay=0.0,
        patience=epochs + 1, seed=seed, optimizer="adam",
        compile=compile_mode != "off", compile_mode="default" if compile_mode == "off" else compile_mode,
        precision="bf16" if bf16 else "fp32",
    ))

    class LastEpoch(Callback):
        def on_epoch_end(self, state) -> None:
            final.update(state.record)

    sync(device)
    started = time.perf_counter()
    result = fit(model, train, test, config, [LastEpoch()])
    sync(device)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "test_accuracy": final["val_accuracy"],  # the final weights, before fit restores the best epoch
        "best_epoch_test_accuracy": max(r["val_accuracy"] for r in result.history),
    }


def run_plain(model, data: dict, steps: int, device, seed: int, bf16: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(
        TensorDataset(torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])),
        batch_size=BATCH_SIZE, shuffle=True, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )
    x_test = torch.from_numpy(data["x_test"]).to(device)
    y_test = torch.from_numpy(data["y_test"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    step = 0
    sync(device)
    started = time.perf_counter()
    model.train()
    while step < steps:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
        with autocast:
            final = accuracy(model, x_test, y_test)  # once per epoch, like the engine's validation
    sync(device)
    return {"seconds": time.perf_counter() - started, "test_accuracy": final}


def run_lightning(model, data: dict, steps: int, device, seed: int, bf16: bool) -> dict:
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)  # Lightning resets its level on import

    class PaperCNN(L.LightningModule):
        def __init__(self, net) -> None:
            super().__init__()
            self.net = net
            self.correct = 0
            self.count = 0

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def on_validation_epoch_start(self) -> None:
            self.correct, self.count = 0, 0

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.correct += int((self.net(x).argmax(1) == y).sum())
            self.count += len(y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=LEARNING_RATE)

    pin = device.type == "cuda"
    train = DataLoader(
        TensorDataset(torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])),
        batch_size=BATCH_SIZE, shuffle=True, pin_memory=pin, generator=torch.Generator().manual_seed(seed),
    )
    test = DataLoader(
        TensorDataset(torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"])),
        batch_size=len(data["y_test"]), pin_memory=pin,
    )
    module = PaperCNN(model)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if bf16 else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
    )
    sync(device)
    started = time.perf_counter()
    trainer.fit(module, train, test)
    sync(device)
    seconds = time.perf_counter() - started
    x_test = torch.from_numpy(data["x_test"]).to(device)
    y_test = torch.from_numpy(data["y_test"]).to(device)
    return {"seconds": seconds, "test_accuracy": accuracy(model.to(device), x_test, y_test)}


def warm_up(device, data: dict) -> None:
    """CUDA context, cuDNN autotuning and kernel loading would otherwise be charged to whoever runs first."""
    import torch
    import torch.nn.functional as F

    from models import build_model

    model = build_model("cnn1d", (1, 40), 10).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    x = torch.from_numpy(data["x_train"][:BATCH_SIZE]).to(device)
    y = torch.from_numpy(data["y_train"][:BATCH_SIZE]).to(device)
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sync(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6000, help="optimiser steps (rounded up to whole epochs of 40)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--bf16", "--bf16-baselines", dest="bf16_baselines", action="store_true",
                        help="on CUDA: bf16 autocast for all three")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: torch's choice); 1 is steadier on a shared CPU",
    )
    parser.add_argument(
        "--fluxo-compile", default="off", choices=["off", "default", "reduce-overhead", "max-autotune"],
        help="train.compile for fluxo's run (reduce-overhead: CUDA graphs on a GPU); compile time is included",
    )
    parser.add_argument("--only", nargs="+", choices=["fluxo", "plain", "lightning"], default=["fluxo", "plain", "lightning"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_speed.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch

    from models import build_model
    from pipelines.data.sources import load_mnist1d
    from pipelines.train.engine import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    bf16 = bool(args.bf16_baselines and device.type == "cuda")
    raw = load_mnist1d()
    test_mask = raw.fixed_test
    data = {
        "x_train": np.ascontiguousarray(raw.x[~test_mask]), "y_train": raw.y[~test_mask],
        "x_test": np.ascontiguousarray(raw.x[test_mask]), "y_test": raw.y[test_mask],
    }
    steps_per_epoch = len(data["y_train"]) // BATCH_SIZE
    steps = -(-args.steps // steps_per_epoch) * steps_per_epoch

    torch.manual_seed(args.seed)
    initial = build_model("cnn1d", tuple(raw.x.shape[1:]), len(raw.labels)).state_dict()
    warm_up(device, data)

    def fresh():
        model = build_model("cnn1d", tuple(raw.x.shape[1:]), len(raw.labels))
        model.load_state_dict(copy.deepcopy(initial))
        return model.to(device)

    runners = {
        "fluxo": lambda: run_fluxo(fresh(), data, steps, device, args.seed, args.fluxo_compile, bf16),
        "plain": lambda: run_plain(fresh(), data, steps, device, args.seed, bf16),
        "lightning": lambda: run_lightning(fresh(), data, steps, device, args.seed, bf16),
    }
    trials: dict[str, list[dict]] = {name: [] for name in args.only}
    for repeat in range(args.repeats):
        for name in args.only:
            torch.manual_seed(args.seed + repeat)
            cpu_started = time.process_time()
            outcome = runners[name]()
            outcome["cpu_seconds"] = time.process_time() - cpu_started  # includes the final evaluation
            if args.threads and torch.get_num_threads() != args.threads:
                torch.set_num_threads(args.threads)  # in case a trainer changed it
            trials[name].append(outcome)
            print(f"repeat {repeat + 1}/{args.repeats} {name:9s} {outcome['seconds']:7.2f} s  "
                  f"(cpu {outcome['cpu_seconds']:7.2f} s)  "
                  f"test {outcome['test_accuracy']:.4f}", flush=True)

    samples = steps * BATCH_SIZE
    results = {}
    for name, runs in trials.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        results[name] = {
            "seconds": round(seconds, 3),
            "seconds_all": [round(r["seconds"], 3) for r in runs],
            "cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in runs), 3),
            "cpu_seconds_all": [round(r["cpu_seconds"], 3) for r in runs],
            "steps_per_second": round(steps / seconds, 1),
            "samples_per_second": round(samples / seconds, 1),
            "test_accuracy": round(statistics.mean(r["test_accuracy"] for r in runs), 4),
            "test_accuracy_all": [r["test_accuracy"] for r in runs],
            **({"best_epoch_test_accuracy": max(r["best_epoch_test_accuracy"] for r in runs)} if name == "fluxo" else {}),
        }
    ratios = {}
    if "fluxo" in results:
        for base in ("plain", "lightning"):
            if base in results:
                ratios[f"fluxo_speedup_vs_{base}"] = round(results[base]["seconds"] / results["fluxo"]["seconds"], 2)
                ratios[f"fluxo_cpu_time_ratio_vs_{base}"] = round(results[base]["cpu_seconds"] / results["fluxo"]["cpu_seconds"], 2)
    if "plain" in results and "lightning" in results:
        ratios["plain_speedup_vs_lightning"] = round(results["lightning"]["seconds"] / results["plain"]["seconds"], 2)

    print(f"\nMNIST-1D paper recipe, {steps} steps x batch {BATCH_SIZE} on {device} "
          f"({'bf16 baselines' if bf16 else 'fp32'}), median of {args.repeats}")
    print(f"{'trainer':10s} {'wall s':>8s} {'cpu s':>8s} {'steps/s':>9s} {'samples/s':>10s} {'test acc':>9s} "
          f"{'fluxo speedup (wall/cpu)':>25s}")
    for name, r in results.items():
        speedup = "-"
        if "fluxo" in results and name != "fluxo":
            speedup = f"{r['seconds'] / results['fluxo']['seconds']:.2f}x / {r['cpu_seconds'] / results['fluxo']['cpu_seconds']:.2f}x"
        print(f"{name:10s} {r['seconds']:8.2f} {r['cpu_seconds']:8.2f} {r['steps_per_second']:9.1f} "
              f"{r['samples_per_second']:10.0f} {r['test_accuracy']:9.4f} {speedup:>25s}")

    report = {
        "benchmark": "train_speed",
        "recipe": {
            "dataset": "mnist1d (generator defaults, 4,000 train / 1,000 test)",
            "model": "cnn1d (paper CNN, 25 channels)",
            "optimizer": "adam", "learning_rate": LEARNING_RATE, "batch_size": BATCH_SIZE,
            "steps": steps, "steps_requested": args.steps, "epochs": steps // steps_per_epoch,
            "evaluation": "test split once per epoch in all three; accuracy of the final weights",
            "precision": "bf16 autocast for all" if bf16 else "fp32 for all",
            "fluxo_compile": args.fluxo_compile,
        },
        "machine": machine(device),
        "repeats": args.repeats,
        "results": results,
        "ratios": ratios,
        "notes": [
"--bf16 autocasts all three on CUDA; --fluxo-compile compiles fluxo's step (its compile time counts).",
            "fluxo's fit() validates and deep-copies the best state every epoch, and counts epochs, not steps.",
            "On a shared CPU compare only ratios measured in the same run; cpu_seconds (process CPU time) is "
            "less disturbed by other jobs than wall seconds when one torch thread is used.",
        ],
        "reference_h100": H100_REFERENCE,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
