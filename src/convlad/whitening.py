"""A whitening learned from matching pairs that the spatial verifier mines, without labels.

PCA-whitening flattens every direction in which photos differ, those that tell places apart and
those in which two views of one place differ alike. A learned whitening (Radenović, Tolias & Chum
2018; cirtorch's ``whitenlearn``) divides by the scatter of the differences between matching pairs
instead, so that what changes between views of one place weighs least. Its pairs come from the
photos themselves: each photo's nearest neighbours by the global descriptor are verified, and a pair
counts when its inliers reach three times the chance level (``mine_pairs``). Nothing here reads a
label. Three, not two: among mvbench-train's photos, which share no place, a photo and one of its
20 nearest reached 16-23 inliers (2-2.9 times Lite0's 8) nine times in 8 000 pairs (round things:
a clock, a wheel, a speaker; a watermark), and none reached 24.

On photos that share no place (mvbench-train) mining finds almost nothing, and the whitening is
then not learned (``MIN_PAIRS``). Learned from the collection being searched it is transductive;
``eval --whiten collection`` says so, and docs/defaults.md reports both settings.

The same pairs also augment the database (``augment``: each photo's descriptor plus its partners'),
by default: an index mines each photo it adds with these steps (``verified_partners``, from
``IndexStore.add_vectors``) and searches the augmented rows, and ``eval`` does the same in one go
(``from_collection``, which applies either step or both, mining once).

    >>> pairs = mine_pairs(X, local, model.verifier())            # (m, 2) photo pairs, i < j
    >>> lw = LearnedWhitening().fit(X, pairs)                     # shrinkage: Ledoit-Wolf
    >>> Z = lw.transform(X)                                       # (n, d) float32, rows L2-normalised
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .verify import LocalCodes, Verifier

# The database side is augmented by default, in an index and in eval: +0.024 global mAP out of fold on
# mvbench-dev [+0.004, +0.045], as much on synthetic views and three other backbones, and the
# re-ranked ranking as it was (docs/defaults.md, "Verified database-side augmentation")
AUGMENT = "verified"
NEIGHBOURS = 20  # each photo's nearest verified for mining
MIN_PAIRS = 16  # fewer, and the scatter is all shrinkage (Ledoit-Wolf's): not worth learning


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


def verified_partners(local: LocalCodes, candidates: np.ndarray, codes_of, verifier: Verifier,
                      min_inliers: int | None = None, progress=None) -> np.ndarray:
    """For each photo ``i`` of ``local`` (the local features of photos being mined), those of its
    ``candidates[i]`` (ids, -1 padded) whose local features verify with its own at ``min_inliers``
    or more (None: ``verifier.sure``, ``verify.SURE`` times its chance level): (n, width) int64, in the candidates'
    order, -1 padded. ``codes_of(ids)`` → (``LocalCodes``, a mask of the ids that have them)."""
    candidates = np.asarray(candidates, np.int64).reshape(len(local), -1)
    min_inliers = verifier.sure if min_inliers is None else min_inliers
    out = np.full(candidates.shape, -1, np.int64)
    for i, row in enumerate(candidates):
        js = row[row >= 0]
        if len(js):
            codes, have = codes_of(js)
            js, codes = js[have], codes[np.flatnonzero(have)]
            ok = js[verifier.inliers(local.features(i), codes) >= min_inliers] if len(js) else js
            out[i, :len(ok)] = ok
        if progress is not None:
            progress.update(1)
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


def mine_pairs(X: np.ndarray, local: LocalCodes, verifier: Verifier, neighbours: int = NEIGHBOURS,
               min_inliers: int | None = None, progress=None) -> np.ndarray:
    """Pairs (i, j), i < j, of rows of ``X`` (n, d, L2-normalised) whose local features (``local``,
    row-aligned) verify with at least ``min_inliers`` (None: as ``verified_partners``), among each
    row's ``neighbours`` nearest by ``X``: (m, 2) int64, sorted, each pair once. An index store
    mines its photos with the same steps as they are added (``IndexStore.add_vectors``)."""
    n = len(X)
    if len(local) != n:
        raise ValueError(f"mine_pairs: {n} descriptors but {len(local)} photos' local features")
    _, nn = nearest(X, neighbours)
    every = np.ones(n, bool)
    partners = verified_partners(local, nn, lambda js: (local[js], every[js]), verifier, min_inliers, progress)
    return pairs_of(np.arange(n), partners)


def ledoit_wolf(D: np.ndarray) -> float:
    """The shrinkage towards a multiple of the identity that Ledoit & Wolf (2004) estimate for the
    scatter of the zero-mean rows ``D`` (m, d): the one choice it leaves needs no tuning."""
    m, d = D.shape
    S = D.T @ D / m
    mu = np.trace(S) / d
    delta = ((S - mu * np.eye(d)) ** 2).sum() / d
    if delta <= 0:
        return 1.0
    # the mean squared distance of each rank-one term from S, computed without forming them
    sq = (D ** 2).sum(1)
    beta = ((sq ** 2).sum() / m - (S ** 2).sum()) / d / m
    return float(min(max(beta, 0.0), delta) / delta)


class LearnedWhitening:
    """x → L2n(P (x − mean)), with P P^T the inverse of the (shrunk) scatter of the differences of
    matching pairs (Radenović et al. 2018, without their final PCA: a rotation, it leaves every
    distance as it is). ``fit`` returns self; the learned state ends in ``_``; ``transform`` is pure."""

    def __init__(self, shrinkage: float | None = None):
        self.shrinkage = shrinkage  # None: Ledoit-Wolf's estimate

    def fit(self, X: np.ndarray, pairs: np.ndarray) -> "LearnedWhitening":
        X = np.asarray(X, np.float64)
        pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
        if len(pairs) == 0:
            raise ValueError("learned whitening: no matching pairs to learn from")
        D = X[pairs[:, 0]] - X[pairs[:, 1]]
        D = np.concatenate([D, -D])  # both orders: the scatter of differences has mean zero
        s = ledoit_wolf(D) if self.shrinkage is None else float(self.shrinkage)
        S = D.T @ D / len(D)
        S = (1 - s) * S + s * np.trace(S) / len(S) * np.eye(len(S))
        self.mean_ = X.mean(0).astype(np.float32)
        try:
            self.projection_ = np.linalg.inv(np.linalg.cholesky(S)).astype(np.float32)
        except np.linalg.LinAlgError:
            raise ValueError(f"learned whitening: the scatter of {len(pairs)} pairs' differences is singular in "
                             f"{S.shape[0]}-D at shrinkage {s:g}: mine more pairs, or shrink more") from None
        self.shrinkage_, self.n_pairs_ = s, len(pairs)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        Z = (np.asarray(X, np.float32) - self.mean_) @ self.projection_.T
        return (Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def get_state(self) -> dict:
        return {"params": {"shrinkage": self.shrinkage, "shrinkage_": self.shrinkage_, "n_pairs": self.n_pairs_},
                "arrays": {"mean": self.mean_, "projection": self.projection_}}

    @classmethod
    def from_state(cls, state: dict) -> "LearnedWhitening":
        p = state["params"]
        self = cls(p["shrinkage"])
        self.mean_, self.projection_ = state["arrays"]["mean"], state["arrays"]["projection"]
        self.shrinkage_, self.n_pairs_ = p["shrinkage_"], p["n_pairs"]
        return self


def mine(X: np.ndarray, local: LocalCodes, verifier: Verifier, progress: bool = True) -> np.ndarray:
    """``mine_pairs`` with a progress bar."""
    from . import progress as P

    with P.bar(len(X), "mining pairs (collection)", "img", enabled=progress) as bar:
        return mine_pairs(X, local, verifier, progress=bar)


def learn_whitening(X: np.ndarray, local: LocalCodes, verifier: Verifier, progress: bool = True, pairs=None):
    """Mine pairs among ``X``'s photos (unless given) and learn a whitening from them:
    (``LearnedWhitening`` or None when fewer than ``MIN_PAIRS`` were found, the pairs)."""
    if pairs is None:
        pairs = mine(X, local, verifier, progress)
    if len(pairs) < MIN_PAIRS:
        return None, pairs
    return LearnedWhitening().fit(X, pairs), pairs


def augment(X: np.ndarray, pairs: np.ndarray, weight: float = 1.0) -> np.ndarray:
    """Database-side augmentation over verified pairs: each row plus ``weight`` times the rows it is
    paired with, L2-normalised ((n, d) float32). Arandjelović & Zisserman's (2012) DBA adds each
    photo's top neighbours by the descriptor, right or wrong; here only those the verifier vouches
    for, with the plain sum (weight 1) of the original. A row's sum runs in the order of ``pairs``
    (sorted, as ``pairs_of`` gives them), so that an index store, which augments only the rows a
    search reads, computes the same floats as this whole-array form."""
    X = np.asarray(X, np.float32)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    Y = X.copy()
    np.add.at(Y, pairs[:, 0], weight * X[pairs[:, 1]])
    np.add.at(Y, pairs[:, 1], weight * X[pairs[:, 0]])
    return Y / np.maximum(np.linalg.norm(Y, axis=1, keepdims=True), 1e-12)


@dataclass
class Collection:
    """The steps learned from the encoded collection itself (transductive, no labels): ``X`` the
    database's descriptors and ``X_extra`` the queries outside it (whitened as learned, or as they
    were); ``pairs`` the verified pairs the database is augmented over, searched as
    ``search.MemoryIndex(X, pairs=pairs)`` and an index that augments search it (None: not
    augmented; a query always searches with its own descriptor, as a new photo would); ``mined``
    how many pairs were mined; ``notes`` what was learned."""

    X: np.ndarray
    X_extra: np.ndarray | None
    notes: list[str]
    pairs: np.ndarray | None = None
    mined: int = 0


def from_collection(X, X_extra, local: LocalCodes, verifier: Verifier, whiten: str = "pca", augmented: str = "none",
                    progress: bool = True, pairs=None) -> Collection:
    """``whiten="collection"``: a whitening learned from pairs mined in the database (a ValueError
    where fewer than ``MIN_PAIRS`` are found). ``augmented="verified"``: the database augmented over
    the same pairs (``augment``). ``pairs``: mined already."""
    if whiten not in ("pca", "collection"):
        raise ValueError(f"whiten={whiten!r}: pca or collection")
    if augmented not in ("none", "verified"):
        raise ValueError(f"augment={augmented!r}: none or verified")
    out = Collection(X, X_extra, [])
    if whiten == "pca" and augmented == "none":
        return out
    pairs = mine(X, local, verifier, progress) if pairs is None else pairs
    out.mined = len(pairs)
    if whiten == "collection":
        lw, _ = learn_whitening(X, local, verifier, pairs=pairs)
        if lw is None:
            raise ValueError(f"learned whitening: {len(pairs)} pairs mined in the collection, fewer than {MIN_PAIRS}")
        out.X = lw.transform(X)
        out.X_extra = lw.transform(X_extra) if X_extra is not None else None
        out.notes.append(f"whitening learned from {lw.n_pairs_} pairs mined in the database photos (shrinkage "
                         f"{lw.shrinkage_:.3f}), after PCA")
    if augmented == "verified":
        out.pairs = pairs
        out.notes.append(f"database descriptors augmented with their partners in {len(pairs)} verified pairs "
                         "(queries search with their own)")
    return out


__all__ = ["AUGMENT", "Collection", "LearnedWhitening", "MIN_PAIRS", "NEIGHBOURS", "augment", "from_collection",
           "learn_whitening", "ledoit_wolf", "mine", "mine_pairs", "nearest", "pairs_of", "unique_pairs",
           "verified_partners"]
