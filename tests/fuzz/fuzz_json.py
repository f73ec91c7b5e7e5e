"""Fuzz ``POST /predict``'s body handling: parse_json, then validate_instances / validate_sequences.

The calls are serving/routes_predict.py ``predict_response``'s, in its order, for a model with
a fixed input shape and for one that takes ragged sequences. An input passes when it is
refused with ApiError 4xx / InvalidInstances (and that refusal can be sent as JSON), or
accepted as a finite float32 batch of the declared shape.

    .venv/bin/python tests/fuzz/fuzz_json.py -max_total_time=60
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import atheris
import numpy as np
import orjson  # noqa: F401 - imported uninstrumented: only our code is traced

with atheris.instrument_imports(include=["serving"]):
    from serving.http import ApiError, error_response, invalid, parse_json
    from serving.schemas import (
        InvalidInstances,
        only_numbers,
        validate_instances,
        validate_sequences,
    )

from tests.fuzz.harness import fuzz

SHAPE = (1, 2, 3)  # a fixed-shape model: small, so the mutator reaches valid batches
SEQUENCE = (2, 4)  # a model that takes lengths: (channels, steps), sequences up to 4 steps
MAX_INSTANCES = 4

SEEDS = [
    b'{"instances": [[[1, 2, 3], [4, 5, 6]]]}',
    b'{"instances": [[[1.5, -2e3, 0], [4, 5, 6]], [[0, 0, 0], [1, 1, 1]]]}',
    b'{"instances": [[[1, 2], [3, 4]], [[1, 2, 3, 4], [5, 6, 7, 8]]]}',
    b'{"instances": [[[NaN, 1, 2], [3, Infinity, 1e39]]]}',
    b'{"instances": [[["1", true, null], [{}, [], 2]]]}',
    b'{"inputs": []}',
    b'[1, 2]',
]
TOKENS = [b'"instances"', b'"inputs"', b"NaN", b"-Infinity", b"1e39", b"3.4028235e38", b"true", b"null",
          b"18446744073709551616", b"[[", b"]]", b"\\ud800", b"\xef\xbb\xbf"]


def test_one_input(data: bytes) -> None:
    """One request body, checked the way predict_response checks it, for both kinds of model."""
    try:
        body = parse_json(data)
    except ApiError as error:
        _refused(error.status, error.message)
        return
    if not isinstance(body, dict) or "instances" not in body:
        return  # answered 400 by predict_response itself
    numbers = only_numbers(data)
    for validate, shape in ((validate_instances, SHAPE), (validate_sequences, SEQUENCE)):
        try:
            batch = validate(body["instances"], shape, MAX_INSTANCES, numbers)
        except InvalidInstances as error:
            api = invalid(error)
            _refused(api.status, api.message)
            continue
        _accepted(batch, shape, ragged=validate is validate_sequences)


def _refused(status: int, message: str) -> None:
    assert 400 <= status < 500, (status, message)
    error_response(status, message)  # the answer must be writable: orjson refuses e.g. lone surrogates


def _accepted(batch: np.ndarray, shape: tuple[int, ...], ragged: bool) -> None:
    assert batch.dtype == np.float32 and batch.shape[1:] == shape and 1 <= len(batch) <= MAX_INSTANCES, batch.shape
    values = batch[~np.isnan(batch)] if ragged else batch
    assert np.isfinite(values).all(), batch
    if ragged:  # NaN only as each sequence's tail padding, at least one step kept
        steps = (~np.isnan(batch)).all(axis=1).sum(axis=1)
        assert (steps >= 1).all() and all(np.isnan(row[:, n:]).all() for row, n in zip(batch, steps)), batch


if __name__ == "__main__":
    fuzz("json", test_one_input, SEEDS, TOKENS)
