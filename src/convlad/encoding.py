"""Encoding estimators, scikit-learn style: ``fit`` returns self, learned state ends in ``_``,
``transform`` is pure. State round-trips through plain dicts of numpy arrays (no pickled code)."""
from __future__ import annotations

import faiss
import numpy as np
import torch

from . import functional as Fn


def _as_f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


class NotFittedError(RuntimeError):
    pass


def _on_device(owner, name: str, device, make) -> torch.Tensor:
    """Learned arrays as tensors on ``device``, converted once rather than once per batch (on CUDA
    each conversion is a host-to-device copy of the whole array)."""
    cache = owner.__dict__.setdefault("_device_cache", {})
    key = (name, str(device))
    if key not in cache:
        cache[key] = torch.as_tensor(make(), device=device)
    return cache[key]


class VLAD:
    """VLAD encoder with a k-means vocabulary (faiss).

    ``fit(X)``: X (n, d) local descriptors (L2-normalised) → ``centroids_`` (k, d).
    ``transform(X)``: X (B, N, d) (or (N, d) for one image) → (B, k·d) float32.
    """

    def __init__(self, k: int = 100, power: float | None = None, intra: bool = True,
                 residual_norm: bool = False, niter: int = 25, max_points_per_centroid: int = 1000,
                 seed: int = 0):
        self.k, self.power, self.intra, self.residual_norm = k, power, intra, residual_norm
        self.niter, self.max_points_per_centroid, self.seed = niter, max_points_per_centroid, seed

    def fit(self, X) -> "VLAD":
        X = _as_f32(X)
        if len(X) < self.k:
            raise ValueError(f"k-means needs at least k={self.k} descriptors, got {len(X)}")
        km = faiss.Kmeans(X.shape[1], self.k, niter=self.niter, seed=self.seed, spherical=False,
                          max_points_per_centroid=self.max_points_per_centroid, verbose=False)
        km.train(X)
        self.centroids_ = km.centroids.copy()
        self.__dict__.pop("_device_cache", None)
        return self

    @property
    def dim(self) -> int:
        return self.k * self._centroids().shape[1]

    def _centroids(self) -> np.ndarray:
        if not hasattr(self, "centroids_"):
            raise NotFittedError("VLAD is not fitted: call fit() first")
        return self.centroids_

    def encode(self, X: torch.Tensor) -> torch.Tensor:
        """Torch in, torch out, on X's device: the batched hot path used by the pipeline."""
        c = _on_device(self, "centroids", X.device, self._centroids)
        v = Fn.vlad(X.float(), c, residual_norm=self.residual_norm)
        return Fn.normalize_vlad(v, power=self.power, intra=self.intra)

    def transform(self, X) -> np.ndarray:
        X = torch.as_tensor(_as_f32(X))
        if X.ndim == 2:
            X = X.unsqueeze(0)
        return self.encode(X).numpy()

    def get_state(self) -> dict:
        return {"params": {"k": self.k, "power": self.power, "intra": self.intra,
                           "residual_norm": self.residual_norm},
                "arrays": {"centroids": self._centroids()}}

    @classmethod
    def from_state(cls, state: dict) -> "VLAD":
        self = cls(**state["params"])
        self.centroids_ = _as_f32(state["arrays"]["centroids"])
        return self


EXACT_PCA_MAX = 3000  # above this (in both n and d), PCA goes through a randomized SVD


def _exact_pca(Xc: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``m`` eigenvalues (of Xcᵀ·Xc, descending) and unit principal directions (rows) of centred
    data, through the smaller of the Gram (n×n) and covariance (d×d) matrices. The product is
    float32 (the float64 copy of a 577 × 10⁵ VLAD matrix alone is half a gigabyte); the
    eigendecomposition of the small matrix is float64."""
    n, d = Xc.shape
    if n < d:
        evals, evecs = np.linalg.eigh((Xc @ Xc.T).astype(np.float64))
        order = np.argsort(evals)[::-1]
        evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
        keep = evals > max(evals[0], 1e-30) * 1e-10
        evals, evecs = evals[keep][:m], evecs[:, keep][:, :m]
        return evals, ((Xc.T @ evecs.astype(np.float32)) / np.sqrt(evals).astype(np.float32)).T
    evals, evecs = np.linalg.eigh((Xc.T @ Xc).astype(np.float64))
    order = np.argsort(evals)[::-1][:m]
    return np.clip(evals[order], 0, None), evecs[:, order].T


class PCAWhitening:
    """PCA to ``n_components`` then whitening, then L2 (Jégou & Chum 2012).

    ``whiten_power``: each component is divided by variance**whiten_power; 0.5 is full whitening,
    0 plain PCA. ``shrinkage`` adds a fraction of the mean retained variance to every eigenvalue
    before whitening, so that the weakest components (poorly estimated from a small training set)
    are not blown up.

    The PCA never forms a D×D covariance when D is large: exact through the n×n Gram matrix when
    one side is small, a randomized SVD otherwise. It works for VLADs of 10⁴–10⁵ dimensions, where
    faiss' PCAMatrix would need a D×D matrix.
    """

    def __init__(self, n_components: int = 128, whiten_power: float = 0.5, shrinkage: float = 0.0):
        self.n_components, self.whiten_power, self.shrinkage = n_components, whiten_power, shrinkage

    def fit(self, X) -> "PCAWhitening":
        X = np.asarray(X, dtype=np.float32)
        n, d = X.shape
        if n < 2:
            raise ValueError("PCA-whitening needs at least 2 training vectors")
        mean = X.mean(0, dtype=np.float64)
        m = min(self.n_components, n - 1, d)
        if min(n, d) <= EXACT_PCA_MAX:
            evals, comps = _exact_pca(X - mean.astype(np.float32), m)
        else:
            # randomized SVD (Halko et al. 2011): only the top m directions are needed, and an exact
            # eigendecomposition of a 10⁴×10⁴ matrix takes minutes
            A = torch.from_numpy(X)
            U, S, V = torch.svd_lowrank(A, q=min(m + 64, min(n, d)), niter=6,
                                        M=torch.from_numpy(mean.astype(np.float32)).expand(1, d))
            evals, comps = (S.double() ** 2).numpy(), V.T.double().numpy()
        self.mean_ = mean.astype(np.float32)
        self.components_ = np.ascontiguousarray(comps[:m], dtype=np.float32)
        self.explained_variance_ = (evals[:m] / (n - 1)).astype(np.float32)
        self.__dict__.pop("_device_cache", None)
        return self

    @property
    def n_components_(self) -> int:
        return len(self.components_)

    def _scale(self) -> np.ndarray:
        var = self.explained_variance_.astype(np.float64)
        var = var + self.shrinkage * var.mean()
        return (var ** -self.whiten_power).astype(np.float32)

    def encode(self, X: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "components_"):
            raise NotFittedError("PCAWhitening is not fitted: call fit() first")
        dev = X.device
        mean = _on_device(self, "mean", dev, lambda: self.mean_)
        comps = _on_device(self, "components", dev, lambda: self.components_)
        scale = _on_device(self, "scale", dev, self._scale)
        return Fn.l2n((X.float() - mean) @ comps.T * scale)

    def transform(self, X) -> np.ndarray:
        return self.encode(torch.as_tensor(_as_f32(X))).numpy()

    def get_state(self) -> dict:
        return {"params": {"n_components": self.n_components, "whiten_power": self.whiten_power,
                           "shrinkage": self.shrinkage},
                "arrays": {"mean": self.mean_, "components": self.components_,
                           "explained_variance": self.explained_variance_}}

    @classmethod
    def from_state(cls, state: dict) -> "PCAWhitening":
        self = cls(**state["params"])
        a = state["arrays"]
        self.mean_, self.components_ = _as_f32(a["mean"]), _as_f32(a["components"])
        self.explained_variance_ = _as_f32(a["explained_variance"])
        return self

