"""Issue 20: two backbones' global descriptors in one, judged by the protocol (group-wise 5-fold
cross-validation on mvbench-dev, three fold seeds, ``convlad.study.folds.judge``).

Each backbone is the default recipe fitted on mvbench-train (its PCA-whitened 128-D descriptor);
the candidates concatenate Lite0's with w times the other's, L2-normalised (the cosine becomes a
weighted mean of the two cosines). The database is augmented over pairs the verifier mines with the
candidate's own neighbours, as an index does, and the shortlist is verified with Lite0's local
features, through the one search (``evaluate.evaluate_descriptors``). Nothing is fitted on dev.

    python experiments/probe_ensemble.py [--other efficientnet-lite2] [--out docs/results/probe-ensemble.json]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def encoded(backbone: str, bench, train):
    """The default recipe on ``backbone``, fitted and encoded through eval's cache."""
    from convlad.study.evalcache import EvalCache
    from convlad.study.evaluate import encode_benchmark, fit_model
    from convlad.pipeline import ConvVLAD

    cache = EvalCache()
    model = ConvVLAD(backbone=backbone)
    fit_model(model, train, cache=cache)
    enc, _, _, _ = encode_benchmark(model, bench, 300, cache=cache)
    return model, enc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", default="efficientnet-lite2")
    ap.add_argument("--weights", default="0.5,0.7,1")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    os.environ.setdefault("CONVLAD_PRECISION", "fp32")
    from convlad.study.datasets import load_groups, training_paths
    from convlad.study.evaluate import evaluate_descriptors
    from convlad.pairs import mine_pairs
    from convlad.study.folds import judge

    bench = load_groups(SHARED / "mvbench-dev")
    train, _ = training_paths(SHARED / "mvbench-train")
    m0, e0 = encoded("efficientnet-lite0", bench, train)
    m1, e1 = encoded(a.other, bench, train)
    v = m0.verifier()

    def scored(X):
        pairs = mine_pairs(X, e0.local, v)
        g = evaluate_descriptors(bench, X, rerank=0, pairs=pairs).aps
        r = evaluate_descriptors(bench, X, rerank=100, local=e0.local, verifier=v, pairs=pairs).aps
        return g, r, len(pairs)

    g0, r0, n0 = scored(e0.X)
    print(f"lite0: global {g0.mean():.4f}, re-ranked {r0.mean():.4f}, {n0} pairs", flush=True)
    G, R, mined = {}, {}, {}
    for w in [float(s) for s in a.weights.split(",")]:
        X = np.concatenate([e0.X, w * e1.X], 1)
        X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
        g, r, n = scored(X)
        G[f"w{w:g}"], R[f"w{w:g}"], mined[f"w{w:g}"] = g, r, n
        print(f"+ {w:g} x {a.other}: global {g.mean():.4f}, re-ranked {r.mean():.4f}, {n} pairs", flush=True)
    rows = judge({"global": G, "reranked": R}, lambda f: g0 if f == "global" else r0, bench)
    if a.out:
        doc = {"other": a.other, "precision": os.environ["CONVLAD_PRECISION"], "lite0": {
            "global": float(g0.mean()), "reranked": float(r0.mean()), "pairs": n0}, "pairs": mined, "families": rows}
        Path(a.out).write_text(json.dumps(doc, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
