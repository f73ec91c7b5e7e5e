"""How long the light `fluxo` commands take to start, against fluxo at an earlier commit, in one run.

    .venv/bin/python bench/startup.py [--baseline-ref 8c9a2ee] [--repeats 7]

Each command runs as a fresh process (what a user pays at the prompt), alternating between
this checkout and a temporary `git worktree` of the baseline commit run with the same
interpreter, so both sides see the same machine load. Beside them: the interpreter alone
and `import torch`, the floor and the cost that `--help` used to pay. Prints a table of
medians and writes bench/results/startup.json. Runs nothing but local processes.
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
COMMANDS = {
    "fluxo --help": ["-m", "pipelines.cli", "--help"],
    "fluxo serve --help": ["-m", "pipelines.cli", "serve", "--help"],
    "fluxo train --help": ["-m", "pipelines.cli", "train", "--help"],
}
FLOORS = {"python -c pass": ["-c", "pass"], "python -c 'import torch'": ["-c", "import torch"]}


def wall(argv: list[str], source: Path) -> float:
    """Seconds from spawn to exit; the source tree goes first on the path, ahead of the editable install."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=source, env=env, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", default="8c9a2ee", help="commit to compare with (before the torch-free CLI)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "startup.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        baseline = Path(scratch) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline_ref], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            samples: dict[str, dict[str, list[float]]] = {}
            for name, argv in COMMANDS.items():
                wall(argv, ROOT), wall(argv, baseline)  # warm the file cache for both
                runs = {"fluxo": [], "baseline": []}
                for _ in range(args.repeats):
                    runs["fluxo"].append(wall(argv, ROOT))
                    runs["baseline"].append(wall(argv, baseline))
                samples[name] = runs
            for name, argv in FLOORS.items():
                samples[name] = {"floor": [wall(argv, ROOT) for _ in range(args.repeats)]}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, capture_output=True)

    rows = []
    print(f"{'command':28} {'fluxo (s)':>10} {f'{args.baseline_ref} (s)':>14} {'speed-up':>9}")
    for name, runs in samples.items():
        medians = {side: statistics.median(values) for side, values in runs.items()}
        if "floor" in medians:
            print(f"{name:28} {medians['floor']:10.3f}")
        else:
            ratio = medians["baseline"] / medians["fluxo"]
            print(f"{name:28} {medians['fluxo']:10.3f} {medians['baseline']:14.3f} {ratio:8.1f}x")
        rows.append({"command": name, "median_s": medians, "samples_s": runs})
    result = {
        "benchmark": "startup",
        "baseline_ref": args.baseline_ref,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
