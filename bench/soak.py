"""A soak: mixed good, bad and huge traffic for minutes, a hot reload every minute, the payload log on.

    .venv/bin/python bench/soak.py --model DIR                     # 10 minutes, 32 clients, reload every 60 s
    .venv/bin/python bench/soak.py --model DIR --minutes 1 --reload-every 15 --out /tmp/soak.json

``DIR`` is an exported digits model directory. The server serves a model root whose pointer
alternates between ``DIR`` and a copy of it under the next version number (bench/serve.py
``challenger_copy``); every reload is awaited on ``/metadata`` (the version it names), never on
a fixed sleep. Every request carries its own ``X-Request-Id``. The mix, per request, weighted:
good ``/predict``, v2 JSON and binary tensors and PNG uploads; client mistakes (wrong shape, not
JSON, wrong content type, unknown model, too many instances, a body over the limit, a cross-site
Origin); and huge work (a blank 4096x4096 PNG, a multipart of 32 of them).

Passes when: no 5xx, no transport error, no failed reload (``fluxo_model_reloads_total``), every
answered prediction's ``X-Request-Id`` is in the payload log after the server stopped (sampling
at 1.0), and the server's memory has no upward trend (the slope of its resident set over the
second half of the run, reported in MiB per minute). Writes bench/results/soak.json; exit 1 on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.image_flood import MiB, blank_png, multipart, tree_rss  # noqa: E402
from bench.serve import challenger_copy, free_port, machine, own_bentoml_home  # noqa: E402
from bench.serve_routes import digit_png  # noqa: E402
from serving import ServingConfig  # noqa: E402
from serving.launch import start_server, stop_server, wait_ready  # noqa: E402
from serving.contract import read_model_dir  # noqa: E402
from serving.reload import publish  # noqa: E402

LOGGED = {"predict", "v2 json", "v2 binary", "image"}  # the kinds whose 200 answers the payload log must hold


def templates(model_name: str, digits: np.ndarray) -> list[tuple[str, int, str, bytes, dict[str, str]]]:
    """(kind, weight, path, body, headers) of every request the soak sends."""
    one = digits[:1].astype(np.float32)
    tensor = {"name": "input", "shape": list(one.shape), "datatype": "FP32", "data": one.ravel().tolist()}
    raw = one.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{**{k: v for k, v in tensor.items() if k != "data"},
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    infer = f"/v2/models/{model_name}/infer"
    json_type = {"Content-Type": "application/json"}
    many, many_type = multipart([blank_png()] * 32)
    return [
        ("predict", 30, "/predict", json.dumps({"instances": digits[:4].tolist()}).encode(), json_type),
        ("v2 json", 15, infer, json.dumps({"inputs": [tensor]}).encode(), json_type),
        ("v2 binary", 15, infer, header + raw, {"Inference-Header-Content-Length": str(len(header))}),
        ("image", 10, "/predict/image", digit_png(digits[0]), {"Content-Type": "image/png"}),
        ("bad shape", 4, "/predict", b'{"instances": [[1, 2]]}', json_type),
        ("not json", 4, "/predict", b"{instances", json_type),
        ("wrong type", 3, "/predict", b"a=1", {"Content-Type": "application/x-www-form-urlencoded"}),
        ("unknown model", 3, "/v2/models/nope/infer", json.dumps({"inputs": [tensor]}).encode(), json_type),
        ("too many", 2, "/predict", json.dumps({"instances": [digits[0].tolist()] * 2000}).encode(), json_type),
        ("over the body limit", 2, "/predict", b'{"instances": [' + b"0," * 3_000_000 + b"0]}", json_type),
        ("cross-site", 3, "/predict", json.dumps({"instances": digits[:1].tolist()}).encode(),
         {**json_type, "Origin": "https://elsewhere.example"}),
        ("huge image", 2, "/predict/image", blank_png(), {"Content-Type": "image/png"}),
        ("many huge images", 1, "/predict/image", many, {"Content-Type": many_type}),
    ]


class Traffic:
    """``clients`` keep-alive clients sending weighted random requests until stopped; every answer tallied."""

    def __init__(self, url: str, kinds: list[tuple[str, int, str, bytes, dict[str, str]]]) -> None:
        self.url, self.kinds = url, kinds
        self.weights = [weight for _, weight, *_ in kinds]
        self.statuses: dict[str, dict[int, int]] = {}
        self.transport: dict[str, int] = {}
        self.logged_ids: set[str] = set()
        self.stop = threading.Event()

    async def _client(self, index: int) -> None:
        rng = random.Random(index)
        sent = 0
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                kind, _, path, body, headers = rng.choices(self.kinds, self.weights)[0]
                request_id = f"soak-{index}-{sent}"
                sent += 1
                try:
                    answer = await client.post(path, content=body, headers={**headers, "X-Request-Id": request_id})
                except httpx.TransportError as error:
                    self.transport[type(error).__name__] = self.transport.get(type(error).__name__, 0) + 1
                    await asyncio.sleep(0.05)
                    continue
                tally = self.statuses.setdefault(kind, {})
                tally[answer.status_code] = tally.get(answer.status_code, 0) + 1
                if answer.status_code == 200 and kind in LOGGED:
                    assert answer.headers.get("x-request-id") == request_id, answer.headers
                    self.logged_ids.add(request_id)

    def run(self, clients: int) -> None:
        async def main() -> None:
            await asyncio.gather(*(self._client(i) for i in range(clients)))

        asyncio.run(main())


def failed_reloads(metrics: str) -> float:
    """``fluxo_model_reloads_total{outcome="failed"}`` from a /metrics page (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(metrics) for sample in family.samples
               if sample.name == "fluxo_model_reloads_total" and sample.labels.get("outcome") == "failed")


def memory_slope(samples: list[tuple[float, int]]) -> float:
    """MiB per minute, least squares over the second half of the run (after warm-up and first reloads)."""
    half = samples[len(samples) // 2:]
    if len(half) < 3:
        return 0.0
    t = np.array([s[0] for s in half]) / 60.0
    rss = np.array([s[1] for s in half]) / MiB
    return float(np.polyfit(t - t[0], rss, 1)[0])


def wait_version(url: str, version: str, timeout: float = 120.0) -> float:
    """Seconds until every worker we ask answers with ``version`` (polled; a reload is per worker)."""
    started = time.monotonic()
    streak = 0
    while time.monotonic() - started < timeout:
        try:
            streak = streak + 1 if httpx.get(f"{url}/metadata", timeout=10).json().get("model_version") == version else 0
        except httpx.HTTPError:
            streak = 0
        if streak >= 6:  # several answers in a row: both workers, whichever the kernel hands the connection
            return time.monotonic() - started
        time.sleep(0.2)
    raise TimeoutError(f"the server did not switch to version {version} within {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--reload-every", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    from serving.payload_log import read_payloads

    work = Path(tempfile.mkdtemp(prefix="fluxo-soak-"))
    versions = [args.model.resolve(), challenger_copy(args.model, work)]
    names = [read_model_dir(d).version for d in versions]  # what /metadata says once each is live
    root = work / "root"
    publish(root, versions[0])
    payloads = work / "payloads"
    config = ServingConfig.for_model_dir(root, payload_sample=1.0, reload_interval_s=1.0).with_payload_log(str(payloads))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "server.log"
    process = start_server(config, port, env=own_bentoml_home(log), log_file=log.open("wb"))
    digits = load_digits().data.reshape(-1, 1, 8, 8).astype(np.float32)
    model_name = json.loads((args.model / "metadata.json").read_text()).get("model_name", "model")
    traffic = Traffic(url, templates(model_name, digits))
    samples: list[tuple[float, int]] = []
    reloads: list[float] = []
    try:
        wait_ready(url, timeout=180, process=process)
        runner = threading.Thread(target=traffic.run, args=(args.clients,))
        runner.start()
        started = time.monotonic()
        next_reload, current = started + args.reload_every, 0
        while time.monotonic() - started < args.minutes * 60:
            samples.append((time.monotonic() - started, tree_rss(process.pid)))
            if time.monotonic() >= next_reload:
                current = 1 - current
                publish(root, versions[current])
                reloads.append(round(wait_version(url, names[current]), 2))
                next_reload += args.reload_every
            time.sleep(1.0)
        traffic.stop.set()
        runner.join()
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        stop_server(process)  # SIGTERM: the workers drain, then seal their payload files
    logged = set(read_payloads(payloads).column("request_id").to_pylist())
    missing = traffic.logged_ids - logged
    statuses = {kind: {str(k): v for k, v in sorted(t.items())} for kind, t in traffic.statuses.items()}
    server_errors = sum(n for t in traffic.statuses.values() for code, n in t.items() if code >= 500)
    result = {
        "machine": machine(), "model": str(args.model), "minutes": args.minutes, "clients": args.clients,
        "reload_every_s": args.reload_every, "requests": sum(sum(t.values()) for t in traffic.statuses.values()),
        "statuses": statuses, "5xx": server_errors, "transport_errors": traffic.transport,
        "reloads_done": len(reloads), "reload_seconds": reloads,
        "reloads_failed_metric": failed_reloads(metrics),
        "memory_start_mib": round(samples[0][1] / MiB) if samples else None,
        "memory_end_mib": round(samples[-1][1] / MiB) if samples else None,
        "memory_peak_mib": round(max(s[1] for s in samples) / MiB) if samples else None,
        "memory_slope_mib_per_min_second_half": round(memory_slope(samples), 2),
        "predictions_answered": len(traffic.logged_ids), "records_missing": len(missing),
        "missing_examples": sorted(missing)[:5],
    }
    result["passed"] = (server_errors == 0 and not traffic.transport and not result["reloads_failed_metric"]
                        and not missing)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    print(f"wrote {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
