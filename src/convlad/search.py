"""One search behind every door: from a query to ranked results with their inliers.

The command line (`search`, `explain --rank`), the service (its search, similar and match routes),
``eval`` and the library all rank through ``rank``, with one set of defaults (``Settings``): the k
nearest by the global descriptor, optionally after α-query expansion, then the top ``rerank``
re-ordered by spatial verification against the local features kept with each image. A query is
encoded with the index's own local-feature layout (``local_k``), so one photo scores the same
whichever door it comes through.

An index that augments (``augmented``: each photo's row summed with those of the photos it
verified with, ``pairs.augment``) is searched by those rows, while the verification's score
adds its bonus to the plain descriptors' similarity (``plain_distances``): its unit of evidence was
set against them, and the pairs that augmentation adds are the ones verification finds anyway.
On mvbench-dev that keeps the re-ranked ranking as it was without augmentation, query for query,
and lifts the global one from 0.811 to 0.835 (docs/defaults.md). The same pairs complete the
verification (``linked``): a shortlisted photo that a chain of them joins to one of the query's
sure matches scores at least as if it had verified at the sure level itself.

What is searched is any object with the small verbs of ``IndexStore``: ``search(Q, k)`` → squared
L2 and ids, ``vectors(ids)``, ``local_codes(ids)`` → (``LocalCodes``, stored mask), ``local_k`` and
``len``, and, where it keeps verified pairs, ``partners(ids)``, and where its local features are
verified elsewhere, ``verify(query, ids, verifier)`` → (``Evidence``, stored mask) (``index.shards``);
``MemoryIndex`` holds a benchmark's descriptors in memory for ``eval``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from .functional import alpha_query_expansion
from .index.ann import ExactIndex
from .verify import Evidence, LocalCodes, Verifier
from .pairs import augment

# The default re-ranking depth: +0.055 mAP on mvbench-dev [+0.030, +0.085]; as much on Lite1/2,
# MobileNetV2 and synthetic views (docs/defaults.md)
RERANK = 100
K = 10


@dataclass(frozen=True)
class Settings:
    """How a query is ranked. ``rerank`` None: ``RERANK`` where the index keeps local features,
    else 0 (an index without them is searched in global order whatever is asked)."""

    k: int = K
    rerank: int | None = None
    qe: int = 0  # α-query expansion with the top qe results (0: off)
    alpha: float = 3.0

    def resolve(self, index) -> "Settings":
        rerank = RERANK if self.rerank is None else self.rerank
        return replace(self, rerank=rerank if index.local_k else 0)

    def to_dict(self) -> dict:
        return {"k": self.k, "rerank": self.rerank, "qe": self.qe, "alpha": self.alpha}


DEFAULTS = Settings()


@dataclass
class Hit:
    """One result: its id in the index, 1-based rank, squared L2 distance of the global
    descriptors, the inliers of its spatial verification (None where it was not verified), and
    ``via``: the id of the photo it is linked through, one of the query's sure matches or a photo
    linked to one by the index's verified pairs, where its own inliers are fewer than sure
    (``linked``; None elsewhere); and ``same``: whether it shows the same object or place as the
    query by the rule the groups use (``groups.py``: verified at the sure level, or linked to a
    photo that is), else it only looks alike (None where it was not verified)."""

    id: int
    rank: int
    distance: float
    inliers: int | None = None
    via: int | None = None  # the photo it is ranked through, where its own inliers are fewer than sure (``linked``)
    same: bool | None = None

    def to_dict(self) -> dict:
        return {"rank": self.rank, "id": self.id, "distance": round(self.distance, 6), "inliers": self.inliers,
                "via": self.via, "same": self.same}


def verifier_of(index) -> Verifier:
    """The verifier for an index's local features: the one it carries, else its model's."""
    v = getattr(index, "verifier", None)
    return v if isinstance(v, Verifier) else index.model.verifier()


def rank(index, Q: np.ndarray, local: Sequence | None = None, settings: Settings = DEFAULTS,
         exclude: Sequence[Sequence[int]] | None = None, verifier: Verifier | None = None) -> list[list[Hit]]:
    """Rank ``index`` for each query descriptor of ``Q`` (nq, d). ``local``: each query's local
    features (``LocalCodes.features`` tuples, or None where it has none); ``exclude``: per query,
    ids that never appear in its results (an indexed query itself, a benchmark's junk)."""
    s = settings.resolve(index)
    Q = np.ascontiguousarray(np.atleast_2d(Q), dtype=np.float32)
    nq, n = len(Q), len(index)
    exclude = [np.asarray(sorted({int(i) for i in e}), np.int64) for e in exclude] if exclude is not None \
        else [np.zeros(0, np.int64)] * nq
    if n == 0 or nq == 0:
        return [[] for _ in range(nq)]

    def top(Q, want):
        D, ids = index.search(Q, min(n, want + max(len(e) for e in exclude)))
        out = []
        for d, i, e in zip(D, ids, exclude):
            keep = (i >= 0) & ~np.isin(i, e)
            out.append((d[keep][:want], i[keep][:want]))
        return out

    if s.qe > 0:
        nn = [i[:s.qe] for _, i in top(Q, s.qe)]
        if all(len(i) == s.qe for i in nn):
            Q = alpha_query_expansion(Q, index.vectors(np.concatenate(nn)).reshape(nq, s.qe, -1), s.alpha)
        else:  # fewer images than qe: each query expanded with what it has
            Q = np.concatenate([alpha_query_expansion(q[None], index.vectors(i)[None], s.alpha) for q, i in zip(Q, nn)])
    results = []
    v = None
    for qi, (dist, ids) in enumerate(top(Q, max(s.k, s.rerank))):
        inliers = [None] * len(ids)
        feats = local[qi] if local is not None else None
        if s.rerank and feats is not None and len(ids):
            v = v or verifier or verifier_of(index)
            ids, dist, inliers, via = rerank(index, feats, ids, dist, s.rerank, v, Q[qi])
        else:
            via = [None] * len(ids)
        sure = v.sure if v is not None else None
        results.append([Hit(int(i), r + 1, float(d), n_in, w, None if n_in is None else bool(n_in >= sure or w is not None))
                        for r, (i, d, n_in, w) in enumerate(zip(ids[:s.k], dist[:s.k], inliers[:s.k], via[:s.k]))])
    return results


def plain_distances(rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Squared L2 distances of ``rows`` (m, d) to ``q`` (d,): what an augmenting index's
    verification scores by (``rerank``; ``folds.SearchGrid`` computes them the same way)."""
    return ((np.asarray(rows, np.float32) - np.asarray(q, np.float32)) ** 2).sum(1)


def rerank(index, query, ids: np.ndarray, distances: np.ndarray, n: int, verifier: Verifier, q=None):
    """Spatial verification of the first ``n`` of a result list against ``query`` (descriptors,
    cells): (ids, distances, inliers, via) reordered, the rest after them unchanged (inliers None
    there, and where an image keeps no local features; via as ``Hit.via``). ``q``: the query's
    descriptor, for an index that augments (its plain distances are the ones scored)."""
    head = np.asarray(ids[:n])
    scored = distances[:n]
    if q is not None and getattr(index, "augmented", False):
        try:
            scored = plain_distances(index.vectors(head), q)
        except KeyError:  # deleted since the search (another thread refreshed): its own order stands
            pass
    ev, stored = verify(index, query, head, verifier)
    order, through = reorder(index, head, scored, ev, verifier)
    ids = np.concatenate([head[order], ids[n:]])
    distances = np.concatenate([np.asarray(distances[:n])[order], distances[n:]])
    rest = [None] * (len(ids) - len(head))
    via = [int(through[o]) if through[o] >= 0 else None for o in order]
    return ids, distances, [int(ev.inliers[o]) if stored[o] else None for o in order] + rest, via + rest


def verify(index, query, ids, verifier: Verifier):
    """(evidence, stored mask) of ``query`` (local features) against the photos ``ids``: by the
    index's own ``verify`` where it verifies elsewhere (a sharded index, on the shard that holds the
    features: only the evidence travels), else against its ``local_codes`` here."""
    own = getattr(index, "verify", None)
    if own is not None:
        return own(query, ids, verifier)
    codes, stored = index.local_codes(ids)
    return verifier.verify(query, codes, stored), stored


def reorder(index, head: np.ndarray, scored: np.ndarray, ev: Evidence, verifier: Verifier):
    """The last step of every re-ranking (``rerank``, and ``eval --folds``' grid, which verifies once
    for many settings): a verified shortlist ``head`` (ids), with the distances its score adds to
    (``scored``) and its evidence ``ev``, ordered by ``verifier.order_by`` with the links through the
    index's pairs (``linked``). Returns (the order, positions into ``head``; the photo each position
    is linked through, -1 where none)."""
    through = linked(index, head, ev.inliers, verifier)
    return verifier.order_by(scored, ev, through >= 0), through


def linked(index, head: np.ndarray, inliers: np.ndarray, verifier: Verifier) -> np.ndarray:
    """For each photo of a verified shortlist ``head`` (ids) that is not itself a sure match of the
    query (``inliers`` ≥ ``verifier.sure``), the photo it is linked through (-1: none, and for all
    where the verifier does not link, ``Verifier.links``): the photos of ``head``
    that the index's verified pairs (``partners``, mined at the same level) join to a sure match,
    directly or through other such photos of ``head``, each through the one that reached it first
    (the sure matches with the most inliers first). A second view of a place the query shares with a
    sure match verifies weakly with the query itself (from the other side, by night) and strongly
    with that match: on the synthetic views that photo was often ranked below unrelated ones that
    reach 10-15 inliers by chance; on mvbench-dev the chain of such pairs through a large group
    gains more than one step of it (docs/defaults.md)."""
    via = np.full(len(head), -1, np.int64)
    find = getattr(index, "partners", None)
    inliers, sure = np.asarray(inliers), verifier.sure
    frontier = np.flatnonzero(inliers >= sure)
    if find is None or not verifier.links or not len(frontier):
        return via
    frontier = frontier[np.argsort(-inliers[frontier], kind="stable")]
    at = {int(h): k for k, h in enumerate(head)}
    reached = np.asarray(inliers >= sure).copy()
    while len(frontier):  # each round one hop further; at most one round per photo of the shortlist
        nxt = []
        for a, b in find(head[frontier]):
            k = at.get(int(b))
            if k is not None and not reached[k]:
                reached[k], via[k] = True, a
                nxt.append(k)
        frontier = np.array(nxt, np.int64)
    return via


def encode(index, images, progress: bool = False):
    """Query photos encoded as the index's images were, with its local-feature layout
    (``pipeline.Encoded``; ``local`` None when the index keeps none)."""
    return index.model.transform(list(images), progress=progress, local=index.local_k)


def features(local: LocalCodes | None, n: int) -> list:
    """Per-row verification features of ``local`` (None rows where there are none)."""
    return [local.features(i) for i in range(n)] if local is not None else [None] * n


def search_images(index, images, settings: Settings = DEFAULTS, progress: bool = False):
    """Rank the index for each readable query photo: ([(query, [Hit, ...]), ...], errors)."""
    images = [str(p) for p in images]
    enc = encode(index, images, progress)
    hits = rank(index, enc.X, features(enc.local, len(enc)), settings)
    return [(images[i], h) for i, h in zip(enc.indices, hits)], enc.errors


def search_ids(index, ids, settings: Settings = DEFAULTS, verifier: Verifier | None = None) -> list[list[Hit]]:
    """Rank the index for indexed images (by id), each one left out of its own results
    (``KeyError`` for an id that is not in the index)."""
    ids = [int(i) for i in ids]
    Q = index.vectors(ids)
    local = None
    if settings.resolve(index).rerank:
        codes, have = index.local_codes(ids)
        local = [codes.features(j) if have[j] else None for j in range(len(ids))]
    return rank(index, Q, local, settings, exclude=[[i] for i in ids], verifier=verifier)


class MemoryIndex:
    """Descriptors (and local features) held in memory, ids = row numbers: a benchmark's database
    for ``eval``, searched exactly, through the same ``rank`` as a store. ``pairs`` (m, 2): verified
    pairs of rows (``pairs.mine_pairs``) to augment over, as a store that augments does."""

    def __init__(self, X: np.ndarray, local: LocalCodes | None = None, verifier: Verifier | None = None,
                 pairs: np.ndarray | None = None):
        self.X = np.ascontiguousarray(X, dtype=np.float32)
        self.local, self.verifier = local, verifier or Verifier()
        self.augmented = pairs is not None and len(pairs) > 0
        self._exact = ExactIndex(augment(self.X, pairs) if self.augmented else self.X)
        P = np.asarray(pairs if self.augmented else np.zeros((0, 2)), np.int64).reshape(-1, 2)
        both = np.concatenate([P, P[:, ::-1]])
        self._partners = both[np.argsort(both[:, 0], kind="stable")]

    def __len__(self) -> int:
        return len(self.X)

    @property
    def local_k(self) -> int:
        return int(self.local.codes.shape[1]) if self.local is not None else 0

    def search(self, Q: np.ndarray, k: int):
        return self._exact.search(Q, k)

    def vectors(self, ids) -> np.ndarray:
        return self.X[np.asarray(ids, np.int64)]

    def local_codes(self, ids):
        ids = np.asarray(ids, np.int64)
        return self.local[ids], np.ones(len(ids), bool)

    def partners(self, ids) -> np.ndarray:
        """(id, partner) for each verified pair of each of ``ids``, in the order of ``ids``: (m, 2)."""
        ids = np.asarray(ids, np.int64).ravel()
        P = self._partners
        lo, hi = np.searchsorted(P[:, 0], ids, "left"), np.searchsorted(P[:, 0], ids, "right")
        return np.concatenate([P[a:b] for a, b in zip(lo, hi)] or [np.zeros((0, 2), np.int64)])


__all__ = ["DEFAULTS", "Hit", "K", "MemoryIndex", "RERANK", "Settings", "encode", "features", "linked", "plain_distances", "rank",
           "rerank",
           "reorder", "search_ids", "search_images", "verifier_of", "verify"]
