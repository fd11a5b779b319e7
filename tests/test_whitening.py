"""The learned whitening and the pairs it learns from: mined by the verifier, with no labels."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from convlad.pairs import augment, mine_pairs
from convlad.whitening import LearnedWhitening, from_collection, ledoit_wolf


@pytest.fixture(scope="module")
def photos_and_views(train_images, tmp_path_factory):
    """A small benchmark in the mvbench layout: 30 groups of a training photo and a synthetic view
    of it (a crop, turn, perspective and light change: convlad.study.synviews'), and 30 unrelated
    training photos as distractors: (folder, paths, the photo each view is of)."""
    from convlad.study.synviews import view

    out = tmp_path_factory.mktemp("views")
    (out / "images").mkdir()
    (out / "distractors").mkdir()
    rng = np.random.default_rng(0)
    photos = train_images[::9][:60]
    groups, paths, of = {}, [], {}
    for i, p in enumerate(photos[:30]):
        img = cv2.imread(p)
        names = [f"g{i:02d}_0.jpg", f"g{i:02d}_1.jpg"]
        cv2.imwrite(str(out / "images" / names[0]), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(out / "images" / names[1]), view(img, rng), [cv2.IMWRITE_JPEG_QUALITY, 80])
        groups[f"g{i:02d}"] = names
        of[len(paths) + 1] = len(paths)
        paths += [str(out / "images" / n) for n in names]
    distractors = []
    for i, p in enumerate(photos[30:]):
        distractors.append(f"d{i:02d}.jpg")
        cv2.imwrite(str(out / "distractors" / distractors[-1]), cv2.imread(p), [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(str(out / "distractors" / distractors[-1]))
    (out / "groups.json").write_text(json.dumps(groups))
    (out / "distractors.json").write_text(json.dumps(distractors))
    return out, paths, of


@pytest.fixture(scope="module")
def encoded(photos_and_views, train_images):
    from convlad.pipeline import ConvVLAD

    _, paths, _ = photos_and_views
    model = ConvVLAD(layers=["block6"], pooled=["block15"], scales=[1, 2], k=16, dim=None)
    model.fit(train_images[1::40], progress=False)
    enc = model.transform(paths, progress=False, local=300)
    assert not enc.errors
    return model, enc


def test_the_mined_pairs_are_views_of_one_photo_and_find_most_of_them(photos_and_views, encoded):
    _, _, of = photos_and_views
    model, enc = encoded
    pairs = mine_pairs(enc.X, enc.local, model.pair_verifier())
    assert pairs.shape[1] == 2 and (pairs[:, 0] < pairs[:, 1]).all()
    assert len(np.unique(pairs, axis=0)) == len(pairs)
    truth = {(i, v) for v, i in of.items()}
    wrong = [tuple(p) for p in pairs.tolist() if tuple(p) not in truth]
    assert not wrong, f"pairs of unrelated photos mined: {wrong}"
    assert len(pairs) >= len(truth) // 2, f"only {len(pairs)} of the {len(truth)} views found"
    # a laxer threshold finds at least as many: the threshold is what keeps chance pairs out
    assert len(mine_pairs(enc.X, enc.local, model.pair_verifier(), min_inliers=model.pair_chance_)) >= len(pairs)


def test_the_learned_whitening_whitens_the_differences_of_matching_pairs():
    rng = np.random.default_rng(0)
    d, n = 16, 400
    base = rng.normal(size=(n, d))
    # pairs differ mostly along the first axis: the whitening must shrink it the most
    noise = rng.normal(size=(n, d)) * np.r_[10.0, np.ones(d - 1) * 0.5]
    X = np.concatenate([base, base + noise]).astype(np.float32)
    pairs = np.stack([np.arange(n), np.arange(n) + n], 1)
    lw = LearnedWhitening(shrinkage=0.0)
    assert lw.fit(X, pairs) is lw
    D = (X[pairs[:, 0]] - X[pairs[:, 1]]).astype(np.float64)
    W = D @ lw.projection_.T.astype(np.float64)
    C = np.concatenate([W, -W]).T @ np.concatenate([W, -W]) / (2 * n)
    assert np.allclose(C, np.eye(d), atol=1e-3)
    before = X.copy()
    Z = lw.transform(X)
    assert np.array_equal(X, before) and np.array_equal(Z, lw.transform(X))  # pure
    assert Z.dtype == np.float32 and np.allclose(np.linalg.norm(Z, axis=1), 1, atol=1e-5)
    back = LearnedWhitening.from_state(lw.get_state())
    assert np.array_equal(back.transform(X), Z)
    with pytest.raises(ValueError, match="no matching pairs"):
        LearnedWhitening().fit(X, np.zeros((0, 2), np.int64))


def test_ledoit_wolf_shrinks_little_where_the_scatter_is_well_estimated():
    rng = np.random.default_rng(0)
    d = 32
    iso = rng.normal(size=(4000, d))
    aniso = rng.normal(size=(4000, d)) * np.geomspace(10, 0.1, d)
    few = rng.normal(size=(40, d)) * np.geomspace(10, 0.1, d)
    assert ledoit_wolf(iso) > 0.9  # already a multiple of the identity: shrink all the way
    assert ledoit_wolf(aniso) < 0.01
    assert ledoit_wolf(aniso) < ledoit_wolf(few) < 1  # fewer samples, more shrinkage


def test_eval_says_what_it_learned_from_the_collection_and_reports_both(photos_and_views, train_images,
                                                                                  tmp_path):
    folder, _, _ = photos_and_views
    train = tmp_path / "train"
    train.mkdir()
    for p in train_images[1::12]:
        (train / Path(p).name).symlink_to(p)
    p = subprocess.run([sys.executable, "-m", "convlad", "eval", "mvbench", str(folder), "--train", str(train),
                        "--layer", "block6", "--k", "16", "--dim", "32", "--rerank", "0", "--whiten", "collection",
                        "--augment", "verified", "--aps", str(tmp_path / "aps.json")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    said = re.search(r"^whitening: PCA, then from the collection \(transductive, no labels\): whitening learned from "
                     r"(\d+) pairs mined in the database photos .*; database descriptors augmented with their partners "
                     r"in (\d+) verified pairs \(queries search with their own\)$", p.stdout, re.M)
    assert said and said.group(1) == said.group(2), p.stdout
    alone = re.search(r"^without the collection's steps \(PCA-whitening alone\): mAP (0\.\d{3})$", p.stdout, re.M)
    assert alone, p.stdout
    doc = json.loads((tmp_path / "aps.json").read_text())
    assert doc["pca_only"]["mAP"] == pytest.approx(float(alone.group(1)), abs=5e-4)
    assert "transductive" in doc["whitening"] and len(doc["aps"]) == len(doc["pca_only"]["aps"]) == 60
    # the two views of a photo find each other at least as well with the collection's steps
    assert doc["mAP"] >= doc["pca_only"]["mAP"] - 0.01, (doc["mAP"], doc["pca_only"]["mAP"])
    bad = subprocess.run([sys.executable, "-m", "convlad", "eval", str(folder), "--train", str(train),
                          "--whiten", "labels"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--whiten" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "convlad", "eval", str(folder), "--train", str(train),
                          "--augment", "labels"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--augment" in bad.stderr


def test_augmentation_adds_only_verified_partners_and_queries_keep_their_own(photos_and_views, encoded):
    _, _, of = photos_and_views
    model, enc = encoded
    X = enc.X
    pairs = mine_pairs(X, enc.local, model.pair_verifier())
    Y = augment(X, pairs)
    assert Y.dtype == np.float32 and np.allclose(np.linalg.norm(Y, axis=1), 1, atol=1e-5)
    paired = np.zeros(len(X), bool)
    paired[pairs.ravel()] = True
    assert np.allclose(Y[~paired], X[~paired], atol=1e-6)  # a photo nothing verified with keeps its descriptor
    a, b = pairs[0]
    assert np.allclose(Y[a], (X[a] + X[b]) / np.linalg.norm(X[a] + X[b]), atol=1e-5) or (pairs == a).sum() > 1
    # each view comes nearer the photo it is of (database side), and the queries search unaugmented
    for v, i in of.items():
        if paired[v]:
            assert X[v] @ Y[i] >= X[v] @ X[i] - 1e-6
    col = from_collection(X, None, enc.local, model.pair_verifier(), augmented="verified")
    assert col.X is X and np.array_equal(col.pairs, pairs) and col.mined == len(pairs)
    plain = from_collection(X, None, enc.local, model.pair_verifier())
    assert plain.X is X and plain.notes == [] and plain.pairs is None and plain.mined == 0  # nothing asked, nothing mined
    with pytest.raises(ValueError):
        from_collection(X, None, enc.local, model.pair_verifier(), augmented="labels")


def _pairs_of_store(st) -> set:
    return {(int(a), int(b)) for a, b in st.pairs()}


def test_an_index_that_augments_ranks_as_eval_does(photos_and_views, encoded, tmp_path):
    """The store mines each added photo's pairs as eval mines the benchmark's, and searches the
    same augmented rows: built in one go it ranks exactly as eval's ``--augment verified``."""
    from convlad.search import MemoryIndex, Settings, features, rank
    from convlad.index.store import IndexStore

    _, paths, _ = photos_and_views
    model, enc = encoded
    X, v = enc.X, model.pair_verifier()
    pairs = mine_pairs(X, enc.local, v)
    assert len(pairs) >= 10
    Y = augment(X, pairs)
    with IndexStore.create(tmp_path / "ix", model=model) as st:  # augments by default
        st.add_vectors(X, paths, local=enc.local)
        assert _pairs_of_store(st) == {tuple(p) for p in pairs.tolist()}
        assert st.info()["augment"] == "verified" and st.info()["pairs"] == len(pairs)
        assert np.array_equal(st.vectors(np.arange(len(X))), X)  # a photo as a query: its own descriptor
        feats = features(enc.local, len(X))
        mem = MemoryIndex(X, enc.local, model.verifier(), pairs)
        for s in (Settings(k=len(X), rerank=0), Settings(k=20, rerank=100)):
            got, want = rank(st, X, feats, s, exclude=[[i] for i in range(len(X))]), \
                rank(mem, X, feats, s, exclude=[[i] for i in range(len(X))])
            assert [[h.id for h in r] for r in got] == [[h.id for h in r] for r in want]
            assert np.allclose([h.distance for r in got for h in r], [h.distance for r in want for h in r], atol=1e-6)
    # a reader sees the pairs; a plain store of the same photos ranks by the plain rows
    with IndexStore.open(tmp_path / "ix") as rd:
        assert np.allclose(rd.search(X[:3], 5)[0], MemoryIndex(Y).search(X[:3], 5)[0], atol=1e-6)
    with IndexStore.create(tmp_path / "plain", model=model, augment="none") as st:
        st.add_vectors(X, paths, local=enc.local)
        assert st.info()["augment"] == "none" and st.info()["pairs"] == 0
        assert np.allclose(st.search(X[:3], 5)[0], MemoryIndex(X).search(X[:3], 5)[0], atol=1e-6)


def test_an_index_keeps_its_pairs_through_appends_deletes_compaction_and_ivfpq(photos_and_views, encoded, tmp_path):
    """Photos added later pair with those before them from their own side; a pair goes with a
    deleted photo; compaction carries the pairs; the IVF-PQ's shortlist is made exact with the
    augmented rows."""
    from convlad.index.store import IndexStore

    _, paths, of = photos_and_views
    model, enc = encoded
    X, v = enc.X, model.pair_verifier()
    first = np.array(sorted(set(range(len(X))) - set(of)))  # the photos and the distractors, then the views
    second = np.array(sorted(of))
    order = np.concatenate([first, second])
    for ann in ("exact", "ivfpq"):
        with IndexStore.create(tmp_path / ann, model=model, augment="verified", ann=ann) as st:
            st.add_vectors(X[first], [paths[i] for i in first], local=enc.local[first])
            before = _pairs_of_store(st)
            st.add_vectors(X[second], [paths[i] for i in second], local=enc.local[second])
            pairs = _pairs_of_store(st)
            # a view (second batch) and the photo it is of (first): found from the view's side
            across = {(a, b) for a, b in pairs - before if a < len(first) <= b}
            views = {(int(np.flatnonzero(first == of[int(order[b])])[0]), b) for a, b in across if int(order[b]) in of}
            assert len(across) >= 10 and views >= across & views and len(views) >= 10
            for a, b in pairs:  # every pair verifies at three times the chance level, from one side (either scale)
                assert max(v.inliers_from(enc.local, int(order[s]), enc.local[[int(order[t])]])[0]
                           for s, t in ((a, b), (b, a))) >= 3 * v.chance
            Xs = X[order]
            P = np.array(sorted(pairs), np.int64)
            Y = augment(Xs, P)
            D, I = st.search(Xs[:10], 8)
            assert np.allclose(D, ((Y[I] - Xs[:10, None]) ** 2).sum(-1), atol=1e-5)  # distances to the augmented rows
            if ann == "exact":
                # appended: older rows updated in place, each row searched as augmented
                assert np.allclose(st.rows_searched(np.arange(len(Xs))), Y, atol=1e-6)
                D1, _ = st.search(Y, 1)  # a photo and its view augmented by each other alone tie: distances only
                assert np.allclose(D1[:, 0], 0, atol=1e-5)
            # a deleted photo's pairs go: its partners search with their plain rows again
            a, b = next((a, b) for a, b in sorted(pairs) if sum(a in p or b in p for p in pairs) == 1)
            st.remove([a])
            assert all(a not in p for p in _pairs_of_store(st)) and _pairs_of_store(st) == pairs - {(a, b)}
            keep = np.array([i for i in range(len(Xs)) if i != a])
            Y2 = augment(Xs, np.array(sorted(pairs - {(a, b)}), np.int64))
            assert np.allclose(st.rows_searched([b]), Xs[b], atol=1e-6)
            st.compact(target_rows=10_000)
            assert len(st.segments()) == 1 and _pairs_of_store(st) == pairs - {(a, b)}
            D, I = st.search(Xs[keep[:10]], 8)
            assert a not in I and np.allclose(D, ((Y2[I] - Xs[keep[:10], None]) ** 2).sum(-1), atol=1e-5)
