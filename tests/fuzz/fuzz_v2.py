"""Fuzz the Open Inference Protocol's infer request, whole: body, tensors, lengths, and the answer.

The calls are serving/routes_v2.py ``infer_answer``'s, in its order, for a model that takes
ragged sequences with a ``lengths`` input and for a fixed-shape one: the binary tensor
extension's split and attach (serving/v2_binary.py), parse_json, parse_request,
validate_tensor, lengths_values, and the answer built from the request's id and outputs. An
input passes when it is refused with ApiError 4xx / InvalidInstances (and that refusal can be
sent as JSON), or accepted as a float32 batch of the declared shape whose padding gives back
the lengths sent, and answered.

An input that starts with ``#`` carries ``Inference-Header-Content-Length`` up to its first
newline (``#41\\n{...}<bytes>``); any other input is a plain JSON body.

    .venv/bin/python tests/fuzz/fuzz_v2.py -max_total_time=60
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import atheris
import numpy as np
import onnxruntime  # noqa: F401 - imported uninstrumented (serving.runtime's), only our code is traced
import orjson  # noqa: F401

with atheris.instrument_imports(include=["serving"]):
    from serving import v2 as oip
    from serving import v2_binary as binary
    from serving.http import (
        ApiError,
        error_response,
        invalid,
        json_response,
        parse_json,
    )
    from serving.runtime import nan_padded, nan_padded_lengths
    from serving.schemas import InvalidInstances, validate_tensor

from tests.fuzz.harness import fuzz

INPUT = "input"
SEQUENCE = (2, 4)  # takes lengths: (channels, steps)
SHAPE = (1, 2, 2)  # fixed shape, no lengths
MAX_INSTANCES = 4
LABELS = ["a", "b", "c"]


def _binary(header: bytes, *tensors: bytes) -> bytes:
    return b"#%d\n" % len(header) + header + b"".join(tensors)


SEEDS = [
    b'{"inputs": [{"name": "input", "shape": [1, 2, 4], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6, 7, 8]}]}',
    (b'{"id": "a", "inputs": [{"name": "input", "shape": [2, 2, 4], "datatype": "FP32", "data": '
     b'[[[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [5, 6, 7, 8]]]}, '
     b'{"name": "lengths", "shape": [2], "datatype": "INT64", "data": [4, 1]}], "outputs": [{"name": "label"}]}'),
    b'{"inputs": [{"name": "input", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}',
    (b'{"inputs": [{"name": "input", "shape": [1, 2, 4], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6, 7, 8]}, '
     b'{"name": "lengths", "shape": [1], "datatype": "INT32", "data": [9223372036854775807]}]}'),
    (b'{"inputs": [{"name": "input", "shape": [1, 2, 4], "datatype": "FP16", "data": [NaN, "1", true, null]}], '
     b'"outputs": [{"name": "probabilities"}, 7]}'),
    _binary(b'{"inputs": [{"name": "input", "shape": [1, 2, 4], "datatype": "FP32", '
            b'"parameters": {"binary_data_size": 32}}, {"name": "lengths", "shape": [1], "datatype": "INT64", '
            b'"parameters": {"binary_data_size": 8}}], "parameters": {"binary_data_output": true}}',
            struct.pack("<8f", *range(8)), struct.pack("<q", 3)),
    _binary(b'{"id": "b", "inputs": [{"name": "input", "shape": [1, 1, 2, 2], "datatype": "FP32", '
            b'"parameters": {"binary_data_size": 16}}], "outputs": [{"name": "label", "parameters": '
            b'{"binary_data": true}}, {"name": "probabilities"}]}', struct.pack("<4f", 1, 2, float("nan"), 4)),
]
TOKENS = [b'"inputs"', b'"name"', b'"input"', b'"lengths"', b'"shape"', b'"datatype"', b'"FP32"', b'"INT64"',
          b'"INT32"', b'"data"', b'"outputs"', b'"label"', b'"probabilities"', b'"id"', b'"parameters"',
          b'"binary_data_size"', b'"binary_data"', b'"binary_data_output"', b"NaN", b"Infinity", b"1e39", b"true",
          b"null", b"-1", b"9223372036854775808", b"18446744073709551616", b"\\ud800", b"\x00\x00\xc0\x7f"]


def test_one_input(data: bytes) -> None:
    """One request (header and body), handled the way infer_answer handles it, for both kinds of model."""
    declared = None
    if data.startswith(b"#"):
        line, _, data = data[1:].partition(b"\n")
        declared = line.decode("latin-1")  # how an HTTP header's bytes reach the route
    for shape, takes_lengths in ((SEQUENCE, True), (SHAPE, False)):
        try:
            _infer(data, declared, shape, takes_lengths)
        except ApiError as error:
            _refused(error.status, error.message)
        except InvalidInstances as error:
            api = invalid(error)
            _refused(api.status, api.message)


def _infer(raw: bytes, declared: str | None, shape: tuple[int, ...], takes_lengths: bool) -> None:
    header, blob = binary.split_body(raw, declared)
    body = parse_json(header)
    if declared is not None and isinstance(body, dict):
        binary.attach_binary(body.get("inputs"), blob)
    tensor, lengths, request_id, outputs = oip.parse_request(body)
    batch = validate_tensor(tensor, "inputs[0]", INPUT, shape, MAX_INSTANCES)
    assert batch.dtype == np.float32 and batch.shape[1:] == shape and 1 <= len(batch) <= MAX_INSTANCES
    assert np.isfinite(batch).all(), batch
    if lengths is not None:
        if not takes_lengths:
            raise InvalidInstances("inputs[1] 'lengths': this model takes no lengths")  # infer_answer's refusal
        if isinstance(lengths.get("data"), np.ndarray):
            lengths = {**lengths, "data": lengths["data"].tolist()}
        steps = oip.lengths_values(lengths, len(batch), batch.shape[-1])
        assert steps.dtype == np.int64 and steps.shape == (len(batch),) and ((steps >= 1) & (steps <= shape[-1])).all()
        padded = nan_padded(batch, steps)
        assert (nan_padded_lengths(padded)[1] == steps).all(), (steps, padded)  # the runtime reads them back
    in_binary = binary.binary_outputs(body, outputs)
    probabilities = np.full((len(batch), len(LABELS)), 1 / len(LABELS), dtype=np.float32)
    document = oip.infer_response("fluxo", "3", request_id, outputs, probabilities, LABELS)
    if in_binary:
        binary.binary_response(document, in_binary)
    else:
        json_response(document)


def _refused(status: int, message: str) -> None:
    assert 400 <= status < 500, (status, message)
    error_response(status, message)  # the answer must be writable: orjson refuses e.g. lone surrogates


if __name__ == "__main__":
    fuzz("v2", test_one_input, SEEDS, TOKENS)
