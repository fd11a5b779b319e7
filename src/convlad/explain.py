"""Why a result ranked where it did: the spatial verification that ranked it, drawn.

The match view shows exactly what re-ranking computed for the pair (``Verifier.match``): the same
local features (the query's, encoded as every search encodes it, and the result's as the index
stores them), the same mutual nearest neighbours, the same affine RANSAC on grid cells, so its
inlier count is the one the ranking used and a search showed. Cells are drawn at their centres
in each photo's own pixels (EXIF orientation applied); inliers are coloured by the visual word
(the VLAD vocabulary's nearest centroid) of the query's feature.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .verify import LocalCodes, PairMatch, Verifier


@dataclass
class MatchView:
    query_xy: np.ndarray  # (m, 2) float32: each tentative match's cell centre in the query's pixels
    result_xy: np.ndarray  # (m, 2) in the result's pixels
    similarity: np.ndarray  # (m,) cosine similarity of each pair
    inliers: np.ndarray  # (m,) bool: consistent with the fitted affine map
    words: np.ndarray  # (m,) int: the query feature's visual word, -1 without a vocabulary for the layer
    fitted: bool  # False: too few tentative matches for a fit (the verifier's gate), 0 inliers
    query_size: tuple[int, int]
    result_size: tuple[int, int]
    layer: str
    scale: float

    @property
    def n_inliers(self) -> int:
        return int(self.inliers.sum())

    @property
    def n_matches(self) -> int:
        return len(self.inliers)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "scale": self.scale, "matches": self.n_matches, "inliers": self.n_inliers,
                "fitted": self.fitted, "geometry": "affine (RANSAC on the feature map's cells)",
                "query_size": list(self.query_size), "result_size": list(self.result_size),
                "pairs": [{"query": [round(float(a), 1), round(float(b), 1)],
                           "result": [round(float(c), 1), round(float(d), 1)],
                           "word": int(w), "similarity": round(float(s), 4), "inlier": bool(i)}
                          for (a, b), (c, d), w, s, i in zip(self.query_xy, self.result_xy, self.words,
                                                              self.similarity, self.inliers)]}


def oriented_size(path) -> tuple[int, int]:
    """Width and height as shown, EXIF orientation applied, from the header alone."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _pixels(cells: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    h, w = grid
    return (cells.astype(np.float32) * np.array([size[0] / w, size[1] / h], np.float32)).astype(np.float32)


def match_view(model, query: LocalCodes, query_size, result: LocalCodes, result_size,
               verifier: Verifier | None = None) -> MatchView:
    """The verification of one query (``query``: its LocalCodes, one row, with its grid) against
    one result (``result``: one row; its grid, where it carries none, is the query's: photos are
    warped to one size), placed in each photo's pixels (``*_size``: width, height)."""
    v = verifier or model.verifier()
    q = query.features(0)
    pm: PairMatch = v.match(q, result)
    grid_q = query.grid
    grid_r = result.grid or grid_q
    if grid_q is None or grid_r is None:
        raise ValueError("the local features' grid is unknown: encode the query with model.transform(..., local=k)")
    qxy = _pixels(q[1][pm.query_rows], grid_q, query_size)
    rxy = _pixels(result.features(0)[1][pm.candidate_rows], grid_r, result_size)
    layer, scale = model.local_key
    words = np.full(len(pm.query_rows), -1)
    vlad = getattr(model, "vlads_", {}).get(f"{layer}@{scale:g}")
    if vlad is not None and len(words):
        C = np.asarray(vlad.centroids_, np.float32)
        words = np.argmax(q[0][pm.query_rows] @ C.T, 1)
    return MatchView(qxy, rxy, pm.similarity, pm.inliers, words, pm.fitted, tuple(query_size), tuple(result_size),
                     layer, scale)


def warp_grid(model) -> tuple[int, int]:
    """(h, w) of the verification layer's map for a photo warped to the model's size: where the
    local features an index stores lie (found by one pass over a blank image)."""
    from .extract import scale_size

    blank = [np.zeros((n, n, 3), np.uint8) for n in (scale_size(s) for s in model.config.scales)]
    return model.transform_decoded([blank], local=1).local.grid


def match_in_index(index, query: LocalCodes, query_path, result_id: int, fresh: bool = True,
                   grid: tuple[int, int] | None = None, verifier: Verifier | None = None) -> MatchView:
    """The match view of a query (its local features, one row, and its photo) against an indexed
    image (``KeyError`` where the index has no ``result_id``), with the local features the index
    stores for it; where it keeps none, encoded afresh, the query's way (``fresh``), else a
    ``LookupError``. A query without its grid (an indexed photo's stored features) lies on the
    model's warp grid (``grid``, else ``warp_grid``), as do the stored features of a model that warps."""
    model = index.model
    result_path = index.path_of(result_id)
    codes, have = index.local_codes([result_id])
    if not have[0]:
        if not fresh:
            raise LookupError(f"image {result_id} keeps no local features to verify")
        codes = model.transform([result_path], progress=False, local=query.codes.shape[1]).local
        if codes is None or not len(codes):
            raise ValueError(f"{result_path}: cannot be read to draw its matches")
    elif model.config.resize != "warp":  # its own map shape: from a fresh pass over its photo
        again = model.transform([result_path], progress=False, local=1).local
        codes = LocalCodes(codes.codes, codes.cells, codes.count, again.grid if again is not None else None)
    if query.grid is None:
        query = LocalCodes(query.codes, query.cells, query.count, grid or warp_grid(model))
    return match_view(model, query, oriented_size(query_path), codes, oriented_size(result_path), verifier)


def draw_matches(m: MatchView, query_path, result_path, out=None, height: int = 360, max_lines: int = 80):
    """Query and result side by side, the tentative matches drawn: inliers bold, coloured by visual
    word; other matches thin and grey; at most ``max_lines`` inliers and half as many others (the
    most similar). A caption says what was measured. Returns the PIL image; writes a PNG when
    ``out`` is given."""
    from PIL import Image, ImageDraw, ImageFont

    from .images import load_image

    ims = [load_image(p) for p in (query_path, result_path)]
    scaled = [im.resize((max(1, round(im.width * height / im.height)), height)) for im in ims]
    gap, bar = 12, 34
    canvas = Image.new("RGB", (max(640, scaled[0].width + gap + scaled[1].width), height + bar), "white")
    canvas.paste(scaled[0], (0, bar))
    canvas.paste(scaled[1], (scaled[0].width + gap, bar))
    draw = ImageDraw.Draw(canvas)
    fq = np.array([scaled[0].width / m.query_size[0], height / m.query_size[1]])
    fr = np.array([scaled[1].width / m.result_size[0], height / m.result_size[1]])
    best = np.argsort(-m.similarity, kind="stable")
    shown = np.concatenate([best[~m.inliers[best]][:max_lines // 2], best[m.inliers[best]][:max_lines]]).astype(int)
    for k in shown:  # outliers first, inliers drawn on top
        a = m.query_xy[k] * fq + (0, bar)
        b = m.result_xy[k] * fr + (scaled[0].width + gap, bar)
        if m.inliers[k]:
            colour = _word_colour(int(m.words[k]))
            draw.line([tuple(a), tuple(b)], fill=colour, width=2)
            for p in (a, b):
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], outline=colour, width=2)
        else:
            draw.line([tuple(a), tuple(b)], fill=(170, 170, 170), width=1)
    note = f" ({min(max_lines, m.n_inliers)} most similar drawn)" if m.n_inliers > max_lines else ""
    gate = "" if m.fitted else " (too few for a fit: 0 inliers)"
    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1: the bitmap font only
        font = ImageFont.load_default()
    draw.text((6, 8), f"{m.n_inliers} matching features (verified inliers) of {m.n_matches} tentative{gate}{note}"
                      f"  ·  layer {m.layer} at scale {m.scale:g}", fill="black", font=font)
    if out is not None:
        canvas.save(out, format="PNG")
    return canvas


def _word_colour(word: int) -> tuple[int, int, int]:
    import colorsys

    if word < 0:
        return (220, 40, 40)
    r, g, b = colorsys.hsv_to_rgb((word * 0.618034) % 1.0, 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


__all__ = ["MatchView", "draw_matches", "match_in_index", "match_view", "oriented_size", "warp_grid"]
