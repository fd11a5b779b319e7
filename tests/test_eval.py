"""Evaluation on the real benchmark: the loader's protocol, and the defaults' mAP end to end."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from convlad.study.datasets import load_groups
from convlad.study.evaluate import evaluate_descriptors, query_aps

from .conftest import MVBENCH_DEV, MVBENCH_TRAIN, need


def test_groups_loader_follows_the_protocol():
    bench = load_groups(need(MVBENCH_DEV))
    assert len(bench.queries) == 191 and len(bench.paths) == 191 + 217  # README counts
    assert all(q not in pos and pos for q, pos in zip(bench.queries, bench.positives))
    assert len(set(bench.groups)) == 53
    # a ranking that puts every query's positives first scores 1, whatever comes after
    ranking = np.array([sorted(range(len(bench.paths)), key=lambda i: (i not in pos, i == q))
                        for q, pos in zip(bench.queries, bench.positives)])
    assert np.allclose(query_aps(bench, ranking), 1.0)
    # the query itself is removed from its ranking: ranking it first changes nothing
    first = np.array([[q] + [i for i in r if i != q] for q, r in zip(bench.queries, ranking)])
    assert np.allclose(query_aps(bench, first), 1.0)


def test_random_descriptors_score_near_chance():
    bench = load_groups(need(MVBENCH_DEV))
    X = np.random.default_rng(0).normal(size=(len(bench.paths), 64)).astype(np.float32)
    assert evaluate_descriptors(bench, X).mAP < 0.1


@pytest.mark.e2e
def test_default_pipeline_reaches_target_map(tmp_path):
    """The issues' acceptance checks: the defaults (128-D) reach mAP >= 0.80 on mvbench-dev, and
    re-ranking the top 100 by spatial verification, on by default, adds to it (0.835 → 0.871 when
    measured). The database side is augmented over verified pairs, as an index does: the global
    ranking gains (0.811 → 0.835), and the re-ranked one, which the same pairs link through
    (``search.linked``), is at least the plain one's (0.867 → 0.871 when measured)."""
    need(MVBENCH_TRAIN)
    p = subprocess.run([sys.executable, "-m", "convlad", "eval", "mvbench", str(MVBENCH_DEV),
                        "--train", str(MVBENCH_TRAIN.parent), "--aps", str(tmp_path / "aps.json")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"mAP: 0\.\d{3}", last), p.stdout
    global_ = float(re.search(r"^mAP_without_rerank: (0\.\d{3})$", p.stdout, re.M).group(1))
    assert global_ >= 0.80, p.stdout
    assert float(last.split()[1]) >= global_ + 0.02, p.stdout
    alone = re.search(r"^without the collection's steps \(PCA-whitening alone\): mAP (0\.\d{3}), without re-ranking "
                      r"(0\.\d{3})$", p.stdout, re.M)
    assert "database descriptors augmented with their partners in" in p.stdout and alone, p.stdout
    assert global_ >= float(alone.group(2)) + 0.01 and float(last.split()[1]) >= float(alone.group(1)), p.stdout
    assert "layers=block6 pooled=block15 scales=1,2 k=100 dim=128" in p.stdout
    assert "re-ranking: top 100" in p.stdout and "24602 bytes of local features per image" in p.stdout
    # the groups of the database under the default rule over the same mined pairs (`convlad groups`):
    # nearly every pair right (0.997, F1 0.958 and B-cubed F1 0.965 when measured)
    g = re.search(r"^groups .*: pairwise precision (0\.\d{3}), recall (0\.\d{3}), F1 (0\.\d{3}); B-cubed F1 "
                  r"(0\.\d{3})$", p.stdout, re.M)
    assert g and float(g.group(1)) >= 0.98 and float(g.group(3)) >= 0.92 and float(g.group(4)) >= 0.94, p.stdout
    doc = json.loads((tmp_path / "aps.json").read_text())
    assert len(doc["aps"]) == 191 and abs(np.nanmean([a for a in doc["aps"] if a is not None]) - doc["mAP"]) < 1e-9


def test_groups_are_chosen_out_of_fold_beside_their_baselines(tmp_path):
    """`convlad eval --groups`: the groups' rule chosen by group-wise K-fold on mvbench-dev beside the
    global-cosine components and the perceptual hash, each chosen the same way. Out of fold the
    verified links keep the precision issue 35 asks for (0.98) and find more than the global cosine
    (measured, each held fold judged over the whole collection: P 0.991, F1 0.956 against 0.853 and
    0.826; pHash F1 0.194). A rule that lets one weak pair merge two groups is no candidate: with
    it the folds chose it where the two domes it merges were both held out (P 0.933).
    Reuses the default eval's fit and encoding."""
    need(MVBENCH_TRAIN)
    bad = tmp_path / "peer.json"
    bad.write_text('{"paths": ["elsewhere.jpg"], "candidates": {}}')
    p = subprocess.run([sys.executable, "-m", "convlad", "eval", "mvbench", str(MVBENCH_DEV), "--train",
                        str(MVBENCH_TRAIN.parent), "--groups", "--peer", str(bad)], capture_output=True, text=True)
    assert p.returncode != 0 and "not a peer's groupings of this benchmark's photos" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    out = tmp_path / "study.json"
    p = subprocess.run([sys.executable, "-m", "convlad", "eval", "mvbench", str(MVBENCH_DEV), "--train",
                        str(MVBENCH_TRAIN.parent), "--groups", "--groups-out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    for line in ("default rule (fixed)", "verified links (K-fold)", "global cosine (K-fold)",
                 "perceptual hash (K-fold)", "verified links over global cosine: F1 +"):
        assert line in p.stdout, p.stdout
    doc = json.loads(out.read_text())
    fam = doc["families"]
    ours, cosine = (fam[k]["out_of_fold"][0]["scores"] for k in ("verified links", "global cosine"))
    assert ours["pairwise_precision"] >= 0.98 and ours["pairwise_f1"] >= 0.94, ours
    assert ours["pairwise_precision"] > cosine["pairwise_precision"], (ours, cosine)
    assert ours["pairwise_f1"] >= cosine["pairwise_f1"] + 0.03 and ours["bcubed_f1"] > cosine["bcubed_f1"]
    assert fam["perceptual hash"]["out_of_fold"][0]["scores"]["pairwise_f1"] < ours["pairwise_f1"]
    lo, hi = fam["verified links"]["interval_f1"]
    assert lo < ours["pairwise_f1"] < hi and len(fam["verified links"]["out_of_fold"]) == 3
    # the default rule stays precise on the full set, and the rule the folds choose most often among
    # the precise ones does no better there than noise (measured: the same at a cosine floor of 0.5,
    # 14 of 15 times, F1 0.959 against 0.958): a default moves only for a gain that holds
    full = fam["verified links"]["full_set"]
    chosen = [c for r in fam["verified links"]["out_of_fold"] for c in r["chosen"]]
    precise = [c for c in chosen if full[c]["pairwise_precision"] >= 0.98]
    most = max(precise, key=precise.count)
    assert doc["default"]["pairwise_precision"] >= 0.98 and doc["default"] == full[doc["default_rule"]], doc["default"]
    assert full[most]["pairwise_f1"] - doc["default"]["pairwise_f1"] < 0.01, (most, chosen)
