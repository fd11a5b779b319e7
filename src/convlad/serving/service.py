"""The service's domain: the model and the index behind ``convlad serve``, as whole operations.

``Service`` searches with a photo or an indexed one, adds and deletes photos, draws match views and
reports its state, through the same functions as the command line (``search.rank``,
``search.search_ids``, ``explain.match_in_index``, ``groups.groups``). It knows nothing of HTTP: it takes bytes, ids and
``search.Settings`` and raises domain errors (``NotFound``, ``Invalid``, ``TooLarge``,
``Unsupported``, ``Unavailable``), which ``serve.py``, the HTTP layer, maps to statuses. What an
anonymous request may ask for (caps, tokens) and how many may work at once (admission) are the HTTP
layer's; what one photo may cost to decode is this module's.

Queries from many clients are micro-batched: one encoder thread takes whatever queries arrived
within a few milliseconds of the first and runs them through the network in one forward pass.
Decoding and verification run in a small pool of threads. Writes (uploads, deletes) go through the
store's single writer, one at a time; searches keep reading the last committed generation. A query's
photo and local features are kept, privately, for its match view, reachable only by the unguessable
id its search returned.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import progress as P
from .. import search as S
from ..explain import draw_matches, match_in_index, warp_grid
from ..extract import scale_size
from ..groups import groups as find_groups
from ..groups import verify as verify_group
from ..images import ImageError, load_image, load_warped
from ..index.segments import UPLOADS, StoreLocked, is_upload_file, new_upload_name
from ..index.shards import ShardedIndex, ShardUnavailable
from ..index.store import IndexStore
from ..runtime import Runtime, cpu_flags, want_compile
from ..storage import write_durable
from ..verify import LocalCodes
from .queries import Queries

THUMB = 256
MAX_ASPECT = 16  # a photo longer than this many times its width (or the reverse) is refused
# Pixels a decode may produce: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size where that still
# covers the network's input (images.load_image), other formats whole; a PNG of 50 megapixels
# decodes to 150 MB in seconds, whatever its file size
MAX_DECODED_PIXELS = 24_000_000
# a search names its query's group after finding the collection's groups itself where that takes
# half a second or less (2.5 s at 100 000 photos, measured; linear in the photos); past this many
# photos they are found in the background, and a search in the meantime names none
GROUPS_INLINE = 20_000
SHARD_RETRY = 5  # seconds a client is told to wait for a shard whose replica Ray Serve is replacing
FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


# -- domain errors: one sentence each; serve.py gives each its status ---------------------------------
class ServiceError(Exception):
    """A request the service cannot carry out, said in one sentence (``str(e)``)."""


class NotFound(ServiceError):
    """No such image or query (or nothing to verify it with)."""


class Invalid(ServiceError):
    """Malformed input: an empty or unreadable photo."""


class TooLarge(ServiceError):
    """A photo over the pixels, the aspect or the decoding cost the service accepts."""


class Unsupported(ServiceError):
    """An image format the service does not take."""


class Unavailable(ServiceError):
    """Not now: the index changed under a search, or another process holds its writer. Try again in
    ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


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
    """The index at ``index``, served. ``window_ms``/``max_batch``: the micro-batcher's; ``max_pixels``:
    the largest photo accepted; ``compile`` (True, False, "auto": on CPU wherever the network can be)
    and ``precision`` (None: "auto") are the encoder's ``runtime.Runtime``, warmed for every batch
    shape before this returns. ``shards``: a client per shard of a sharded index (``index.shards``):
    searches go through them, and a search some shard does not answer is ``Unavailable``."""

    def __init__(self, index, window_ms: float = 5.0, max_batch: int = 16, max_pixels: int = 50_000_000,
                 compile: bool | str = "auto", precision: str | None = None, shards: list | None = None):
        self.index = Path(index)
        # a server runs without end: "auto" compiles wherever the network can be (on 2 AVX2 cores a
        # compiled pass is 1.2–1.5×, against 10–60 s once)
        self.store = IndexStore.open(self.index, runtime=Runtime(compile=compile, precision=precision or "auto",
                                                                 workload=math.inf))
        self.model = self.store.model  # on CUDA when there is one, as everywhere else
        # what a search ranks: the index here, or its shards (rows by id, pairs and paths stay the store's)
        self.searcher = ShardedIndex(self.store, shards) if shards else self.store
        self._shard_health: tuple[float, list] = (-math.inf, [])
        self.max_pixels = max_pixels
        self.sizes = [scale_size(s) for s in self.model.config.scales]
        self._grid = None
        self.decoders = ThreadPoolExecutor(2, thread_name_prefix="convlad-decode")
        # each request runs its verification in a decoder thread: no second level of threads
        self.verifier = self.model.verifier(threads=1)
        self.net_lock = threading.Lock()
        self.batcher = MicroBatcher(self._encode, window_ms / 1000, max_batch)
        self.write_lock = threading.Lock()
        # recent queries, for the match view: the photo and the local features its search used
        self.queries = Queries(NotFound)
        self.tmp = self.queries.folder
        self.thumbs: OrderedDict[int, bytes] = OrderedDict()
        self.groups_lock, self._groups_of, self._grouping = threading.Lock(), None, threading.Lock()
        self.latency = deque(maxlen=2000)
        self.started = time.time()
        self.n_search = 0
        self._collect_orphan_uploads()
        # warm-up passes, so that no client waits for the network's first run or for compilation:
        # a full batch compiles every chunk shape the batcher will run (extract._run_chunk pads
        # each chunk to its scale's size), then a single query through the encoder thread
        blank = [np.zeros((n, n, 3), np.uint8) for n in self.sizes]
        if want_compile(compile, self.model.extractor, math.inf, self.model.config.scales, self.model.config.resize):
            P.write(f"convlad serve: compiling the network for batches of up to {max_batch} "
                    f"({self.model.extractor.precision}; 10–60 s, once; --compile off skips it) ...")
            self._encode([blank] * self._warm_batch(max_batch))
        _, local = self.batcher.submit(blank).result()
        if local is not None:  # the same pass gives the grid the stored local features lie on
            self._grid = local.grid

    # -- operations ------------------------------------------------------------------------------
    async def search_photo(self, data: bytes, settings: S.Settings) -> dict:
        """Search with a photo: {"query": its id for the match view, "results": [...]}."""
        t = time.perf_counter()
        tmp, decoded = await self._pool(self.decode, data, "the photo")
        x, local = await asyncio.wrap_future(self.batcher.submit(decoded))
        results = await self._pool(self._ranked, x[None], local, settings, None)
        self.latency.append(time.perf_counter() - t)
        self.n_search += 1
        # its match view draws the features it searched with: the smaller scale's, for mining, stay behind
        kept = replace(local, coarse=None) if local is not None else None
        return {"query": self.queries.remember(tmp, kept), "results": results,
                "group": await self._pool(self.group_of, [r["id"] for r in results if r.get("same")])}

    async def similar(self, i: int, settings: S.Settings) -> dict:
        """Search with an indexed photo: its nearest others, and its group where it is in one."""
        self.file_of(i)
        results = await self._pool(self._ranked, None, None, settings, i)
        return {"query_id": i, "results": results,
                "group": await self._pool(self.group_of, [i] + [r["id"] for r in results if r.get("same")])}

    def group_of(self, ids) -> dict | None:
        """The group (``{"id", "size"}``) of the first of ``ids`` that is in one, or None: the group a
        query belongs to, through itself or the first result that shows the same thing. A search
        does not wait for a large collection's groups (2.5 s at 100 000 photos, once a generation):
        until they are found, in the background, it names none."""
        got = self._groups_of
        if got is None or got[0] != self.store.generation:
            if len(self.store) > GROUPS_INLINE:
                if not self._grouping.locked():
                    threading.Thread(target=self._group_in_background, daemon=True).start()
                return None
            self._groups(slice(0, 0))
            got = self._groups_of
        by_member = got[5]
        return next((by_member[i] for i in ids if i in by_member), None)

    def _group_in_background(self):
        if self._grouping.acquire(blocking=False):
            try:
                self._groups(slice(0, 0))
            except Exception:  # a store that changed under it: the next search tries again
                pass
            finally:
                self._grouping.release()

    async def add_photo(self, data: bytes) -> dict:
        """Add a photo: kept in the index's folder, searchable at once."""
        tmp, decoded = await self._pool(self.decode, data, "the photo")
        x, local = await asyncio.wrap_future(self.batcher.submit(decoded))
        i = await self._pool(self.add, tmp, x, local)
        return {"id": i, "path": self.display_path(i)}

    async def delete(self, i: int) -> dict:
        await self._pool(self.remove, i)
        return {"deleted": i}

    async def match(self, i: int, query: str | None = None, with_id: int | None = None, as_json: bool = False):
        """The match view of a query (by the id its search returned) or of an indexed photo
        (``with_id``) against image ``i``: PNG bytes, or its ``MatchView.to_dict``."""
        if with_id is not None:
            qpath = self.file_of(with_id)
            codes, have = self.store.local_codes([with_id])
            qlocal = codes if have[0] else None
        else:
            qpath, qlocal = self.queries.get(query)
        if qlocal is None:
            raise NotFound("this index keeps no local features (indexed with --local-features 0): nothing to verify")

        def work():
            try:
                m = self._match(qlocal, qpath, i)
                if as_json:
                    return m.to_dict()
                buf = io.BytesIO()
                draw_matches(m, str(qpath), self.store.path_of(i)).save(buf, format="PNG")
                return buf.getvalue()
            except KeyError:
                raise NotFound(f"no image with id {i} in this index") from None
            except (ImageError, OSError):  # deleted under this read
                raise NotFound(f"image {i} or the query is no longer readable") from None
            except LookupError as e:
                raise NotFound(str(e)) from None

        return await self._pool(work)

    async def groups(self, offset: int, limit: int) -> dict:
        """The index's groups (``groups.groups``, largest first), ``limit`` from ``offset``, each
        with its evidence (verified a page at a time, once a generation)."""
        gen, total, page = await self._pool(self._groups, slice(offset, offset + limit))
        return {"total": total, "offset": offset, "generation": gen, "groups": page}

    async def group(self, gid: int) -> dict:
        """One group by its id (its representative's)."""
        _, _, got = await self._pool(self._groups, gid)
        if not got:
            raise NotFound(f"no group with id {gid} in this index (a group's id is its representative's)")
        return got[0]

    async def thumbnail(self, i: int) -> bytes:
        return await self._pool(self._thumbnail, i)

    async def browse(self, offset: int, limit: int) -> dict:
        """The indexed photos in index order, ``limit`` from ``offset``."""
        return {"total": len(self.store), "offset": offset, "images": await self._pool(self.page, offset, limit)}

    async def health(self) -> dict:
        """The service's state; a sharded one's also names each shard's (``ShardedIndex.health``), and
        is "degraded" while one does not answer."""
        out = {"status": "ok", "images": len(self.store), "generation": self.store.generation}
        if isinstance(self.searcher, ShardedIndex):
            # asked of the shards at most once a second, whoever asks how often (health is anonymous);
            # not in the decoders' pool, so that health answers when it is full
            at, shards = self._shard_health
            if time.monotonic() - at > 1.0:
                shards = await asyncio.to_thread(self.searcher.health)
                self._shard_health = (time.monotonic(), shards)
            out["shards"] = shards
            if any("error" in s for s in out["shards"]):
                out["status"] = "degraded"
        return out

    def config(self) -> dict:
        """The search's defaults for this index, as every door applies them."""
        d = S.DEFAULTS.resolve(self.store)
        return {"k": d.k, "rerank": d.rerank, "qe": d.qe, "local_features": self.store.local_k}

    def open_image(self, i: int):
        """(an open binary file, its size, its path) of indexed photo ``i``: open now, so that a
        delete from here on cannot take the file away mid-answer."""
        path = self.file_of(i)
        try:
            f = open(path, "rb")
        except OSError:
            raise NotFound(f"image {i} is indexed but its file is gone") from None
        return f, os.fstat(f.fileno()).st_size, path

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
                "precision": self.model.extractor.precision, "precision_setting": self.model.precision,
                "compiled": bool(self.model.extractor.compile), "max_batch": self.batcher.max_batch,
                "cpu_flags": list(cpu_flags())}

    def close(self) -> None:
        """Remove the query photos (at the server's exit)."""
        self.queries.close()
        self.decoders.shutdown(wait=False, cancel_futures=True)

    # -- the steps -------------------------------------------------------------------------------
    def _pool(self, fn, *args):
        return asyncio.get_running_loop().run_in_executor(self.decoders, fn, *args)

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

    def decode(self, data: bytes, what: str) -> tuple[Path, list[np.ndarray]]:
        """Check and decode an uploaded photo (in a decoder thread); keeps it as a temporary file."""
        if not data:
            raise Invalid(f"{what} is empty (0 bytes)")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h, fmt = im.width, im.height, im.format
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise Invalid(f"{what} is not an image this server can read (JPEG, PNG, WebP, ...)") from None
        if w * h > self.max_pixels:
            raise TooLarge(f"{what} has {w}×{h} = {w * h / 1e6:.0f} megapixels; the limit is {self.max_pixels / 1e6:.0f}")
        if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
            raise TooLarge(f"{what} is {w}×{h}, more than {MAX_ASPECT} times as long as it is wide")
        if decoded_pixels(w, h, fmt, max(self.sizes)) > MAX_DECODED_PIXELS:
            raise TooLarge(f"{what} is a {w}×{h} {fmt}: decoding it would take {w * h / 1e6:.0f} megapixels, "
                           f"more than this server's {MAX_DECODED_PIXELS / 1e6:.0f} (JPEGs decode at reduced size: "
                           "send a JPEG, or a smaller image)")
        ext = FORMATS.get(fmt)
        if ext is None:
            raise Unsupported(f"{what} is a {fmt} image; send JPEG, PNG, WebP, GIF, BMP or TIFF")
        path = self.tmp / new_upload_name(ext)
        path.write_bytes(data)
        try:
            return path, load_warped(path, self.sizes, self.model.config.resize)
        except ImageError as e:
            path.unlink(missing_ok=True)
            raise Invalid(f"{what} cannot be decoded: {e.reason}") from None

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the verification layer's map for a photo warped to the model's size, where the
        stored local features lie (found once, by a pass over a blank image)."""
        if self._grid is None:
            with self.net_lock:
                self._grid = warp_grid(self.model)
        return self._grid

    def _match(self, qlocal: LocalCodes, qpath, i: int):
        """``explain.match_in_index``, as ``convlad explain`` draws it, with the stored features only."""
        # a model that does not warp gives each photo its own map shape: a pass over the result's photo
        with self.net_lock if self.model.config.resize != "warp" else contextlib.nullcontext():
            return match_in_index(self.store, qlocal, qpath, i, fresh=False, grid=self.grid, verifier=self.verifier)

    def _ranked(self, Q: np.ndarray | None, local: LocalCodes | None, settings: S.Settings, of: int | None) -> list[dict]:
        """The one search's ranking (``search.rank`` for descriptor ``Q`` and its local codes, one
        row; ``search.search_ids`` for indexed photo ``of``) as plain data: each result with its
        rank, id, path, distance, inliers and via."""
        for attempt in range(3):
            try:
                if of is not None:
                    (hits,) = S.search_ids(self.searcher, [of], settings, verifier=self.verifier)
                else:
                    (hits,) = S.rank(self.searcher, Q, [local.features(0) if local is not None else None], settings,
                                     verifier=self.verifier)
                break
            except ShardUnavailable as e:  # no answer from part of the index: never a partial one
                raise Unavailable(f"{e}; its replica is being replaced, try again", retry_after=SHARD_RETRY) from None
            except KeyError:  # a neighbour deleted by a write that committed meanwhile: rank again
                if of is not None:
                    self.file_of(of)  # ... unless it is the query itself
                if attempt == 2:
                    raise Unavailable("the index changed during this search; try again") from None
        out = []
        for h in hits:
            try:
                path = self.display_path(h.id)
            except KeyError:  # deleted by a write that committed since this search began
                continue
            out.append({**h.to_dict(), "path": path})
        return out

    def _groups(self, which):
        """(the generation, how many groups it has, the groups ``which`` selects: a slice of them, or
        the one of an id), the groups found once a generation (with each grouped photo's ``{"id",
        "size"}`` of its group, for ``group_of``) and each verified the first time it is asked for
        (paths as shown)."""
        with self.groups_lock:
            gen = self.store.generation
            if self._groups_of is None or self._groups_of[0] != gen:
                found = find_groups(self.store, evidence=False)
                every = [m["id"] for g in found for m in g["members"]]
                shown = dict(zip(every, self.display_paths(every)))
                for g in found:
                    for m in g["members"]:
                        m["path"] = shown[m["id"]]
                member_of = {m["id"]: {"id": g["id"], "size": g["size"]} for g in found for m in g["members"]}
                self._groups_of = (gen, {g["id"]: g for g in found}, len(found), [g["id"] for g in found], set(),
                                   member_of)
            _, by_id, total, order, verified, _ = self._groups_of
            ids = order[which] if isinstance(which, slice) else [which] if which in by_id else []
            for i in ids:
                if i not in verified:
                    verify_group(self.store, by_id[i])
                    verified.add(i)
            return gen, total, [by_id[i] for i in ids]

    def page(self, offset: int, limit: int) -> list[dict]:
        """Indexed photos ``offset`` … ``offset + limit`` in index order."""
        from itertools import islice

        out = []
        for i, _, _ in islice(self.store.items(), offset, offset + limit):
            try:
                out.append({"id": i, "path": self.display_path(i)})
            except KeyError:  # deleted since the page was listed
                continue
        return out

    def display_path(self, i: int) -> str:
        return self.display_paths([i])[0]

    def display_paths(self, ids) -> list[str]:
        """The paths shown for ``ids``: within the index's folder, or an upload's name."""
        root = self.store.root
        return [os.path.relpath(p, root) if root and p.startswith(root.rstrip("/") + "/") else
                (f"uploads/{Path(p).name}" if f"/{UPLOADS}/" in p else p) for p in self.store.paths_of(ids)]

    def file_of(self, i: int) -> str:
        try:
            return self.store.path_of(i)
        except KeyError:
            raise NotFound(f"no image with id {i} in this index") from None

    def _thumbnail(self, i: int) -> bytes:
        if i in self.thumbs:
            self.thumbs.move_to_end(i)
            return self.thumbs[i]
        try:
            im = load_image(self.file_of(i), min_size=THUMB)
        except ImageError as e:
            raise NotFound(f"image {i} is no longer readable: {e.reason}") from None
        except OSError:  # its file deleted under this read
            raise NotFound(f"image {i} is no longer readable") from None
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
                    raise Unavailable(f"the index is being written by another process; try again later ({e})") from None
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
                    raise NotFound(f"no image with id {i} in this index")
            finally:
                w.close()
            self.store.refresh()
        self.thumbs.pop(i, None)
        if Path(path).parent == (self.index / UPLOADS).resolve():  # never the user's own photos
            Path(path).unlink(missing_ok=True)


def decoded_pixels(w: int, h: int, fmt: str, size: int) -> int:
    """Pixels that decoding a w×h image of format ``fmt`` produces when the network needs ``size``
    a side: a JPEG shrinks by up to 8 while its shorter side stays ≥ size (libjpeg's scaling)."""
    if fmt != "JPEG":
        return w * h
    scale = 1
    while scale < 8 and min(w, h) // (scale * 2) >= size:
        scale *= 2
    return (w // scale) * (h // scale)


__all__ = ["Invalid", "MicroBatcher", "NotFound", "Service", "ServiceError", "TooLarge", "Unavailable", "Unsupported",
           "decoded_pixels"]
