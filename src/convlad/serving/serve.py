"""``convlad serve``: the HTTP layer (FastAPI + uvicorn) of a search service over an index, with a
web page. The domain behind it (whole operations: search, similar, add, delete, match, stats) is
``service.py``; this module parses requests, maps the domain's errors to statuses (``STATUS_OF``),
admits heavy requests, checks tokens and sets headers. A new route is one function here.

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
import hmac
import ipaddress
import logging
import mimetypes
import time
from collections import deque
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import search as S
from .middleware import ApiError, BodyLimit, Guard
from .service import Invalid, NotFound, Service, ServiceError, TooLarge, Unavailable, Unsupported

WEB = Path(__file__).with_name("web")
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
log = logging.getLogger("convlad.serving.serve")

# what a request may ask for: without the server's token, modest caps; with it, the full ones
CAPS = {False: {"k": 100, "rerank": 100, "qe": 10}, True: {"k": 1000, "rerank": 1000, "qe": 50}}
# each domain error's status (``service.py``)
STATUS_OF = {NotFound: 404, Invalid: 400, TooLarge: 413, Unsupported: 415, Unavailable: 503}


def whole(value: str | None, name: str, low: int, high: int, default, note: str = ""):
    """A query parameter as a whole number: ASCII digits only, within bounds, else a 400."""
    if value is None:
        return default
    # no more digits than the bound has: a number is never parsed from a long string
    if not (value.isascii() and value.isdigit() and len(value) <= len(str(high))) or not low <= int(value) <= high:
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}{note}, not {value[:20]!r}")
    return int(value)


def parse_id(value: str) -> int:
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise ApiError(400, f"image ids are whole numbers (ASCII digits), not {value[:40]!r}")
    return int(value)


class Admission:
    """At most ``active`` heavy requests (searches, uploads, match views) at work and ``waiting``
    more in line; beyond that a 503 with Retry-After at once, so that no client waits without
    bound and the cheap routes (health above all) keep answering."""

    def __init__(self, active: int, waiting: int):
        self.active, self.waiting = max(1, active), max(0, waiting)
        self.inflight = 0
        self.refused = 0
        self._sem: asyncio.Semaphore | None = None
        self.seconds = deque(maxlen=200)  # recent service times, for Retry-After

    def retry_after(self) -> int:
        per = float(np.median(self.seconds)) if self.seconds else 1.0
        return int(min(30, max(1, np.ceil(per * (self.inflight + 1) / self.active))))

    @asynccontextmanager
    async def slot(self):
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.active)
        if self.inflight >= self.active + self.waiting:
            self.refused += 1
            raise ApiError(503, f"the server is busy ({self.inflight} requests at work or waiting); try again",
                           {"Retry-After": str(self.retry_after())})
        self.inflight += 1
        try:
            async with self._sem:
                t = time.perf_counter()
                yield
                self.seconds.append(time.perf_counter() - t)
        finally:
            self.inflight -= 1


class Access:
    """Who may do what: the server's token (header 'Authorization: Bearer TOKEN' or 'X-Token'), the
    caps of a search with and without it, and whether writes are allowed at all."""

    def __init__(self, token: str | None, writes: bool):
        self.token, self.writes = token, writes

    def trusted(self, headers) -> bool:
        if self.token is None:
            return False
        given = headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else headers.get("x-token", "")
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode())

    def check_write(self, headers) -> None:
        if not self.writes:
            raise ApiError(403, "writes are disabled: this server listens beyond loopback without a token "
                                "(start it with --token or CONVLAD_TOKEN)")
        if self.token is not None and not self.trusted(headers):
            raise ApiError(401, "this route needs the server's token (header 'Authorization: Bearer TOKEN')")

    def settings(self, headers, k: str | None, rerank: str | None, qe: str | None) -> S.Settings:
        """The search's settings from a request's parameters, within the caps its client may ask for."""
        trusted = self.trusted(headers)
        caps = CAPS[trusted]
        note = "" if trusted else (" without the server's token" if self.token else "")
        return S.Settings(k=whole(k, "k", 1, caps["k"], S.DEFAULTS.k, note),
                          rerank=whole(rerank, "rerank", 0, caps["rerank"], None, note),
                          qe=whole(qe, "qe", 0, caps["qe"], S.DEFAULTS.qe, note))


def thumbnailed(items: list[dict]) -> list[dict]:
    """Each image with the address of its thumbnail."""
    return [{**d, "thumbnail": f"/api/images/{d['id']}/thumbnail"} for d in items]


def with_thumbnails(group: dict) -> dict:
    return {**group, "members": thumbnailed(group["members"])}


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
    "image_id": _ID, "with_id": _ID, "group_id": _ID,
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
               max_queue: int = 64, compile: bool | str = "auto", precision: str | None = None,
               shards: list | None = None):
    """The API and the page over ``index``. ``compile`` (True, False, "auto": on CPU wherever the
    network can be) and ``precision`` (None: the index's model's setting, "auto" unless changed)
    are the encoder's, warmed for every batch shape before this returns. ``shards``: a client per
    shard of a sharded index (``ray_shards.deploy``), searched through them."""
    access = Access(token, writes=token is not None or is_loopback(host))
    svc = Service(index, window_ms=window_ms, max_batch=max_batch, max_pixels=max_pixels, compile=compile,
                  precision=precision, shards=shards)
    admission = Admission(max_active or max_batch, max_queue)

    @asynccontextmanager
    async def lifespan(_app):
        try:
            yield
        finally:
            svc.close()

    app = _fastapi()(title="convlad", description="Instance-level image search over a convlad index.",
                     version="0.1.0", lifespan=lifespan)
    app.state.service, app.state.access, app.state.admission = svc, access, admission

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(ServiceError)
    async def domain_error(_, e: ServiceError):
        status = next(s for cls, s in STATUS_OF.items() if isinstance(e, cls))
        headers = {"Retry-After": str(e.retry_after)} if isinstance(e, Unavailable) else {}
        return JSONResponse({"error": str(e)}, status_code=status, headers=headers)

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
        return await svc.health()

    @app.api_route("/api/config", methods=GET, responses=errors())
    async def config():
        """The search's defaults for this index (k, rerank, qe) and the caps: what a search without
        parameters does, through the page, the API and the command line alike."""
        return {**svc.config(), "caps": CAPS[False], "caps_with_token": CAPS[True], "writes": access.writes,
                "token_required": access.token is not None}

    @app.post("/api/search", openapi_extra=IMAGE_FORM, responses=errors(400, 408, 413, 415, 503))
    async def search(request: Request, k: str | None = None, rerank: str | None = None, qe: str | None = None):
        """Search with a photo (multipart field ``image``): the k nearest, the top ``rerank``
        re-ordered by spatial verification (each result's ``inliers``), after α-query expansion with
        the top ``qe``; the defaults are ``/api/config``'s, the command line's. ``query`` in the
        answer names this query for the match view, ``group`` the group (``{"id", "size"}``) of its
        first result that is the same thing, or null."""
        settings = access.settings(request.headers, k, rerank, qe)
        async with admission.slot():
            out = await svc.search_photo(await read_image(request), settings)
        return {**out, "results": thumbnailed(out["results"])}

    @app.api_route("/api/similar/{image_id}", methods=GET, responses=errors(400, 404, 503))
    async def similar(request: Request, image_id: str, k: str | None = None, rerank: str | None = None,
                      qe: str | None = None):
        """Search with an indexed photo: its nearest others (parameters as for a search), and its
        group (``{"id", "size"}``, or null where it is in none)."""
        i, settings = parse_id(image_id), access.settings(request.headers, k, rerank, qe)
        async with admission.slot():
            out = await svc.similar(i, settings)
        return {**out, "results": thumbnailed(out["results"])}

    @app.api_route("/api/images", methods=GET, responses=errors(400))
    async def browse(offset: str | None = None, limit: str | None = None):
        """The indexed photos in index order, a page at a time: ``offset`` (from 0) and ``limit``
        (at most 100) → {"total", "offset", "images": [{"id", "path", "thumbnail"}]}."""
        out = await svc.browse(whole(offset, "offset", 0, 10 ** 9, 0), whole(limit, "limit", 1, 100, 24))
        return {**out, "images": thumbnailed(out["images"])}

    @app.api_route("/api/images/{image_id}", methods=GET, responses={**image_response("image/*"), **errors(400, 404)})
    async def image(image_id: str):
        """The indexed photo's file, by id only."""
        f, size, path = svc.open_image(parse_id(image_id))

        def chunks():
            with f:
                while block := f.read(1 << 16):
                    yield block

        media = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return StreamingResponse(chunks(), media_type=media, headers={"content-length": str(size)})

    @app.api_route("/api/images/{image_id}/thumbnail", methods=GET,
                   responses={**image_response("image/jpeg"), **errors(400, 404)})
    async def thumbnail(image_id: str):
        data = await svc.thumbnail(parse_id(image_id))
        return Response(data, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    @app.post("/api/images", openapi_extra=IMAGE_FORM, status_code=201,
              responses=errors(400, 401, 403, 408, 413, 415, 503))
    async def upload(request: Request):
        """Add a photo (multipart field ``image``): stored in the index's folder, searchable at once."""
        access.check_write(request.headers)
        async with admission.slot():
            out = await svc.add_photo(await read_image(request))
        return thumbnailed([out])[0]

    @app.delete("/api/images/{image_id}", responses=errors(400, 401, 403, 404, 503))
    async def delete(request: Request, image_id: str):
        access.check_write(request.headers)
        return await svc.delete(parse_id(image_id))

    @app.api_route("/api/match/{image_id}", methods=GET,
                   responses={**image_response("image/png"), **errors(400, 404, 503)})
    async def match(image_id: str, query: str | None = None, with_id: str | None = None, format: str = "png"):
        """The match view of a query (``query``: the id its search returned) or of an indexed photo
        (``with_id``) against image ``image_id``: the spatial verification that ranked it, the same
        features and inliers as the search's; PNG, or JSON with ``format=json``."""
        i = parse_id(image_id)
        if format not in ("png", "json"):
            raise ApiError(400, f"format must be png or json, not {format[:20]!r}")
        if (query is None) == (with_id is None):
            raise ApiError(400, "give the query: query=ID (from its search) or with_id=ID (an indexed photo)")
        j = parse_id(with_id) if with_id is not None else None
        async with admission.slot():
            out = await svc.match(i, query=query, with_id=j, as_json=format == "json")
        return out if format == "json" else Response(out, media_type="image/png")

    @app.api_route("/api/groups", methods=GET, responses=errors(400, 503))
    async def list_groups(offset: str | None = None, limit: str | None = None):
        """Which photos show the same thing: the groups the index's verified pairs join, largest
        first, a page at a time (``offset``, ``limit`` ≤ 100) → {"total", "offset", "generation",
        "groups": [{"id", "size", "representative", "members": [{"id", "path", "via", "inliers",
        "similarity", "duplicate", "thumbnail"}]}]}, as ``convlad groups --json``."""
        start, n = whole(offset, "offset", 0, 10 ** 9, 0), whole(limit, "limit", 1, 100, 24)
        async with admission.slot():
            out = await svc.groups(start, n)
        return {**out, "groups": [with_thumbnails(g) for g in out["groups"]]}

    @app.api_route("/api/groups/{group_id}", methods=GET, responses=errors(400, 404, 503))
    async def group(group_id: str):
        """One group, by its id (its representative's id)."""
        gid = parse_id(group_id)
        async with admission.slot():
            return with_thumbnails(await svc.group(gid))

    @app.api_route("/api/stats", methods=GET, responses=errors())
    async def stats():
        return {**svc.stats(), "in_flight": admission.inflight, "refused_busy": admission.refused}

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
          precision: str | None = None, log=print, ray: str | None = None, replicas: int = 1,
          shard_cpus: float = 1.0) -> None:
    """``ray``: serve the index's shards on the Ray cluster at this address ("local": one started
    here), ``replicas`` of ``shard_cpus`` CPUs each (``ray_shards``); this process is their ingress."""
    import uvicorn

    shards = None
    if ray is not None:
        from .ray_shards import deploy, require

        require()  # without Ray Serve: its one line, before anything starts
        log(f"convlad serve: deploying the shards of {index} on Ray Serve ({ray}, {replicas} replica(s) each) ...")
        shards = deploy(index, ray, replicas, shard_cpus)
    # the shards outlive this process on a cluster of its own: other ingresses may be using them
    app = create_app(index, token=token, host=host, cors=cors, window_ms=window_ms, max_batch=max_batch,
                     max_upload_mb=max_upload_mb, body_timeout=body_timeout, max_active=max_active,
                     max_queue=max_queue, compile=compile, precision=precision, shards=shards)
    svc = app.state.service
    log(f"convlad serve: {svc.index} ({len(svc.store)} images"
        + (f", {len(shards)} shards on Ray Serve" if shards else "") + f") on http://{host}:{port}/  (API docs: /docs)"
        + ("" if app.state.access.writes else "; writes disabled: listening beyond loopback without --token"))
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # h11 and asyncio, never the C parser and loop that ray[serve] pulls in: the strict parser the
    # safety tests were written against, whatever else is installed
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=5, http="h11", loop="asyncio")


__all__ = ["Access", "Admission", "ApiError", "CAPS", "STATUS_OF", "create_app", "parse_id", "serve", "whole"]
