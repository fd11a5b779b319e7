"""The index on disk: a folder of immutable segments and a manifest, one writer, many readers.

``segments.py`` names and writes the files of the folder; this module is ``IndexStore``, the
reader and single writer over them: the current generation, rows by id, the search structures
(exact, or IVF-PQ kept in step with every commit) and the writes (add, remove, compact). What to
merge is ``merge.py``'s choice, bringing a folder in line is ``sync.py``'s, and ranking with
verification is ``search.py``'s.

Adding photos writes one new segment and a new manifest: a checkpoint costs O(new), not O(n).
Deletes are tombstones; ``compact`` merges small segments and drops dead rows. A reader pins the
generation it opened (its segments stay mapped even if a compaction deletes them) until
``refresh()``. Crash safety is the manifest rename: what it names is complete on disk, and what it
does not name is garbage the next writer deletes.

Why one class of some 700 lines: a generation's state (segments, liveness, offsets, the pair
overlay, the IVF-PQ and the exact index) is swapped whole under one lock by ``_install``, and the
writer's commits extend it in place (O(new) per commit); readers and the writer share that state, so
it stays in one class rather than being spread over modules that would each reach into it. What
does not touch that state lives apart: the pairs' arithmetic in ``pairs.py``, the IVF-PQ's upkeep in
``ivf.py``, the files in ``segments.py``, the merge policy in ``merge.py``.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from . import legacy
from . import segments as S
from . import ivf as IVF
from .ann import ANN_THRESHOLD, ExactIndex
from .merge import COMPACT_TARGET, needs_compaction, plan_merges
from ..storage import FileFormatError
from ..local_codec import COMPACT_KEYS, INT8, LocalCodec, is_compact
from ..verify import COARSE, LOCAL_K, LocalCodes, pad_join
from ..pairs import AUGMENT, PairOverlay, check_augment, edges_of, mine_additions, pairs_of, partners_from, unique_pairs

MODEL = S.MODEL
MAX_SHARDS = 1024
RETRAIN_GROWTH = 4.0  # the IVF-PQ is retrained once the collection is this many times what it was trained on


def _live_mask(ids: np.ndarray, dead: np.ndarray) -> np.ndarray | None:
    """Which rows of a segment (ids sorted) are not tombstoned; None when all are. Only the
    tombstones within the segment's id range are looked at, so a delete costs O(its segments)."""
    if not len(dead) or not len(ids):
        return None
    lo, hi = np.searchsorted(dead, int(ids[0]), "left"), np.searchsorted(dead, int(ids[-1]), "right")
    if lo == hi:
        return None
    mask = ~np.isin(ids, dead[lo:hi])
    return None if mask.all() else mask


def _live_rows(seg, live: np.ndarray | None) -> int:
    """Live rows of a segment, given its liveness mask (None: all)."""
    return len(seg) if live is None else int(live.sum())


def shard_of(entry: dict) -> int:
    """The shard of a manifest's segment entry (0 for an index written before shards)."""
    return int(entry.get("shard", 0))


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class IndexStore:
    """A segment store of descriptors; see the module docstring for the files.

    ``IndexStore.open(path)`` reads (any number of processes); ``IndexStore.create(...)`` or
    ``open(path, write=True)`` takes the writer lock (one process). Ids are int64, never reused;
    results are ``(distances, ids)``, squared L2, nearest first.
    """

    def __init__(self, path: Path, lock: S.WriterLock | None = None, runtime=None, shard: int | None = None):
        self.path = Path(path)
        self._lock = lock
        # a shard's view (``open(shard=s)``): searches and counts the segments of shard s only, while
        # ids, pairs and rows by id stay the whole index's (the rows of its photos' partners in other
        # shards are read where they lie, so its photos are searched as the whole index searches them)
        self.shard = shard
        self._own: list[bool] = []  # per segment: searched by this view
        self._runtime = runtime  # how its model runs (``runtime.Runtime``; None: the defaults)
        self._mutex = threading.RLock()  # search structures vs. refresh/commit in this process
        self._seg_cache: dict[str, S.Segment] = {}
        self._codes_cache: dict[tuple[str, str], np.ndarray] = {}
        self._live_cache: dict = {}
        self._model = None
        self.m: dict = {}
        self._segs: list[S.Segment] = []
        self._ivf = self._exact = self._exact_pos = self._trained = None
        self._n_dead = 0
        self._pairs_cache: dict[str, np.ndarray] = {}
        self._edges_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._aug: PairOverlay | None = None  # the live verified pairs, by position, where the store augments

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path, write: bool = False, wait: bool = False, runtime=None, shard: int | None = None) -> "IndexStore":
        """``runtime``: how the store's model runs when it encodes (``runtime.Runtime``); ``shard``:
        a read-only view that searches one shard's segments (``shards``)."""
        path = Path(path)
        if shard is not None and write:
            raise ValueError("a shard's view is read-only: the index has one writer")
        if path.is_file():
            if write:
                raise FileFormatError(f"{path}: a single-file index (convlad ≤ 0.1) opens read-only; "
                                      f"`convlad index` converts it")
            return _open_legacy(path)
        if not path.is_dir():
            raise FileFormatError(f"{path}: no such index")
        lock = S.WriterLock(path, wait) if write else None
        try:
            store = cls(path, lock, runtime, shard)
            store._load_current()
            if shard is not None and not 0 <= shard < store.shards:
                raise FileFormatError(f"{path}: has {store.shards} shard(s); there is no shard {shard}")
            if write:
                S.collect_garbage(path, store.m)
            return store
        except BaseException:
            if lock:
                lock.release()
            raise

    @classmethod
    def create(cls, path, model=None, root=None, dim: int | None = None, ann: str | None = None,
               wait: bool = False, report=print, local: int | None = None,
               augment: str | None = None, runtime=None, shards: int | None = None,
               second_look: bool | None = None) -> "IndexStore":
        """Open ``path`` for writing, creating it if needed. ``model``: a fitted ConvVLAD (or None for
        a store of descriptors made elsewhere, with ``dim``); ``root``: the folder indexed (paths are
        kept relative to it); ``ann``: auto, exact or ivfpq (None keeps the store's, auto if new);
        ``local``: local features kept per image for re-ranking (``verify.LOCAL_K`` when None and
        the store is new; 0 keeps none); ``augment``: "verified" mines each added photo's pairs
        and searches the database side augmented over them, "none" does not (``pairs.AUGMENT``
        when None and the store is new and keeps local features). These settings are the store's:
        they apply to later additions. ``runtime``: how the store's model runs (as ``open``); ``shards``:
        how many shards its segments are spread over (1 when None and the store is new; another number
        re-spreads an existing store's segments, ``reshard``); ``second_look``: each photo added
        without a sure pair is looked at again with ASIFT against its nearest (``second_look.py``,
        about 4.5 s a lonely photo on 2 cores; False when None and the store is new)."""
        path = Path(path)
        if ann is not None and ann not in ("auto", "exact", "ivfpq"):
            raise ValueError(f"index type must be auto, exact or ivfpq, not {ann!r}")
        check_augment(augment)
        if shards is not None and not 1 <= int(shards) <= MAX_SHARDS:
            raise ValueError(f"shards must be 1 to {MAX_SHARDS}, not {shards}")
        root = str(Path(root).resolve()) if root is not None else None
        fingerprint = model.fingerprint() if model is not None else None
        if path.is_file() or _interrupted_conversion(path):
            _convert_legacy(path, report)
        if path.exists() and not path.is_dir():
            raise FileFormatError(f"{path}: exists and is not an index folder")
        if path.is_dir() and not (path / S.MANIFEST).exists() and not (path / S.LOCK).exists() \
                and any(path.iterdir()):
            raise FileFormatError(f"{path}: a folder that is not an index; choose another --out")
        path.mkdir(parents=True, exist_ok=True)
        lock = S.WriterLock(path, wait)
        try:
            if not (path / S.MANIFEST).exists():
                keeps = int(LOCAL_K if local is None else local) if model is not None else 0
                if model is not None:
                    model.save(path / MODEL)
                    dim = model.dim
                if not dim:
                    raise ValueError("a new store needs a model or a dimension")
                S.write_manifest(path, {
                    "format": S.FORMAT, "version": S.FORMAT_VERSION, "generation": 0, "dim": int(dim),
                    "root": root, "model": MODEL if model is not None else None, "model_fingerprint": fingerprint,
                    "ann": ann or "auto", "next_id": 0, "segments": [], "tombstones": None, "n_dead": 0,
                    "ivf": None, "local": keeps, "augment": augment or (AUGMENT if keeps else "none"),
                    "shards": int(shards or 1), "second_look": bool(second_look)})
            store = cls(path, lock, runtime)
            store._load_current()
            m = store.m
            if root is not None and m["root"] != root:
                raise FileFormatError(f"{path}: index of another folder ({m['root']}); choose another --out")
            if fingerprint is not None and m["model_fingerprint"] != fingerprint:
                raise FileFormatError(f"{path}: index built with another model; choose another --out")
            S.collect_garbage(path, m)
            if ann is not None and ann != m["ann"]:
                store._commit(dict(m, ann=ann), new_segments={}, retrain=True)
            if local is not None and local != store.local_k and m.get("model"):
                kept = {a.shape[1] for seg in store._segs for k, a in seg.extra.items() if k == "local-codes"}
                if local and kept - {local}:  # one layout per store: segments merge and gather row for row
                    raise FileFormatError(f"{path}: its images keep {kept.pop()} local features each, not {local}; "
                                          "use that number, or 0 to keep none for new images")
                store._commit(dict(store.m, local=int(local)), new_segments={})  # for images added from now on
            if augment == "verified" and not (store.m.get("model") and store.local_k):
                raise ValueError(f"{path}: augment=verified mines pairs by verifying local features: it needs a "
                                 "model and local features (--local-features above 0)")
            if augment is not None and augment != store.m.get("augment", "none"):
                store._commit(dict(store.m, augment=augment), new_segments={})  # for images added from now on
            if second_look and not store.augments:
                raise ValueError(f"{path}: a second look is for the photos mining leaves without a sure pair: it "
                                 "needs a store that mines them (augment=verified)")
            if second_look is not None and bool(second_look) != store.looks_again:
                store._commit(dict(store.m, second_look=bool(second_look)), new_segments={})  # from now on
            if shards is not None and shards != store.shards:
                store.reshard(int(shards))
            return store
        except BaseException:
            lock.release()
            raise

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the current generation ------------------------------------------------------------------
    def _load_current(self) -> None:
        # a compaction may delete the segments of the manifest just read before they are mapped:
        # read the newer manifest and try again
        for attempt in range(50):
            m = S.read_manifest(self.path)
            try:
                self._install(m)
                return
            except FileNotFoundError:
                if attempt == 49:
                    raise
                time.sleep(0.01 * (attempt + 1))

    def _install(self, m: dict) -> None:
        segs = []
        for s in m["segments"]:
            seg = self._seg_cache.get(s["name"]) or S.read_segment(self.path, s["name"])
            segs.append(seg)
        codes = IVF.load_codes(self.path, m, self._codes_cache)
        if m.get("ivf"):
            same = self.m.get("ivf") == m["ivf"] and self._trained is not None
            trained = self._trained if same else IVF.read_trained(self.path, m["ivf"])
        dead = np.load(self.path / m["tombstones"]) if m.get("tombstones") else np.zeros(0, np.int64)
        # liveness per segment, recomputed only for new segments or new tombstones (O(new) commits)
        live = []
        for s in segs:
            key = (m.get("tombstones"), s.name)
            live.append(self._live_cache[key] if key in self._live_cache else _live_mask(s.ids, dead))
        own = [self.shard is None or shard_of(e) == self.shard for e in m["segments"]]
        with self._mutex:
            old_names = [s.name for s in self._segs]
            # ... and each kept segment still in the shards it was in (a reshard rebuilds a shard's search)
            appended = bool(self.m) and [s.name for s in segs[:len(old_names)]] == old_names \
                and own[:len(old_names)] == self._own
            same_ivf = bool(self.m) and m.get("ivf") == self.m.get("ivf")
            same_dead = bool(self.m) and m.get("tombstones") == self.m.get("tombstones")
            self.m, self._segs, self._dead, self._live, self._own = m, segs, dead, live, own
            self._n_own = sum(_live_rows(s, lv) for s, lv, o in zip(segs, live, own) if o)
            self._seg_cache = {s.name: s for s in segs}
            self._live_cache = {(m.get("tombstones"), s.name): lv for s, lv in zip(segs, live)}
            self._codes_cache = codes
            self._trained = trained if m.get("ivf") else None
            self._offsets = np.concatenate([[0], np.cumsum([len(s) for s in segs])]).astype(np.int64)
            self._n_dead = int(sum((~lv).sum() for lv in live if lv is not None))
            self._pairs_cache = {s.name: self._segment_pairs(s) for s in segs}
            self._edges_cache = {s.name: self._edges_cache[s.name] for s in segs if s.name in self._edges_cache}
            # appended with the same tombstones, the older pairs keep their positions: only the
            # new segments' are looked up (a commit costs O(new) here too)
            grown = appended and same_dead
            kept = len(self._aug) if grown and self._aug is not None else 0  # pairs of the generation before
            self._aug = self._overlay(segs[len(old_names):] if grown else segs, self._aug if grown else None)
            # the IVF-PQ holds every row, dead ones too (they are filtered from its shortlist), so
            # deletes leave it as it is and appends extend it; the exact index holds live rows only
            if not (appended and same_ivf):
                self._ivf = None
            elif self._ivf is not None:
                self._add_codes(len(old_names))
            if not (appended and same_dead):
                self._exact = self._exact_pos = None
            elif self._exact is not None:
                new = np.concatenate([self._offsets[i] + self._live_positions(i)
                                      for i in range(len(old_names), len(segs)) if own[i]] or [np.zeros(0, np.int64)])
                X = np.concatenate([self._exact.X.numpy(), self._search_rows(new)])
                self._exact_pos = np.concatenate([self._exact_pos, new])
                # older photos the new ones verified with (the overlay's new pairs): their rows changed
                p = self._aug.pairs[kept:].ravel() if self._aug is not None else np.zeros(0, np.int64)
                changed = np.unique(p[p < self._offsets[len(old_names)]])
                changed = changed[np.isin(changed, self._exact_pos)]  # a shard's view: its own rows only
                if len(changed):
                    X[np.searchsorted(self._exact_pos, changed)] = self._search_rows(changed)
                self._exact = ExactIndex(X)

    def refresh(self) -> bool:
        """Move to the newest committed generation; True if it changed."""
        if self.path.is_file():  # a single-file index of convlad 0.1 never changes
            return False
        if S.read_manifest(self.path)["generation"] == self.generation:
            return False
        self._load_current()
        return True

    @property
    def generation(self) -> int:
        return self.m["generation"]

    @property
    def dim(self) -> int:
        return self.m["dim"]

    @property
    def root(self) -> str | None:
        return self.m.get("root")

    def __len__(self) -> int:
        """Live images: the whole index's, or a shard view's own."""
        return int(self._offsets[-1]) - self.n_dead if self.shard is None else self._n_own

    @property
    def shards(self) -> int:
        return int(self.m.get("shards") or 1)

    def positions(self, ids) -> np.ndarray:
        """Where each of ``ids`` lies in this generation's store order (-1 where not live): the order
        the whole index breaks ties of distance by, which a sharded search merges by too."""
        return self._positions(ids)

    def shards_of(self, ids) -> np.ndarray:
        """The shard holding each of ``ids`` (-1 where not live)."""
        with self._mutex:
            pos = self._positions(ids)
            out = np.full(len(pos), -1, np.int64)
            seg, _ = self._locate(pos[pos >= 0])
            of = np.array([shard_of(e) for e in self.m.get("segments") or [{}] * len(self._segs)] or [0], np.int64)
            out[pos >= 0] = of[seg]
        return out

    @property
    def n_dead(self) -> int:
        return self._n_dead

    @property
    def model(self):
        if self._model is None:
            if not self.m.get("model"):
                raise FileFormatError(f"{self.path}: a store of descriptors without a model cannot encode images")
            from ..pipeline import ConvVLAD

            self._model = ConvVLAD.load(self.path / self.m["model"], self._runtime)
        return self._model

    # -- reading rows ----------------------------------------------------------------------------
    def _locate(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seg = np.searchsorted(self._offsets, pos, side="right") - 1
        return seg, pos - self._offsets[seg]

    def _rows(self, pos: np.ndarray) -> np.ndarray:
        pos = np.asarray(pos, np.int64)
        out = np.empty((len(pos), self.dim), np.float32)
        seg, row = self._locate(pos)
        for s in np.unique(seg):
            sel = seg == s
            order = np.argsort(row[sel], kind="stable")
            got = self._segs[s].rows(row[sel][order])
            out[np.flatnonzero(sel)[order]] = got
        return out

    # -- the verified pairs (``pairs.py``) ---------------------------------------------------------------
    def _segment_pairs(self, seg) -> np.ndarray:
        """The pairs (ids) that a segment's photos verified into when they were added."""
        got = self._pairs_cache.get(seg.name)
        if got is None:
            P = seg.extra.get(S.PARTNERS)
            got = pairs_of(np.asarray(seg.ids), np.asarray(P)) if P is not None else np.zeros((0, 2), np.int64)
        return got

    def _overlay(self, segs, previous: PairOverlay | None = None) -> PairOverlay | None:
        """The live pairs of ``segs`` added to ``previous`` (the overlay of the generation this one
        appends to), or of all segments (``previous`` None); a pair with a deleted photo drops out."""
        got = [self._pairs_cache[s.name] for s in segs]
        P = np.concatenate([p for p in got if len(p)] or [np.zeros((0, 2), np.int64)])
        pos = self._positions(P.ravel()).reshape(-1, 2)
        return PairOverlay.build(pos) if previous is None else previous.extended(pos)

    def _search_rows(self, pos: np.ndarray) -> np.ndarray:
        """The rows as they are searched: each photo's descriptor augmented over its live pairs,
        where the store has any (``_rows`` where not)."""
        pos = np.asarray(pos, np.int64)
        X = self._rows(pos)
        if self._aug is None or not len(pos):
            return X
        return self._aug.augmented(pos, X, self._rows)

    def rows_searched(self, ids) -> np.ndarray:
        """The rows of ``ids`` as a search compares queries with them: augmented over their live
        pairs where the store augments, else their descriptors (``vectors``)."""
        with self._mutex:
            pos = self._positions(ids)
            if (pos < 0).any():
                raise KeyError(f"no image with id {int(np.asarray(ids).ravel()[pos < 0][0])} in {self.path}")
            return self._search_rows(pos)

    def partners(self, ids) -> np.ndarray:
        """(id, partner) for each live verified pair of each live id of ``ids``, in the order of
        ``ids``: (m, 2) int64 (``search.linked``); empty where the store does not augment."""
        with self._mutex:
            if self._aug is None:
                return np.zeros((0, 2), np.int64)
            ids = np.asarray(ids, np.int64).ravel()
            other, n = self._aug.partners(self._positions(ids))
            if not n.sum():
                return np.zeros((0, 2), np.int64)
            return np.stack([np.repeat(ids, n), self._ids_at(other)], 1)

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live pair of photos that one of them was verified against when it was added (its
        ``pairs.NEIGHBOURS`` nearest then), with their inliers: (pairs (m, 2) ids a < b, sorted;
        inliers (m,) int32, the more of the two directions), pairs with no inlier left out. The
        evidence ``groups.links`` builds the groups on; ``pairs`` are those at the sure level. A
        segment written before the candidates were kept gives its verified pairs at the sure level
        (their inliers were not kept). Empty where the store does not mine."""
        with self._mutex:
            return self._live_edges([self._segment_edges(s) for s in self._segs])

    def _live_edges(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Segments' (pairs, inliers) joined: those of live photos only, each pair once with the more
        inliers (``edges_of``). Under ``_mutex``."""
        P = np.concatenate([p for p, _ in parts] + [np.zeros((0, 2), np.int64)])
        w = np.concatenate([w for _, w in parts] + [np.zeros(0, np.int32)])
        live = (self._positions(P.ravel()).reshape(-1, 2) >= 0).all(1)
        ends = P[live]
        return edges_of(ends[:, 0], ends[:, 1:], w[live][:, None])

    def _segment_edges(self, seg) -> tuple[np.ndarray, np.ndarray]:
        got = self._edges_cache.get(seg.name)
        if got is None:
            # the verified pairs at the sure level, with the inliers of all candidates where kept (a
            # segment merged from older ones keeps -1 candidates for their rows, and their pairs)
            P = self._segment_pairs(seg)
            sure = self.model.pair_verifier().sure if self.model is not None else 1
            a, b, w = P[:, 0], P[:, 1], np.full(len(P), sure, np.int32)
            C = seg.extra.get(S.CANDIDATES)
            if C is not None:
                C = np.asarray(C)
                a = np.concatenate([a, np.repeat(np.asarray(seg.ids), C.shape[1])])
                b = np.concatenate([b, C.ravel()])
                w = np.concatenate([w, np.asarray(seg.extra[S.CANDIDATE_INLIERS]).ravel()])
            got = self._edges_cache[seg.name] = edges_of(a, b[:, None], w[:, None])
        return got

    def pairs(self) -> np.ndarray:
        """Every live verified pair of this generation, as ids (a, b) with a < b: (m, 2) int64,
        sorted; empty where the store does not augment. The graph the search links through."""
        with self._mutex:
            if self._aug is None:
                return np.zeros((0, 2), np.int64)
            P = self._ids_at(self._aug.pairs.ravel()).reshape(-1, 2)
        return unique_pairs(np.sort(P, 1))

    def _positions(self, ids) -> np.ndarray:
        """Positions of live ``ids`` in this generation (-1 where unknown or deleted)."""
        ids = np.asarray(ids, np.int64).ravel()
        out = np.full(len(ids), -1, np.int64)
        with self._mutex:  # a refresh in another thread swaps the generation whole
            # segments hold increasing, disjoint runs of ids (appends, and merges of neighbours):
            # each id is looked up in its own segment only, O(m log n) for the pairs of millions
            firsts = [int(s.ids[0]) for s in self._segs if len(s)] if len(ids) > 1024 else []
            lasts = [int(s.ids[-1]) for s in self._segs if len(s)] if firsts else []
            if firsts and all(a > b for a, b in zip(firsts[1:], lasts)):
                which = np.flatnonzero([len(s) > 0 for s in self._segs])
                at = np.searchsorted(np.array(firsts, np.int64), ids, "right") - 1
                for k in np.unique(at[at >= 0]):
                    sel = np.flatnonzero(at == k)
                    out[sel] = self._positions_in(int(which[k]), ids[sel])
                return out
            for i, s in enumerate(self._segs):
                if len(s):
                    hit = self._positions_in(i, ids)
                    out[hit >= 0] = hit[hit >= 0]
        return out

    def _positions_in(self, i: int, ids: np.ndarray) -> np.ndarray:
        """Positions of the live ``ids`` found in segment ``i`` (-1 for the others)."""
        s = self._segs[i]
        out = np.full(len(ids), -1, np.int64)
        j = np.searchsorted(s.ids, ids)
        hit = (j < len(s)) & (s.ids[np.minimum(j, len(s) - 1)] == ids)
        if self._live[i] is not None:
            hit &= self._live[i][np.minimum(j, len(s) - 1)]
        out[hit] = self._offsets[i] + j[hit]
        return out

    def vectors(self, ids) -> np.ndarray:
        with self._mutex:
            pos = self._positions(ids)
            if (pos < 0).any():
                raise KeyError(f"no image with id {int(np.asarray(ids).ravel()[pos < 0][0])} in {self.path}")
            return self._rows(pos)

    def path_of(self, id_: int) -> str:
        """The indexed file of ``id_``: absolute when the store knows its folder."""
        return self.paths_of([id_])[0]

    def paths_of(self, ids) -> list[str]:
        """The indexed files of ``ids``, as ``path_of`` gives each (a KeyError names one not live)."""
        with self._mutex:
            pos = self._positions(ids)
            if (pos < 0).any():
                raise KeyError(f"no image with id {int(np.asarray(ids).ravel()[pos < 0][0])} in {self.path}")
            seg, row = self._locate(pos)
            got = [self._segs[s].path(r) for s, r in zip(seg.tolist(), row.tolist())]
        return [os.path.join(self.root, p) for p in got] if self.root else got

    def items(self):
        """(id, stored path, (size, mtime_ns)) of every live image, in store order."""
        with self._mutex:
            segs, lives = self._segs, self._live
        for s, live in zip(segs, lives):
            paths = s.paths()
            ids, stamps = np.asarray(s.ids), np.asarray(s.stamps)
            for r in range(len(s)):
                if live is None or live[r]:
                    yield int(ids[r]), paths[r], (int(stamps[r, 0]), int(stamps[r, 1]))

    def segments(self) -> list[dict]:
        """This generation's segments, in store order: name, rows (dead ones included), live rows,
        the shard that holds it, and the arrays kept beside the descriptors (``local-codes``,
        ``partners``, ...)."""
        with self._mutex:
            segs, lives, entries = self._segs, self._live, self.m.get("segments") or [{}] * len(self._segs)
        return [{"name": s.name, "rows": len(s), "live": _live_rows(s, lv), "shard": shard_of(e),
                 "arrays": sorted(s.extra)} for s, lv, e in zip(segs, lives, entries)]

    # -- searching -------------------------------------------------------------------------------
    def _uses_ivf(self) -> bool:
        return bool(self.m.get("ivf")) and self.m.get("ann") != "exact"

    def _live_positions(self, i: int) -> np.ndarray:
        rows = np.arange(len(self._segs[i]), dtype=np.int64)
        if self._live[i] is not None:
            rows = rows[self._live[i]]
        return rows

    def _add_codes(self, first: int) -> None:
        d = self.m["ivf"]["dir"]
        for i in range(first, len(self._segs)):
            if self._own[i]:
                IVF.add_codes(self._ivf, self._codes_cache[(d, self._segs[i].name)], int(self._offsets[i]))

    def _is_live(self, pos: np.ndarray) -> np.ndarray:
        if not self._n_dead:
            return np.ones(len(pos), bool)
        seg, row = self._locate(pos)
        return np.array([self._live[s] is None or bool(self._live[s][r]) for s, r in zip(seg, row)], bool)

    def _build_search(self) -> None:
        if self._uses_ivf():
            self._ivf = IVF.empty_copy(self._trained)
            self._add_codes(0)
        else:
            pos = np.concatenate([self._offsets[i] + self._live_positions(i) for i in range(len(self._segs))
                                  if self._own[i]] or [np.zeros(0, np.int64)])
            self._exact, self._exact_pos = ExactIndex(self._search_rows(pos)), pos

    def set_nprobe(self, nprobe: int) -> None:
        with self._mutex:
            if self._ivf is None and self._uses_ivf():
                self._build_search()
            if self._ivf is not None:
                IVF.set_nprobe(self._ivf, nprobe)

    def search(self, Q: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids), each (nq, k'), k' = min(k, images); squared L2, nearest first. Through the
        IVF-PQ when the store has one (its shortlist re-ranked with exact distances), else exact."""
        Q = np.ascontiguousarray(np.atleast_2d(Q), dtype=np.float32)
        if Q.shape[1] != self.dim:
            raise ValueError(f"queries of dimension {Q.shape[1]}, index of dimension {self.dim}")
        with self._mutex:
            k = min(k, len(self))
            if k <= 0:
                return np.zeros((len(Q), 0), np.float32), np.zeros((len(Q), 0), np.int64)
            if (self._ivf if self._uses_ivf() else self._exact) is None:
                self._build_search()
            if self._uses_ivf():
                D, P = IVF.search(self._ivf, Q, k, int(self._offsets[-1]), self._n_dead, self._is_live,
                                  self._search_rows)
            else:
                D, J = self._exact.search(Q, k)
                P = self._exact_pos[J]
            return D, self._ids_at(P)

    def _ids_at(self, P: np.ndarray) -> np.ndarray:
        out = np.full(P.shape, -1, np.int64)
        ok = P >= 0
        seg, row = self._locate(P[ok])
        out[ok] = [self._segs[s].ids[r] for s, r in zip(seg, row)]
        return out

    def local_codes(self, ids, coarse: bool = False) -> tuple[LocalCodes, np.ndarray]:
        """The stored local features of ``ids`` (zero where none) and a mask of the ids that have them;
        ``coarse``: with the smaller scale's (``LocalCodes.coarse``; zero rows for photos stored
        without them, None where none of them has any), which mining verifies against."""
        pos = self._positions(ids)
        have = np.zeros(len(pos), bool)
        found = np.flatnonzero(pos >= 0)
        seg, row = self._locate(pos[found])
        parts, compact = [], {}
        for s in np.unique(seg):
            extra = self._segs[s].extra
            if is_compact(extra):  # gathered, then decoded at once: a shortlist spans many segments
                keys = COMPACT_KEYS + tuple(COARSE + k for k in COMPACT_KEYS if coarse and COARSE + k in extra)
                compact.setdefault(keys, []).append((found[seg == s], {k: extra[k][row[seg == s]] for k in keys}))
            else:  # an int8 layout (every index made before compact codecs) reads as it is
                parts.append((found[seg == s], INT8.decode(extra, row[seg == s], coarse)))
        for group in compact.values():
            parts.append((np.concatenate([sel for sel, _ in group]),
                          self.local_codec.decode({k: pad_join([a[k] for _, a in group]) for k in group[0][1]})))
        parts = [(sel, got) for sel, got in parts if got is not None]
        for sel, _ in parts:
            have[sel] = True
        out = LocalCodes.gathered(len(pos), parts)
        if out is None:
            out = LocalCodes(np.zeros((len(pos), 1, 1), np.int8), np.zeros((len(pos), 1, 2), np.uint8),
                             np.zeros(len(pos), np.uint16))
        elif coarse:
            out.coarse = LocalCodes.gathered(len(pos), [(sel, got.coarse) for sel, got in parts
                                                        if got.coarse is not None])
        return out, have

    @property
    def local_codec(self) -> LocalCodec:
        """How this store keeps the local features of photos it adds: its model's codec (int8 for a
        store without a model)."""
        return self.model.local_codec_ if self.m.get("model") else INT8

    @property
    def local_k(self) -> int:
        """Local features kept per image added from now on (0: none)."""
        return int(self.m.get("local") or 0)

    # -- writing ---------------------------------------------------------------------------------
    def _need_writer(self) -> None:
        if self._lock is None:
            raise PermissionError(f"{self.path}: opened for reading; open it with write=True to change it")

    def _commit(self, m: dict, new_segments: dict[str, np.ndarray], retrain: bool = False) -> None:
        """Bring the IVF-PQ in step with ``m``, then write ``m`` as the next generation."""
        m = dict(m, generation=self.generation + 1)
        live = sum(s["rows"] for s in m["segments"]) - m["n_dead"]
        wants = m["ann"] == "ivfpq" or (m["ann"] == "auto" and live >= ANN_THRESHOLD)
        ivf = m.get("ivf")
        if not wants or live < 2:
            m["ivf"] = None
        elif retrain or ivf is None or live > RETRAIN_GROWTH * ivf["trained_on"]:
            segs = [self._seg_cache.get(s["name"]) or S.read_segment(self.path, s["name"]) for s in m["segments"]]
            dead = np.load(self.path / m["tombstones"]) if m.get("tombstones") else np.zeros(0, np.int64)
            lives = [np.arange(len(s)) if (lv := _live_mask(s.ids, dead)) is None else np.flatnonzero(lv) for s in segs]
            m["ivf"] = IVF.train(self.path, m["dim"], segs, lives)
        else:
            for name, X in new_segments.items():
                IVF.write_codes(self.path, ivf, name, X, self._trained)
        S.write_manifest(self.path, m)
        self._install(m)
        S.collect_garbage(self.path, m)

    def add_vectors(self, X: np.ndarray, paths: list[str], stamps=None, local: LocalCodes | None = None,
                    mined: tuple[np.ndarray, np.ndarray] | None = None, progress: bool = False) -> np.ndarray:
        """Append descriptors (and, for re-ranking, their images' local features) as one new
        segment, committed at once; returns their new ids. A store that augments mines them
        (``pairs.mine_additions``) unless ``mined`` gives what mining them found elsewhere (the
        candidates' ids and their inliers, each (n, width), as ``mine_additions`` returns them: a
        cluster's candidate pass). A store that looks again (``create(second_look=True)``) looks at
        those left without a sure pair (``progress``: with a bar)."""
        self._need_writer()
        X = np.ascontiguousarray(X, dtype=np.float32).reshape(-1, self.dim)
        if len(X) != len(paths):
            raise ValueError(f"{len(X)} descriptors for {len(paths)} paths")
        if not len(X):
            return np.zeros(0, np.int64)
        stamps = np.zeros((len(X), 2), np.int64) if stamps is None else np.asarray(stamps, np.int64)
        m = self.m
        ids = np.arange(m["next_id"], m["next_id"] + len(X), dtype=np.int64)
        extra = self.local_codec.encode(local) if local is not None else None
        if local is not None and self.augments:
            if mined is None:
                cand, inl = self._mine(X, local, ids, self.local_codec.decode(extra, coarse=False))
            else:
                cand, inl = np.asarray(mined[0], np.int64), np.asarray(mined[1], np.int64)
            if cand.shape != inl.shape or len(cand) != len(X):
                raise ValueError(f"mined: candidates {cand.shape} and inliers {inl.shape} for {len(X)} photos")
            partners = partners_from(cand, inl, self.model.pair_verifier().sure)
            extra = dict(extra, **{S.PARTNERS: partners, S.CANDIDATES: cand, S.CANDIDATE_INLIERS: inl.astype(np.int16)})
            if self.looks_again:
                extra.update(self._look(ids, cand, partners, paths, progress))
        # a sharded store spreads one addition over its shards, the emptiest first, in one commit
        parts = np.array_split(np.arange(len(X)), min(self.shards, len(X)))
        entries, new = [], {}
        for part, shard in zip(parts, self._emptiest_shards()):
            sel = slice(int(part[0]), int(part[-1]) + 1)
            name = S.write_segment(self.path, X[sel], ids[sel], stamps[sel], list(paths[sel]),
                                   {k: v[sel] for k, v in extra.items()} if extra is not None else None)
            entries.append({"name": name, "rows": len(part), **({"shard": shard} if self.shards > 1 else {})})
            new[name] = X[sel]
        self._commit(dict(m, next_id=int(ids[-1]) + 1, segments=[*m["segments"], *entries]), new_segments=new)
        if needs_compaction([s["rows"] for s in self.m["segments"]]):
            self.compact()
        return ids

    def reshard(self, n: int) -> None:
        """Spread the segments over ``n`` shards, balanced by live photos (the largest segment to the
        emptiest shard first): one new manifest; no file is moved or re-encoded (every shard shares the
        model, the PCA and the trained IVF-PQ). Shards being served pick it up at their next search."""
        self._need_writer()
        if not 1 <= n <= MAX_SHARDS:
            raise ValueError(f"shards must be 1 to {MAX_SHARDS}, not {n}")
        load = np.zeros(n, np.int64)
        entries = [dict(e) for e in self.m["segments"]]
        lives = [_live_rows(s, lv) for s, lv in zip(self._segs, self._live)]
        for i in sorted(range(len(entries)), key=lambda i: -lives[i]):
            sh = int(np.argmin(load))
            load[sh] += lives[i]
            if n > 1:
                entries[i]["shard"] = sh
            else:
                entries[i].pop("shard", None)
        self._commit(dict(self.m, shards=int(n), segments=entries), new_segments={})

    def _emptiest_shards(self) -> list[int]:
        """The shards, the one with the fewest live photos first (the lower number on ties)."""
        return np.argsort(self._shard_loads()[1], kind="stable").tolist()

    def _shard_loads(self) -> tuple[np.ndarray, np.ndarray]:
        """(segments, live photos) of each shard."""
        segs, photos = np.zeros(self.shards, np.int64), np.zeros(self.shards, np.int64)
        with self._mutex:
            for e, seg, lv in zip(self.m.get("segments") or [], self._segs, self._live):
                segs[shard_of(e)] += 1
                photos[shard_of(e)] += _live_rows(seg, lv)
        return segs, photos

    @property
    def augmented(self) -> bool:
        """Whether this generation searches rows augmented over verified pairs (``search.rerank``)."""
        return self._aug is not None

    @property
    def augments(self) -> bool:
        """Whether images added from now on are mined for verified pairs (``augment="verified"``)."""
        return self.m.get("augment", "none") == "verified" and bool(self.m.get("model")) and self.local_k > 0

    @property
    def looks_again(self) -> bool:
        """Whether images added from now on without a sure pair get a second look (``create(second_look=)``)."""
        return bool(self.m.get("second_look")) and self.augments

    def _look(self, ids: np.ndarray, cand: np.ndarray, partners: np.ndarray, paths: list[str],
              progress: bool = False) -> dict:
        """The second look's extras for photos ``ids`` being added, mined to their candidates ``cand``
        (nearest first) and ``partners``: each photo in no sure pair against its
        ``second_look.NEIGHBOURS`` nearest, their ids and inliers (-1 where not looked)."""
        from .. import progress as P
        from .. import second_look as L

        sure = pairs_of(ids, partners)
        lonely = ~np.isin(ids, sure)
        near = np.full((len(ids), L.NEIGHBOURS), -1, np.int64)
        near[lonely] = cand[lonely, :L.NEIGHBOURS]
        first = int(ids[0])
        new = [os.path.join(self.root, p) if self.root and not os.path.isabs(p) else p for p in paths]

        def path_of(js):
            return [new[j - first] if j >= first else self.path_of(j) for j in js]

        got = np.full(near.shape, -1, np.int16)
        rows = np.flatnonzero(lonely)
        with P.bar(len(rows), "second look (ASIFT)", "img", enabled=progress and len(rows) > 0) as bar:
            inl, overlay = L.look(ids[rows], near[rows], path_of, bar)
        got[rows] = np.where(overlay, 0, inl)  # an overlay's inliers are no evidence of the scene
        return {S.LOOKS: np.where(got >= 0, near, -1), S.LOOK_INLIERS: got}

    def looks(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live pair a second look verified (``create(second_look=True)``), with its ASIFT
        inliers (0 where an overlay's: ``second_look.is_overlay``): (pairs (m, 2) ids a < b, sorted;
        inliers (m,) int32, the more where a pair was looked at from both sides), pairs with no inlier left out. Empty where none was looked at."""
        with self._mutex:
            return self._live_edges([edges_of(np.asarray(seg.ids), np.asarray(seg.extra[S.LOOKS]),
                                              np.asarray(seg.extra[S.LOOK_INLIERS]))
                                     for seg in self._segs if S.LOOKS in seg.extra])

    def _mine(self, X: np.ndarray, local: LocalCodes, ids: np.ndarray, stored: LocalCodes) -> np.ndarray:
        try:
            return mine_additions(self, X, local, ids, self.model.pair_verifier(), stored)
        except ValueError as e:  # local features of another layout
            raise FileFormatError(f"{self.path}: {e}") from None

    def remove(self, ids) -> int:
        """Delete images by id (tombstones); returns how many were live."""
        self._need_writer()
        pos = self._positions(ids)
        gone = np.unique(np.asarray(ids, np.int64).ravel()[pos >= 0])
        if not len(gone):
            return 0
        dead = np.union1d(self._dead, gone)
        name = S.new_tombstones_name()
        S.write_durable(self.path / name, lambda f: S.save_npy(f, dead))
        self._commit(dict(self.m, tombstones=name, n_dead=self.n_dead + len(gone)), new_segments={})
        return len(gone)

    def add(self, paths: list[str], progress: bool = False) -> tuple[np.ndarray, list]:
        """Encode image files with the store's model and add them: (ids, errors)."""
        enc = self.model.transform([str(p) for p in paths], progress=progress, local=self.local_k)
        kept = [self._stored_path(str(paths[i])) for i in enc.indices]
        stamps = [_stamp(str(paths[i])) for i in enc.indices]
        return self.add_vectors(enc.X, kept, stamps, enc.local), enc.errors

    def _stored_path(self, p: str) -> str:
        if self.root:
            a = os.path.abspath(p)
            if a.startswith(self.root.rstrip(os.sep) + os.sep):
                return os.path.relpath(a, self.root)
        return os.path.abspath(p)

    def compact(self, target_rows: int = COMPACT_TARGET, progress: bool = False) -> dict:
        """Merge runs of small segments (and any with dead rows) into segments of up to ``target_rows``
        live rows, dropping the dead ones; one commit. Readers keep searching throughout."""
        from .. import progress as P

        self._need_writer()
        m = self.m
        # each shard's segments merge among themselves: a segment never moves to another shard
        rows, lives = [len(seg) for seg in self._segs], [len(self._live_positions(i)) for i in range(len(self._segs))]
        groups = []
        for sh in sorted({shard_of(e) for e in m["segments"]}):
            at = [i for i, e in enumerate(m["segments"]) if shard_of(e) == sh]
            groups += [[at[j] for j in g] for g in plan_merges([rows[i] for i in at], [lives[i] for i in at], target_rows)]
        before = len(self._segs)
        if not groups:
            return {"segments_before": before, "segments_after": before, "dropped": 0, "merged": 0}
        ivf = m.get("ivf")
        replaced, new_entries, dropped = {}, {}, 0
        bar = P.bar(sum(len(self._segs[i]) for g in groups for i in g), "compacting", "row", enabled=progress)
        try:
            for g in groups:
                rows = [self._live_positions(i) for i in g]
                X = np.concatenate([np.asarray(self._segs[i].X[r]) for i, r in zip(g, rows)])
                ids = np.concatenate([np.asarray(self._segs[i].ids[r]) for i, r in zip(g, rows)])
                stamps = np.concatenate([np.asarray(self._segs[i].stamps[r]) for i, r in zip(g, rows)])
                paths = [p for i, r in zip(g, rows) for p in np.array(self._segs[i].paths(), dtype=object)[r]]
                dropped += sum(len(self._segs[i]) for i in g) - len(ids)
                if not len(ids):  # nothing left alive: the segments just go
                    replaced.update({i: None for i in g})
                    bar.update(sum(len(self._segs[i]) for i in g))
                    continue
                order = np.argsort(ids, kind="stable")
                extra = S.merged_extras([self._segs[i] for i in g], rows, order)
                name = S.write_segment(self.path, X[order], ids[order], stamps[order], [paths[j] for j in order], extra)
                S.crash_point("compact-segment")
                if ivf:
                    codes = np.concatenate([np.asarray(self._codes_cache[(ivf["dir"], self._segs[i].name)][r])
                                            for i, r in zip(g, rows)])[order]
                    S.write_durable(S.codes_file(self.path, ivf["dir"], name), lambda f, c=codes: S.save_npy(f, c))
                replaced.update({i: name for i in g})
                new_entries[name] = {"name": name, "rows": len(ids),
                                     **({"shard": shard_of(m["segments"][g[0]])} if "shard" in m["segments"][g[0]] else {})}
                bar.update(sum(len(self._segs[i]) for i in g))
        finally:
            bar.close()
        segments, seen = [], set()
        for i, s in enumerate(m["segments"]):
            if i in replaced:
                if replaced[i] is not None and replaced[i] not in seen:
                    segments.append(new_entries[replaced[i]])
                    seen.add(replaced[i])
            else:
                segments.append(s)
        gone = np.concatenate([np.asarray(self._segs[i].ids) for g in groups for i in g])
        dead = np.setdiff1d(self._dead, gone)
        tomb = None
        if len(dead):
            tomb = S.new_tombstones_name()
            S.write_durable(self.path / tomb, lambda f: S.save_npy(f, dead))
        self._commit(dict(m, segments=segments, tombstones=tomb, n_dead=self.n_dead - dropped),
                     new_segments={})  # their codes are copied above
        return {"segments_before": before, "segments_after": len(segments), "dropped": dropped,
                "merged": sum(len(g) for g in groups)}

    # -- information -----------------------------------------------------------------------------
    def info(self) -> dict:
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()) if self.path.is_dir() \
            else self.path.stat().st_size
        ivf = self.m.get("ivf")
        model = None
        if self.m.get("model"):
            model = self.model.describe()
        shards = None
        if self.shards > 1:
            segs, photos = self._shard_loads()
            shards = [{"shard": sh, "segments": int(a), "images": int(b)} for sh, (a, b) in enumerate(zip(segs, photos))]
        local = None
        rows = sum(len(s) for s in self._segs)
        if self.local_k and rows:  # what the segments hold a photo, whatever layout wrote them
            held = sum(a.nbytes for s in self._segs for k, a in s.extra.items()
                       if k.startswith(("local-", COARSE + "local-")))
            coarse = max((a.shape[1] for s in self._segs for k, a in s.extra.items()
                          if k in (COARSE + "local-codes", COARSE + "local-quantised")), default=0)
            local = {"features": self.local_k, "coarse": coarse, "codec": self.local_codec.name,
                     "bytes_per_image": round(held / rows)}
        return {"index": str(self.path), "model": model, "folder": self.root, "images": len(self), "shards": shards,
                "local": local,
                "dead": self.n_dead, "segments": len(self._segs), "generation": self.generation,
                "dim": self.dim, "augment": self.m.get("augment", "none"), "second_look": self.looks_again,
                "pairs": 0 if self._aug is None else len(self._aug),
                "search": f"IVF-PQ {ivf['factory']} (trained on {ivf['trained_on']})" if ivf and self._uses_ivf()
                else "exact", "bytes": size}


# -- single-file indexes of convlad 0.1 (``legacy.py`` reads them) -----------------------------------
def _open_legacy(path: Path) -> IndexStore:
    """A single-file index, read-only and in memory."""
    store = IndexStore(path)
    store._model, store.m, seg = legacy.read(path)
    store._segs, store._dead, store._live, store._own = [seg], np.zeros(0, np.int64), [None], [True]
    store._offsets = np.array([0, len(seg)], np.int64)
    return store


def _interrupted_conversion(path: Path) -> bool:
    return legacy.interrupted_conversion(path)


def _convert_legacy(path: Path, report) -> None:
    """Rewrite a single-file index as a store at the same path; the old file stays beside it as
    PATH.v1. A crash part-way leaves PATH or PATH.v1 + PATH.converting, which the next run finishes."""
    def build(tmp, meta, model, X, paths, stamps):
        with IndexStore.create(tmp, model=model, root=meta["root"], ann=meta.get("ann", "auto"), report=report) as st:
            st.add_vectors(X, paths, stamps)

    legacy.convert(path, build, report)


__all__ = ["MAX_SHARDS", "IndexStore", "StoreLocked", "shard_of"]
StoreLocked = S.StoreLocked
