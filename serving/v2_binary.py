"""The Open Inference Protocol's binary tensor extension, in and out, as Triton and KServe define it.

Why: NVIDIA's ``tritonclient`` sends its input tensors as raw bytes and asks for raw outputs by
default (``InferInput.set_data_from_numpy(binary_data=True)``, ``binary_data_output``); a server
that speaks only JSON tensors makes every Triton user change code. The extension
(Triton's docs, "Binary Tensor Data Extension"):

- the body is a JSON inference header followed by the tensors' bytes; the header's length is in
  ``Inference-Header-Content-Length``;
- an input with ``"parameters": {"binary_data_size": N}`` has no ``data``: its N bytes follow the
  header, in the order of the inputs, little-endian, row-major; a ``BYTES`` element is a 4-byte
  little-endian length and the bytes;
- an output is answered in binary when it asks for ``"binary_data": true``, or when the request's
  ``parameters`` say ``"binary_data_output": true`` and the output does not say otherwise; the
  answer then carries ``binary_data_size`` instead of ``data``, the bytes after the JSON header,
  and ``Inference-Header-Content-Length``.

Every malformed part is the client's mistake, an :class:`InvalidInstances` (400) naming it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson
from starlette.responses import Response

from serving.schemas import InvalidInstances

HEADER_LENGTH = "Inference-Header-Content-Length"
_HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()
EXTENSION = "binary_tensor_data"
# Little-endian numpy types of the datatypes an input of this service may carry in binary.
_DTYPES = {"FP32": "<f4", "INT64": "<i8", "INT32": "<i4"}


def split_body(raw: bytes, declared: str | None) -> tuple[bytes, bytes]:
    """(JSON header, tensor bytes) of a request body; all of it is JSON when ``declared`` is None."""
    if declared is None:
        return raw, b""
    try:
        length = int(declared)
    except ValueError:
        raise InvalidInstances(f"{HEADER_LENGTH} {declared[:40]!r} is not a number of bytes") from None
    if not 0 < length <= len(raw):
        raise InvalidInstances(f"{HEADER_LENGTH} is {length}, but the body holds {len(raw)} bytes; it must be the "
                               "length of the JSON inference header at the start of the body")
    return raw[:length], raw[length:]


def attach_binary(inputs: Any, blob: bytes) -> None:
    """Give every input that declares ``binary_data_size`` its values from ``blob``, as a flat numpy array."""
    offset = 0
    for i, tensor in enumerate(inputs if isinstance(inputs, list) else ()):
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is None:
            continue
        where = f"inputs[{i}]"
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInstances(f"{where}.parameters.binary_data_size is {size!r}; it must be a byte count")
        if "data" in tensor:
            raise InvalidInstances(f"{where} has both data and binary_data_size; send its values one way")
        if offset + size > len(blob):
            raise InvalidInstances(f"{where}.parameters.binary_data_size is {size}, but only {len(blob) - offset} "
                                   f"bytes follow the inference header for it")
        tensor["data"] = _values(blob[offset:offset + size], tensor.get("datatype"), where)
        offset += size
    if offset != len(blob):
        raise InvalidInstances(f"{len(blob) - offset} bytes after the inference header belong to no input; each "
                               "binary input states its size in parameters.binary_data_size")


def _values(chunk: bytes, datatype: Any, where: str) -> np.ndarray:
    dtype = _DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidInstances(f"{where}.datatype is {datatype!r}; binary inputs of this model are "
                               f"{' or '.join(_DTYPES)}")
    width = np.dtype(dtype).itemsize
    if len(chunk) % width:
        raise InvalidInstances(f"{where}: {len(chunk)} bytes is not a whole number of {datatype} values "
                               f"({width} bytes each)")
    return np.frombuffer(chunk, dtype=dtype)


def binary_outputs(body: dict[str, Any], names: Iterable[str]) -> frozenset[str]:
    """The outputs to answer in binary: each output's ``binary_data``, else the request's ``binary_data_output``."""
    parameters = body.get("parameters")
    default = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    requested = body.get("outputs")
    if not isinstance(requested, list):
        return frozenset(names) if default else frozenset()
    chosen = set()
    for item in requested:
        own = item.get("parameters") if isinstance(item, dict) else None
        flag = own.get("binary_data", default) if isinstance(own, dict) else default
        if flag is True:
            chosen.add(item["name"])
    return frozenset(chosen)


def _bytes_of(tensor: dict[str, Any]) -> bytes:
    if tensor["datatype"] == "BYTES":
        encoded = [str(value).encode() for value in tensor["data"]]
        return b"".join(struct.pack("<I", len(value)) + value for value in encoded)
    return np.ascontiguousarray(tensor["data"], dtype=_DTYPES[tensor["datatype"]]).tobytes()


def binary_response(answer: dict[str, Any], binary: frozenset[str]) -> Response:
    """An inference answer with the ``binary`` outputs' values after the JSON header (the header's length said)."""
    blobs = []
    for tensor in answer["outputs"]:
        if tensor["name"] in binary:
            blob = _bytes_of(tensor)
            del tensor["data"]
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    response = Response(header + b"".join(blobs), media_type="application/octet-stream")
    response.raw_headers.append((_HEADER_LENGTH_KEY, str(len(header)).encode()))  # no MutableHeaders scan
    return response
