"""A second benchmark, built from photos no convlad choice was tuned on: each of N mvbench-train
photos becomes a group of itself and two synthetic views (a random crop of 35-80% of each side,
rotated up to ±25°, a perspective jitter, a gamma change, JPEG at quality 70); the remaining
training photos are distractors. The layout is mvbench's (`groups`), so `convlad eval` reads it:

    python -m convlad.study.synviews /tmp/synviews --photos ../shared/data/mvbench-train/images
    convlad eval /tmp/synviews --train ../shared/data/mvbench-dev --aps syn.json

``view`` (``convlad.views.view``) is the warp, for tests and experiments that make views of their own.

Learn the vocabulary elsewhere (here on mvbench-dev): the benchmark's photos are mvbench-train's.
Synthetic views are easier than real ones in lighting and harder in cropping; the set is a check
that a gain measured on mvbench-dev is not specific to it, not a replacement for a real benchmark.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from ..views import view

TRAIN = Path("../shared/data/mvbench-train/images")  # from the repository's root


def make(out: Path, photos: Path = TRAIN, groups: int = 200, seed: int = 0) -> tuple[dict, list]:
    """Write the benchmark to ``out`` from the photos of folder ``photos``: ``groups`` groups of a photo
    and two views, the rest distractors. Returns (groups.json's dict, distractors.json's list)."""
    rng = np.random.default_rng(seed)
    files = sorted(p for p in Path(photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    order = rng.permutation(len(files))
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "distractors").mkdir(exist_ok=True)
    made, distractors = {}, []
    for n, i in enumerate(order):
        img = cv2.imread(str(files[i]), cv2.IMREAD_COLOR)
        if img is None:
            continue
        if n >= groups:
            distractors.append(f"{files[i].stem}.jpg")
            cv2.imwrite(str(out / "distractors" / distractors[-1]), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            continue
        name = files[i].stem
        made[name] = []
        for j, im in enumerate([img, view(img, rng), view(img, rng)]):
            made[name].append(f"{name}_{j:02d}.jpg")
            cv2.imwrite(str(out / "images" / made[name][-1]), im, [cv2.IMWRITE_JPEG_QUALITY, 95 if j == 0 else 70])
    (out / "groups.json").write_text(json.dumps(made, indent=1))
    (out / "distractors.json").write_text(json.dumps(distractors, indent=1))
    return made, distractors


def main():
    ap = argparse.ArgumentParser(prog="python -m convlad.study.synviews", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--photos", type=Path, default=TRAIN)
    ap.add_argument("--groups", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not a.photos.is_dir():
        ap.error(f"{a.photos}: no such folder of photos (--photos)")
    groups, distractors = make(a.out, a.photos, a.groups, a.seed)
    print(f"{a.out}: {len(groups)} groups of 3, {len(distractors)} distractors")


__all__ = ["make", "view"]

if __name__ == "__main__":
    main()
