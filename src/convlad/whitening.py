"""A whitening learned from matching pairs that the spatial verifier mines, without labels.

PCA-whitening flattens every direction in which photos differ, those that tell places apart and
those in which two views of one place differ alike. A learned whitening (Radenović, Tolias & Chum
2018; cirtorch's ``whitenlearn``) divides by the scatter of the differences between matching pairs
instead, so that what changes between views of one place weighs least. Its pairs come from the
photos themselves (``pairs.mine_pairs``: the verified-pair graph's room); nothing here reads a label.

On photos that share no place (mvbench-train) mining finds almost nothing, and the whitening is
then not learned (``MIN_PAIRS``). Learned from the collection being searched it is transductive;
``eval --whiten collection`` says so, and docs/defaults.md reports both settings. ``from_collection``
applies it, the database's augmentation over the same pairs (``pairs.augment``), or both, mining once.

    >>> pairs = mine_pairs(X, local, model.pair_verifier())       # (m, 2) photo pairs, i < j
    >>> lw = LearnedWhitening().fit(X, pairs)                     # shrinkage: Ledoit-Wolf
    >>> Z = lw.transform(X)                                       # (n, d) float32, rows L2-normalised
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .pairs import check_augment, mine
from .verify import LocalCodes, Verifier

MIN_PAIRS = 16  # fewer, and the scatter is all shrinkage (Ledoit-Wolf's): not worth learning


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


def learn_whitening(X: np.ndarray, local: LocalCodes, verifier: Verifier, progress: bool = True, pairs=None):
    """Mine pairs among ``X``'s photos (unless given) and learn a whitening from them:
    (``LearnedWhitening`` or None when fewer than ``MIN_PAIRS`` were found, the pairs)."""
    if pairs is None:
        pairs = mine(X, local, verifier, progress)
    if len(pairs) < MIN_PAIRS:
        return None, pairs
    return LearnedWhitening().fit(X, pairs), pairs


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
    check_augment(augmented)
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


__all__ = ["Collection", "LearnedWhitening", "MIN_PAIRS", "from_collection", "learn_whitening", "ledoit_wolf"]
