"""The smaller scale's features kept in an index (``Config.coarse_local``): what they change for the
groups, mined together (as ``eval --groups`` mines a benchmark) and in an index given its photos a
few at a time in random order (as a collection grows).

For each setting, a model fitted alike but for ``coarse_local`` (0: none kept, the photos already
indexed verified from their larger scale only), then:
- out of fold: the benchmark's photos mined together, the rules ``eval --groups`` chooses among
  (chosen on four folds, scored on the fifth; 3 deals), and the paired bootstrap of the F1 gain
  over the setting without;
- in arrival order: an index store built from the same encodings in ``--commits`` commits of
  photos in a random order (3 orders), its groups under the default rule (``groups.graph``) scored
  on the whole benchmark, beside the same rule over the photos mined together, and the time
  adding them took (mining and writing).

    python experiments/probe_coarse_local.py --bench /tmp/synviews --train ../shared/data/mvbench-dev
    python experiments/probe_coarse_local.py                      # mvbench-dev, Lite0
    python experiments/probe_coarse_local.py --backbone efficientnet-lite2
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default=str(SHARED / "mvbench-dev"))
    ap.add_argument("--train", default=str(SHARED / "mvbench-train"))
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--settings", default="0,100,196", help="coarse_local values; the first is the baseline")
    ap.add_argument("--commits", type=int, default=20)
    ap.add_argument("--out", default=None, help="a JSON file for the figures")
    a = ap.parse_args()
    os.environ.setdefault("CONVLAD_PRECISION", "fp32")  # the figures in docs/defaults.md are fp32's
    from convlad.groups import graph, grouping, labels
    from convlad.index.store import IndexStore
    from convlad.pairs import mine
    from convlad.pipeline import Config, ConvVLAD
    from convlad.study.datasets import load_groups, training_paths
    from convlad.study.evalcache import EvalCache
    from convlad.study.evaluate import encode_benchmark, fit_model, grouping_of
    from convlad.study.folds import group_folds
    from convlad.study.grouping import bootstrap, cross_validate, held_out_scores, rule_candidates
    from convlad.verify import LOCAL_K

    bench, train = load_groups(Path(a.bench)), training_paths(Path(a.train))[0]
    truth = np.asarray(grouping_of(bench), dtype=object)
    cache = EvalCache()
    report, base = {}, None
    for c in (int(x) for x in a.settings.split(",")):
        model = ConvVLAD(Config(backbone=a.backbone, coarse_local=c))
        fit_model(model, train, progress=False, cache=cache)
        enc, _, _, _ = encode_benchmark(model, bench, LOCAL_K, False, cache)
        v = model.pair_verifier()
        t = time.time()
        E, w = mine(enc.X, enc.local, v, False, edges=True, stored=model.local_codec_.stored(enc.local))
        mining_s = (time.time() - t) / len(enc.X) * 1000
        together = held_out_scores(grouping(enc.X, E, w, v.sure, v.chance), truth)
        folds = [cross_validate(rule_candidates(E, w, enc.X, v.sure, v.chance), truth, group_folds(list(truth), 5, s))
                 for s in range(3)]
        orders, adding = [], []
        for seed in range(3):
            order = np.random.default_rng(seed).permutation(len(enc.X))
            with tempfile.TemporaryDirectory(prefix="convlad-probe-") as tmp:
                store = IndexStore.create(Path(tmp) / "index", model=model, report=lambda *_: None)
                try:
                    t = time.time()
                    for part in np.array_split(order, a.commits):
                        store.add_vectors(enc.X[part], [str(i) for i in part], local=enc.local[part])
                    adding.append((time.time() - t) / len(enc.X) * 1000)
                    row = {i: int(p) for i, p, _ in store.items()}
                    P = graph(store)
                    found = labels(len(enc.X), np.vectorize(row.get)(P) if len(P) else P)
                finally:
                    store.close()
            orders.append(held_out_scores(found, truth))
        entry = {"chance": v.chance, "sure": v.sure, "mining_s_per_1000": mining_s, "adding_s_per_1000": adding,
                 "bytes_per_photo": model.local_codec_.bytes_of(enc.local[[0]]),
                 "together": together, "out_of_fold": [x.scores for x in folds], "arrival_order": orders}
        if base is not None:
            entry["gain_f1"] = [(x.scores["pairwise_f1"] - b.scores["pairwise_f1"], *bootstrap(truth, x, b))
                                for x, b in zip(folds, base)]
        base = base or folds
        report[c] = entry
        print(f"coarse_local {c}: chance {v.chance}, {entry['bytes_per_photo']} bytes a photo, "
              f"mining {mining_s:.1f} s per 1 000 together, adding them in commits (mined, stored) "
              + "/".join(f"{x:.1f}" for x in adding) + " s per 1 000", flush=True)
        print("  together, default rule:  " + _fmt(together))
        print("  out of fold (3 deals):   " + "  ".join(_fmt(x.scores) for x in folds))
        print(f"  arrival order ({a.commits} commits):" + "  ".join(_fmt(x) for x in orders))
        if "gain_f1" in entry:
            print("  gain out of fold: " + ", ".join(f"{g:+.3f} [{lo:+.3f}, {hi:+.3f}]" for g, lo, hi in entry["gain_f1"]))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))


def _fmt(s: dict) -> str:
    return f"F1 {s['pairwise_f1']:.3f} P {s['pairwise_precision']:.3f} B3 {s['bcubed_f1']:.3f}"


if __name__ == "__main__":
    main()
