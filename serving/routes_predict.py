"""Predictions in fluxo's own form: ``POST /predict`` (JSON instances) and ``POST /predict/image`` (files).

Every body is read against a size limit, parsed and validated before anything is queued for
the model. :func:`predict_response` is the whole of ``POST /predict`` and takes only headers
and the ASGI ``receive``, so the FastAPI route here and the fast path (serving/fastpath.py)
answer with the same code; a change to the route cannot leave the fast path behind.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

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
from serving.multipart import uploaded_files
from serving.schemas import (
    InvalidInstances,
    PredictRequest,
    PredictResponse,
    only_numbers,
    validate_instances,
    validate_sequences,
)
from serving.server import LiveModel, ModelServer, server_of
from serving.table_rows import validate_rows

IMAGE_TYPES = ("image/png", "image/jpeg")

# The handlers parse their bodies themselves (cheaper than FastAPI's models); the OpenAPI document
# still states them: create_app hands these to routes_ops.openapi_document.
REQUEST_BODIES: dict[str, dict[str, Any]] = {
    "/predict": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}},
    "/predict/image": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                "required": ["file"],
            }
        },
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    },
}
BODY_SCHEMAS: tuple[type[BaseModel], ...] = (PredictRequest,)

router = APIRouter()


@router.post("/predict", response_model=None, tags=["predict"],
             responses={200: {"model": PredictResponse}, **ERROR_RESPONSES})
async def predict(request: Request) -> Response:
    """Classify (or, for a regression model, predict a value for) instances: each a nested list shaped like
    GET /metadata's input_shape, raw values; for a table model, an object keyed by column name or a list of values
    in column order (GET /metadata table.columns). GET /metadata task says which answer comes back."""
    return await predict_response(server_of(request), request.headers, request.receive)


@router.post("/predict/image", response_model=None, tags=["predict"],
             responses={200: {"model": PredictResponse}, **ERROR_RESPONSES})
async def predict_image(request: Request) -> Response:
    """Classify PNG/JPEG files: multipart/form-data (one or more files), or one raw image/png|jpeg body."""
    return await image_response(server_of(request), request.headers, request.receive)


async def image_response(server: ModelServer, headers: Mapping[str, str], receive: Receive) -> Response:
    """``POST /predict/image``, whole: the FastAPI route and the fast path (serving/fastpath.py) both answer with this.

    Decoding is bounded work (serving/image_work.py): a pixel budget per request, small files
    decoded inline, large ones on the worker's own pool whose queue refuses (429) when full.
    """
    started = time.perf_counter() if server.payload is not None else 0.0
    refuse_cross_site(headers)
    require_api_key(headers, server.config.api_key)
    rollout = server.rollout
    live = server.live if rollout is None else server.pick(headers)
    if live.image is None:
        raise ApiError(400, f"model {live.name!r} takes no images (input shape {list(live.model.input_shape)}); "
                            "send numbers to POST /predict")
    media = media_type(headers)
    if media != "multipart/form-data" and media not in IMAGE_TYPES:
        raise ApiError(415, f"Content-Type {media!r} is not accepted here; upload files as multipart/form-data "
                            "or send one image with Content-Type image/png or image/jpeg")
    declared = headers.get("content-length")
    large = server.images.admit_upload(declared)  # 429 before reading when this worker has its fill of them
    try:
        body = await read_limited(receive, declared, server.config.max_body_bytes)
        limit = server.config.max_instances

        def files() -> list[tuple[str, bytes]]:
            if media in IMAGE_TYPES:
                return [("the request body", body)]
            found = uploaded_files(headers.get("content-type", ""), body, limit)
            if not found:
                raise ApiError(400, "no file in the upload; send the image(s) as multipart/form-data file fields")
            return found

        batch = await server.images.decode(files, live.image, large)
    finally:
        if large:
            server.images.upload_done()
    if rollout is None and server.payload is None:
        return predictions(live, await live.batcher.submit(batch))
    return await server.respond(headers, "/predict/image", live, batch, started,
                                lambda rows: predictions(live, rows))


async def predict_response(server: ModelServer, headers: Mapping[str, str], receive: Receive) -> Response:
    """``POST /predict``, whole: the FastAPI route and the fast path (serving/fastpath.py) both answer with this.

    ``receive`` is the request's ASGI channel; nothing is read before the key and the content type pass.
    """
    started = time.perf_counter() if server.payload is not None else 0.0
    refuse_cross_site(headers)
    require_api_key(headers, server.config.api_key)
    require_json(headers)
    raw = await read_limited(receive, headers.get("content-length"), server.config.max_body_bytes)
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise ApiError(400, 'the body must be a JSON object like {"instances": [x1, x2, ...]}')
    if "instances" not in body:
        hint = " (Open Inference Protocol requests go to POST /v2/models/{name}/infer)" if "inputs" in body else ""
        raise ApiError(400, 'the body has no "instances": send {"instances": [x1, x2, ...]}' + hint)
    rollout = server.rollout
    live = server.live if rollout is None else server.pick(headers)
    champion = server.live.model
    try:  # the champion's contract, whichever variant answers (ModelServer.answer)
        if champion.table_rows is not None:  # a table: rows by column (serving/table_rows.py); NaN is an empty value
            batch, unseen = validate_rows(body["instances"], champion.table_rows, server.config.max_instances,
                                          only_numbers(raw))
            if unseen:
                server.metrics.unseen_categories(unseen)
        else:
            validate = validate_sequences if champion.takes_lengths else validate_instances
            batch = validate(body["instances"], live.model.input_shape, server.config.max_instances, only_numbers(raw))
    except InvalidInstances as error:
        raise invalid(error) from None
    if rollout is None and server.payload is None:
        return predictions(live, await live.batcher.submit(batch))
    return await server.respond(headers, "/predict", live, batch, started, lambda rows: predictions(live, rows))


def predictions(live: LiveModel, probabilities: np.ndarray) -> Response:
    """``{"predictions": [{"label", "probabilities"}, ...], "model_version"}``: /predict's answer; a regression
    model's ``probabilities`` are its (n, 1) values, answered ``{"predictions": [{"value"}, ...], ...}``."""
    if live.model.regression:
        answer = [{"value": value} for value in probabilities[:, 0]]  # numpy float32: orjson writes its shortest form
        return json_response({"predictions": answer, "model_version": live.version})
    labels = live.model.labels
    best = probabilities.argmax(axis=1).tolist()
    answer = [{"label": labels[i], "probabilities": row} for i, row in zip(best, probabilities)]
    return json_response({"predictions": answer, "model_version": live.version})
