"""Synthetic views of a photo: a random crop of 35-80% of each side, turned up to ±25°, a
perspective jitter and a gamma change. What the local whitening learns from (``local_whitening``:
a training photo and a view of it show the same surfaces, with no label), and what the synthetic
benchmark is made of (``study.synviews``)."""
from __future__ import annotations

import cv2
import numpy as np


def view(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A synthetic view of ``img`` (h, w, 3) uint8: 640×480 (or 480×640 for a portrait photo)."""
    out = framed(img, rng)
    gamma = rng.uniform(0.6, 1.6)
    return np.clip(255 * (out / 255.0) ** gamma, 0, 255).astype(np.uint8)


def framed(img: np.ndarray, rng: np.random.Generator, narrow: float = 0.0) -> np.ndarray:
    """The framing of a ``view``, before its light: a crop turned and jittered, warped to 640×480
    (or 480×640) uint8. ``narrow`` > 0: one side of the crop up to that share narrower, the plane
    seen from aside (``experiments/probe_whitening_views.py``; the views here have none)."""
    h, w = img.shape[:2]
    sw, sh = rng.uniform(0.35, 0.8, 2)
    cx, cy = rng.uniform(sw / 2, 1 - sw / 2) * w, rng.uniform(sh / 2, 1 - sh / 2) * h
    half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float32) * [sw * w / 2, sh * h / 2]
    if narrow:
        f, side = rng.uniform(0, narrow), rng.integers(4)
        corners, axis = [([0, 1], 0), ([2, 3], 0), ([0, 3], 1), ([1, 2], 1)][side]
        half[corners, axis] *= 1 - f
    a = np.deg2rad(rng.uniform(-25, 25))
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], np.float32)
    src = half @ rot.T + [cx, cy] + rng.normal(0, 0.04, (4, 2)) * [sw * w, sh * h]
    ow, oh = (640, 480) if w >= h else (480, 640)
    dst = np.float32([[0, 0], [ow, 0], [ow, oh], [0, oh]])
    return cv2.warpPerspective(img, cv2.getPerspectiveTransform(src.astype(np.float32), dst), (ow, oh),
                               flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)


__all__ = ["framed", "view"]
