"""The local whitening's gain for the groups, out of fold: the same benchmark grouped by two models
fitted alike but for ``Config.local_whitening``, each pair verifier's mined pairs under the rules
``eval --groups`` chooses among (``study.grouping.GRID``, chosen on four folds, scored on the
fifth), and the paired bootstrap of the F1 gain over the benchmark's groups, for each of 3 deals.
Optionally the rule's fewer whitened dimensions (``--keep``): the map's first rows only, its
chance level measured again; or other matching for the pair verifier (``--matching``: its
tentative matches' cosine floor, its inlier tolerance), or more local features a photo
(``--features``), each at its chance level measured again.

    python experiments/probe_local_whitening.py                     # mvbench-dev, Lite0
    python experiments/probe_local_whitening.py --backbone efficientnet-lite2
    python experiments/probe_local_whitening.py --bench /tmp/synviews --train ../shared/data/mvbench-dev
    python experiments/probe_local_whitening.py --keep 64,48,32
    python experiments/probe_local_whitening.py --matching "min_similarity=0.5;threshold=2" --features 500,784
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def parser() -> argparse.ArgumentParser:
    """The benchmark, its training photos and the backbone, as the groups' probes take them."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default=str(SHARED / "mvbench-dev"))
    ap.add_argument("--train", default=str(SHARED / "mvbench-train"))
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--out", default=None, help="a JSON file for the figures")
    return ap


def load(a):
    """(benchmark, training paths, each photo's group, the eval cache) of parsed arguments ``a``."""
    os.environ.setdefault("CONVLAD_PRECISION", "fp32")  # the figures in docs/defaults.md are fp32's
    from convlad.study.datasets import load_groups, training_paths
    from convlad.study.evalcache import EvalCache
    from convlad.study.evaluate import grouping_of

    bench = load_groups(Path(a.bench))
    return bench, training_paths(Path(a.train))[0], np.asarray(grouping_of(bench), dtype=object), EvalCache()


def fitted(config, train, bench, cache, k: int | None = None):
    """(a model of ``config`` fitted on ``train``, the benchmark encoded with ``k`` local features a
    photo), through the eval cache."""
    from convlad.pipeline import ConvVLAD
    from convlad.study.evaluate import encode_benchmark, fit_model
    from convlad.verify import LOCAL_K

    model = ConvVLAD(config)
    fit_model(model, train, progress=False, cache=cache)
    return model, encode_benchmark(model, bench, k or LOCAL_K, False, cache)[0]


def judged(model, enc, truth, **kw):
    """The benchmark's photos mined together by ``model.pair_verifier(**kw)`` and the rules ``eval
    --groups`` chooses among, chosen out of fold: (verifier, pairs, inliers, [Chosen of 3 deals])."""
    from convlad.pairs import mine
    from convlad.study.folds import group_folds
    from convlad.study.grouping import cross_validate, rule_candidates

    v = model.pair_verifier(**kw)
    E, w = mine(enc.X, enc.local, v, False, edges=True, stored=model.local_codec_.stored(enc.local))
    cands = rule_candidates(E, w, enc.X, v.sure, v.chance)
    return v, E, w, [cross_validate(cands, truth, group_folds(list(truth), 5, s)) for s in range(3)]


def main():
    ap = parser()
    ap.add_argument("--keep", default="", help="also keep only this many whitened dimensions (comma-separated)")
    ap.add_argument("--matching", default="",
                    help="pair verifier settings to try with the whitening, e.g. 'min_similarity=0.5;threshold=2'")
    ap.add_argument("--features", default="", help="also this many local features a photo (comma-separated)")
    a = ap.parse_args()
    bench, train, truth, cache = load(a)
    from convlad.pipeline import Config
    from convlad.study.grouping import bootstrap
    from convlad.verify import LOCAL_K, chance_level

    def scored(model, enc, **kw):
        v, _, _, r = judged(model, enc, truth, **kw)
        return v.chance, r

    runs, report = {}, {}
    for lw in (False, True):
        model, enc = fitted(Config(backbone=a.backbone, local_whitening=lw), train, bench, cache)
        runs["with" if lw else "without"] = scored(model, enc)
    tl = model.transform(train[::2], progress=False, local=LOCAL_K).local
    for setting in filter(None, a.matching.split(";")):
        kw = {k: float(v) for k, v in (x.split("=") for x in setting.split(","))}
        c = chance_level(tl, stored=model.local_codec_.stored(tl), verifier=model.pair_verifier(**kw))
        runs[f"with, {setting}"] = scored(model, enc, chance=c, **kw)
    for k in (int(x) for x in a.features.split(",") if x):
        _, more = fitted(model.config, train, bench, cache, k)
        tk = model.transform(train[::2], progress=False, local=k).local
        c = chance_level(tk, stored=model.local_codec_.stored(tk), verifier=model.pair_verifier())
        runs[f"with, {k} features"] = scored(model, more, chance=c)
    keeps = [int(k) for k in a.keep.split(",") if k]
    if keeps:
        P = model.local_whitening_
        for keep in keeps:
            model.local_whitening_ = np.ascontiguousarray(P[:keep])
            model.pair_chance_ = chance_level(tl, stored=model.local_codec_.stored(tl), verifier=model.pair_verifier())
            runs[f"with, {keep} dimensions"] = scored(model, enc)
    base = runs["without"][1]
    for name, (chance, r) in runs.items():
        gains = [(x.scores["pairwise_f1"] - b.scores["pairwise_f1"], *bootstrap(truth, x, b)) for x, b in zip(r, base)]
        report[name] = {"chance": chance, "out_of_fold": [x.scores for x in r], "gain_f1": gains}
        print(f"{name:<24} chance {chance}  " + "  ".join(
            f"F1 {x.scores['pairwise_f1']:.3f} P {x.scores['pairwise_precision']:.3f} B3 {x.scores['bcubed_f1']:.3f}"
            for x in r))
        if name != "without":
            print(" " * 25 + "gain " + ", ".join(f"{g:+.3f} [{lo:+.3f}, {hi:+.3f}]" for g, lo, hi in gains))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
