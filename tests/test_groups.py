"""Which photos show the same thing (`convlad groups`): the groups of an index of all of mvbench-dev
through the library, the command line and the API are one; they agree with the benchmark's own
groups; a photo added joins its group (a re-encoded copy as a duplicate) and deleting a
representative leaves what the remaining pairs join."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from convlad.groups import components, groups
from convlad.index.store import IndexStore
from convlad.study.metrics import grouping_scores

from .conftest import MVBENCH_DEV
from .servers import Server, cli

pytestmark = pytest.mark.e2e


def test_grouping_scores_count_pairs_and_items():
    """Pairwise and B-cubed scores on a grouping worked by hand."""
    truth = ["a", "a", "a", "b", "b", "x"]
    found = [1, 1, 2, 2, 2, 3]  # one a split off and joined to the b's
    s = grouping_scores(found, truth)
    # found pairs: (0,1) right; (2,3), (2,4) wrong, (3,4) right → 2 of 4; true pairs 3 + 1 = 4, 2 found
    assert s["pairwise_precision"] == pytest.approx(0.5) and s["pairwise_recall"] == pytest.approx(0.5)
    assert s["bcubed_precision"] == pytest.approx((1 + 1 + 1 / 3 + 2 / 3 + 2 / 3 + 1) / 6)
    assert s["bcubed_recall"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 + 1 + 1) / 6)
    assert grouping_scores(truth, truth)["pairwise_f1"] == 1.0 == grouping_scores(truth, truth)["bcubed_f1"]


def _truth(st) -> dict[int, str]:
    groups_json = json.loads((MVBENCH_DEV / "groups.json").read_text())
    of = {f: g for g, files in groups_json.items() for f in files}
    return {i: of.get(p.rsplit("/", 1)[-1], f"alone {i}") for i, p, _ in st.items()}


def test_groups_agree_with_the_benchmark_and_every_door_gives_the_same(dev_index):
    index = dev_index / "default.index"
    st = IndexStore.open(index)
    found = groups(st)
    assert found and all(g["size"] >= 2 for g in found) and [g["size"] for g in found] == sorted(
        (g["size"] for g in found), reverse=True)
    # the components of the store's pairs, each once; the representative first, every other member
    # joined through a photo before it by a verified pair
    pairs = {tuple(p) for p in st.pairs().tolist()}
    assert sorted(sorted(m["id"] for m in g["members"]) for g in found) == sorted(
        c.tolist() for c in components(np.unique(st.pairs()), st.pairs()))
    for g in found:
        seen = {g["representative"]}
        assert g["members"][0]["id"] == g["id"] == g["representative"] and g["members"][0]["via"] is None
        for m in g["members"][1:]:
            assert m["via"] in seen and tuple(sorted((m["id"], m["via"]))) in pairs
            assert m["inliers"] >= st.model.verifier().sure and 0 < m["similarity"] <= 1
            seen.add(m["id"])
    # against mvbench-dev's groups (a distractor alone), with this small model (32-D, scale 1, sure
    # at 9 inliers): most of them (the default model's figures are test_eval's, through `eval`)
    truth = _truth(st)
    label = {m["id"]: g["id"] for g in found for m in g["members"]}
    s = grouping_scores([label.get(i, f"alone {i}") for i in truth], list(truth.values()))
    assert s["bcubed_precision"] >= 0.9 and s["bcubed_f1"] >= 0.8 and s["pairwise_f1"] >= 0.7, s
    # the command line and the API give the same groups
    by_cli = json.loads(cli("groups", index, "--json").stdout)
    assert by_cli["groups"] == json.loads(json.dumps(found)) and by_cli["total_groups"] == len(found)
    server = Server(index)
    try:
        page = httpx.get(f"{server.url}/api/groups?limit=100", timeout=120).json()
        one = httpx.get(f"{server.url}/api/groups/{found[0]['id']}", timeout=60).json()
        missing = httpx.get(f"{server.url}/api/groups/{found[0]['members'][1]['id']}", timeout=60)
        bad = httpx.get(f"{server.url}/api/groups/abc", timeout=60)
    finally:
        server.stop()
    assert page["total"] == len(found)
    assert [[(m["id"], m["via"], m["inliers"]) for m in g["members"]] for g in page["groups"]] == \
        [[(m["id"], m["via"], m["inliers"]) for m in g["members"]] for g in found[:100]]
    assert one["id"] == found[0]["id"] and one["members"][0]["thumbnail"] == f"/api/images/{one['id']}/thumbnail"
    assert missing.status_code == 404 and "representative" in missing.json()["error"] and bad.status_code == 400


def test_the_table_and_the_csv(dev_index, tmp_path):
    index = dev_index / "default.index"
    out, png = tmp_path / "groups.csv", tmp_path / "groups.png"
    p = cli("groups", index, "--limit", "2", "--csv", out, "--sheet", png)
    assert "groups of 2 or more photos" in p.stdout and p.stdout.count("(representative") == 2
    cols = min(8, max(len(g["members"]) for g in json.loads(cli("groups", index, "--json", "--limit", "2").stdout)["groups"]))
    with Image.open(png) as sheet:  # two rows of up to 8 thumbnails, photos drawn (not blank)
        assert sheet.size == (max(320, 10 + cols * 160), 10 + 2 * 214) and len(sheet.convert("L").getcolors(1 << 16)) > 100
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    found = groups(IndexStore.open(index))
    assert len(rows) == sum(g["size"] for g in found) and {int(r["group"]) for r in rows} == {g["id"] for g in found}
    assert sum(int(r["representative"]) for r in rows) == len(found)


def test_a_photo_added_joins_its_group_and_a_deleted_representative_leaves_what_the_pairs_join(dev_index, tmp_path):
    index = tmp_path / "copy.index"
    shutil.copytree(dev_index / "default.index", index, symlinks=True)
    st = IndexStore.open(index)
    big = groups(st)[0]
    rep = big["representative"]
    # a copy of one of its photos, re-encoded at another quality, its orientation in the pixels
    # rather than in its metadata: joins the group (this model's 7×7 map is too coarse to mark
    # duplicates: test_duplicates_are_marked_on_a_fine_map)
    src = next(m for m in big["members"] if m["id"] != rep)
    copy = tmp_path / "copy.jpg"
    with Image.open(src["path"]) as im:
        ImageOps.exif_transpose(im).convert("RGB").save(copy, quality=60)
    with IndexStore.open(index, write=True) as w:
        (new,), errors = w.add([str(copy)])
        assert not errors
    st.refresh()
    (joined,) = [g for g in groups(st) if rep in {m["id"] for m in g["members"]}]
    after = {m["id"]: m for m in joined["members"]}
    assert new in after and not any(m["duplicate_of"] for m in joined["members"]), after.get(new)
    # the representative deleted: the rest is whole or split exactly as the remaining pairs join it
    with IndexStore.open(index, write=True) as w:
        assert w.remove([rep]) == 1
    st.refresh()
    left = set(after) - {rep}
    now = [sorted(m["id"] for m in g["members"]) for g in groups(st) if left & {m["id"] for m in g["members"]}]
    P = st.pairs()
    want = [c.tolist() for c in components(np.unique(P), P) if left & set(c.tolist())]
    assert sorted(now) == sorted(want) and set().union(*map(set, now)) == left - {
        i for i in left if not (P == i).any()}


def test_duplicates_are_marked_on_a_fine_map(tmp_path, train_images):
    """A model whose verification layer has a 28×28 map (block4 at scale 1, as fine as the default's
    block6 at scale 2): a photo re-encoded and a photo halved are marked duplicates of the photos
    they copy, and no other view of the same places is; `--duplicates` lists them alone."""
    from .servers import groups_of_dev

    (tmp_path / "train").mkdir()
    for p in train_images[::24]:
        (tmp_path / "train" / Path(p).name).symlink_to(p)
    cli("train", "--images", tmp_path / "train", "--out", tmp_path / "model.npz", "--layer", "block4", "--pooled",
        "none", "--scales", "1", "--k", "16", "--dim", "32")
    photos = tmp_path / "photos"
    photos.mkdir()
    chosen = list(groups_of_dev().items())[:3]
    for _, files in chosen:
        for f in files:
            (photos / f.name).symlink_to(f)
    a, b = chosen[0][1][0], chosen[1][1][0]
    with Image.open(a) as im:
        ImageOps.exif_transpose(im).convert("RGB").save(photos / "copy_q50.jpg", quality=50)
    with Image.open(b) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        im.resize((im.width // 2, im.height // 2), Image.LANCZOS).save(photos / "copy_half.jpg", quality=90)
    index = tmp_path / "fine.index"
    cli("index", tmp_path / "model.npz", photos, "--out", index)
    st = IndexStore.open(index)
    name = {i: Path(p).name for i, p, _ in st.items()}
    # of the two, the one indexed later is marked (here in the folder walk's order of names)
    marked = [(m["id"], m["duplicate_of"]) for g in groups(st) for m in g["members"] if m["duplicate_of"] is not None]
    assert all(i > j for i, j in marked)
    assert sorted(sorted((name[i], name[j])) for i, j in marked) == sorted(
        [sorted(("copy_q50.jpg", a.name)), sorted(("copy_half.jpg", b.name))])
    listed = json.loads(cli("groups", index, "--duplicates", "--json").stdout)["groups"]
    assert sorted(name[m["id"]] for g in listed for m in g["members"]) == sorted(
        ["copy_q50.jpg", a.name, "copy_half.jpg", b.name])


def test_search_results_say_which_are_the_same_thing(dev_index):
    """Each verified result is marked the same object or place (verified at the sure level, or linked
    to a photo that is: the groups' rule) or alike only; on mvbench-dev the marks are right (172 of
    184 when measured, with this small model whose sure level is 9 inliers)."""
    from convlad.search import Settings, search_ids

    st = IndexStore.open(dev_index / "default.index")
    truth = _truth(st)
    queries = [i for i, g in truth.items() if not g.startswith("alone")][::4]
    sure = st.model.verifier().sure
    right = wrong = alike = 0
    for q, hits in zip(queries, search_ids(st, queries, Settings(k=10))):
        for h in hits:
            assert h.same == (h.inliers >= sure or h.via is not None)
            if h.same:
                right, wrong = right + (truth[h.id] == truth[q]), wrong + (truth[h.id] != truth[q])
            else:
                alike += 1
    assert right >= 100 and alike >= 100 and wrong <= 0.1 * right, (right, wrong, alike)
