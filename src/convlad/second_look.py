"""A second look for the photos the groups leave alone: affine-simulated SIFT (ASIFT, Morel & Yu
2009, as OpenCV's ``AffineFeature`` makes it) between a photo and its nearest by global descriptor.

The pairs the conv layer's features miss (extreme viewpoints, a face of a building seen at a
grazing angle) verify with 0-14 inliers there, where unrelated neighbours also reach; synthesised
tilts of the conv features did not lift them (docs/defaults.md, "More kinds of evidence"). ASIFT
sees each photo again under simulated tilts (up to 4×) and turns, runs SIFT on each simulated
view and brings the points back to the photo's frame. Descriptors are RootSIFT; a match is a mutual
nearest neighbour that passes Lowe's ratio test (0.8); a pair's evidence is the number of distinct
point pairs (``GRID`` px apart) that one homography fits (OpenCV's MAGSAC, ``PX`` px).

It costs 1-2 s a photo and about a second a pair on 2 cores (4.5 s a lonely photo on mvbench-dev,
a hundred times the CNN's pass), so an index looks again only where the groups need it: at a
photo added without a sure pair, against its ``NEIGHBOURS`` nearest (``IndexStore.create(
second_look=True)``); the groups join a photo alone through its best pair from ``LEVEL`` inliers (``groups.Rule.look``), unless its inliers are an overlay's
(``is_overlay``: a watermark or logo pasted on unrelated photos). Unrelated photos reach 8 (99th
percentile of mvbench-train's photos against their nearest) and once 37, through a shared
watermark (docs/defaults.md, "A second look with ASIFT"; ``experiments/probe_second_look.py``).

    >>> a, b = features(load_gray("a.jpg")), features(load_gray("b.jpg"))
    >>> inliers(a, b)                                    # distinct point pairs one homography fits
"""
from __future__ import annotations

import numpy as np

# A lonely photo's nearest looked at again, and the inliers from which a photo alone joins through
# a second look: chosen by group-wise K-fold on mvbench-dev with the groups' rule (``convlad eval
# --groups --second-look``) among 2 or 5 and 10-30: 5 in 12 of 15 folds, 15 in 10 of 15 (10 in the
# others). Unrelated photos reach 12 there (two ScanNet rooms) and 8 among mvbench-train's
# (99th percentile); docs/defaults.md, "A second look with ASIFT".
NEIGHBOURS = 5
LEVEL = 15
MAX_SIDE = 640  # the photo's longer side as it is looked at (mvbench-dev's photos, as probed)
TILTS, PER_VIEW = 5, 800  # OpenCV's maxTilt (tilts up to 2**2 = 4×) and SIFT points per simulated view
RATIO, PX, GRID = 0.8, 4.0, 2.0
# An overlay (a watermark, a logo, a caption) is pasted flat and upright on unrelated photos: its
# inliers cover a small patch of each frame, mapped by a similarity without a turn. A scene seen
# from elsewhere is turned or distorted. On 120 pairs of unrelated training photos given one text
# overlay each, 13 reached 12 inliers or more: all under a quarter of each frame, with 89% or more of
# their inliers on an upright similarity turned 0.64° at most; so did the real watermark (38,
# "Wild Singapore"). Of the 13 true pairs of mvbench-dev a second look verifies from 10, one looks
# so (wxbs kremlin, taken from nearly one place: 0.64°), which the links already join; the nearest
# others turn 2.3° (a sign, wxbs zanky) or cover half the frame or more (ScanNet frames)
# (``experiments/probe_overlay_guard.py``, docs/defaults.md "A second look with ASIFT").
OVERLAY_AREA, OVERLAY_TURN_DEG, OVERLAY_SIMILAR = 0.25, 1.5, 0.8


def load_gray(path, max_side: int = MAX_SIDE) -> np.ndarray:
    """A photo as ASIFT reads it: grey (uint8), upright by its EXIF orientation, its longer side at
    most ``max_side``. Raises ``images.ImageError`` with one line naming the file."""
    from PIL import Image

    from .images import load_image

    im = load_image(path).convert("L")
    if max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BILINEAR)
    return np.asarray(im, np.uint8)


def features(gray: np.ndarray, tilts: int = TILTS, per_view: int = PER_VIEW) -> tuple[np.ndarray, np.ndarray]:
    """ASIFT points ((n, 2) float32, the photo's pixels) and RootSIFT descriptors ((n, 128) float32)
    of a grey photo (``load_gray``)."""
    import cv2

    kp, des = cv2.AffineFeature_create(cv2.SIFT_create(nfeatures=per_view), maxTilt=tilts).detectAndCompute(gray, None)
    if des is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
    des = np.sqrt(des / (des.sum(1, keepdims=True) + 1e-7)).astype(np.float32)  # RootSIFT
    return np.float32([p.pt for p in kp]).reshape(-1, 2), des


def matches(d1: np.ndarray, d2: np.ndarray, ratio: float = RATIO) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours of descriptors ``d1`` (n, 128) and ``d2`` (m, 128) that pass the
    ratio test from ``d1``'s side: (rows of d1, rows of d2). By faiss's blocked search: one product
    in torch took as long on 2 cores (1.7 s for 27 000 by 25 000 points), and its top-2 and the
    columns' best a second more; bf16 was no faster."""
    import faiss

    if len(d1) < 2 or len(d2) < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    D, I = faiss.knn(d1, d2, 2)
    _, back = faiss.knn(d2, d1, 1)
    d = np.sqrt(np.maximum(D, 0))
    q = np.flatnonzero((d[:, 0] < ratio * d[:, 1]) & (I[:, 0] >= 0) & (back[np.maximum(I[:, 0], 0), 0] == np.arange(len(d1))))
    return q, I[q, 0]


def inliers(a, b, ratio: float = RATIO, px: float = PX) -> int:
    """The distinct point pairs (``GRID`` px apart) of ``matches`` between ``features`` ``a`` and
    ``b`` that one homography fits (MAGSAC, ``px``)."""
    return len(inlier_points(a, b, ratio, px)[0])


def inlier_points(a, b, ratio: float = RATIO, px: float = PX) -> tuple[np.ndarray, np.ndarray]:
    """The places of ``inliers``: (points in a's photo (k, 2), their matches in b's (k, 2)), one
    per distinct pair of places."""
    import cv2

    none = np.zeros((0, 2), np.float32)
    (p1, d1), (p2, d2) = a, b
    q, r = matches(d1, d2, ratio)
    if len(q) < 4:
        return none, none
    x, y = p1[q], p2[r]
    _, mask = cv2.findHomography(x, y, cv2.USAC_MAGSAC, px, maxIters=10000, confidence=0.999)
    if mask is None:
        return none, none
    m = mask.ravel().astype(bool)
    # ASIFT finds one point again in several simulated views: each pair of places counts once
    _, first = np.unique(np.round(np.c_[x[m], y[m]] / GRID).astype(np.int64), axis=0, return_index=True)
    return x[m][first], y[m][first]


def is_overlay(x: np.ndarray, y: np.ndarray, size_a: tuple[int, int], size_b: tuple[int, int]) -> bool:
    """Whether inliers at ``x`` in one photo ((k, 2), its frame ``size_a`` (w, h)) and ``y`` in the
    other are an overlay's: their convex hull under ``OVERLAY_AREA`` of each frame, and
    ``OVERLAY_SIMILAR`` of them on one similarity (RANSAC, ``PX``) turned under
    ``OVERLAY_TURN_DEG``."""
    import cv2

    if len(x) < 3:
        return False
    for p, (w, h) in ((x, size_a), (y, size_b)):
        if cv2.contourArea(cv2.convexHull(np.float32(p))) >= OVERLAY_AREA * w * h:
            return False
    M, ok = cv2.estimateAffinePartial2D(np.float32(x), np.float32(y), method=cv2.RANSAC, ransacReprojThreshold=PX)
    if M is None:
        return False
    return bool(ok.mean() >= OVERLAY_SIMILAR and abs(np.degrees(np.arctan2(M[1, 0], M[0, 0]))) < OVERLAY_TURN_DEG)


def look(photos, neighbours, path_of, progress=None, each=None) -> tuple[np.ndarray, np.ndarray]:
    """The ``inliers`` of each of ``photos`` (n,) ids with each of its ``neighbours`` (n, width) ids,
    -1 padded, and whether they are an overlay's (``is_overlay``): ((n, width) int16, -1 where
    there is no neighbour or either photo cannot be read (an index of descriptors made elsewhere, a
    file moved away); (n, width) bool). ``path_of(ids)``: their files; ``each(row, column, inliers,
    overlay)``: called as each pair is done (to keep what is done so far). Each photo's features
    are made once per call and dropped when no pair left needs them (15 000 points of 128 floats:
    8 MB a photo)."""
    from .images import ImageError

    photos = np.asarray(photos, np.int64).ravel()
    neighbours = np.asarray(neighbours, np.int64).reshape(len(photos), -1)
    out = np.full(neighbours.shape, -1, np.int16)
    overlay = np.zeros(neighbours.shape, bool)
    need: dict[int, int] = {}
    for i, row in zip(photos.tolist(), neighbours.tolist()):
        for j in row:
            if j >= 0:
                need[i] = need.get(i, 0) + 1
                need[j] = need.get(j, 0) + 1
    paths = dict(zip(need, path_of(list(need)))) if need else {}
    made: dict[int, tuple | None] = {}

    def of(i):
        if i not in made:
            try:
                g = load_gray(paths[i])
                made[i] = (*features(g), g.shape[::-1])
            except (ImageError, OSError):
                made[i] = None
        return made[i]

    for r, (i, row) in enumerate(zip(photos.tolist(), neighbours.tolist())):
        for c, j in enumerate(row):
            if j < 0:
                continue
            a, b = of(i), of(j)
            if a is not None and b is not None:
                x, y = inlier_points(a[:2], b[:2])
                out[r, c] = min(len(x), np.iinfo(np.int16).max)
                overlay[r, c] = is_overlay(x, y, a[2], b[2])
            if each is not None:
                each(r, c, int(out[r, c]), bool(overlay[r, c]))
            for k in (i, j):
                need[k] -= 1
                if not need[k]:
                    made.pop(k, None)
        if progress is not None:
            progress.update(1)
    return out, overlay


__all__ = ["GRID", "LEVEL", "MAX_SIDE", "NEIGHBOURS", "PER_VIEW", "PX", "RATIO", "TILTS", "features", "inliers",
           "inlier_points", "is_overlay", "load_gray", "look", "matches", "OVERLAY_AREA", "OVERLAY_SIMILAR", "OVERLAY_TURN_DEG"]
