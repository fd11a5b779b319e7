"""A writer for the fault-injection tests: brings a store to a known target, idempotently.

    python tests/store_driver.py INDEX --n 240 --batch 24 --compact-every 3 [--ann ivfpq]

Photos ``p0000 …`` have descriptors ``vector(i)``. Each run adds, batch by batch, those not in the
store, then deletes the ones with ``i % 7 == 3`` (so there are tombstones to compact), compacting
every few batches. Whatever state a killed run left, a complete run ends at the same target: every
``i % 7 != 3`` present exactly once. It prints ``adding``/``added``, ``removing``/``removed``,
``compacting``/``compacted`` around each commit (flushed), so a test can tell what was committed.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

DIM = 16


def vector(i: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).normal(size=DIM).astype(np.float32)


def name(i: int) -> str:
    return f"p{i:04d}"


def deleted(i: int) -> bool:
    return i % 7 == 3


def say(*words) -> None:
    print(*words, flush=True)


def main(argv=None) -> None:
    from convlad.store import IndexStore

    ap = argparse.ArgumentParser()
    ap.add_argument("index")
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--compact-every", type=int, default=3)
    ap.add_argument("--ann", default="exact")
    ap.add_argument("--wait", action="store_true")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds between batches")
    a = ap.parse_args(argv)
    with IndexStore.create(a.index, dim=DIM, ann=a.ann, wait=a.wait) as st:
        live = {p: i for i, p, _ in st.items()}
        for b, start in enumerate(range(0, a.n, a.batch)):
            time.sleep(a.pause)
            batch = [i for i in range(start, min(a.n, start + a.batch)) if name(i) not in live and not deleted(i)]
            if batch:
                say("adding", *batch)
                st.add_vectors(np.stack([vector(i) for i in batch]), [name(i) for i in batch])
                say("added", *batch)
            # add the doomed ones of this batch too, then delete them in a commit of their own
            doomed = [i for i in range(start, min(a.n, start + a.batch)) if deleted(i)]
            fresh = [i for i in doomed if name(i) not in live]
            if fresh:
                st.add_vectors(np.stack([vector(i) for i in fresh]), [name(i) for i in fresh])
            live = {p: i for i, p, _ in st.items()}
            gone = [live[name(i)] for i in doomed if name(i) in live]
            if gone:
                say("removing", *doomed)
                st.remove(gone)
                say("removed", *doomed)
            if a.compact_every and (b + 1) % a.compact_every == 0:
                say("compacting")
                st.compact(target_rows=10 * a.batch)
                say("compacted")
        say("done", len(st))


if __name__ == "__main__":
    sys.exit(main())
