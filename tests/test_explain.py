"""The match view on real photos: two views of one object share geometrically consistent local
features; two unrelated photos do not."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from convlad.explain import draw_matches, match_images

from .servers import cli, groups_of_dev

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model(train_images):
    from convlad.pipeline import ConvVLAD

    return ConvVLAD(layers=["block6"], pooled=[], scales=[2], k=16, dim=None).fit(train_images[::40], progress=False)


def test_two_views_of_one_object_give_more_inliers_than_unrelated_photos(model, tmp_path):
    groups = list(groups_of_dev().values())[:8]
    same, other = [], []
    for g, files in enumerate(groups):
        same.append(match_images(model, files[0], files[1]).n_inliers)
        other.append(match_images(model, files[0], groups[(g + 3) % len(groups)][1]).n_inliers)
    # per pair of one query: its other view beats an unrelated photo, for most queries and on average
    assert sum(s > o for s, o in zip(same, other)) >= 6, (same, other)
    assert np.mean(same) > 2 * np.mean(other), (same, other)
    m = match_images(model, groups[0][0], groups[0][1])
    assert m.inliers.dtype == bool and len(m.inliers) == len(m.pairs) and m.homography.shape == (3, 3)
    d = m.to_dict()
    assert d["inliers"] == m.n_inliers and all(0 <= p["query"][0] <= d["query_size"][0] for p in d["pairs"])
    png = draw_matches(m, groups[0][0], groups[0][1], tmp_path / "m.png")
    assert (tmp_path / "m.png").is_file() and png.height == 360 + 28


def test_explain_command_writes_a_match_png(tmp_path, train_images):
    from .servers import build_index

    index, groups = build_index(tmp_path, train_images, n_groups=2)
    files = next(iter(groups.values()))
    p = cli("explain", index, files[0], files[1], "--out", tmp_path / "match.png")
    assert "geometric inliers" in p.stdout and Image.open(tmp_path / "match.png").format == "PNG"
    d = json.loads(cli("explain", index, files[0], "0", "--json").stdout)
    assert d["matches"] == len(d["pairs"])
