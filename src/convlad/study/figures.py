"""What a layer's local features keep: the paper's Figures 3 and 4, for any backbone, layer and scale.

Each position of an nˡ×nˡ feature map computed from an n×n warp is shown as the centre patch of its
receptive field, the n/nˡ-pixel square of the warped image it sits on (as in Long et al., NIPS 2014,
whom the paper follows).

- ``correspondence_figure`` (Fig. 3): every patch of a query image replaced by the average of the
  patches of its 1 and 5 nearest local features over a database of other images. What survives
  shows what the layer keeps of local appearance.
- ``clusters_figure`` (Fig. 4): sampled reference patches, each followed by the database patches of
  its nearest local features, sorted by L2 distance.

Layers are given as ``(layer, scale)`` pairs, written ``layer@scale`` on the command line.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..extract import FeatureExtractor, scale_size
from ..images import load_warped

LABEL = 22  # pixels of caption above each panel


@dataclass
class PatchBank:
    """Every local feature of one layer and scale over a set of images, with its patch."""

    layer: str
    scale: float
    desc: np.ndarray  # (N, d) float32, L2-normalised
    patches: np.ndarray  # (N, p, p, 3) uint8, p = n / nˡ
    image: np.ndarray  # (N,) int: index of the image each feature comes from
    grid: tuple[int, int]  # (h, w) of the feature map

    @property
    def label(self) -> str:
        return f"{self.layer} @ {scale_size(self.scale)}px"


def parse_layer_spec(text: str) -> tuple[str, float]:
    """``block6@2`` → ("block6", 2.0); a bare layer name means scale 1."""
    layer, _, scale = text.partition("@")
    try:
        return layer.strip(), float(scale) if scale else 1.0
    except ValueError:
        raise ValueError(f"{text!r}: give a layer as NAME or NAME@SCALE (e.g. block6@2)") from None


def patch_bank(backbone, paths, layer: str, scale: float, device=None, progress: bool = False) -> PatchBank:
    """Local features of ``layer`` at ``scale`` for every image of ``paths`` (warped to n×n), with
    the centre patch of each one's receptive field."""
    from .. import progress as P

    n = scale_size(scale)
    ex = FeatureExtractor(backbone, [layer], device=device or "cpu")
    bar = P.bar(len(paths), f"patches of {layer} @ {scale:g}", "img", enabled=progress)
    try:
        desc, patches, image, grid = [], [], [], None
        for i, path in enumerate(paths):
            (arr,) = load_warped(path, [n])
            d = ex(np.array(arr[None]))[layer][0].float().cpu().numpy()
            side = int(round(np.sqrt(len(d))))
            if side * side != len(d) or n % side:
                raise ValueError(f"{layer} at {n}² gives a {len(d)}-position map that does not tile the image; "
                                 "choose another layer or scale")
            p = n // side
            grid = (side, side)
            desc.append(d)
            patches.append(arr.reshape(side, p, side, p, 3).transpose(0, 2, 1, 3, 4).reshape(-1, p, p, 3))
            image.append(np.full(len(d), i))
            bar.update(1)
    finally:
        bar.close()
        ex.close()
    return PatchBank(layer, float(scale), np.concatenate(desc), np.concatenate(patches), np.concatenate(image), grid)


def _neighbours(bank: PatchBank, rows: np.ndarray, k: int) -> np.ndarray:
    """Indices (len(rows), k) of each row's k nearest features of *other* images, nearest first."""
    import faiss

    index = faiss.IndexFlatL2(bank.desc.shape[1])
    index.add(np.ascontiguousarray(bank.desc))
    # over-fetch: the row's own image must not supply its neighbours
    want = min(len(bank.desc), k + int(np.bincount(bank.image).max()))
    _, idx = index.search(np.ascontiguousarray(bank.desc[rows]), want)
    out = np.zeros((len(rows), k), np.int64)
    for j, r in enumerate(rows):
        other = idx[j][(idx[j] >= 0) & (bank.image[np.maximum(idx[j], 0)] != bank.image[r])]
        if len(other) < k:
            raise ValueError("the database needs at least two images")
        out[j] = other[:k]
    return out


def _tile(patches: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(h·w, p, p, 3) patches in row order → the (h·p, w·p, 3) image they tile."""
    h, w = grid
    p = patches.shape[1]
    return patches.reshape(h, w, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * p, w * p, 3)


def reconstruct(bank: PatchBank, image: int, k: int, nn: np.ndarray | None = None) -> np.ndarray:
    """Image ``image`` of the bank rebuilt from the mean patch of each feature's k nearest
    features in the other images: (n, n, 3) uint8. ``nn``: those neighbours (cells, ≥ k), when
    already found."""
    if nn is None:
        nn = _neighbours(bank, np.flatnonzero(bank.image == image), k)
    mean = bank.patches[nn[:, :k]].astype(np.float32).mean(1)  # (cells, p, p, 3)
    return _tile(mean.round().astype(np.uint8), bank.grid)


def _canvas(columns: list[str], rows: int, cell: int, gap: int = 6):
    from PIL import Image, ImageDraw

    W = len(columns) * (cell + gap) - gap
    im = Image.new("RGB", (W, LABEL + rows * (cell + gap) - gap), "white")
    draw = ImageDraw.Draw(im)
    for c, text in enumerate(columns):
        draw.text((c * (cell + gap) + 2, 5), text, fill="black")
    return im


def correspondence_figure(banks: list[PatchBank], queries: list[int], ks=(1, 5), cell: int = 160, out=None):
    """Fig. 3: a row per query image (its index in the banks' images): the image, then for each
    bank its reconstruction from the 1 and 5 nearest (``ks``) database features. Returns the PIL
    image; writes a PNG when ``out`` is given."""
    from PIL import Image

    columns = ["image"] + [f"{b.label}: {k}-NN" for b in banks for k in ks]
    fig = _canvas(columns, len(queries), cell)
    for r, q in enumerate(queries):
        tiles = [_tile(banks[0].patches[banks[0].image == q], banks[0].grid)]
        for b in banks:  # the neighbours once per layer, their first k for each k
            nn = _neighbours(b, np.flatnonzero(b.image == q), max(ks))
            tiles += [reconstruct(b, q, k, nn) for k in ks]
        for c, t in enumerate(tiles):
            fig.paste(Image.fromarray(t).resize((cell, cell), Image.NEAREST), (c * (cell + 6), LABEL + r * (cell + 6)))
    if out is not None:
        fig.save(out, format="PNG")
    return fig


def clusters_figure(banks: list[PatchBank], refs: int = 6, neighbours: int = 8, cell: int = 40, seed: int = 0,
                    out=None):
    """Fig. 4: for each bank, ``refs`` reference patches sampled at random, each followed by the
    patches of its ``neighbours`` nearest features in other images, sorted by L2 distance."""
    from PIL import Image, ImageDraw

    panels = []
    for b in banks:
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(b.desc), size=min(refs, len(b.desc)), replace=False)
        nn = _neighbours(b, rows, neighbours)
        width = (neighbours + 1) * (cell + 4) + 8
        panel = Image.new("RGB", (width, LABEL + len(rows) * (cell + 6)), "white")
        ImageDraw.Draw(panel).text((2, 5), f"{b.label}: reference, then its {neighbours} nearest by L2", fill="black")
        for r, (ref, near) in enumerate(zip(rows, nn)):
            for c, i in enumerate([ref, *near]):
                x = c * (cell + 4) + (8 if c else 0)  # a gap after the reference
                panel.paste(Image.fromarray(b.patches[i]).resize((cell, cell), Image.NEAREST),
                            (x, LABEL + r * (cell + 6)))
        panels.append(panel)
    fig = Image.new("RGB", (max(p.width for p in panels), sum(p.height + 16 for p in panels)), "white")
    y = 0
    for p in panels:
        fig.paste(p, (0, y))
        y += p.height + 16
    if out is not None:
        fig.save(out, format="PNG")
    return fig


__all__ = ["PatchBank", "clusters_figure", "correspondence_figure", "parse_layer_spec", "patch_bank", "reconstruct"]
