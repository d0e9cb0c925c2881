"""The kiosk's HTTP layer: a Starlette application over :class:`~edge_shitu.kiosk.service.KioskService`.

Routes map requests to service calls run in worker threads (the models block) and the service's errors
to JSON answers ``{"error": "..."}``: 400 bad input, 404 nothing there, 409 the gallery refuses, 413 too
big, 415 not an image type; a failure of the service itself is a 500 with a one-line message, logged
with its traceback. The contract is docs/kiosk.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edge_shitu.errors import (
    EdgeShituError,
    FingerprintMismatchError,
    ImageDecodeError,
    InvalidInputError,
    LabelFileError,
    UnknownItemError,
)
from edge_shitu.kiosk.security import Guard
from edge_shitu.kiosk.service import DEFAULT_PAGE, KioskService, NotFoundError, parse_box

__all__ = ["create_app", "DEFAULT_MAX_BODY", "IMAGE_TYPES"]

DEFAULT_MAX_BODY = 8 << 20
"""Largest request body, in bytes: a 12-megapixel JPEG is 3-6 MB."""

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
"""Content types of image bodies."""

STATIC = Path(__file__).resolve().parent / "static"
_MAX_ID = (1 << 63) - 1
_log = logging.getLogger("edge_shitu.kiosk")


class _TooLarge(Exception):
    pass


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _status(exc: BaseException) -> int:
    if isinstance(exc, (NotFoundError, UnknownItemError)):
        return 404
    if isinstance(exc, FingerprintMismatchError):
        return 409
    if isinstance(exc, (InvalidInputError, ImageDecodeError, LabelFileError)):
        return 400
    return 500


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def create_app(service: KioskService, *, token: Optional[str] = None, hosts=frozenset({"localhost", "127.0.0.1",
               "::1", "testserver"}), max_body: int = DEFAULT_MAX_BODY):
    """Build the kiosk application.

    Args:
      service: the models and gallery it serves (the caller closes it).
      token: the bearer token every ``/api/`` request needs, or None (loopback only).
      hosts: allowed ``Host`` names, see :func:`edge_shitu.kiosk.security.allowed_hosts`.
      max_body: largest request body in bytes.

    Returns:
      An ASGI application (Starlette behind the :class:`~edge_shitu.kiosk.security.Guard` middleware).

    Raises:
      InvalidInputError: ``max_body`` is not a positive integer.
    """
    if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
        raise InvalidInputError(f"max_body must be a positive integer, got {max_body!r}")

    async def body(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise _TooLarge(f"body is over the limit of {max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def image_body(request: Request) -> bytes:
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind not in IMAGE_TYPES:
            raise HTTPException(415, f"expected an image body with Content-Type {', '.join(IMAGE_TYPES)}; "
                                     f"got {kind or 'none'}")
        data = await body(request)
        if not data:
            raise InvalidInputError("the request body is empty; expected the encoded image")
        return data

    async def json_body(request: Request) -> object:
        data = await body(request)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidInputError(f"expected a JSON body: {_one_line(exc)}") from None

    def item_id(request: Request) -> int:
        text = request.path_params["item_id"]
        if not text.isdigit() or int(text) > _MAX_ID:
            raise InvalidInputError(f"item id must be a whole number, got {text!r}")
        return int(text)

    def whole(request: Request, name: str, default: int) -> int:
        text = request.query_params.get(name)
        if text is None or text == "":
            return default
        if not text.isdigit() or len(text) > 18:
            raise InvalidInputError(f"{name} must be a whole number, got {text!r}")
        return int(text)

    def label_param(request: Request) -> str:
        label = request.query_params.get("label")
        if not label:
            raise InvalidInputError("the label query parameter is required: POST /api/items?label=NAME")
        return label

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def info(request: Request) -> Response:
        answer = await run_in_threadpool(service.info)
        answer["token_required"] = token is not None
        return JSONResponse(answer)

    async def recognize(request: Request) -> Response:
        data = await image_body(request)
        name = request.query_params.get("name") or "upload"
        return JSONResponse(await run_in_threadpool(service.recognize, data, name=name))

    async def list_items(request: Request) -> Response:
        label = request.query_params.get("label") or None
        page = await run_in_threadpool(service.items, label=label, offset=whole(request, "offset", 0),
                                       limit=whole(request, "limit", DEFAULT_PAGE))
        return JSONResponse(page)

    async def add_item(request: Request) -> Response:
        label = label_param(request)
        box_text = request.query_params.get("box")
        box = None if box_text is None else parse_box(box_text)
        data = await image_body(request)
        answer = await run_in_threadpool(service.enrol, data, label, box=box, name=request.query_params.get("name")
                                         or "upload")
        return JSONResponse(answer, status_code=201)

    async def labels(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(service.labels))

    async def thumbnail(request: Request) -> Response:
        jpeg = await run_in_threadpool(service.thumbnail, item_id(request))
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def patch_item(request: Request) -> Response:
        ident = item_id(request)
        change = await json_body(request)
        if not isinstance(change, dict) or set(change) != {"label"} or not isinstance(change["label"], str):
            raise InvalidInputError('expected {"label": "NEW LABEL"}')
        return JSONResponse(await run_in_threadpool(service.relabel, ident, change["label"]))

    async def delete_item(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(service.remove, item_id(request)))

    async def delete_label(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(service.remove_label, request.path_params["label"]))

    async def get_settings(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(service.settings))

    async def put_settings(request: Request) -> Response:
        change = await json_body(request)
        return JSONResponse(await run_in_threadpool(service.update_settings, change))

    async def calibrate(request: Request) -> Response:
        ask = await json_body(request)
        if not isinstance(ask, dict) or set(ask) - {"precision"}:
            raise InvalidInputError('expected {"precision": P} with 0 < P <= 1')
        return JSONResponse(await run_in_threadpool(service.calibrate, ask.get("precision", 0.95)))

    async def on_http(request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else str(exc.detail))

    async def on_too_large(request: Request, exc: _TooLarge) -> Response:
        return _error(413, str(exc))

    async def on_ours(request: Request, exc: EdgeShituError) -> Response:
        status = _status(exc)
        if status == 500:
            _log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(status, _one_line(exc))

    async def on_other(request: Request, exc: Exception) -> Response:
        _log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, f"{request.method} {request.url.path} failed: {type(exc).__name__}: {_one_line(exc)}")

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/api/info", info, methods=["GET"]),
        Route("/api/recognize", recognize, methods=["POST"]),
        Route("/api/items", list_items, methods=["GET"]),
        Route("/api/items", add_item, methods=["POST"]),
        Route("/api/labels", labels, methods=["GET"]),
        Route("/api/items/{item_id}/thumbnail", thumbnail, methods=["GET"]),
        Route("/api/items/{item_id}", patch_item, methods=["PATCH"]),
        Route("/api/items/{item_id}", delete_item, methods=["DELETE"]),
        Route("/api/labels/{label:path}", delete_label, methods=["DELETE"]),
        Route("/api/settings", get_settings, methods=["GET"]),
        Route("/api/settings", put_settings, methods=["PUT"]),
        Route("/api/calibrate", calibrate, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {HTTPException: on_http, _TooLarge: on_too_large, EdgeShituError: on_ours, Exception: on_other}
    app = Starlette(routes=routes, exception_handlers=handlers)
    return Guard(app, hosts=frozenset(hosts), token=token, max_body=max_body)
