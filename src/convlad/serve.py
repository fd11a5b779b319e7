"""``convlad serve``: a search service over an index, with a web page (FastAPI + uvicorn).

The model is loaded once. Queries from concurrent clients are decoded in a thread pool and
micro-batched: the encoder thread takes whatever queries arrived within a few milliseconds of the
first and runs them through the network in one forward pass. Writes (uploads, deletes) go through
the store's single writer, one at a time; searches keep reading the last committed generation.

Safety: loopback by default; write routes need a token whenever one is set, and are refused when
the server listens beyond loopback without one; request bodies are capped in size and in time,
images in pixels; files are served by id from the index only, never by a path from the request;
no CORS unless asked for. Every bad request gets a 4xx JSON ``{"error": "one sentence"}``.
"""
from __future__ import annotations

import asyncio
import hmac
import io
import ipaddress
import os
import queue
import re
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .extract import scale_size
from .images import ImageError, load_image, load_warped
from .segments import StoreLocked
from .storage import write_durable
from .store import IndexStore
from .verify import LOCAL_K

WEB = Path(__file__).with_name("web")
UPLOADS = "uploads"
MAX_K = 1000
MAX_RERANK = 1000
THUMB = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- micro-batching ---------------------------------------------------------------------------------
class MicroBatcher:
    """One encoder thread: the first query waiting starts a batch, which takes every query arriving
    within ``window`` seconds (up to ``max_batch``), then runs ``fn`` on the batch. window=0 and
    max_batch=1 answer one query per forward pass."""

    def __init__(self, fn, window: float = 0.005, max_batch: int = 16):
        self.fn, self.window, self.max_batch = fn, window, max(1, max_batch)
        self.q: queue.Queue = queue.Queue()
        self.batches = self.items = 0
        self._thread = threading.Thread(target=self._run, name="convlad-encoder", daemon=True)
        self._thread.start()

    def submit(self, item) -> Future:
        f: Future = Future()
        self.q.put((item, f))
        return f

    def _run(self):
        while True:
            batch = [self.q.get()]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    batch.append(self.q.get(timeout=left) if left > 0 else self.q.get_nowait())
                except queue.Empty:
                    break
            try:
                out = self.fn([item for item, _ in batch])
                for (_, f), o in zip(batch, out):
                    f.set_result(o)
            except BaseException as e:  # noqa: BLE001 - handed to every waiting request
                for _, f in batch:
                    f.set_exception(e)
            self.batches += 1
            self.items += len(batch)


# -- the service ------------------------------------------------------------------------------------
class Service:
    def __init__(self, index, token: str | None = None, writes: bool = True, window_ms: float = 5.0,
                 max_batch: int = 16, max_upload: int = 20 << 20, max_pixels: int = 50_000_000):
        self.index = Path(index)
        self.store = IndexStore.open(self.index)
        self.model = self.store.model  # on CUDA when there is one, as everywhere else
        self.model.compile = False  # single queries: compiling per batch shape would not pay back
        self.token, self.writes = token, writes
        self.max_upload, self.max_pixels = max_upload, max_pixels
        self.sizes = [scale_size(s) for s in self.model.config.scales]
        self.decoders = ThreadPoolExecutor(2, thread_name_prefix="convlad-decode")
        self.net_lock = threading.Lock()
        self.batcher = MicroBatcher(self._encode, window_ms / 1000, max_batch)
        self.write_lock = threading.Lock()
        self.tmp = Path(tempfile.mkdtemp(prefix="convlad-serve-"))
        self.queries: OrderedDict[str, Path] = OrderedDict()  # recent query photos, for the match view
        self.thumbs: OrderedDict[int, bytes] = OrderedDict()
        self.latency = deque(maxlen=2000)
        self.started = time.time()
        self.n_search = 0
        self._collect_orphan_uploads()

    # -- helpers ---------------------------------------------------------------------------------
    def _encode(self, decoded: list) -> list:
        """(descriptor, local codes) per image: the codes are kept for uploads and re-ranking."""
        with self.net_lock:
            X, L = self.model.transform_decoded(decoded, local=self.store.local_k or LOCAL_K)
        return [(X[i], L[[i]]) for i in range(len(X))]

    def _collect_orphan_uploads(self) -> None:
        """Uploads written but never committed (the server was killed in between) are deleted."""
        folder = self.index / UPLOADS
        if not folder.is_dir():
            return
        known = {os.path.abspath(self.store.path_of(i)) for i, p, _ in self.store.items() if "/uploads/" in p}
        for f in folder.iterdir():
            if re.fullmatch(r"(tmp-[0-9a-f]{12}-)?[0-9a-f]{16}\.\w+", f.name) and str(f.resolve()) not in known:
                f.unlink(missing_ok=True)

    def check_token(self, headers) -> None:
        if not self.writes:
            raise ApiError(403, "writes are disabled: this server listens beyond loopback without a token "
                                "(start it with --token or CONVLAD_TOKEN)")
        if self.token is None:
            return
        given = headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else headers.get("x-token", "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise ApiError(401, "this route needs the server's token (header 'Authorization: Bearer TOKEN')")

    def decode(self, data: bytes, what: str) -> tuple[Path, list[np.ndarray]]:
        """Check and decode an uploaded photo (in a decoder thread); keeps it as a temporary file."""
        if not data:
            raise ApiError(400, f"{what} is empty (0 bytes)")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h, fmt = im.width, im.height, im.format
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise ApiError(400, f"{what} is not an image this server can read (JPEG, PNG, WebP, ...)") from None
        if w * h > self.max_pixels:
            raise ApiError(413, f"{what} has {w}×{h} = {w * h / 1e6:.0f} megapixels; the limit is "
                                f"{self.max_pixels / 1e6:.0f}")
        ext = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}.get(fmt)
        if ext is None:
            raise ApiError(415, f"{what} is a {fmt} image; send JPEG, PNG, WebP, GIF, BMP or TIFF")
        path = self.tmp / f"{uuid.uuid4().hex[:16]}{ext}"
        path.write_bytes(data)
        try:
            return path, load_warped(path, self.sizes, self.model.config.resize)
        except ImageError as e:
            path.unlink(missing_ok=True)
            raise ApiError(400, f"{what} cannot be decoded: {e.reason}") from None

    def remember_query(self, path: Path) -> str:
        qid = path.stem
        self.queries[qid] = path
        while len(self.queries) > 64:
            _, old = self.queries.popitem(last=False)
            old.unlink(missing_ok=True)
        return qid

    def results(self, q: np.ndarray, k: int, skip: int | None = None, rerank: int = 0, local=None) -> list[dict]:
        """The k nearest to descriptor ``q``; with ``rerank`` and the query's ``local`` codes, the
        top ``rerank`` spatially verified first (each result then carries its inliers)."""
        D, I = self.store.search(q[None], max(k, rerank) + (1 if skip is not None else 0))
        keep = (I[0] >= 0) & (I[0] != (-1 if skip is None else skip))
        ids, dist, inl = I[0][keep], D[0][keep], None
        if rerank and local is not None and len(ids):
            ids, dist, inl = self.store.rerank(local.features(0), ids, dist, rerank)
        out = []
        for j, (d, i) in enumerate(zip(dist, ids)):
            try:
                path = self.display_path(int(i))
            except KeyError:  # deleted by a write that committed since this search began
                continue
            out.append({"id": int(i), "path": path, "distance": round(float(d), 6),
                        "thumbnail": f"/api/images/{int(i)}/thumbnail", **({"inliers": inl[j]} if inl else {})})
        return out[:k]

    def display_path(self, i: int) -> str:
        p = self.store.path_of(i)
        root = self.store.root
        return os.path.relpath(p, root) if root and p.startswith(root.rstrip("/") + "/") else \
            (f"uploads/{Path(p).name}" if f"/{UPLOADS}/" in p else p)

    def file_of(self, i: int) -> str:
        try:
            return self.store.path_of(i)
        except KeyError:
            raise ApiError(404, f"no image with id {i} in this index") from None

    def thumbnail(self, i: int) -> bytes:
        if i in self.thumbs:
            self.thumbs.move_to_end(i)
            return self.thumbs[i]
        try:
            im = load_image(self.file_of(i), min_size=THUMB)
        except ImageError as e:
            raise ApiError(404, f"image {i} is no longer readable: {e.reason}") from None
        im.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        self.thumbs[i] = buf.getvalue()
        while len(self.thumbs) > 4096:
            self.thumbs.popitem(last=False)
        return self.thumbs[i]

    # -- writes ----------------------------------------------------------------------------------
    def _writer(self) -> IndexStore:
        deadline = time.monotonic() + 30
        while True:
            try:
                return IndexStore.open(self.index, write=True)
            except StoreLocked as e:
                if time.monotonic() > deadline:
                    raise ApiError(503, f"the index is being written by another process; try again later ({e})") from None
                time.sleep(0.2)

    def add(self, tmp: Path, x: np.ndarray, local=None) -> int:
        """Move the upload into INDEX/uploads durably, then commit its descriptor: after a crash it
        is either searchable or absent (an uncommitted file is deleted at the next start)."""
        folder = self.index / UPLOADS
        folder.mkdir(exist_ok=True)
        final = folder / tmp.name
        data = tmp.read_bytes()
        write_durable(final, lambda f: f.write(data))
        tmp.unlink(missing_ok=True)
        st = os.stat(final)
        with self.write_lock:
            w = self._writer()
            try:
                (i,) = w.add_vectors(x[None], [str(final.resolve())], [(st.st_size, st.st_mtime_ns)],
                                     local if w.local_k else None)
            finally:
                w.close()
            self.store.refresh()
        return int(i)

    def remove(self, i: int) -> None:
        path = self.file_of(i)
        with self.write_lock:
            w = self._writer()
            try:
                if not w.remove([i]):
                    raise ApiError(404, f"no image with id {i} in this index")
            finally:
                w.close()
            self.store.refresh()
        self.thumbs.pop(i, None)
        if Path(path).parent == (self.index / UPLOADS).resolve():  # never the user's own photos
            Path(path).unlink(missing_ok=True)

    def stats(self) -> dict:
        info = self.store.info()
        lat = sorted(self.latency)
        pct = {f"p{q}_ms": round(lat[min(len(lat) - 1, int(len(lat) * q / 100))] * 1e3, 2) if lat else None
               for q in (50, 95, 99)}
        rss = None
        try:
            rss = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024
        except (OSError, StopIteration):
            pass
        dev = self.model.extractor.device
        device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        return {"images": info["images"], "dead": info["dead"], "segments": info["segments"],
                "generation": info["generation"], "model": info["model"], "search": info["search"], "device": device,
                "searches": self.n_search, "batches": self.batcher.batches,
                "mean_batch": round(self.batcher.items / self.batcher.batches, 2) if self.batcher.batches else None,
                "latency": pct, "uptime_s": round(time.time() - self.started, 1), "rss_bytes": rss}


# -- the HTTP application ---------------------------------------------------------------------------
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
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_json(send, 413, f"request body of {length.decode(errors='replace')} bytes; "
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


async def _send_json(send, status: int, message: str):
    import json

    body = json.dumps({"error": message}).encode()
    try:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
    except Exception:  # noqa: BLE001 - the response had started, or the client is gone
        pass


def _whole(value: str | None, name: str, low: int, high: int, default: int) -> int:
    if value is None:
        return default
    if not re.fullmatch(r"\d{1,7}", value.strip()) or not low <= int(value) <= high:
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}, not {value[:20]!r}")
    return int(value)


def _k(value: str | None) -> int:
    return _whole(value, "k", 1, MAX_K, 10)


def _rerank(value: str | None) -> int:
    return _whole(value, "rerank", 0, MAX_RERANK, 0)


def _id(value: str) -> int:
    if not re.fullmatch(r"\d{1,18}", value):
        raise ApiError(404, f"no image with id {value[:40]!r}: ids are whole numbers")
    return int(value)


IMAGE_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"], "properties": {"image": {"type": "string", "format": "binary"}}}}}}}


def create_app(index, token: str | None = None, host: str = "127.0.0.1", cors: list[str] | None = None,
               window_ms: float = 5.0, max_batch: int = 16, max_upload_mb: int = 20,
               max_pixels: int = 50_000_000, body_timeout: float = 30.0):
    writes = token is not None or is_loopback(host)
    svc = Service(index, token=token, writes=writes, window_ms=window_ms, max_batch=max_batch,
                  max_upload=max_upload_mb << 20, max_pixels=max_pixels)
    app = FastAPI(title="convlad", description="Instance-level image search over a convlad index.",
                  version="0.1.0")
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e):
        msg = {404: "no such route", 405: "method not allowed on this route"}.get(e.status_code, str(e.detail))
        return JSONResponse({"error": msg}, status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e):
        err = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
        return JSONResponse({"error": f"{where}: {err.get('msg', 'invalid')}"}, status_code=422)

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

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse((WEB / "index.html").read_text())

    @app.get("/api/health")
    async def health():
        return {"status": "ok", "images": len(svc.store), "generation": svc.store.generation}

    @app.post("/api/search", openapi_extra=IMAGE_FORM)
    async def search(request: Request, k: str | None = None, rerank: str | None = None):
        """Search with a photo (multipart field ``image``): the k nearest, nearest first;
        ``rerank=N`` verifies the top N spatially and puts the matches with the most inliers first."""
        k, rerank = _k(k), _rerank(rerank)
        t = time.perf_counter()
        data = await read_image(request)
        tmp, decoded = await run(svc.decode, data, "the photo")
        x, local = await asyncio.wrap_future(svc.batcher.submit(decoded))
        results = await run(svc.results, x, k, None, rerank, local) if rerank else svc.results(x, k)
        svc.latency.append(time.perf_counter() - t)
        svc.n_search += 1
        return {"query": svc.remember_query(tmp), "results": results}

    @app.get("/api/similar/{image_id}")
    async def similar(image_id: str, k: str | None = None, rerank: str | None = None):
        """Search with an indexed photo: its nearest others (``rerank=N`` as for a search)."""
        i, k, rerank = _id(image_id), _k(k), _rerank(rerank)
        try:
            x = svc.store.vectors([i])[0]
        except KeyError:
            raise ApiError(404, f"no image with id {i} in this index") from None
        local, have = svc.store.local_codes([i]) if rerank else (None, [False])
        return {"query_id": i, "results": await run(svc.results, x, k, i, rerank, local if have[0] else None)}

    @app.get("/api/images/{image_id}")
    async def image(image_id: str):
        path = svc.file_of(_id(image_id))
        if not os.path.isfile(path):
            raise ApiError(404, f"image {image_id} is indexed but its file is gone")
        return FileResponse(path)

    @app.get("/api/images/{image_id}/thumbnail")
    async def thumbnail(image_id: str):
        data = await run(svc.thumbnail, _id(image_id))
        return Response(data, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    @app.post("/api/images", openapi_extra=IMAGE_FORM, status_code=201)
    async def upload(request: Request):
        """Add a photo (multipart field ``image``): stored in the index's folder, searchable at once."""
        svc.check_token(request.headers)
        data = await read_image(request)
        tmp, decoded = await run(svc.decode, data, "the photo")
        x, local = await asyncio.wrap_future(svc.batcher.submit(decoded))
        i = await run(svc.add, tmp, x, local)
        return {"id": i, "path": svc.display_path(i), "thumbnail": f"/api/images/{i}/thumbnail"}

    @app.delete("/api/images/{image_id}")
    async def delete(request: Request, image_id: str):
        svc.check_token(request.headers)
        i = _id(image_id)
        await run(svc.remove, i)
        return {"deleted": i}

    @app.get("/api/match/{image_id}")
    async def match(image_id: str, query: str | None = None, with_id: str | None = None, format: str = "png"):
        """The match view of a query (``query``: the id a search returned; default: the last one), or of
        an indexed photo (``with_id``), against image ``image_id``: PNG, or JSON with ``format=json``."""
        from .explain import draw_matches, match_images

        i = _id(image_id)
        result = svc.file_of(i)
        if with_id is not None:
            qpath = svc.file_of(_id(with_id))
        else:
            if not svc.queries:
                raise ApiError(404, "no query yet: search with a photo first, or pass with_id")
            qid = query or next(reversed(svc.queries))
            if qid not in svc.queries:
                raise ApiError(404, f"query {qid[:40]!r} is unknown or expired (the last 64 are kept)")
            qpath = svc.queries[qid]
        if format not in ("png", "json"):
            raise ApiError(400, f"format must be png or json, not {format[:20]!r}")

        def work():
            with svc.net_lock:  # the network is shared with the encoder thread
                m = match_images(svc.model, str(qpath), result)
            if format == "json":
                return m.to_dict()
            buf = io.BytesIO()
            draw_matches(m, str(qpath), result).save(buf, format="PNG")
            return buf.getvalue()

        out = await run(work)
        return out if format == "json" else Response(out, media_type="image/png")

    @app.get("/api/stats")
    async def stats():
        return svc.stats()

    app.add_middleware(BodyLimit, limit=max_upload_mb << 20, timeout=body_timeout)
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "x-token", "content-type"])
    return app


def serve(index, host: str = "127.0.0.1", port: int = 8000, token: str | None = None, cors=None,
          window_ms: float = 5.0, max_batch: int = 16, max_upload_mb: int = 20, body_timeout: float = 30.0,
          log=print) -> None:
    import uvicorn

    app = create_app(index, token=token, host=host, cors=cors, window_ms=window_ms, max_batch=max_batch,
                     max_upload_mb=max_upload_mb, body_timeout=body_timeout)
    svc = app.state.service
    log(f"convlad serve: {svc.index} ({len(svc.store)} images) on http://{host}:{port}/  (API docs: /docs)"
        + ("" if svc.writes else "; writes disabled: listening beyond loopback without --token"))
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=5)


__all__ = ["MicroBatcher", "Service", "create_app", "serve"]
