"""Pure functions of the pipeline: local descriptors, VLAD, normalisations, query expansion.

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


ASSIGN_CHUNK = 16384  # rows per block: the (rows, k) score block stays in cache, 2× faster on CPU


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each row of x (..., d): argmin ‖x − c‖² = argmax x·c − ‖c‖²/2.

    Blocks of rows reuse one score buffer: for shallow layers (d = 16–40, 10⁴–10⁵ positions per
    image) the product is memory-bound, and a full (N, k) score matrix per batch would spend more
    time in page faults and cache misses than in arithmetic.
    """
    half_sq = 0.5 * (centroids * centroids).sum(1)
    flat = x.reshape(-1, x.shape[-1])
    n, ct = flat.shape[0], centroids.T
    on_cpu = x.device.type == "cpu" and x.dtype == torch.float32
    out = torch.empty(n, dtype=torch.long, device=x.device)
    buf = torch.empty(min(n, ASSIGN_CHUNK), centroids.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, n, ASSIGN_CHUNK):
        e = min(s + ASSIGN_CHUNK, n)
        torch.addmm(-half_sq, flat[s:e], ct, out=buf[: e - s])
        if on_cpu:  # numpy's SIMD argmax over rows is 3× faster than torch's on CPU
            np.argmax(buf[: e - s].numpy(), axis=1, out=out[s:e].numpy())
        else:
            torch.argmax(buf[: e - s], dim=-1, out=out[s:e])
    return out.view(x.shape[:-1])


def vlad(x: torch.Tensor, centroids: torch.Tensor, residual_norm: bool = False) -> torch.Tensor:
    """Sum of residuals to the nearest visual word, batched: x (B, N, d), centroids (k, d) → (B, k, d).

    One matrix product for the assignment and one index-add for the sums, whatever N: the word of
    image b's descriptor is row b·k + word of a (B·k, d) table (a 1-D index, 1.5–4× faster than a
    scatter-add along an expanded one).
    ``residual_norm`` L2-normalises each residual before summing (Delhumeau et al. 2013), so that a
    few descriptors far from their word cannot dominate its component.
    """
    b, n, d = x.shape
    k = centroids.shape[0]
    idx = assign(x, centroids)  # (B, N)
    rows = (idx + torch.arange(b, device=x.device).unsqueeze(1) * k).reshape(-1)
    out = x.new_zeros(b * k, d)
    if residual_norm:
        out.index_add_(0, rows, l2n(x - centroids[idx]).reshape(-1, d))
        return out.view(b, k, d)
    out.index_add_(0, rows, x.reshape(-1, d))
    counts = torch.bincount(rows, minlength=b * k).to(x.dtype)
    return (out - counts.unsqueeze(1) * centroids.repeat(b, 1)).view(b, k, d)


def normalize_vlad(v: torch.Tensor, power: float | None = None, intra: bool = True) -> torch.Tensor:
    """(B, k, d) residual sums → (B, k·d): optional signed power (0.5 = signed square root), then
    intra-normalisation (each word's block to unit L2, Arandjelović & Zisserman 2013), then L2."""
    if power is not None and power != 1.0:
        v = v.sign() * v.abs().pow(power)
    if intra:
        v = l2n(v, dim=-1)
    return l2n(v.flatten(1), dim=-1)


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
