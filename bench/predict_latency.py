"""Single-request /predict latency of the served champion vs ONNX Runtime in-process, in one run.

    .venv/bin/python bench/predict_latency.py [--requests 300] [--config configs/digits-cnn.yaml]

Starts `bentoml serve` on a free loopback port for the champion (or --model), sends
sequential one-instance requests over one keep-alive connection, and times the same
instances through an in-process ONNX Runtime session: the floor any server adds to.
Prints a table and writes bench/results/predict_latency.json. Loopback only, bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.context import open_run  # noqa: E402
from pipelines.settings import load_settings  # noqa: E402
from pipelines.data.store import read_dataset  # noqa: E402
from pipelines.registry.store import materialize_model  # noqa: E402
from serving import ServingConfig  # noqa: E402
from serving.launch import start_server, stop_server, wait_ready  # noqa: E402


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99), "mean_ms": statistics.fmean(ordered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "digits-cnn.yaml")
    parser.add_argument("--model", default=None, help="export dir or models:/ URI; default the champion")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "predict_latency.json")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    settings = load_settings(args.config)
    model_dir = materialize_model(open_run(ROOT, settings), args.model, settings.registered_model_name()).path
    instances = read_dataset(ROOT / settings.data.data_dir).splits["test"].x
    picks = [instances[i % len(instances)] for i in range(args.requests)]

    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for x in picks[:20]:
        session.run(None, {"input": x[None]})
    in_process = []
    for x in picks:
        started = time.perf_counter()
        session.run(None, {"input": x[None]})
        in_process.append((time.perf_counter() - started) * 1000)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start_server(ServingConfig.for_model_dir(model_dir), port, log_file=open("/dev/null", "wb"))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=120, process=server)
        over_http, errors = [], 0
        with httpx.Client(timeout=10) as client:
            for x in picks[:20]:
                client.post(f"{url}/predict", json={"instances": [x.tolist()]})
            for x in picks:
                body = {"instances": [x.tolist()]}
                started = time.perf_counter()
                response = client.post(f"{url}/predict", json=body)
                over_http.append((time.perf_counter() - started) * 1000)
                errors += response.status_code != 200
    finally:
        stop_server(server)

    rows = {"fluxo /predict (HTTP, batching on)": percentiles(over_http), "onnxruntime in-process": percentiles(in_process)}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "model": json.loads((model_dir / "metadata.json").read_text())["model_name"],
        "requests": args.requests,
        "errors": errors,
        "results": rows,
    }
    print(f"{'path':40s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s}")
    for name, row in rows.items():
        print(f"{name:40s} {row['p50_ms']:8.2f} {row['p90_ms']:8.2f} {row['p99_ms']:8.2f} {row['mean_ms']:8.2f}")
    print(f"errors: {errors} of {args.requests}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
