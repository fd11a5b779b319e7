"""``convlad serve``: the HTTP layer (FastAPI + uvicorn) of a search service over an index, with a
web page. The state behind it (the model, the micro-batcher, queries, writes) is ``service.py``.

A network is hostile ground, so:
- parsing is strict: numbers and ids are ASCII digits within bounds, anything else a 400; every
  response the application shapes is JSON ``{"error": "one sentence"}`` on failure, and an
  unexpected fault is a 500 with a request id (the traceback goes to the server's log only);
- a query is reached only by the unguessable id its search returned, for a while;
- cost is bounded: modest caps on k, rerank and qe without the token, a pixel budget checked from
  the header before decoding, and a bounded line of heavy requests beyond which a 503 with
  Retry-After answers at once (health always answers);
- the page renders data as text, under a Content-Security-Policy without inline code; every
  response has ``X-Content-Type-Options: nosniff``, ``Referrer-Policy`` and no framing;
- loopback by default; write routes need the token whenever one is set, and are refused beyond
  loopback without one; files are served by id only; no CORS unless asked for.
"""
from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import mimetypes
import os
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..explain import match_view, oriented_size
from ..images import ImageError
from .service import CAPS, ApiError, Service, whole
from .service import image_id as parse_id

WEB = Path(__file__).with_name("web")
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
log = logging.getLogger("convlad.serving.serve")

# the page loads its code and style from this server only, runs no inline code, and is never framed
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Swagger UI (served by the package, offline) starts from an inline script
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ALWAYS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
          (b"x-frame-options", b"DENY")]


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Error(BaseModel):
    error: str


_STATUS = {400: "a malformed parameter or body", 401: "the token is missing or wrong",
           403: "writes are disabled on this server", 404: "no such image, query or route",
           405: "method not allowed (see Allow)", 408: "the request body stalled",
           413: "the body or the image is too large", 415: "not a supported image or encoding",
           500: "an unexpected fault (with a request id)", 503: "busy: retry after Retry-After seconds"}


# the parameters as the strict parsing reads them (they arrive as text, parsed here, never coerced)
_ID = {"type": "integer", "minimum": 0, "maximum": 10 ** 18 - 1}
PARAM_SCHEMAS = {
    "image_id": _ID, "with_id": _ID,
    "k": {"type": "integer", "minimum": 1, "maximum": CAPS[True]["k"],
          "description": f"results (at most {CAPS[False]['k']} without the server's token)"},
    "rerank": {"type": "integer", "minimum": 0, "maximum": CAPS[True]["rerank"],
               "description": f"results re-ranked by spatial verification (at most {CAPS[False]['rerank']} without the token)"},
    "qe": {"type": "integer", "minimum": 0, "maximum": CAPS[True]["qe"],
           "description": f"α-query expansion with the top qe (at most {CAPS[False]['qe']} without the token)"},
    "format": {"type": "string", "enum": ["png", "json"], "default": "png"},
    "offset": {"type": "integer", "minimum": 0, "maximum": 10 ** 9, "default": 0},
    "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 24},
    "query": {"type": "string", "pattern": "^[0-9a-f]{32}$", "description": "the query id a search returned"},
}


def errors(*codes: int) -> dict:
    """OpenAPI responses for the error statuses a route can answer, each ``{"error": ...}``."""
    out = {c: {"model": Error, "description": _STATUS[c]} for c in (*codes, 500)}
    if 503 in codes:
        out[503]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return out


def image_response(media: str) -> dict:
    return {200: {"content": {media: {"schema": {"type": "string", "format": "binary"}}}, "description": media}}


# -- middleware -------------------------------------------------------------------------------------
async def _send_json(send, status: int, message: str, headers=()):
    body = json.dumps({"error": message}).encode()
    try:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *headers]})
        await send({"type": "http.response.body", "body": body})
    except Exception:  # noqa: BLE001 - the response had started, or the client is gone
        pass


class Guard:
    """ASGI middleware, outermost: a request id and the security headers on every response, and any
    unexpected exception turned into a JSON 500 naming the request id (traceback to the log)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:12]
        scope.setdefault("state", {})["request_id"] = rid
        path = scope.get("path", "")
        csp = PAGE_CSP if path in ("/", "/index.html") else DOCS_CSP if path.startswith("/docs") else \
            "default-src 'none'; frame-ancestors 'none'"
        extra = [*ALWAYS, (b"content-security-policy", csp.encode()), (b"x-request-id", rid.encode())]
        started = False

        async def send_with_headers(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                names = {k.lower() for k, _ in msg.get("headers", [])}
                msg = {**msg, "headers": [*msg.get("headers", []), *((k, v) for k, v in extra if k not in names)]}
            await send(msg)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:  # noqa: BLE001 - anything unexpected: one JSON sentence, the details in the log
            log.exception("request %s %s %s failed", rid, scope.get("method"), path)
            if not started:
                await _send_json(send, 500, f"internal error (request id {rid}); the server's log has the details",
                                 extra)


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes (by Content-Length at once, else while
    streaming) and bodies that stall for ``timeout`` seconds (slow clients)."""

    def __init__(self, app, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not (length.isascii() and length.isdigit()) or int(length) > self.limit):
            return await _send_json(send, 413, f"request body of {length.decode(errors='replace')[:20]} bytes; "
                                               f"the limit is {self.limit // (1 << 20)} MB")
        seen = 0

        async def limited():
            nonlocal seen
            try:
                msg = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body stalled for {self.timeout:g} s") from None
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"request body over the limit of {self.limit // (1 << 20)} MB")
            return msg

        try:
            await self.app(scope, limited, send)
        except ApiError as e:
            await _send_json(send, e.status, e.message)


IMAGE_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"], "properties": {"image": {"type": "string", "format": "binary"}}}}}}}


def _fastapi():
    """FastAPI whose /docs serves Swagger UI's files from the package (no CDN: it works offline)."""
    try:
        from fastapi_offline import FastAPIOffline

        return FastAPIOffline
    except ImportError:  # the page and the API work without it; /docs then needs the internet
        from fastapi import FastAPI

        return FastAPI


def create_app(index, token: str | None = None, host: str = "127.0.0.1", cors: list[str] | None = None,
               window_ms: float = 5.0, max_batch: int = 16, max_upload_mb: int = 20,
               max_pixels: int = 50_000_000, body_timeout: float = 30.0, max_active: int | None = None,
               max_queue: int = 64, compile: bool | str = "auto", precision: str | None = None):
    """The API and the page over ``index``. ``compile`` (True, False, "auto": on CPU wherever the
    network can be) and ``precision`` (None: the index's model's setting, "auto" unless changed)
    are the encoder's, warmed for every batch shape before this returns."""
    writes = token is not None or is_loopback(host)
    svc = Service(index, token=token, writes=writes, window_ms=window_ms, max_batch=max_batch,
                  max_upload=max_upload_mb << 20, max_pixels=max_pixels, max_active=max_active, max_queue=max_queue,
                  compile=compile, precision=precision)

    @asynccontextmanager
    async def lifespan(_app):
        try:
            yield
        finally:
            svc.close()

    app = _fastapi()(title="convlad", description="Instance-level image search over a convlad index.",
                     version="0.1.0", lifespan=lifespan)
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e):
        msg = {404: "no such route", 405: "method not allowed on this route"}.get(e.status_code, str(e.detail))
        headers = dict(getattr(e, "headers", None) or {})
        if e.status_code == 405:  # every method of every route at this path, not only the first's
            from starlette.routing import Match

            allowed = set()
            for route in app.router.routes:
                methods = getattr(route, "methods", None)
                if methods and route.matches({**request.scope, "method": next(iter(methods))})[0] == Match.FULL:
                    allowed |= set(methods)
            headers["Allow"] = ", ".join(sorted(allowed))
        return JSONResponse({"error": msg}, status_code=e.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e):
        err = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
        return JSONResponse({"error": f"{where}: {err.get('msg', 'invalid')}"}, status_code=400)

    async def read_image(request: Request, what: str = "the photo") -> bytes:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "send the photo as multipart/form-data with a field named 'image'")
        try:
            form = await request.form(max_files=1, max_fields=4)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - the multipart parser's own errors
            raise ApiError(400, f"malformed multipart body ({str(e)[:80] or type(e).__name__})") from None
        f = form.get("image")
        if f is None or isinstance(f, str):
            raise ApiError(400, "the form has no file field named 'image'")
        return await f.read()

    def run(fn, *args):
        return asyncio.get_running_loop().run_in_executor(svc.decoders, fn, *args)

    GET = ["GET", "HEAD"]

    @app.api_route("/", methods=GET, include_in_schema=False)
    async def page():
        return HTMLResponse((WEB / "index.html").read_text())

    @app.api_route("/static/{name}", methods=GET, include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            raise ApiError(404, "no such file")
        return Response((WEB / name).read_bytes(), media_type=STATIC[name], headers={"cache-control": "max-age=300"})

    @app.api_route("/api/health", methods=GET, responses=errors())
    async def health():
        """Always answers, busy or not: 200 with the number of images."""
        return {"status": "ok", "images": len(svc.store), "generation": svc.store.generation}

    @app.api_route("/api/config", methods=GET, responses=errors())
    async def config():
        """The search's defaults for this index (k, rerank, qe) and the caps: what a search without
        parameters does, through the page, the API and the command line alike."""
        return svc.config()

    @app.post("/api/search", openapi_extra=IMAGE_FORM, responses=errors(400, 408, 413, 415, 503))
    async def search(request: Request, k: str | None = None, rerank: str | None = None, qe: str | None = None):
        """Search with a photo (multipart field ``image``): the k nearest, the top ``rerank``
        re-ordered by spatial verification (each result's ``inliers``), after α-query expansion with
        the top ``qe``; the defaults are ``/api/config``'s, the command line's. ``query`` in the
        answer names this query for the match view."""
        settings = svc.settings(k, rerank, qe, svc.trusted(request.headers))
        async with svc.admission.slot():
            t = time.perf_counter()
            data = await read_image(request)
            tmp, decoded = await run(svc.decode, data, "the photo")
            x, local = await asyncio.wrap_future(svc.batcher.submit(decoded))
            results = await run(svc.results, x, local, settings)
            svc.latency.append(time.perf_counter() - t)
            svc.n_search += 1
        return {"query": svc.remember_query(tmp, local), "results": results}

    @app.api_route("/api/similar/{image_id}", methods=GET, responses=errors(400, 404, 503))
    async def similar(request: Request, image_id: str, k: str | None = None, rerank: str | None = None,
                      qe: str | None = None):
        """Search with an indexed photo: its nearest others (parameters as for a search)."""
        i = parse_id(image_id)
        settings = svc.settings(k, rerank, qe, svc.trusted(request.headers))
        try:
            x = svc.store.vectors([i])[0]
        except KeyError:
            raise ApiError(404, f"no image with id {i} in this index") from None
        codes, have = svc.store.local_codes([i])
        async with svc.admission.slot():
            results = await run(svc.results, x, codes if have[0] else None, settings, [i])
        return {"query_id": i, "results": results}

    @app.api_route("/api/images", methods=GET, responses=errors(400))
    async def browse(offset: str | None = None, limit: str | None = None):
        """The indexed photos in index order, a page at a time: ``offset`` (from 0) and ``limit``
        (at most 100) → {"total", "offset", "images": [{"id", "path", "thumbnail"}]}."""
        start = whole(offset, "offset", 0, 10 ** 9, 0)
        n = whole(limit, "limit", 1, 100, 24)
        page = await run(svc.page, start, n)
        return {"total": len(svc.store), "offset": start, "images": page}

    @app.api_route("/api/images/{image_id}", methods=GET, responses={**image_response("image/*"), **errors(400, 404)})
    async def image(image_id: str):
        """The indexed photo's file, by id only."""
        i = parse_id(image_id)
        path = svc.file_of(i)
        try:
            f = open(path, "rb")  # open now: a delete from here on cannot take the file away mid-answer
        except OSError:
            raise ApiError(404, f"image {i} is indexed but its file is gone") from None
        size = os.fstat(f.fileno()).st_size

        def chunks():
            with f:
                while block := f.read(1 << 16):
                    yield block

        media = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return StreamingResponse(chunks(), media_type=media, headers={"content-length": str(size)})

    @app.api_route("/api/images/{image_id}/thumbnail", methods=GET,
                   responses={**image_response("image/jpeg"), **errors(400, 404)})
    async def thumbnail(image_id: str):
        data = await run(svc.thumbnail, parse_id(image_id))
        return Response(data, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    @app.post("/api/images", openapi_extra=IMAGE_FORM, status_code=201,
              responses=errors(400, 401, 403, 408, 413, 415, 503))
    async def upload(request: Request):
        """Add a photo (multipart field ``image``): stored in the index's folder, searchable at once."""
        svc.check_token(request.headers)
        async with svc.admission.slot():
            data = await read_image(request)
            tmp, decoded = await run(svc.decode, data, "the photo")
            x, local = await asyncio.wrap_future(svc.batcher.submit(decoded))
            i = await run(svc.add, tmp, x, local)
        return {"id": i, "path": svc.display_path(i), "thumbnail": f"/api/images/{i}/thumbnail"}

    @app.delete("/api/images/{image_id}", responses=errors(400, 401, 403, 404, 503))
    async def delete(request: Request, image_id: str):
        svc.check_token(request.headers)
        i = parse_id(image_id)
        await run(svc.remove, i)
        return {"deleted": i}

    @app.api_route("/api/match/{image_id}", methods=GET,
                   responses={**image_response("image/png"), **errors(400, 404, 503)})
    async def match(image_id: str, query: str | None = None, with_id: str | None = None, format: str = "png"):
        """The match view of a query (``query``: the id its search returned) or of an indexed photo
        (``with_id``) against image ``image_id``: the spatial verification that ranked it, the same
        features and inliers as the search's; PNG, or JSON with ``format=json``."""
        from ..explain import draw_matches

        i = parse_id(image_id)
        if format not in ("png", "json"):
            raise ApiError(400, f"format must be png or json, not {format[:20]!r}")
        if (query is None) == (with_id is None):
            raise ApiError(400, "give the query: query=ID (from its search) or with_id=ID (an indexed photo)")
        if with_id is not None:
            j = parse_id(with_id)
            qpath = svc.file_of(j)
            codes, have = svc.store.local_codes([j])
            qlocal = codes if have[0] else None
        else:
            qpath, qlocal = svc.query(query)
        if qlocal is None:
            raise ApiError(404, "this index keeps no local features (indexed with --local-features 0): nothing to verify")

        def work():
            try:
                result = svc.file_of(i)
                codes, have = svc.store.local_codes([i])
                if not have[0]:
                    raise ApiError(404, f"image {i} keeps no local features to verify")
                if qlocal.grid is None:  # an indexed photo's stored codes: the grid is the model's
                    qlocal.grid = svc.grid
                m = match_view(svc.model, qlocal, oriented_size(qpath), codes, oriented_size(result))
                if format == "json":
                    return m.to_dict()
                buf = io.BytesIO()
                draw_matches(m, str(qpath), result).save(buf, format="PNG")
                return buf.getvalue()
            except (ImageError, OSError):  # deleted under this read
                raise ApiError(404, f"image {i} or the query is no longer readable") from None

        async with svc.admission.slot():
            out = await run(work)
        return out if format == "json" else Response(out, media_type="image/png")

    @app.api_route("/api/stats", methods=GET, responses=errors())
    async def stats():
        return svc.stats()

    schema_of = app.openapi

    def openapi():
        # every failure is {"error": ...}: parameters are parsed here (400), so FastAPI's 422 never comes
        if app.openapi_schema is None:
            schema = schema_of()
            for ops in schema["paths"].values():
                for op in ops.values():
                    op["responses"].pop("422", None)
                    for param in op.get("parameters", []):  # what the strict parsing accepts
                        if param["name"] in PARAM_SCHEMAS:
                            param["schema"] = PARAM_SCHEMAS[param["name"]]
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(BodyLimit, limit=max_upload_mb << 20, timeout=body_timeout)
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "x-token", "content-type"])
    app.add_middleware(Guard)
    return app


def serve(index, host: str = "127.0.0.1", port: int = 8000, token: str | None = None, cors=None,
          window_ms: float = 5.0, max_batch: int = 16, max_upload_mb: int = 20, body_timeout: float = 30.0,
          max_active: int | None = None, max_queue: int = 64, compile: bool | str = "auto",
          precision: str | None = None, log=print) -> None:
    import uvicorn

    app = create_app(index, token=token, host=host, cors=cors, window_ms=window_ms, max_batch=max_batch,
                     max_upload_mb=max_upload_mb, body_timeout=body_timeout, max_active=max_active,
                     max_queue=max_queue, compile=compile, precision=precision)
    svc = app.state.service
    log(f"convlad serve: {svc.index} ({len(svc.store)} images) on http://{host}:{port}/  (API docs: /docs)"
        + ("" if svc.writes else "; writes disabled: listening beyond loopback without --token"))
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=5)


__all__ = ["create_app", "serve"]
