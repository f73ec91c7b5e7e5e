"""Serving under load: fluxo with and without batching vs `mlflow models serve`, in one run.

    .venv/bin/python bench/serve.py                      # 15 s per cell at 1, 8, 32, 64 clients
    .venv/bin/python bench/serve.py --long 60            # plus the 60 s run at 32 clients (batched)
    .venv/bin/python bench/serve.py --baseline REF       # plus fluxo's serving/ as committed at REF (before/after)
    .venv/bin/python bench/serve.py --sweep              # batching/worker/thread settings at 32 clients
    .venv/bin/python bench/serve.py --inprocess-only     # ONNX Runtime vs PyTorch latency only
    .venv/bin/python bench/serve.py --rollout --model DIR [--challenger DIR] [--baseline REF]
                                                         # champion-only vs shadow vs canary at 32 clients
    .venv/bin/python bench/serve.py --payload-log --model DIR
                                                         # champion-only, payload log off vs 100% sampled

The model is the registry champion of the preset (or --model), served three ways
from the same ONNX file on free loopback ports, one server at a time:
(a) fluxo as configured (adaptive batching), (b) fluxo with FLUXO_MAX_BATCH_SIZE=1,
(c) `mlflow models serve -m models:/NAME/VERSION --env-manager local`, the peer a
user would run instead, in this environment (uvicorn with httptools and uvloop,
which fluxo's dependencies bring) and (d) the same with uvicorn's pure-Python
h11 parser and asyncio loop, as `pip install mlflow` alone installs it. Beside them,
(e) the ceiling: bench/ceiling_app.py, a bare uvicorn app that parses the body and answers
a constant, with fluxo's worker count; the table gives every server's share of it; and (f) the
floor: bench/bentoml_floor.py, BentoML configured as fluxo configures it, answering that
constant from where fluxo's fast path sits: the most fluxo could serve inside BentoML.
With a model directory that holds kept variants, "batched" serves what FLUXO_VARIANT=auto
picks and "batched-fp32" the float graph. Each request carries one held-out test instance. The
load client is a closed loop of N keep-alive connections (one asyncio process
writing each request in one packet) on the same machine, so it shares the cores
with the server, as the issue's reference measurement did. Every response's
status is counted; one in eight is parsed and its label checked against
ONNX Runtime run in-process, so a mixed-up batch counts as an error.

Also timed: one model run in-process, ONNX Runtime (the serving session options)
vs the PyTorch module it was exported from, at batch 1 and 32.

``--rollout`` compares the rollout modes (serving/rollout.py) on the same model
directories, servers started together and measured in interleaved rounds:
champion only, shadow (every request mirrored to the challenger) and canary
(a share of 0.1 answered by the challenger), at 32 clients; with ``--baseline
REF`` also the champion-only service as it was at git REF (``git archive``, no
checkout), to show what champion mode pays for the rollout code. Every answer
checked is compared with the output of the model version it names.

``--payload-log`` serves champion-only twice, payload logging off and at 100%
sampling into a temporary directory (serving/payload_log.py), started together and
measured in interleaved rounds at 32 clients; it counts the records the files hold.

Prints tables and writes bench/results/serve.json (serve_sweep.json for --sweep,
serve_rollout.json for --rollout, serve_payload.json for --payload-log).
Bounded: every cell has a fixed duration, every server a start timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.context import open_run  # noqa: E402
from serving import ServingConfig  # noqa: E402
from serving.launch import serve_command, serve_env, start_server, stop_server, wait_ready  # noqa: E402
from serving.runtime import CPU, CUDA, choose_providers, session_options, softmax  # noqa: E402

CHECK_EVERY = 8  # parse and check one response in this many


# --- load client --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_request(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Load:
    """Closed-loop load: ``concurrency`` connections, each sending the next request when answered."""

    def __init__(self, port: int, requests: Sequence[bytes], expected: Sequence[str], label_of: Any,
                 check: Any = None, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.requests = requests
        self.expected = expected
        self.label_of = label_of  # response body (bytes) -> predicted label
        # (body, request index) -> answer is right; by default the label against ``expected``
        self.check = check or (lambda body, k: self.label_of(body) == self.expected[k])

    async def _client(self, index: int, deadline: float, out: dict[str, Any]) -> None:
        reader = writer = None
        i = index
        while time.perf_counter() < deadline:
            k = i % len(self.requests)
            i += 1
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                started = time.perf_counter()
                writer.write(self.requests[k])
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await asyncio.wait_for(reader.readexactly(length), 30) if length else b""
                out["latencies"].append(time.perf_counter() - started)
                out["status"][status] = out["status"].get(status, 0) + 1
                if status == 200 and i % CHECK_EVERY == 0:
                    out["checked"] += 1
                    if not self.check(body, k):
                        out["wrong"] += 1
                if b"connection: close" in head.lower():
                    writer.close()
                    writer = None
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as error:
                name = type(error).__name__
                out["transport"][name] = out["transport"].get(name, 0) + 1
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(0.01)
        if writer is not None:
            writer.close()

    def run(self, concurrency: int, seconds: float) -> dict[str, Any]:
        out: dict[str, Any] = {"latencies": [], "status": {}, "transport": {}, "checked": 0, "wrong": 0}

        async def main() -> float:
            started = time.perf_counter()
            deadline = started + seconds
            await asyncio.gather(*(self._client(k, deadline, out) for k in range(concurrency)))
            return time.perf_counter() - started

        elapsed = asyncio.run(main())
        latencies = sorted(out["latencies"])
        ok = out["status"].get(200, 0)

        def pct(q: float) -> float | None:
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 2) if latencies else None

        server_5xx = sum(n for code, n in out["status"].items() if code >= 500)
        return {
            "concurrency": concurrency,
            "seconds": round(elapsed, 1),
            "requests_per_s": round(ok / elapsed, 1),
            "p50_ms": pct(0.50),
            "p90_ms": pct(0.90),
            "p99_ms": pct(0.99),
            "ok": ok,
            "errors": sum(out["status"].values()) - ok + sum(out["transport"].values()) + out["wrong"],
            "5xx": server_5xx,
            "status": {str(k): v for k, v in sorted(out["status"].items())},
            "transport_errors": out["transport"],
            "answers_checked": out["checked"],
            "wrong_answers": out["wrong"],
        }


def tree_cpu_seconds(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


# --- servers ---------------------------------------------------------------------------------


class Server:
    """One server under test: how to start it, what to send, how to read an answer."""

    def __init__(self, name: str, port: int, process: subprocess.Popen[bytes], path: str, body_key: str) -> None:
        self.name, self.port, self.process, self.path, self.body_key = name, port, process, path, body_key


def own_bentoml_home(log: Path) -> dict[str, str]:
    """A BENTOML_HOME for one server: BentoML wipes $BENTOML_HOME/prometheus_multiproc_dir at every server
    start, so servers sharing one would erase each other's /metrics counters (read by --rollout)."""
    return {"BENTOML_HOME": str(log.with_suffix(".bentoml-home"))}


def start_fluxo(name: str, model_dir: Path, env: dict[str, str], log: Path, **rollout: Any) -> Server:
    """fluxo on ``model_dir``; the name gains the precision it serves when the directory has variants."""
    port = free_port()
    process = start_server(ServingConfig.for_model_dir(model_dir, **rollout), port, env={**own_bentoml_home(log), **env},
                           log_file=log.open("wb"))
    wait_ready(f"http://127.0.0.1:{port}", timeout=180, process=process)
    variant = httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=10).json().get("variant", "fp32")
    if (model_dir / "metadata.json").is_file() and json.loads((model_dir / "metadata.json").read_text()).get("variants"):
        name = f"{name} ({variant})"
    return Server(name, port, process, "/predict", "instances")


def start_ceiling(log: Path, workers: int) -> Server:
    """bench/ceiling_app.py under uvicorn (httptools, uvloop), ``workers`` processes: the ceiling column."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "bench"), "ceiling_app:app",
               "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--http", "httptools",
               "--loop", "uvloop", "--no-access-log", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=60, process=process)
    except Exception:
        stop_server(process)
        raise
    return Server(f"ceiling: bare uvicorn, orjson, {workers} workers", port, process, "/predict", "instances")


def start_floor(log: Path, workers: int) -> Server:
    """bench/bentoml_floor.py: BentoML with fluxo's settings answering the ceiling's constant (the floor column)."""
    port = free_port()
    bentoml = Path(sys.executable).with_name("bentoml")
    command = [str(bentoml), "serve", "bentoml_floor:Floor", "--working-dir", str(ROOT / "bench"),
               "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, **own_bentoml_home(log), "FLUXO_WORKERS": str(workers), "BENTOML_DO_NOT_TRACK": "true"}
    process = subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=120, process=process)
    except Exception:
        stop_server(process)
        raise
    return Server(f"floor: BentoML as fluxo configures it, orjson, {workers} workers", port, process, "/predict",
                  "instances")


def start_mlflow(model_uri: str, tracking_uri: str, log: Path, plain: bool = False) -> Server:
    """`mlflow models serve` in this environment; ``plain`` forces uvicorn's pure-Python HTTP parser and
    asyncio loop, which is what `pip install mlflow` alone gives (no httptools, no uvloop)."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    # mlflow runs `uvicorn` from PATH: put this environment's scripts first, as an activated venv would.
    path = os.pathsep.join([str(mlflow.parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": tracking_uri,
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    if plain:
        env.update({"UVICORN_HTTP": "h11", "UVICORN_LOOP": "asyncio"})
    command = [str(mlflow), "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               start_new_session=True, cwd=tempfile.gettempdir())
    deadline = time.monotonic() + 180
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited with {process.returncode}; see {log}")
            try:
                if client.get(f"http://127.0.0.1:{port}/ping").status_code == 200:
                    name = "mlflow models serve" + (" (h11, asyncio)" if plain else "")
                    return Server(name, port, process, "/invocations", "inputs")
            except httpx.TransportError:
                pass
            time.sleep(0.3)
    stop_server(process)
    raise RuntimeError(f"mlflow models serve not ready after 180 s; see {log}")


def fluxo_label(body: bytes) -> str:
    return json.loads(body)["predictions"][0]["label"]


def mlflow_label_reader(labels: list[str]) -> Any:
    def label(body: bytes) -> str:
        predictions = json.loads(body)["predictions"]
        if isinstance(predictions, dict):  # one entry per ONNX output: {"logits": [[...]]}
            predictions = next(iter(predictions.values()))
        logits = np.asarray(predictions, dtype=np.float32)
        if logits.ndim == 1:
            logits = logits[None]
        return labels[int(logits[0].argmax())]

    return label


class Target:
    """A started server with its pre-built requests, measured cell by cell."""

    def __init__(self, server: Server, instances: np.ndarray, expected: list[str], labels: list[str],
                 constant: bool = False) -> None:
        self.server = server
        bodies = [json.dumps({server.body_key: [x.tolist()]}, separators=(",", ":")).encode() for x in instances]
        requests = [http_request(server.port, server.path, b) for b in bodies]
        label_of = fluxo_label if server.body_key == "instances" else mlflow_label_reader(labels)
        # The ceiling answers a constant: its answers are checked for their form only.
        check = (lambda body, k: isinstance(fluxo_label(body), str)) if constant else None
        self.load = Load(server.port, requests, expected, label_of, check)

    def cell(self, concurrency: int, seconds: float, warmup: float = 1.0) -> dict[str, Any]:
        if warmup:
            self.load.run(min(concurrency, 8), warmup)
        pid = self.server.process.pid
        cpu_before, client_before = tree_cpu_seconds(pid), time.process_time()
        row = self.load.run(concurrency, seconds)
        served = max(row["ok"], 1)
        row["server_cpu_ms_per_request"] = round((tree_cpu_seconds(pid) - cpu_before) / served * 1000, 3)
        row["client_cpu_ms_per_request"] = round((time.process_time() - client_before) / served * 1000, 3)
        row["load_average_1m"] = round(os.getloadavg()[0], 2)
        print(f"  {self.server.name:44s} c={concurrency:<3d} {row['requests_per_s']:8.1f} req/s  p50 {row['p50_ms']} ms  "
              f"p99 {row['p99_ms']} ms  errors {row['errors']} (5xx {row['5xx']})  load {row['load_average_1m']}",
              flush=True)
        return row


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median repeat by throughput (the upper one of an even count: of two, the less disturbed),
    with every repeat kept for the record."""
    ordered = sorted(rows, key=lambda r: r["requests_per_s"])
    middle = dict(ordered[len(ordered) // 2])
    middle["repeats"] = [{k: r[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "errors", "load_average_1m")}
                         for r in rows]
    middle["errors_all_repeats"] = sum(r["errors"] for r in rows)
    middle["5xx_all_repeats"] = sum(r["5xx"] for r in rows)
    return middle


# --- rollout modes ---------------------------------------------------------------------------------

ROLLOUT_CLIENTS = 32
CANARY_SHARE = 0.1


def challenger_copy(model_dir: Path, into: Path) -> Path:
    """A challenger that is the champion's graph under the next version number: the same cost per run,
    so shadow and canary measure the rollout's own cost, not a bigger or smaller model's."""
    import shutil

    from serving.contract import RegistryEntry, materialize, read_model_dir

    served = read_model_dir(model_dir)
    version = served.version or "1"
    following = str(int(version) + 1) if version.isdigit() else f"{version}-challenger"
    entry = RegistryEntry(model_name=str(served.as_dict()["model_name"]), model_version=following, alias="challenger")
    target = into / f"challenger-v{following}"
    shutil.rmtree(target, ignore_errors=True)
    return materialize(model_dir, target, entry).path


def start_baseline(ref: str, model_dir: Path, log: Path, before_rollout: bool = True) -> tuple[Server, str]:
    """The champion-only service as committed at ``ref``: its ``serving/`` from ``git archive`` (the
    working tree is not touched), served with the same environment. Returns the server and the commit.
    ``before_rollout``: refuse a ref that already has the rollout code (what --rollout compares against)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], capture_output=True, text=True,
                            check=True).stdout.strip()
    tree = Path(tempfile.mkdtemp(prefix=f"fluxo-baseline-{commit}-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "serving"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    port = free_port()
    command = serve_command(model_dir, port)
    command[command.index("--working-dir") + 1] = str(tree)
    process = subprocess.Popen(command, cwd=tree, env=serve_env(ServingConfig.for_model_dir(model_dir), own_bentoml_home(log)), stdout=log.open("wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    wait_ready(f"http://127.0.0.1:{port}", timeout=180, process=process)
    if before_rollout and "rollout" in httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=10).json():
        stop_server(process)
        raise SystemExit(f"--baseline {ref} ({commit}) already has the rollout code; name an earlier commit")
    return Server(f"fluxo, champion only, code at {commit}", port, process, "/predict", "instances"), commit


def counters(port: int) -> dict[str, float]:
    """The rollout counters on /metrics, summed over workers."""
    import re

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for key, pattern in {
        "champion_answers": r'^fluxo_variant_requests_total\{variant="champion"\} (\S+)$',
        "challenger_answers": r'^fluxo_variant_requests_total\{variant="challenger"\} (\S+)$',
        "shadow_agree": r'^fluxo_shadow_comparisons_total\{outcome="agree"\} (\S+)$',
        "shadow_disagree": r'^fluxo_shadow_comparisons_total\{outcome="disagree"\} (\S+)$',
        "shadow_error": r'^fluxo_shadow_comparisons_total\{outcome="error"\} (\S+)$',
        "shadow_skipped": r"^fluxo_shadow_skipped_total (\S+)$",
    }.items():
        match = re.search(pattern, text, re.MULTILINE)
        out[key] = float(match.group(1)) if match else 0.0
    return out


class RolloutTarget(Target):
    """A fluxo server in some rollout mode: answers checked against the version they name, counters kept."""

    def __init__(self, server: Server, instances: np.ndarray, expected: dict[str, list[str]]) -> None:
        super().__init__(server, instances, expected[next(iter(expected))], [])
        self.load.check = lambda body, k: self._right(body, k, expected)

    @staticmethod
    def _right(body: bytes, k: int, expected: dict[str, list[str]]) -> bool:
        answer = json.loads(body)
        labels = expected.get(answer.get("model_version"))
        return labels is not None and answer["predictions"][0]["label"] == labels[k]

    def cell(self, concurrency: int, seconds: float, warmup: float = 1.0) -> dict[str, Any]:
        self.load.run(min(concurrency, 8), warmup)
        before = counters(self.server.port)
        row = super().cell(concurrency, seconds, warmup=0)
        after = counters(self.server.port)
        row["counters"] = {k: after[k] - before[k] for k in after}
        return row


def rollout_run(args: argparse.Namespace, model_dir: Path, instances: np.ndarray, labels: list[str],
                logs: Path, result: dict[str, Any]) -> None:
    """Champion only, shadow and canary (and the baseline), started together, measured in interleaved rounds."""
    challenger = Path(args.challenger) if args.challenger else challenger_copy(model_dir, logs)
    from serving.contract import read_model_dir

    versions = {}
    for path in (model_dir, challenger):
        session = ort.InferenceSession(str(path / "model.onnx"), providers=[CPU])
        versions[str(read_model_dir(path).version)] = [
            labels[i] for i in softmax(session.run(None, {"input": instances})[0]).argmax(1)]
    plan: list[tuple[str, Any]] = [
        ("champion", lambda: start_fluxo("fluxo, champion only", model_dir, {}, logs / "champion.log")),
        ("shadow", lambda: start_fluxo("fluxo, shadow (every request mirrored)", model_dir, {}, logs / "shadow.log",
                                       challenger_dir=challenger, rollout="shadow")),
        ("canary", lambda: start_fluxo(f"fluxo, canary (share {CANARY_SHARE})", model_dir, {}, logs / "canary.log",
                                       challenger_dir=challenger, rollout="canary", canary_share=CANARY_SHARE)),
    ]
    targets: dict[str, RolloutTarget] = {}
    try:
        if args.baseline:
            server, commit = start_baseline(args.baseline, model_dir, logs / "baseline.log")
            result["baseline_commit"] = commit
            targets["baseline"] = RolloutTarget(server, instances, versions)
        for key, start in plan:
            targets[key] = RolloutTarget(start(), instances, versions)
        cells: dict[str, list[dict[str, Any]]] = {key: [] for key in targets}
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} of {args.rounds}", flush=True)
            order = list(targets.items())
            for key, target in order if round_ % 2 == 0 else reversed(order):  # no server always goes first
                cells[key].append(target.cell(ROLLOUT_CLIENTS, args.duration))
    finally:
        for target in targets.values():
            stop_server(target.server.process)
    result["challenger"] = {"path": str(challenger), "version": list(versions)[-1]}
    result["modes"] = {key: {"name": targets[key].server.name, **median_row(rows)} for key, rows in cells.items()}
    for key in result["modes"]:  # counters of every round, for the record
        result["modes"][key]["counters_all_rounds"] = [r["counters"] for r in cells[key]]
    result["ratios"] = rollout_ratios(result["modes"])
    result["paired_ratios"] = paired_ratios(cells)
    result["method"] = (f"all servers started first, then {args.rounds} rounds; each round measures every server once "
                        f"for {args.duration:g} s at {ROLLOUT_CLIENTS} clients after a 1 s warm-up, in the listed "
                        "order on even rounds and the reverse on odd ones; per server the median round by "
                        "throughput is kept (the upper median for an even count); paired_ratios divide each "
                        "round's figure by champion-only's in the same round")


def paired_ratios(cells: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per round, each mode over champion-only measured minutes apart in that round: neighbours' load
    moves both alike, so these scatter less than ratios of medians taken from different rounds."""
    out: dict[str, Any] = {}
    base = cells["champion"]
    for key, rows in cells.items():
        if key == "champion":
            continue
        throughput = [round(r["requests_per_s"] / b["requests_per_s"], 3) for r, b in zip(rows, base)]
        cpu = [round(r["server_cpu_ms_per_request"] / b["server_cpu_ms_per_request"], 3) for r, b in zip(rows, base)]
        out[key] = {"throughput": throughput, "throughput_median": statistics.median(throughput),
                    "cpu_per_request": cpu, "cpu_per_request_median": statistics.median(cpu)}
    return out


def rollout_ratios(modes: dict[str, Any]) -> dict[str, float]:
    """Throughput of each mode over champion-only, in the same run; and champion-only over the baseline."""
    base = modes["champion"]["requests_per_s"]
    ratios = {f"{key}_over_champion": round(row["requests_per_s"] / base, 3)
              for key, row in modes.items() if key != "champion" and base}
    cpu = modes["champion"]["server_cpu_ms_per_request"]
    ratios.update({f"{key}_cpu_per_request_over_champion": round(row["server_cpu_ms_per_request"] / cpu, 3)
                   for key, row in modes.items() if key != "champion" and cpu})
    return ratios


def print_rollout_table(result: dict[str, Any]) -> None:
    print(f"\n| mode | clients | req/s (median of {len(next(iter(result['modes'].values()))['repeats'])}) | all rounds | "
          "p50 ms | p99 ms | errors (5xx) | server CPU ms/req | challenger's work |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---|")
    for row in result["modes"].values():
        rounds = ", ".join(f"{r['requests_per_s']:.0f}" for r in row["repeats"])
        c = row["counters"]
        if c["shadow_agree"] + c["shadow_disagree"] + c["shadow_error"] + c["shadow_skipped"]:
            mirrored = c["shadow_agree"] + c["shadow_disagree"] + c["shadow_error"]
            work = (f"{mirrored:.0f} mirrored ({c['shadow_error']:.0f} errors), {c['shadow_skipped']:.0f} skipped, "
                    f"agreement {c['shadow_agree'] / max(mirrored - c['shadow_error'], 1):.3f}")
        elif c["challenger_answers"]:
            share = c["challenger_answers"] / max(c["challenger_answers"] + c["champion_answers"], 1)
            work = f"answered {share:.3f} of requests"
        else:
            work = "none"
        print(f"| {row['name']} | {row['concurrency']} | {row['requests_per_s']:.0f} | {rounds} | {row['p50_ms']} | "
              f"{row['p99_ms']} | {row['errors']} ({row['5xx']}) | {row['server_cpu_ms_per_request']} | {work} |")
    print(f"\nratios of medians: {result['ratios']}")
    for key, paired in result["paired_ratios"].items():
        print(f"{key} / champion only, per round: throughput {paired['throughput']} (median "
              f"{paired['throughput_median']}), server CPU per request {paired['cpu_per_request']} "
              f"(median {paired['cpu_per_request_median']})")
    print(f"load average at start {result['machine']['load_average_at_start']}, "
          f"at end {result['machine']['load_average_at_end']}")


# --- payload logging ---------------------------------------------------------------------------

def payload_counters(port: int) -> dict[str, float]:
    """fluxo_payload_* on /metrics, summed over workers."""
    import re

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {key: sum(float(v) for v in re.findall(rf"^fluxo_payload_{key}_total (\S+)$", text, re.MULTILINE))
            for key in ("records", "dropped", "files")}


def payload_run(args: argparse.Namespace, model_dir: Path, instances: np.ndarray, expected: list[str],
                logs: Path, result: dict[str, Any]) -> None:
    """Champion only with payload logging off and at 100%, started together, measured in interleaved rounds."""
    from serving.payload_log import read_payloads

    directory = logs / "payloads"
    targets = {}
    try:
        targets["off"] = Target(start_fluxo("fluxo, payload log off", model_dir, {}, logs / "off.log"),
                                instances, expected, [])
        targets["on"] = Target(start_fluxo("fluxo, payload log 100%", model_dir, {}, logs / "on.log",
                                           payload_log=directory, payload_sample=1.0), instances, expected, [])
        cells: dict[str, list[dict[str, Any]]] = {key: [] for key in targets}
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} of {args.rounds}", flush=True)
            order = list(targets.items())
            for key, target in order if round_ % 2 == 0 else reversed(order):
                cells[key].append(target.cell(ROLLOUT_CLIENTS, args.duration))
        result["payload_counters"] = payload_counters(targets["on"].server.port)
    finally:
        for target in targets.values():
            stop_server(target.server.process)
    result["payload_rows_in_files"] = len(read_payloads(directory))
    result["payload_bytes_on_disk"] = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    result["modes"] = {key: {"name": targets[key].server.name, **median_row(rows)} for key, rows in cells.items()}
    paired = [round(a["requests_per_s"] / b["requests_per_s"], 3) for a, b in zip(cells["on"], cells["off"])]
    cpu = [round(a["server_cpu_ms_per_request"] / b["server_cpu_ms_per_request"], 3)
           for a, b in zip(cells["on"], cells["off"])]
    result["paired_ratios"] = {"on": {"throughput": paired, "throughput_median": statistics.median(paired),
                                      "cpu_per_request": cpu, "cpu_per_request_median": statistics.median(cpu)}}
    result["ratio_on_over_off"] = round(result["modes"]["on"]["requests_per_s"]
                                        / result["modes"]["off"]["requests_per_s"], 3)


def print_payload_table(result: dict[str, Any]) -> None:
    print("\n| payload log | clients | req/s (median) | all rounds | p50 ms | p99 ms | errors (5xx) | server CPU ms/req |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for row in result["modes"].values():
        rounds = ", ".join(f"{r['requests_per_s']:.0f}" for r in row["repeats"])
        print(f"| {row['name']} | {row['concurrency']} | {row['requests_per_s']:.0f} | {rounds} | {row['p50_ms']} | "
              f"{row['p99_ms']} | {row['errors']} ({row['5xx']}) | {row['server_cpu_ms_per_request']} |")
    paired = result["paired_ratios"]["on"]
    print(f"\non / off throughput, ratio of medians: {result['ratio_on_over_off']}; per round {paired['throughput']} "
          f"(median {paired['throughput_median']}); server CPU per request per round {paired['cpu_per_request']} "
          f"(median {paired['cpu_per_request_median']})")
    print(f"counters {result['payload_counters']}, rows in files {result['payload_rows_in_files']}, "
          f"{result['payload_bytes_on_disk']} bytes on disk")


# --- in-process model latency ------------------------------------------------------------------


def time_calls(fn: Any, repeat: int) -> dict[str, float]:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {"p50_ms": round(statistics.median(samples), 4), "p99_ms": round(samples[int(0.99 * len(samples))], 4),
            "mean_ms": round(statistics.fmean(samples), 4)}


def inprocess(model_dir: Path, instances: np.ndarray, run_id: str | None, tracking_uri: str,
              threads: int, repeat: int) -> dict[str, Any]:
    """One model run: ONNX Runtime with the serving options vs PyTorch, same threads, batch 1 and 32."""
    providers = choose_providers()
    session = ort.InferenceSession(str(model_dir / "model.onnx"), sess_options=session_options(threads),
                                   providers=providers)
    results: dict[str, Any] = {"threads": threads, "onnxruntime_provider": session.get_providers()[0]}
    torch_model = None
    if run_id:
        import mlflow
        import torch

        from pipelines.train.checkpoint import load_checkpoint, rebuild_model

        mlflow.set_tracking_uri(tracking_uri)
        with tempfile.TemporaryDirectory() as scratch:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/best.pt",
                                                        dst_path=scratch)
            torch_model, _ = rebuild_model(load_checkpoint(Path(local)))
        torch.set_num_threads(threads)
        device = "cuda" if providers[0] == CUDA and torch.cuda.is_available() else "cpu"
        torch_model = torch_model.eval().to(device)
        results["pytorch_device"] = device
    for n in (1, 32):
        batch = np.ascontiguousarray(instances[:n], dtype=np.float32)
        results[f"onnxruntime_batch{n}"] = time_calls(lambda: session.run(None, {"input": batch}), repeat)
        if torch_model is not None:
            import torch

            tensor = torch.from_numpy(batch.copy()).to(results["pytorch_device"])

            def forward() -> None:
                with torch.inference_mode():
                    torch_model(tensor)
                if tensor.is_cuda:
                    torch.cuda.synchronize()

            results[f"pytorch_batch{n}"] = time_calls(forward, repeat)
    return results


# --- main ----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model_name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import bentoml
    import mlflow

    return {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": CUDA in choose_providers(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "bentoml": bentoml.__version__,
        "mlflow": mlflow.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


SWEEP = [
    (f"workers={w}, max_batch_size={b}" + (f", wait {ms} ms" if ms else "") + (f", {t} ORT threads" if t > 1 else ""),
     {"FLUXO_WORKERS": str(w), "FLUXO_MAX_BATCH_SIZE": str(b), "FLUXO_BATCH_WAIT_MS": str(ms), "FLUXO_ORT_THREADS": str(t)})
    for w, b, ms, t in [
        (1, 1, 0, 1), (1, 8, 0, 1), (1, 32, 0, 1), (1, 64, 0, 1), (1, 32, 0, 2),
        (2, 1, 0, 1), (2, 8, 0, 1), (2, 32, 0, 1), (2, 64, 0, 1), (2, 32, 2, 1), (2, 32, 0, 2),
        (3, 32, 0, 1),
    ]
]


def held_out_instances(settings: Any, metadata: dict[str, Any], n: int = 256) -> np.ndarray:
    """Test-split instances from data/; the built-in source's last ones when data/ is unreadable."""
    from pipelines.data.sources import load_builtin
    from pipelines.data.store import read_dataset

    try:
        x = read_dataset(ROOT / settings.data.data_dir).splits["test"].x[:n]
        if x.shape[1:] != tuple(metadata["input_shape"]):
            raise ValueError(f"it holds another dataset, of shape {x.shape[1:]}")
    except Exception as error:  # noqa: BLE001 - a benchmark only needs realistic inputs
        print(f"data/ unusable ({error}); using the built-in {metadata['dataset']} source", flush=True)
        x = load_builtin(metadata["dataset"]).x[-n:]
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[1:] != tuple(metadata["input_shape"]):
        raise SystemExit(f"instances of shape {x.shape[1:]} do not fit the model's {metadata['input_shape']}")
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "digits-cnn.yaml")
    parser.add_argument("--model", default=None, help="models:/ URI or export dir; default the champion")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per cell")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--servers", default="ceiling,floor,batched,batched-fp32,unbatched,mlflow,mlflow-plain",
                        help="any of ceiling, floor, batched, batched-fp32, unbatched, mlflow, mlflow-plain")
    parser.add_argument("--long", type=float, default=0.0, help="also a run this long at 32 clients, batched")
    parser.add_argument("--sweep", action="store_true", help="compare serving settings at --sweep-concurrency")
    parser.add_argument("--sweep-concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="repeat every cell this often, keep the median")
    parser.add_argument("--inprocess-only", action="store_true")
    parser.add_argument("--rollout", action="store_true",
                        help=f"champion only vs shadow vs canary (share {CANARY_SHARE}) at {ROLLOUT_CLIENTS} clients")
    parser.add_argument("--challenger", default=None,
                        help="--rollout: the challenger's model dir (default: the champion's graph as the next version)")
    parser.add_argument("--baseline", default=None,
                        help="also serve fluxo (champion only) with serving/ as committed at this git ref: the "
                             "before column of a change to the request path, or --rollout's code before rollout")
    parser.add_argument("--payload-log", action="store_true",
                        help=f"champion only, payload log off vs 100%% sampled, at {ROLLOUT_CLIENTS} clients")
    parser.add_argument("--repeat", type=int, default=2000, help="in-process timing repetitions")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

    from pipelines.settings import load_settings
    from pipelines.registry.store import materialize_model

    settings = load_settings(args.config)
    tracking_uri = settings.resolved_tracking_uri(ROOT)
    served = materialize_model(open_run(ROOT, settings), args.model, settings.registered_model_name())
    model_dir, metadata = served.path, served.as_dict()
    labels = list(metadata["labels"])
    instances = held_out_instances(settings, metadata)
    reference = ort.InferenceSession(str(model_dir / "model.onnx"), providers=[CPU])
    expected = [labels[i] for i in softmax(reference.run(None, {"input": instances})[0]).argmax(1)]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="fluxo-bench-"))
    result: dict[str, Any] = {
        "machine": machine(),
        "model": {k: metadata.get(k) for k in ("model_name", "model_version", "architecture", "input_shape")},
        "request": "one test instance per request, JSON",
        "duration_s_per_cell": args.duration,
    }
    print(f"machine: {result['machine']}\nmodel: {result['model']}\nserver logs: {logs}", flush=True)

    if args.payload_log:
        payload_run(args, model_dir, instances, expected, logs, result)
        result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write(result, args.out or ROOT / "bench" / "results" / "serve_payload.json")
        print_payload_table(result)
        return

    if args.rollout:
        rollout_run(args, model_dir, instances, labels, logs, result)
        result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write(result, args.out or ROOT / "bench" / "results" / "serve_rollout.json")
        print_rollout_table(result)
        return

    result["inprocess"] = inprocess(model_dir, instances, metadata.get("run_id"), tracking_uri, 1, args.repeat)
    print(f"in-process, 1 thread: {json.dumps(result['inprocess'])}", flush=True)
    if args.inprocess_only:
        write(result, args.out or ROOT / "bench" / "results" / "serve_inprocess.json")
        return

    if args.sweep:
        targets = []
        try:
            for i, (name, env) in enumerate(SWEEP):
                server = start_fluxo(name, model_dir, env, logs / f"sweep-{i}.log")
                targets.append((name, env, Target(server, instances, expected, labels)))
            cells: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
            for round_ in range(args.rounds):
                print(f"round {round_ + 1} of {args.rounds}", flush=True)
                for name, _, target in targets:
                    cells[name].append(target.cell(args.sweep_concurrency, args.duration))
        finally:
            for _, _, target in targets:
                stop_server(target.server.process)
        result["sweep"] = [{"setting": name, "env": env, **median_row(cells[name])} for name, env, _ in targets]
        result["method"] = (f"all servers started first, then {args.rounds} rounds; each round measures every setting "
                            f"once for {args.duration:g} s at {args.sweep_concurrency} clients; the median round is kept "
                            "(the upper median for an even count)")
        write(result, args.out or ROOT / "bench" / "results" / "serve_sweep.json")
        return

    model_uri = f"models:/{metadata['model_name']}/{metadata['model_version']}"
    plan = {
        "ceiling": lambda: start_ceiling(logs / "ceiling.log", int(os.environ.get("FLUXO_WORKERS", "2"))),
        "floor": lambda: start_floor(logs / "floor.log", int(os.environ.get("FLUXO_WORKERS", "2"))),
        "batched": lambda: start_fluxo("fluxo, adaptive batching", model_dir, {}, logs / "batched.log"),
        "batched-fp32": lambda: start_fluxo("fluxo, adaptive batching, FLUXO_VARIANT=fp32", model_dir,
                                            {"FLUXO_VARIANT": "fp32"}, logs / "batched-fp32.log"),
        "unbatched": lambda: start_fluxo("fluxo, no batching", model_dir, {"FLUXO_MAX_BATCH_SIZE": "1"},
                                         logs / "unbatched.log"),
        "mlflow": lambda: start_mlflow(model_uri, tracking_uri, logs / "mlflow.log"),
        "mlflow-plain": lambda: start_mlflow(model_uri, tracking_uri, logs / "mlflow-plain.log", plain=True),
        "baseline": lambda: start_baseline(args.baseline, model_dir, logs / "baseline.log", before_rollout=False)[0],
    }
    keys = args.servers.split(",") + (["baseline"] if args.baseline else [])
    targets: dict[str, Target] = {}
    try:
        for key in keys:
            targets[key] = Target(plan[key](), instances, expected, labels, constant=key in ("ceiling", "floor"))
        cells: dict[str, list[list[dict[str, Any]]]] = {key: [[] for _ in concurrencies] for key in targets}
        for round_ in range(args.rounds):
            for i, concurrency in enumerate(concurrencies):
                for key, target in targets.items():
                    cells[key][i].append(target.cell(concurrency, args.duration))
        if args.long and "batched" in targets:
            print(f"long run: {args.long:g} s at 32 clients", flush=True)
            result["long_run"] = targets["batched"].cell(32, args.long)
    finally:
        for target in targets.values():
            stop_server(target.server.process)
    result["servers"] = {key: {"name": targets[key].server.name, "rows": [median_row(c) for c in cells[key]]}
                         for key in targets}
    result["method"] = (f"all servers started first, then {args.rounds} round(s): each concurrency in turn, every server "
                        f"{args.duration:g} s after a 1 s warm-up; per server and concurrency the median round is kept "
                        "(the upper median for an even count: of two rounds, the less disturbed one)")
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["ratios_at_32"] = ratios(result["servers"])
    write(result, args.out or ROOT / "bench" / "results" / "serve.json")
    print_table(result)


def ratios(servers: dict[str, Any]) -> dict[str, float]:
    """Batched throughput at 32 clients over each other server's, measured in this run."""
    at = {key: next((r for r in s["rows"] if r["concurrency"] == 32), None) for key, s in servers.items()}
    if not at.get("batched"):
        return {}
    out = {f"batched_over_{key}": round(at["batched"]["requests_per_s"] / row["requests_per_s"], 2)
           for key, row in at.items() if key != "batched" and row and row["requests_per_s"]}
    if "batched_over_ceiling" in out:  # below 1: the share of the machine's HTTP capacity fluxo reaches
        out["batched_share_of_ceiling"] = out.pop("batched_over_ceiling")
    if "batched_over_floor" in out:  # the share of what BentoML, as configured, leaves fluxo
        out["batched_share_of_floor"] = out.pop("batched_over_floor")
    return out


def print_table(result: dict[str, Any]) -> None:
    ceiling = {r["concurrency"]: r["requests_per_s"] for r in result["servers"].get("ceiling", {}).get("rows", [])}
    print("\n| server | clients | req/s | of ceiling | p50 ms | p99 ms | errors (5xx) | server CPU ms/req |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for server in result["servers"].values():
        for row in server["rows"]:
            top = ceiling.get(row["concurrency"])
            share = f"{row['requests_per_s'] / top:.0%}" if top else "-"
            print(f"| {server['name']} | {row['concurrency']} | {row['requests_per_s']:.0f} | {share} | {row['p50_ms']} | "
                  f"{row['p99_ms']} | {row['errors']} ({row['5xx']}) | {row['server_cpu_ms_per_request']} |")
    if "long_run" in result:
        row = result["long_run"]
        print(f"\nlong run, 32 clients, {row['seconds']} s: {row['requests_per_s']} req/s, p50 {row['p50_ms']} ms, "
              f"p99 {row['p99_ms']} ms, errors {row['errors']}, 5xx {row['5xx']}")
    print(f"\nratios at 32 clients: {result['ratios_at_32']}")


def write(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
