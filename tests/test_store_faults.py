"""Crash safety of the index store, shown by fault injection, and readers beside a writer.

A writer (tests/store_driver.py, a real process) is SIGKILLed at exact crash points (inside a
segment write, between a manifest's write and its rename, inside a compaction, ...) and at random
moments. After each kill the store must open, hold every committed photo exactly once with its own
descriptor, hold a batch that was in flight entirely or not at all, and a rerun must complete it.
A store that augments (``--model``) must also hold exactly the verified pairs of its live photos,
and search the rows augmented over them.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from convlad.storage import FileFormatError
from convlad.index.store import IndexStore

from convlad.pairs import augment

from .store_driver import deleted, name, twin_vector, vector

DRIVER = [sys.executable, str(Path(__file__).with_name("store_driver.py"))]
N, BATCH = 240, 24
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def drive(index, crash: str | None = None, ann: str = "exact", extra=(), model=None):
    env = dict(ENV)
    env.pop("CONVLAD_CRASH_AT", None)
    if crash:
        env["CONVLAD_CRASH_AT"] = crash
    extra = [*extra, "--model", str(model)] if model else list(extra)
    return subprocess.Popen([*DRIVER, str(index), "--n", str(N), "--batch", str(BATCH), "--ann", ann, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def live_state(index, augmented: bool = False) -> dict[str, np.ndarray]:
    """path → descriptor of every live photo; fails on a duplicate. ``augmented``: a store that
    augments, whose pairs must be twins that are both live, searched augmented over them."""
    st = IndexStore.open(index)
    items = list(st.items())
    paths = [p for _, p, _ in items]
    assert len(paths) == len(set(paths)), "a photo is in the index twice"
    X = st.vectors([i for i, _, _ in items]) if items else np.zeros((0, 16), np.float32)
    Y, pairs = X, set()
    if augmented and len(st.pairs()):
        row = {i: r for r, (i, _, _) in enumerate(items)}
        P = np.array([[row[int(a)], row[int(b)]] for a, b in st.pairs()])
        pairs = {tuple(sorted((paths[a], paths[b]))) for a, b in P}
        assert all(int(a[1:]) // 2 == int(b[1:]) // 2 for a, b in pairs), f"a pair of photos that are not twins: {pairs}"
        Y = augment(X, P)
    # a photo's own descriptor finds its row first, at its distance: the search structures agree with the rows
    if items:
        probe = random.Random(len(items)).sample(range(len(items)), min(5, len(items)))
        D, I = st.search(X[probe], 1)
        want = ((Y[None] - X[probe][:, None]) ** 2).sum(-1)
        assert np.allclose(D[:, 0], want.min(1), atol=1e-4)
        if not augmented:  # (a twin's augmented row can tie with its own)
            assert [i for i, _, _ in (items[j] for j in probe)] == I[:, 0].tolist() and np.allclose(D[:, 0], 0, atol=1e-4)
    if augmented:
        return dict(zip(paths, X)), pairs
    return dict(zip(paths, X))


def twins_of(paths) -> set:
    have = set(paths)
    return {(name(2 * g), name(2 * g + 1)) for g in range(N // 2) if {name(2 * g), name(2 * g + 1)} <= have}


def check_after_kill(index, log: str, augmented: bool = False) -> tuple[int, int]:
    """The invariants after a kill; returns (photos found, photos of the batch in flight)."""
    if not (Path(index) / "MANIFEST").exists():  # killed while creating the store: nothing committed
        assert "added" not in log.split(), log
        with pytest.raises(FileFormatError, match="creation was interrupted|no such index"):
            IndexStore.open(index)
        return 0, 0
    state = live_state(index, augmented)
    if augmented:
        state, pairs = state
        assert pairs <= twins_of(state), "a pair of photos that are not both live twins"
    for p, x in state.items():
        np.testing.assert_array_equal(x, (twin_vector if augmented else vector)(int(p[1:])), err_msg=f"{p}: wrong descriptor")
    committed, in_flight = set(), set()
    for line in log.splitlines():
        word, *nums = line.split()
        if word == "adding":
            in_flight = {int(n) for n in nums}
        elif word == "added":
            committed |= in_flight
            in_flight = set()
    found = {int(p[1:]) for p in state if not deleted(int(p[1:]))}
    assert committed <= found, f"committed photos lost: {sorted(committed - found)[:10]}"
    partial = found & in_flight
    assert not partial or partial == in_flight, f"half a batch committed: {sorted(partial)} of {sorted(in_flight)}"
    assert found <= committed | in_flight, f"photos never added: {sorted(found - committed - in_flight)}"
    return len(found), len(partial)


def check_complete(index, augmented: bool = False) -> None:
    state = live_state(index, augmented)
    if augmented:  # every pair of live twins verified, whichever run added them
        state, pairs = state
        assert pairs == twins_of(state), f"pairs lost or extra: {sorted(pairs ^ twins_of(state))[:6]}"
    assert sorted(state) == [name(i) for i in range(N) if not deleted(i)]
    for p, x in state.items():
        np.testing.assert_array_equal(x, (twin_vector if augmented else vector)(int(p[1:])))
    m = json.loads((Path(index) / "MANIFEST").read_text())
    on_disk = {e.name for e in Path(index).iterdir() if e.name.startswith(("seg-", "tmp-", "dead-", "ivf-"))}
    named = {s["name"] for s in m["segments"]} | ({m["tombstones"]} if m["tombstones"] else set()) \
        | ({m["ivf"]["dir"]} if m["ivf"] else set())
    assert on_disk == named, f"garbage left behind: {sorted(on_disk - named)}"


# crash points × the how-many-th time they are reached; ann=ivfpq writes IVF-PQ codes too
POINTS = [(f"{point}:{nth}", ann) for point, nths in [
    ("segment-write", (1, 4, 9)), ("segment-renamed", (2, 7)), ("manifest-write", (1, 3, 10, 17)),
    ("manifest-renamed", (2, 6, 13)), ("compact-segment", (1, 2)),
] for nth in nths for ann in ("exact", "ivfpq")] + [("ivf-train:1", "ivfpq"), ("ivf-train:2", "ivfpq")]


def _trial(tmp_path, i, crash, ann, delay=None, model=None) -> dict:
    index = tmp_path / f"t{i}"
    # a timed kill needs a run long enough to land in: 10 batches 0.1 s apart (about 1.5 s in all)
    proc = drive(index, crash, ann, extra=["--pause", "0.1"] if delay is not None else (), model=model)
    if delay is not None:
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"trial {i} ({crash or delay}): not killed: {proc.returncode}\n{err}"
    found, partial = check_after_kill(index, out, model is not None)
    again = drive(index, ann=ann, model=model)
    out2, err2 = again.communicate(timeout=120)
    assert again.returncode == 0, err2
    check_complete(index, model is not None)
    return {"trial": i, "kill": crash or f"random {delay:.2f}s", "ann": ann, "photos_after_kill": found,
            "in_flight_committed": partial, "augmented": model is not None}


@pytest.mark.e2e
def test_sigkill_at_crash_points_and_random_moments(tmp_path):
    rng = random.Random(20261123)
    report = []
    for i, (crash, ann) in enumerate(POINTS):
        report.append(_trial(tmp_path, i, crash, ann))
    # random moments: from the driver's start (imports, lock) to late in its run
    for j in range(12):
        report.append(_trial(tmp_path, len(POINTS) + j, None, rng.choice(["exact", "ivfpq"]),
                             delay=rng.uniform(0.2, 1.3)))
    assert len(report) >= 30
    kinds = {r["kill"].split(":")[0] for r in report}
    assert {"segment-write", "manifest-write", "manifest-renamed", "compact-segment"} <= kinds
    # some kills landed mid-run with photos committed, and some before anything was
    assert any(0 < r["photos_after_kill"] for r in report)
    out = Path(os.environ.get("CONVLAD_FAULT_REPORT", tmp_path / "faults.json"))
    out.write_text(json.dumps(report, indent=1))


@pytest.mark.e2e
def test_reader_searches_while_writer_adds_removes_and_compacts(tmp_path):
    index = tmp_path / "live"
    IndexStore.create(index, dim=16, ann="ivfpq").close()
    reader = IndexStore.open(index)
    writer = drive(index, ann="ivfpq", extra=["--compact-every", "2", "--wait", "--pause", "0.1"])
    generations, searches = set(), 0
    deadline = time.time() + 120
    while writer.poll() is None and time.time() < deadline:
        reader.refresh()
        generations.add(reader.generation)
        items = list(reader.items())
        paths = [p for _, p, _ in items]
        assert len(paths) == len(set(paths)), "a reader saw a photo twice"
        # whole batches only: of each batch, the photos that stay are all there or none
        found = {int(p[1:]) for p in paths if not deleted(int(p[1:]))}
        for start in range(0, N, BATCH):
            batch = {i for i in range(start, start + BATCH) if not deleted(i)}
            assert not (found & batch) or batch <= found, f"a reader saw half of batch {start}"
        if items:
            X = reader.vectors([i for i, _, _ in items])
            for (i, p, _), x in zip(items, X):
                np.testing.assert_array_equal(x, vector(int(p[1:])))
            D, I = reader.search(X, 1)
            assert I[:, 0].tolist() == [i for i, _, _ in items] and np.allclose(D[:, 0], 0, atol=1e-4)
            searches += len(X)
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert out.count("compacted") >= 3 and len(generations) >= 5, (out, generations)
    reader.refresh()
    assert sorted(p for _, p, _ in reader.items()) == [name(i) for i in range(N) if not deleted(i)]
    assert searches > 0


@pytest.fixture(scope="module")
def tiny_model(train_images, tmp_path_factory):
    """A fitted model of dimension 16 (the driver's), for a store that augments. The driver's local
    features are 16-D of its own making, not the model's: no local whitening to match them through."""
    from convlad.pipeline import ConvVLAD

    path = tmp_path_factory.mktemp("model") / "model.npz"
    ConvVLAD(layers=["block6"], pooled=[], scales=[1], k=8, dim=16, local_whitening=False).fit(
        train_images[:24], progress=False).save(path)
    return path


@pytest.mark.e2e
def test_sigkill_a_store_that_augments(tmp_path, tiny_model):
    """The pairs live in their segment's files: a kill keeps or loses them with their photos, and
    the rerun's additions mine what the lost ones had."""
    rng = random.Random(20261202)
    # (each run loads the model and mines: a few trials, at the points where pairs are written or carried)
    points = [("segment-write:4", "exact"), ("manifest-renamed:6", "ivfpq"), ("compact-segment:2", "exact")]
    report = [_trial(tmp_path, i, crash, ann, model=tiny_model) for i, (crash, ann) in enumerate(points)]
    report.append(_trial(tmp_path, len(points), None, rng.choice(["exact", "ivfpq"]), delay=rng.uniform(0.8, 2.0),
                         model=tiny_model))
    assert any(0 < r["photos_after_kill"] for r in report)
