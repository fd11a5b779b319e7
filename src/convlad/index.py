"""A searchable index of a photo folder: descriptors, relative paths, file stamps, and the model that
made them (so ``search`` needs nothing but the index file).

Indexing is incremental and resumable: files already indexed with an unchanged size and mtime are
kept, new or changed ones are encoded, vanished ones dropped, and progress is checkpointed
atomically every few hundred images, so a crashed or interrupted run picks up where it stopped.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from .functional import alpha_query_expansion
from .images import list_images
from .pipeline import ConvVLAD
from .storage import FileFormatError, atomic_savez, load_npz

FORMAT = "convlad-index"
FORMAT_VERSION = 1


ANN_THRESHOLD = 100_000  # "auto": exact search below this many images, IVF-PQ from here on
ANN_NPROBE = 16  # inverted lists visited per query (recall/latency: `make bench`)
ANN_RERANK = 10  # candidates re-ranked with exact distances, per result asked for
CHECKPOINT_SPACING = 10.0  # index checkpoints: at least this many times the last save's duration apart


class AnnIndex:
    """IVF-PQ (faiss) over the index's descriptors, its shortlist re-ranked with exact distances.

    The PQ codes (32 bytes per image) find ``k · ANN_RERANK`` candidates among the ``nprobe``
    nearest of about √n inverted lists; their exact L2 distances, from the full vectors the index
    keeps anyway, give the final order. So the distances reported are exact, only the shortlist is
    approximate.
    """

    def __init__(self, ivf, X: np.ndarray, factory: str):
        self.ivf, self.X, self.factory = ivf, X, factory
        self.set_nprobe(ANN_NPROBE)

    def set_nprobe(self, nprobe: int) -> None:
        faiss.extract_index_ivf(self.ivf).nprobe = nprobe

    @property
    def ntotal(self) -> int:
        return self.ivf.ntotal

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        Q = np.ascontiguousarray(Q, dtype=np.float32)
        _, cand = self.ivf.search(Q, min(self.ntotal, k * ANN_RERANK))
        D = np.full((len(Q), k), np.inf, np.float32)
        I = np.full((len(Q), k), -1, np.int64)
        for i, c in enumerate(cand):
            c = c[c >= 0]
            d = ((self.X[c] - Q[i]) ** 2).sum(1)
            order = np.argsort(d, kind="stable")[:k]
            D[i, :len(order)], I[i, :len(order)] = d[order], c[order]
        return D, I

    def add(self, X_new: np.ndarray, X_all: np.ndarray) -> None:
        self.ivf.add(np.ascontiguousarray(X_new, dtype=np.float32))
        self.X = X_all

    def to_array(self) -> np.ndarray:
        return faiss.serialize_index(self.ivf)

    @classmethod
    def from_array(cls, data: np.ndarray, X: np.ndarray, factory: str) -> "AnnIndex":
        return cls(faiss.deserialize_index(np.ascontiguousarray(data, dtype=np.uint8)), X, factory)


class ExactIndex:
    """Exact L2 search as one matrix product and a top-k per block of queries (torch, all cores).

    faiss' flat index scans the database on a single thread for a lone query; a search command
    asks one query at a time, where a threaded matrix-vector product is twice as fast.
    """

    def __init__(self, X: np.ndarray):
        self.X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        self.sq = (self.X * self.X).sum(1)

    def search(self, Q: np.ndarray, k: int, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
        Q = torch.from_numpy(np.ascontiguousarray(Q, dtype=np.float32))
        k = min(k, len(self.X))
        D, I = [], []
        with torch.inference_mode():
            for s in range(0, len(Q), block):
                q = Q[s:s + block]
                dist = torch.addmm(self.sq, q, self.X.T, alpha=-2)  # ‖x‖² − 2 q·x, (nq, n)
                d, i = torch.topk(dist, k, dim=1, largest=False)  # sorted, nearest first
                D.append((d + (q * q).sum(1, keepdim=True)).clamp_(min=0))
                I.append(i)
        return torch.cat(D).numpy(), torch.cat(I).numpy()


def build_ann(X: np.ndarray, seed: int = 0) -> AnnIndex:
    """Train an IVF-PQ on (a sample of) ``X`` and add all of it: about √n lists, 32-byte codes."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    n, d = X.shape
    # about √n lists (a power of two), each trained on ≥ 39 points (faiss' minimum); 256 PQ code
    # words per sub-vector, fewer for a collection too small to train them
    nlist = int(min(2 ** round(np.log2(max(1.0, np.sqrt(n)))), max(1, n // 39)))
    nlist = 2 ** int(np.log2(nlist))
    nbits = int(min(8, max(1, np.log2(max(2, n // 39)))))
    m = next(m for m in (32, 16, 8, 4, 2, 1) if d % m == 0)
    factory = f"IVF{nlist},PQ{m}" + ("" if nbits == 8 else f"x{nbits}")
    ivf = faiss.index_factory(d, factory)
    # the factory asks for polysemous training (a code ordering for Hamming-distance filtering, which
    # the search here never uses): it took 50 of the 60 s of training, whatever n
    faiss.downcast_index(faiss.extract_index_ivf(ivf)).do_polysemous_training = False
    # 64 points per list for the coarse k-means, ≥ 39 per code word for PQ (faiss' minimum)
    sample = X[np.random.default_rng(seed).choice(n, size=min(n, max(64 * nlist, 10_000)), replace=False)]
    ivf.train(sample)
    ivf.add(X)
    return AnnIndex(ivf, X, factory)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@dataclass
class ImageIndex:
    model: ConvVLAD
    root: str
    paths: list[str] = field(default_factory=list)  # relative to root
    X: np.ndarray | None = None
    stamps: np.ndarray | None = None  # (n, 2) int64: size, mtime_ns
    ann: str = "auto"  # "exact", "ivfpq", or "auto" (IVF-PQ from ANN_THRESHOLD images on)
    ann_index: AnnIndex | None = None

    def __post_init__(self):
        if self.X is None:
            self.X = np.zeros((0, self.model.dim), np.float32)
        if self.stamps is None:
            self.stamps = np.zeros((0, 2), np.int64)
        if self.ann not in ("auto", "exact", "ivfpq"):
            raise ValueError(f"index type must be auto, exact or ivfpq, not {self.ann!r}")
        self._exact = None

    @property
    def wants_ann(self) -> bool:
        return self.ann == "ivfpq" or (self.ann == "auto" and len(self) >= ANN_THRESHOLD)

    def update_ann(self, added: int = 0, removed: int = 0) -> None:
        """Keep the IVF-PQ in step: new images are added to it, removals (or a first build) retrain it."""
        if not self.wants_ann or len(self) < 2:
            self.ann_index = None
            return
        if self.ann_index is not None and not removed and self.ann_index.ntotal == len(self) - added:
            if added:
                self.ann_index.add(self.X[len(self) - added:], self.X)
            return
        self.ann_index = build_ann(self.X)

    def __len__(self):
        return len(self.paths)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path) -> None:
        model_meta, model_arrays = self.model.state()
        arrays = {f"model/{k}": v for k, v in model_arrays.items()}
        arrays.update(X=self.X, stamps=self.stamps, paths=np.array(self.paths, dtype=str))
        ann = self.ann_index if self.ann_index is not None and self.ann_index.ntotal == len(self) else None
        if ann is not None:
            arrays["ann"] = ann.to_array()
        atomic_savez(path, {"format": FORMAT, "version": FORMAT_VERSION, "root": self.root, "model": model_meta,
                            "ann": self.ann, "ann_factory": ann.factory if ann else None}, arrays)

    @classmethod
    def load(cls, path) -> "ImageIndex":
        meta, arrays = load_npz(path, FORMAT, FORMAT_VERSION)
        model = ConvVLAD.from_state(meta["model"], {k[6:]: v for k, v in arrays.items() if k.startswith("model/")})
        X = arrays["X"].astype(np.float32)
        index = cls(model=model, root=meta["root"], paths=[str(p) for p in arrays["paths"]], X=X,
                    stamps=arrays["stamps"].astype(np.int64), ann=meta.get("ann", "auto"))
        if "ann" in arrays:
            index.ann_index = AnnIndex.from_array(arrays["ann"], X, meta["ann_factory"])
        return index

    # -- building --------------------------------------------------------------------------------
    def sync(self, out, progress=True, checkpoint_every: int = 500, checkpoint_seconds: float = 120.0,
             report=print) -> dict:
        """Bring the index in line with the folder ``self.root``; save to ``out`` as it goes."""
        root = Path(self.root)
        files = list_images(root)
        current = {p: _stamp(root / p) for p in files}
        keep = [i for i, p in enumerate(self.paths)
                if p in current and tuple(self.stamps[i]) == current[p]]
        removed = len(self.paths) - len(keep)
        self.paths = [self.paths[i] for i in keep]
        self.X, self.stamps = self.X[keep], self.stamps[keep]
        have = set(self.paths)
        todo = [p for p in files if p not in have]
        summary = {"kept": len(self.paths), "removed": removed, "added": 0, "skipped": 0}
        if removed:
            self._exact = None
        if not todo:
            stale = self.wants_ann != (self.ann_index is not None)
            if removed or stale:
                self.update_ann(removed=removed)
            if removed or stale or not Path(out).exists():  # an empty folder still gets its (empty) index
                self.save(out)
            return summary
        n_before = len(self)
        new_paths, new_X, last_save, since, save_s = [], [], time.monotonic(), 0, 0.0
        abs_todo = [str(root / p) for p in todo]
        for idx, X, errors in self.model.iter_transform(abs_todo, progress=progress, desc="indexing"):
            for _, err in errors:
                report(f"skipped {err}")
                summary["skipped"] += 1
            new_paths += [todo[i] for i in idx]
            if X is not None:
                new_X.append(X)
            since += len(idx)
            elapsed = time.monotonic() - last_save
            # a checkpoint rewrites the whole file (0.5 GB at 1M images): space them to at least
            # CHECKPOINT_SPACING times the last save's duration, so saving stays under ~10% of the run
            if (since >= checkpoint_every or elapsed > checkpoint_seconds) and elapsed >= CHECKPOINT_SPACING * save_s:
                self._append(new_paths, new_X, current)
                summary["added"] += len(new_paths)
                new_paths, new_X, since = [], [], 0
                t = time.monotonic()
                self.save(out)
                last_save = time.monotonic()
                save_s = last_save - t
        self._append(new_paths, new_X, current)
        summary["added"] += len(new_paths)
        self.update_ann(added=len(self) - n_before, removed=removed)
        self.save(out)
        return summary

    def _append(self, paths, Xs, stamps):
        if not paths:
            return
        self.paths += paths
        self.X = np.concatenate([self.X, *Xs]).astype(np.float32)
        self.stamps = np.concatenate([self.stamps, np.array([stamps[p] for p in paths], np.int64)])
        self._exact = None

    # -- searching -------------------------------------------------------------------------------
    def search(self, Q: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """L2 search: (distances, indices), (nq, k); squared L2 as faiss reports it. Exact, or
        through the IVF-PQ shortlist when the index has one (distances still exact)."""
        k = min(k, len(self))
        if self.ann_index is not None and self.ann_index.ntotal == len(self):
            return self.ann_index.search(Q, k)
        if self._exact is None:
            self._exact = ExactIndex(self.X)
        return self._exact.search(Q, k)

    def search_images(self, images: list[str], k: int = 10, qe: int = 0, progress=False):
        """Rank the index for each query image: list of (query, [(path, distance), ...]) or errors.

        ``qe`` > 0: α-query expansion with the top ``qe`` results, then a second search.
        """
        ok, Q, errors = self.model.transform(images, progress=progress)
        results = []
        if len(ok) and not len(self):
            return [(images[qi], []) for qi in ok], errors
        if len(ok):
            if qe > 0:
                _, top = self.search(Q, qe)
                Q = alpha_query_expansion(Q, self.X[top])
            D, I = self.search(Q, k)
            for row, qi in enumerate(ok):
                hits = [(os.path.join(self.root, self.paths[j]), float(d)) for d, j in zip(D[row], I[row]) if j >= 0]
                results.append((images[qi], hits))
        return results, errors


def open_or_create(model_path, root, out, ann: str | None = None) -> ImageIndex:
    """Resume ``out`` if it exists (it must be of the same folder and model), else start empty.
    ``ann``: the search structure (auto, exact, ivfpq); None keeps the existing index's."""
    root = str(Path(root).resolve())
    model = ConvVLAD.load(model_path)
    if Path(out).exists():
        index = ImageIndex.load(out)
        if index.root != root:
            raise FileFormatError(f"{out}: index of another folder ({index.root}); choose another --out")
        if index.model.fingerprint() != model.fingerprint():
            raise FileFormatError(f"{out}: index built with another model than {model_path}; choose another --out")
        if ann is not None and ann != index.ann:
            index.ann = ann
            index.__post_init__()
        return index
    return ImageIndex(model=model, root=root, ann=ann or "auto")


__all__ = ["AnnIndex", "ExactIndex", "ImageIndex", "build_ann", "open_or_create"]
