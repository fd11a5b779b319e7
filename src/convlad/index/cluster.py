"""Indexing on a Ray cluster: ``convlad index MODEL DIR --out INDEX --ray [ADDRESS]``.

Ray Data runs the extraction with an actor pool of model replicas (the model, sent once through the
object store, is built once per actor; one CPU, or one GPU where the cluster has them, each).
Decoding happens in the actors, next to the network, and the folder is walked on the cluster too (a
task per top-level subfolder). The driver is the index's single writer: each
block of descriptors that Ray Data hands it becomes one segment, committed at once. A photo is
committed once: the driver skips paths already in the index (a rerun after the driver was killed
starts from the committed segments), and Ray Data's retries of a failed task or a restarted actor
deliver each output block once. With a compact local codec (``local_codec.py``) the actors
encode the local features too, so the writer only writes them.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .sync import Committer, plan_sync
from ..verify import COARSE, LocalCodes

ENCODED = "encoded-"  # a block's columns of a compact codec's arrays, made on the workers

class RayMissing(RuntimeError):
    pass


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayMissing("--ray needs Ray: pip install 'convlad[ray]' (or pip install 'ray[data]')") from None
    return ray


class Encoder:
    """A model replica in a Ray actor: paths → descriptors (errors reported, not raised)."""

    def __init__(self, state, batch_size: int, device: str | None, local: int = 0, precision: str = "auto"):
        import torch

        from ..pipeline import ConvVLAD
        from ..runtime import Runtime

        import ray

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        if isinstance(state, ray.ObjectRef):  # the model, put once in the object store
            state = ray.get(state)
        # "auto" resolves on the actor's own machine: bf16 where that node's CPU has an engine for it
        self.model = ConvVLAD.from_state(*state, runtime=Runtime(device=device, batch_size=batch_size, workers=1,
                                                                 compile=False, precision=precision))
        self.local = local

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["path"]]
        enc = self.model.transform(paths, progress=False, local=self.local)
        bad = {e.path: e.reason for e in enc.errors}
        out = {"path": np.array(paths, dtype=object), "x": np.zeros((len(paths), self.model.dim), np.float32),
               "error": np.array([bad.get(p, "") for p in paths], dtype=object)}
        out["x"][enc.indices] = enc.X
        arrays = {}
        if enc.local is not None:  # for re-ranking: the exact features, and a compact codec's codes of them
            # (made here, on the cluster, not by the single writer; the smaller scale's, which it mines with)
            arrays = dict(enc.local.arrays(coarse=True))
            if self.model.local_codec_.compact:
                arrays.update({ENCODED + k: a for k, a in self.model.local_codec_.encode(enc.local).items()})
        for key, a in arrays.items():
            out[key] = np.zeros((len(paths), *a.shape[1:]), a.dtype)
            out[key][enc.indices] = a
        return out


def scan_on_cluster(ray, root: Path) -> list:
    """Walk the folder on the cluster: the files at its top here, each top-level subfolder in a task
    of its own; in the local walk's order, so the same name of a file reached twice is kept."""
    from ..images import scan_images

    subs = sorted(e.name for e in os.scandir(root) if not e.name.startswith(".") and e.is_dir())

    def key(p):
        st = os.stat(p)
        return st.st_dev, st.st_ino

    # a link back to the root or into another top-level folder is that folder's task's to walk
    tops = {key(root): str(root), **{key(root / d): str(root / d) for d in subs}}
    scan = ray.remote(num_cpus=0.5, max_retries=3)(scan_images)
    refs = [scan.remote(str(root), d, True, {k: v for k, v in tops.items() if v != str(root / d)}) for d in subs]
    return [scan_images(root, "", recurse=False), *ray.get(refs)]


def sync_with_ray(store, address: str | None = None, batch_size: int = 16, actors: int | None = None,
                  report=print, progress: bool = True) -> dict:
    """``sync.sync`` with the encoding on a Ray cluster (``address``: None starts Ray locally,
    ``auto`` or ``ray://host:port`` joins one)."""
    ray = _ray()
    from .. import progress as P

    root = Path(store.root)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the driver shows its own progress bar
    ray.data.DataContext.get_current().enable_progress_bars = False
    plan = plan_sync(store, report=report, scans=scan_on_cluster(ray, root))
    summary, todo, current = plan["summary"], plan["todo"], plan["current"]
    if not todo:
        return summary
    gpus = ray.cluster_resources().get("GPU", 0)
    cpus = ray.cluster_resources().get("CPU", 1)
    actors = actors or max(1, int(gpus) if gpus else int(cpus))
    state = ray.put(store.model.state())
    ds = ray.data.from_items([{"path": str(root / p)} for p in todo], override_num_blocks=max(1, len(todo) // batch_size))
    # Ray Data restarts a dead actor and retries its tasks by default (max_restarts=-1)
    ds = ds.map_batches(Encoder, fn_constructor_args=(state, batch_size, "cuda" if gpus else "cpu", store.local_k,
                                                          store.model.precision),
                        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
    # the same commit loop as a local sync; each block of Ray's is committed at once (every=1), so
    # a killed driver loses no more than the block in flight
    committer, have, first = Committer(store, current, every=1), set(), None
    bar = P.bar(len(todo), "indexing (ray)", "img", enabled=progress)
    t = time.monotonic()
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            rel = [os.path.relpath(p, root) for p in block["path"]]
            keep = [i for i, (p, e) in enumerate(zip(rel, block["error"])) if not e and p not in have]
            for p, e in zip(rel, block["error"]):
                if e:
                    report(f"skipped {root / p}: {e}")
                    summary["skipped"] += 1
            if keep:
                local = LocalCodes.from_arrays({k: block[k][keep] for k in block if k.startswith(("local-", COARSE))})
                codes = {k[len(ENCODED):]: block[k][keep] for k in block if k.startswith(ENCODED)}
                if local is not None and codes:
                    local = replace(local, encoded=(store.local_codec.key, codes))
                committer.add([rel[i] for i in keep], block["x"][keep], local)
                have.update(rel[i] for i in keep)
            bar.update(len(rel))
            if first is None:  # the pipeline is full from here on: Ray and the actors have started
                first, after = time.monotonic(), 0
            else:
                after += len(rel)
    finally:
        committer.flush()
        summary["added"] = committer.added
        bar.close()
    summary["seconds"] = time.monotonic() - t
    summary["steady_img_per_s"] = after / (time.monotonic() - first) if first and after else None
    summary["actors"] = actors
    return summary


__all__ = ["Encoder", "RayMissing", "sync_with_ray"]
