"""A writer for the fault-injection tests: brings a store to a known target, idempotently.

    python tests/store_driver.py INDEX --n 240 --batch 24 --compact-every 3 [--ann ivfpq]

Photos ``p0000 …`` have descriptors ``vector(i)``. With ``--model M`` (a fitted model of dimension
16) the store augments: photos 2g and 2g + 1 are near twins, with the same local features moved by
one cell (``local_codes``), so each pair of live twins verifies and no other pair does. Each run adds, batch by batch, those not in the
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


LOCAL = 60  # local features per photo with --model


def twin_vector(i: int) -> np.ndarray:
    x = vector(2 * (i // 2)) + 0.05 * np.random.default_rng(2000 + i).normal(size=DIM).astype(np.float32)
    return (x / np.linalg.norm(x)).astype(np.float32)


def local_codes(batch: list[int]):
    """Each photo's local features: its twin group's codes, on cells moved one down for the odd
    twin (a translation, an affine map all of them agree with)."""
    from convlad.verify import LocalCodes

    codes = np.zeros((len(batch), LOCAL, DIM), np.int8)
    cells = np.zeros((len(batch), LOCAL, 2), np.uint8)
    for r, i in enumerate(batch):
        rng = np.random.default_rng(5000 + i // 2)
        codes[r] = rng.integers(-127, 128, size=(LOCAL, DIM))
        c = rng.choice(28 * 27, LOCAL, replace=False)  # distinct cells of a 28×28 map, the last row free
        cells[r, :, 0], cells[r, :, 1] = c % 28, c // 28 + i % 2
    return LocalCodes(codes, cells, np.full(len(batch), LOCAL, np.uint16))


def name(i: int) -> str:
    return f"p{i:04d}"


def deleted(i: int) -> bool:
    return i % 7 == 3


def say(*words) -> None:
    print(*words, flush=True)


def main(argv=None) -> None:
    from convlad.index.store import IndexStore

    ap = argparse.ArgumentParser()
    ap.add_argument("index")
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--compact-every", type=int, default=3)
    ap.add_argument("--ann", default="exact")
    ap.add_argument("--wait", action="store_true")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds between batches")
    ap.add_argument("--model", default=None, help="a fitted model (dimension 16): the store augments")
    a = ap.parse_args(argv)
    if a.model:
        from convlad.pipeline import ConvVLAD

        store = IndexStore.create(a.index, model=ConvVLAD.load(a.model), ann=a.ann, wait=a.wait, local=LOCAL,
                                  augment="verified")

        def add(batch):
            st.add_vectors(np.stack([twin_vector(i) for i in batch]), [name(i) for i in batch], local=local_codes(batch))
    else:
        store = IndexStore.create(a.index, dim=DIM, ann=a.ann, wait=a.wait)

        def add(batch):
            st.add_vectors(np.stack([vector(i) for i in batch]), [name(i) for i in batch])
    with store as st:
        live = {p: i for i, p, _ in st.items()}
        for b, start in enumerate(range(0, a.n, a.batch)):
            time.sleep(a.pause)
            batch = [i for i in range(start, min(a.n, start + a.batch)) if name(i) not in live and not deleted(i)]
            if batch:
                say("adding", *batch)
                add(batch)
                say("added", *batch)
            # add the doomed ones of this batch too, then delete them in a commit of their own
            doomed = [i for i in range(start, min(a.n, start + a.batch)) if deleted(i)]
            fresh = [i for i in doomed if name(i) not in live]
            if fresh:
                add(fresh)
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
