"""The segment store on real faiss and real files: commits, tombstones, compaction, snapshots,
the shared IVF-PQ, the writer lock, old single-file indexes, file modes, the folder walk."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from convlad.images import list_images
from convlad.index.ann import ExactIndex
from convlad.index.segments import StoreLocked
from convlad.storage import FileFormatError, atomic_savez
from convlad.index.store import IndexStore


def clustered(n, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 20), d)).astype(np.float32)
    X = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def names(a, b):
    return [f"img{i:05d}.jpg" for i in range(a, b)]


def test_segments_commit_search_delete_compact(tmp_path):
    X = clustered(600)
    with IndexStore.create(tmp_path / "ix", dim=32, ann="exact") as st:
        ids = np.concatenate([st.add_vectors(X[s:s + 200], names(s, s + 200)) for s in (0, 200, 400)])
        assert ids.tolist() == list(range(600)) and len(st) == 600 and st.generation == 3
        assert len(list((tmp_path / "ix").glob("seg-*"))) == 3
        # exact search over the segments equals one exact index over everything
        D, I = st.search(X[:20], 5)
        D0, I0 = ExactIndex(X).search(X[:20], 5)
        np.testing.assert_array_equal(I, I0)
        np.testing.assert_allclose(D, D0, atol=1e-5)
        assert st.remove([5, 250, 599, 10_000]) == 3  # an unknown id is ignored
        assert len(st) == 597 and st.n_dead == 3
        D, I = st.search(X[[5, 250]], 3)
        assert 5 not in I[0] and 250 not in I[1]
        with pytest.raises(KeyError):
            st.vectors([5])
        gen = st.generation
        summary = st.compact()
        assert summary == {"segments_before": 3, "segments_after": 1, "dropped": 3, "merged": 3}
        assert st.generation == gen + 1 and st.n_dead == 0 and len(st) == 597
        assert len(list((tmp_path / "ix").glob("seg-*"))) == 1 and not list((tmp_path / "ix").glob("dead-*"))
        # ids survive compaction: same id, same descriptor, same path
        np.testing.assert_array_equal(st.vectors([7, 300]), X[[7, 300]])
        assert st.path_of(300) == "img00300.jpg"
        assert st.compact()["merged"] == 0  # nothing left to do


def test_reader_keeps_its_generation_until_refresh(tmp_path):
    X = clustered(300, seed=1)
    writer = IndexStore.create(tmp_path / "ix", dim=32, ann="exact")
    writer.add_vectors(X[:100], names(0, 100))
    writer.add_vectors(X[100:200], names(100, 200))
    reader = IndexStore.open(tmp_path / "ix")
    writer.remove(list(range(50)))
    writer.compact()  # deletes the files the reader has mapped
    writer.add_vectors(X[200:], names(200, 300))
    assert len(reader) == 200
    D, I = reader.search(X[:3], 1)  # the old generation, complete: ids 0..2 still there
    assert I[:, 0].tolist() == [0, 1, 2] and np.allclose(D[:, 0], 0, atol=1e-5)
    assert reader.refresh() and len(reader) == 250 and reader.generation == writer.generation
    assert reader.search(X[:1], 1)[1][0, 0] != 0 and reader.search(X[299:], 1)[1][0, 0] == 299
    assert not reader.refresh()
    with pytest.raises(PermissionError):
        reader.add_vectors(X[:1], ["x"])
    writer.close()


def test_one_writer_at_a_time(tmp_path):
    st = IndexStore.create(tmp_path / "ix", dim=8)
    with pytest.raises(StoreLocked, match=f"another writer holds the index \\(pid {os.getpid()}"):
        IndexStore.open(tmp_path / "ix", write=True)
    IndexStore.open(tmp_path / "ix").close()  # readers are never blocked
    st.close()
    IndexStore.open(tmp_path / "ix", write=True).close()


def test_shared_ivfpq_is_trained_once_then_retrained_when_the_collection_outgrows_it(tmp_path):
    X = clustered(9_000, seed=2)
    with IndexStore.create(tmp_path / "ix", dim=32, ann="ivfpq") as st:
        st.add_vectors(X[:2_000], names(0, 2_000))
        ivf = st.m["ivf"]
        assert ivf["trained_on"] == 2_000
        st.add_vectors(X[2_000:6_000], names(2_000, 6_000))  # 6 000 ≤ 4 × 2 000: same training
        assert st.m["ivf"] == ivf and len(list((tmp_path / "ix" / ivf["dir"]).glob("seg-*.npy"))) == 2
        st.add_vectors(X[6_000:], names(6_000, 9_000))  # 9 000 > 8 000: retrained on all of them
        assert st.m["ivf"]["trained_on"] == 9_000 and st.m["ivf"]["dir"] != ivf["dir"]
        assert not (tmp_path / "ix" / ivf["dir"]).exists()  # the old codes are collected
        st.remove([3, 4])
        Q = X[:200]
        D, I = st.search(Q, 10)
        D0, I0 = ExactIndex(np.delete(X, [3, 4], axis=0)).search(Q, 10)
        ids0 = np.delete(np.arange(9_000), [3, 4])[I0]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, ids0)])
        assert recall >= 0.9 and not np.isin(I, [3, 4]).any()
        np.testing.assert_allclose(D, ((st.vectors(I.ravel()).reshape(200, 10, 32) - Q[:, None]) ** 2).sum(-1),
                                   atol=1e-5)  # distances are exact ones
        info = st.info()
        assert info["images"] == 8_998 and info["dead"] == 2 and info["search"].startswith("IVF-PQ IVF")


def test_old_single_file_index_opens_and_converts(tmp_path, train_images):
    from convlad.pipeline import ConvVLAD

    model = ConvVLAD(layers=["block11"], pooled=[], scales=[1], k=4, dim=None)
    model.fit(train_images[:4], progress=False)
    photos = tmp_path / "photos"
    photos.mkdir()
    X = clustered(5, d=model.dim, seed=3)
    meta, arrays = model.state()
    old = tmp_path / "photos.index.npz"
    # the layout convlad 0.1 wrote
    atomic_savez(old, {"format": "convlad-index", "version": 1, "root": str(photos.resolve()), "model": meta,
                       "ann": "auto", "ann_factory": None},
                 {**{f"model/{k}": v for k, v in arrays.items()}, "X": X,
                  "stamps": np.arange(10, dtype=np.int64).reshape(5, 2), "paths": np.array(names(0, 5))})
    ro = IndexStore.open(old)
    assert len(ro) == 5 and ro.search(X[2], 1)[1][0, 0] == 2 and ro.info()["images"] == 5
    said = []
    with IndexStore.create(old, model=model, root=photos, report=said.append) as st:
        assert len(st) == 5 and (old / "MANIFEST").is_file()
        np.testing.assert_array_equal(st.vectors(range(5)), X)
        assert [p for _, p, _ in st.items()] == names(0, 5)
    assert len(said) == 1 and "converted" in said[0] and (tmp_path / "photos.index.npz.v1").is_file()


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        with IndexStore.create(tmp_path / "ix", dim=8) as st:
            st.add_vectors(np.ones((2, 8), np.float32), ["a", "b"])
        atomic_savez(tmp_path / "m.npz", {"format": "x"}, {})
    finally:
        os.umask(old)
    seg = next((tmp_path / "ix").glob("seg-*"))
    for f in [tmp_path / "ix" / "MANIFEST", seg / "X.npy", seg / "paths.bin", tmp_path / "m.npz"]:
        assert f.stat().st_mode & 0o777 == 0o664, f


def test_a_folder_that_is_not_an_index_is_left_alone(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"x")
    with pytest.raises(FileFormatError, match="not an index"):
        IndexStore.create(tmp_path / "photos", dim=8)
    assert os.listdir(tmp_path / "photos") == ["keep.jpg"]
    with pytest.raises(FileFormatError, match="not an index"):
        IndexStore.open(tmp_path / "photos")


def test_manifest_is_plain_json_naming_every_segment(tmp_path):
    with IndexStore.create(tmp_path / "ix", dim=4) as st:
        st.add_vectors(np.eye(4, dtype=np.float32), list("abcd"))
    m = json.loads((tmp_path / "ix" / "MANIFEST").read_text())
    assert m["format"] == "convlad-store" and m["generation"] == 1 and m["next_id"] == 4
    assert [s["rows"] for s in m["segments"]] == [4] and (tmp_path / "ix" / m["segments"][0]["name"]).is_dir()


def test_walk_reaches_each_file_once_and_reports_bad_links(tmp_path):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_bytes(b"1")
    (root / "y.png").write_bytes(b"2")
    (root / "loop").symlink_to(".")  # a link loop
    (root / "a" / "up").symlink_to("..")  # and another, one level down
    (root / "alias").symlink_to("a")  # the same folder twice
    (root / "z.jpg").symlink_to(root / "y.png")  # the same file twice
    (root / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")  # dangling
    skipped = []
    assert list_images(root, skipped=skipped) == ["a/x.jpg", "y.png"]
    text = "\n".join(skipped)
    assert "gone.jpg: broken link" in text and "z.jpg: same file as" in text
    assert "loop: same folder" in text and "alias: same folder" in text


def test_many_small_commits_are_merged_automatically(tmp_path, monkeypatch):
    import convlad.index.merge as merge

    monkeypatch.setattr(merge, "MAX_SMALL_SEGMENTS", 8)  # 64 in use; the policy, not the number
    X = clustered(40, d=8, seed=4)
    with IndexStore.create(tmp_path / "ix", dim=8) as st:
        for i in range(40):  # one commit per photo, as uploads to the service are
            st.add_vectors(X[i:i + 1], [f"u{i}.jpg"])
            assert len(st.m["segments"]) <= 9
        assert len(st) == 40 and [p for _, p, _ in st.items()] == [f"u{i}.jpg" for i in range(40)]
        np.testing.assert_array_equal(st.vectors(range(40)), X)


def test_merge_policy_is_a_pure_choice_of_neighbouring_small_or_dirty_segments():
    from convlad.index.merge import plan_merges

    # small runs merge up to the target; a large clean segment ends a run and stays
    assert plan_merges([10, 10, 10, 900, 10, 10], [10, 10, 10, 900, 10, 10], target_rows=1000) == [[0, 1, 2], [4, 5]]
    # a lone small segment stays; a dirty one is rewritten even alone, large or not
    assert plan_merges([10, 900], [10, 900], target_rows=1000) == []
    assert plan_merges([900, 10], [800, 10], target_rows=1000) == [[0, 1]]
    assert plan_merges([2000], [1999], target_rows=1000) == [[0]]
    # a run is cut where the target would be passed
    assert plan_merges([400, 400, 400], [400, 400, 400], target_rows=1000) == [[0, 1]]
