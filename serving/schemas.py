"""Request and response shapes of the REST API, and the checks behind them.

The instance shape is known only at run time (it comes from metadata.json), so
pydantic checks the envelope and :func:`validate_instances` checks the numbers,
with messages that point at the offending instance and element.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from serving import ServingError

_NUMBER_TYPES = frozenset({int, float})
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class InvalidInstances(ServingError, ValueError):
    """A request whose instances do not fit the model; the service answers 400 with this message."""


class TooManyInstances(InvalidInstances):
    """More instances than ``FLUXO_MAX_INSTANCES`` in one request; the service answers 413."""


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer: one sentence naming the field or limit and the fix."""

    error: str = Field(description="What was wrong with the request, naming the field, instance or limit.")


class PredictRequest(BaseModel):
    """Body of ``POST /predict``."""

    instances: list[Any] = Field(
        description="One nested list of numbers per instance, each shaped exactly like the model's input_shape "
        "(see GET /metadata), raw values as stored in the dataset. For a table model (GET /metadata kind "
        "\"table\"), each instance is an object keyed by column name (every column of GET /metadata table.columns) "
        "or a list of one value per column in that order: a number column's number, a category column's text, "
        "null for an empty value when table.missing is impute.",
    )


class Prediction(BaseModel):
    """A classifier's answer for one instance (GET /metadata task multiclass or binary)."""

    label: str = Field(description="The most probable label.")
    probabilities: list[float] = Field(description="One probability per label, in the order of GET /metadata labels.")


class ValuePrediction(BaseModel):
    """A regression model's answer for one instance (GET /metadata task regression)."""

    value: float = Field(description="The predicted value, in the units of the target (GET /metadata labels[0]).")


class PredictResponse(BaseModel):
    """Body of a successful ``POST /predict``: one prediction per instance, in request order."""

    predictions: list[Prediction | ValuePrediction] = Field(
        description="A classifier answers {label, probabilities} per instance, a regression model {value} "
        "(GET /metadata task says which).")
    model_version: str | None = Field(description="Registry version of the served model; null for a plain export.")


class MetadataResponse(BaseModel):
    """Body of ``GET /metadata``."""

    model_name: str | None
    model_version: str | None
    architecture: str | None = None
    task: str = Field("multiclass", description="multiclass or binary: POST /predict answers a label and its "
                      "probabilities; regression: one value per instance, in the units of the target labels[0].")
    run_id: str | None = None
    dataset: str | None = None
    data_version: str | None
    input_shape: list[int]
    input_dtype: str = "float32"
    labels: list[str] = Field(description="Class names in probability order; for a regression model, [the target's "
                              "name].")
    test_metrics: dict[str, float]
    onnx_opset: int | None = None
    takes_lengths: bool = Field(
        False, description="true: instances may be shorter than input_shape's last dimension (ragged sequences); "
        "each is read to its own end, as in training."
    )
    provider: str = Field(description="ONNX Runtime execution provider in use, e.g. CPUExecutionProvider.")
    variant: str = Field("fp32", description="The precision running: fp32, or an int8/fp16 variant export's gate "
                         "kept (FLUXO_VARIANT).")
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Each variant export tried and the gate's decision: kept, reason, test "
        "accuracy, accuracy drop in points, latency at batch 1 and 32, speedup, provider.",
    )
    image: dict[str, Any] | None = Field(
        None, description="How POST /predict/image turns a PNG/JPEG into an instance; null when the model takes no images."
    )
    kind: str | None = Field(None, description="Input kind: image, sequence or table (null in older model directories).")
    table: dict[str, Any] | None = Field(
        None, description="A table model's input: columns in input order (name, type number|category, a category's "
        "vocabulary in code order, training statistics: missing, median, center, scale) and the policies missing "
        "(impute|refuse) and unseen_category (ignore|refuse); null for other kinds.",
    )
    columns: list[dict[str, Any]] | None = Field(
        None, description="A table model's columns as its input contract (name, type, categories): what a "
        "challenger must share; null for other kinds.",
    )


def _shape_str(shape: Sequence[int]) -> str:
    return str(tuple(shape))


def _nominal_shape(value: Any) -> tuple[int, ...]:
    """Shape read along the first element at each level; a ragged list shows up later."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value[:20]!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (int, float)):
        return f"a number ({repr(value)[:20]})"
    return f"a {type(value).__name__}"


def _leaf_problem(value: Any) -> str | None:
    if type(value) not in _NUMBER_TYPES:
        return f"is {_describe(value)}, expected a number"
    try:
        number = float(value)
    except OverflowError:
        return "is too large for float32"
    if math.isnan(number):
        return "is NaN; values must be finite numbers"
    if math.isinf(number):
        return f"is {'-' if number < 0 else ''}Infinity; values must be finite numbers"
    if abs(number) > _FLOAT32_MAX:
        return f"is {number:g}, outside the float32 range"
    return None


def _find_problem(value: Any, shape: Sequence[int], path: str) -> str | None:
    """Walk one instance and describe its first problem, or None when it is well formed."""
    if not shape:
        problem = _leaf_problem(value)
        return f"{path} {problem}" if problem else None
    if not isinstance(value, list):
        return f"{path} is {_describe(value)}, expected a list of {shape[0]}"
    if len(value) != shape[0]:
        return f"{path} has {len(value)} items, expected {shape[0]} (nested lists must not be ragged)"
    for i, item in enumerate(value):
        problem = _find_problem(item, shape[1:], f"{path}[{i}]")
        if problem:
            return problem
    return None


def _diagnose(instances: list[Any], shape: tuple[int, ...]) -> str:
    """Explain why the fast path rejected the request, naming the first bad instance."""
    for index, instance in enumerate(instances):
        path = f"instances[{index}]"
        nominal = _nominal_shape(instance)
        if nominal != shape:
            if not isinstance(instance, list):
                return f"{path} is {_describe(instance)}, expected a nested list of shape {_shape_str(shape)}"
            return f"{path} has shape {_shape_str(nominal)}, expected {_shape_str(shape)}"
        problem = _find_problem(instance, shape, path)
        if problem:
            return problem
    return f"instances do not fit shape {_shape_str(shape)}"  # not reached: the fast path had a reason


# What a JSON body holds besides strings and the literals true, false, null, NaN, Infinity.
_NUMBER_SYNTAX = b"0123456789.eE+-[]{}:, \t\r\n"


def only_numbers(body: bytes) -> bool:
    """True when the JSON ``body``'s one string is the key ``"instances"`` and it has no literal: every value a number.

    Two C-level passes over the bytes (about 0.5 us for a digit). It lets
    :func:`validate_instances` convert straight to float32 instead of checking each
    value's type, the one thing numpy's conversion would not (it reads ``"1"`` and ``true``).
    """
    return body.count(b'"') == 2 and not body.replace(b'"instances"', b"", 1).translate(None, _NUMBER_SYNTAX)


def validate_instances(instances: Any, input_shape: Sequence[int], max_instances: int,
                       numbers_only: bool = False) -> np.ndarray:
    """Turn ``instances`` into a float32 array of shape (n, *input_shape), or raise InvalidInstances.

    Exactly the declared shape is accepted: 64 flat numbers for (1, 8, 8) hold
    the right count but would be reshaped silently into something the client
    never meant. Booleans and numeric strings are refused for the same reason.
    ``numbers_only``: the caller has shown every value is a JSON number (:func:`only_numbers`);
    the conversion then needs no per-value type check (half the time for a digit). Anything
    it does not accept goes through the full check below, which names the problem.
    """
    shape = tuple(input_shape)
    if numbers_only and isinstance(instances, list) and 0 < len(instances) <= max_instances:
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # a client's 1e39 is refused below, not logged
                batch = np.array(instances, dtype=np.float32)  # beyond float32's range: inf
                total = batch.sum()  # NaN or inf when any value is (or, rarely, a valid sum overflows: full check)
        except (ValueError, TypeError, OverflowError):
            batch = None
        if batch is not None and batch.shape == (len(instances), *shape) and math.isfinite(total):
            return batch
    if not isinstance(instances, list):
        raise InvalidInstances(f"instances must be a list of instances, got {_describe(instances)}")
    if not instances:
        raise InvalidInstances(f"instances is empty; send at least one instance of shape {_shape_str(shape)}")
    if len(instances) > max_instances:
        raise TooManyInstances(
            f"instances has {len(instances)} items, more than the limit of {max_instances} per request "
            "(FLUXO_MAX_INSTANCES); split the request"
        )
    # Fast path: one C-level pass builds an object array; any irregularity leaves it the wrong shape.
    try:
        grid = np.array(instances, dtype=object)
    except ValueError:
        grid = None
    if grid is None or grid.shape != (len(instances), *shape):
        raise InvalidInstances(_diagnose(instances, shape))
    flat = grid.ravel()
    if not set(map(type, flat)) <= _NUMBER_TYPES:
        raise InvalidInstances(_diagnose(instances, shape))
    try:
        values = flat.astype(np.float64)
    except OverflowError:
        raise InvalidInstances(_diagnose(instances, shape)) from None
    if not np.isfinite(values).all() or (np.abs(values) > _FLOAT32_MAX).any():
        raise InvalidInstances(_diagnose(instances, shape))
    return values.astype(np.float32).reshape(len(instances), *shape)


def validate_sequences(instances: Any, input_shape: Sequence[int], max_instances: int,
                       numbers_only: bool = False) -> np.ndarray:
    """Like :func:`validate_instances`, for a model that takes lengths: sequences may be shorter.

    Each instance is (C, l) with 1 <= l <= L of ``input_shape`` (C, L); the array comes back
    (n, C, L) with every sequence padded by NaN to L. Client values are never NaN (they are
    refused), so the runtime reads the padding as each sequence's length (serving/runtime.py).
    """
    shape = tuple(input_shape)
    try:
        return validate_instances(instances, shape, max_instances, numbers_only)  # all full length: the fast path
    except TooManyInstances:
        raise
    except InvalidInstances as full_length_error:
        if not isinstance(instances, list) or not instances or len(shape) != 2:
            raise full_length_error from None
    channels, steps = shape
    out = np.full((len(instances), channels, steps), np.nan, dtype=np.float32)
    for i, instance in enumerate(instances):
        where = f"instances[{i}]"
        try:
            grid = np.array(instance, dtype=object)
        except ValueError:
            grid = None
        if grid is None or grid.ndim != 2 or grid.shape[0] != channels or not 1 <= grid.shape[1] <= steps:
            got = _describe(instance) if grid is None or grid.ndim != 2 else f"shape {grid.shape}"
            raise InvalidInstances(f"{where}: {got}; this model takes sequences of shape ({channels}, 1..{steps}): "
                                   f"{channels} channel(s), each a list of up to {steps} numbers, all of one length")
        values = check_values(grid.ravel(), where)
        out[i, :, : grid.shape[1]] = values.astype(np.float32).reshape(grid.shape)
    return out


def check_values(flat: np.ndarray, where: str) -> np.ndarray:
    """Object array of leaves → float64 values; InvalidInstances names ``where[i]`` of the first bad leaf."""
    if set(map(type, flat)) <= _NUMBER_TYPES:
        try:
            values = flat.astype(np.float64)
        except OverflowError:
            values = None
        if values is not None and np.isfinite(values).all() and not (np.abs(values) > _FLOAT32_MAX).any():
            return values
    for i, value in enumerate(flat):
        problem = _leaf_problem(value)
        if problem:
            raise InvalidInstances(f"{where}[{i}] {problem}")
    raise InvalidInstances(f"{where} holds values that are not finite float32 numbers")  # not reached


def validate_tensor(
    tensor: Any, where: str, input_name: str, input_shape: Sequence[int], max_instances: int
) -> np.ndarray:
    """One Open Inference Protocol input tensor → float32 array (n, *input_shape), or InvalidInstances.

    ``data`` may be flat in row-major order (the protocol's usual form) or nested
    exactly as ``shape``; either way it must hold exactly prod(shape) numbers.
    """
    shape_expected = ["n", *input_shape]
    if not isinstance(tensor, dict):
        raise InvalidInstances(f"{where} is {_describe(tensor)}, expected an object with name, shape, datatype and data")
    name = tensor.get("name")
    if name != input_name:
        raise InvalidInstances(f"{where}.name is {_describe(name) if not isinstance(name, str) else repr(name)}; "
                               f"this model's input is named {input_name!r}")
    datatype = tensor.get("datatype")
    if datatype != "FP32":
        raise InvalidInstances(f"{where}.datatype is {datatype!r}; this model's input is FP32")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or len(shape) != len(input_shape) + 1
        or tuple(shape[1:]) != tuple(input_shape)
    ):
        expected = "[" + ", ".join(map(str, shape_expected)) + "]"
        raise InvalidInstances(f"{where}.shape is {shape!r}, expected {expected} with n instances")
    count = shape[0]
    if count < 1:
        raise InvalidInstances(f"{where}.shape {shape} has no instances; send at least one")
    if count > max_instances:
        raise TooManyInstances(
            f"{where}.shape {shape} holds {count} instances, more than the limit of {max_instances} per request "
            "(FLUXO_MAX_INSTANCES); split the request"
        )
    data = tensor.get("data")
    size = math.prod(shape)  # numpy's prod of a list costs more than the rest of a small tensor's check
    if isinstance(data, np.ndarray):  # sent as bytes (serving/v2_binary.py): flat float32, every value its type
        if data.size != size:
            raise InvalidInstances(f"{where} carries {data.size} values in binary; shape {shape} needs {size}")
        values = data.reshape(shape)  # a view of the request's read-only buffer: the batcher copies when it merges
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(data))[0])
            raise InvalidInstances(f"{where}.data[{bad}] is {data[bad]}; values must be finite numbers")
        return values
    if not isinstance(data, list):
        raise InvalidInstances(f"{where}.data is {_describe(data)}, expected a list of numbers")
    if len(data) == size and all(type(value) is float or type(value) is int for value in data):
        # The protocol's usual form, flat numbers: straight to float64, no object array (a third of the time).
        try:
            values = np.array(data, dtype=np.float64)
        except OverflowError:  # an integer beyond float64: the full check below names it
            values = None
        if values is not None and np.isfinite(values).all() and not (np.abs(values) > _FLOAT32_MAX).any():
            return values.astype(np.float32).reshape(shape)
    try:
        grid = np.array(data, dtype=object)
    except ValueError:
        grid = None
    if grid is None or (grid.shape != (size,) and grid.shape != tuple(shape)):
        found = f"{len(data)} items" if grid is None or grid.ndim != 1 else f"{grid.size} values"
        if grid is None or (grid.ndim == 1 and any(isinstance(v, list) for v in grid)):
            found = "ragged nested lists"
        elif grid.ndim > 1:
            found = f"nested values of shape {list(grid.shape)}"
        raise InvalidInstances(
            f"{where}.data has {found}; shape {shape} needs {size} numbers, flat in row-major order or nested as the shape"
        )
    values = check_values(grid.ravel(), f"{where}.data")
    return values.astype(np.float32).reshape(shape)
