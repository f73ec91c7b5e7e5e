"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) routes: ``/v2...``.

The protocol's documents and their checks are in serving/v2.py; this module binds them to
the live model: which model and version a path names, and inference through the same
batcher, rollout and payload log as ``POST /predict`` (serving/server.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from serving import v2 as oip
from serving import v2_binary as binary
from serving.http import (
    ERROR_RESPONSES,
    ApiError,
    Receive,
    invalid,
    json_response,
    media_type,
    parse_json,
    read_limited,
    refuse_cross_site,
    require_api_key,
    require_json,
)
from serving.rollout import CANARY
from serving.runtime import nan_padded
from serving.schemas import ErrorResponse, InvalidInstances, validate_tensor
from serving.server import LiveModel, ModelServer, server_of
from serving.table_rows import validate_table_tensor

_INFER_BODY = {
    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
    # The binary tensor extension (serving/v2_binary.py): the JSON inference header, then the tensors' bytes;
    # the header's length in Inference-Header-Content-Length.
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}
# The handlers parse their bodies themselves; the OpenAPI document still states them (routes_ops.openapi_document).
REQUEST_BODIES: dict[str, dict[str, Any]] = {
    "/v2/models/{model_name}/infer": _INFER_BODY,
    "/v2/models/{model_name}/versions/{model_version}/infer": _INFER_BODY,
}
BODY_SCHEMAS: tuple[type[BaseModel], ...] = (oip.InferRequest,)

_MISSING: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse, "description": "No such model or version."}}

router = APIRouter()


@router.get("/v2", response_model=oip.ServerMetadata, tags=["v2"])
async def v2_server() -> Response:
    return json_response({"name": "fluxo", "version": "1", "extensions": [binary.EXTENSION]})


@router.get("/v2/health/live", tags=["v2"])
async def v2_live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready", tags=["v2"], responses={503: {"model": ErrorResponse}})
async def v2_ready(request: Request) -> Response:
    server_of(request)
    return json_response({"ready": True})


@router.get("/v2/models/{model_name}", response_model=oip.ModelMetadata, tags=["v2"], responses=_MISSING)
async def v2_model(request: Request, model_name: str) -> Response:
    return _model_metadata(request, model_name, None)


@router.get("/v2/models/{model_name}/versions/{model_version}", response_model=oip.ModelMetadata, tags=["v2"],
            responses=_MISSING)
async def v2_model_version(request: Request, model_name: str, model_version: str) -> Response:
    return _model_metadata(request, model_name, model_version)


@router.get("/v2/models/{model_name}/ready", tags=["v2"], responses=_MISSING)
async def v2_model_ready(request: Request, model_name: str) -> Response:
    return _model_ready(request, model_name, None)


@router.get("/v2/models/{model_name}/versions/{model_version}/ready", tags=["v2"], responses=_MISSING)
async def v2_model_version_ready(request: Request, model_name: str, model_version: str) -> Response:
    return _model_ready(request, model_name, model_version)


@router.post("/v2/models/{model_name}/infer", response_model=None, tags=["v2"],
             responses={200: {"model": oip.InferResponse}, **_MISSING, **ERROR_RESPONSES})
async def v2_infer(request: Request, model_name: str) -> Response:
    """Open Inference Protocol inference: one FP32 input tensor, outputs probabilities and label (a regression
    model: value, FP32 [n, 1])."""
    return await _infer(request, model_name, None)


@router.post("/v2/models/{model_name}/versions/{model_version}/infer", response_model=None,
             tags=["v2"], responses={200: {"model": oip.InferResponse}, **_MISSING, **ERROR_RESPONSES})
async def v2_infer_version(request: Request, model_name: str, model_version: str) -> Response:
    return await _infer(request, model_name, model_version)


def _model_metadata(request: Request, model_name: str, model_version: str | None) -> Response:
    live = live_named(server_of(request), model_name, model_version)
    return json_response(oip.model_metadata(live.name, live.version, live.model.input_name, live.model.input_shape,
                                            len(live.model.labels), live.model.takes_lengths,
                                            table=live.info.get("table"), regression=live.model.regression))


def _model_ready(request: Request, model_name: str, model_version: str | None) -> Response:
    live = live_named(server_of(request), model_name, model_version)
    return json_response({"name": live.name, "ready": True})


async def _infer(request: Request, model_name: str, model_version: str | None) -> Response:
    return await infer_answer(server_of(request), request.headers, request.receive, model_name, model_version)


async def infer_answer(server: ModelServer, headers: Mapping[str, str], receive: Receive, model_name: str,
                       model_version: str | None) -> Response:
    """An infer request, whole: the FastAPI routes and the fast path (serving/fastpath.py) both answer with this.

    JSON tensors, or the binary tensor extension (serving/v2_binary.py) when the request says
    ``Inference-Header-Content-Length``; outputs in binary when the request asks for them.
    """
    started = time.perf_counter() if server.payload is not None else 0.0
    refuse_cross_site(headers)
    require_api_key(headers, server.config.api_key)
    rollout = server.rollout
    live = live_named(server, model_name, model_version, pinnable=rollout is not None)
    if rollout is not None and model_version is None:
        live = server.pick(headers)
    declared = headers.get("inference-header-content-length")
    media = media_type(headers)
    if declared is None and media == "application/octet-stream":
        raise ApiError(415, "binary tensors need the Inference-Header-Content-Length header: the length of the JSON "
                            "inference header the tensors' bytes follow (the binary tensor extension)")
    if declared is None or media not in (None, "application/octet-stream"):
        require_json(headers)
    raw = await read_limited(receive, headers.get("content-length"), server.config.max_body_bytes)
    try:
        header, blob = binary.split_body(raw, declared)
        body = parse_json(header)
        if declared is not None and isinstance(body, dict):
            binary.attach_binary(body.get("inputs"), blob)
        tensor, lengths, request_id, outputs = oip.parse_request(body, oip.outputs_of(live.model.regression))
        batch = oip_tensor(tensor, live, server.config.max_instances)
        if lengths is not None:
            addressed = live if model_version is not None else server.live  # a pinned version, or the champion's contract
            if not addressed.model.takes_lengths:
                raise InvalidInstances(f"inputs[1] 'lengths': model {live.name!r} takes no lengths; send only "
                                       f"{live.model.input_name!r}")
            if isinstance(lengths.get("data"), np.ndarray):
                lengths = {**lengths, "data": lengths["data"].tolist()}
            steps = oip.lengths_values(lengths, len(batch), batch.shape[-1])
            batch = nan_padded(batch, steps)
    except InvalidInstances as error:
        raise invalid(error) from None
    in_binary = binary.binary_outputs(body, outputs)

    def answer(name: str, rows: np.ndarray) -> Response:
        document = oip.infer_response(name, live.version, request_id, outputs, rows, live.model.labels)
        return binary.binary_response(document, in_binary) if in_binary else json_response(document)

    if rollout is None and server.payload is None:
        return answer(live.name, await live.batcher.submit(batch))
    # Under the champion's name whichever variant answered: clients address the model, not the variant.
    return await server.respond(headers, "/v2/models/{model_name}/infer", live, batch, started,
                                lambda rows: answer(model_name, rows))


def oip_tensor(tensor: Any, live: LiveModel, max_instances: int) -> np.ndarray:
    """The request's input tensor as a float32 batch, checked against ``live``'s input (name, shape, count).

    A table model takes its graph's input, FP32 [n, F] of raw columns, categories as codes; JSON null
    (or NaN in binary) is an empty value where the model imputes (serving/table_rows.validate_table_tensor).
    """
    if live.model.table_rows is not None:
        return validate_table_tensor(tensor, "inputs[0]", live.model.input_name, live.model.table_rows, max_instances)
    return validate_tensor(tensor, "inputs[0]", live.model.input_name, live.model.input_shape, max_instances)


def live_named(server: ModelServer, model_name: str, model_version: str | None = None,
               pinnable: bool = False) -> LiveModel:
    """The model a v2 route names; ``pinnable``: in canary mode the challenger's version may be named too."""
    live = server.live
    if model_name != live.name:
        raise ApiError(404, f"unknown model {model_name!r}; this server serves {live.name!r} (GET /v2/models/{live.name})")
    if model_version is not None and model_version != live.version:
        challenger = server.challenger
        if pinnable and server.config.rollout == CANARY and challenger is not None and challenger.version == model_version:
            return challenger
        raise ApiError(404, f"model {live.name!r} has no version {model_version!r}; the live version is {live.version!r}")
    return live
