"""The HTTP layer's middleware and its own errors: every response's security headers and request id,
an unexpected fault as one JSON sentence (the traceback to the log), and bounded request bodies."""
from __future__ import annotations

import asyncio
import json
import logging
import uuid

log = logging.getLogger("convlad.serving.serve")


class ApiError(Exception):
    """An answer of the HTTP layer's own: a status, one sentence, headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# the page loads its code and style from this server only, runs no inline code, and is never framed
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Swagger UI (served by the package, offline) starts from an inline script
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ALWAYS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
          (b"x-frame-options", b"DENY")]


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


__all__ = ["ALWAYS", "ApiError", "BodyLimit", "DOCS_CSP", "Guard", "PAGE_CSP"]
