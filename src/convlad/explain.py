"""Why a result matched: the local features behind two descriptors, matched and verified.

Each position of a conv layer's feature map is a local descriptor of the image region around it
(the paper's premise). For a query and a result, the descriptors of the model's VLAD layer at its
largest scale are matched mutually nearest neighbours, and a homography is fitted to the matches
with OpenCV's USAC-MAGSAC; its inliers are the correspondences that agree geometrically. The match
view draws them, coloured by the visual word (the VLAD vocabulary's nearest centroid) of the query
side.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .extract import scale_size
from .images import load_warped
from .verify import tentative_matches


@dataclass
class LocalFeatures:
    xy: np.ndarray  # (n, 2) float32: centre of each feature-map cell, in the original image's pixels
    desc: np.ndarray  # (n, d) float32, L2-normalised
    words: np.ndarray  # (n,) int: nearest visual word, -1 without a vocabulary for the layer
    size: tuple[int, int]  # original width, height
    layer: str
    scale: float


@dataclass
class Matches:
    query: LocalFeatures
    result: LocalFeatures
    pairs: np.ndarray  # (m, 2) int: rows of query.desc, rows of result.desc (mutual nearest neighbours)
    similarity: np.ndarray  # (m,) cosine similarity of each pair
    inliers: np.ndarray  # (m,) bool: consistent with the fitted homography
    homography: np.ndarray | None  # 3×3, query → result pixels; None when no model could be fitted

    @property
    def n_inliers(self) -> int:
        return int(self.inliers.sum())

    def to_dict(self) -> dict:
        q, r = self.query.xy[self.pairs[:, 0]], self.result.xy[self.pairs[:, 1]]
        return {"layer": self.query.layer, "scale": self.query.scale, "matches": len(self.pairs),
                "inliers": self.n_inliers, "query_size": self.query.size, "result_size": self.result.size,
                "pairs": [{"query": [round(float(a), 1), round(float(b), 1)], "result": [round(float(c), 1), round(float(d), 1)],
                           "word": int(self.query.words[i]), "similarity": round(float(s), 4), "inlier": bool(inl)}
                          for (a, b), (c, d), i, s, inl in zip(q, r, self.pairs[:, 0], self.similarity, self.inliers)]}


def local_features(model, path, layer: str | None = None, scale: float | None = None) -> LocalFeatures:
    """The local descriptors of one image at one layer and scale (default: the model's first VLAD
    layer, or its first mean-pooled one, at its largest scale), with their positions."""
    _ = model.backbone  # resolves the default layers
    layer = layer or (model.config.layers or model.config.pooled)[0]
    scale = float(scale or max(model.config.scales))
    size = _oriented_size(path)
    (arr,) = load_warped(path, [scale_size(scale)], model.config.resize)
    maps = model.extractor(np.array(arr[None]))  # a writable copy: torch warns on a read-only array
    if layer not in maps:
        raise ValueError(f"layer {layer!r} is not one the model taps ({', '.join(maps)})")
    desc = maps[layer][0].float().cpu().numpy()
    side = int(round(np.sqrt(len(desc))))
    h = w = side
    if h * w != len(desc):  # a non-square map ("keep" resize): recover its shape from the image's
        h = max(1, int(round(np.sqrt(len(desc) * arr.shape[0] / arr.shape[1]))))
        w = len(desc) // h
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    xy = np.stack([(jj.ravel() + 0.5) / w * size[0], (ii.ravel() + 0.5) / h * size[1]], 1).astype(np.float32)
    words = np.full(len(desc), -1)
    vlad = getattr(model, "vlads_", {}).get(f"{layer}@{scale:g}")
    if vlad is not None:
        C = np.asarray(vlad.centroids_, np.float32)
        words = np.argmax(desc @ C.T, 1)
    return LocalFeatures(xy, desc, words, size, layer, scale)


def _oriented_size(path) -> tuple[int, int]:
    """Width and height as shown, EXIF orientation applied, from the header alone."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def match_features(q: LocalFeatures, r: LocalFeatures, min_similarity: float = 0.5,
                   threshold: float = 0.06) -> Matches:
    """Mutual nearest neighbours, then a homography by USAC-MAGSAC; ``threshold`` is the inlier
    distance as a fraction of the result image's longer side."""
    import cv2

    S = q.desc @ r.desc.T
    i, j = tentative_matches(S, min_similarity)
    pairs = np.stack([i, j], 1) if len(i) else np.zeros((0, 2), int)
    sim = S[pairs[:, 0], pairs[:, 1]] if len(pairs) else np.zeros(0, np.float32)
    inliers, H = np.zeros(len(pairs), bool), None
    if len(pairs) >= 4:
        src = q.xy[pairs[:, 0]].reshape(-1, 1, 2)
        dst = r.xy[pairs[:, 1]].reshape(-1, 1, 2)
        H, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, threshold * max(r.size), maxIters=2000,
                                     confidence=0.999)
        if H is not None and mask is not None:
            inliers = mask.ravel().astype(bool)
    return Matches(q, r, pairs, sim, inliers, H)


def match_images(model, query, result, layer: str | None = None, scale: float | None = None) -> Matches:
    """Local-feature correspondences between two image files, with their geometric inliers."""
    return match_features(local_features(model, query, layer, scale), local_features(model, result, layer, scale))


def draw_matches(m: Matches, query_path, result_path, out=None, height: int = 360, max_lines: int = 80):
    """Query and result side by side, correspondences drawn: inliers bold, coloured by visual word;
    other matches thin and grey; at most ``max_lines`` inliers and half as many others (the most
    similar), so that a dense layer stays legible. Returns the PIL image; writes a PNG when ``out``
    is given."""
    from PIL import Image, ImageDraw

    from .images import load_image

    ims = [load_image(p) for p in (query_path, result_path)]
    scaled = [im.resize((max(1, round(im.width * height / im.height)), height)) for im in ims]
    gap, bar = 12, 28
    canvas = Image.new("RGB", (scaled[0].width + gap + scaled[1].width, height + bar), "white")
    canvas.paste(scaled[0], (0, bar))
    canvas.paste(scaled[1], (scaled[0].width + gap, bar))
    draw = ImageDraw.Draw(canvas)
    # the features' positions are in each image's own pixels (EXIF orientation applied)
    fq = np.array([scaled[0].width / m.query.size[0], height / m.query.size[1]])
    fr = np.array([scaled[1].width / m.result.size[0], height / m.result.size[1]])
    best = np.argsort(-m.similarity, kind="stable")
    shown = np.concatenate([best[~m.inliers[best]][:max_lines // 2], best[m.inliers[best]][:max_lines]])
    for k in shown:  # outliers first, inliers drawn on top
        a = m.query.xy[m.pairs[k, 0]] * fq + (0, bar)
        b = m.result.xy[m.pairs[k, 1]] * fr + (scaled[0].width + gap, bar)
        if m.inliers[k]:
            colour = _word_colour(int(m.query.words[m.pairs[k, 0]]))
            draw.line([tuple(a), tuple(b)], fill=colour, width=2)
            for p in (a, b):
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], outline=colour, width=2)
        else:
            draw.line([tuple(a), tuple(b)], fill=(170, 170, 170), width=1)
    note = f" (the {min(max_lines, m.n_inliers)} most similar inliers drawn)" if m.n_inliers > max_lines else ""
    draw.text((6, 7), f"{len(m.pairs)} matches, {m.n_inliers} geometric inliers{note}  ·  layer {m.query.layer} "
                      f"at scale {m.query.scale:g}  ·  colour: visual word", fill="black")
    if out is not None:
        canvas.save(out, format="PNG")
    return canvas


def _word_colour(word: int) -> tuple[int, int, int]:
    import colorsys

    if word < 0:
        return (220, 40, 40)
    r, g, b = colorsys.hsv_to_rgb((word * 0.618034) % 1.0, 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


__all__ = ["LocalFeatures", "Matches", "draw_matches", "local_features", "match_features", "match_images"]
