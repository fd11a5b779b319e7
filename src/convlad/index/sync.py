"""Bringing an index in line with its folder: walk it, tombstone what vanished or changed, encode
what is new, and commit a segment at a time. ``Committer`` is the commit loop, shared by the
local encoder (``sync``) and the Ray cluster's (``cluster.sync_with_ray``)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..images import merge_scans, scan_images
from ..verify import LocalCodes

COMMIT_EVERY = 500  # images per segment while indexing a folder
COMMIT_SECONDS = 30.0  # ... or a segment at least this often, so an interrupted first run keeps its work


class Committer:
    """Encoded images gathered and committed to ``store`` as one segment each ``every`` images or
    ``seconds``: a killed run loses at most that much work, and a rerun goes on from there."""

    def __init__(self, store, stamps: dict, every: int = COMMIT_EVERY, seconds: float = COMMIT_SECONDS,
                 progress: bool = False):
        self.store, self.stamps, self.every, self.seconds = store, stamps, every, seconds
        self.progress = progress  # of the store's own long steps in a commit (a second look)
        self.added = 0
        self._reset()

    def _reset(self) -> None:
        self.paths, self.X, self.local, self.last = [], [], [], time.monotonic()

    def add(self, paths: list[str], X: np.ndarray, local: LocalCodes | None = None) -> None:
        """Stored paths (relative to the store's folder) and their descriptors and local features."""
        if not len(paths):
            return
        self.paths += list(paths)
        self.X.append(np.asarray(X, np.float32))
        if local is not None:
            self.local.append(local)
        if len(self.paths) >= self.every or time.monotonic() - self.last > self.seconds:
            self.flush()

    def flush(self) -> None:
        paths, X, local = self.paths, self.X, self.local
        self._reset()  # first: an interruption inside the commit below never commits these twice
        if paths:
            self.store.add_vectors(np.concatenate(X), paths, [self.stamps[p] for p in paths],
                                   LocalCodes.concat(local) if local else None, progress=self.progress)
            self.added += len(paths)


def plan_sync(store, report=print, scans=None) -> dict:
    """The first half of a sync: walk the folder, delete (tombstone) vanished or changed files and
    duplicates, and list what is left to encode. {"summary", "todo", "current" stamps}.
    ``scans``: the folder already walked, as ``images.scan_images`` results (by a cluster)."""
    store._need_writer()
    root = Path(store.root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: the indexed folder is gone")
    current, notes = merge_scans(scans if scans is not None else [scan_images(root)])
    for msg in notes:
        report(f"skipped {msg}")
    stale, have = [], set()
    for id_, p, st in store.items():
        if current.get(p) == st and p not in have:
            have.add(p)
        else:
            stale.append(id_)
    removed = store.remove(stale) if stale else 0
    summary = {"kept": len(have), "removed": removed, "added": 0, "skipped": len(notes)}
    return {"summary": summary, "todo": [p for p in sorted(current) if p not in have], "current": current}


def sync(store, progress=True, commit_every: int = COMMIT_EVERY, commit_seconds: float = COMMIT_SECONDS,
         report=print) -> dict:
    """Bring ``store`` in line with its folder: vanished or changed files removed, new ones encoded
    and committed a segment at a time (``Committer``). Interrupted (Ctrl-C), what is encoded so far
    is committed before the interruption goes on."""
    plan = plan_sync(store, report)
    summary, todo, root = plan["summary"], plan["todo"], Path(store.root)
    if not todo:
        return summary
    committer = Committer(store, plan["current"], commit_every, commit_seconds, progress)
    try:
        for enc in store.model.iter_transform([str(root / p) for p in todo], progress=progress, desc="indexing",
                                              local=store.local_k):
            for err in enc.errors:
                report(f"skipped {err}")
                summary["skipped"] += 1
            committer.add([todo[i] for i in enc.indices], enc.X, enc.local)
    finally:  # also on KeyboardInterrupt: keep what was encoded
        committer.flush()
        summary["added"] = committer.added
    return summary


__all__ = ["COMMIT_EVERY", "COMMIT_SECONDS", "Committer", "plan_sync", "sync"]
