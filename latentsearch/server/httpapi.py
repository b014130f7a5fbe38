"""The HTTP/JSON API and the explorer page, on the gRPC server's own event loop (aiohttp).

Each route builds the gRPC request message from its JSON body (:mod:`latentsearch.server.jsonpb`)
and calls the gRPC servicer's own method for it (``LatentSearchServicer.Nearest`` and the rest)
with a stand-in for the call context (:class:`_HttpCallContext`), so an HTTP call takes the very
path a gRPC call takes: the same validation and messages, micro-batcher, admission queue, reply
size checks, metrics and answering index version. The servicer's abort comes back as the project
error the gRPC client would raise (:func:`latentsearch.errors.error_for_status`), and becomes an
HTTP status in one place (:mod:`latentsearch.server.http_errors`). The routes and the OpenAPI
document come from one list (:data:`latentsearch.server.openapi.OPERATIONS`).

With a bearer token configured, every API route but health needs ``Authorization: Bearer <token>``
(as every gRPC method but health does); the page, its files and ``/openapi.json`` are open, and
the page asks for the token when the API answers 401.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, NoReturn, TypeVar, cast

import grpc
import numpy as np
from aiohttp import web
from google.protobuf.message import Message
from grpc import aio
from PIL import Image

from latentsearch.errors import (
    FIELD_METADATA_KEY,
    FailedPreconditionError,
    InvalidArgumentError,
    LatentSearchError,
    NotFoundError,
    RemoteError,
    UnauthenticatedError,
    error_for_status,
    quoted,
)
from latentsearch.server.auth import UNAUTHENTICATED_MESSAGE, bearer_matches
from latentsearch.server.http_errors import INTERNAL_STATUS, error_body, http_status
from latentsearch.server.jsonpb import message_from_json, message_to_json
from latentsearch.server.openapi import OPERATIONS, Operation, openapi_document
from latentsearch.server.ports import bind_error
from latentsearch.server.servicer import LatentSearchServicer
from latentsearch.tls import read_pem
from latentsearch.v1 import latentsearch_pb2 as pb

__all__ = ["STATIC_FILES", "HttpApi", "server_ssl_context"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The page's files (latentsearch/server/static/, package data) and their content types.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "explorer.js": "text/javascript; charset=utf-8",
    "explorer.css": "text/css; charset=utf-8",
}
# The page may load nothing from anywhere but this server (images it builds itself: data:, blob:).
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; connect-src 'self' blob:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def server_ssl_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """The TLS context of a certificate chain and key (PEM files, the gRPC port's ``--tls-cert`` and
    ``--tls-key``). Raises InvalidArgumentError naming the option for an unreadable or bad file."""
    read_pem(cert, field="tls_cert")
    read_pem(key, field="tls_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise InvalidArgumentError(
            f"--tls-cert {cert} / --tls-key {key}: not a matching certificate chain and key ({exc})",
            field="tls_cert",
        ) from exc
    return context


class _HttpCallContext:
    """What the gRPC servicer asks of a call's context, for an HTTP request: no deadline, and an
    abort that raises the project error a gRPC client would get for the same status."""

    def time_remaining(self) -> float | None:
        return None

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, str]] = ()
    ) -> NoReturn:
        field = dict(trailing_metadata).get(FIELD_METADATA_KEY)
        raise error_for_status(code.name, details, field=field)


# One context serves every request: it holds nothing of any of them.
_CONTEXT = cast(aio.ServicerContext, _HttpCallContext())


class HttpApi:
    """The HTTP routes of one server. ``await start(host, port)``, then ``await stop()``.

    Args:
        servicer: the gRPC servicer every API call goes through (the server's own).
        token: the required bearer token (``None``: no auth).
        serving: whether health answers SERVING (besides a version being loaded).
        max_body_bytes: largest request body.
        grace: seconds in-flight requests get at :meth:`stop`.
    """

    def __init__(
        self,
        servicer: LatentSearchServicer,
        *,
        token: str | None = None,
        serving: Callable[[], bool] = lambda: True,
        max_body_bytes: int = 64 * 1024 * 1024,
        grace: float = 5.0,
    ) -> None:
        self.rpc = servicer
        self._expected = None if token is None else f"Bearer {token}".encode()
        self._serving = serving
        self._grace = grace
        self._files = _load_static()
        self._openapi_json = json.dumps(openapi_document(), indent=1).encode()
        self._rng = np.random.default_rng()
        self.app = web.Application(client_max_size=max_body_bytes)
        for op in OPERATIONS:
            self.app.router.add_route(op.method, op.path, self._wrap(op, getattr(self, f"_{op.name}")))
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None) -> int:
        """Bind ``host:port`` (0: any free port) and serve; returns the port. Raises UnavailableError
        ("HTTP port P is in use", field ``http_port``) when it cannot be bound."""
        runner = self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=self._grace)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise bind_error("HTTP port", host, port, exc.errno, field="http_port") from exc
        self.port = int(runner.addresses[0][1])
        scheme = "https" if ssl_context is not None else "http"
        log.info("HTTP API and explorer page on %s://%s:%d/", scheme, host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (``grace`` seconds), close."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- the wrapper every route runs in --------------------------------------------------------
    def _wrap(self, op: Operation, handler: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                if not op.open:
                    self._authorize(request, op)
                return await handler(request)
            except LatentSearchError as exc:
                headers = None
                if exc.grpc_code == "RESOURCE_EXHAUSTED":
                    headers = {"Retry-After": "1"}
                elif exc.grpc_code == "UNAUTHENTICATED":
                    headers = {"WWW-Authenticate": "Bearer"}
                return web.json_response(error_body(exc), status=http_status(exc), headers=headers)
            except Exception:  # a bug in a route of its own (the servicer answers INTERNAL itself)
                log.exception("HTTP %s failed", op.name)
                internal = RemoteError(f"internal error in {op.name}", code="INTERNAL")
                return web.json_response(error_body(internal), status=INTERNAL_STATUS)

        handle.__name__ = op.name
        return handle

    def _authorize(self, request: web.Request, op: Operation) -> None:
        """Refuse a request without the bearer token (counted as the gRPC interceptor counts)."""
        if self._expected is None or bearer_matches(self._expected, request.headers.get("Authorization")):
            return
        if self.rpc.metrics is not None and op.rpc:
            self.rpc.metrics.observe(op.rpc, "UNAUTHENTICATED", 0.0)
        field, _, message = UNAUTHENTICATED_MESSAGE.partition(": ")
        raise UnauthenticatedError(message, field=field)

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    async def _json_body(request: web.Request, cls: type[M]) -> M:
        raw = await request.read()
        try:
            obj = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"the request body is not JSON: {exc}", field="body") from exc
        return message_from_json(cls, obj)

    @staticmethod
    def _reply(msg: Message) -> web.Response:
        return web.json_response(message_to_json(msg))

    # -- API routes: each through the gRPC servicer's method -------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        version = self.rpc.service.version
        serving = self._serving() and version is not None
        body = {"status": "SERVING" if serving else "NOT_SERVING", "index_version": version}
        return web.json_response(body, status=200 if serving else 503)

    async def _info(self, request: web.Request) -> web.Response:
        return self._reply(await self.rpc.Info(pb.InfoRequest(), _CONTEXT))

    async def _nearest(self, request: web.Request) -> web.Response:
        msg = await self._json_body(request, pb.NearestRequest)
        return self._reply(await self.rpc.Nearest(msg, _CONTEXT))

    async def _nearest_batch(self, request: web.Request) -> web.Response:
        msg = await self._json_body(request, pb.NearestBatchRequest)
        return self._reply(await self.rpc.NearestBatch(msg, _CONTEXT))

    async def _nearest_to_distribution(self, request: web.Request) -> web.Response:
        msg = await self._json_body(request, pb.NearestToDistributionRequest)
        return self._reply(await self.rpc.NearestToDistribution(msg, _CONTEXT))

    async def _encode(self, request: web.Request) -> web.Response:
        kind = request.content_type
        if kind.startswith("image/"):
            msg = pb.EncodeRequest(**await asyncio.to_thread(_image_request, await request.read()))
        elif kind == "application/octet-stream" and "Content-Type" in request.headers:  # not a default
            shape = _int_list(request.query.get("shape", ""), "shape")
            if not shape:
                raise InvalidArgumentError(
                    "a raw body needs the shape query parameter, e.g. ?shape=28,28,1", field="shape"
                )
            msg = pb.EncodeRequest(shape=shape, raw=await request.read())
        else:
            msg = await self._json_body(request, pb.EncodeRequest)
        return self._reply(await self.rpc.Encode(msg, _CONTEXT))

    async def _decode(self, request: web.Request) -> web.Response:
        msg = await self._json_body(request, pb.DecodeRequest)
        as_png = request.query.get("format") == "png" or request.headers.get("Accept") == "image/png"
        reply = await self.rpc.Decode(msg, _CONTEXT)
        if not as_png:
            return self._reply(reply)
        if not reply.png:
            raise FailedPreconditionError(
                f"the served model's output of shape {list(reply.shape)} is not an image; ask for JSON",
                field="format",
            )
        return web.Response(
            body=reply.png, content_type="image/png", headers={"X-Model-Hash": reply.model_hash}
        )

    async def _item(self, request: web.Request) -> web.Response:
        msg = pb.GetItemRequest(id=_required(request, "id"))
        return self._reply(await self.rpc.GetItem(msg, _CONTEXT))

    async def _thumbnail(self, request: web.Request) -> web.Response:
        item_id = _required(request, "id")
        reply = await self.rpc.GetItem(pb.GetItemRequest(id=item_id), _CONTEXT)
        if not reply.thumbnail_png:
            raise NotFoundError(f"item {quoted(item_id)} has no thumbnail in this index version", field="id")
        return web.Response(body=reply.thumbnail_png, content_type="image/png")

    async def _random_item(self, request: web.Request) -> web.Response:
        labels = _int_list(request.query.get("labels", ""), "labels")
        item_id = await asyncio.to_thread(self._random_id, labels)
        return self._reply(await self.rpc.GetItem(pb.GetItemRequest(id=item_id), _CONTEXT))

    def _random_id(self, labels: list[int]) -> str:
        """A uniformly random item of the served version with one of ``labels`` (all: ``[]``)."""
        bank = self.rpc.service.snapshot().engine.bank
        if labels:
            if bank.labels is None:
                raise InvalidArgumentError("this index has no labels to filter by", field="labels")
            rows = np.flatnonzero(np.isin(np.asarray(bank.labels), labels))
            if rows.size == 0:
                raise NotFoundError(f"no item has one of the labels {labels}", field="labels")
            row = int(rows[self._rng.integers(rows.size)])
        else:
            row = int(self._rng.integers(len(bank)))
        return str(bank.id_of(np.array([row]))[0])

    # -- the document and the page --------------------------------------------------------------
    async def _openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi_json, content_type="application/json")

    async def _page(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        return self._file(request.match_info["name"])

    def _file(self, name: str) -> web.Response:
        if name not in self._files:
            files = ", ".join(STATIC_FILES)
            raise NotFoundError(f"no file {quoted(name)} (the page has {files})", field="name")
        kind = STATIC_FILES[name]
        return web.Response(body=self._files[name], headers={"Content-Type": kind, **_PAGE_HEADERS})


def _load_static() -> dict[str, bytes]:
    """The page's files, read once from the package."""
    folder = resources.files("latentsearch.server").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in STATIC_FILES}


def _required(request: web.Request, name: str) -> str:
    value = request.query.get(name)
    if value is None:
        raise InvalidArgumentError(f"the {name} query parameter is required", field=name)
    return value


def _int_list(text: str, field: str) -> list[int]:
    """``"3,4"`` -> ``[3, 4]`` (``""``: ``[]``); InvalidArgumentError(field) for anything else."""
    try:
        return [int(part) for part in text.replace(" ", ",").split(",") if part]
    except ValueError as exc:
        raise InvalidArgumentError(
            f"{field} must be integers separated by commas, got {quoted(text)}", field=field
        ) from exc


def _image_request(data: bytes) -> dict[str, Any]:
    """EncodeRequest fields of an uploaded image file: greyscale images as ``(H, W, 1)``, colour
    ones as ``(H, W, 3)`` uint8 pixels (alpha dropped). InvalidArgumentError(field ``body``) for
    anything Pillow cannot read."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            grey = img.mode in ("1", "L", "LA", "I", "I;16", "F")
            pixels = np.asarray(img.convert("L" if grey else "RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidArgumentError(f"the body is not an image Pillow can read: {exc}", field="body") from exc
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return {"shape": list(pixels.shape), "raw": pixels.tobytes()}
