"""The verified-pair graph: pairs of photos mined by spatial verification, without labels, and what
is built on them.

Each photo's nearest neighbours by the global descriptor are verified, from its features at the
largest scale and, where the model has a smaller one, from those too (``Verifier.inliers_from``: a
view nearer the subject matches a wider one there; a photo an index is given later also from its
largest against the smaller scale's features the index keeps of the photos before it, so that the
wider view may come second), and a pair counts when its inliers reach
``Verifier.sure`` (three times the chance level): among mvbench-train's photos, which
share no place, a photo and one of its 20 nearest reached 16-23 inliers (2-2.9 times Lite0's 8) nine
times in 8 000 pairs (round things: a clock, a wheel, a speaker; a watermark), and none reached 24.

Four users, one graph:
- **augmentation** (``augment``): each photo's descriptor summed with its partners', by default in
  an index and in eval (+0.024 global mAP out of fold on mvbench-dev, docs/defaults.md);
- **links** (``search.linked``): a shortlisted photo joined to a sure match ranks as one;
- **learned whitening** (``whitening.py``), from the differences of the pairs;
- **groups** (``groups.py``): the sure pairs and, under its rule, weaker ones join the photos that show the same thing.

An index mines each photo it adds (``mine_additions``, with the same steps as ``mine_pairs``, and a
pair with a photo indexed before from that photo's side too where it may decide: ``from_older``), keeps
each segment's partners beside it, with every candidate's inliers (``edges_of``: the evidence the
groups are built on, ``groups.links``), and holds the live pairs of a generation in a ``PairOverlay``.

    >>> pairs = mine_pairs(X, local, model.pair_verifier())       # (m, 2) photo pairs, i < j
    >>> Y = augment(X, pairs)                                     # (n, d) float32, rows L2-normalised
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .verify import LocalCodes, Verifier

# The database side is augmented by default, in an index and in eval: +0.024 global mAP out of fold on
# mvbench-dev [+0.004, +0.045], as much on synthetic views and three other backbones, and the
# re-ranked ranking as it was (docs/defaults.md, "Verified database-side augmentation")
AUGMENT = "verified"
AUGMENT_CHOICES = ("none", "verified")
NEIGHBOURS = 20  # each photo's nearest verified for mining


def check_augment(value: str | None, what: str = "augment") -> str | None:
    """``value`` if it is one of ``AUGMENT_CHOICES`` (or None), else a ValueError naming ``what``."""
    if value is not None and value not in AUGMENT_CHOICES:
        raise ValueError(f"{what} {value!r}: choose {' or '.join(AUGMENT_CHOICES)}")
    return value


# -- mining ------------------------------------------------------------------------------------------
def nearest(X: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``m`` nearest other rows of ``X`` (n, d, L2-normalised) by inner product:
    (similarities, rows), each (n, m), nearest first, padded with -inf and -1."""
    import faiss

    n = len(X)
    sims, rows = np.full((n, m), -np.inf, np.float32), np.full((n, m), -1, np.int64)
    if n < 2 or m < 1:
        return sims, rows
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(np.ascontiguousarray(X, np.float32))
    D, nn = index.search(np.ascontiguousarray(X, np.float32), min(m, n - 1) + 1)
    for i in range(n):
        keep = (nn[i] != i) & (nn[i] >= 0)
        js, ds = nn[i][keep][:m], D[i][keep][:m]
        rows[i, :len(js)], sims[i, :len(js)] = js, ds
    return sims, rows


def verify_candidates(local: LocalCodes, candidates: np.ndarray, codes_of, verifier: Verifier,
                      progress=None, back: tuple[LocalCodes, np.ndarray] | None = None) -> np.ndarray:
    """Inliers of each photo ``i`` of ``local`` (the local features of photos being mined) with each
    of its ``candidates[i]`` (ids, -1 padded): (n, width) int32, -1 where there is no candidate or
    the candidate keeps no local features. ``codes_of(ids)`` → (``LocalCodes``, a mask of the ids
    that have them). ``back``: (the photos' features as the candidates would be matched against
    them, a (n, width) mask of the candidates indexed before them), to verify those pairs from the
    candidate's side too (``from_older``), on the features already read."""
    candidates = np.asarray(candidates, np.int64).reshape(len(local), -1)
    out = np.full(candidates.shape, -1, np.int32)
    for i, row in enumerate(candidates):
        at = np.flatnonzero(row >= 0)
        if len(at):
            codes, have = codes_of(row[at])
            at = at[have]
            if len(at):
                codes = codes[np.flatnonzero(have)]
                out[i, at] = verifier.inliers_from(local, i, codes)
                if back is not None:
                    out[i, at] = from_older(out[i, at], back[1][i, at], codes, back[0][[i]], verifier)
        if progress is not None:
            progress.update(1)
    return out


def partners_from(candidates: np.ndarray, inliers: np.ndarray, min_inliers: int) -> np.ndarray:
    """The ``candidates`` (n, width) whose ``inliers`` reach ``min_inliers``, in their order, moved
    to the left of each row and -1 padded: the partners a store keeps."""
    ok = (np.asarray(inliers) >= min_inliers) & (np.asarray(candidates) >= 0)
    out = np.full(ok.shape, -1, np.int64)
    r, c = np.nonzero(ok)
    out[r, (np.cumsum(ok, 1) - 1)[r, c]] = np.asarray(candidates)[r, c]
    return out


def pairs_of(ids: np.ndarray, partners: np.ndarray) -> np.ndarray:
    """The pairs (a, b), a < b, of photos ``ids`` (n,) and their ``partners`` (n, width), -1 padded:
    (m, 2) int64, sorted, each pair once."""
    ids = np.asarray(ids, np.int64)
    partners = np.asarray(partners, np.int64).reshape(len(ids), -1)
    r, c = np.nonzero(partners >= 0)
    a, b = ids[r], partners[r, c]
    return unique_pairs(np.stack([np.minimum(a, b), np.maximum(a, b)], 1))


def unique_pairs(P: np.ndarray) -> np.ndarray:
    """The rows of ``P`` (m, 2) int64, sorted by their first then second element, each once
    (``np.unique(P, axis=0)``, in a third of its time on millions of rows)."""
    P = np.asarray(P, np.int64).reshape(-1, 2)
    if not len(P):
        return P
    P = P[np.lexsort((P[:, 1], P[:, 0]))]
    keep = np.ones(len(P), bool)
    keep[1:] = (P[1:] != P[:-1]).any(1)
    return P[keep]


def edges_of(ids: np.ndarray, candidates: np.ndarray, inliers: np.ndarray, floor: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The verified candidate pairs of photos ``ids`` (n,): their ``candidates`` (n, width, ids, -1
    padded) and the ``inliers`` of each (n, width): (pairs (m, 2) int64 with a < b, sorted, each once;
    their inliers (m,) int32, the more of the two directions), those with ``floor`` inliers or more."""
    ids = np.asarray(ids, np.int64)
    if not len(ids):
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int32)
    C = np.asarray(candidates, np.int64).reshape(len(ids), -1)
    L = np.asarray(inliers).reshape(C.shape)
    r, c = np.nonzero((C >= 0) & (L >= floor))
    a, b, w = ids[r], C[r, c], L[r, c].astype(np.int32)
    P = np.stack([np.minimum(a, b), np.maximum(a, b)], 1)
    if not len(P):
        return P, w
    order = np.lexsort((-w, P[:, 1], P[:, 0]))  # the more inliers first within each pair
    P, w = P[order], w[order]
    keep = np.ones(len(P), bool)
    keep[1:] = (P[1:] != P[:-1]).any(1)
    return P[keep], w[keep]


def mine_edges(X: np.ndarray, local: LocalCodes, verifier: Verifier, neighbours: int = NEIGHBOURS,
               progress=None, stored: LocalCodes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i, j), i < j, of a row of ``X`` (n, d, L2-normalised) and one of its ``neighbours``
    nearest by ``X``, with the inliers of their local features (``local``, row-aligned; the more of
    the two directions): (pairs (m, 2) int64, inliers (m,) int32), pairs with no inlier left out. The
    evidence the groups are built on (``groups.links``); ``mine_pairs`` keeps the sure ones.
    ``stored``: the features as an index keeps them (``LocalCodec.stored``), the side each photo
    is verified against (default ``local`` itself)."""
    n = len(X)
    if len(local) != n:
        raise ValueError(f"mine_pairs: {n} descriptors but {len(local)} photos' local features")
    _, nn = nearest(X, neighbours)
    every = np.ones(n, bool)
    # photos mined together verify each from its own side: their smaller scale's against the other's
    # larger, each way, as an index's verify a photo against those given before it (``mine_additions``)
    far = replace(local if stored is None else stored, coarse=None)
    inl = verify_candidates(local, nn, lambda js: (far[js], every[js]), verifier, progress)
    return edges_of(np.arange(n), nn, inl)


def mine_pairs(X: np.ndarray, local: LocalCodes, verifier: Verifier, neighbours: int = NEIGHBOURS,
               min_inliers: int | None = None, progress=None, stored: LocalCodes | None = None) -> np.ndarray:
    """Pairs (i, j), i < j, of rows of ``X`` (n, d, L2-normalised) whose local features (``local``,
    row-aligned) verify with at least ``min_inliers`` (None: ``verifier.sure``), among each
    row's ``neighbours`` nearest by ``X``: (m, 2) int64, sorted, each pair once. An index store
    mines its photos with the same steps as they are added (``mine_additions``)."""
    P, inl = mine_edges(X, local, verifier, neighbours, progress, stored)
    return P[inl >= (verifier.sure if min_inliers is None else min_inliers)]


def mine(X: np.ndarray, local: LocalCodes, verifier: Verifier, progress: bool = True,
         edges: bool = False, stored: LocalCodes | None = None):
    """``mine_pairs`` with a progress bar; ``edges``: ``mine_edges`` instead (``stored``: as theirs)."""
    from . import progress as P

    with P.bar(len(X), "mining pairs (collection)", "img", enabled=progress) as bar:
        got = mine_edges(X, local, verifier, progress=bar, stored=stored)
    return got if edges else got[0][got[1] >= verifier.sure]


def mine_additions(index, X: np.ndarray, local: LocalCodes, ids: np.ndarray,
                   verifier: Verifier, stored: LocalCodes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each photo being added to ``index`` (descriptors ``X``, local features ``local``, new ``ids``):
    its ``NEIGHBOURS`` nearest of the live photos (as ``index.search`` ranks them) and of the others
    being added, and their inliers with it (``verify_candidates``): two (n, NEIGHBOURS) arrays, ids
    -1 padded. Its partners are those at the sure level (``partners_from``); a photo added later
    finds its pairs with these from its own side. ``stored``: the additions' features as the index
    will keep them (``LocalCodec.stored``), what the others being added are verified against.

    A pair with a photo indexed before is verified again from that photo's side (``from_older``)
    where this side's inliers could leave a decision to it, as mining photos together verifies
    a pair from each side that has the other among its nearest."""
    sims, rows = nearest(X, NEIGHBOURS)
    cand = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
    if len(index):
        D, I = index.search(X, NEIGHBOURS)
        sims = np.concatenate([np.where(I >= 0, 1 - D / 2, -np.inf), sims], 1)
        cand = np.concatenate([I, cand], 1)
        cand = np.take_along_axis(cand, np.argsort(-sims, axis=1, kind="stable")[:, :NEIGHBOURS], 1)
    first = int(ids[0])

    far = replace(local if stored is None else stored, coarse=None)  # the others being added: as ``mine_edges``

    def codes_of(js):
        old = js < first
        codes, have = far[np.maximum(js - first, 0)], ~old
        if old.any():
            got, kept = index.local_codes(js[old], coarse=True)
            at = np.flatnonzero(old)[kept]
            if len(at) and got.codes.shape[1:] != codes.codes.shape[1:]:
                raise ValueError(f"its images keep local features of shape {got.codes.shape[1:]}, "
                                 f"the new ones {codes.codes.shape[1:]}")
            codes.codes[at], codes.cells[at], codes.count[at] = got.codes[kept], got.cells[kept], got.count[kept]
            if got.coarse is not None:  # the smaller scale an index keeps (``Config.coarse_local``): a photo
                # wider than one given before it verifies against it, as that one would have against this
                codes.coarse = LocalCodes.gathered(len(js), [(at, got.coarse[np.flatnonzero(kept)])])
            have[np.flatnonzero(old)] = kept
        return codes, have

    return cand, verify_candidates(local, cand, codes_of, verifier, back=(far, cand < first))


def from_older(inliers: np.ndarray, older: np.ndarray, candidates: LocalCodes, photo: LocalCodes,
               verifier: Verifier) -> np.ndarray:
    """``inliers`` (m,) of a photo being added (``photo``: its larger scale's features as an index
    keeps them, one row) with its ``candidates`` (their features and their kept smaller scale's),
    each the more of that and the inliers from the candidate's side, where the candidate was
    indexed before (``older``, (m,) bool) and the photo's side found from the chance level up to
    under the sure level: the band where the other side's count may change a decision (under it,
    where most candidates lie, a few inliers more seldom reach the weak level; at the sure level a
    pair is decided).

    Why: RANSAC from the other side samples other matches (by 1-2 inliers on average, up to 10),
    and mining photos together keeps the more of both sides. From one side, mvbench-dev put into an
    index in 20 commits in 3 random orders grouped at F1 0.942, 0.955 and 0.940 under the default
    rule; from both, 0.958, 0.956 and 0.955, against 0.958 mined together (docs/defaults.md,
    "Cross-scale mining"), for 12% more verifications."""
    out = np.array(inliers)
    for k in np.flatnonzero(older & (out >= verifier.chance) & (out < verifier.sure)):
        out[k] = max(int(out[k]), int(verifier.inliers_from(candidates, int(k), photo)[0]))
    return out


# -- augmentation ------------------------------------------------------------------------------------
def augment(X: np.ndarray, pairs: np.ndarray, weight: float = 1.0) -> np.ndarray:
    """Database-side augmentation over verified pairs: each row plus ``weight`` times the rows it is
    paired with, L2-normalised ((n, d) float32). Arandjelović & Zisserman's (2012) DBA adds each
    photo's top neighbours by the descriptor, right or wrong; here only those the verifier vouches
    for, with the plain sum (weight 1) of the original. A row's sum runs in the order of ``pairs``
    (sorted, as ``pairs_of`` gives them), so that an index store, which augments only the rows a
    search reads (``PairOverlay.augmented``), computes the same floats as this whole-array form."""
    X = np.asarray(X, np.float32)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    Y = X.copy()
    np.add.at(Y, pairs[:, 0], weight * X[pairs[:, 1]])
    np.add.at(Y, pairs[:, 1], weight * X[pairs[:, 0]])
    return Y / np.maximum(np.linalg.norm(Y, axis=1, keepdims=True), 1e-12)


# -- the live pairs of an index's generation ---------------------------------------------------------
class PairOverlay:
    """The live pairs of a generation by position (row of the generation), each listed under both of
    its ends for lookup: ``pairs`` (m, 2) sorted within each pair, ``ends`` (2m,) sorted, ``which``
    the pair of each end. Immutable: ``extended`` gives the next generation's.

    A photo's partners are summed in the order of ``pairs``, as ``augment`` sums them over pairs
    sorted by (first, second): the pairs are sorted so, and an appended commit's go after the older
    ones, which keeps each photo's order: each new pair holds a new photo, whose position is after
    every older one."""

    def __init__(self, pairs: np.ndarray, ends: np.ndarray, which: np.ndarray):
        self.pairs, self.ends, self.which = pairs, ends, which

    def __len__(self) -> int:
        return len(self.pairs)

    @staticmethod
    def build(pos: np.ndarray) -> "PairOverlay | None":
        """From pairs of positions (m, 2), -1 where a photo is gone (those pairs drop out); None when
        none are left."""
        pos = _live_sorted(pos)
        if not len(pos):
            return None
        ends = np.concatenate([pos[:, 0], pos[:, 1]])
        order = np.argsort(ends, kind="stable")
        return PairOverlay(pos, ends[order], np.concatenate([np.arange(len(pos))] * 2)[order])

    def extended(self, pos: np.ndarray) -> "PairOverlay":
        """This overlay with an appended commit's pairs of positions (as ``build``) after its own."""
        pos = _live_sorted(pos)
        if not len(pos):
            return self
        new_ends = np.concatenate([pos[:, 0], pos[:, 1]])
        order = np.argsort(new_ends, kind="stable")
        at = np.searchsorted(self.ends, new_ends[order], "right")
        new_which = (len(self.pairs) + np.concatenate([np.arange(len(pos))] * 2))[order]
        return PairOverlay(np.concatenate([self.pairs, pos]), np.insert(self.ends, at, new_ends[order]),
                           np.insert(self.which, at, new_which))

    def _of(self, pos: np.ndarray):
        """For each position: the index of each of its pairs (flat, in the order of ``pos``) and counts."""
        lo, hi = np.searchsorted(self.ends, pos, "left"), np.searchsorted(self.ends, pos, "right")
        lo[pos < 0] = hi[pos < 0] = 0
        n = hi - lo
        starts = np.repeat(lo, n) + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        return self.which[starts], n

    def partners(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each position's partners (positions), flat in the order of ``pos``, and how many each has."""
        pos = np.asarray(pos, np.int64)
        which, n = self._of(pos)
        P, me = self.pairs[which], np.repeat(pos, n)
        return np.where(P[:, 0] == me, P[:, 1], P[:, 0]), n

    def augmented(self, pos: np.ndarray, X: np.ndarray, rows) -> np.ndarray:
        """``X`` (the plain rows of positions ``pos``) augmented over their pairs, as ``augment`` over
        the whole generation would give them; ``rows(positions)`` reads plain rows."""
        which, n = self._of(pos)
        touched = n > 0
        if not touched.any():
            return X
        P = self.pairs[np.unique(which)]  # every pair of the rows asked for, in their order
        U = np.unique(P)
        X = X.copy()
        X[touched] = augment(rows(U), np.searchsorted(U, P))[np.searchsorted(U, pos[touched])]
        return X


def _live_sorted(pos: np.ndarray) -> np.ndarray:
    pos = np.asarray(pos, np.int64).reshape(-1, 2)
    return unique_pairs(np.sort(pos[(pos >= 0).all(1)], 1))


__all__ = ["AUGMENT", "AUGMENT_CHOICES", "NEIGHBOURS", "PairOverlay", "augment", "check_augment", "edges_of", "mine",
           "from_older", "mine_additions", "mine_edges", "mine_pairs", "nearest", "pairs_of", "partners_from", "unique_pairs",
           "verify_candidates"]
