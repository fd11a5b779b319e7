"""A learned whitening of the local features the spatial verifier matches, from training photos
and synthetic views of them, with no label.

A conv layer's features are matched by cosine similarity (``Verifier.tentative``), which weighs
every direction of the feature space alike, including those along which the same surface varies
most from one view to another. Learned whitening (Mikolajczyk & Matas 2007 for local descriptors;
Radenović et al. 2016 for global ones) divides those out: the covariance of the differences
between matching features, Σ, whitened (Σ^-1/2), then rotated onto the principal axes of the
features so whitened. Matches come free: each training photo against a synthetic view of it
(``views.view``: a crop, a turn, a perspective jitter, a gamma change), the inliers of the affine
map the verifier fits where the pair verifies at the sure level.

The model's pair verifier (``ConvVLAD.pair_verifier``: mining, and the groups, augmentation and
links built on its pairs) maps both sides' features before matching them (``Verifier.metric``), at
a chance level measured that way; the features an index stores stay what they were. Out of fold on
mvbench-dev the groups' pairwise F1 rose from 0.943 to 0.956 with Lite0 and from 0.935 to 0.951
with Lite2, and on the synthetic views from 0.967 to 0.977, precision held. A search's shortlist is
re-ranked without it (``ConvVLAD.verifier``): there it scored 0.010 mAP lower with Lite0 and 0.007
with Lite2 on mvbench-dev (within noise, both), docs/defaults.md ("Local whitening").
"""
from __future__ import annotations

import numpy as np

from .verify import LocalCodes, Verifier

EPS = 0.1  # Σ + EPS·mean(eigenvalue)·I: the directions that hardly vary are not blown up


def inlier_differences(verifier: Verifier, photos: LocalCodes, views: LocalCodes, min_inliers: int) -> np.ndarray:
    """The differences (m, d) float32 between the matched features of each photo and its view (row
    ``i`` of ``photos`` and of ``views``), the inliers of the pairs with ``min_inliers`` or more."""
    out = []
    for i in range(len(photos)):
        q, photo = views.features(i), photos[[i]]
        m = verifier.match(q, photo)
        if m.n_inliers >= min_inliers:
            out.append(q[0][m.query_rows[m.inliers]] - photo.descriptors()[0][m.candidate_rows[m.inliers]])
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, photos.codes.shape[2]), np.float32)


class LocalWhitening:
    """``fit(differences, features)``: ``P_`` (d, d) float32, the map to apply to a feature before
    it is re-normalised (``Verifier.metric``, which applies it: ``verify.whiten``)."""

    def __init__(self, eps: float = EPS):
        self.eps = eps

    def fit(self, differences: np.ndarray, features: np.ndarray) -> "LocalWhitening":
        D = np.asarray(differences, np.float64)
        F = np.asarray(features, np.float64)
        d = F.shape[1]
        if len(D) < 2 * d:
            raise ValueError(f"local whitening: {len(D)} matched features, at least {2 * d} needed")
        S = D.T @ D / len(D)
        s, U = np.linalg.eigh(S + self.eps * np.trace(S) / d * np.eye(d))
        W = (U / np.sqrt(s)) @ U.T  # Σ^-1/2
        Y = (F - F.mean(0)) @ W
        _, V = np.linalg.eigh(Y.T @ Y / len(Y))
        self.P_ = np.ascontiguousarray((V[:, ::-1].T @ W).astype(np.float32))
        return self


__all__ = ["EPS", "LocalWhitening", "inlier_differences"]
