"""NVIDIA's own Triton HTTP client against a fluxo server, as a Triton user would call it.

Run as a script (``python tests/serving/triton_client_check.py HOST:PORT MODEL KEY INSTANCES.npy``)
by tests/serving/test_serving_http.py: tritonclient brings gevent, which is kept out of the
pytest process. Prints one JSON document: each check's outcome, and the probabilities the
server answered with binary tensors (tritonclient's defaults) and with JSON tensors.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import numpy as np
import tritonclient.http as triton


def _infer(client: Any, model: str, batch: np.ndarray, binary: bool, key: str) -> list:
    headers = {"Authorization": f"Bearer {key}"}  # a fresh dict per call: tritonclient writes its own headers into it
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    if binary:  # every default: binary input, no outputs named, so binary_data_output
        tensor.set_data_from_numpy(batch)
        result = client.infer(model, [tensor], headers=headers)
    else:
        tensor.set_data_from_numpy(batch, binary_data=False)
        outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in ("probabilities", "label")]
        result = client.infer(model, [tensor], outputs=outputs, headers=headers)
    labels = [value.decode() if isinstance(value, bytes) else str(value) for value in result.as_numpy("label")]
    return [result.as_numpy("probabilities").tolist(), labels]


def main(address: str, model: str, key: str, instances: str) -> dict[str, Any]:
    client = triton.InferenceServerClient(url=address, connection_timeout=30, network_timeout=30)
    headers = {"Authorization": f"Bearer {key}"}
    batch = np.load(instances).astype(np.float32)
    checks = {
        "server live": lambda: client.is_server_live(headers=headers),
        "server ready": lambda: client.is_server_ready(headers=headers),
        "server metadata": lambda: client.get_server_metadata(headers=headers),
        "model metadata": lambda: client.get_model_metadata(model, headers=headers),
        "model ready": lambda: client.is_model_ready(model, headers=headers),
        "infer, binary tensors": lambda: _infer(client, model, batch, True, key),
        "infer, JSON tensors": lambda: _infer(client, model, batch, False, key),
    }
    report: dict[str, Any] = {}
    for name, check in checks.items():
        try:
            report[name] = {"ok": True, "value": check()}
        except Exception as error:  # noqa: BLE001 - every check is reported, none stops the others
            report[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                            "trace": traceback.format_exc(limit=3)}
    client.close()
    return report


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5])))
