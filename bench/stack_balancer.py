"""The compose stack's way in: /predict through the HAProxy balancer vs straight to one replica.

    make stack                                  # the stack up and serving (deploy/stack.py)
    .venv/bin/python bench/stack_balancer.py    # 3 interleaved rounds of 15 s per cell, 32 clients

Cells, at 32 closed-loop keep-alive clients (bench/serve.py's load client), one digit per request
with the API key, every eighth answer's label checked:
  (a) balancer, 2 replicas   the published port 127.0.0.1:3000, as users reach the stack
  (b) replica direct         one replica's own address on the front network, no balancer (baseline)
then the stack is scaled to one replica (`docker compose up --scale serving=1`) and
  (c) balancer, 1 replica    and (b) again, interleaved the same way,
and scaled back to the replicas it had. On a machine with 2 cores, client, balancer and replicas
share them: the figures show what the balancer costs per request, not what two replicas add in
capacity (each replica is limited to SERVING_CPUS, default 1, and the client needs a core too).

Prints a table and writes bench/results/stack_balancer.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve import Load, fluxo_label, http_request, machine  # noqa: E402

DIGIT = [[[[0, 0, 5, 13, 9, 1, 0, 0], [0, 0, 13, 15, 10, 15, 5, 0], [0, 3, 15, 2, 0, 11, 8, 0],
           [0, 4, 12, 0, 0, 8, 8, 0], [0, 5, 8, 0, 0, 9, 8, 0], [0, 4, 11, 0, 1, 12, 7, 0],
           [0, 2, 14, 5, 10, 12, 0, 0], [0, 0, 6, 13, 10, 0, 0, 0]]]]
STACK = [sys.executable, str(ROOT / "deploy" / "stack.py")]


def compose(*args: str) -> str:
    done = subprocess.run([*STACK, "compose", *args], cwd=ROOT, text=True, capture_output=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"compose {' '.join(args)} failed: {done.stderr[-2000:]}")
    return done.stdout


def replica_address(index: int = 1) -> str:
    """The replica's address on the front network (the host reaches bridge addresses directly)."""
    out = subprocess.run(["docker", "inspect", "-f", "{{json .NetworkSettings.Networks}}", f"fluxo-serving-{index}"],
                         text=True, capture_output=True, check=True).stdout
    return json.loads(out)["fluxo_front"]["IPAddress"]


def replicas() -> int:
    return len([line for line in compose("ps", "-q", "serving").splitlines() if line.strip()])


def wait_ready(load_of: Any, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if load_of().run(1, 1.0)["ok"] > 0:
            return
        time.sleep(1)
    raise SystemExit("no answer within 120 s")


def rounds(cells: dict[str, Load], clients: int, seconds: float, count: int) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in cells}
    for k in range(count):
        for name, load in cells.items():
            row = load.run(clients, seconds)
            results[name].append(row)
            print(f"  round {k + 1}: {name:<22} {row['requests_per_s']:>8.0f} req/s  p99 {row['p99_ms']} ms  "
                  f"errors {row['errors']}", flush=True)
    return results


def median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"requests_per_s": statistics.median(r["requests_per_s"] for r in rows),
            "p50_ms": statistics.median(r["p50_ms"] for r in rows),
            "p99_ms": statistics.median(r["p99_ms"] for r in rows),
            "errors": sum(r["errors"] for r in rows), "requests": sum(r["ok"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()

    key = (ROOT / "deploy" / "secrets" / "fluxo_api_key").read_text().strip()
    body = json.dumps({"instances": DIGIT}).encode()

    def load(host: str, port: int) -> Load:
        request = http_request(port, "/predict", body, {"X-API-Key": key})
        return Load(port, [request], ["0"], fluxo_label, host=host)

    had = replicas()
    result: dict[str, Any] = {"machine": machine(), "clients": args.clients, "seconds_per_cell": args.seconds,
                              "rounds": args.rounds, "replicas_before": had}
    try:
        compose("up", "-d", "--no-build", "--scale", "serving=2", "serving")
        balancer = lambda: load("127.0.0.1", 3000)  # noqa: E731
        wait_ready(balancer)
        print("2 replicas behind the balancer", flush=True)
        two = rounds({"balancer, 2 replicas": balancer(), "replica direct": load(replica_address(), 3000)},
                     args.clients, args.seconds, args.rounds)
        compose("up", "-d", "--no-build", "--scale", "serving=1", "serving")
        time.sleep(3)  # the balancer's checks take the removed replica out within two seconds
        wait_ready(balancer)
        print("1 replica behind the balancer", flush=True)
        one = rounds({"balancer, 1 replica": balancer(), "replica direct (again)": load(replica_address(), 3000)},
                     args.clients, args.seconds, args.rounds)
    finally:
        compose("up", "-d", "--no-build", "--scale", f"serving={max(had, 1)}", "serving")
    cells = {name: median(rows) for name, rows in {**two, **one}.items()}
    result["cells"] = cells
    result["raw"] = {**two, **one}
    result["ratios"] = {
        "balancer 2 replicas / direct": round(cells["balancer, 2 replicas"]["requests_per_s"]
                                              / cells["replica direct"]["requests_per_s"], 2),
        "balancer 1 replica / direct": round(cells["balancer, 1 replica"]["requests_per_s"]
                                             / cells["replica direct (again)"]["requests_per_s"], 2),
    }
    print(f"\n{'cell':<24}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for name, cell in cells.items():
        print(f"{name:<24}{cell['requests_per_s']:>10.0f}{cell['p50_ms']:>10.2f}{cell['p99_ms']:>10.2f}"
              f"{cell['errors']:>8}")
    for name, ratio in result["ratios"].items():
        print(f"  {name}: {ratio}")
    out = ROOT / "bench" / "results" / "stack_balancer.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
