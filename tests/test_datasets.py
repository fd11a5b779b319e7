"""Dataset loaders on the real sample files (Holidays and UKBench photos, Paris6k ground truth) and on
layouts built from them; evaluation through each protocol with rankings whose metrics are known."""
import pickle
from pathlib import Path

import numpy as np
import pytest

from convlad.study.datasets import (DatasetError, detect_kind, load_holidays, load_oxford_paris, load_revisited,
                              load_ukbench, open_dataset, training_paths)
from convlad.study.evaluate import evaluate_descriptors, evaluate_ranking, extra_query_items

from .conftest import MVBENCH_DEV, SAMPLES, need

PARIS_GT = SAMPLES / "paris6k_gt"


def _names(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _paris_layout(tmp_path: Path, extra: int = 3) -> Path:
    """A Paris6k folder: the real ground truth, and one (empty) jpg per image it names, plus a few
    unannotated ones; the loader reads names only."""
    gt = need(PARIS_GT)
    root = tmp_path / "paris6k"
    (root / "gt_files").mkdir(parents=True)
    names = set()
    for f in gt.glob("*.txt"):
        (root / "gt_files" / f.name).write_text(f.read_text())
        names.update(_names(f))
    for i in range(extra):
        names.add(f"paris_general_{i:06d}")
    for n in names:
        sub = root / "jpg" / "paris" / n.split("_")[1]
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{n}.jpg").touch()
    return root


def test_holidays_sample_protocol():
    bench = load_holidays(need(SAMPLES / "holidays"))
    assert [Path(p).name for p in bench.paths] == ["100000.jpg", "100001.jpg", "100002.jpg"]
    assert bench.query_db == [0] and bench.groups == ["1000"]
    assert bench.positives == [{1, 2}] and bench.junk == [{0}]  # the query is removed from its ranking
    assert detect_kind(SAMPLES / "holidays") == "holidays"


def test_holidays_rotated_variant(tmp_path):
    src = need(SAMPLES / "holidays")
    (tmp_path / "jpg_rotated").mkdir()
    for p in src.glob("*.jpg"):
        (tmp_path / "jpg_rotated" / p.name).symlink_to(p)
    bench = load_holidays(tmp_path, rotated=True)
    assert all("jpg_rotated" in p for p in bench.paths) and bench.positives == [{1, 2}]
    with pytest.raises(DatasetError, match="jpg/"):
        load_holidays(tmp_path / "jpg_rotated" / "nothing")


def test_ukbench_sample_groups_of_four_and_ns_score():
    bench = load_ukbench(need(SAMPLES / "ukbench"))
    assert len(bench.paths) == 10 and bench.n_queries == 10
    assert bench.positives[0] == {1, 2, 3} and bench.positives[5] == {4, 6, 7} and bench.positives[9] == {8}
    # a ranking listing each query, then its group, then the rest: N-S 4 on full groups, 2 on the pair
    order = [sorted(range(10), key=lambda i: (i != q, i not in bench.positives[q], i)) for q in range(10)]
    res = evaluate_ranking(bench, np.array(order))
    assert res.mAP == pytest.approx(1.0)
    assert res.extra["N-S"] == pytest.approx((8 * 4 + 2 * 2) / 10)
    # swapping the 2nd and 5th results of query 0 puts a negative in its top 4
    bad = np.array(order)
    bad[0, [1, 4]] = bad[0, [4, 1]]
    assert evaluate_ranking(bench, bad).extra["N-S"] == pytest.approx((8 * 4 + 2 * 2 - 1) / 10)


def test_paris_ground_truth_files(tmp_path):
    root = _paris_layout(tmp_path)
    assert detect_kind(root) == "oxford-paris"
    bench = load_oxford_paris(root)
    assert bench.name == "paris6k" and bench.n_queries == 55
    q = [p.name[:-len("_query.txt")] for p in sorted(PARIS_GT.glob("*_query.txt"))].index("defense_1")
    fields = (PARIS_GT / "defense_1_query.txt").read_text().split()
    path, box = bench.query_items[q]
    assert Path(path).stem == fields[0] and box == tuple(float(v) for v in fields[1:])
    assert bench.query_db[q] is None  # cropped: extracted separately
    stem = {i: Path(p).stem for i, p in enumerate(bench.paths)}
    ok = set(_names(PARIS_GT / "defense_1_ok.txt")) | set(_names(PARIS_GT / "defense_1_good.txt"))
    assert {stem[i] for i in bench.positives[q]} == ok
    assert {stem[i] for i in bench.junk[q]} == set(_names(PARIS_GT / "defense_1_junk.txt"))
    assert bench.groups[q] == "defense"
    assert len(extra_query_items(bench)) == 55
    full = load_oxford_paris(root, full_query=True)
    assert stem[full.query_db[q]] == fields[0] and extra_query_items(full) == []


def test_oxford_query_prefix_and_missing_images(tmp_path):
    root = tmp_path / "oxford5k"
    (root / "gt_files").mkdir(parents=True)
    (root / "jpg").mkdir()
    for n in ["all_souls_000013", "all_souls_000026", "christ_church_000179", "ashmolean_000000"]:
        (root / "jpg" / f"{n}.jpg").touch()
    (root / "gt_files" / "all_souls_1_query.txt").write_text("oxc1_all_souls_000013 136.5 34.1 648.5 955.7\n")
    (root / "gt_files" / "all_souls_1_good.txt").write_text("all_souls_000013\nall_souls_000026\n")
    (root / "gt_files" / "all_souls_1_ok.txt").write_text("")
    (root / "gt_files" / "all_souls_1_junk.txt").write_text("christ_church_000179\n")
    bench = load_oxford_paris(root, name="oxford5k")
    assert bench.query_items[0][1] == (136.5, 34.1, 648.5, 955.7)
    # the query's own image is a positive in Oxford's ground truth, and stays in the ranking
    i13 = [Path(p).stem for p in bench.paths].index("all_souls_000013")
    assert i13 in bench.positives[0] and bench.junk[0] == {[Path(p).stem for p in bench.paths].index("christ_church_000179")}
    (root / "gt_files" / "all_souls_1_ok.txt").write_text("all_souls_999999\n")
    with pytest.raises(DatasetError, match="all_souls_999999"):
        load_oxford_paris(root)


def _revisited_layout(tmp_path, payload=None) -> tuple[Path, dict]:
    """rparis6k in the revisited format, its easy/hard split made from the real Paris ground truth."""
    root = _paris_layout(tmp_path)
    imlist = sorted(Path(p).stem for p in (root / "jpg").rglob("*.jpg"))
    index = {n: i for i, n in enumerate(imlist)}
    qimlist, gnd = [], []
    for qf in sorted(PARIS_GT.glob("*_query.txt")):
        fields = qf.read_text().split()
        base = qf.name[:-len("_query.txt")]
        ok = [index[n] for n in _names(PARIS_GT / f"{base}_ok.txt")]
        qimlist.append(fields[0])
        gnd.append({"bbx": np.array([float(v) for v in fields[1:]]), "easy": np.array(ok[::2]),
                    "hard": np.array(ok[1::2]), "junk": np.array([index[n] for n in _names(PARIS_GT / f"{base}_junk.txt")])})
    cfg = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    with open(root / "gnd_rparis6k.pkl", "wb") as f:
        pickle.dump(payload if payload is not None else cfg, f)
    return root, cfg


def test_revisited_protocols(tmp_path):
    root, cfg = _revisited_layout(tmp_path)
    assert detect_kind(root) == "revisited"
    bench = load_revisited(root)
    assert bench.name == "rparis6k" and bench.n_queries == 55
    g = cfg["gnd"][0]
    easy, hard, junk = set(g["easy"].tolist()), set(g["hard"].tolist()), set(g["junk"].tolist())
    pe, je = bench.protocols["E"][0][0], bench.protocols["E"][1][0]
    pm, jm = bench.protocols["M"][0][0], bench.protocols["M"][1][0]
    ph, jh = bench.protocols["H"][0][0], bench.protocols["H"][1][0]
    assert (pe, je) == (easy, junk | hard)
    assert (pm, jm) == (easy | hard, junk)
    assert (ph, jh) == (hard, junk | easy)
    assert bench.positives[0] == pm
    # a ranking that lists hard positives first, then easy, then the rest: Medium and Hard perfect,
    # Easy perfect too because hard images are junk there
    order = np.array([sorted(range(len(bench.paths)), key=lambda i: (i not in bench.protocols["H"][0][q],
                                                                      i not in bench.protocols["M"][0][q], i))
                      for q in range(bench.n_queries)])
    res = evaluate_ranking(bench, order)
    for name in ("E", "M", "H"):
        assert res.extra[f"mAP_{name}"] == pytest.approx(1.0)
        assert res.extra[f"mP@10_{name}"] == pytest.approx(1.0)
    # a negative in front of every ranking: P@1 falls to 0 everywhere, AP below 1 but above 0
    order2 = []
    for q, row in enumerate(order):
        neg = next(i for i in row[::-1] if i not in bench.protocols["M"][0][q] | bench.protocols["M"][1][q])
        order2.append([neg] + [i for i in row if i != neg])
    res2 = evaluate_ranking(bench, np.array(order2))
    for name in ("E", "M", "H"):
        assert res2.extra[f"mP@1_{name}"] == pytest.approx(0.0)
        assert 0 < res2.extra[f"mAP_{name}"] < 1


def test_revisited_refuses_code_in_the_pickle(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    root, _ = _revisited_layout(tmp_path, payload={"imlist": [], "qimlist": [], "gnd": [Evil()]})
    with pytest.raises(DatasetError, match="refusing to load"):
        load_revisited(root)


def test_groups_detection_and_training_paths(tmp_path):
    assert detect_kind(need(MVBENCH_DEV)) == "groups"
    assert open_dataset(MVBENCH_DEV).n_queries == 191
    # a benchmark given as training set contributes its database images (Oxford ↔ Paris convention)
    paths, label = training_paths(SAMPLES / "ukbench")
    assert len(paths) == 10 and "ukbench database" in label
    with pytest.raises(DatasetError, match="not recognised"):
        detect_kind(tmp_path)


def test_cropped_query_descriptors_are_used(tmp_path):
    """Queries outside the database (crops) take their rows from X_q, in query order."""
    root = _paris_layout(tmp_path)
    bench = load_oxford_paris(root)
    rng = np.random.default_rng(0)
    landmarks = sorted({Path(p).stem.split("_")[1] for p in bench.paths})
    onehot = {lm: np.eye(len(landmarks), dtype=np.float32)[i] * 3 for i, lm in enumerate(landmarks)}
    X = np.stack([onehot[Path(p).stem.split("_")[1]] for p in bench.paths])
    X += rng.normal(size=X.shape).astype(np.float32)
    # each query's descriptor sits on its landmark's axis, where its positives are
    X_q = np.stack([onehot[Path(item[0]).stem.split("_")[1]] for item in bench.query_items])
    good = evaluate_descriptors(bench, X, X_q).mAP
    shuffled = evaluate_descriptors(bench, X, X_q[rng.permutation(len(X_q))]).mAP
    assert good > 0.5 and good > shuffled + 0.2


def test_ties_are_broken_by_database_order():
    """Two database images with the same descriptor: the exact search ranks the lower index first,
    so AP is reproducible; a positive tied with a negative scores by that order."""
    from convlad.study.datasets import RetrievalBenchmark

    X = np.array([[0, 0], [1, 0], [1, 0], [5, 5]], np.float32)
    bench = RetrievalBenchmark(name="t", root=Path("."), paths=["a", "b", "c", "d"], query_items=["a"],
                               positives=[{2}], junk=[{0}], query_db=[0])
    # ranking after the query: b (negative, tied) then c (positive) → AP = (0 + 1/2)/2
    assert evaluate_descriptors(bench, X).mAP == pytest.approx(0.25)
    bench.positives = [{1}]
    assert evaluate_descriptors(bench, X).mAP == pytest.approx(1.0)
