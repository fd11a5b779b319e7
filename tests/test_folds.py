"""Choosing settings by group-wise K-fold cross-validation (``convlad eval --folds``), and the
significance score of a verification."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from convlad.study.folds import combinations, cross_validate, group_folds, parse_grid
from convlad.verify import Evidence, Verifier, significance

from .conftest import MVBENCH_DEV, MVBENCH_TRAIN, REPO, need

CLI = [sys.executable, "-m", "convlad.cli"]


def test_significance_ranks_12_of_15_above_12_of_250():
    p = np.pi * 1.5 ** 2 / (28 * 28)  # a 1.5-cell tolerance on a 28×28 grid
    few, many = significance([12, 12], [15, 250], p)
    assert few > 5 > 0 > many  # 12 of 15 cannot be chance; 12 of 250 can
    # and the verifier's significance score orders them so, where inliers alone tie them
    v = Verifier(score="significance", level=0.0)
    ev = Evidence(np.array([12, 12]), np.array([15, 250]), np.array([784.0, 784.0]))
    s = v.scores(np.array([1.0, 1.0]), ev)
    assert s[0] > s[1]
    assert Verifier(chance=8).scores(np.array([1.0, 1.0]), ev)[0] == Verifier(chance=8).scores(np.array([1.0, 1.0]), ev)[1]
    # more inliers of the same tentative matches is more significant; no fit (< 3) is no evidence
    assert np.all(np.diff(significance(np.arange(3, 30), np.full(27, 60), p)) > 0)
    assert significance([2, 0], [40, 0], p).tolist() == [0.0, 0.0]


def test_group_folds_keep_groups_whole_and_balanced():
    groups = [f"g{i}" for i in range(40) for _ in range(1 + i % 5)]  # 120 queries, groups of 1–5
    folds = group_folds(groups, 5, seed=3)
    for g in set(groups):
        assert len({int(f) for q, f in enumerate(folds) if groups[q] == g}) == 1
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 5 and sizes.sum() == 120
    assert not np.array_equal(folds, group_folds(groups, 5, seed=4))  # the seed deals differently
    with pytest.raises(ValueError):
        group_folds(["a", "b"], 5)


def test_cross_validation_scores_each_fold_with_a_choice_made_without_it():
    folds = np.repeat(np.arange(4), 10)
    base = np.full(40, 0.5)
    lucky = base.copy()
    lucky[folds == 0] = 1.0  # better on fold 0 only, worse elsewhere
    lucky[folds != 0] = 0.45
    steady = np.full(40, 0.55)
    cv = cross_validate({"base": base, "lucky": lucky, "steady": steady}, folds)
    # on the full set lucky is best (0.5875 > 0.55); out of fold it is never chosen for fold 0,
    # where it would shine, and loses to steady on the folds whose choice sees fold 0
    assert np.nanmean(lucky) > np.nanmean(steady)
    assert cv.chosen[0] == "steady"
    assert cv.chosen[1:] == ["lucky"] * 3
    assert cv.mAP == pytest.approx((0.55 * 10 + 0.45 * 30) / 40)
    mean, lo, hi = cv.gain()
    assert mean == pytest.approx(cv.mAP - 0.5) and lo <= mean <= hi


def test_grid_parsing_says_what_is_wrong():
    g = parse_grid(["per=10,5", "score=inliers,significance", "chance=auto,6", "layer=block6,block8"])
    assert g == {"per": [10.0, 5.0], "score": ["inliers", "significance"], "chance": [None, 6],
                 "layer": ["block6", "block8"]}
    assert combinations(g, ("per", "score"))[0] == {"per": 10.0, "score": "inliers"}  # the baseline first
    assert len(combinations(g, ("per", "score", "chance"))) == 8
    assert parse_grid(["augment=none,verified"]) == {"augment": ["none", "verified"]}
    assert parse_grid(["link=on,off"]) == {"link": [True, False]}
    for bad in ("per", "nope=1", "per=x", "score=votes", "per=1,per=2", "augment=labels", "link=yes"):
        with pytest.raises(ValueError):
            parse_grid([bad] if bad != "per=1,per=2" else ["per=1", "per=2"])


def _documented(block: str):
    """The command and the out-of-fold figures docs/defaults.md reports under ``<!-- block -->``:
    (argv, {torch CPU capability or None: (re-ranked, global)}); None where one figure holds on
    any CPU, else one per kind ("... global 0.8349 (torch AVX2); ...")."""
    text = (REPO / "docs" / "defaults.md").read_text()
    m = re.search(rf"<!-- {block} -->\s*```sh\s*(convlad eval .*?)```(.*?)\n\n", text, re.S)
    assert m, f"docs/defaults.md lost its {block} block"
    figures = {kind or None: (float(r), float(g)) for r, g, kind in
               re.findall(r"re-ranked (0\.\d{4}), global (0\.\d{4})(?: \(torch (\w+)\))?", m.group(2))}
    assert figures, f"docs/defaults.md's {block} block states no out-of-fold figure"
    return m.group(1).replace("\\\n", " ").split(), figures


@pytest.mark.e2e
@pytest.mark.parametrize("block", [pytest.param("folds-verifier", marks=pytest.mark.long), "folds-augment"])
def test_eval_folds_reproduces_the_documented_out_of_fold_figure(tmp_path, block):
    """The augmentation's two settings (make test), and the verifier's grid of 36 (make test-long:
    about 5 min, and its figure is stated per kind of CPU torch runs on: the choice among 36
    near-tied candidates follows the last bits of the features, docs/defaults.md)."""
    need(MVBENCH_DEV), need(MVBENCH_TRAIN)
    argv, figures = _documented(block)
    kind = torch.backends.cpu.get_cpu_capability()
    if None not in figures and kind not in figures:
        pytest.skip(f"docs/defaults.md states {block}'s figure for torch {', '.join(figures)} CPUs, not {kind}: "
                    "the choice among near-tied candidates follows the forward pass's last bits")
    reranked, global_ = figures.get(None) or figures[kind]
    shared = str(MVBENCH_DEV.parent)
    argv = [a.replace("../shared/data", shared) for a in argv[2:]]  # after "convlad eval"
    out = tmp_path / "folds.json"
    p = subprocess.run([*CLI, "eval", *argv, "--folds-out", str(out)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["reranked"]["oof_mAP"] == pytest.approx(reranked, abs=0.002), p.stdout
    assert doc["global"]["oof_mAP"] == pytest.approx(global_, abs=0.002), p.stdout
    # the folds split no group, and every fold's choice is a candidate
    bench_groups = json.loads((MVBENCH_DEV / "groups.json").read_text())
    assert len(doc["fold_of_query"]) == sum(len(v) for v in bench_groups.values())
    assert set(doc["reranked"]["chosen"]) <= set(doc["reranked"]["candidates"])
    assert "out-of-fold mAP" in p.stdout and p.stdout.strip().splitlines()[-1].startswith("mAP: ")
