"""Issue 20: a verified shortlist completed through the pairs the index already keeps.

Since December 2026 the search does this itself (``search.linked``; on by default, ``Verifier(link=
False)`` turns it off); this script compares the search without it against the candidates below,
and checks that the search ranks, query for query, as the candidate "sure (3 × chance) beta 1
shortlist chain": links within the shortlist, followed from photo to linked photo.

An index mines, as photos are added, each photo's verified partners (``pairs.mine_pairs``: three
times the chance level of inliers, the pairs database-side augmentation adds over). At query time
the shortlist is verified (``search.rank``); a photo paired in the index with one of the query's
*sure* matches (inliers at least the same mining level) is then one verified link away from the
query at that level, however weakly it verifies with the query itself (a second view from the
other side, a night photo of the same facade). The candidates score such a photo as if it had
verified at ``level`` (β = 1) or half that bonus (β = 0.5) when that beats its own; partners outside
the shortlist come in with their plain similarity (or, "shortlist", do not). "chain": a photo so
linked links its own partners in the shortlist in turn, to the end of the chain. No extra
verification is run.

Judged as the other probes (``convlad.study.folds.judge``: 5 group-wise folds, 3 seeds) on mvbench-dev,
and scored on the synthetic views (``convlad.study.synviews``) and another backbone:

    python experiments/probe_paired.py [--bench ../shared/data/mvbench-dev --train ../shared/data/mvbench-train]
        [--backbone efficientnet-lite0] [--time] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def partners_of(pairs: np.ndarray, n: int) -> list[np.ndarray]:
    out = [[] for _ in range(n)]
    for a, b in np.asarray(pairs, np.int64).reshape(-1, 2):
        out[a].append(b)
        out[b].append(a)
    return [np.array(sorted(p), np.int64) for p in out]


def completed(hits, X: np.ndarray, xq: np.ndarray, partners, verifier, level: int, beta: float, exclude,
              outside: bool = True, chain: bool = False):
    """The verified ranking ``hits`` (``search.rank``'s, every database photo) with each partner of a
    sure match scored at ``level`` inliers' bonus times ``beta``, where that beats its own score.
    ``chain``: and each partner of a photo so linked, within the shortlist, and so on."""
    ids = np.array([h.id for h in hits], np.int64)
    inl = {h.id: h.inliers for h in hits if h.inliers is not None}
    sure = [i for i, c in inl.items() if c >= level]
    link = {}
    frontier = sure
    while frontier:
        nxt = []
        for a in frontier:
            for j in partners[a]:
                if int(j) not in link and (not chain or int(j) in inl) and inl.get(int(j), 0) < level:
                    link[int(j)] = True
                    nxt.append(int(j))
        frontier = nxt if chain else []
    if not link:
        return ids
    ex = set(int(e) for e in exclude)
    head = [i for i in ids[:len(inl)]]
    pool = list(dict.fromkeys([*head, *(j for j in link if j not in ex and outside)]))
    cos = X[pool] @ xq
    strength = np.array([max(inl.get(j, 0) or 0, 0) for j in pool])
    own = np.minimum(np.maximum(strength - verifier.chance, 0) / verifier.per, verifier.cap)
    via = beta * min((level - verifier.chance) / verifier.per, verifier.cap)
    b = np.where([j in link for j in pool], np.maximum(own, via), own)
    top = np.array(pool)[np.argsort(-(cos + b), kind="stable")]
    seen = set(top.tolist())
    return np.concatenate([top, [i for i in ids if i not in seen]]).astype(np.int64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default=str(SHARED / "mvbench-dev"))
    ap.add_argument("--train", default=str(SHARED / "mvbench-train"))
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--folds", type=int, default=1, help="judge by the protocol (the benchmark's groups)")
    ap.add_argument("--time", action="store_true", help="also time the search with and without links, interleaved")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    os.environ.setdefault("CONVLAD_PRECISION", "fp32")
    from convlad.study.datasets import load_groups, training_paths
    from convlad.study.evaluate import query_aps, query_descriptors
    from convlad.study.metrics import bootstrap_difference
    from convlad.search import MemoryIndex, Settings, rank
    from dataclasses import replace

    from convlad.pairs import mine_pairs
    from probe_ensemble import encoded
    from convlad.study.folds import judge

    bench = load_groups(a.bench)
    train, _ = training_paths(a.train)
    model, enc = encoded(a.backbone, bench, train)
    v = replace(model.verifier(), link=False)  # the search without its links; this script adds its own
    X = enc.X
    pairs = mine_pairs(X, enc.local, v)
    index = MemoryIndex(X, enc.local, v, pairs)
    junk = [sorted(j) for j in bench.junk]
    Q = query_descriptors(bench, X)
    feats = [enc.local.features(d) for d in bench.query_db]
    hits = rank(index, Q, feats, Settings(k=len(X), rerank=100), exclude=junk)
    ghits = rank(index, Q, None, Settings(k=len(X), rerank=0), exclude=junk)

    def aps(rows):
        return query_aps(bench, [np.concatenate([junk[q], r]).astype(np.int64) for q, r in enumerate(rows)])

    base = aps([[h.id for h in row] for row in hits])
    glob = aps([[h.id for h in row] for row in ghits])
    partners = partners_of(pairs, len(X))
    level = v.sure
    print(f"{a.backbone} on {a.bench}: {len(pairs)} pairs, chance {v.chance}, level {level}; "
          f"global {glob.mean():.4f}, re-ranked {base.mean():.4f}", flush=True)
    cands = {}
    for lv in (level, 2 * v.chance):
        for beta, outside, chain in ((1.0, True, False), (0.5, True, False), (1.0, False, False), (1.0, False, True)):
            name = f"sure {lv} beta {beta:g}" + ("" if outside else " shortlist") + (" chain" if chain else "")
            cands[name] = got = aps(
                [completed(row, X, Q[q], partners, v, lv, beta, junk[q], outside, chain) for q, row in enumerate(hits)])
            d = bootstrap_difference(base, got)
            print(f"  {name}: {got.mean():.4f}  gain {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]; "
                  f"{(got > base + 1e-9).sum()} queries up, {(got < base - 1e-9).sum()} down; "
                  f"over the global ranking {bootstrap_difference(glob, got)[0]:+.4f} "
                  f"[{bootstrap_difference(glob, got)[1]:+.4f}, {bootstrap_difference(glob, got)[2]:+.4f}]", flush=True)
    # the search's own links (the default verifier) rank as this script's first candidate
    linked = aps([[h.id for h in row] for row in rank(index, Q, feats, Settings(k=len(X), rerank=100), exclude=junk,
                                                     verifier=model.verifier())])
    np.testing.assert_allclose(linked, cands[f"sure {level} beta 1 shortlist chain"])
    print(f"the search's default (links on): {linked.mean():.4f}, query for query the candidate "
          f"'sure {level} beta 1 shortlist chain'", flush=True)
    if a.time:  # three interleaved rounds of every query, top 100 verified, as a user's search
        import time

        ms = {True: [], False: []}
        for _ in range(3):
            for on in (True, False):
                t = time.perf_counter()
                rank(index, Q, feats, Settings(k=100, rerank=100), exclude=junk, verifier=replace(v, link=on))
                ms[on].append(1000 * (time.perf_counter() - t) / len(Q))
        print("ms a query with links " + ", ".join(f"{x:.1f}" for x in ms[True]) + "; without "
              + ", ".join(f"{x:.1f}" for x in ms[False]), flush=True)
    doc = {"bench": a.bench, "backbone": a.backbone, "pairs": len(pairs), "global": float(glob.mean()),
           "reranked": float(base.mean()), "candidates": {k: float(c.mean()) for k, c in cands.items()},
           "gain_over_global": {"default": bootstrap_difference(glob, base),
                                **{k: bootstrap_difference(glob, c) for k, c in cands.items()}}}
    if a.folds > 1:
        doc["families"] = judge({"paired": cands}, lambda f: base, bench)
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
