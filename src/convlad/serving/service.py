"""The state behind ``convlad serve``: the model and the index, queries from many clients
micro-batched through one encoder, the queries kept (privately) for their match views, the cost
an anonymous request may have, and the writes through the store's single writer. ``serve.py`` is
the HTTP layer over it.

The encoder thread takes whatever queries arrived within a few milliseconds of the first and runs
them through the network in one forward pass. Writes (uploads, deletes) go through the store's
single writer, one at a time; searches keep reading the last committed generation.
"""
from __future__ import annotations

import asyncio
import hmac
import io
import math
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch

from .. import progress as P
from .. import search as S
from ..extract import cpu_flags, scale_size, want_compile
from ..images import ImageError, load_image, load_warped
from ..index.segments import UPLOADS, StoreLocked, is_upload_file, new_upload_name
from ..storage import write_durable
from ..index.store import IndexStore
from ..verify import LocalCodes

THUMB = 256
# what a request may ask for: without the server's token, modest caps; with it, the full ones
CAPS = {False: {"k": 100, "rerank": 100, "qe": 10}, True: {"k": 1000, "rerank": 1000, "qe": 50}}
MAX_ASPECT = 16  # a photo longer than this many times its width (or the reverse) is refused
# Pixels a decode may produce: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size where that still
# covers the network's input (images.load_image), other formats whole; a PNG of 50 megapixels
# decodes to 150 MB in seconds, whatever its file size
MAX_DECODED_PIXELS = 24_000_000
QUERY_TTL = 900.0  # seconds a query stays reachable for its match view
QUERIES_KEPT = 64
QUERY_DIR_PREFIX = "convlad-serve-"


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def whole(value: str | None, name: str, low: int, high: int, default, note: str = ""):
    """A query parameter as a whole number: ASCII digits only, within bounds, else a 400."""
    if value is None:
        return default
    if not (value.isascii() and value.isdigit() and len(value) <= 7) or not low <= int(value) <= high:
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}{note}, not {value[:20]!r}")
    return int(value)


def image_id(value: str) -> int:
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def query_folder() -> Path:
    """A private folder for this process's query photos; those of servers that died are removed."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{QUERY_DIR_PREFIX}*"):
        pid = old.name[len(QUERY_DIR_PREFIX):].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and old.is_dir() and old.stat().st_uid == os.getuid():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{QUERY_DIR_PREFIX}{os.getpid()}-"))  # mode 0700


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
                 max_batch: int = 16, max_upload: int = 20 << 20, max_pixels: int = 50_000_000,
                 max_active: int | None = None, max_queue: int = 64, compile: bool | str = "auto",
                 precision: str | None = None):
        self.index = Path(index)
        self.store = IndexStore.open(self.index)
        self.model = self.store.model  # on CUDA when there is one, as everywhere else
        if precision is not None:
            self.model.precision = precision
        # a server runs without end: "auto" compiles wherever the network can be (on 2 AVX2 cores a
        # compiled pass is 1.2–1.5×, against 10–60 s once)
        self.model.compile = want_compile(compile, self.model.extractor, math.inf, self.model.config.scales,
                                          self.model.config.resize)
        self.token, self.writes = token, writes
        self.max_upload, self.max_pixels = max_upload, max_pixels
        self.sizes = [scale_size(s) for s in self.model.config.scales]
        self._grid = None
        self.decoders = ThreadPoolExecutor(2, thread_name_prefix="convlad-decode")
        # each request runs its verification in a decoder thread: no second level of threads
        self.verifier = self.model.verifier(threads=1)
        self.net_lock = threading.Lock()
        self.batcher = MicroBatcher(self._encode, window_ms / 1000, max_batch)
        self.write_lock = threading.Lock()
        self.tmp = query_folder()
        self.admission = Admission(max_active or max_batch, max_queue)
        # recent queries, for the match view: the photo and the local features its search used
        self.queries: OrderedDict[str, tuple[Path, LocalCodes | None, float]] = OrderedDict()
        self.query_lock = threading.Lock()
        self.thumbs: OrderedDict[int, bytes] = OrderedDict()
        self.latency = deque(maxlen=2000)
        self.started = time.time()
        self.n_search = 0
        self._collect_orphan_uploads()
        # warm-up passes, so that no client waits for the network's first run or for compilation:
        # a full batch compiles every chunk shape the batcher will run (extract._run_chunk pads
        # each chunk to its scale's size), then a single query through the encoder thread
        blank = [np.zeros((n, n, 3), np.uint8) for n in self.sizes]
        if self.model.compile:
            P.write(f"convlad serve: compiling the network for batches of up to {max_batch} "
                    f"({self.model.extractor.precision}; 10–60 s, once; --compile off skips it) ...")
            self._encode([blank] * self._warm_batch(max_batch))
        _, local = self.batcher.submit(blank).result()
        if local is not None:  # the same pass gives the grid the stored local features lie on
            self._grid = local.grid

    # -- helpers ---------------------------------------------------------------------------------
    def _warm_batch(self, max_batch: int) -> int:
        """Images in a batch whose chunks reach every compiled shape: the largest chunk, or max_batch."""
        steps = [max(1, self.model.extractor.max_batch_pixels // (n * n)) for n in self.sizes]
        return max(1, min(max_batch, max(steps)))

    def _encode(self, decoded: list) -> list:
        """(descriptor, local codes or None) per image, with the index's local-feature layout (as
        ``search.encode``): the codes verify the query and are kept with an upload."""
        with self.net_lock:
            enc = self.model.transform_decoded(decoded, local=self.store.local_k)
        return [(enc.X[i], enc.local[[i]] if enc.local is not None else None) for i in range(len(enc))]

    def _collect_orphan_uploads(self) -> None:
        """Uploads written but never committed (the server was killed in between) are deleted."""
        folder = self.index / UPLOADS
        if not folder.is_dir():
            return
        known = {os.path.abspath(self.store.path_of(i)) for i, p, _ in self.store.items() if f"/{UPLOADS}/" in p}
        for f in folder.iterdir():
            if is_upload_file(f.name) and str(f.resolve()) not in known:
                f.unlink(missing_ok=True)

    def trusted(self, headers) -> bool:
        """Whether a request carries the server's token (header 'Authorization: Bearer TOKEN')."""
        if self.token is None:
            return False
        given = headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else headers.get("x-token", "")
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode())

    def check_token(self, headers) -> None:
        if not self.writes:
            raise ApiError(403, "writes are disabled: this server listens beyond loopback without a token "
                                "(start it with --token or CONVLAD_TOKEN)")
        if self.token is not None and not self.trusted(headers):
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
        if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
            raise ApiError(413, f"{what} is {w}×{h}, more than {MAX_ASPECT} times as long as it is wide")
        if decoded_pixels(w, h, fmt, max(self.sizes)) > MAX_DECODED_PIXELS:
            raise ApiError(413, f"{what} is a {w}×{h} {fmt}: decoding it would take {w * h / 1e6:.0f} megapixels, "
                                f"more than this server's {MAX_DECODED_PIXELS / 1e6:.0f} (JPEGs decode at reduced size: "
                                "send a JPEG, or a smaller image)")
        ext = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}.get(fmt)
        if ext is None:
            raise ApiError(415, f"{what} is a {fmt} image; send JPEG, PNG, WebP, GIF, BMP or TIFF")
        path = self.tmp / new_upload_name(ext)
        path.write_bytes(data)
        try:
            return path, load_warped(path, self.sizes, self.model.config.resize)
        except ImageError as e:
            path.unlink(missing_ok=True)
            raise ApiError(400, f"{what} cannot be decoded: {e.reason}") from None

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the verification layer's map for a photo warped to the model's size, where the
        stored local features lie (found once, by a pass over a blank image)."""
        if self._grid is None:
            blank = [np.zeros((n, n, 3), np.uint8) for n in self.sizes]
            with self.net_lock:
                self._grid = self.model.transform_decoded([blank], local=1).local.grid
        return self._grid

    def remember_query(self, path: Path, local: LocalCodes | None) -> str:
        """Keep a query for its match view; its id, unguessable, is the only way to reach it."""
        qid = uuid.uuid4().hex
        with self.query_lock:
            self.queries[qid] = (path, local, time.monotonic())
            self._expire(QUERIES_KEPT)
        return qid

    def query(self, qid: str) -> tuple[Path, LocalCodes | None]:
        with self.query_lock:
            self._expire(QUERIES_KEPT)
            if qid not in self.queries:
                raise ApiError(404, f"query {qid[:40]!r} is unknown or expired (queries are kept "
                                    f"{QUERY_TTL / 60:.0f} minutes, the last {QUERIES_KEPT})")
            path, local, _ = self.queries[qid]
        return path, local

    def _expire(self, keep: int) -> None:
        now = time.monotonic()
        while self.queries:
            qid, (path, _, t) = next(iter(self.queries.items()))
            if len(self.queries) <= keep and now - t < QUERY_TTL:
                break
            del self.queries[qid]
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the query photos (at the server's exit)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.decoders.shutdown(wait=False, cancel_futures=True)

    def results(self, q: np.ndarray, local: LocalCodes | None, settings: S.Settings, exclude=()) -> list[dict]:
        """The ranking of ``search.rank`` for descriptor ``q`` (and its local codes, one row), as
        JSON: each result with its rank, id, path, distance and inliers (None where not verified)."""
        for attempt in range(3):
            try:
                (hits,) = S.rank(self.store, q[None], [local.features(0) if local is not None else None], settings,
                                 exclude=[list(exclude)], verifier=self.verifier)
                break
            except KeyError:  # a neighbour deleted by a write that committed meanwhile: rank again
                if attempt == 2:
                    raise ApiError(503, "the index changed during this search; try again", {"Retry-After": "1"}) from None
        out = []
        for h in hits:
            try:
                path = self.display_path(h.id)
            except KeyError:  # deleted by a write that committed since this search began
                continue
            out.append({**h.to_dict(), "path": path, "thumbnail": f"/api/images/{h.id}/thumbnail"})
        return out

    def settings(self, k: str | None, rerank: str | None, qe: str | None, trusted: bool) -> S.Settings:
        """The search's settings from a request's parameters, within the caps its client may ask for."""
        caps = CAPS[trusted]
        note = "" if trusted else (" without the server's token" if self.token else "")
        return S.Settings(k=whole(k, "k", 1, caps["k"], S.DEFAULTS.k, note),
                          rerank=whole(rerank, "rerank", 0, caps["rerank"], None, note),
                          qe=whole(qe, "qe", 0, caps["qe"], S.DEFAULTS.qe, note))

    def config(self) -> dict:
        """The search's defaults for this index, as every door applies them (the page reads them)."""
        d = S.DEFAULTS.resolve(self.store)
        return {"k": d.k, "rerank": d.rerank, "qe": d.qe, "caps": CAPS[False], "caps_with_token": CAPS[True],
                "local_features": self.store.local_k, "writes": self.writes, "token_required": self.token is not None}

    def page(self, offset: int, limit: int) -> list[dict]:
        """Indexed photos ``offset`` … ``offset + limit`` in index order."""
        from itertools import islice

        out = []
        for i, _, _ in islice(self.store.items(), offset, offset + limit):
            try:
                out.append({"id": i, "path": self.display_path(i), "thumbnail": f"/api/images/{i}/thumbnail"})
            except KeyError:  # deleted since the page was listed
                continue
        return out

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
        except OSError:  # its file deleted under this read
            raise ApiError(404, f"image {i} is no longer readable") from None
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
                "generation": info["generation"], "model": info["model"], "search": info["search"],
                "augment": info["augment"], "pairs": info["pairs"], "device": device,
                "searches": self.n_search, "batches": self.batcher.batches,
                "mean_batch": round(self.batcher.items / self.batcher.batches, 2) if self.batcher.batches else None,
                "latency": pct, "uptime_s": round(time.time() - self.started, 1), "rss_bytes": rss,
                "in_flight": self.admission.inflight, "refused_busy": self.admission.refused,
                "precision": self.model.extractor.precision, "precision_setting": self.model.precision,
                "compiled": bool(self.model.extractor.compile), "max_batch": self.batcher.max_batch,
                "cpu_flags": list(cpu_flags())}


def decoded_pixels(w: int, h: int, fmt: str, size: int) -> int:
    """Pixels that decoding a w×h image of format ``fmt`` produces when the network needs ``size``
    a side: a JPEG shrinks by up to 8 while its shorter side stays ≥ size (libjpeg's scaling)."""
    if fmt != "JPEG":
        return w * h
    scale = 1
    while scale < 8 and min(w, h) // (scale * 2) >= size:
        scale *= 2
    return (w // scale) * (h // scale)


__all__ = ["Admission", "ApiError", "MicroBatcher", "Service", "decoded_pixels", "image_id", "whole"]
