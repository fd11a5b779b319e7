"""Shards of one index (``index/shards.py``): a sharded index of mvbench-dev's photos, searched through
its shards in this process, ranks as the unsharded index of the same photos: the same ids, order,
inliers and links. The writer spreads commits over the shards; deletes and compaction stay per shard.
The same on Ray Serve, on a three-node cluster, is ``test_ray_shards.py``."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from convlad import search as S
from convlad.index.shards import Local, Shard, ShardedIndex, ShardUnavailable, local_shards
from convlad.index.store import IndexStore

from .servers import CLI, cli


def _ranked(index, ids, k=100, qe=0):
    return [[(h.id, h.inliers, h.via, h.same) for h in hits]
            for hits in S.search_ids(index, ids, S.Settings(k=k, qe=qe))]


@pytest.fixture(scope="module")
def sharded(dev_index):
    out = dev_index / "sharded.index"
    # as default.index was made (one commit: the pairs mined are those of a commit), split over 3 shards
    cli("index", dev_index / "model.npz", dev_index / "photos", "--out", out, "--shards", "3")
    return out


def test_a_sharded_index_ranks_as_the_unsharded_one(dev_index, sharded):
    whole = IndexStore.open(dev_index / "default.index")  # the same photos and model, one shard
    by_shard = ShardedIndex(IndexStore.open(sharded), local_shards(sharded))
    ids = [i for i, _, _ in whole.items()]
    assert [i for i, _, _ in IndexStore.open(sharded).items()] == ids
    info = json.loads(cli("info", sharded, "--json").stdout)
    assert [s["shard"] for s in info["shards"]] == [0, 1, 2] and sum(s["images"] for s in info["shards"]) == len(ids)
    assert min(s["images"] for s in info["shards"]) >= len(ids) // 3 - 1  # spread evenly
    assert len(Shard(sharded, 1).store) == info["shards"][1]["images"]
    got, want = _ranked(by_shard, ids), _ranked(whole, ids)
    assert got == want
    assert _ranked(by_shard, ids[::5], qe=2) == _ranked(whole, ids[::5], qe=2)  # query expansion too
    # the test can fail: verified results, links among them, and a photo of each shard in most lists
    assert sum(h[1] is not None and h[1] >= whole.model.verifier().sure for r in want for h in r) > len(ids)
    assert sum(h[2] is not None for r in want for h in r) > 0
    store = IndexStore.open(sharded)
    mixed = [len(set(store.shards_of([h[0] for h in r[:30]]).tolist())) for r in want]
    assert max(mixed) == 3 and sum(m >= 2 for m in mixed) > len(ids) / 2  # most lists merge several shards


def test_deletes_and_compaction_stay_within_each_shard(dev_index, sharded, tmp_path):
    import shutil

    copy = tmp_path / "sharded.index"
    shutil.copytree(sharded, copy)
    before = {s["name"]: s["shard"] for s in IndexStore.open(copy).segments()}
    with IndexStore.open(copy, write=True) as w:
        gone = [i for i, _, _ in w.items()][5::7]
        assert w.remove(gone) == len(gone)
        w.compact()
        segs = w.segments()
    # a merged segment holds the rows of one shard's segments only
    assert len(segs) == 3 and sorted(s["shard"] for s in segs) == [0, 1, 2]
    store = IndexStore.open(copy)
    for sh in range(3):
        old_ids = {i for s in IndexStore.open(sharded).segments() if s["shard"] == sh for i in _ids(sharded, s["name"])}
        assert set(_ids(copy, segs[[s["shard"] for s in segs].index(sh)]["name"])) == old_ids - set(gone)
    assert set(before.values()) == {0, 1, 2}
    ids = [i for i, _, _ in store.items()]
    assert _ranked(ShardedIndex(store, local_shards(copy)), ids[:60]) == _ranked(store, ids[:60])
    # re-sharded: the manifest changes, no segment file is rewritten, and the ranking stays
    files = {str(p.relative_to(copy)): p.stat().st_mtime_ns for p in copy.glob("seg-*/X.npy")}
    served = ShardedIndex(IndexStore.open(copy), local_shards(copy))  # serving the 3 shards meanwhile
    with IndexStore.open(copy, write=True) as w:
        w.reshard(2)
    store = IndexStore.open(copy)
    served.store.refresh()
    assert _ranked(served, ids[:20]) == _ranked(store, ids[:20])  # shard 2 now owns nothing
    assert [len(c.shard.store) for c in served.clients] == [s["images"] for s in store.info()["shards"]] + [0]
    with IndexStore.open(copy, write=True) as w:
        w.reshard(4)
    served.store.refresh()
    with pytest.raises(ShardUnavailable, match="restart"):
        _ranked(served, ids[:1])
    with IndexStore.open(copy, write=True) as w:
        w.reshard(2)
    store.refresh()
    assert store.shards == 2 and {s["shard"] for s in store.segments()} == {0, 1}
    assert {str(p.relative_to(copy)): p.stat().st_mtime_ns for p in copy.glob("seg-*/X.npy")} == files
    assert _ranked(ShardedIndex(store, local_shards(copy)), ids[:60]) == _ranked(store, ids[:60])
    bad = subprocess.run([*CLI, "index", str(dev_index / "photos"), "--out", str(copy), "--shards", "0"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip() == "error: --shards 0: must be between 1 and 1024", bad.stderr


def _ids(index, name):
    from convlad.index import segments as SG

    return np.asarray(SG.read_segment(index, name).ids).tolist()


class _Dead:
    def submit(self, method, *args):
        raise ConnectionError("replica died")


class _Refusing:
    def submit(self, method, *args):
        from concurrent.futures import Future

        f = Future()
        f.set_exception(TimeoutError("no replica within 5 s"))
        return f


def test_a_search_some_shard_does_not_answer_names_it_and_answers_nothing(sharded):
    store = IndexStore.open(sharded)
    shards = local_shards(sharded)
    for broken in (_Refusing(), _Dead()):
        index = ShardedIndex(store, [shards[0], broken, shards[2]])
        with pytest.raises(ShardUnavailable) as e:
            S.search_ids(index, [0], S.Settings(k=10))
        assert e.value.missing == [1] and "shard 1 did not answer" in str(e.value)
    assert [h.get("error") is not None for h in ShardedIndex(store, [shards[0], _Refusing(), shards[2]]).health()] \
        == [False, True, False]
    assert isinstance(shards[0], Local)


def test_through_ivfpq_each_shard_s_shortlist_holds_the_whole_one_s(sharded, tmp_path):
    """Past the exact search (here forced: --ann ivfpq), each shard takes its own IVF-PQ shortlist
    from the same lists: the merged global top k is the whole index's, or nearer."""
    import shutil

    copy = tmp_path / "ivf.index"
    shutil.copytree(sharded, copy)
    IndexStore.create(copy, ann="ivfpq").close()
    whole = IndexStore.open(copy)
    assert whole.info()["search"].startswith("IVF-PQ")
    by_shard = ShardedIndex(IndexStore.open(copy), local_shards(copy))
    Q = whole.vectors([i for i, _, _ in whole.items()][::4])
    D1, I1 = whole.search(Q, 100)
    D2, I2 = by_shard.search(Q, 100)
    assert (D2 <= D1 + 1e-6).all()
    assert (I1 == I2).mean() > 0.99  # here the shortlists (256 of 408) hold the same photos


def test_ties_merge_in_the_whole_index_s_order_after_compaction_interleaves_the_shards(tmp_path):
    """Rows at equal distances (here exact copies) go by the whole index's store order in a shard's
    merge too, also once compaction has merged each shard's segments and their ids interleave."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 8)).astype(np.float32)
    with IndexStore.create(tmp_path / "ix", dim=8, shards=2) as w:
        for _ in range(4):  # each commit split over the 2 shards: ids 0-2 / 3-5, 6-8 / 9-11, ...
            w.add_vectors(base[rng.integers(0, 3, 6)], [f"p{i}" for i in range(6)])
        w.remove([1])
        w.compact()
        segs = w.segments()
    assert len(segs) == 2 and sorted(s["shard"] for s in segs) == [0, 1]
    whole = IndexStore.open(tmp_path / "ix")
    order = [i for i, _, _ in whole.items()]
    assert order != sorted(order)  # store order is no longer id order
    by_shard = ShardedIndex(IndexStore.open(tmp_path / "ix"), local_shards(tmp_path / "ix"))
    for k in (5, 9, 23):
        D1, I1 = whole.search(base, k)
        D2, I2 = by_shard.search(base, k)
        assert (I1 == I2).all() and np.allclose(D1, D2)
