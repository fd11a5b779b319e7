"""Spatial verification: local codes kept per image, inliers on real photos, re-ranking through the
store and the CLI, and the bootstrap that decides defaults."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convlad.study.metrics import bootstrap_difference
from convlad.search import Settings, plain_distances, search_images
from convlad.index.sync import sync
from convlad.verify import MIN_CHANCE, LocalCodes, Verifier, chance_level, select, tentative_matches

from .servers import cli, groups_of_dev


def test_select_keeps_the_strongest_positions_and_codes_read_back_close():
    g = torch.Generator().manual_seed(0)
    desc = torch.nn.functional.normalize(torch.randn(2, 50, 8, generator=g), dim=-1)
    norms = torch.rand(2, 50, generator=g)
    codes = select(desc, norms, (5, 10), k=10)
    assert codes.codes.shape == (2, 10, 8) and codes.codes.dtype == np.int8 and list(codes.count) == [10, 10]
    for i in range(2):
        top = torch.topk(norms[i], 10).indices.numpy()
        d, xy = codes.features(i)
        assert sorted((xy[:, 1] - 0.5) * 10 + xy[:, 0] - 0.5) == sorted(top.tolist())
        cos = (d * desc[i, top].numpy()).sum(1)
        assert cos.min() > 0.999, cos  # int8, scaled by the largest component
    wide = select(desc, norms, (5, 10), k=60)  # fewer positions than slots: the rest stay empty
    assert list(wide.count) == [50, 50] and not wide.codes[:, 50:].any()
    assert LocalCodes.concat([codes, codes[[1]]]).count.tolist() == [10, 10, 10]
    assert codes.bytes_per_image == 10 * 8 + 10 * 2 + 2


def test_bootstrap_interval_excludes_zero_only_for_a_real_gain():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, 200)
    mean, lo, hi = bootstrap_difference(a, np.clip(a + 0.05 + rng.normal(0, 0.05, 200), 0, 1))
    assert lo > 0 and lo < mean < hi
    mean, lo, hi = bootstrap_difference(a, np.clip(a + rng.normal(0, 0.1, 200), 0, 1))
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="not the same queries"):
        bootstrap_difference(a, a[:10])


def test_compare_command_reports_the_interval_and_rejects_bad_files(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 1, 150)
    for name, aps, bench in (("a", a, "b1"), ("b", np.clip(a + 0.1, 0, 1), "b1"), ("c", a, "other")):
        (tmp_path / f"{name}.json").write_text(json.dumps({"benchmark": bench, "descriptor": name,
                                                           "aps": [float(x) for x in aps]}))
    out = cli("compare", tmp_path / "a.json", tmp_path / "b.json").stdout
    assert "(significant)" in out and "gain +0.0" in out
    (tmp_path / "bad.json").write_text("{")
    for bad in ("bad.json", "c.json"):
        p = subprocess.run([sys.executable, "-m", "convlad", "compare", str(tmp_path / "a.json"), str(tmp_path / bad)],
                           capture_output=True, text=True)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and bad in p.stderr, p.stderr


@pytest.fixture(scope="module")
def model(train_images):
    from convlad.pipeline import ConvVLAD

    return ConvVLAD(layers=["block6"], pooled=[], scales=[2], k=16, dim=None).fit(train_images[::40], progress=False)


@pytest.mark.e2e
def test_other_views_verify_and_unrelated_photos_stay_at_chance(model):
    groups = list(groups_of_dev().values())[:8]
    paths = [str(f) for files in groups for f in files[:2]]
    ok, X, errors = enc = model.transform(paths, progress=False, local=300)
    L = enc.local
    assert not errors and L.codes.shape == (16, 300, 80)
    v = model.verifier()
    assert v.chance == model.chance_
    same = [int(v.inliers(L.features(2 * g), L[[2 * g + 1]])[0]) for g in range(8)]
    other = [int(v.inliers(L.features(2 * g), L[[(2 * g + 7) % 16]])[0]) for g in range(8)]
    # an unrelated photo stays at or under the chance level measured on the training photos
    assert sum(o <= v.chance for o in other) >= 7, (other, v.chance)
    assert sum(s > o for s, o in zip(same, other)) >= 6 and np.mean(same) > 2 * max(1, np.mean(other)), (same, other)
    # re-ranking each query's candidates (every other photo) puts its other view first at least as
    # often as the global descriptor alone
    first_before = first_after = 0
    for g in range(8):
        q, cand = 2 * g, np.array([j for j in range(16) if j != 2 * g])
        d = ((X[cand] - X[q]) ** 2).sum(1)
        order = cand[np.argsort(d)]
        first_before += order[0] == 2 * g + 1
        ids, inl = v.rerank(L.features(q), order, np.sort(d), L[order])
        first_after += ids[0] == 2 * g + 1
        assert sorted(ids.tolist()) == sorted(order.tolist()) and len(inl) == 15
    assert first_after >= first_before and first_after >= 6, (first_before, first_after)


@pytest.mark.e2e
def test_chance_level_is_what_unrelated_photos_reach(model, train_images):
    from convlad.pipeline import ConvVLAD

    # measured at fit on the training photos (one per ImageNet class, so unrelated), and kept
    L = model.transform(train_images[1::25], progress=False, local=300).local
    assert 3 <= model.chance_ <= 16 and chance_level(L) <= 16
    back = ConvVLAD.from_state(*model.state())
    assert back.chance_ == model.chance_ == back.verifier().chance
    meta, arrays = model.state()
    del meta["chance"]  # a model saved before it was measured gets Lite0's level
    assert ConvVLAD.from_state(meta, arrays).chance_ == Verifier.chance
    # where the photos are related (eight views of one tree) the same measure comes out far higher
    tree = [str(f) for f in groups_of_dev()["monstree"]]
    T = model.transform(tree, progress=False, local=300).local
    assert chance_level(T) > 2 * max(chance_level(L), model.chance_), (chance_level(T), chance_level(L))
    # ... for the verifier's matching: one that takes no tentative match gets the floor
    assert chance_level(T, verifier=Verifier(min_similarity=1.01)) == MIN_CHANCE


def test_a_photo_paired_with_a_sure_match_ranks_as_if_it_verified_sure(model):
    """The search completes a verified shortlist through the index's verified pairs: a photo that
    the index pairs with one of the query's sure matches, directly or through a chain of linked
    photos, scores at least the sure level's bonus, says through which (``Hit.via``), and nothing
    else moves; a pair with a match that is not sure, or with an excluded photo, lifts nothing."""
    from convlad.search import MemoryIndex, rank

    groups = list(groups_of_dev().values())[:6]
    paths = [str(f) for files in groups for f in files[:3]]
    enc = model.transform(paths, progress=False, local=300)
    X, L, v = enc.X, enc.local, model.verifier()
    n = len(paths)
    inl = np.array([v.inliers(L.features(i), L) for i in range(n)])
    sure = [(q, s) for q in range(n) for s in range(n) if s != q and inl[q, s] >= v.sure]
    assert sure, (v.sure, inl.max())
    q, s = sure[0]
    # the weakest photo of another group: verified far below the sure level with the query
    weak = min((j for j in range(n) if j // 3 != q // 3), key=lambda j: (inl[q, j], -X[q] @ X[j]))
    cold = [j for j in range(n) if j not in (q, s) and inl[q, j] < v.sure and j != weak][0]
    assert inl[q, weak] < v.sure and inl[q, cold] < v.sure

    def ranked(pairs, exclude=(q,), v=v):
        index = MemoryIndex(X, L, v, np.array(pairs, np.int64).reshape(-1, 2) if pairs else None)
        return rank(index, X[[q]], [L.features(q)], Settings(k=n, rerank=n), exclude=[list(exclude)])[0]

    alone = ranked(None)
    through = ranked([(min(s, weak), max(s, weak))])
    hit = next(h for h in through if h.id == weak)
    assert hit.via == s and hit.inliers == inl[q, weak]
    # its score is what verifying at the sure level would give; the others keep theirs and their order
    d = plain_distances(X[[h.id for h in through]], X[q])
    want = v.scores(d, np.array([v.sure if h.id == weak else h.inliers for h in through]))
    assert all(a >= b for a, b in zip(want, want[1:])), want
    assert [h.id for h in through if h.id != weak] == [h.id for h in alone if h.id != weak]
    assert [h.id for h in through].index(weak) < [h.id for h in alone].index(weak)
    assert all(h.via is None for h in alone) and all(h.via is None for h in through if h.id != weak)
    # a link through a match that is not sure, or one the query may not see, lifts nothing; nor
    # does any link with ``link=False``
    from dataclasses import replace

    off = ranked([(min(s, weak), max(s, weak))], v=replace(v, link=False))
    assert [h.id for h in off] == [h.id for h in alone] and all(h.via is None for h in off)
    for pairs, exclude in (([(min(cold, weak), max(cold, weak))], (q,)), ([(min(s, weak), max(s, weak))], (q, s))):
        got = ranked(pairs, exclude)
        assert [h.id for h in got] == [h.id for h in alone if h.id not in exclude] and all(h.via is None for h in got)
    # a chain: cold, paired only with weak, is linked through it, and both score at the sure level;
    # a chain does not pass through a photo the query may not see
    chain = ranked([(min(s, weak), max(s, weak)), (min(cold, weak), max(cold, weak))])
    by = {h.id: h for h in chain}
    assert by[weak].via == s and by[cold].via == weak and by[cold].inliers == inl[q, cold]
    d = plain_distances(X[[h.id for h in chain]], X[q])
    want = v.scores(d, np.array([v.sure if h.id in (weak, cold) else h.inliers for h in chain]))
    assert all(a >= b for a, b in zip(want, want[1:])), want
    cut = ranked([(min(s, weak), max(s, weak)), (min(cold, weak), max(cold, weak))], exclude=(q, weak))
    assert [h.id for h in cut] == [h.id for h in alone if h.id != weak] and all(h.via is None for h in cut)


@pytest.mark.e2e
def test_store_keeps_local_features_through_compaction_and_reranks(model, tmp_path):
    from convlad.index.store import IndexStore

    groups = list(groups_of_dev().values())[:4]
    photos = tmp_path / "photos"
    photos.mkdir()
    for files in groups:
        for f in files[1:]:
            (photos / f.name).symlink_to(f)
    with IndexStore.create(tmp_path / "a.index", model=model, root=photos) as st:
        assert st.local_k == 300
        sync(st, progress=False, commit_every=3, report=lambda *_: None)
        ids = np.array([i for i, _, _ in st.items()])
        before, have = st.local_codes(ids)
        assert have.all() and before.codes.shape[1:] == (300, 80)
        assert len(st.segments()) > 1 and all("local-codes" in s["arrays"] for s in st.segments())
        st.remove(ids[:1])
        st.compact()
        assert len(st.segments()) == 1
        after, have = st.local_codes(ids)
        assert not have[0] and have[1:].all()
        np.testing.assert_array_equal(after.codes[1:], before.codes[1:])
        np.testing.assert_array_equal(after.cells[1:], before.cells[1:])
    from convlad.storage import FileFormatError

    with pytest.raises(FileFormatError, match="keep 300 local features each, not 100"):
        IndexStore.create(tmp_path / "a.index", model=model, root=photos, local=100)
    queries = [str(files[0]) for files in groups]
    with IndexStore.open(tmp_path / "a.index") as st:
        plain, _ = search_images(st, queries, Settings(k=5, rerank=0))
        rr, _ = search_images(st, queries, Settings(k=5, rerank=20))
        enc = model.transform(queries, progress=False, local=300)
        v = model.verifier()
        for qi, (_, hits) in enumerate(rr):
            # each result carries the inliers that the verifier finds for it against the stored
            # features, and the list is in the verifier's score order
            codes, have = st.local_codes([h.id for h in hits])
            assert have.all() and [h.inliers for h in hits] == v.inliers(enc.local.features(qi), codes).tolist()
            # ... which adds to the plain similarity (the index augments: its distances are the augmented rows')
            assert st.augmented
            d = plain_distances(st.vectors([h.id for h in hits]), enc.X[qi])
            # (one that the index pairs with a sure match scores as if it verified at the sure level)
            scores = v.scores(d, np.array([h.inliers if h.via is None else max(h.inliers, v.sure) for h in hits]))
            assert all(a >= b for a, b in zip(scores, scores[1:])), scores
    assert all(h.inliers is None for _, hits in plain for h in hits)
    # other views of the query's object come first after verification at least as often as before
    group_of = {f.name: g for g, files in enumerate(groups) for f in files}

    def firsts(res):
        return sum(group_of.get(Path(st.path_of(hits[0].id)).name) == group_of[Path(q).name] for q, hits in res)

    with IndexStore.open(tmp_path / "a.index") as st:
        assert firsts(rr) >= firsts(plain) and firsts(rr) >= 3, (firsts(plain), firsts(rr))
    # a store made without local features re-ranks nothing: the order stays the global one
    with IndexStore.create(tmp_path / "b.index", model=model, root=photos, local=0) as st:
        sync(st, progress=False, report=lambda *_: None)
        assert "local-codes" not in st.segments()[0]["arrays"]
        plain, _ = search_images(st, queries, Settings(k=5, rerank=0))
        same, _ = search_images(st, queries, Settings(k=5, rerank=20))
    assert [[h.id for h in hits] for _, hits in same] == [[h.id for h in hits] for _, hits in plain]
    assert all(h.inliers is None for _, hits in same for h in hits)


@pytest.mark.e2e
def test_search_rerank_on_the_command_line(tmp_path, train_images):
    from .servers import build_index

    index, groups = build_index(tmp_path, train_images, n_groups=3)
    q = next(iter(groups.values()))[0]
    res = json.loads(cli("search", index, q, "-k", "4", "--rerank", "10", "--json").stdout)[0]["results"]
    assert [r["rank"] for r in res] == [1, 2, 3, 4] and all(isinstance(r["inliers"], int) for r in res)
    assert "inliers" in cli("search", index, q, "-k", "2", "--rerank", "10").stdout
    p = subprocess.run([sys.executable, "-m", "convlad", "search", str(index), str(q), "--rerank", "-1"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--rerank" in p.stderr
    # by default the command re-ranks an index that keeps local features, and not one that keeps none,
    # where asking for it says why in one line
    assert "inliers" in json.loads(cli("search", index, q, "-k", "2", "--json").stdout)[0]["results"][0]
    bare = tmp_path / "bare.index"
    cli("index", tmp_path / "model.npz", tmp_path / "photos", "--out", bare, "--local-features", "0")
    assert json.loads(cli("search", bare, q, "-k", "2", "--json").stdout)[0]["results"][0]["inliers"] is None
    p = subprocess.run([sys.executable, "-m", "convlad", "search", str(bare), str(q), "-k", "2", "--rerank", "10", "--json"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "keeps no local features" in p.stderr and "Traceback" not in p.stderr
    assert [r["path"] for r in json.loads(p.stdout)[0]["results"]] == \
        [r["path"] for r in json.loads(cli("search", bare, q, "-k", "2", "--json", "--rerank", "0").stdout)[0]["results"]]


def test_a_shortlist_matches_as_each_pair_alone_does():
    # the shortlist is matched in one product laid out (query feature, pair, candidate feature):
    # each pair's mutual nearest neighbours and similarities must be those of that pair on its own
    rng = np.random.default_rng(0)
    codes = np.round(rng.normal(size=(7, 60, 16)) * 40).clip(-127, 127).astype(np.int8)
    count = np.array([60, 60, 45, 60, 30, 60, 60], np.uint16)
    codes[np.arange(60)[None, :] >= count[:, None]] = 0  # unused slots are zero
    cells = rng.integers(0, 28, size=(7, 60, 2)).astype(np.uint8)
    L = LocalCodes(codes, cells, count)
    query = L.features(0)
    fwd, ok, best = Verifier(min_similarity=0.3).tentative(query, L[np.arange(1, 7)])
    for j in range(6):
        S = query[0] @ L.features(j + 1)[0].T
        rows, cols = tentative_matches(S, 0.3)
        assert np.flatnonzero(ok[j]).tolist() == rows.tolist() and fwd[j, rows].tolist() == cols.tolist()
        assert np.allclose(best[j, rows], S[rows, cols], atol=1e-6)
    assert ok.sum() > 30  # there is something to compare


def test_a_feature_is_matched_once_even_where_features_tie(model, train_images):
    # a uniform region's int8 features tie exactly; each candidate feature must still take one
    # query feature, or one plain border matches a single cell many times over (as binoculars
    # and a chest once did, with 21 "inliers" from a map squashed flat)
    L = model.transform(train_images[2:4], progress=False, local=300).local
    dq, xq = L.features(0)
    dq, xq = dq.copy(), xq.copy()
    dq[:40] = dq[0]  # forty query features identical to the first
    v = model.verifier()
    fwd, ok, _ = v.tentative((dq, xq), L[[1]])
    matched = fwd[0][ok[0]]
    assert len(matched) == len(set(matched.tolist()))
    twin = v.tentative((dq, xq), L[[0]])  # against its own photo: the first of the tied ones matches
    assert twin[1][0][:40].sum() <= 1 and twin[1][0][40:].sum() >= 200
