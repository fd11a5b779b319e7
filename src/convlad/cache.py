"""A disk cache of local descriptors, so a study over many layers extracts each image once per scale.

Layout: ``ROOT/<backbone>-<weights hash>/<resize>-<n>/<layer>/<image key>.npy``, one float16
``(N, d)`` array of L2-normalised local descriptors per (image, layer, scale). The image key hashes
the file's bytes (and the query box, for a crop), so a renamed or copied photo is found again and
an edited one is not mistaken for its old self. Files are written through a temporary name and
renamed, so an interrupted fill leaves only whole entries: run it again to resume.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .backbones.base import Backbone
from .extract import FeatureExtractor, iter_batches, scale_size
from .runtime import want_compile
from .images import ImageError


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer: the same name with other weights is another cache."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _split(item):
    return (str(item), None) if isinstance(item, (str, os.PathLike)) else (str(item[0]), tuple(item[1]))


class FeatureCache:
    def __init__(self, root, backbone: Backbone, resize: str = "warp"):
        self.backbone, self.resize = backbone, resize
        self.root = Path(root) / f"{backbone.name}-{weights_fingerprint(backbone.module)}"
        self.root.mkdir(parents=True, exist_ok=True)
        self._hashes_file = Path(root) / "file-hashes.json"
        try:
            self._hashes = json.loads(self._hashes_file.read_text())
        except (OSError, ValueError):
            self._hashes = {}
        self._dirty = False

    # -- keys --------------------------------------------------------------------------------------
    def key(self, item) -> str:
        """Content key of a path or a (path, box) pair; file hashes are remembered by path, size
        and mtime, so a warm run does not re-read every photo."""
        path, box = _split(item)
        st = os.stat(path)
        stamp = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
        digest = self._hashes.get(stamp)
        if digest is None:
            h = hashlib.sha1()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            digest = self._hashes[stamp] = h.hexdigest()
            self._dirty = True
        if box is None:
            return digest
        return hashlib.sha1(f"{digest}|{','.join(f'{v:g}' for v in box)}".encode()).hexdigest()

    def _file(self, key: str, layer: str, scale: float) -> Path:
        return self.root / f"{self.resize}-{scale_size(scale)}" / layer / key[:2] / f"{key}.npy"

    def save_hashes(self) -> None:
        if self._dirty:
            tmp = self._hashes_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._hashes))
            tmp.replace(self._hashes_file)
            self._dirty = False

    # -- filling -----------------------------------------------------------------------------------
    def missing(self, items: Sequence, layers: Sequence[str], scale: float) -> list[int]:
        """Indices of the items lacking any of ``layers`` at ``scale`` (unreadable files included)."""
        out = []
        for i, item in enumerate(items):
            try:
                k = self.key(item)
            except OSError:
                out.append(i)
                continue
            if not all(self._file(k, layer, scale).is_file() for layer in layers):
                out.append(i)
        return out

    def fill(self, items: Sequence, layers: Sequence[str], scales: Sequence[float], batch_size: int = 16,
             workers: int = 2, device=None, progress: bool = True, compile: bool | str = "auto") -> list[ImageError]:
        """Extract what is missing: one forward pass per image and scale, every layer tapped.
        ``compile``: torch.compile the forward pass (True/False, or "auto": large CPU jobs)."""
        from . import progress as P

        layers = self.backbone.resolve_layers(list(layers))
        errors: dict[str, ImageError] = {}
        extractor = None
        try:
            for scale in scales:
                todo = self.missing(items, layers, scale)
                if not todo:
                    continue
                extractor = extractor or FeatureExtractor(self.backbone, layers, device=device)
                if want_compile(compile, extractor, len(todo), [scale], self.resize):
                    extractor.compile = True
                sub = [items[i] for i in todo]
                with P.bar(len(sub), f"features @ scale {scale:g}", "img", enabled=progress) as bar:
                    for batch in iter_batches(extractor, sub, [scale], batch_size, workers, progress=bar,
                                              resize=self.resize):
                        for i, err in batch.errors:
                            errors[_split(sub[i])[0]] = err
                        for j, i in enumerate(batch.indices):
                            k = self.key(sub[i])
                            for layer in layers:
                                f = batch.features[(layer, scale)][j]
                                self._write(self._file(k, layer, scale), f.to(torch.float16).cpu().numpy())
        finally:
            if extractor is not None:
                extractor.close()
            self.save_hashes()
        return list(errors.values())

    @staticmethod
    def _write(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, array)
        tmp.replace(path)

    # -- reading -----------------------------------------------------------------------------------
    def load(self, item, layer: str, scale: float) -> np.ndarray | None:
        """float16 (N, d) local descriptors, or None when absent (an unreadable image)."""
        try:
            return np.load(self._file(self.key(item), layer, scale))
        except FileNotFoundError:  # the image itself, or its entry
            return None
