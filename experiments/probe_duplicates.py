"""Where a duplicate ends and another view begins (issue 35: ``groups.DUPLICATE_LOG_SCALE``): in the
global descriptor's cosine, and in the scale of the verified affine map.

Photos no convlad choice was tuned on (mvbench-train), each made into copies that are the same photo
(re-encoded as JPEG at quality 40, resized to half, cropped by 5% on every side, re-saved without
its metadata) and into other views of it (``convlad.study.synviews.view``: a crop of 35-80%, turned,
warped, relit). The descriptor's model is fitted on mvbench-dev, as the synthetic views' benchmark
is measured. Printed: the cosine of each kind of copy with its photo (min, 1st percentile, median),
of each view, and of each photo's nearest unrelated photo; then each copy's verification with its
photo: inliers and how far the affine map's scales are from 1 (|log| of its singular values). The
cosines overlap; the scales do not, and the level is chosen midway between them. Beside it, the
perceptual hash people find duplicates with (``imagehash``'s pHash, at its best Hamming distance on
these very copies): which copies each marks as the same photo twice.

    python experiments/probe_duplicates.py [--photos 120] [--out docs/results/probe-duplicates.json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def copies(path: Path, folder: Path, rng) -> dict[str, Path]:
    """The same photo four ways, and two other views of it."""
    import cv2
    from PIL import Image

    from convlad.study.synviews import view

    out = {}
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        for kind, made in (("jpeg q40", im), ("half size", im.resize((max(1, w // 2), max(1, h // 2)), Image.LANCZOS)),
                           ("crop 5%", im.crop((w // 20, h // 20, w - w // 20, h - h // 20))), ("no metadata", im)):
            p = folder / f"{path.stem}-{kind.replace(' ', '_').replace('%', '')}.jpg"
            buf = io.BytesIO()
            made.save(buf, format="JPEG", quality=40 if kind == "jpeg q40" else 92)
            p.write_bytes(buf.getvalue())
            out[kind] = p
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    # a near view at the same scale: the camera panned by a tenth of the frame (not the same photo)
    dx, dy = w // 10, h // 10
    pan = img[dy:, dx:] if rng.random() < 0.5 else img[:h - dy, :w - dx]
    p = folder / f"{path.stem}-pan.jpg"
    cv2.imwrite(str(p), pan, [cv2.IMWRITE_JPEG_QUALITY, 90])
    out["pan 10%"] = p
    for j in range(2):
        p = folder / f"{path.stem}-view{j}.jpg"
        cv2.imwrite(str(p), view(img, rng), [cv2.IMWRITE_JPEG_QUALITY, 90])
        out[f"view {j}"] = p
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=120)
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "probe-duplicates.json"))
    a = ap.parse_args()
    os.environ.setdefault("CONVLAD_PRECISION", "fp32")
    from convlad.images import list_images
    from convlad.pipeline import ConvVLAD
    from convlad.study.evalcache import EvalCache

    dev = SHARED / "mvbench-dev" / "images"
    train = SHARED / "mvbench-train" / "images"
    model = ConvVLAD()
    EvalCache().fit(model, [str(dev / p) for p in list_images(dev)])
    rng = np.random.default_rng(0)
    all_train = [train / p for p in list_images(train)]
    photos = [all_train[i] for i in sorted(rng.choice(len(all_train), a.photos, replace=False))]
    with tempfile.TemporaryDirectory() as tmp:
        made = [copies(p, Path(tmp), rng) for p in photos]
        kinds = list(made[0])
        items = [str(p) for p in photos] + [str(m[k]) for m in made for k in kinds]
        enc = model.transform(items, progress=True, local=300)
        hashes = phashes(items)  # the duplicates finder people use, beside the verified map
    assert not enc.errors, enc.errors
    X = enc.X
    n = len(photos)
    base = X[:n]
    rest = X[n:].reshape(n, len(kinds), -1)
    cos = {k: (rest[:, j] * base).sum(1) for j, k in enumerate(kinds)}
    others = ("view", "pan")
    views = np.concatenate([cos[k] for k in kinds if k.startswith(others)])
    S = base @ base.T
    np.fill_diagonal(S, -np.inf)
    unrelated = S.max(1)
    dups = np.concatenate([cos[k] for k in kinds if not k.startswith(others)])
    # the verification of each copy with its photo: inliers, and how far its affine map is from the
    # identity (the largest singular value's and the smallest's distance from 1, the shift in cells)
    v = model.verifier()
    geo = {}
    for j, k in enumerate(kinds):
        rows = []
        for i in range(n):
            m = v.match(enc.local.features(n + i * len(kinds) + j), enc.local[[i]])
            if m.affine is None:
                rows.append((m.n_inliers, np.inf, np.inf))
                continue
            s = np.linalg.svd(np.asarray(m.affine)[:, :2], compute_uv=False)
            rows.append((m.n_inliers, float(np.abs(np.log(s)).max()), float(np.linalg.norm(np.asarray(m.affine)[:, 2]))))
        geo[k] = np.array(rows)
    level = float((dups.min() + views.max()) / 2)
    rows = {**{k: cos[k] for k in kinds if not k.startswith(others)}, "other views (pan, views)": views,
            "nearest unrelated": unrelated}
    print(f"{'kind':<20}{'min':>8}{'p1':>8}{'median':>8}{'max':>8}")
    for k, c in rows.items():
        print(f"{k:<20}{c.min():>8.4f}{np.percentile(c, 1):>8.4f}{np.median(c):>8.4f}{c.max():>8.4f}")
    print(f"\n{'kind':<20}{'inliers min':>12}{'p1':>6}{'p10':>6}{'median':>8}{'max':>6}{'|log scale| min':>17}"
          f"{'max':>8}{'shift min':>10}{'max':>8}")
    for k, g in geo.items():
        fin = np.isfinite(g[:, 1])
        print(f"{k:<20}{g[:, 0].min():>12.0f}{np.percentile(g[:, 0], 1):>6.0f}{np.percentile(g[:, 0], 10):>6.0f}"
              f"{np.median(g[:, 0]):>8.0f}{g[:, 0].max():>6.0f}{g[fin, 1].min():>17.3f}{g[fin, 1].max():>8.3f}"
              f"{g[fin, 2].min():>10.2f}{g[fin, 2].max():>8.2f}")
    dup_scale = np.concatenate([geo[k][:, 1] for k in kinds if not k.startswith(others)])
    view_scale = np.concatenate([geo[k][:, 1] for k in kinds if k.startswith("view")])
    print(f"|log scale| of the affine map: duplicates at most {dup_scale.max():.3f}, views at least "
          f"{view_scale.min():.3f}: level midway {(dup_scale.max() + view_scale.min()) / 2:.3f}")
    print(f"lowest duplicate {dups.min():.4f}, highest view {views.max():.4f}: level midway {level:.4f}")
    # the same decision by the groups' rule (``groups.is_duplicate``) and by pHash at its best
    # Hamming distance, over the same copies: what each marks as the same photo twice
    from convlad.groups import is_duplicate

    same = [k for k in kinds if k in ("jpeg q40", "half size", "no metadata")]
    ham = {k: np.array([int((hashes[i] ^ hashes[n + i * len(kinds) + j]).sum()) for i in range(n)])
           for j, k in enumerate(kinds)}
    marked = {k: np.array([is_duplicate(v.match(enc.local.features(n + i * len(kinds) + j), enc.local[[i]]), v.sure,
                                        int(min(enc.local.count[i], enc.local.count[n + i * len(kinds) + j])))
                           for i in range(n)]) for j, k in enumerate(kinds)}
    best = max(range(0, 33), key=lambda t: _f1(ham, same, lambda d: d <= t))
    print(f"\n{'kind':<20}{'pHash bits apart: min':>22}{'median':>8}{'max':>6}{'  marked by the rule':>20}"
          f"{'  by pHash ≤ ' + str(best):>16}")
    for k in kinds:
        print(f"{k:<20}{ham[k].min():>22}{np.median(ham[k]):>8.0f}{ham[k].max():>6}{marked[k].mean():>20.0%}"
              f"{(ham[k] <= best).mean():>16.0%}")
    rule_f1, hash_f1 = _f1(marked, same, lambda m: m), _f1(ham, same, lambda d: d <= best)
    print(f"telling the same photo (q40, half, stripped) from crops, pans and views: F1 {rule_f1:.3f} by the rule, "
          f"{hash_f1:.3f} by pHash at its best distance ({best} bits, chosen on these copies)")
    doc_extra = {"phash_best_bits": best, "f1_rule": rule_f1, "f1_phash_best": hash_f1,
                 "marked_by_rule": {k: float(marked[k].mean()) for k in kinds},
                 "marked_by_phash": {k: float((ham[k] <= best).mean()) for k in kinds},
                 "phash_bits": {k: {"min": int(ham[k].min()), "median": float(np.median(ham[k])), "max": int(ham[k].max())}
                                for k in kinds}}
    doc = {"photos": n, "model": model.describe(), "cosine_level_midway": level, **doc_extra,
           "log_scale_level_midway": float((dup_scale.max() + view_scale.min()) / 2),
           "geometry": {k: {"inliers_min": float(g[:, 0].min()), "log_scale_max": float(g[:, 1].max()),
                            "log_scale_min": float(g[:, 1].min()), "shift_max": float(g[:, 2].max())}
                        for k, g in geo.items()},
           "kinds": {k: {"min": float(c.min()), "p1": float(np.percentile(c, 1)), "median": float(np.median(c)),
                         "max": float(c.max())} for k, c in rows.items()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    finite = json.loads(json.dumps(doc), parse_constant=lambda c: None)  # no fit: no scale (JSON has no infinity)
    Path(a.out).write_text(json.dumps(finite, indent=1))


def phashes(paths) -> np.ndarray:
    """Each photo's 64-bit pHash (``imagehash``), as (n, 64) bools."""
    import imagehash
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(imagehash.phash(im).hash.ravel())
    return np.array(out)


def _f1(values: dict, same: list, says) -> float:
    """F1 of ``says(value)`` as "the same photo twice" over every kind's copies (``same`` the kinds
    that are)."""
    tp = sum(int(says(values[k]).sum()) for k in same)
    fp = sum(int(says(values[k]).sum()) for k in values if k not in same)
    fn = sum(int((~says(values[k])).sum()) for k in same)
    return 2 * tp / max(1, 2 * tp + fp + fn)


if __name__ == "__main__":
    main()
