"""Compact local features (``local_codec.py``): a model fitted with ``--local-codec`` makes an index that
stores each photo's local features in a few kB, reads back exactly what the codec's ``stored`` gives,
verifies queries (exact) against them (decoded), and finds the pairs the int8 layout finds. An int8
index, and a model saved before the codec existed, open as before."""
from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import numpy as np
import pytest

from convlad.index.store import IndexStore
from convlad.pipeline import ConvVLAD

from .servers import CLI, cli

CODEC = "pq10"  # 80-D features (Lite0's block6) as 10 bytes each


@pytest.fixture(scope="module")
def two(tmp_path_factory, dev_index):
    """Two tiny models (block6 at scale 1: a 14×14 map, 80-D features) fitted alike but for the codec, and
    an index of mvbench-dev's group photos with each, 120 features a photo (all 196 would fill every
    cell): ``int8.index`` and ``compact.index``."""
    wd = tmp_path_factory.mktemp("codec")
    (wd / "photos").mkdir()
    (wd / "photos" / "images").symlink_to(dev_index / "photos" / "images")
    for name, codec in (("int8", "int8"), ("compact", CODEC)):
        cli("train", "--images", dev_index / "train", "--out", wd / f"{name}.npz", "--layer", "block6", "--scales", "1",
            "--k", "16", "--dim", "32", "--local-codec", codec)
        cli("index", wd / f"{name}.npz", wd / "photos", "--out", wd / f"{name}.index", "--local-features", "120")
    return wd


@pytest.fixture(scope="module")
def compact(two):
    return two / "compact.index"


def _pairs(path) -> set:
    s = IndexStore.open(path)
    ids = np.array([i for i, _, _ in s.items()])
    P = s.partners(ids)
    names = {i: p for i, p, _ in s.items()}
    return {tuple(sorted((names[int(a)], names[int(b)]))) for a, b in P}


def test_a_compact_index_stores_a_few_kb_a_photo_and_reads_back_what_the_codec_gives(two, compact):
    store = IndexStore.open(compact)
    model = store.model
    assert model.config.local_codec == CODEC and model.local_codec_.compact
    seg = store.segments()[0]["name"]
    files = sorted(p.name for p in (compact / seg).glob("x-local-*.npy"))
    assert files == ["x-local-cellmap.npy", "x-local-count.npy", "x-local-grid.npy", "x-local-quantised.npy"]
    q = np.load(compact / seg / "x-local-quantised.npy")
    per_photo = sum(np.load(p).nbytes for p in (compact / seg).glob("x-local-*.npy")) / len(q)
    int8 = IndexStore.open(two / "int8.index")
    assert q.shape[1:] == (120, 10) and store.info()["local"] == {"features": 120, "coarse": 0, "codec": CODEC,
                                                                 "bytes_per_image": round(per_photo)}
    assert per_photo == 120 * 10 + 25 + 4 + 2 and int8.info()["local"]["bytes_per_image"] == 120 * 82 + 2

    items = list(store.items())[::40]
    ids = [i for i, _, _ in items]
    exact = model.transform([p if p.startswith("/") else f"{store.root}/{p}" for _, p, _ in items],
                            progress=False, local=store.local_k).local
    got, have = store.local_codes(ids)
    want = model.local_codec_.stored(exact)
    assert have.all()
    np.testing.assert_array_equal(got.count, want.count)
    np.testing.assert_array_equal(got.cells, want.cells)
    np.testing.assert_array_equal(got.codes, want.codes)
    # the cells are the exact ones (a bitmap of the map: lossless), each with its own feature's code
    for i in range(len(ids)):
        n = int(exact.count[i])
        order = {tuple(c): j for j, c in enumerate(exact.cells[i, :n].tolist())}
        assert set(order) == {tuple(c) for c in got.cells[i, :n].tolist()}
        rows = [order[tuple(c)] for c in got.cells[i, :n].tolist()]
        a = exact.codes[i, :n].astype(np.float32)
        b = got.codes[i, :n].astype(np.float32)
        S = (b / np.linalg.norm(b, axis=1, keepdims=True)) @ (a / np.linalg.norm(a, axis=1, keepdims=True)).T
        # decoded beside its own cell, not shuffled: most decode nearest to the feature they encode
        assert np.mean(S.argmax(1) == rows) > 0.5, np.mean(S.argmax(1) == rows)


def test_a_compact_index_finds_the_pairs_the_int8_one_finds(two, compact):
    old, new = _pairs(two / "int8.index"), _pairs(compact)
    assert len(old) > 50
    # pq10 kept 164 of the 208 pairs and found no other (misplaced cells or codes find none at all):
    # a pair's inliers fall a little with decoded features, and some drop under the sure level
    assert len(old & new) >= 0.7 * len(old), (len(old), len(new), len(old & new))
    assert len(new - old) <= 0.1 * len(old)
    # and a search by photo verifies against the stored codes: a group's photos at the sure level
    out = json.loads(cli("search", compact, *sorted((two / "photos" / "images").glob("*.jpg"))[:6], "--json",
                         "-k", "10").stdout)
    sure = IndexStore.open(compact).model.verifier().sure
    assert sum(1 for q in out for h in q["results"][1:] if (h.get("inliers") or 0) >= sure) >= 3


def test_compaction_keeps_the_compact_features_of_commits_with_maps_of_other_widths(compact, tmp_path):
    store = IndexStore.open(compact)
    model = store.model
    items = list(store.items())[:8]
    paths = [p if p.startswith("/") else f"{store.root}/{p}" for _, p, _ in items]
    enc = model.transform(paths, progress=False, local=store.local_k)
    # the second commit's photos keep only their features in the map's top rows, and their map's size is
    # not known (as for photos of kept aspect ratios, each its own map): a cell map of the rows they span
    top = replace(enc.local[np.arange(4, 8)], grid=None)
    for i in range(len(top)):
        keep = top.cells[i, : int(top.count[i]), 1] < 5
        n = int(keep.sum())
        for a in (top.codes, top.cells):
            a[i, :n] = a[i, : int(top.count[i])][keep]
            a[i, n:] = 0
        top.count[i] = n
    with IndexStore.create(tmp_path / "two.index", model=model, root=store.root) as w:
        w.add_vectors(enc.X[:4], paths[:4], local=enc.local[np.arange(4)])
        w.add_vectors(enc.X[4:], paths[4:], local=top)
        widths = [np.load(tmp_path / "two.index" / s["name"] / "x-local-cellmap.npy").shape[1] for s in w.segments()]
        before, _ = w.local_codes(np.arange(8))
        w.compact(target_rows=1000)
        assert len(w.segments()) == 1
        after, have = w.local_codes(np.arange(8))
    assert len(set(widths)) == 2 and have.all()
    for f in ("codes", "cells", "count"):
        np.testing.assert_array_equal(getattr(before, f), getattr(after, f))
    assert (after.cells[4:, :, 1] < 5).all() and (after.count[4:] > 0).all()


def test_a_model_without_a_codec_keeps_its_fingerprint_and_its_int8_index(dev_index):
    model = ConvVLAD.load(dev_index / "model.npz")
    meta, arrays = model.state()
    assert "local_codec" not in meta["config"] and not any(k.startswith("local-codec") for k in arrays)
    assert not model.local_codec_.compact
    seg = IndexStore.open(dev_index / "default.index").segments()[0]["name"]
    assert (dev_index / "default.index" / seg / "x-local-codes.npy").exists()


@pytest.mark.parametrize("args, says", [
    (["--local-codec", "zz9"], "--local-codec: local codec 'zz9': expected int8, rqM or pqM"),
])
def test_a_bad_codec_is_one_line(tmp_path, args, says):
    (tmp_path / "a.jpg").write_bytes(b"")
    p = subprocess.run([*CLI, "train", "--images", tmp_path, "--out", tmp_path / "m.npz", *args],
                       capture_output=True, text=True)
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr and len(p.stderr.splitlines()) == 1


def test_a_given_model_brings_its_own_codec(dev_index, tmp_path):
    p = subprocess.run([*CLI, "index", dev_index / "model.npz", dev_index / "photos", "--out", tmp_path / "x.index",
                        "--local-codec", "rq12"], capture_output=True, text=True)
    assert p.returncode == 2 and "--local-codec is the model's" in p.stderr and "Traceback" not in p.stderr
