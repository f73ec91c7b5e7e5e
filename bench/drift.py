"""Which drift test for `fluxo monitor`: candidates on the same windows, one run.

    .venv/bin/python bench/drift.py                  # trains mnist-lenet and mnist1d-gru briefly, then measures
    .venv/bin/python bench/drift.py --work /tmp/dw    # reuse projects trained by an earlier run

For each dataset a model is trained with ``fluxo run`` (8 epochs). The reference is a
random sample of the validation split of its data version; clean windows are random
samples of the test split (no drift: both are held out from training), shifted windows
are test samples changed the way real inputs change (images inverted, rotated, noised;
sequences scaled, offset, noised). Each candidate decides drift at ``--alpha`` on each
window; the table gives the detection rate per shift, the false-positive rate on clean
windows and the seconds per decision.

Candidates: hyppo's MMD with its chi-square null approximation (fast), hyppo's MMD with
a permutation null, frouros' MMD with its permutation-test callback, all on the model's
embedding (pipelines/monitor/embedding.py); and hyppo's fast MMD on the raw inputs, to
show what the embedding buys. The permutation candidates run on fewer windows
(``--slow-windows``): at seconds per decision, the whole grid would take an hour.

frouros pins numpy < 2.2 and scipy < 1.15, which would downgrade fluxo's whole stack, so it
is not a dependency: ``.venv/bin/pip install --no-deps frouros==0.9.0`` adds it for this
benchmark (its MMD runs on numpy 2.4), and without it that row is skipped.

Writes bench/results/drift.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.data.store import read_dataset  # noqa: E402
from pipelines.monitor.embedding import Embedder  # noqa: E402
from pipelines.monitor.shifts import IMAGE_SHIFTS, SEQUENCE_SHIFTS  # noqa: E402

PROJECTS = {"mnist-lenet": "image", "mnist1d-gru": "sequence"}


def train(work: Path, preset: str) -> Path:
    project = work / preset
    if (project / ".fluxo" / "serve").is_dir():
        return project
    project.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(ROOT / "configs" / f"{preset}.yaml"),
                    "--set", "train.epochs=8", "--root", str(project)], check=True, cwd=project,
                   stdout=subprocess.DEVNULL)
    return project


def served_model(project: Path) -> Path:
    return next(p for p in sorted((project / ".fluxo" / "serve").iterdir()) if (p / "model.onnx").is_file())


def hyppo_fast(reference: np.ndarray, window: np.ndarray, seed: int) -> float:
    from hyppo.ksample import MMD

    return float(MMD().test(reference, window, auto=True)[1])


def hyppo_permutation(reference: np.ndarray, window: np.ndarray, seed: int, reps: int = 200) -> float:
    from hyppo.ksample import MMD

    return float(MMD().test(reference, window, reps=reps, auto=False, random_state=seed)[1])


def frouros_permutation(reference: np.ndarray, window: np.ndarray, seed: int, reps: int = 200) -> float:
    from frouros.callbacks import PermutationTestDistanceBased
    from frouros.detectors.data_drift import MMD
    from frouros.utils.kernels import rbf_kernel
    from scipy.spatial.distance import pdist

    sigma = float(np.median(pdist(reference)))  # the median heuristic, as hyppo's gaussian kernel uses
    detector = MMD(kernel=partial(rbf_kernel, sigma=sigma),
                   callbacks=PermutationTestDistanceBased(num_permutations=reps, random_state=seed, num_jobs=1))
    detector.fit(reference)
    _, logs = detector.compare(window)
    return float(logs["PermutationTestDistanceBased"]["p_value"])


def fluxo_monitor(reference: dict[str, np.ndarray], window: dict[str, np.ndarray], alpha: float) -> bool:
    """What `fluxo monitor` decides: each signal in use at alpha / their number (pipelines/monitor/detect.py)."""
    from pipelines.monitor.detect import compare
    from pipelines.monitor.signals import Sample

    findings = compare(Sample(reference["raw"], reference["embedding"], reference["probabilities"]),
                       Sample(window["raw"], window["embedding"], window["probabilities"]), alpha)
    return any(finding.test.drift for finding in findings.values())


def fluxo_monitor_row() -> str:
    """The row's name: the signals in use and their share of alpha."""
    from pipelines.monitor.signals import in_use

    names = [signal.name for signal in in_use()]
    return f"fluxo monitor: {' + '.join(names)}, alpha/{len(names)} each"


CANDIDATES: dict[str, tuple[Callable[..., float], str, bool]] = {
    # name: (test, features, slow)
    "hyppo MMD chi2-approx (embedding)": (hyppo_fast, "embedding", False),
    "hyppo MMD chi2-approx (raw input)": (hyppo_fast, "raw", False),
    "hyppo MMD chi2-approx (probabilities)": (hyppo_fast, "probabilities", False),
    "hyppo MMD permutation (embedding)": (hyppo_permutation, "embedding", True),
    "frouros MMD permutation (embedding)": (frouros_permutation, "embedding", True),
}


def features(embedder: Embedder, x: np.ndarray) -> dict[str, np.ndarray]:
    embedded = embedder(x)
    return {"embedding": embedded.embeddings, "probabilities": embedded.probabilities,
            "raw": x.reshape(len(x), -1).astype(np.float32)}


def measure(project: Path, kind: str, args: argparse.Namespace) -> dict:
    dataset = read_dataset(project / "data", mmap=False)
    embedder = Embedder(served_model(project) / "model.onnx")
    rng = np.random.default_rng(args.seed)
    val, test = dataset.splits["val"].x, dataset.splits["test"].x
    reference = features(embedder, val[rng.choice(len(val), min(args.reference, len(val)), replace=False)])
    shifts = IMAGE_SHIFTS if kind == "image" else SEQUENCE_SHIFTS
    scale = float(np.std(dataset.splits["train"].x))
    windows: dict[str, list[dict[str, np.ndarray]]] = {"clean": []}
    for i in range(args.windows):
        windows["clean"].append(features(embedder, test[rng.choice(len(test), args.window, replace=False)]))
    for name, shift in shifts.items():
        windows[name] = []
        for i in range(args.shift_windows):
            sample = test[rng.choice(len(test), args.window, replace=False)]
            windows[name].append(features(embedder, shift(sample, np.random.default_rng(args.seed + i), scale)))
    rows = {}
    for candidate, (test_fn, feature, slow) in CANDIDATES.items():
        if test_fn is frouros_permutation and importlib.util.find_spec("frouros") is None:
            print(f"  {candidate}: skipped (pip install --no-deps frouros==0.9.0)")
            continue
        row: dict[str, object] = {}
        seconds, decisions = 0.0, 0
        for name, group in windows.items():
            group = group[: args.slow_windows] if slow else group
            detected = 0
            for i, window in enumerate(group):
                started = time.perf_counter()
                p_value = test_fn(reference[feature], window[feature], args.seed + i)
                seconds += time.perf_counter() - started
                decisions += 1
                detected += int(p_value < args.alpha)
            row[name] = {"windows": len(group), "detected": detected, "rate": detected / max(len(group), 1)}
        row["seconds_per_decision"] = seconds / max(decisions, 1)
        rows[candidate] = row
        print(f"  {candidate}: clean FPR {row['clean']['rate']:.2f}, {row['seconds_per_decision']:.3f} s/decision",
              flush=True)
    row = {}
    started, decisions = time.perf_counter(), 0
    for name, group in windows.items():
        detected = sum(fluxo_monitor(reference, window, args.alpha) for window in group)
        decisions += len(group)
        row[name] = {"windows": len(group), "detected": detected, "rate": detected / max(len(group), 1)}
    row["seconds_per_decision"] = (time.perf_counter() - started) / max(decisions, 1)
    rows[fluxo_monitor_row()] = row
    return {"reference": len(reference["embedding"]), "window": args.window,
            "embedding_dims": int(reference["embedding"].shape[1]), "candidates": rows}


def table(results: dict) -> str:
    lines = []
    for preset, result in results["datasets"].items():
        shifts = [k for k in next(iter(result["candidates"].values())) if k not in ("clean", "seconds_per_decision")]
        lines.append(f"\n{preset}: reference {result['reference']}, window {result['window']}, "
                     f"embedding {result['embedding_dims']} dims, alpha {results['alpha']}")
        lines.append(f"| candidate | clean FPR | {' | '.join(shifts)} | s/decision |")
        lines.append("|---|---|" + "---|" * len(shifts) + "---|")
        for name, row in result["candidates"].items():
            cells = [f"{row[s]['detected']}/{row[s]['windows']}" for s in shifts]
            lines.append(f"| {name} | {row['clean']['detected']}/{row['clean']['windows']} | {' | '.join(cells)} | "
                         f"{row['seconds_per_decision']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="Where the trained projects live (kept).")
    parser.add_argument("--windows", type=int, default=40, help="Clean windows per dataset.")
    parser.add_argument("--shift-windows", type=int, default=10, help="Windows per shift.")
    parser.add_argument("--slow-windows", type=int, default=5, help="Windows per group for permutation candidates.")
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--reference", type=int, default=500)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fluxo-drift-"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               "alpha": args.alpha, "datasets": {}}
    for preset, kind in PROJECTS.items():
        print(f"{preset}: training (fluxo run, 8 epochs) in {work}", flush=True)
        project = train(work, preset)
        results["datasets"][preset] = measure(project, kind, args)
    print(table(results))
    out = ROOT / "bench" / "results" / "drift.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
