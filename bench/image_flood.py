"""A flood of huge image uploads beside ordinary /predict traffic: memory, ordinary latency, statuses.

    .venv/bin/python bench/image_flood.py --model DIR                  # this checkout
    .venv/bin/python bench/image_flood.py --model DIR --baseline REF   # and serving/ as committed at REF

For each server (one at a time, fresh, on a free loopback port), three phases:

1. ordinary traffic alone: ``--ordinary`` clients (4) sending one digit to ``/predict``, ``--calm`` s;
2. the flood beside it for ``--flood-s`` s (20) from ``--flooders`` clients (16), of one kind:
   ``many``: 32 blank 4096x4096 PNGs (~22 KB each) per multipart request, the issue's attack;
   ``one``: one such PNG per request (within the per-request pixel budget, so queued or refused);
3. recovery: the server's memory is watched until it is back within 10% of where it started
   (or ``--settle`` s pass), then ordinary traffic alone again.

The server's memory is the resident set of its whole process tree, sampled every 0.25 s.
Reported: memory before, peak, growth and after; ordinary req/s and p99 in each phase; the
flood's statuses (200, 413, 429, 504, 5xx). Writes bench/results/image_flood.json.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import Load, Server, fluxo_label, http_request, machine, start_baseline, start_fluxo  # noqa: E402
from serving.launch import stop_server  # noqa: E402

MiB = 1024 * 1024


def blank_png(side: int = 4096) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (side, side), 255).save(out, "PNG", optimize=True)
    return out.getvalue()


def multipart(files: list[bytes], boundary: str = "fluxofloodboundary") -> tuple[bytes, str]:
    parts = []
    for i, data in enumerate(files):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="blank{i}.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def flood_request(port: int, kind: str) -> bytes:
    png = blank_png()
    if kind == "one":
        return http_request(port, "/predict/image", png).replace(b"application/json", b"image/png")
    body, content_type = multipart([png] * 32)
    return http_request(port, "/predict/image", body).replace(b"application/json", content_type.encode())


def flood_worker(port: int, kind: str, clients: int, seconds: float, rows: Any) -> None:
    """The flood's closed loop, run in a spawned process; its row goes back through ``rows``."""
    flood = Load(port, [flood_request(port, kind)], ["0"], lambda body: "0", check=lambda body, k: True)
    rows.put(flood.run(clients, seconds))


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class MemoryWatch:
    """The server tree's RSS every 0.25 s on a thread, until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid, self.samples = pid, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), tree_rss(self.pid)))
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def ordinary_load(port: int, instances: np.ndarray, expected: list[str]) -> Load:
    bodies = [json.dumps({"instances": [x.tolist()]}).encode() for x in instances]
    return Load(port, [http_request(port, "/predict", b) for b in bodies], expected, fluxo_label)


def brief(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "ok", "5xx", "status", "transport_errors")}


def run_server(server: Server, kind: str, args: argparse.Namespace, instances: np.ndarray,
               expected: list[str]) -> dict[str, Any]:
    ordinary = ordinary_load(server.port, instances, expected)
    ordinary.run(args.ordinary, 2.0)  # warm
    before = tree_rss(server.process.pid)
    calm = ordinary.run(args.ordinary, args.calm)
    watch = MemoryWatch(server.process.pid)
    # The flood's client in a process of its own: sharing this one's GIL, its 700 KB requests would slow
    # the ordinary client down and the table would blame the server for it.
    context = multiprocessing.get_context("spawn")
    rows = context.Queue()
    flooding = context.Process(target=flood_worker, args=(server.port, kind, args.flooders, args.flood_s, rows))
    flooding.start()
    beside = ordinary.run(args.ordinary, args.flood_s)
    flood_row = rows.get(timeout=args.flood_s + 120)
    flooding.join()
    flood_end = time.monotonic()
    deadline = flood_end + args.settle
    while time.monotonic() < deadline and tree_rss(server.process.pid) > before * 1.10:
        time.sleep(0.5)
    settled_s = round(time.monotonic() - flood_end, 1)
    watch.stop()
    after_memory = tree_rss(server.process.pid)
    after = ordinary.run(args.ordinary, args.calm)
    peak = max(rss for _, rss in watch.samples)
    row = {
        "memory_before_mib": round(before / MiB), "memory_peak_mib": round(peak / MiB),
        "memory_growth_mib": round((peak - before) / MiB), "memory_after_mib": round(after_memory / MiB),
        "back_within_10_percent_s": settled_s if after_memory <= before * 1.10 else None,
        "ordinary_alone": brief(calm), "ordinary_beside_flood": brief(beside), "ordinary_after": brief(after),
        "flood": brief(flood_row),
        "ordinary_throughput_kept": round(beside["requests_per_s"] / max(calm["requests_per_s"], 1e-9), 3),
    }
    print(f"  {server.name[:36]:36s} flood={kind}: memory {row['memory_before_mib']} -> peak {row['memory_peak_mib']} "
          f"(+{row['memory_growth_mib']}) -> {row['memory_after_mib']} MiB; ordinary {calm['requests_per_s']} -> "
          f"{beside['requests_per_s']} req/s, p99 {calm['p99_ms']} -> {beside['p99_ms']} ms; flood statuses "
          f"{flood_row['status']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--kinds", default="many,one")
    parser.add_argument("--ordinary", type=int, default=4)
    parser.add_argument("--flooders", type=int, default=16)
    parser.add_argument("--flood-s", type=float, default=20.0)
    parser.add_argument("--calm", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "image_flood.json")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    from bench.serve_routes import expected_labels

    instances = load_digits().data[-256:].reshape(-1, 1, 8, 8).astype(np.float32)
    expected = expected_labels(args.model, instances)
    logs = Path(tempfile.mkdtemp(prefix="fluxo-bench-flood-"))
    results: dict[str, Any] = {}
    starts = [("fluxo", lambda: (start_fluxo("fluxo", args.model, {}, logs / "fluxo.log"), None))]
    if args.baseline:
        starts.append(("baseline", lambda: start_baseline(args.baseline, args.model, logs / "baseline.log",
                                                          before_rollout=False)))
    for name, start in starts:
        for kind in args.kinds.split(","):
            server, commit = start()
            try:
                results.setdefault(name, {"commit": commit})[kind] = run_server(server, kind, args, instances,
                                                                                expected)
            finally:
                stop_server(server.process)
    document = {"machine": machine(), "model": str(args.model), "ordinary_clients": args.ordinary,
                "flood_clients": args.flooders, "flood_s": args.flood_s, "servers": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
