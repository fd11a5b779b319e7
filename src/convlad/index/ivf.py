"""The IVF-PQ of an index kept in step with its segments: trained once on a sample of the live rows,
each segment's codes written beside it (``segments.codes_file``), and the inverted lists filled from
those codes when a reader first searches. ``IndexStore`` decides when to (re)train (``store.py``);
the building blocks are ``ann.py``'s.

The IVF-PQ holds every row of the segments, dead ones too (they are filtered from its shortlist),
so deletes leave it as it is and appends extend it.
"""
from __future__ import annotations

import mmap
from pathlib import Path

import faiss
import numpy as np

from . import segments as S
from .ann import ANN_MIN_SHORTLIST, ANN_RERANK, default_nprobe, encode_codes, ivfpq_sample_size, new_ivfpq, refine

ENCODE_CHUNK = 65_536


def _unmap_pages(a: np.ndarray) -> None:
    """Drop a memory map's pages from this process (not from the page cache): they were read once."""
    mm = getattr(a, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def read_trained(path: Path, ivf: dict) -> faiss.Index:
    return faiss.read_index(str(S.trained_file(path, ivf["dir"])))


def load_codes(path: Path, m: dict, cache: dict) -> dict:
    """Each segment's codes of manifest ``m``'s IVF-PQ, memory-mapped, keyed (ivf dir, segment); those
    already in ``cache`` are reused. Empty when ``m`` has no IVF-PQ."""
    if not m.get("ivf"):
        return {}
    d, codes = m["ivf"]["dir"], {}
    for s in m["segments"]:
        key = (d, s["name"])
        codes[key] = cache.get(key)
        if codes[key] is None:
            codes[key] = np.load(S.codes_file(path, d, s["name"]), mmap_mode="r")
    return codes


def write_codes(path: Path, ivf: dict, seg_name: str, X: np.ndarray, trained=None) -> None:
    if trained is None:
        trained = read_trained(path, ivf)
    codes = encode_codes(trained, X, ENCODE_CHUNK)
    S.write_durable(S.codes_file(path, ivf["dir"], seg_name), lambda f: S.save_npy(f, codes))


def train(path: Path, dim: int, segs: list, lives: list[np.ndarray]) -> dict:
    """Train an IVF-PQ on a sample of the live rows (``lives``: each segment's live rows) and encode
    every segment with it; returns the manifest's ``ivf`` entry."""
    live = int(sum(len(r) for r in lives))
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in lives])])
    index, factory = new_ivfpq(live, dim)
    pick = np.sort(np.random.default_rng(0).choice(live, size=min(live, ivfpq_sample_size(index)), replace=False))
    which = np.searchsorted(offsets, pick, side="right") - 1
    sample = np.concatenate([np.asarray(segs[s].X[lives[s][pick[which == s] - offsets[s]]])
                             for s in np.unique(which)]).astype(np.float32)
    index.train(sample)
    ivf = {"dir": S.new_ivf_dir(), "factory": factory, "trained_on": live}
    d = path / ivf["dir"]
    d.mkdir()
    S.write_durable(S.trained_file(path, ivf["dir"]), lambda f: f.write(faiss.serialize_index(index).tobytes()))
    S.crash_point("ivf-train")
    for s in segs:
        write_codes(path, ivf, s.name, s.X, index)
    S.fsync_dir(d)
    return ivf


def empty_copy(trained: faiss.Index) -> faiss.Index:
    """The trained IVF-PQ with empty lists, probing ``default_nprobe`` of them."""
    index = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = default_nprobe(ivf.nlist)
    return index


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    faiss.extract_index_ivf(index).nprobe = nprobe


def add_codes(index: faiss.Index, codes: np.ndarray, first: int) -> None:
    """A segment's codes into the inverted lists, its rows at positions ``first`` on."""
    for c in range(0, len(codes), ENCODE_CHUNK):
        part = np.ascontiguousarray(codes[c:c + ENCODE_CHUNK])
        index.add_sa_codes(part, first + c + np.arange(len(part), dtype=np.int64))
    _unmap_pages(codes)  # copied into the inverted lists: leave the page cache its copy


def search(index: faiss.Index, Q: np.ndarray, k: int, rows_held: int, n_dead: int, is_live, rows):
    """(distances, positions) of the k nearest live rows: the IVF-PQ's shortlist, dead rows dropped
    (``is_live(positions)``), made exact with ``rows(positions)``, the rows as searched."""
    # dead rows are still in the IVF-PQ: ask for more candidates, then drop them
    want = max(k * ANN_RERANK, ANN_MIN_SHORTLIST)
    want += min(n_dead, want)
    _, cand = index.search(Q, min(rows_held, want))
    # the codes are of the plain rows; the shortlist is made exact with the augmented ones
    return refine(Q, [c[is_live(c)] for c in (c[c >= 0] for c in cand)], rows, k)


__all__ = ["add_codes", "empty_copy", "load_codes", "read_trained", "search", "set_nprobe", "train", "write_codes"]
