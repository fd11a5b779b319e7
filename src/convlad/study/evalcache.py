"""Fitted models and encoded benchmarks kept on disk, so that running ``convlad eval`` again (other
verifier settings, another ``--qe``, a ``--folds`` grid, the documented command re-run) skips the
fit and the encoding: the two steps that take minutes.

Layout: ``ROOT/models/<key>.npz`` (a model file, as ``convlad train`` writes) and
``ROOT/encoded/<key>.npz`` (descriptors and local features of a list of images). A key hashes
everything the entry depends on: the configuration, the network's weights, every input file's
path, size and modification time, the device, arithmetic and compile setting, and convlad's own
source with the versions of torch, numpy and faiss. An edited photo or an edited line of convlad is
a new key, never a stale answer. Entries are written atomically; an unreadable one is recomputed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..cache import weights_fingerprint
from ..pipeline import FORMAT, FORMAT_VERSION, ConvVLAD, Encoded
from ..storage import FileFormatError, atomic_savez, load_npz
from ..verify import LocalCodes

ENCODED = "convlad-encoded"


def default_root() -> Path:
    if os.environ.get("CONVLAD_EVAL_CACHE"):
        return Path(os.environ["CONVLAD_EVAL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "convlad" / "eval"


PACKAGE = Path(__file__).resolve().parents[1]  # the whole of convlad: the study and what it measures


@functools.lru_cache(4)
def code_version(pkg: Path = PACKAGE) -> str:
    """The source under ``pkg`` (convlad's) and the numeric libraries' versions: any change is
    another cache."""
    import faiss
    import torch

    h = hashlib.sha256(f"{torch.__version__}|{np.__version__}|{faiss.__version__}".encode())
    for f in sorted(Path(pkg).rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _stamp(item) -> list:
    path, box = (item, None) if isinstance(item, (str, os.PathLike)) else item
    try:
        st = os.stat(path)
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:  # unreadable: the fit or the encoding says so, and such a result is not kept
        size = mtime = None
    return [os.path.abspath(path), size, mtime, None if box is None else [float(v) for v in box]]


def _digest(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


class EvalCache:
    def __init__(self, root=None):
        self.root = Path(root) if root is not None else default_root()
        self._weights: dict[tuple, str] = {}  # a network's fingerprint, hashed once a run (VGG16's is 550 MB)

    def _runtime(self, model: ConvVLAD) -> dict:
        ex = model.extractor
        ex.precision = model.precision
        net = (model.config.backbone, model.config.weights)
        if net not in self._weights:
            self._weights[net] = weights_fingerprint(model.backbone.module)
        return {"code": code_version(), "weights": self._weights[net],
                "device": str(ex.device), "precision": ex.precision, "compile": str(model.compile)}

    def fit(self, model: ConvVLAD, paths, progress: bool = True) -> bool:
        """Fit ``model`` on ``paths``, or give it the state a fit of the same would give; True when
        that came from the cache."""
        _ = model.backbone  # resolves the default layers, which the key names
        key = _digest({**self._runtime(model), "config": asdict(model.config), "files": [_stamp(p) for p in paths]})
        f = self.root / "models" / f"{key}.npz"
        try:
            model.set_state(*load_npz(f, FORMAT, FORMAT_VERSION))
            model.errors_ = []
            return True
        except (FileFormatError, KeyError, ValueError):
            pass
        model.fit(paths, progress=progress)
        if not model.errors_:  # a fit that skipped unreadable photos would hide them on the next run
            self._keep(f, lambda: model.save(f))
        return False

    @staticmethod
    def _keep(f: Path, save) -> None:
        """A cache that cannot be written costs the next run its time, not this run its result."""
        try:
            save()
        except OSError as e:
            warnings.warn(f"eval cache: {f} not written ({e.strerror or e}); the next run computes it again")

    def transform(self, model: ConvVLAD, items, local: int, progress: bool = True) -> tuple[Encoded, float, bool]:
        """``model.transform(items, local=local)``, from the cache where it holds it; the seconds the
        encoding took (when it was done); and whether it came from the cache."""
        key = _digest({**self._runtime(model), "model": model.fingerprint(), "local": local,
                       "files": [_stamp(p) for p in items]})
        f = self.root / "encoded" / f"{key}.npz"
        try:
            meta, arrays = load_npz(f, ENCODED, 1)
            codes = LocalCodes.from_arrays(arrays)
            if codes is not None and meta["grid"] is not None:
                codes.grid = tuple(meta["grid"])
            return Encoded(list(range(len(items))), arrays["X"], [], codes), float(meta["seconds"]), True
        except (FileFormatError, KeyError):
            pass
        t = time.time()
        enc = model.transform(items, progress=progress, local=local)
        seconds = time.time() - t
        if not enc.errors:
            arrays = {"X": enc.X, **(enc.local.arrays(coarse=True) if enc.local is not None else {})}
            grid = list(enc.local.grid) if enc.local is not None and enc.local.grid else None
            self._keep(f, lambda: atomic_savez(f, {"format": ENCODED, "version": 1, "grid": grid, "seconds": seconds},
                                               arrays))
        return enc, seconds, False
