"""Open Inference Protocol (KServe v2, Triton's HTTP/REST API): documents and answers.

Tensors come as JSON here, or as bytes through the binary tensor extension
(serving/v2_binary.py), which Triton's clients use by default. The model has one input (``metadata.json`` input_name, FP32,
shape ``[-1, *input_shape]``) and outputs that carry what ``/predict`` returns. A classifier
has two: ``probabilities`` (FP32 ``[n, n_labels]``, softmax of the logits) and ``label``
(BYTES ``[n]``, the most probable label). A regression model (``/metadata`` task regression)
has one: ``value`` (FP32 ``[n, 1]``, the graph's output as is, in the target's units), the
shape its graph declares, as Triton would answer for the same ONNX model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from serving.schemas import InvalidInstances

OUTPUTS = ("probabilities", "label")
REGRESSION_OUTPUTS = ("value",)
LENGTHS = "lengths"  # the optional second input of a model that takes lengths (serving/contract.LENGTHS_NAME)
PLATFORM = "onnxruntime_onnx"


class InferTensor(BaseModel):
    """One input tensor of an inference request."""

    name: str = Field(description="The model's input name (GET /v2/models/{model_name}).")
    shape: list[int] = Field(description="[n, *input_shape]: n instances.")
    datatype: str = Field(description="Must be FP32.")
    data: list[Any] = Field(description="prod(shape) numbers, flat in row-major order or nested as shape.")
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    name: str = Field(description="probabilities or label; value for a regression model.")
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """Body of ``POST /v2/models/{model_name}/infer``."""

    id: str | None = Field(None, description="Echoed in the response.")
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(description="The model's input tensor; for a model that takes lengths "
                                      "(GET /v2/models/{model_name} lists it), optionally a second, INT64 [n] "
                                      "'lengths': each zero-padded sequence's valid steps.")
    outputs: list[RequestedOutput] | None = Field(None, description="Outputs to return; default all.")


class OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[OutputTensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """Body of ``GET /v2/models/{model_name}``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = Field(
        None, description="For a table model: {\"kind\": \"table\", \"table\": ...}, the columns of the input "
        "tensor in order (name, type, a category's vocabulary in code order, training statistics) and the "
        "policies for empty and unseen values, as GET /metadata's table. Absent for other kinds.",
    )


class ServerMetadata(BaseModel):
    """Body of ``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


def outputs_of(regression: bool) -> tuple[str, ...]:
    """The output tensors a model answers: ``value`` for a regression model, else probabilities and label."""
    return REGRESSION_OUTPUTS if regression else OUTPUTS


def model_metadata(name: str, version: str | None, input_name: str, input_shape: tuple[int, ...],
                   n_labels: int, takes_lengths: bool = False, table: dict[str, Any] | None = None,
                   regression: bool = False) -> dict[str, Any]:
    """``GET /v2/models/{name}``; a table model's columns (``table``) go in ``parameters``.

    The protocol's tensor metadata has no room for column names, so a table model adds
    ``parameters: {"kind": "table", "table": {...}}`` (the protocol's extension field): the
    input tensor is FP32 [n, F], one value per column in ``table.columns`` order, a category as
    its code (its index in ``categories``), JSON null (or NaN in binary) for an empty value when
    ``table.missing`` is impute (serving/table_rows.validate_table_tensor).
    """
    inputs = [{"name": input_name, "datatype": "FP32", "shape": [-1, *input_shape]}]
    if takes_lengths:  # optional: each zero-padded sequence's valid steps
        inputs.append({"name": LENGTHS, "datatype": "INT64", "shape": [-1]})
    document: dict[str, Any] = {
        "name": name,
        "versions": [version] if version is not None else [],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": [{"name": "value", "datatype": "FP32", "shape": [-1, 1]}] if regression else [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, n_labels]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
    }
    if table is not None:
        document["parameters"] = {"kind": "table", "table": table}
    return document


def parse_request(body: Any, known: tuple[str, ...] = OUTPUTS) -> tuple[Any, Any | None, str | None, list[str]]:
    """The envelope of an infer request: (input tensor, ``lengths`` tensor or None, id, requested outputs).

    ``known``: the model's output names (:func:`outputs_of`); requested outputs must be among them.

    A ``lengths`` tensor (INT64 ``[n]``) may follow the input for a model that takes lengths
    (a recurrent model on variable-length data): each zero-padded sequence's valid steps.
    Tensor checks come later (:func:`lengths_values`, serving/schemas.validate_tensor).
    """
    if not isinstance(body, dict):
        raise InvalidInstances('the body must be a JSON object like {"inputs": [{"name": ..., "shape": ..., '
                               '"datatype": "FP32", "data": [...]}]}')
    inputs = body.get("inputs")
    lengths = None
    if isinstance(inputs, list) and len(inputs) == 2 and isinstance(inputs[1], dict) and inputs[1].get("name") == LENGTHS:
        inputs, lengths = inputs[:1], inputs[1]
    if not isinstance(inputs, list) or len(inputs) != 1:
        found = f"{len(inputs)} tensors" if isinstance(inputs, list) else ("missing" if inputs is None else "not a list")
        raise InvalidInstances(f"inputs must be a list holding the model's input tensor (and, for a model that takes "
                               f"them, a second one named {LENGTHS!r}); it is {found}")
    request_id = body.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise InvalidInstances("id must be a string when given")
        try:  # the answer echoes it: a lone surrogate (a "\ud800" escape, which the JSON fallback reads) cannot be sent
            request_id.encode()
        except UnicodeEncodeError:
            raise InvalidInstances("id holds a lone UTF-16 surrogate escape (\\ud800-\\udfff); send valid Unicode "
                                   "text") from None
    requested = body.get("outputs")
    if requested is None:
        names = list(known)
    else:
        if not isinstance(requested, list) or not requested:
            raise InvalidInstances(f"outputs must be a non-empty list of {{\"name\": ...}} with names from {list(known)}")
        names = []
        for i, item in enumerate(requested):
            name = item.get("name") if isinstance(item, dict) else None
            if name not in known:
                raise InvalidInstances(f"outputs[{i}].name is {name!r}; this model's outputs are {list(known)}")
            names.append(name)
    return inputs[0], lengths, request_id, names


def lengths_values(tensor: Any, count: int, steps: int) -> np.ndarray:
    """A ``lengths`` input tensor → int64 (count,), each in 1..steps, or InvalidInstances naming the problem."""
    where = "inputs[1]"
    if tensor.get("datatype") not in ("INT64", "INT32"):
        raise InvalidInstances(f"{where}.datatype is {tensor.get('datatype')!r}; lengths are INT64")
    if tensor.get("shape") != [count]:
        raise InvalidInstances(f"{where}.shape is {tensor.get('shape')!r}, expected [{count}]: one length per instance")
    data = tensor.get("data")
    if (not isinstance(data, list) or len(data) != count
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in data)):
        raise InvalidInstances(f"{where}.data must be {count} whole numbers, the valid steps of each sequence")
    # Range-checked as Python ints: JSON integers are unbounded, and numpy's int64 overflows (a 500) at 2**63.
    bad = next((i for i, v in enumerate(data) if not 1 <= v <= steps), None)
    if bad is not None:
        raise InvalidInstances(f"{where}.data[{bad}] is {data[bad]}; a length lies in 1..{steps}")
    return np.asarray(data, dtype=np.int64)


def infer_response(model_name: str, version: str | None, request_id: str | None, outputs: list[str],
                   probabilities: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """The answer document; ``probabilities`` are a regression model's (n, 1) values when ``outputs`` is ``value``."""
    n, k = probabilities.shape
    tensors = []
    for name in outputs:
        if name in ("probabilities", "value"):  # a regression model's value: its (n, 1) rows
            tensors.append({"name": name, "datatype": "FP32", "shape": [n, k], "data": probabilities.ravel()})
        else:
            best = probabilities.argmax(axis=1).tolist()
            tensors.append({"name": name, "datatype": "BYTES", "shape": [n], "data": [labels[i] for i in best]})
    answer: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": tensors}
    if request_id is not None:
        answer["id"] = request_id
    return answer
