"""The match view on real photos is the verification that ranked the result: two views of one
object share geometrically consistent local features, unrelated photos do not, and the count
drawn is the count the ranking used."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from convlad.explain import draw_matches, match_view, oriented_size

from .servers import cli, groups_of_dev

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model(train_images):
    from convlad.pipeline import ConvVLAD

    return ConvVLAD(layers=["block6"], pooled=[], scales=[2], k=16, dim=None).fit(train_images[::40], progress=False)


def test_two_views_of_one_object_give_more_inliers_than_unrelated_photos(model, tmp_path):
    groups = list(groups_of_dev().values())[:8]
    paths = [str(files[i]) for files in groups for i in (0, 1)]
    L = model.transform(paths, progress=False, local=300).local
    assert L.grid == (28, 28)  # block6 at 448: where the cells lie
    v = model.verifier()
    same, other = [], []
    for g in range(8):
        q, mate, stranger = 2 * g, 2 * g + 1, (2 * g + 7) % 16
        for j, out in ((mate, same), (stranger, other)):
            m = match_view(model, L[[q]], oriented_size(paths[q]), L[[j]], oriented_size(paths[j]))
            # the very count the ranking uses for this pair
            assert m.n_inliers == v.inliers(L.features(q), L[[j]])[0]
            out.append(m.n_inliers)
    # per pair of one query: its other view beats an unrelated photo, for most queries and on average
    assert sum(s > o for s, o in zip(same, other)) >= 6, (same, other)
    assert np.mean(same) > 2 * max(1, np.mean(other)), (same, other)
    m = match_view(model, L[[0]], oriented_size(paths[0]), L[[1]], oriented_size(paths[1]))
    d = m.to_dict()
    assert d["inliers"] == m.n_inliers > v.chance and d["matches"] == len(d["pairs"]) >= d["inliers"] and m.fitted
    w, h = oriented_size(paths[0])
    assert all(0 <= p["query"][0] <= w and 0 <= p["query"][1] <= h for p in d["pairs"])
    # an inlier's cells are where the affine map sends them: the query and result points agree
    q = np.array([p["query"] for p in d["pairs"] if p["inlier"]])
    r = np.array([p["result"] for p in d["pairs"] if p["inlier"]])
    A, *_ = np.linalg.lstsq(np.c_[q, np.ones(len(q))], r, rcond=None)
    cell = max(oriented_size(paths[1])) / 28
    assert np.median(np.abs(np.c_[q, np.ones(len(q))] @ A - r)) < 2 * cell
    png = draw_matches(m, paths[0], paths[1], tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").size == png.size and png.height == 360 + 34


def test_explain_reports_the_inliers_search_showed(tmp_path, train_images):
    from .servers import build_index

    index, groups = build_index(tmp_path, train_images, n_groups=3)
    query = next(iter(groups.values()))[0]
    hits = json.loads(cli("search", index, query, "-k", "5", "--json").stdout)[0]["results"]
    assert all(isinstance(h["inliers"], int) for h in hits)
    for h in hits[:3]:
        by_rank = json.loads(cli("explain", index, query, "--rank", h["rank"], "--json").stdout)
        assert (by_rank["id"], by_rank["rank"]) == (h["id"], h["rank"])
        assert by_rank["inliers"] == by_rank["ranked_inliers"] == h["inliers"], (by_rank["inliers"], h)
        by_id = json.loads(cli("explain", index, query, "--id", h["id"], "--json").stdout)
        assert by_id["inliers"] == h["inliers"] and "rank" not in by_id
    p = cli("explain", index, query, "--rank", 1, "--out", tmp_path / "match.png")
    assert f"{hits[0]['inliers']} inliers" in p.stdout and Image.open(tmp_path / "match.png").format == "PNG"
    import subprocess
    import sys

    for args in ([], ["--rank", "1", "--id", "0"], ["--rank", "0"], ["--id", "99999"]):
        r = subprocess.run([sys.executable, "-m", "convlad", "explain", str(index), str(query), *args],
                           capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
