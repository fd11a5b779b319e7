"""More candidates for issue 20's "verification that knows when it is sure", each judged by the
protocol (group-wise 5-fold cross-validation on mvbench-dev: pick on 4 folds, the default among the
candidates, score the fifth; three fold seeds; the 95% bootstrap interval of the out-of-fold gain).

Families (all label-free: nothing is fitted on mvbench-dev, nor on any benchmark's groups):
- ``logistic``: a calibrated verification score. A logistic regression of "same place" on a pair's
  evidence (inliers, log tentative matches, inlier ratio, the inliers' spread in each photo, the
  affine map's scale change and anisotropy, the inliers' mean similarity; optionally the global
  cosine), fitted on pairs whose answer is known without labels: a mvbench-train photo against two
  synthetic views of itself (``convlad.study.synviews``'s warp) and the views against each other as
  matches; each photo against its 20 nearest other training photos (which share no place) as
  non-matches, so the negatives are the hard ones a shortlist holds. Scored three ways: the
  cosine plus 4 × P(match) (a sure match worth the default cap), the cosine plus the log-odds above
  even in inlier units (its inliers-only slope), and the log-odds alone with the cosine inside.
- ``features``: the local features verified: 300 (default), 500 or all 784 positions of block6 at
  scale 2, with or without 100 or all 196 of scale 1 (cells doubled onto the scale-2 grid), each
  with its chance level measured on the training photos as a model's is.
- ``ratio``: Lowe's ratio test on top of the mutual nearest neighbours: a tentative match is kept
  only where its distance is below r times the distance to the query feature's nearest candidate
  feature outside the match's 3 × 3 cells (adjacent cells of a conv map describe overlapping
  patches, so the plain second nearest is usually the same patch again); r = 0.8 (SIFT's), 0.9,
  0.95, each with its chance level measured with the same matching.
- ``chance`` (a diagnostic, not a candidate): the inliers that unrelated training photos reach
  against their nearest neighbours, by neighbour rank (where a shortlist lives), against the chance
  level that is measured on far pairs; and what dev's mAP does with the level set to each.

    python experiments/probe_verify.py [--cache /tmp/convlad-probe-verify] [--out docs/results/probe-verify.json]

About 5 min on 2 cores once EvalCache holds the fit and the encodings; a few minutes more the first time.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from probe_rerank import layer_codes  # a sibling experiment, beside this file

from convlad.study.folds import judge  # the same table and folds as the first families'
from convlad.study.synviews import view

REPO = Path(__file__).resolve().parents[1]

SHARED = REPO.parent / "shared" / "data"
D = 100  # the shortlist verified, as the default
NN = 20  # hard negatives per training photo
FEATURES = ["inliers", "log tentative", "inlier ratio", "spread (query)", "spread (candidate)", "|log det|",
            "anisotropy", "inlier similarity"]


def encode(cache: Path):
    """The default model (fp32, the suite's) fitted on mvbench-train; local features of mvbench-dev,
    mvbench-train and two synthetic views of each training photo; block6 at both scales with every
    position kept, for dev and train."""
    f = cache / "encoded.npz"
    if f.is_file():
        z = np.load(f)
        return {k: z[k] for k in z.files}
    import cv2

    from convlad.study.datasets import load_groups, training_paths
    from convlad.study.evalcache import EvalCache
    from convlad.extract import FeatureExtractor
    from convlad.pipeline import ConvVLAD
    from convlad.runtime import Runtime

    bench = load_groups(SHARED / "mvbench-dev")
    train, _ = training_paths(SHARED / "mvbench-train")
    (cache / "views").mkdir(parents=True, exist_ok=True)
    rng, views = np.random.default_rng(12345), []
    for i, p in enumerate(train):
        img = cv2.imread(p, cv2.IMREAD_COLOR)
        for j in range(2):
            views.append(str(cache / "views" / f"{i:04d}_{j}.jpg"))
            cv2.imwrite(views[-1], view(img, rng), [cv2.IMWRITE_JPEG_QUALITY, 70])
    ec = EvalCache()
    model = ConvVLAD(runtime=Runtime(precision="fp32"))
    ec.fit(model, train)
    out = {"chance": np.array(model.chance_)}
    for name, items in (("dev", bench.paths), ("train", train), ("views", views)):
        enc, _, _ = ec.transform(model, items, 300)
        out[f"{name}_X"] = enc.X
        out.update({f"{name}_{k}": v for k, v in enc.local.arrays().items()})
    ex = FeatureExtractor(model.backbone, [model.local_key[0]])
    ex.precision = "fp32"
    for name, paths in (("dev", bench.paths), ("train", train)):
        for scale, k in ((1.0, 196), (2.0, 784)):
            got = layer_codes(ex, paths, (model.local_key[0], scale), k)
            out.update({f"{name}{int(scale)}_{a}": v for a, v in got.arrays().items()})
    np.savez(f, **out)
    return out


def pair_features(v, query, cands, area: float) -> np.ndarray:
    """(n, len(FEATURES)) evidence of ``query`` against each candidate, fitted as ``Verifier``
    fits (its tentative matches, its gate, its RANSAC); zeros past the log tentative where no map."""
    from convlad.verify import fit_affine

    xq = query[1]
    fwd, ok, best = v.tentative(query, cands)
    cells = cands.cells.astype(np.float32) + 0.5
    F = np.zeros((len(cands), len(FEATURES)))
    for j in range(len(cands)):
        rows = np.flatnonzero(ok[j])
        F[j, 1] = np.log1p(len(rows))
        if len(rows) <= v.gate:
            continue
        src, dst = xq[rows], cells[j, fwd[j, rows]]
        A, mask = fit_affine(src, dst, v.threshold)
        m = int(mask.sum())
        if A is None or m < 3:
            continue
        s, d = src[mask], dst[mask]
        sv = np.linalg.svd(A[:, :2], compute_uv=False)
        F[j, [0, 2]] = m, m / len(rows)
        F[j, 3] = np.sqrt(np.ptp(s[:, 0]) * np.ptp(s[:, 1]) / area)
        F[j, 4] = np.sqrt(np.ptp(d[:, 0]) * np.ptp(d[:, 1]) / area)
        F[j, 5] = abs(np.log(max(sv[0] * sv[1], 1e-6)))
        F[j, 6] = np.log(max(sv[0], 1e-6) / max(sv[1], 1e-6))
        F[j, 7] = best[j, rows][mask].mean()
    return F


def ratio_verifier(r: float, **kw):
    """A ``Verifier`` whose tentative matches also pass the ratio test at ``r`` (see the docstring)."""
    from dataclasses import dataclass

    from convlad.verify import Verifier

    @dataclass
    class RatioVerifier(Verifier):
        ratio: float = 1.0

        def _tentative(self, query, candidates):
            fwd, ok, best = super().tentative(query, candidates)
            C = candidates.descriptors()
            n, k, d = C.shape
            S = (query[0] @ C.reshape(n * k, d).T).reshape(len(query[0]), n, k).transpose(1, 0, 2)
            cells = candidates.cells.astype(np.int16)
            first = cells[np.arange(n)[:, None], fwd]  # (pair, query feature, 2)
            near = np.abs(cells[:, None, :, :] - first[:, :, None, :]).max(-1) <= 1
            second = np.where(near, -1.0, S).max(2)
            d1, d2 = (np.sqrt(np.maximum(2 - 2 * x, 0)) for x in (best, second))
            return fwd, ok & (d1 < self.ratio * d2), best

    return RatioVerifier(ratio=r, **kw)


def fit_logistic(F, y, w, l2=1e-2, iters=50):
    """Weighted, L2-penalised logistic regression by Newton's method on standardised features."""
    mu, sd = F.mean(0), F.std(0) + 1e-9
    Z = np.c_[np.ones(len(F)), (F - mu) / sd]
    b = np.zeros(Z.shape[1])
    R = l2 * np.diag(np.r_[0, np.ones(len(b) - 1)])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-Z @ b))
        b -= np.linalg.solve((Z * (w * p * (1 - p))[:, None]).T @ Z + R, Z.T @ (w * (p - y)) + R @ b)
    return lambda G: np.c_[np.ones(len(G)), (G - mu) / sd] @ b, b / np.r_[1, sd]


def auc(s, y) -> float:
    """Area under the ROC curve (ties count half)."""
    s, y = np.asarray(s, np.float64).ravel(), np.asarray(y, bool).ravel()
    _, inv = np.unique(s, return_inverse=True)
    r = np.empty(len(s))
    r[np.argsort(s, kind="stable")] = np.arange(1, len(s) + 1)
    r = (np.bincount(inv, r) / np.bincount(inv))[inv]
    npos = y.sum()
    return float((r[y].sum() - npos * (npos + 1) / 2) / (npos * (len(y) - npos)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/convlad-probe-verify", help="folder for the encodings (reused)")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "probe-verify.json"))
    a = ap.parse_args()
    os.environ.setdefault("CONVLAD_PRECISION", "fp32")
    from convlad.study.datasets import load_groups
    from convlad.study.evaluate import query_aps
    from convlad.verify import LocalCodes, Verifier, chance_level

    bench = load_groups(SHARED / "mvbench-dev")
    z = encode(Path(a.cache))
    chance = int(z["chance"])
    v = Verifier(chance=chance)

    def codes(name, k=None, scale=None):
        pre = name if scale is None else f"{name}{scale}"
        c = LocalCodes(z[f"{pre}_local-codes"][:, :k], z[f"{pre}_local-cells"][:, :k].copy(),
                       z[f"{pre}_local-count"].astype(np.uint16))
        if k is not None:
            c.count = np.minimum(c.count, k).astype(np.uint16)
        if scale == 1:  # a scale-1 cell covers 2 × 2 of the scale-2 grid
            c.cells = (c.cells.astype(np.int32) * 2).astype(np.uint8)
        return c

    dev, train, views = codes("dev"), codes("train"), codes("views")
    area = 28.0 * 28.0
    Xd, Xt, Xv = z["dev_X"], z["train_X"], z["views_X"]
    qs, junk = bench.query_db, [sorted(j) for j in bench.junk]
    ids, cos = [], []
    for q, d in enumerate(qs):
        s = Xd @ Xd[d]
        o = np.argsort(-s, kind="stable")
        o = o[~np.isin(o, junk[q])]
        ids.append(o)
        cos.append(s[o][:D])
    ids, cos = np.array(ids), np.array(cos)

    def aps_of(score):  # (queries, D) scores of each query's global top D → per-query APs
        order = np.argsort(-score, axis=1, kind="stable")
        return query_aps(bench, [np.concatenate([junk[q], ids[q][:D][order[q]], ids[q][D:]]).astype(np.int64)
                                 for q in range(len(qs))])

    def bonus(inliers, level=chance, per=10.0, cap=4.0):
        return np.minimum(np.maximum(inliers - level, 0) / per, cap)

    Fd = np.stack([pair_features(v, dev.features(d), dev[ids[q][:D]], area) for q, d in enumerate(qs)])
    base, glob = aps_of(cos + bonus(Fd[..., 0])), aps_of(cos)
    print(f"default: global {glob.mean():.4f}, re-ranked {base.mean():.4f}", flush=True)
    R: dict[str, dict[str, np.ndarray]] = {}
    out = {"default": {"global": float(glob.mean()), "reranked": float(base.mean()), "chance": chance}}

    # -- a logistic verification score, fitted on training photos and their synthetic views
    S = Xt @ Xt.T
    np.fill_diagonal(S, -np.inf)
    nb = np.argsort(-S, 1)[:, :NN]
    Fn = np.concatenate([pair_features(v, train.features(i), train[nb[i]], area) for i in range(len(Xt))])
    Fp = np.concatenate([np.r_[pair_features(v, train.features(i), views[[2 * i, 2 * i + 1]], area),
                               pair_features(v, views.features(2 * i), views[[2 * i + 1]], area)]
                         for i in range(len(Xt))])
    cn = np.take_along_axis(S, nb, 1).ravel()
    cp = np.concatenate([[Xt[i] @ Xv[2 * i], Xt[i] @ Xv[2 * i + 1], Xv[2 * i] @ Xv[2 * i + 1]] for i in range(len(Xt))])
    F, y = np.r_[np.c_[Fp, cp], np.c_[Fn, cn]], np.r_[np.ones(len(Fp)), np.zeros(len(Fn))]
    w = np.where(y == 1, len(Fn) / len(Fp), 1.0)  # the two classes weigh the same
    Gd = np.concatenate([Fd, cos[..., None]], 2).reshape(-1, F.shape[1])
    lab = np.array([[i in bench.positives[q] for i in ids[q][:D]] for q in range(len(qs))])
    verified = Fd[..., 0] > 0
    fam, report = R.setdefault("logistic", {}), {"pairs": {"matches": len(Fp), "non_matches": len(Fn)},
                                                  "auc_dev": {"inliers": auc(Fd[..., 0], lab)}, "coefficients": {}}
    per_inlier = fit_logistic(F[:, [0]], y, w)[1][1]  # the log-odds one inlier adds, inliers alone
    for name, cols in (("inliers", [0]), ("inliers, tentative", [0, 1]), ("all 8", list(range(8)))):
        logit, coef = fit_logistic(F[:, cols], y, w)
        L = logit(Gd[:, cols]).reshape(cos.shape)
        P = np.where(verified, 1 / (1 + np.exp(-L)), 0)
        fam[f"{name}: cos + 4P"] = aps_of(cos + 4 * P)
        # the log-odds above even, in inliers
        fam[f"{name}: cos + log-odds in inliers"] = aps_of(cos + bonus(np.where(verified, np.maximum(L, 0), 0)
                                                                       / per_inlier, level=0))
        logit_c, coef_c = fit_logistic(F[:, cols + [8]], y, w)
        Lc = logit_c(Gd[:, cols + [8]]).reshape(cos.shape)
        fam[f"{name} + cosine: log-odds"] = aps_of(Lc)
        report["auc_dev"][name] = auc(np.where(verified, L, -50), lab)
        report["auc_dev"][f"{name} + cosine"] = auc(Lc, lab)
        report["coefficients"][name] = dict(zip(["intercept"] + [FEATURES[c] for c in cols], np.round(coef, 4).tolist()))
    out["logistic"] = report
    print("logistic done", flush=True)

    # -- which local features are verified
    fam = R.setdefault("features", {})
    out["features"] = {}
    for k2, k1 in ((300, 0), (500, 0), (784, 0), (300, 100), (300, 196), (500, 196)):
        def layout(name):
            a_ = codes(name, k2, 2)
            if not k1:
                return a_
            b_ = codes(name, k1, 1)
            return LocalCodes(np.concatenate([a_.codes, b_.codes], 1), np.concatenate([a_.cells, b_.cells], 1),
                              (a_.count + b_.count).astype(np.uint16))
        ch = chance_level(layout("train"))
        vk, dk = Verifier(chance=ch), layout("dev")
        E = np.stack([vk.evidence(dk.features(d), dk[ids[q][:D]]).inliers for q, d in enumerate(qs)])
        fam[f"{k2} at scale 2 + {k1} at scale 1"] = aps_of(cos + bonus(E, ch))
        out["features"][f"{k2}+{k1}"] = {"chance": ch}
    print("features done", flush=True)

    # -- Lowe's ratio test, outside the match's own neighbourhood
    fam = R.setdefault("ratio", {})
    out["ratio"] = {}
    for r in (0.8, 0.9, 0.95):
        ch = chance_level(train, verifier=ratio_verifier(r))
        vr = ratio_verifier(r, chance=ch)
        E = np.stack([vr.evidence(dev.features(d), dev[ids[q][:D]]).inliers for q, d in enumerate(qs)])
        fam[f"r = {r:g}"] = aps_of(cos + bonus(E, ch))
        out["ratio"][f"{r:g}"] = {"chance": ch}
    print("ratio done", flush=True)

    # -- diagnostic: what unrelated photos reach against their nearest
    Mn = Fn[:, 0].reshape(len(Xt), NN)
    out["chance"] = {"far_pairs_level": chance, "by_rank": {
        str(r + 1): {"p99": float(np.percentile(Mn[:, r], 99)), "above_level": float((Mn[:, r] > chance).mean())}
        for r in (0, 1, 4, 9, 19)}, "all_20": {"p99": float(np.percentile(Mn, 99)),
                                              "above_level": float((Mn > chance).mean())},
        "synthetic_matches_above_level": float((Fp[:, 0] > chance).mean()), "dev_mAP_at_level": {}}
    ev = Verifier(chance=chance, min_tentative=4)
    Ed = [ev.evidence(dev.features(d), dev[ids[q][:D]]) for q, d in enumerate(qs)]
    for lvl in (6, 7, 8, 9, 10, 12, 14):
        E = np.stack([np.where(e.tentative > 2 * lvl, e.inliers, 0) for e in Ed])
        out["chance"]["dev_mAP_at_level"][str(lvl)] = float(aps_of(cos + bonus(E, lvl)).mean())

    out["families"] = judge(R, lambda name: base, bench)
    print("\npair-level AUC on dev's shortlists:", {k: round(x, 4) for k, x in out["logistic"]["auc_dev"].items()})
    print("unrelated training photos against their nearest:", json.dumps(out["chance"]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1, default=float))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
