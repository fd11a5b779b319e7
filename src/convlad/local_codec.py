"""How an index stores its photos' local features: today's int8 codes, or a compact code for 100 M photos.

``int8`` (the default) keeps each of the 300 features as 80 int8 values and two uint8 cells:
24 602 bytes a photo, 97% of what an index holds (2.5 TB at 100 M photos). A compact codec keeps
each feature as M bytes of a faiss quantiser trained with the model on its training photos' local
features (``rqM``: a ResidualQuantizer of M 8-bit stages, beam search; ``pqM``: a ProductQuantizer
of M 8-bit sub-vectors), and the cells as one bit a cell of the map, the features in raster order
(98 bytes for Lite0's 28×28 map, lossless). ``rq12`` is 3 704 bytes a photo. Matching is
asymmetric (Jégou et al. 2011): the photo being verified, a query or a photo being added, keeps
its exact features; only the stored side is decoded. What each costs is in docs/defaults.md
("Local features for 100 M photos").

Segment arrays (``encode``/``decode``): ``int8``: ``local-codes``, ``local-cells``, ``local-count``
(``LocalCodes.arrays``); compact: ``local-quantised`` (n, k, M) uint8, ``local-cellmap`` (n, B)
uint8, ``local-grid`` (n, 2) uint16 (the rows and columns the cell map spans), ``local-count``.
The strongest ``coarse`` features of the model's smaller scale (``LocalCodes.coarse``, its cells on
the larger map's grid), where it keeps them, go beside them in the same layout, each name prefixed
``coarse-`` (``verify.COARSE``): the side a photo added later verifies its own features against
(``Verifier.inliers_from``), so that a wider view joins a nearer one whichever came first.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import replace

import numpy as np

from .verify import COARSE, LocalCodes

DEFAULT = "int8"
COMPACT_KEYS = ("local-quantised", "local-cellmap", "local-grid", "local-count")
_NAME = re.compile(r"^(rq|pq)([1-9][0-9]?)$")
TRAIN_FEATURES = 100_000  # features a codebook learns from, at most


def check(name: str) -> str:
    """``name`` if it names a codec, else a ValueError that lists them."""
    if name != DEFAULT and not _NAME.match(name or ""):
        raise ValueError(f"local codec {name!r}: expected int8, rqM or pqM (M bytes a feature, 1-99), for example rq12")
    return name


def is_compact(arrays: dict) -> bool:
    return "local-quantised" in arrays


class LocalCodec:
    """Encodes ``LocalCodes`` into a segment's arrays and decodes them back (``fit`` first, for a
    compact codec). ``stored(local)`` is what an index reads back: the features the other side of
    every verification sees."""

    def __init__(self, name: str = DEFAULT, coarse: int = 0):
        self.name = check(name)
        self.coarse = int(coarse)  # the smaller scale's features kept a photo (0: none)
        m = _NAME.match(name)
        self.kind, self.m = (m.group(1), int(m.group(2))) if m else (DEFAULT, 0)
        self.index_ = None
        self._key = None

    @property
    def compact(self) -> bool:
        return self.kind != DEFAULT

    def fit(self, local: LocalCodes, seed: int = 0) -> "LocalCodec":
        """Train the quantiser on ``local``'s valid features (at most ``TRAIN_FEATURES``)."""
        if not self.compact:
            return self
        import faiss

        X = _valid(local)
        d = X.shape[1]
        if len(X) < 256:
            raise ValueError(f"local codec {self.name}: {len(X)} training features, a codebook needs at least 256")
        X = np.ascontiguousarray(X[np.random.default_rng(seed).permutation(len(X))[:TRAIN_FEATURES]])
        # sub-vectors of equal length: features whose depth M does not divide (Lite2's 88 for pq10) are
        # padded with zeros to the next multiple, and the padding dropped again when decoding
        pad = f"Pad{-(-d // self.m) * self.m}," if self.kind == "pq" and d % self.m else ""
        index = faiss.index_factory(d, f"{pad}{self.kind.upper()}{self.m}x8")
        index.train(X)
        self.index_, self._key = index, None
        return self

    @property
    def key(self) -> str:
        """This codec and its codebook: codes made under another key are not this codec's."""
        if self._key is None:
            if not self.compact:
                self._key = self.name
            else:
                import faiss

                self._key = f"{self.name}:{hashlib.sha1(faiss.serialize_index(self.index_).tobytes()).hexdigest()[:16]}"
        return self._key

    def encoded(self, local: LocalCodes) -> LocalCodes:
        """``local`` with its segment arrays attached (``LocalCodes.encoded``): made once where the
        photos are encoded (a cluster's workers), stored by the single writer as they are."""
        return local if not self.compact else replace(local, encoded=(self.key, self.encode(local)))

    def bytes_per_image(self, k: int, d: int, cells: int) -> int:
        """Bytes a photo of k features of depth d on a map of ``cells`` cells."""
        if not self.compact:
            return LocalCodes.size(k, d)
        return k * self.m + -(-cells // 8) + 4 + 2

    def bytes_of(self, local: LocalCodes) -> int:
        """Bytes a photo of ``local``'s (their map: its ``grid``, else the cells they span): what a
        search reads of each photo it verifies, without the smaller scale's that mining reads."""
        if not len(local):
            return 0
        h, w = local.grid or (int(local.cells[..., 1].max()) + 1, int(local.cells[..., 0].max()) + 1)
        return self.bytes_per_image(local.codes.shape[1], local.codes.shape[2], h * w)

    # -- segment arrays --------------------------------------------------------------------------
    def kept(self, local: LocalCodes) -> LocalCodes:
        """``local`` with only the smaller scale's features this codec keeps (its strongest
        ``coarse``, or none)."""
        small = local.coarse.strongest(self.coarse) if self.coarse and local.coarse is not None else None
        return replace(local, coarse=small)

    def encode(self, local: LocalCodes) -> dict[str, np.ndarray]:
        """The segment arrays of ``local`` (those it carries already, where this codec made them),
        with its smaller scale's that this codec keeps (``kept``), named after ``COARSE``."""
        if local.encoded is not None and local.encoded[0] == self.key:
            return dict(local.encoded[1])
        out = self._encode(local)
        small = self.kept(local).coarse
        if small is not None:
            out.update({COARSE + k: a for k, a in self._encode(small).items()})
        return out

    def _encode(self, local: LocalCodes) -> dict[str, np.ndarray]:
        if not self.compact:
            return local.arrays()
        if self.index_ is None:
            raise RuntimeError(f"local codec {self.name} is not fitted")
        n, k, _ = local.codes.shape
        count = local.count.astype(np.int64)
        valid = np.arange(k)[None, :] < count[:, None]
        cells = local.cells.astype(np.int64)
        # the map each photo's cells lie on: its bounding rows and columns (lossless for the cells,
        # whatever the photo's own map was: warped photos share one, kept aspect ratios do not)
        w = np.where(valid, cells[..., 0], 0).max(1, initial=0) + 1
        h = np.where(valid, cells[..., 1], 0).max(1, initial=0) + 1
        linear = np.where(valid, cells[..., 1] * w[:, None] + cells[..., 0], np.iinfo(np.int64).max)
        order = np.argsort(linear, axis=1, kind="stable")  # raster order: the cell map gives them back so
        codes = np.take_along_axis(local.codes, order[..., None], 1)
        q = np.zeros((n, k, self.m), np.uint8)
        q[valid] = self.index_.sa_encode(_unit(codes[valid]))
        # as wide as the photos' whole map where it is known (a warp's: every batch's alike), so that
        # arrays encoded on different workers join as they are
        side = int(np.prod(local.grid)) if local.grid else 0
        bits = np.zeros((n, max(int((h * w).max(initial=1)), side)), bool)
        rows, slots = np.nonzero(valid)
        bits[rows, np.take_along_axis(linear, order, 1)[rows, slots]] = True
        return {"local-quantised": q, "local-cellmap": np.packbits(bits, axis=1),
                "local-grid": np.stack([h, w], 1).astype(np.uint16), "local-count": local.count.astype(np.uint16)}

    def decode(self, arrays: dict[str, np.ndarray], rows=None, coarse: bool = True) -> LocalCodes | None:
        """The ``LocalCodes`` of a segment's ``rows`` (all by default): int8 codes, as ``select``
        makes them, whatever the layout; None where the arrays hold no local features. ``coarse``:
        with the smaller scale's where the arrays hold them (``LocalCodes.coarse``)."""
        got = self._decode(arrays, rows)
        if got is not None:
            small = {k[len(COARSE):]: a for k, a in arrays.items() if k.startswith(COARSE)} if coarse else {}
            got.coarse = self._decode(small, rows) if small else None
        return got

    def _decode(self, arrays: dict[str, np.ndarray], rows=None) -> LocalCodes | None:
        if not is_compact(arrays):
            codes = LocalCodes.from_arrays({k: a for k, a in arrays.items() if not k.startswith(COARSE)})
            return codes if codes is None or rows is None else codes[rows]
        if self.index_ is None:
            raise ValueError("its local features are quantised, and the model has no local codec to decode them")
        pick = (lambda a: a) if rows is None else (lambda a: a[np.atleast_1d(np.asarray(rows))])
        q, cellmap, grid, count = (pick(arrays[key]) for key in COMPACT_KEYS)
        n, k, m = q.shape
        if m != self.index_.sa_code_size():
            raise ValueError(f"its local features are {m}-byte codes, the model's codec ({self.name}) writes "
                             f"{self.index_.sa_code_size()}")
        valid = np.arange(k)[None, :] < count.astype(np.int64)[:, None]
        codes = np.zeros((n, k, self.index_.d), np.int8)
        codes[valid] = _int8(_decode(self.index_, np.ascontiguousarray(q[valid])))
        cells = np.zeros((n, k, 2), np.uint8)
        bits = np.unpackbits(cellmap, axis=1)
        for i in range(n):
            at = np.flatnonzero(bits[i])[: int(count[i])]
            w = int(grid[i, 1])
            cells[i, : len(at), 0], cells[i, : len(at), 1] = at % w, at // w
        return LocalCodes(codes, cells, count.astype(np.uint16))

    def stored(self, local: LocalCodes) -> LocalCodes:
        """``local`` as an index stores and reads it back: what the far side of a match sees, its
        smaller scale's features those this codec keeps (``kept``)."""
        return self.kept(local) if not self.compact else self.decode(self.encode(local))

    # -- persistence -----------------------------------------------------------------------------
    def state(self) -> tuple[str, dict[str, np.ndarray]]:
        if not self.compact:
            return self.name, {}
        import faiss

        return self.name, {"local-codec/index": faiss.serialize_index(self.index_)}

    @classmethod
    def from_state(cls, name: str, arrays: dict[str, np.ndarray], coarse: int = 0) -> "LocalCodec":
        codec = cls(name, coarse)
        if codec.compact:
            import faiss

            codec.index_ = faiss.deserialize_index(np.asarray(arrays["local-codec/index"], np.uint8))
        return codec


INT8 = LocalCodec()  # the layout of every index made before compact codecs, and of int8 models (stateless)


def _valid(local: LocalCodes) -> np.ndarray:
    k = local.codes.shape[1]
    return _unit(local.codes[np.arange(k)[None, :] < local.count.astype(np.int64)[:, None]])


def _unit(codes: np.ndarray) -> np.ndarray:
    X = np.asarray(codes, np.float32)
    return np.ascontiguousarray(X / np.maximum(np.linalg.norm(X, axis=-1, keepdims=True), 1e-12))


def _int8(X: np.ndarray) -> np.ndarray:
    """Decoded descriptors as ``select`` stores them: scaled so the largest component is ±127 (in
    place, two reductions and no temporaries: a query decodes 30 000 of them)."""
    X = np.asarray(X, np.float32)
    X *= (127 / np.maximum(np.maximum(X.max(1), -X.min(1)), 1e-12))[:, None]
    return np.rint(X, out=X).astype(np.int8)


def _decode(index, codes: np.ndarray) -> np.ndarray:
    """``index.sa_decode`` on this thread alone. The search calls it between BLAS products, whose
    threads keep spinning for a while after each one; faiss' OpenMP team would share the cores with
    them and wait for its slowest member (a query's decoding took 9 ms so, and 2 ms alone)."""
    import faiss

    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.sa_decode(codes)
    finally:
        faiss.omp_set_num_threads(n)


__all__ = ["COMPACT_KEYS", "DEFAULT", "INT8", "LocalCodec", "check", "is_compact"]
