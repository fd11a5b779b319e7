"""Pure functions of the pipeline: local descriptors, VLAD, normalisations, average precision.

Tensors are torch (so the same code runs on CPU and CUDA); arrays crossing the public API are
float32 numpy ``(n, d)``, rows are samples.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def l2n(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=dim, eps=eps)


def local_descriptors(fmap: torch.Tensor) -> torch.Tensor:
    """Feature map (B, d, h, w) → (B, h·w, d): one L2-normalised descriptor per spatial position."""
    b, d = fmap.shape[:2]
    return l2n(fmap.reshape(b, d, -1).transpose(1, 2).float())


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each row of x (..., d): argmin ‖x − c‖² = argmax x·c − ‖c‖²/2."""
    half_sq = 0.5 * (centroids * centroids).sum(1)
    return torch.argmax(x @ centroids.T - half_sq, dim=-1)


def vlad(x: torch.Tensor, centroids: torch.Tensor, residual_norm: bool = False) -> torch.Tensor:
    """Sum of residuals to the nearest visual word, batched: x (B, N, d), centroids (k, d) → (B, k, d).

    One matrix product for the assignment and one scatter-add for the sums, whatever N.
    ``residual_norm`` L2-normalises each residual before summing (Delhumeau et al. 2013), so that a
    few descriptors far from their word cannot dominate its component.
    """
    b, n, d = x.shape
    k = centroids.shape[0]
    idx = assign(x, centroids)  # (B, N)
    out = x.new_zeros(b, k, d)
    if residual_norm:
        out.scatter_add_(1, idx.unsqueeze(-1).expand(b, n, d), l2n(x - centroids[idx]))
        return out
    out.scatter_add_(1, idx.unsqueeze(-1).expand(b, n, d), x)
    counts = x.new_zeros(b, k).scatter_add_(1, idx, x.new_ones(b, n))
    return out - counts.unsqueeze(-1) * centroids


def normalize_vlad(v: torch.Tensor, power: float | None = None, intra: bool = True) -> torch.Tensor:
    """(B, k, d) residual sums → (B, k·d): optional signed power (0.5 = signed square root), then
    intra-normalisation (each word's block to unit L2, Arandjelović & Zisserman 2013), then L2."""
    if power is not None and power != 1.0:
        v = v.sign() * v.abs().pow(power)
    if intra:
        v = l2n(v, dim=-1)
    return l2n(v.flatten(1), dim=-1)


def average_precision(ranks_of_positives: np.ndarray, n_positives: int) -> float:
    """AP with the interpolation of the official Oxford ``compute_ap``.

    ``ranks_of_positives``: 0-based positions of the positives in the ranking *after junk images are
    removed from it* (junk consumes no rank). Precision at recall 0 is taken as 1 and the curve is
    integrated with the trapezoid rule between successive recall points. A query without positives
    has no defined AP: NaN, for the caller to exclude.
    """
    if n_positives == 0:
        return float("nan")
    ranks = np.sort(np.asarray(ranks_of_positives, dtype=np.float64))
    i = np.arange(len(ranks), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(ranks > 0, i / np.maximum(ranks, 1), 1.0)
    p1 = (i + 1) / (ranks + 1)
    return float(np.sum((p0 + p1) / 2) / n_positives)


def ap_of_ranking(ranking, positives, junk=()) -> float:
    """AP of one ranked list of ids, given its positive and junk ids (junk skipped, consuming no rank)."""
    positives, junk = set(positives), set(junk)
    kept = [r for r in ranking if r not in junk]
    ranks = [i for i, r in enumerate(kept) if r in positives]
    return average_precision(np.array(ranks), len(positives))


def alpha_query_expansion(q: np.ndarray, neighbours: np.ndarray, alpha: float = 3.0) -> np.ndarray:
    """α-QE (Radenović, Tolias & Chum 2018): each query plus its top neighbours, weighted by their
    cosine similarity to the query raised to ``alpha``, re-normalised. q (nq, d); neighbours (nq, n, d).

    A second search with the expanded query finds views that resemble the first hits more than the
    query itself (another side of the same building, the same object in other light).
    """
    q = np.asarray(q, dtype=np.float32)
    sims = np.clip(np.einsum("qd,qnd->qn", q, neighbours), 0, None) ** alpha
    out = q + np.einsum("qn,qnd->qd", sims, neighbours)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
