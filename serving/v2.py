"""Open Inference Protocol (KServe v2, Triton's HTTP/REST API): documents and answers.

Only the JSON form of the protocol is served; the binary tensor extension is
refused with 415. The model has one input (``metadata.json`` input_name, FP32,
shape ``[-1, *input_shape]``) and two outputs that carry what ``/predict``
returns: ``probabilities`` (FP32 ``[n, n_labels]``, softmax of the logits) and
``label`` (BYTES ``[n]``, the most probable label).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from serving.schemas import InvalidInstances

OUTPUTS = ("probabilities", "label")
PLATFORM = "onnxruntime_onnx"


class InferTensor(BaseModel):
    """One input tensor of an inference request."""

    name: str = Field(description="The model's input name (GET /v2/models/{model_name}).")
    shape: list[int] = Field(description="[n, *input_shape]: n instances.")
    datatype: str = Field(description="Must be FP32.")
    data: list[Any] = Field(description="prod(shape) numbers, flat in row-major order or nested as shape.")
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    name: str = Field(description="probabilities or label.")
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """Body of ``POST /v2/models/{model_name}/infer``."""

    id: str | None = Field(None, description="Echoed in the response.")
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(description="Exactly one tensor, the model's input.")
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


class ServerMetadata(BaseModel):
    """Body of ``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


def model_metadata(name: str, version: str | None, input_name: str, input_shape: tuple[int, ...],
                   n_labels: int) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [version] if version is not None else [],
        "platform": PLATFORM,
        "inputs": [{"name": input_name, "datatype": "FP32", "shape": [-1, *input_shape]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, n_labels]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
    }


def parse_request(body: Any) -> tuple[Any, str | None, list[str]]:
    """The envelope of an infer request: (the input tensor, id, requested outputs); tensor checks come later."""
    if not isinstance(body, dict):
        raise InvalidInstances('the body must be a JSON object like {"inputs": [{"name": ..., "shape": ..., '
                               '"datatype": "FP32", "data": [...]}]}')
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        found = f"{len(inputs)} tensors" if isinstance(inputs, list) else ("missing" if inputs is None else "not a list")
        raise InvalidInstances(f"inputs must be a list holding exactly one tensor (the model has one input); it is {found}")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInstances("id must be a string when given")
    requested = body.get("outputs")
    if requested is None:
        names = list(OUTPUTS)
    else:
        if not isinstance(requested, list) or not requested:
            raise InvalidInstances(f"outputs must be a non-empty list of {{\"name\": ...}} with names from {list(OUTPUTS)}")
        names = []
        for i, item in enumerate(requested):
            name = item.get("name") if isinstance(item, dict) else None
            if name not in OUTPUTS:
                raise InvalidInstances(f"outputs[{i}].name is {name!r}; this model's outputs are {list(OUTPUTS)}")
            names.append(name)
    return inputs[0], request_id, names


def infer_response(model_name: str, version: str | None, request_id: str | None, outputs: list[str],
                   probabilities: np.ndarray, labels: list[str]) -> dict[str, Any]:
    n, k = probabilities.shape
    tensors = []
    for name in outputs:
        if name == "probabilities":
            tensors.append({"name": name, "datatype": "FP32", "shape": [n, k], "data": probabilities.ravel()})
        else:
            best = probabilities.argmax(axis=1).tolist()
            tensors.append({"name": name, "datatype": "BYTES", "shape": [n], "data": [labels[i] for i in best]})
    answer: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": tensors}
    if request_id is not None:
        answer["id"] = request_id
    return answer
