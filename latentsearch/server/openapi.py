"""The HTTP API's operations, declared once: the routes are registered from them and the OpenAPI
document (``GET /openapi.json``) is written from them, so the two cannot drift apart.

Request and reply bodies are the gRPC messages as JSON (:mod:`latentsearch.server.jsonpb`), so
their schemas are generated from the proto descriptors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor

from latentsearch import __version__
from latentsearch.server.http_errors import HTTP_STATUS, INTERNAL_STATUS
from latentsearch.server.jsonpb import json_schema
from latentsearch.v1 import latentsearch_pb2 as pb

__all__ = ["API_PREFIX", "OPERATIONS", "Operation", "Param", "openapi_document"]

API_PREFIX = "/api/v1"


@dataclass(frozen=True, kw_only=True)
class Param:
    """A query-string or path parameter."""

    name: str
    description: str
    where: str = "query"  # "query" or "path"
    required: bool = False


@dataclass(frozen=True, kw_only=True)
class Operation:
    """One HTTP route: what it takes and answers."""

    method: str  # "GET" or "POST"
    path: str
    name: str  # operationId, and the handler's name in server.httpapi
    summary: str
    # JSON request body (a proto message), and other content types the body may have instead
    request: Descriptor | None = None
    request_types: tuple[tuple[str, str], ...] = ()  # (content type, description)
    # JSON reply (a proto message; None: ``reply_schema``), and other content types it may have
    response: Descriptor | None = None
    reply_schema: dict[str, Any] | None = None
    reply_types: tuple[tuple[str, str], ...] = ()
    params: tuple[Param, ...] = ()
    # True: no bearer token needed (health, the page, this document)
    open: bool = False
    # The gRPC method the call goes through (server.httpapi), "" for routes of the HTTP API alone
    rpc: str = ""


_HEALTH = {
    "type": "object",
    "properties": {
        "status": {"enum": ["SERVING", "NOT_SERVING"]},
        "index_version": {"type": ["string", "null"]},
    },
}
_PNG = ("image/png", "a PNG image")
_ID = Param(name="id", description="the item's id", required=True)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        method="GET", path=f"{API_PREFIX}/health", name="health", open=True, reply_schema=_HEALTH,
        summary="SERVING (200) once an index version is loaded, NOT_SERVING (503) before and while "
        "shutting down; no token needed",
    ),
    Operation(
        method="GET", path=f"{API_PREFIX}/info", name="info", rpc="Info", response=pb.InfoResponse.DESCRIPTOR,
        summary="What is served: index version, item count, latent dimension, label names, latent "
        "diagnostics (per-dimension KL, active dimensions, ranges of the means), model hashes",
    ),
    Operation(
        method="POST", path=f"{API_PREFIX}/nearest", name="nearest", rpc="Nearest",
        request=pb.NearestRequest.DESCRIPTOR, response=pb.NearestResponse.DESCRIPTOR,
        summary="Top-k items for one latent point z by exact log q(z|x) (micro-batched with the gRPC "
        "Nearest calls); with_probability adds p(i|z), log q(z) and typicality",
    ),
    Operation(
        method="POST", path=f"{API_PREFIX}/nearest_batch", name="nearest_batch", rpc="NearestBatch",
        request=pb.NearestBatchRequest.DESCRIPTOR, response=pb.NearestBatchResponse.DESCRIPTOR,
        summary="Several Nearest queries answered by one index version, in request order",
    ),
    Operation(
        method="POST", path=f"{API_PREFIX}/nearest_to_distribution", name="nearest_to_distribution",
        rpc="NearestToDistribution",
        request=pb.NearestToDistributionRequest.DESCRIPTOR,
        response=pb.NearestToDistributionResponse.DESCRIPTOR,
        summary="Top-k items for a query Gaussian N(mean, diag(sigma^2)) by expected log-likelihood",
    ),
    Operation(
        method="POST", path=f"{API_PREFIX}/encode", name="encode", rpc="Encode",
        request=pb.EncodeRequest.DESCRIPTOR, response=pb.EncodeResponse.DESCRIPTOR,
        request_types=(
            ("image/png", "a PNG image: greyscale as (H, W, 1), colour as (H, W, 3) uint8 pixels"),
            ("application/octet-stream", "raw uint8 pixels, row-major (needs the shape query parameter)"),
        ),
        params=(Param(name="shape", description="for a raw body: the item's shape, e.g. 28,28,1"),),
        summary="Posterior q(z|x) of one item under the served model: JSON (raw as base64, or values), "
        "an uploaded PNG, or raw bytes",
    ),
    Operation(
        method="POST", path=f"{API_PREFIX}/decode", name="decode", rpc="Decode",
        request=pb.DecodeRequest.DESCRIPTOR, response=pb.DecodeResponse.DESCRIPTOR, reply_types=(_PNG,),
        params=(Param(name="format", description="png: reply with the PNG itself (else JSON)"),),
        summary="Reconstruction of a latent point z under the served model (JSON with the PNG as "
        "base64, or the PNG with ?format=png or Accept: image/png)",
    ),
    Operation(
        method="GET", path=f"{API_PREFIX}/item", name="item", rpc="GetItem",
        response=pb.GetItemResponse.DESCRIPTOR, params=(_ID,),
        summary="One item: its posterior (mean, sigma), label and label name, thumbnail (PNG as base64)",
    ),
    Operation(
        method="GET", path=f"{API_PREFIX}/item/thumbnail", name="thumbnail", rpc="GetItem",
        reply_types=(_PNG,), params=(_ID,),
        summary="One item's thumbnail as a PNG (404 when the index stores none)",
    ),
    Operation(
        method="GET", path=f"{API_PREFIX}/item/random", name="random_item", rpc="GetItem",
        response=pb.GetItemResponse.DESCRIPTOR,
        params=(Param(name="labels", description="only items with one of these labels, e.g. 3,4"),),
        summary="A uniformly random item (among those with the given labels), as GET item answers",
    ),
    Operation(
        method="GET", path="/openapi.json", name="openapi", open=True,
        reply_schema={"type": "object"}, summary="This document",
    ),
    Operation(
        method="GET", path="/", name="page", open=True, reply_types=(("text/html", "the page"),),
        summary="The explorer page: one slider per latent dimension, the decoded image, the nearest items",
    ),
    Operation(
        method="GET", path="/static/{name}", name="static", open=True,
        params=(Param(name="name", description="a file of the page", where="path", required=True),),
        reply_types=(("text/css", "style"), ("text/javascript", "script")),
        summary="The page's script and style (shipped in the package; nothing is fetched from elsewhere)",
    ),
)

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "the gRPC status code name"},
                "message": {"type": "string", "description": "the gRPC status details"},
                "field": {"type": ["string", "null"], "description": "the request field at fault"},
            },
        }
    },
}


def openapi_document(operations: tuple[Operation, ...] = OPERATIONS) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``operations``."""
    schemas: dict[str, Any] = {"Error": _ERROR}
    paths: dict[str, dict[str, Any]] = {}
    errors = {
        str(status): {
            "description": code,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for code, status in sorted(HTTP_STATUS.items(), key=lambda kv: kv[1])
    }
    errors[str(INTERNAL_STATUS)] = {"description": "INTERNAL", "content": errors["400"]["content"]}
    for op in operations:
        content: dict[str, Any] = {}
        if op.response is not None:
            content["application/json"] = {"schema": json_schema(op.response, schemas)}
        elif op.reply_schema is not None:
            content["application/json"] = {"schema": op.reply_schema}
        for kind, description in op.reply_types:
            content[kind] = {"schema": {"type": "string", "format": "binary", "description": description}}
        entry: dict[str, Any] = {
            "operationId": op.name,
            "summary": op.summary,
            "responses": {"200": {"description": "OK", "content": content}, **errors},
            "security": [] if op.open else [{"bearer": []}],
        }
        if op.rpc:
            entry["x-grpc-method"] = f"latentsearch.v1.LatentSearch/{op.rpc}"
        if op.params:
            entry["parameters"] = [
                {"name": p.name, "in": p.where, "required": p.required, "description": p.description,
                 "schema": {"type": "string"}}
                for p in op.params
            ]
        if op.request is not None:
            body = {"application/json": {"schema": json_schema(op.request, schemas)}}
            for kind, description in op.request_types:
                body[kind] = {"schema": {"type": "string", "format": "binary", "description": description}}
            entry["requestBody"] = {"required": True, "content": body}
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "latentsearch HTTP API",
            "version": __version__,
            "description": "JSON over HTTP beside the gRPC service latentsearch.v1.LatentSearch, answered "
            "by the same engine, batcher and index version. Bodies are the gRPC messages as JSON "
            "objects keyed by proto field names (bytes as base64, enums by name, 64-bit integers as "
            "numbers); errors carry the gRPC status code name and details.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
