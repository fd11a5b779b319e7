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

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from probe_local_whitening import fitted, judged, load, parser


def main():
    ap = parser()
    ap.add_argument("--settings", default="0,100,196", help="coarse_local values; the first is the baseline")
    ap.add_argument("--commits", type=int, default=20)
    a = ap.parse_args()
    bench, train, truth, cache = load(a)
    from convlad.groups import graph, grouping, labels
    from convlad.index.store import IndexStore
    from convlad.pipeline import Config
    from convlad.study.grouping import bootstrap, held_out_scores

    report, base = {}, None
    for c in (int(x) for x in a.settings.split(",")):
        model, enc = fitted(Config(backbone=a.backbone, coarse_local=c), train, bench, cache)
        v, E, w, folds = judged(model, enc, truth)
        together = held_out_scores(grouping(enc.X, E, w, v.sure, v.chance), truth)
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
        entry = {"chance": v.chance, "sure": v.sure, "adding_s_per_1000": adding,
                 "bytes_per_photo": sum(a.nbytes for a in model.local_codec_.encode(enc.local[[0]]).values()),
                 "together": together, "out_of_fold": [x.scores for x in folds], "arrival_order": orders}
        if base is not None:
            entry["gain_f1"] = [(x.scores["pairwise_f1"] - b.scores["pairwise_f1"], *bootstrap(truth, x, b))
                                for x, b in zip(folds, base)]
        base = base or folds
        report[c] = entry
        print(f"coarse_local {c}: chance {v.chance}, {entry['bytes_per_photo']} bytes a photo, "
              "adding them in commits (mined, stored) "
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
