"""Spatial verification: re-rank a shortlist by how many local features agree on one geometry.

The paper's premise, that each position of a conv layer describes a patch, gives every image a set
of local features for free: the forward pass that computes the global descriptor already has them.
Per image, the ``k`` strongest positions (largest activation before L2-normalisation) of one layer
(default: the model's VLAD layer at its largest scale, a 28×28 map for Lite0 at 448) are kept as
int8 codes plus their grid cells: ``k·(d + 2)`` bytes, 24.6 kB for Lite0 (k = 300, d = 80). Each
code is its descriptor scaled so that its largest component is ±127, re-normalised when read: a
plain ×127 leaves a unit 80-D vector's components (~0.1) a dozen levels, and cost 0.018 mAP on
mvbench-dev against float32 (this way: 0.005, the same as float16 at half the bytes).

For a query and a candidate, mutual nearest neighbours above ``min_similarity`` are the tentative
matches; OpenCV's RANSAC fits an affine map between the grid cells (a warp to n×n is a scaling, so
an affine map between images stays one between grids) and counts inliers within ``threshold``
cells. On mvbench-dev the affine fit beat a homography by USAC-MAGSAC both in mAP (0.867 against
0.860) and in time (51 against 62 ms a query): with 3 points a sample instead of 4 it needs fewer
iterations, and a 28×28 grid cannot resolve perspective anyway. Unrelated photos still agree by
chance, and how much depends on the layer: over pairs of mvbench-train photos, none of them
related, the 99th percentile is 8 inliers for Lite0's block6 (80-D), 12 for MobileNetV2's block13
(96-D) and 19 for InceptionV3's mixed6e (768-D), whose tail reaches 35. ``chance_level`` measures
it on the training photos when a model is fitted (``ConvVLAD.chance_``), and only inliers beyond it
count. With Lite0's 8 for every layer, re-ranking lowered InceptionV3's mAP on mvbench-dev by 0.012;
with its own 19, by nothing (nor does it gain: that layer's features do not verify). The
inliers add to the cosine similarity of the global descriptors (Philbin et al. 2007 re-rank by
inliers alone; adding them to the similarity keeps the global order among the many candidates with
no evidence).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

LOCAL_K = 300
# the smaller scale's features an index keeps a photo by default (``Config.coarse_local``): 8.2 kB for
# Lite0 (100 of its 14×14 map's 196), a third more local bytes
COARSE_LOCAL = 100
# An affine map fits any 3 matches exactly: 3 inliers are no evidence, whatever a sample of unrelated
# pairs measured (a small model fitted on a few dozen photos measured 0, and then every candidate
# "verified": at 3 times 0, a mining of 6 groups found 291 pairs across them and 90 within)
MIN_CHANCE = 3
# A pair is sure from this many times the chance level of inliers: unrelated photos never reached it
# against their nearest (among mvbench-train's, 16-23 inliers nine times in 8 000 pairs, 24 never;
# whitening's docstring). An index mines its verified pairs at this level (``pairs.mine_pairs``),
# and the search trusts a link through one (``Verifier.order_by``'s ``linked``)
SURE = 3
COARSE = "coarse-"  # the names of the smaller scale's arrays beside the others (``LocalCodes.arrays``)


@dataclass
class LocalCodes:
    """Verification features of n images: ``codes`` (n, k, d) int8 (descriptor × 127 / its largest
    component), ``cells`` (n, k, 2) uint8 grid positions (x, y), ``count`` (n,) valid rows per image (the rest zero)."""

    codes: np.ndarray
    cells: np.ndarray
    count: np.ndarray
    grid: tuple[int, int] | None = None  # the map's (h, w) the cells lie on, where known (not stored)
    # (codec key, its segment arrays for these rows) where a compact codec encoded them already, on a
    # cluster's workers: the single writer then stores them as they are (``LocalCodec.encoded``)
    encoded: tuple[str, dict] | None = None
    # the same photos' features at the model's smallest scale, their cells on this map's grid (not
    # stored): a photo being mined is verified from both (``pairs.verify_candidates``)
    coarse: "LocalCodes | None" = None

    def __len__(self) -> int:
        return len(self.count)

    @staticmethod
    def size(k: int, d: int) -> int:
        """Bytes per image of k features of depth d: int8 codes, two uint8 cells each, a uint16 count."""
        return k * (d + 2) + 2

    @property
    def bytes_per_image(self) -> int:
        return self.size(*self.codes.shape[1:]) if len(self) else 0

    def __getitem__(self, i) -> "LocalCodes":
        idx = np.atleast_1d(np.asarray(i))
        enc = None if self.encoded is None else (self.encoded[0], {k: a[idx] for k, a in self.encoded[1].items()})
        return LocalCodes(self.codes[idx], self.cells[idx], self.count[idx], self.grid, enc,
                          None if self.coarse is None else self.coarse[idx])

    def features(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``i``'s descriptors (m, d) float32, unit length, and cells (m, 2) float32."""
        n = int(self.count[i])
        return _unit(self.codes[i, :n]), self.cells[i, :n].astype(np.float32) + 0.5

    def strongest(self, k: int) -> "LocalCodes":
        """Each photo's first ``k`` features (``select`` keeps them strongest first), without the
        smaller scale's."""
        return LocalCodes(self.codes[:, :k], self.cells[:, :k], np.minimum(self.count, k).astype(self.count.dtype),
                          self.grid)

    def descriptors(self) -> np.ndarray:
        """All descriptors (n, k, d) float32, unit length; unused slots stay zero."""
        return _unit(self.codes)

    def arrays(self, coarse: bool = False) -> dict[str, np.ndarray]:
        """Named per-image arrays, as a store segment keeps them; ``coarse``: with the smaller
        scale's too (named after ``COARSE``), for an encoding that travels whole (a cluster's blocks,
        the eval cache), which ``from_arrays`` reads back."""
        out = {"local-codes": self.codes, "local-cells": self.cells, "local-count": self.count}
        if coarse and self.coarse is not None:
            out.update({COARSE + k: a for k, a in self.coarse.arrays().items()})
        return out

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray]) -> "LocalCodes | None":
        try:
            codes = LocalCodes(arrays["local-codes"], arrays["local-cells"], arrays["local-count"])
        except KeyError:
            return None
        codes.coarse = LocalCodes.from_arrays({k[len(COARSE):]: a for k, a in arrays.items() if k.startswith(COARSE)})
        return codes

    @staticmethod
    def concat(parts: list["LocalCodes"]) -> "LocalCodes":
        grids = {p.grid for p in parts}
        keys = {p.encoded[0] if p.encoded is not None else None for p in parts}
        enc = None
        if len(keys) == 1 and None not in keys:  # a cell map as wide as the widest part's (zero bits: no cell)
            enc = (keys.pop(), {k: pad_join([p.encoded[1][k] for p in parts]) for k in parts[0].encoded[1]})
        coarse = None
        if all(p.coarse is not None for p in parts):
            coarse = LocalCodes.concat([p.coarse for p in parts])
        return LocalCodes(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("codes", "cells", "count")),
                          grids.pop() if len(grids) == 1 else None, enc, coarse)

    @staticmethod
    def gathered(n: int, parts: list[tuple[np.ndarray, "LocalCodes"]]) -> "LocalCodes | None":
        """n photos' features from ``parts`` (rows of the n, their ``LocalCodes``), as wide as the
        widest part; zero rows where no part has a photo, None without parts."""
        if not parts:
            return None
        k = max(got.codes.shape[1] for _, got in parts)
        d, c = parts[0][1].codes.shape[2], parts[0][1].count.dtype
        out = LocalCodes(np.zeros((n, k, d), np.int8), np.zeros((n, k, 2), np.uint8), np.zeros(n, c))
        for sel, got in parts:
            w = got.codes.shape[1]
            out.codes[sel, :w], out.cells[sel, :w], out.count[sel] = got.codes, got.cells, got.count
        return out

    @staticmethod
    def empty(k: int, d: int) -> "LocalCodes":
        return LocalCodes(np.zeros((0, k, d), np.int8), np.zeros((0, k, 2), np.uint8), np.zeros(0, np.uint16))


def pad_join(parts: list[np.ndarray], fill=0) -> np.ndarray:
    """Per-row arrays joined, rows narrower than the widest padded with ``fill`` at the end."""
    if parts[0].ndim < 2:
        return np.concatenate(parts)
    widest = np.max([p.shape[1:] for p in parts], axis=0)
    return np.concatenate([np.pad(p, [(0, 0)] + [(0, int(w - s)) for w, s in zip(widest, p.shape[1:])],
                                  constant_values=fill) for p in parts])


def _spanned(codes: "LocalCodes") -> np.ndarray:
    """Grid cells each image's features span (their bounding box), at least 1."""
    n = codes.count.astype(np.int64)
    valid = np.arange(codes.cells.shape[1])[None, :] < n[:, None]
    c = codes.cells.astype(np.float64)
    w = np.where(valid, c[..., 0], 0).max(1, initial=0) + 1
    h = np.where(valid, c[..., 1], 0).max(1, initial=0) + 1
    return np.maximum(w * h, 1.0)


def whiten(X: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Features (..., d) mapped by ``P`` (d, d; ``Verifier.metric``) and re-normalised; zero rows
    (unused slots) stay zero."""
    if X.shape[-1] != P.shape[1]:
        raise ValueError(f"local features of depth {X.shape[-1]}: the model's local whitening is for {P.shape[1]}")
    Y = np.asarray(X, np.float32) @ P.T
    Y /= np.maximum(np.linalg.norm(Y, axis=-1, keepdims=True), 1e-12)
    return Y


def _unit(codes: np.ndarray) -> np.ndarray:
    d = codes.astype(np.float32)
    d /= np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-6)
    return d


def select(desc, norms, grid: tuple[int, int], k: int = LOCAL_K, step: int = 1) -> LocalCodes:
    """Keep the ``k`` strongest positions of each image: ``desc`` (B, N, d) L2-normalised, ``norms``
    (B, N) their activations' norms before normalisation (torch tensors), ``grid`` (h, w), N = h·w;
    ``step``: the cells placed on a grid ``step`` times finer (a smaller scale's map on the largest's)."""
    import torch

    B, N, d = desc.shape
    h, w = grid
    if h * step > 256 or w * step > 256:
        raise ValueError(f"verification layer's map is {h}×{w}: cells are stored as bytes, at most 256 a side")
    m = min(k, N)
    top = torch.topk(norms.float(), m, dim=1).indices  # (B, m)
    picked = torch.gather(desc.float(), 1, top[..., None].expand(B, m, d))
    codes = np.zeros((B, k, d), np.int8)
    scaled = picked * (127 / picked.abs().amax(2, keepdim=True).clamp_min(1e-12))
    codes[:, :m] = torch.round(scaled).clamp_(-127, 127).to(torch.int8).cpu().numpy()
    t = top.cpu().numpy()
    cells = np.zeros((B, k, 2), np.uint8)
    cells[:, :m, 0], cells[:, :m, 1] = (t % w) * step, (t // w) * step
    return LocalCodes(codes, cells, np.full(B, m, np.uint16), (h * step, w * step))


def tentative_matches(S: np.ndarray, min_similarity: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours of a similarity matrix (m, n) at or above ``min_similarity``:
    (rows, their columns)."""
    fwd, bwd = S.argmax(1), S.argmax(0)
    i = np.flatnonzero((bwd[fwd] == np.arange(len(fwd))) & (S[np.arange(len(fwd)), fwd] >= min_similarity))
    return i, fwd[i]


def fit_affine(src: np.ndarray, dst: np.ndarray, threshold: float) -> tuple[np.ndarray | None, np.ndarray]:
    """An affine map fitted robustly (OpenCV's RANSAC) to matched points (m, 2): (2×3 map or None,
    inlier mask (m,) bool); no map with fewer than 3 points or no consensus."""
    import cv2

    if len(src) < 3:
        return None, np.zeros(len(src), bool)
    # 500 iterations find an all-inlier 3-point sample with 0.999 confidence down to 25% inliers;
    # fewer inliers than that among the tentative matches is no match worth ranking up. On
    # mvbench-dev mAP was the same as with 2 000 (0.8665 and 0.8666), for less time per query.
    A, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=threshold, maxIters=500,
                                   confidence=0.999)
    if mask is None:
        return None, np.zeros(len(src), bool)
    return A, mask.ravel().astype(bool)


def fit_inliers(src: np.ndarray, dst: np.ndarray, threshold: float) -> int:
    """How many of the matched points (m, 2) agree with one affine map (``fit_affine``)."""
    return int(fit_affine(src, dst, threshold)[1].sum())


@dataclass
class PairMatch:
    """The verification of one query against one candidate, as the ranking computed it: tentative
    matches (rows of the query's and the candidate's features), which of them are inliers, the
    affine map (query cells → candidate cells), and whether a fit was tried at all (the gate)."""

    query_rows: np.ndarray  # (m,) int
    candidate_rows: np.ndarray  # (m,) int
    similarity: np.ndarray  # (m,) float32
    inliers: np.ndarray  # (m,) bool
    affine: np.ndarray | None  # 2×3
    fitted: bool

    @property
    def n_inliers(self) -> int:
        return int(self.inliers.sum())


_LOG_FACTORIAL = np.zeros(1)


def _log_choose(n, k):
    global _LOG_FACTORIAL
    if n >= len(_LOG_FACTORIAL):  # grown as needed: an index may keep any number of local features
        _LOG_FACTORIAL = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, max(2 * n, 4 * LOCAL_K) + 1)))])
    return _LOG_FACTORIAL[n] - _LOG_FACTORIAL[k] - _LOG_FACTORIAL[n - k]


def significance(inliers, tentative, p) -> np.ndarray:
    """How unlikely each pair's inliers are by chance, as −log10 of the a-contrario number of false
    alarms (Moisan & Stival 2004; ORSA): NFA = (n − 3)·C(n, 3)·P[Bin(n − 3, p) ≥ m − 3] for m inliers
    among n tentative matches, where an affine map is fixed by 3 of them and a chance match falls
    within the inlier tolerance with probability ``p``. Positive: fewer than one such pair expected
    by chance. 12 inliers of 15 tentative matches score far above 12 of 250: a global inlier
    count treats them alike. 0 where no map was fitted (m < 3)."""
    m = np.asarray(inliers, np.int64)
    n = np.maximum(np.asarray(tentative, np.int64), m)
    p = np.broadcast_to(np.clip(np.asarray(p, np.float64), 1e-9, 0.5), m.shape)
    out = np.zeros(m.shape, np.float64)
    for j in np.flatnonzero(m >= 3):
        N, lo = int(n[j]) - 3, int(m[j]) - 3
        k = np.arange(lo, N + 1)
        terms = _log_choose(N, k) + k * np.log(p[j]) + (N - k) * np.log1p(-p[j])
        top = terms.max()
        log_tail = top + np.log(np.exp(terms - top).sum())
        log_nfa = np.log(max(N, 1)) + _log_choose(int(n[j]), 3) + log_tail
        out[j] = -log_nfa / np.log(10)
    return out


@dataclass
class Evidence:
    """What verifying a shortlist found, per candidate: ``inliers``, ``tentative`` matches, and
    ``area``, the grid cells its features span (the room a chance match has to land in)."""

    inliers: np.ndarray
    tentative: np.ndarray
    area: np.ndarray

    def __getitem__(self, i) -> "Evidence":
        return Evidence(self.inliers[i], self.tentative[i], self.area[i])

    @staticmethod
    def empty(n: int) -> "Evidence":
        return Evidence(np.zeros(n, np.int64), np.zeros(n, np.int64), np.ones(n, np.float64))


@dataclass
class Verifier:
    """Re-ranks a shortlist: score = cosine similarity + min(max(e − level, 0) / per, cap), where the
    evidence e is a pair's inliers (``score="inliers"``, level = ``chance``) or their
    ``significance`` (``score="significance"``, level = ``level``)."""

    min_similarity: float = 0.6
    threshold: float = 1.5  # grid cells
    chance: int = 8  # inliers unrelated photos reach: fitted per model (chance_level); 8 is Lite0's
    per: float = 10.0  # evidence beyond the level worth one unit of cosine similarity
    cap: float = 4.0
    threads: int = 2
    score: str = "inliers"
    level: float = 0.0  # significance (−log10 NFA) beyond which a pair counts
    min_tentative: int | None = None  # fit only above this many tentative matches (None: 2 × chance)
    link: bool = True  # a photo the index's pairs link to a sure match scores as verified at ``sure`` (order_by)
    # (d, d): both sides' features are mapped by it before they are matched (local_whitening.py,
    # learned with the model); None: matched as they are. Kept out of the repr: 6 400 numbers
    metric: np.ndarray | None = field(default=None, repr=False)

    def inliers(self, query: tuple[np.ndarray, np.ndarray], candidates: LocalCodes) -> np.ndarray:
        """Inliers between ``query`` (descriptors, cells) and each image of ``candidates``; 0 where
        there are too few tentative matches (``min_tentative``: no model is fitted for those)."""
        return self.evidence(query, candidates).inliers

    def inliers_from(self, local: LocalCodes, i: int, candidates: LocalCodes) -> np.ndarray:
        """Inliers of photo ``i`` of ``local`` with each of ``candidates``: the most of its own
        features' and, where ``local`` carries them (``LocalCodes.coarse``), its smaller scale's
        against theirs, and its own against the candidates' smaller scale's, where they carry them
        (an index keeps ``Config.coarse_local`` of them). A photo up to that ratio nearer the subject
        than another sees it at the other's size there: on the synthetic views (crops of 35-80% of a
        side) mining found 27% more true sure pairs that way and no more false ones, and the
        candidates' side makes it so whichever photo an index was given first (docs/defaults.md,
        "Cross-scale mining")."""
        q = local.features(i)
        got = self.inliers(q, candidates)
        if local.coarse is not None and local.coarse.count[i]:
            got = np.maximum(got, self.inliers(local.coarse.features(i), candidates))
        if candidates.coarse is not None and candidates.coarse.count.any():
            got = np.maximum(got, self.inliers(q, candidates.coarse))
        return got

    def evidence(self, query: tuple[np.ndarray, np.ndarray], candidates: LocalCodes) -> Evidence:
        """Inliers, tentative matches and the cells spanned, for ``query`` against each candidate."""
        import cv2

        m = len(candidates)
        if m == 0 or len(query[0]) < 3:
            return Evidence.empty(m)
        cv2.setNumThreads(1)  # parallel across candidates instead: each fit is small
        n = max(1, min(self.threads, m // 8))
        if n == 1:
            return self._evidence(query, candidates)
        # numpy's stacked product runs one small GEMM after another on one core: a thread per
        # slice of candidates (numpy and OpenCV release the GIL) uses the others
        parts = np.array_split(np.arange(m), n)
        with ThreadPoolExecutor(n) as pool:
            got = list(pool.map(lambda idx: self._evidence(query, candidates[idx]), parts))
        return Evidence(*(np.concatenate([getattr(e, f) for e in got]) for f in ("inliers", "tentative", "area")))

    def tentative(self, query, candidates: LocalCodes):
        """Mutual nearest neighbours above ``min_similarity`` of every pair at once: (fwd (n, m), the
        candidate feature each query feature is nearest to; ok (n, m) bool; best (n, m) similarity)."""
        dq, _ = query
        C = candidates.descriptors()
        if self.metric is not None:
            dq, C = whiten(dq, self.metric), whiten(C, self.metric)
        n, k, d = C.shape
        # one GEMM for the whole shortlist, laid out (query feature, pair, candidate feature).
        # numpy's stacked matmul makes one BLAS call per pair, each a parallel region of its own:
        # on 2 busy cores (a service under load, or the two threads of ``evidence``) each call
        # waits for the scheduler. mvbench-dev's top 100 with the test suite running beside it: 954 ms
        # a query that way, 73 ms this way (idle: 37 and 29). Unused slots are zero vectors, whose
        # similarity 0 never reaches min_similarity.
        S = (dq @ C.reshape(n * k, d).T).reshape(len(dq), n, k)
        fwd_q = S.argmax(2)  # each query feature's nearest candidate feature, (query feature, pair)
        best = np.ascontiguousarray(np.take_along_axis(S, fwd_q[..., None], 2)[..., 0].T)
        fwd = np.ascontiguousarray(fwd_q.T)  # (pair, query feature), as everything below reads it
        mutual = best >= np.take_along_axis(S.max(0), fwd, 1)  # ... and it is that feature's nearest
        ok = mutual & (best >= self.min_similarity)
        # ... once: every query feature that ties with a candidate feature's best passes the test
        # above, and int8 features of a uniform region tie exactly, so a plain border row of one
        # photo matched one cell of an unrelated one 18 times (an affine map squashed flat, 21
        # "inliers": binoculars and a chest). Each candidate feature keeps the first of its ties.
        # (A test by index, S.argmax(0), would do the same but for which of the tied features wins.)
        pair, q = np.nonzero(ok)
        key = pair * S.shape[2] + fwd[pair, q]
        first = np.zeros(len(key), bool)
        first[np.unique(key, return_index=True)[1]] = True
        ok[pair[~first], q[~first]] = False
        return fwd, ok, best

    @property
    def gate(self) -> int:
        """A pair is fitted only with more tentative matches than this (``min_tentative``, else twice
        the chance level)."""
        # RANSAC is most of the time left: a fit is worth it only where more than half of twice
        # the chance level could agree; on mvbench-dev this gate changed the order of one query
        # in 191 against a gate at the chance level itself (mAP 0.8665 both), 57 → 42 ms a query
        return 2 * self.chance if self.min_tentative is None else max(2, self.min_tentative)

    def gated(self, ev: Evidence) -> Evidence:
        """``ev`` (verified at a lower gate) as this verifier's gate would have left it: no inliers
        where there were ``gate`` tentative matches or fewer."""
        return Evidence(np.where(ev.tentative > self.gate, ev.inliers, 0), ev.tentative, ev.area)

    def _evidence(self, query, candidates: LocalCodes) -> Evidence:
        xq = query[1]
        fwd, ok, _ = self.tentative(query, candidates)
        cells = candidates.cells.astype(np.float32) + 0.5
        out = np.zeros(len(candidates), np.int64)
        tentative = ok.sum(1).astype(np.int64)
        for j in range(len(candidates)):
            if int(tentative[j]) > self.gate:
                out[j] = fit_inliers(xq[ok[j]], cells[j, fwd[j, ok[j]]], self.threshold)
        return Evidence(out, tentative, _spanned(candidates))

    def match(self, query, candidate: LocalCodes) -> PairMatch:
        """The verification of ``query`` (descriptors, cells) against one image (``candidate``, a
        LocalCodes of one row) in full: the same computation, step for step, as ``inliers``, so its
        ``n_inliers`` is the count the ranking used."""
        xq = query[1]
        if len(candidate) != 1:
            raise ValueError(f"match takes one candidate, not {len(candidate)}")
        if len(query[0]) < 3:
            z = np.zeros(0, np.int64)
            return PairMatch(z, z, np.zeros(0, np.float32), np.zeros(0, bool), None, False)
        fwd, ok, best = self.tentative(query, candidate)
        rows = np.flatnonzero(ok[0])
        cols = fwd[0, rows]
        cells = candidate.cells.astype(np.float32) + 0.5
        fitted = len(rows) > self.gate
        A, mask = fit_affine(xq[ok[0]], cells[0, cols], self.threshold) if fitted else (None, np.zeros(len(rows), bool))
        return PairMatch(rows, cols, best[0, rows].astype(np.float32), mask, A, fitted)

    def strength(self, ev: "Evidence | np.ndarray") -> np.ndarray:
        """Each pair's evidence beyond its level, in the score's units (0: none)."""
        if not isinstance(ev, Evidence):  # inlier counts alone
            ev = Evidence(np.asarray(ev, np.int64), np.asarray(ev, np.int64), np.full(len(ev), 1.0))
        if self.score == "significance":
            p = np.pi * self.threshold ** 2 / np.maximum(ev.area, 1.0)
            return np.maximum(significance(ev.inliers, ev.tentative, p) - self.level, 0)
        if self.score != "inliers":
            raise ValueError(f"unknown verification score {self.score!r} (inliers, significance)")
        return np.maximum(np.asarray(ev.inliers) - self.chance, 0).astype(np.float64)

    def scores(self, distances: np.ndarray, evidence) -> np.ndarray:
        """Higher is better. ``distances``: squared L2 between unit descriptors (cosine = 1 − d/2);
        ``evidence``: an ``Evidence`` (or, for the inliers score, the inlier counts)."""
        bonus = np.minimum(self.strength(evidence) / self.per, self.cap)
        return 1.0 - np.asarray(distances, np.float64) / 2 + bonus

    @property
    def sure(self) -> int:
        """Inliers from which a pair is sure: ``SURE`` times the chance level (at least ``MIN_CHANCE``)."""
        return SURE * max(self.chance, MIN_CHANCE)

    @property
    def links(self) -> bool:
        """Whether ``order_by`` ranks linked photos (``link``, with the inliers score)."""
        return self.link and self.score == "inliers"

    def verify(self, query, candidates: LocalCodes, stored: np.ndarray | None = None) -> Evidence:
        """``evidence`` of a shortlist, zero where ``stored`` (bool, optional) says an image has
        no local features."""
        ev = Evidence.empty(len(candidates))
        have = np.arange(len(candidates)) if stored is None else np.flatnonzero(stored)
        if len(have):
            got = self.evidence(query, candidates[have])
            ev.inliers[have], ev.tentative[have], ev.area[have] = got.inliers, got.tentative, got.area
        return ev

    def order(self, query, distances: np.ndarray, candidates: LocalCodes,
              stored: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The new order of a shortlist (positions into it, best first) and each position's
        inliers. ``candidates``: the shortlist's local codes, row for row; ``stored`` (bool,
        optional): False where an image has none (it keeps zero inliers)."""
        ev = self.verify(query, candidates, stored)
        return self.order_by(distances, ev), ev.inliers

    def order_by(self, distances: np.ndarray, ev: Evidence, linked: np.ndarray | None = None) -> np.ndarray:
        """The order (best first) of a verified shortlist: what ``order`` ends with. ``linked``
        (bool, optional): the positions that verified pairs join to one of the query's sure
        matches, directly or through other linked positions (``search.linked``); each scores at least as if it had verified at ``sure``
        inliers itself, however weakly it does (a view from the other side, or at night, of a
        place that the query and that match share). Inliers scores only; ``link=False`` ignores it."""
        s = self.scores(distances, ev)
        if self.links and linked is not None and np.any(linked):
            at_sure = self.scores(distances, np.full(len(s), self.sure, np.int64))
            s = np.where(linked, np.maximum(s, at_sure), s)
        return np.argsort(-s, kind="stable")

    def rerank(self, query, ids: np.ndarray, distances: np.ndarray, candidates: LocalCodes,
               stored: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Reorder ``ids`` (a query's shortlist, nearest first) by score (see ``order``).
        Returns (ids, inliers) in the new order."""
        order, inl = self.order(query, distances, candidates, stored)
        return np.asarray(ids)[order], inl[order]


def chance_level(codes: LocalCodes, pairs_per_image: int = 6, percentile: float = 99, seed: int = 0,
                 progress=None, verifier: Verifier | None = None, stored: LocalCodes | None = None) -> int:
    """Inliers that unrelated photos reach: the ``percentile`` over random pairs of the images of
    ``codes`` (training photos). Each image is paired only beyond its max(10, n/20) nearest by the
    mean of its local descriptors, so that a training set with small groups of related photos does
    not count their matches as chance: learned on mvbench-dev's 191 photos (groups of 2–8) with
    every pair, Lite0's level came out 15 and halved re-ranking's gain on other photos
    (docs/defaults.md); this way it is 8, as on mvbench-train's unrelated photos. Groups far larger
    than n/20 (Paris6k's landmarks) still raise it, which makes re-ranking more cautious, not wrong.
    ``verifier``: whose matching the level is for (its tentative matches and tolerance; default
    ``Verifier()``'s); every pair with 3 tentative matches is fitted, whatever its gate. ``stored``:
    the same photos' features as an index keeps them (``LocalCodec.stored``), the side each photo is
    matched against, so that the level is the one the index's own matching reaches. ``codes``
    carrying their smaller scale's features (``coarse``): the more of the two counts, as mining
    counts them (``Verifier.inliers_from``)."""
    n = len(codes)
    if n < 2:
        return Verifier.chance
    rng = np.random.default_rng(seed)
    g = codes.descriptors().mean(1)  # unused slots are zero: the direction is the valid rows' mean
    g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    S = g @ g.T
    np.fill_diagonal(S, np.inf)  # itself first, then its nearest
    by_similarity = np.argsort(-S, axis=1)
    skip = min(1 + max(10, n // 20), n - 1)
    raw = replace(verifier or Verifier(), chance=0, min_tentative=None)  # no gate: 3 tentative matches are fitted
    counts = []
    for i in range(n):
        far = by_similarity[i, skip:]
        others = rng.choice(far, min(pairs_per_image, len(far)), replace=False)
        counts.append(raw.inliers_from(codes, i, (codes if stored is None else stored)[others]))
        if progress is not None:
            progress.update(1)
    return max(MIN_CHANCE, int(np.ceil(np.percentile(np.concatenate(counts), percentile))))


__all__ = ["COARSE_LOCAL", "Evidence", "LOCAL_K", "LocalCodes", "MIN_CHANCE", "PairMatch", "Verifier", "chance_level", "fit_affine", "fit_inliers",
           "pad_join", "select", "significance", "tentative_matches", "whiten"]
