"""Single-file indexes of convlad 0.1: read in memory, or converted to a segment store in place."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from . import segments as S
from ..storage import load_npz

FORMAT = "convlad-index"


def arrays(path: Path):
    """(meta, model, X, paths, stamps) of a single-file index."""
    from ..pipeline import ConvVLAD

    meta, arrays = load_npz(path, FORMAT, 1)
    model = ConvVLAD.from_state(meta["model"], {k[6:]: v for k, v in arrays.items() if k.startswith("model/")})
    return meta, model, arrays["X"].astype(np.float32), [str(p) for p in arrays["paths"]], \
        arrays["stamps"].astype(np.int64)


def read(path: Path):
    """(model, manifest, one in-memory segment): what a read-only store of it needs."""
    meta, model, X, paths, stamps = arrays(path)
    encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in encoded])]).astype(np.int64)
    seg = S.Segment("legacy", X, np.arange(len(X), dtype=np.int64), stamps.reshape(-1, 2), offsets,
                    np.frombuffer(b"".join(encoded), np.uint8))
    m = {"generation": 0, "dim": model.dim, "root": meta["root"], "model": "(inside the file)",
         "model_fingerprint": model.fingerprint(), "ann": "exact", "segments": [{"name": "legacy", "rows": len(X)}],
         "tombstones": None, "n_dead": 0, "ivf": None, "next_id": len(X)}
    return model, m, seg


def converting(path: Path) -> Path:
    return path.with_name(path.name + ".converting")


def interrupted_conversion(path: Path) -> bool:
    return not path.exists() and converting(path).is_dir() and path.with_name(path.name + ".v1").is_file()


def convert(path: Path, build, report) -> None:
    """Rewrite ``path`` as a store: ``build(folder, meta, model, X, paths, stamps)`` writes one into
    a temporary folder, which then takes the file's name (the file is kept as PATH.v1)."""
    old, tmp = path.with_name(path.name + ".v1"), converting(path)
    if path.is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp, *arrays(path))
        os.replace(path, old)
    os.rename(tmp, path)
    S.fsync_dir(path.parent)
    report(f"{path}: converted a single-file index to a segment store (the old file is kept as {old})")


__all__ = ["arrays", "convert", "interrupted_conversion", "read"]
