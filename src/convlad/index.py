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

from .functional import alpha_query_expansion
from .images import list_images
from .pipeline import ConvVLAD
from .storage import FileFormatError, atomic_savez, load_npz

FORMAT = "convlad-index"
FORMAT_VERSION = 1


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

    def __post_init__(self):
        if self.X is None:
            self.X = np.zeros((0, self.model.dim), np.float32)
        if self.stamps is None:
            self.stamps = np.zeros((0, 2), np.int64)
        self._faiss = None

    def __len__(self):
        return len(self.paths)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path) -> None:
        model_meta, model_arrays = self.model.state()
        arrays = {f"model/{k}": v for k, v in model_arrays.items()}
        arrays.update(X=self.X, stamps=self.stamps, paths=np.array(self.paths, dtype=str))
        atomic_savez(path, {"format": FORMAT, "version": FORMAT_VERSION, "root": self.root,
                            "model": model_meta}, arrays)

    @classmethod
    def load(cls, path) -> "ImageIndex":
        meta, arrays = load_npz(path, FORMAT, FORMAT_VERSION)
        model = ConvVLAD.from_state(meta["model"], {k[6:]: v for k, v in arrays.items() if k.startswith("model/")})
        return cls(model=model, root=meta["root"], paths=[str(p) for p in arrays["paths"]],
                   X=arrays["X"].astype(np.float32), stamps=arrays["stamps"].astype(np.int64))

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
            self._faiss = None
        if not todo:
            if removed or not Path(out).exists():  # an empty folder still gets its (empty) index
                self.save(out)
            return summary
        new_paths, new_X, last_save, since = [], [], time.monotonic(), 0
        abs_todo = [str(root / p) for p in todo]
        for idx, X, errors in self.model.iter_transform(abs_todo, progress=progress, desc="indexing"):
            for _, err in errors:
                report(f"skipped {err}")
                summary["skipped"] += 1
            new_paths += [todo[i] for i in idx]
            if X is not None:
                new_X.append(X)
            since += len(idx)
            if since >= checkpoint_every or time.monotonic() - last_save > checkpoint_seconds:
                self._append(new_paths, new_X, current)
                summary["added"] += len(new_paths)
                new_paths, new_X, since, last_save = [], [], 0, time.monotonic()
                self.save(out)
        self._append(new_paths, new_X, current)
        summary["added"] += len(new_paths)
        self.save(out)
        return summary

    def _append(self, paths, Xs, stamps):
        if not paths:
            return
        self.paths += paths
        self.X = np.concatenate([self.X, *Xs]).astype(np.float32)
        self.stamps = np.concatenate([self.stamps, np.array([stamps[p] for p in paths], np.int64)])
        self._faiss = None

    # -- searching -------------------------------------------------------------------------------
    def search(self, Q: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Exact L2 search: (distances, indices), (nq, k); squared L2 as faiss reports it."""
        if self._faiss is None:
            self._faiss = faiss.IndexFlatL2(self.X.shape[1])
            self._faiss.add(np.ascontiguousarray(self.X))
        return self._faiss.search(np.ascontiguousarray(Q, dtype=np.float32), min(k, len(self)))

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


def open_or_create(model_path, root, out) -> ImageIndex:
    """Resume ``out`` if it exists (it must be of the same folder and model), else start empty."""
    root = str(Path(root).resolve())
    model = ConvVLAD.load(model_path)
    if Path(out).exists():
        index = ImageIndex.load(out)
        if index.root != root:
            raise FileFormatError(f"{out}: index of another folder ({index.root}); choose another --out")
        if index.model.fingerprint() != model.fingerprint():
            raise FileFormatError(f"{out}: index built with another model than {model_path}; choose another --out")
        return index
    return ImageIndex(model=model, root=root)


__all__ = ["ImageIndex", "open_or_create"]
