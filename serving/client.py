"""Example client for the fluxo REST API, and the curl line shown after a pipeline run.

    python -m serving.client --url http://127.0.0.1:3000 --file instances.json
    python -m serving.client --url http://127.0.0.1:3000 --image digit.png
    python -m serving.client --url http://127.0.0.1:3000   # one all-zero instance

``instances.json`` holds either ``{"instances": [...]}`` or the bare list. The
API key, when the server wants one, comes from ``--api-key`` or ``FLUXO_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from serving import API_KEY_ENV, ServingError

DEFAULT_URL = "http://127.0.0.1:3000"


def zero_instance(input_shape: Sequence[int]) -> Any:
    """A nested list of zeros shaped exactly like one instance: the smallest valid request."""
    if not input_shape:
        return 0
    return [zero_instance(input_shape[1:]) for _ in range(int(input_shape[0]))]


def table_instance(table: Mapping[str, Any]) -> dict[str, Any]:
    """A table model's default example row, an object keyed by column name (GET /metadata table.columns):
    a number column's training median (0 when unknown), a category column's first category; a valid request
    whatever the model's policy for empty values."""
    row: dict[str, Any] = {}
    for column in table.get("columns") or []:
        if column.get("type") == "category":
            categories = column.get("categories") or []
            row[column["name"]] = categories[0] if categories else None
        else:
            median = column.get("median")
            row[column["name"]] = median if isinstance(median, (int, float)) and math.isfinite(median) else 0
    return row


def default_instance(metadata: Mapping[str, Any]) -> Any:
    """The instance the example request sends when no real one is known: a table's default row
    (:func:`table_instance`), else all zeros shaped like one instance."""
    if metadata.get("kind") == "table" and metadata.get("table"):
        return table_instance(metadata["table"])
    return zero_instance(metadata["input_shape"])


def example_request(
    metadata: Mapping[str, Any], url: str = DEFAULT_URL, instances: list[Any] | None = None
) -> dict[str, Any]:
    """A ready-to-run request for the served model: its URL, JSON body and a curl line.

    ``instances`` (say, a real held-out sample: a table model's is an object keyed by column
    name) replaces the default single instance (:func:`default_instance`). The answer is
    ``{"label", "probabilities"}`` per instance for a classifier, ``{"value"}`` for a regression
    model (``metadata`` task). The Content-Type header is spelled out although the service
    reads any body as JSON, so the line also works against plain BentoML deployments.
    """
    body = {"instances": instances if instances is not None else [default_instance(metadata)]}
    endpoint = url.rstrip("/") + "/predict"
    payload = json.dumps(body, separators=(",", ":"))
    # Quoted for the shell: a category's text may hold a single quote.
    curl = f"curl -s -X POST {endpoint} -H 'Content-Type: application/json' -d {shlex.quote(payload)}"
    return {"url": endpoint, "body": body, "curl": curl}


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail: Any = response.json()
    except ValueError:
        detail = response.text
    raise ServingError(f"{response.request.method} {response.request.url}: HTTP {response.status_code}: {detail}")


def _auth(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


def fetch_metadata(url: str = DEFAULT_URL, timeout: float = 10.0) -> dict[str, Any]:
    """``GET /metadata``: labels, input shape, versions, image recipe and the provider in use."""
    response = httpx.get(url.rstrip("/") + "/metadata", timeout=timeout)
    _raise_for_error(response)
    return response.json()


def predict(
    instances: list[Any], url: str = DEFAULT_URL, timeout: float = 30.0, api_key: str | None = None
) -> dict[str, Any]:
    """``POST /predict``; a rejected request raises ServingError carrying the server's message."""
    response = httpx.post(
        url.rstrip("/") + "/predict", json={"instances": instances}, headers=_auth(api_key), timeout=timeout
    )
    _raise_for_error(response)
    return response.json()


def predict_images(
    paths: Sequence[Path], url: str = DEFAULT_URL, timeout: float = 30.0, api_key: str | None = None
) -> dict[str, Any]:
    """``POST /predict/image`` with PNG/JPEG files, one prediction per file, in order."""
    files = []
    for path in paths:
        try:
            files.append(("file", (Path(path).name, Path(path).read_bytes())))
        except OSError as error:
            raise ServingError(f"{path}: cannot read it ({error.strerror})") from None
    response = httpx.post(url.rstrip("/") + "/predict/image", files=files, headers=_auth(api_key), timeout=timeout)
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
    parser.add_argument("--image", type=Path, nargs="+", help="PNG/JPEG files to classify instead")
    parser.add_argument("--api-key", default=None, help=f"API key (default: ${API_KEY_ENV})")
    args = parser.parse_args(argv)
    try:
        if args.image:
            answer = predict_images(args.image, args.url, api_key=args.api_key)
        else:
            if args.file is not None:
                instances = load_instances(args.file)
            else:
                instances = example_request(fetch_metadata(args.url), args.url)["body"]["instances"]
            answer = predict(instances, args.url, api_key=args.api_key)
    except (ServingError, httpx.HTTPError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
