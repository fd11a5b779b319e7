"""One search behind every door: the same photo through the command line, the HTTP API and the
library, with default settings, gets the same ids in the same order with the same inliers, on an
index of all of mvbench-dev; and mAP through the index is eval's."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from convlad.search import DEFAULTS, Settings, rank, search_ids, search_images
from convlad.index.store import IndexStore

from .conftest import MVBENCH_DEV, need
from .servers import Server, cli

pytestmark = pytest.mark.e2e


QUERIES = ["images/bundler_kermit_00.jpg", "images/box_in_scene_01.jpg"]


def _doors(index: Path, query: Path):
    """(CLI, API, library) results for one photo, each as [(id, inliers)], and the library's hits."""
    by_cli = json.loads(cli("search", index, query, "--json").stdout)[0]["results"]
    server = Server(index)
    try:
        with open(query, "rb") as f:
            r = httpx.post(f"{server.url}/api/search", files={"image": (query.name, f, "image/jpeg")}, timeout=60)
        assert r.status_code == 200, r.text
        by_api = r.json()["results"]
        config = httpx.get(f"{server.url}/api/config").json()
    finally:
        server.stop()
    st = IndexStore.open(index)
    (_, hits), = search_images(st, [query])[0]
    return ([(h["id"], h["inliers"]) for h in by_cli], [(h["id"], h["inliers"]) for h in by_api],
            [(h.id, h.inliers) for h in hits], by_cli, by_api, hits, config, st)


@pytest.mark.parametrize("name", ["default.index", "local120.index"])
def test_the_same_photo_ranks_alike_through_every_door(dev_index, name):
    index = dev_index / name
    for rel in QUERIES:
        query = need(MVBENCH_DEV) / rel
        c, a, lib, by_cli, by_api, hits, config, st = _doors(index, query)
        assert c == a == lib, (c, a, lib)
        assert len(c) == DEFAULTS.k == config["k"] and config["rerank"] == 100
        assert all(isinstance(n, int) for _, n in c)  # the defaults re-rank, everywhere
        assert st.local_k == (300 if name == "default.index" else 120) == config["local_features"]
        assert [h["distance"] for h in by_cli] == pytest.approx([h["distance"] for h in by_api], abs=1e-5)
        assert Path(by_cli[0]["path"]).name == query.name  # the photo itself is in the index
        assert by_api[0]["path"] == rel  # the service shows paths relative to the indexed folder


def _pairs_as_rows(st, row_of: dict) -> np.ndarray:
    """The index's verified pairs as rows of eval's arrays, sorted by id, the order in which the
    index sums a photo's partners (so the floats are the same)."""
    return np.vectorize(row_of.get)(st.pairs())


def test_map_through_the_index_is_evals(dev_index):
    """Ranking every mvbench-dev query by its id through the store is ``eval``'s ranking of the same
    descriptors: one search, the same APs, re-ranked or not."""
    from convlad.study.datasets import load_groups
    from convlad.study.evaluate import evaluate_descriptors, evaluate_ranking

    st = IndexStore.open(dev_index / "default.index")
    bench = load_groups(need(MVBENCH_DEV))
    id_of = {p: i for i, p, _ in st.items()}  # paths relative to the indexed folder, as dev's own
    ids = np.array([id_of[str(Path(p).relative_to(need(MVBENCH_DEV)))] for p in bench.paths])
    row_of = {int(i): r for r, i in enumerate(ids)}
    local, have = st.local_codes(ids)
    assert have.all()
    # the index augments: eval is given its pairs, as rows, each with its ends in the index's order
    # (a photo's partners are summed in that order, so the floats are the same)
    assert st.augmented and st.info()["pairs"] > 0
    pairs = _pairs_as_rows(st, row_of)
    res = evaluate_descriptors(bench, st.vectors(ids), rerank=100, local=local, verifier=st.model.verifier(),
                               pairs=pairs)
    for settings, want in ((Settings(k=len(st)), res.mAP), (Settings(k=len(st), rerank=0), res.extra["mAP_without_rerank"])):
        hits = search_ids(st, ids[bench.query_db], settings)
        ranking = np.array([[bench.query_db[q]] + [row_of[h.id] for h in row] for q, row in enumerate(hits)])
        assert evaluate_ranking(bench, ranking).mAP == pytest.approx(want, abs=1e-9)
    # and verification helps, even this small model: over the plain rows' global ranking by more
    # than 0.01, and not less than the augmented one (which uses the same verified matches)
    plain = evaluate_descriptors(bench, st.vectors(ids)).mAP
    assert res.mAP >= res.extra["mAP_without_rerank"] and res.mAP > plain + 0.01, (res.mAP, plain)
    # one query through `rank` with its stored features is the same as through `search_ids`
    q = int(ids[bench.query_db[0]])
    codes, _ = st.local_codes([q])
    assert rank(st, st.vectors([q]), [codes.features(0)], exclude=[[q]])[0] == search_ids(st, [q])[0]
    # the index's pairs, as the search reads them to complete a verified shortlist, are eval's
    P = st.partners(ids)
    want = {(int(ids[a]), int(ids[b])) for a, b in pairs} | {(int(ids[b]), int(ids[a])) for a, b in pairs}
    assert len(P) == 2 * len(pairs) and {(int(a), int(b)) for a, b in P} == want
    at = {int(i): k for k, i in enumerate(ids)}
    assert [at[int(a)] for a in P[:, 0]] == sorted(at[int(a)] for a in P[:, 0])  # in the order of the ids asked
    one = int(P[0, 0])
    assert {int(b) for b in st.partners([one])[:, 1]} == {b for a, b in want if a == one}
    assert len(st.partners([10**9])) == 0  # an id the index does not hold has none


def test_the_grid_of_eval_folds_ranks_as_the_one_search(dev_index):
    """``eval --folds`` scores its candidates without a call to ``rank`` per candidate: evidence once
    per geometry, a higher gate and a shorter shortlist applied afterwards. Each candidate's APs
    must still be those of ``rank`` with that verifier."""
    from dataclasses import replace

    from convlad.study.datasets import load_groups
    from convlad.study.evaluate import evaluate_descriptors
    from convlad.study.folds import SearchGrid, _truncate

    st = IndexStore.open(dev_index / "default.index")
    bench = load_groups(need(MVBENCH_DEV))
    id_of = {p: i for i, p, _ in st.items()}
    ids = np.array([id_of[str(Path(p).relative_to(need(MVBENCH_DEV)))] for p in bench.paths])
    X, (local, _) = st.vectors(ids), st.local_codes(ids)
    v = st.model.verifier()
    pairs = _pairs_as_rows(st, {int(i): r for r, i in enumerate(ids)})
    q = slice(0, 191, 3)  # a third of the queries: the same code path, a third of the time
    bench = replace(bench, query_items=bench.query_items[q], positives=bench.positives[q], junk=bench.junk[q],
                    query_db=bench.query_db[q], groups=bench.groups[q])
    grid = SearchGrid(bench, X, local=local, verifier=v, pairs=pairs)
    candidates = [{}, {"min_tentative": 4}, {"min_tentative": 12, "per": 5.0}, {"rerank": 40, "chance": 5},
                  {"features": 150}, {"score": "significance", "level": 2.0, "min_tentative": 6},
                  {"min_similarity": 0.7, "cap": 1.0}, {"link": False}]
    grid.prepare(candidates)
    for c in candidates:
        c = dict(c)
        depth, features = c.pop("rerank", 100), c.pop("features", 300)
        want = evaluate_descriptors(bench, X, rerank=depth, local=_truncate(local, features),
                                    verifier=replace(v, **c), pairs=pairs).aps
        np.testing.assert_array_equal(grid.aps({"rerank": depth, "features": features, **c}), want)
    assert not np.array_equal(grid.aps({}), grid.aps({"rerank": 0}))
    # an augmented database (``augment=verified``): searched by its augmented rows, verified by the
    # plain similarity, each query with its own descriptor, as ``rank`` does
    pairs = np.array([[i, i + 1] for i in range(0, len(X) - 1, 7)])
    aug = SearchGrid(bench, X, local=local, verifier=v, pairs=pairs)
    aug.prepare([{}])
    for depth in (100, 0):
        want = evaluate_descriptors(bench, X, rerank=depth, local=local, verifier=v, pairs=pairs)
        np.testing.assert_array_equal(aug.aps({"rerank": depth}), want.aps)
    assert not np.array_equal(aug.aps({"rerank": 0}), grid.aps({"rerank": 0}))
