"""Where the CPU of one ``POST /predict`` goes: py-spy on the workers under load, now and at a git ref.

    .venv/bin/python bench/profile_serve.py --model DIR [--baseline REF] [--duration 10] [--rounds 2]

Serves the model directory twice, as the working tree's ``serving/`` and as committed at
``--baseline`` (bench/serve.py's ``start_baseline``: ``git archive``, nothing checked out), both
started first, then measured in turn (order reversed each round): 32 closed-loop clients of
bench/serve.py's load for ``--duration`` seconds while ``py-spy record`` samples every worker
(200 Hz, ``--nonblocking``, idle samples left out). Each sample is put in one bucket by its
innermost frame that names one (the table's rows), so the buckets add up to the workers' busy
samples; their shares times the server CPU per request measured in the same cell give
microseconds per request. Prints the table and writes bench/results/profile_serve.json.
Needs py-spy (``pip install py-spy``; the ``bench`` extra has it).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve import (  # noqa: E402  (bench/serve.py)
    Target,
    held_out_instances,
    machine,
    start_baseline,
    start_fluxo,
    stop_server,
    write,
)

# Innermost match wins: a socket write reached through eight middlewares counts as the socket write.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("model run (ONNX Runtime)", ("onnxruntime/",)),
    ("metrics (prometheus_client, serving/metrics.py)", ("prometheus_client/", "serving/metrics.py")),
    ("parse + validate (orjson, serving/schemas.py)", ("serving/schemas.py", "parse_json", "only_numbers", "numpy/")),
    ("batching (serving/batching.py, model thread)", ("serving/batching.py", "concurrent/futures/")),
    ("HTTP protocol + socket I/O (uvicorn, httptools)", ("uvicorn/protocols/",)),
    ("framework: middlewares, routing, request objects", ("starlette/", "fastapi/", "bentoml/", "_bentoml_impl/",
                                                          "opentelemetry/", "asgi/__init__.py", "http/__init__.py",
                                                          "uvicorn/middleware/", "anyio/", "contextlib.py",
                                                          "_weakrefset.py")),
    ("fluxo handler (serving/app.py, routes, server, admission, fastpath.py)", ("serving/app.py", "serving/routes_", "serving/server.py", "serving/http.py", "serving/admission.py", "serving/fastpath.py", "serving/runtime.py")),
    ("event loop (uvloop, asyncio)", ("asyncio/", "uvicorn/server.py", "uvicorn/_compat.py")),
]
OTHER = "other"


def bucket_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in BUCKETS:
            if any(needle in frame for needle in needles):
                return name
    return OTHER


def read_profile(paths: list[Path]) -> collections.Counter[str]:
    """py-spy's raw (collapsed) stacks: ``frame;frame;... count`` per line."""
    counts: collections.Counter[str] = collections.Counter()
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if stack and n.isdigit():
                counts[bucket_of(stack.split(";"))] += int(n)
    return counts


def profiled_cell(target: Target, seconds: float, out: Path, py_spy: str) -> dict[str, Any]:
    """One loaded cell with py-spy on every worker; the row of bench/serve.py plus the buckets."""
    target.load.run(8, 1.0)  # warm
    workers = psutil.Process(target.server.process.pid).children(recursive=True)
    out.mkdir(parents=True, exist_ok=True)
    spies = [subprocess.Popen([py_spy, "record", "-p", str(w.pid), "-d", str(int(seconds) + 1), "-r", "200",
                               "-f", "raw", "-o", str(out / f"{w.pid}.txt"), "--nonblocking"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for w in workers]
    time.sleep(0.5)  # py-spy attached before the load starts
    row = target.cell(32, seconds, warmup=0)
    for spy in spies:
        spy.wait(timeout=60)
    counts = read_profile(sorted(out.glob("*.txt")))
    total = sum(counts.values()) or 1
    row["samples"] = total
    row["buckets"] = {name: {"share": round(counts[name] / total, 4),
                             "us_per_request": round(counts[name] / total * row["server_cpu_ms_per_request"] * 1000, 1)}
                      for name in [*(b for b, _ in BUCKETS), OTHER]}
    return row


def median_cell(cells: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(cells, key=lambda c: c["server_cpu_ms_per_request"])[len(cells) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a model directory (export or served copy)")
    parser.add_argument("--baseline", default=None, help="also profile serving/ as committed at this git ref")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile_serve.json")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    from serving.contract import read_model_dir

    model_dir = args.model.resolve()
    metadata = read_model_dir(model_dir).metadata.model_dump()
    labels = list(metadata["labels"])

    from pipelines.settings import load_settings

    instances = held_out_instances(load_settings(), metadata)  # data/'s test split, else the built-in source
    import onnxruntime as ort

    from serving.runtime import CPU, softmax

    reference = ort.InferenceSession(str(model_dir / "model.onnx"), providers=[CPU])
    expected = [labels[i] for i in softmax(reference.run(None, {"input": instances})[0]).argmax(1)]
    logs = Path(tempfile.mkdtemp(prefix="fluxo-profile-"))
    result: dict[str, Any] = {"machine": machine(), "model": {k: metadata.get(k) for k in ("model_name", "architecture",
                                                                                           "input_shape")},
                              "clients": 32, "duration_s": args.duration, "rounds": args.rounds}
    targets: dict[str, Target] = {}
    try:
        targets["now"] = Target(start_fluxo("fluxo (working tree)", model_dir, {}, logs / "now.log"),
                                instances, expected, labels)
        if args.baseline:
            server, commit = start_baseline(args.baseline, model_dir, logs / "baseline.log", before_rollout=False)
            server.name = f"fluxo at {commit}"
            targets["baseline"] = Target(server, instances, expected, labels)
        cells: dict[str, list[dict[str, Any]]] = {key: [] for key in targets}
        for round_ in range(args.rounds):
            order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
            for key in order:
                cells[key].append(profiled_cell(targets[key], args.duration, logs / f"{key}-{round_}", py_spy))
    finally:
        for target in targets.values():
            stop_server(target.server.process)
    result["servers"] = {key: {"name": targets[key].server.name, **median_cell(cells[key])} for key in targets}
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write(result, args.out)
    print_table(result)


def print_table(result: dict[str, Any]) -> None:
    servers = result["servers"]
    keys = list(servers)
    print("\n| where the CPU goes (32 clients) | " + " | ".join(servers[k]["name"] for k in keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name in [*(b for b, _ in BUCKETS), OTHER]:
        cells = [f"{servers[k]['buckets'][name]['us_per_request']:.0f} µs ({servers[k]['buckets'][name]['share']:.0%})"
                 for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| **server CPU per request** | " + " | ".join(f"**{servers[k]['server_cpu_ms_per_request'] * 1000:.0f} µs**"
                                                   for k in keys) + " |")
    print("| requests/s, p99 | " + " | ".join(f"{servers[k]['requests_per_s']:.0f}, {servers[k]['p99_ms']} ms"
                                              for k in keys) + " |")


if __name__ == "__main__":
    main()
