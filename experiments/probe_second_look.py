"""A second look for the photos the groups leave alone: affine-simulated SIFT (ASIFT, Morel & Yu
2009, as OpenCV's ``AffineFeature`` makes it) between each photo without a sure pair and its nearest
by global descriptor, judged out of fold as ``eval --groups`` judges its rules.

The pairs the groups still miss on mvbench-dev (extreme viewpoints, day and night, Tower Bridge from
the river) verify with 0-14 inliers from the conv layer's features, where unrelated neighbours also
reach; synthesised tilts of the conv features did not lift them (docs/defaults.md, "More kinds of
evidence"). ASIFT is the classical answer to extreme viewpoints: each photo is seen again under
simulated tilts (up to 4×) and turns, SIFT runs on each simulated view, and the points come back to
the photo's frame. Here its descriptors are RootSIFT, a match is a mutual nearest neighbour that
passes Lowe's ratio test (0.8), and a pair's evidence is the number of distinct point pairs (2 px
apart) a homography fits (OpenCV's MAGSAC, 4 px).

What unrelated photos reach is measured first, on the training photos (no two show one place), each
against its ``--train-neighbours`` nearest by the model's global descriptor. Then, on the benchmark,
each photo with no sure pair is verified against its ``--neighbours`` nearest. A photo the groups'
rule leaves alone joins the photo it verifies best with, where that reaches a level; the level
(or no second look) is chosen with the rule by group-wise K-fold (5 folds, 3 deals), and both
are scored on the held fold as ``eval --groups`` scores them.

    python experiments/probe_second_look.py                       # mvbench-dev, Lite0
    python experiments/probe_second_look.py --out docs/results/probe-second-look.json
    python experiments/probe_second_look.py --backbone efficientnet-lite2 --keep /tmp/asift \
        --out docs/results/probe-second-look-lite2.json

``--keep DIR`` keeps each photo's ASIFT features for later runs. Its timings then count reads, not
extraction: the cost figures in docs/defaults.md come from a run without it.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_local_whitening import fitted, load, parser  # noqa: E402

LEVELS = (12, 15, 18, 20, 25, 30)


def features(path: str, tilts: int = 5, per_view: int = 800) -> tuple[np.ndarray, np.ndarray]:
    """ASIFT points ((n, 2), the photo's pixels) and RootSIFT descriptors ((n, 128) float32) of
    ``path``: tilts up to 2**(``tilts``/2 - 1/2) as OpenCV samples them, ``per_view`` points a view."""
    import cv2

    img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError(f"{path}: not an image OpenCV reads")
    kp, des = cv2.AffineFeature_create(cv2.SIFT_create(nfeatures=per_view), maxTilt=tilts).detectAndCompute(img, None)
    if des is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
    des = np.sqrt(des / (des.sum(1, keepdims=True) + 1e-7)).astype(np.float32)  # RootSIFT
    return np.float32([p.pt for p in kp]).reshape(-1, 2), des


def inliers(a, b, ratio: float = 0.8, px: float = 4.0) -> int:
    """The distinct point pairs (2 px apart) of mutual nearest RootSIFT matches, passing the ratio
    test, that one homography fits, between ``features`` ``a`` and ``b``."""
    import cv2
    import faiss

    (p1, d1), (p2, d2) = a, b
    if len(d1) < 4 or len(d2) < 4:
        return 0
    D, I = faiss.knn(d1, d2, 2)
    _, back = faiss.knn(d2, d1, 1)
    d = np.sqrt(np.maximum(D, 0))
    q = np.flatnonzero((d[:, 0] < ratio * d[:, 1]) & (back[I[:, 0], 0] == np.arange(len(d1))))
    if len(q) < 4:
        return 0
    x, y = p1[q], p2[I[q, 0]]
    _, mask = cv2.findHomography(x, y, cv2.USAC_MAGSAC, px, maxIters=10000, confidence=0.999)
    if mask is None:
        return 0
    m = mask.ravel().astype(bool)
    # ASIFT finds one point again in several simulated views: count each pair of places once
    return len(np.unique(np.round(np.c_[x[m], y[m]] / 2).astype(np.int64), axis=0))


class Looks:
    """Each photo's ASIFT features, made once (and kept in ``keep``, a folder, where given), and the
    inliers of the pairs asked for."""

    def __init__(self, paths, keep: str | None = None):
        self.paths, self.f, self.extract_s, self.match_s, self.matched = list(paths), {}, 0.0, 0.0, 0
        self.keep = Path(keep) if keep else None

    def _features(self, path: str):
        if self.keep is None:
            return features(path)
        f = self.keep / (hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest() + ".npz")
        if f.exists():
            with np.load(f) as z:
                return z["points"], z["descriptors"]
        got = features(path)
        self.keep.mkdir(parents=True, exist_ok=True)
        np.savez(f, points=got[0], descriptors=got[1])
        return got

    def __call__(self, i: int, j: int) -> int:
        for k in (i, j):
            if k not in self.f:
                t = time.perf_counter()
                self.f[k] = self._features(self.paths[k])
                self.extract_s += time.perf_counter() - t
        t = time.perf_counter()
        r = inliers(self.f[i], self.f[j])
        self.match_s += time.perf_counter() - t
        self.matched += 1
        if self.matched % 100 == 0:
            print(f"  {self.matched} pairs, {len(self.f)} photos: {self.extract_s:.0f} s extracting, "
                  f"{self.match_s:.0f} s matching", flush=True)
        return r


def neighbour_pairs(X, rows, m: int) -> np.ndarray:
    """(i, j) with j among each of ``rows``' ``m`` nearest in ``X``, each unordered pair once."""
    from convlad.pairs import nearest

    _, nn = nearest(X, m)
    P = np.array([(i, j) for i in rows for j in nn[i] if j >= 0], np.int64).reshape(-1, 2)
    return np.unique(np.sort(P, axis=1), axis=0)


def second_look(labels: np.ndarray, pairs: np.ndarray, inl: np.ndarray, level: int) -> np.ndarray:
    """``labels`` with each photo left alone joined to the photo it verifies best with (of
    ``pairs``, their ``inl``), where that reaches ``level``."""
    from convlad.groups import labels as components

    alone = np.bincount(labels)[labels] == 1
    best: dict[int, tuple[int, int]] = {}
    for (i, j), w in zip(pairs.tolist(), inl.tolist()):
        if w < level:
            continue
        for x, y in ((i, j), (j, i)):
            if alone[x] and w > best.get(x, (-1, -1))[0]:
                best[x] = (w, y)
    if not best:
        return labels
    _, first = np.unique(labels, return_index=True)
    kept = np.stack([np.arange(len(labels)), first[labels]], 1)  # each photo to its group's first
    extra = np.array([(x, y) for x, (_, y) in best.items()], np.int64).reshape(-1, 2)
    return components(len(labels), np.concatenate([kept, extra]))


def main():
    ap = parser()
    ap.add_argument("--neighbours", type=int, default=2, help="a lonely photo's nearest to verify")
    ap.add_argument("--train-neighbours", type=int, default=1)
    ap.add_argument("--keep", default=None, help="a folder to keep each photo's ASIFT features in, for other runs")
    a = ap.parse_args()
    bench, train, truth, cache = load(a)
    from convlad.pairs import mine
    from convlad.pipeline import Config
    from convlad.study.folds import group_folds
    from convlad.study.grouping import bootstrap, cross_validate, rule_candidates

    model, enc = fitted(Config(backbone=a.backbone), train, bench, cache)
    report = {"backbone": a.backbone, "neighbours": a.neighbours}

    # what unrelated photos reach: the training photos against their nearest
    tX = model.transform(train, progress=False).X
    tp = neighbour_pairs(tX, range(len(train)), a.train_neighbours)
    look = Looks(train, a.keep)
    tw = np.array([look(i, j) for i, j in tp])
    report["training"] = {"pairs": len(tp), "percentiles_50_90_99_100": np.percentile(tw, [50, 90, 99, 100]).tolist(),
                          "at_or_above": {lv: int((tw >= lv).sum()) for lv in LEVELS},
                          "from_12": [[Path(train[i]).name, Path(train[j]).name, int(x)]
                                      for (i, j), x in zip(tp.tolist(), tw.tolist()) if x >= LEVELS[0]],
                          "extract_s_per_photo": look.extract_s / max(len(look.f), 1),
                          "match_s_per_pair": look.match_s / max(look.matched, 1)}
    print("training", report["training"], flush=True)

    v = model.pair_verifier()
    E, w = mine(enc.X, enc.local, v, False, edges=True, stored=model.local_codec_.stored(enc.local))
    cands = rule_candidates(E, w, enc.X, v.sure, v.chance)
    sure_ends = np.unique(E[w >= v.sure])
    lonely = np.setdiff1d(np.arange(len(enc.X)), sure_ends)
    pairs = neighbour_pairs(enc.X, lonely, a.neighbours)
    look = Looks([str(p) for p in bench.paths], a.keep)
    t0 = time.perf_counter()
    inl = np.array([look(i, j) for i, j in pairs])
    same = truth[pairs[:, 0]] == truth[pairs[:, 1]]
    report["benchmark"] = {"lonely": len(lonely), "pairs": len(pairs), "seconds": time.perf_counter() - t0,
                           "photos_extracted": len(look.f),
                           "true_pairs_at_or_above": {lv: int((inl[same] >= lv).sum()) for lv in LEVELS},
                           "true_pairs": int(same.sum()),
                           "true": [[Path(bench.paths[i]).name, Path(bench.paths[j]).name, int(x)]
                                    for (i, j), x in zip(pairs[same].tolist(), inl[same].tolist())],
                           "other_pairs_at_or_above": {lv: int((inl[~same] >= lv).sum()) for lv in LEVELS},
                           "other_percentiles_50_90_99_100": np.percentile(inl[~same], [50, 90, 99, 100]).tolist()}
    print("benchmark", report["benchmark"], flush=True)

    both = dict(cands)
    for name, lab in cands.items():
        for lv in LEVELS:
            both[f"{name} look={lv}"] = second_look(lab, pairs, inl, lv)
    rows = {}
    for fam, cs in (("rules alone", cands), ("rules and a second look", both)):
        rows[fam] = [cross_validate(cs, truth, group_folds(list(truth), 5, s), fam) for s in range(3)]
        print(fam, [{k: round(c.scores[k], 3) for k in ("pairwise_precision", "pairwise_f1", "bcubed_f1")}
                    for c in rows[fam]], [c.chosen for c in rows[fam]], flush=True)
    gain = bootstrap(truth, rows["rules and a second look"][0], rows["rules alone"][0])
    report["out_of_fold"] = {fam: [{"scores": c.scores, "chosen": c.chosen} for c in cs] for fam, cs in rows.items()}
    report["paired_gain_f1_interval"] = gain
    print("paired gain in F1, seed 0:", gain)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
