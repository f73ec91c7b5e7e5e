"""Example client for the fluxo REST API, and the curl line shown after a pipeline run.

    python -m serving.client --url http://127.0.0.1:3000 --file instances.json
    python -m serving.client --url http://127.0.0.1:3000   # one all-zero instance

``instances.json`` holds either ``{"instances": [...]}`` or the bare list.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from serving import ServingError

DEFAULT_URL = "http://127.0.0.1:3000"


def zero_instance(input_shape: Sequence[int]) -> Any:
    """A nested list of zeros shaped exactly like one instance: the smallest valid request."""
    if not input_shape:
        return 0
    return [zero_instance(input_shape[1:]) for _ in range(int(input_shape[0]))]


def example_request(
    metadata: Mapping[str, Any], url: str = DEFAULT_URL, instances: list[Any] | None = None
) -> dict[str, Any]:
    """A ready-to-run request for the served model: its URL, JSON body and a curl line.

    ``instances`` (say, a real held-out sample) replaces the default single
    all-zero instance. The Content-Type header is spelled out although the
    service reads any body as JSON, so the line also works against plain
    BentoML deployments.
    """
    body = {"instances": instances if instances is not None else [zero_instance(metadata["input_shape"])]}
    endpoint = url.rstrip("/") + "/predict"
    payload = json.dumps(body, separators=(",", ":"))
    curl = f"curl -s -X POST {endpoint} -H 'Content-Type: application/json' -d '{payload}'"
    return {"url": endpoint, "body": body, "curl": curl}


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail: Any = response.json()
    except ValueError:
        detail = response.text
    raise ServingError(f"{response.request.method} {response.request.url}: HTTP {response.status_code}: {detail}")


def fetch_metadata(url: str = DEFAULT_URL, timeout: float = 10.0) -> dict[str, Any]:
    """``GET /metadata``: labels, input shape, versions and the provider in use."""
    response = httpx.get(url.rstrip("/") + "/metadata", timeout=timeout)
    _raise_for_error(response)
    return response.json()


def predict(instances: list[Any], url: str = DEFAULT_URL, timeout: float = 30.0) -> dict[str, Any]:
    """``POST /predict``; a rejected request raises ServingError carrying the server's message."""
    response = httpx.post(url.rstrip("/") + "/predict", json={"instances": instances}, timeout=timeout)
    _raise_for_error(response)
    return response.json()


def load_instances(path: Path) -> list[Any]:
    """Read instances from a JSON file holding ``{"instances": [...]}`` or the list itself."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ServingError(f"{path}: no such file") from None
    except json.JSONDecodeError as error:
        raise ServingError(f"{path}: not valid JSON ({error})") from error
    instances = data.get("instances") if isinstance(data, dict) else data
    if not isinstance(instances, list):
        raise ServingError(f'{path}: expected {{"instances": [...]}} or a JSON list of instances')
    return instances


def main(argv: Sequence[str] | None = None) -> int:
    """Send instances (or one zero instance) and print the JSON answer."""
    parser = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL, help=f"service base URL (default {DEFAULT_URL})")
    parser.add_argument("--file", type=Path, help="JSON file with instances; default: one zero instance")
    args = parser.parse_args(argv)
    try:
        if args.file is not None:
            instances = load_instances(args.file)
        else:
            instances = example_request(fetch_metadata(args.url), args.url)["body"]["instances"]
        answer = predict(instances, args.url)
    except (ServingError, httpx.HTTPError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
