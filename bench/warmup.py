"""First requests after a start and after a hot reload, with and without warmup, in one run.

    .venv/bin/python bench/warmup.py [--config configs/mnist-lenet.yaml] [--model DIR] [--rounds 3]

The model is the preset's registry champion (or ``--model``, an export directory). For
``FLUXO_WARMUP_RUNS`` 0 (only the one-row check run at load) and 3 (the default), alternated
``--rounds`` times: ``bentoml serve`` on a fresh model root with one worker (so every request
reaches the session just loaded), one keep-alive client opened on ``/livez`` first; timed are
the first request of 1 instance and the first of 32 after ready, then the median of 30 more of
each (steady state). Then the next version (the same graph under the next version number) is
published, ``/metadata`` polled until it names it, and the first 1- and 32-instance requests
on the reloaded session are timed the same way. Prints a table and writes
bench/results/warmup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve import challenger_copy, machine, own_bentoml_home  # noqa: E402  (bench/serve.py)

from pipelines.context import open_run  # noqa: E402
from serving import ServingConfig  # noqa: E402
from serving.launch import start_server, stop_server, wait_ready  # noqa: E402
from serving.reload import publish  # noqa: E402

STEADY = 30


def _timed(client: httpx.Client, url: str, rows: list[Any]) -> float:
    started = time.perf_counter()
    answer = client.post(f"{url}/predict", json={"instances": rows})
    seconds = time.perf_counter() - started
    if answer.status_code != 200:
        raise SystemExit(f"POST /predict answered {answer.status_code}: {answer.text[:300]}")
    return seconds * 1000


def _firsts(client: httpx.Client, url: str, one: list[Any], batch: list[Any]) -> dict[str, float]:
    return {"first_1_ms": _timed(client, url, one), "first_32_ms": _timed(client, url, batch)}


def _steady(client: httpx.Client, url: str, one: list[Any], batch: list[Any]) -> dict[str, float]:
    return {"steady_1_ms": statistics.median(_timed(client, url, one) for _ in range(STEADY)),
            "steady_32_ms": statistics.median(_timed(client, url, batch) for _ in range(STEADY))}


def one_round(model_dir: Path, warmup_runs: int, work: Path, instances: np.ndarray) -> dict[str, Any]:
    root = work / f"root-{warmup_runs}"
    first = challenger_copy(model_dir, work / f"v1-{warmup_runs}")
    following = challenger_copy(first, work / f"v2-{warmup_runs}")
    publish(root, first)
    log = work / f"server-{warmup_runs}.log"
    env = {**own_bentoml_home(log), "FLUXO_WORKERS": "1", "FLUXO_WARMUP_RUNS": str(warmup_runs),
           "FLUXO_RELOAD_INTERVAL_S": "0.1", "FLUXO_MAX_BATCH_SIZE": "32"}
    one, batch = [instances[0].tolist()], instances[:32].tolist()
    port = _free_port()
    process = start_server(ServingConfig.for_model_dir(root), port, env=env, log_file=log.open("wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        wait_ready(url, timeout=180, process=process)
        row: dict[str, Any] = {"warmup_runs": warmup_runs, "ready_s": round(time.perf_counter() - started, 2)}
        with httpx.Client(timeout=60) as client:
            client.get(f"{url}/livez")
            row["start"] = {**_firsts(client, url, one, batch), **_steady(client, url, one, batch)}
            version = json.loads((following / "registry.json").read_text())["model_version"]
            publish(root, following)
            deadline = time.monotonic() + 60
            while client.get(f"{url}/metadata").json().get("model_version") != version:
                if time.monotonic() > deadline:
                    raise SystemExit(f"version {version} was not picked up within 60 s; see {log}")
                time.sleep(0.02)
            row["reload"] = {**_firsts(client, url, one, batch), **_steady(client, url, one, batch)}
        return row
    finally:
        stop_server(process)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _median_of(rows: list[dict[str, Any]], phase: str, key: str) -> float:
    return round(statistics.median(r[phase][key] for r in rows), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "mnist-lenet.yaml")
    parser.add_argument("--model", type=Path, default=None, help="an export directory; default the champion")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "warmup.json")
    args = parser.parse_args()
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

    from pipelines.data.sources import load_builtin
    from pipelines.registry.store import materialize_model
    from pipelines.settings import load_settings

    settings = load_settings(args.config)
    if args.model is not None:
        model_dir = args.model
    else:
        model_dir = materialize_model(open_run(ROOT, settings), None, settings.registered_model_name()).path
    metadata = json.loads((model_dir / "metadata.json").read_text())
    instances = np.ascontiguousarray(load_builtin(metadata["dataset"]).x[-64:], dtype=np.float32)
    work = Path(tempfile.mkdtemp(prefix="fluxo-warmup-"))
    rows: dict[int, list[dict[str, Any]]] = {0: [], 3: []}
    for round_ in range(args.rounds):
        for runs in ((0, 3) if round_ % 2 == 0 else (3, 0)):  # alternated: drift hits both alike
            rows[runs].append(one_round(model_dir, runs, work / f"round{round_}", instances))
            print(f"round {round_} FLUXO_WARMUP_RUNS={runs}: {json.dumps(rows[runs][-1])}", flush=True)
    result = {
        "benchmark": "warmup", "machine": machine(), "python": platform.python_version(),
        "model": {k: metadata.get(k) for k in ("model_name", "architecture", "input_shape")},
        "rounds": args.rounds, "runs": rows,
        "median": {str(runs): {phase: {key: _median_of(r, phase, key) for key in r[0][phase]}
                               for phase in ("start", "reload")} for runs, r in rows.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nfirst requests (ms, median of {args.rounds} rounds), 1 worker, {metadata.get('architecture')} "
          f"{metadata.get('input_shape')}, {result['machine']['cpu']}")
    print(f"{'':22} {'first 1':>9} {'first 32':>9} {'steady 1':>9} {'steady 32':>9}")
    for runs in (0, 3):
        for phase in ("start", "reload"):
            m = result["median"][str(runs)][phase]
            print(f"{f'warmup {runs}, {phase}':22} {m['first_1_ms']:9.2f} {m['first_32_ms']:9.2f} "
                  f"{m['steady_1_ms']:9.2f} {m['steady_32_ms']:9.2f}")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
