"""Every inference route beside the bare ceiling, in one run: /predict, v2 infer (JSON and binary), /predict/image.

    .venv/bin/python bench/serve_routes.py --model DIR                 # 15 s per cell at 32 clients, 2 rounds
    .venv/bin/python bench/serve_routes.py --model DIR --baseline REF  # plus serving/ as committed at REF

``DIR`` is an exported digits model directory (``.fluxo/serve/<name>-v<N>`` after ``make run``).
The servers run one at a time on free loopback ports with the same worker count: (a) the ceiling,
bench/ceiling_app.py (bare uvicorn, orjson, a constant answer), (b) fluxo as checked out and,
with ``--baseline``, (c) fluxo's ``serving/`` at REF (bench/serve.py ``start_baseline``). Each
request carries one held-out digit: as JSON instances, as a v2 JSON tensor, as a v2 binary tensor
(what tritonclient sends by default, asking for binary outputs), and as one 32x32 PNG of its
bitmap. The load client is bench/serve.py's closed loop (N keep-alive connections, one process,
sharing the cores with the server, as every serving table here); one answer in eight is checked
against the label ONNX Runtime gives in-process. Rounds are interleaved so drift hits every cell.

Prints a table (req/s, p50, p99 and the share of the ceiling) and writes bench/results/serve_routes.json.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import (  # noqa: E402
    Load,
    Server,
    fluxo_label,
    http_request,
    machine,
    start_baseline,
    start_ceiling,
    start_fluxo,
    tree_cpu_seconds,
)
from serving.launch import stop_server  # noqa: E402
from serving.runtime import CPU, session_options  # noqa: E402

ROUTES = ("predict", "v2 json", "v2 binary", "image png")


def digit_png(counts: np.ndarray) -> bytes:
    """The 32x32 black-on-white bitmap a digits row was counted from (4x4 blocks of 0..16 ink pixels)."""
    from PIL import Image

    counts = np.clip(np.rint(counts.reshape(8, 8)), 0, 16).astype(int)
    bitmap = np.full((32, 32), 255, dtype=np.uint8)
    for i in range(8):
        for j in range(8):
            block = np.full(16, 255, dtype=np.uint8)
            block[: counts[i, j]] = 0
            bitmap[4 * i:4 * i + 4, 4 * j:4 * j + 4] = block.reshape(4, 4)
    out = io.BytesIO()
    Image.fromarray(bitmap, mode="L").save(out, "PNG")
    return out.getvalue()


def binary_label(body: bytes) -> str:
    """The label of a binary v2 answer (its header names the sizes; the label tensor's bytes are length-prefixed)."""
    start = body.index(b'{')
    depth, end = 0, start
    for end, byte in enumerate(body[start:], start):  # the JSON header ends where its braces close
        depth += byte == ord("{")
        depth -= byte == ord("}")
        if depth == 0:
            break
    header = json.loads(body[start:end + 1])
    offset = end + 1
    for tensor in header["outputs"]:
        size = tensor["parameters"]["binary_data_size"]
        if tensor["name"] == "label":
            (n,) = struct.unpack("<I", body[offset:offset + 4])
            return body[offset + 4:offset + 4 + n].decode()
        offset += size
    raise ValueError("no label output")


def v2_label(body: bytes) -> str:
    return {t["name"]: t for t in json.loads(body)["outputs"]}["label"]["data"][0]


def requests_for(route: str, port: int, model_name: str, instances: np.ndarray) -> tuple[list[bytes], Any]:
    """Pre-built raw HTTP requests for ``route`` and how to read a label from an answer."""
    infer = f"/v2/models/{model_name}/infer"
    out = []
    for x in instances:
        one = x[None].astype(np.float32)
        if route == "predict":
            out.append(http_request(port, "/predict", json.dumps({"instances": one.tolist()}).encode()))
        elif route == "v2 json":
            tensor = {"name": "input", "shape": list(one.shape), "datatype": "FP32", "data": one.ravel().tolist()}
            out.append(http_request(port, infer, json.dumps({"inputs": [tensor]}).encode()))
        elif route == "v2 binary":
            raw = one.astype("<f4").tobytes()
            header = json.dumps({"inputs": [{"name": "input", "shape": list(one.shape), "datatype": "FP32",
                                             "parameters": {"binary_data_size": len(raw)}}],
                                 "parameters": {"binary_data_output": True}}).encode()
            request = http_request(port, infer, header + raw, {"Inference-Header-Content-Length": str(len(header))})
            out.append(request.replace(b"Content-Type: application/json\r\n", b""))
        else:
            png = digit_png(x)
            out.append(http_request(port, "/predict/image", png).replace(b"application/json", b"image/png"))
    reader = {"predict": fluxo_label, "v2 json": v2_label, "v2 binary": binary_label, "image png": fluxo_label}[route]
    return out, reader


def expected_labels(model_dir: Path, instances: np.ndarray) -> list[str]:
    """The labels ONNX Runtime gives ``instances`` in-process: what every checked answer must say."""
    metadata = json.loads((model_dir / "metadata.json").read_text())
    session = ort.InferenceSession(str(model_dir / "model.onnx"), session_options(1), providers=[CPU])
    logits = session.run(None, {session.get_inputs()[0].name: instances})[0]
    return [metadata["labels"][i] for i in logits.argmax(axis=1)]


def measure(server: Server, route: str, model_name: str, instances: np.ndarray, expected: list[str],
            concurrency: int, seconds: float, constant: bool = False) -> dict[str, Any]:
    requests, reader = requests_for(route, server.port, model_name, instances)
    check = (lambda body, k: isinstance(fluxo_label(body), str)) if constant else None
    load = Load(server.port, requests, expected, reader, check)
    load.run(min(concurrency, 8), 1.0)  # warm the connections and the batcher
    cpu_before = tree_cpu_seconds(server.process.pid)
    row = load.run(concurrency, seconds)
    row["server_cpu_ms_per_request"] = round((tree_cpu_seconds(server.process.pid) - cpu_before)
                                             / max(row["ok"], 1) * 1000, 3)
    print(f"  {server.name[:40]:40s} {route:10s} {row['requests_per_s']:9.1f} req/s  p50 {row['p50_ms']} ms  "
          f"p99 {row['p99_ms']} ms  errors {row['errors']} (5xx {row['5xx']})", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an exported digits model directory")
    parser.add_argument("--baseline", default=None, help="also fluxo's serving/ as committed at this git ref")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_routes.json")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    metadata = json.loads((args.model / "metadata.json").read_text())
    model_name = metadata.get("model_name", "model")
    instances = load_digits().data[-256:].reshape(-1, 1, 8, 8).astype(np.float32)
    expected = expected_labels(args.model, instances)
    workers = 2
    logs = Path(tempfile.mkdtemp(prefix="fluxo-bench-routes-"))
    cells: dict[str, dict[str, list[dict[str, Any]]]] = {}
    baseline_commit = None
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
        ceiling = start_ceiling(logs / "ceiling.log", workers)
        try:
            row = measure(ceiling, "predict", model_name, instances, expected, args.concurrency, args.duration, True)
            cells.setdefault("ceiling", {}).setdefault("predict", []).append(row)
        finally:
            stop_server(ceiling.process)
        contenders = [("fluxo", lambda: start_fluxo("fluxo", args.model, {}, logs / "fluxo.log"))]
        if args.baseline:
            contenders.append(("baseline", lambda: start_baseline(args.baseline, args.model, logs / "baseline.log",
                                                                  before_rollout=False)))
        for name, start in contenders:
            started = start()
            server = started[0] if isinstance(started, tuple) else started
            if isinstance(started, tuple):
                baseline_commit = started[1]
            try:
                for route in ROUTES:
                    row = measure(server, route, model_name, instances, expected, args.concurrency, args.duration)
                    cells.setdefault(name, {}).setdefault(route, []).append(row)
            finally:
                stop_server(server.process)
    result = summarize(cells, args, baseline_commit)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def summarize(cells: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace,
              baseline_commit: str | None) -> dict[str, Any]:
    """Median round per cell by throughput, each with its share of the ceiling measured in the same run."""
    def median(rows: list[dict[str, Any]]) -> dict[str, Any]:
        ranked = sorted(rows, key=lambda r: r["requests_per_s"])
        return {**ranked[len(ranked) // 2], "rounds_requests_per_s": [r["requests_per_s"] for r in rows]}

    table = {server: {route: median(rows) for route, rows in routes.items()} for server, routes in cells.items()}
    ceiling = table["ceiling"]["predict"]["requests_per_s"]
    for routes in table.values():
        for row in routes.values():
            row["share_of_ceiling"] = round(row["requests_per_s"] / ceiling, 3)
    return {"machine": machine(), "model": str(args.model), "concurrency": args.concurrency,
            "seconds_per_cell": args.duration, "rounds": args.rounds, "baseline_commit": baseline_commit,
            "servers": table}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['concurrency']} clients, {result['seconds_per_cell']:g} s per cell, median of "
          f"{result['rounds']} rounds; share = req/s over the bare ceiling's")
    print(f"{'server':10s} {'route':10s} {'req/s':>9s} {'share':>6s} {'p50 ms':>7s} {'p99 ms':>7s} {'5xx':>4s}")
    for server, routes in result["servers"].items():
        for route, row in routes.items():
            print(f"{server:10s} {route:10s} {row['requests_per_s']:9.1f} {row['share_of_ceiling']:6.2f} "
                  f"{row['p50_ms']:7.2f} {row['p99_ms']:7.2f} {row['5xx']:4d}")


if __name__ == "__main__":
    main()
