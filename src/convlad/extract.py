"""Extraction: one forward pass per image and scale yields the local descriptors of every layer asked for."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .backbones.base import Backbone
from .functional import local_descriptors
from .images import ImageError, load_warped

BASE_SIZE = 224  # scale s warps the image to (224·s)², as in the paper


def scale_size(scale: float) -> int:
    return int(round(BASE_SIZE * scale))


class _Stop(Exception):
    """Raised by the deepest hook: nothing after the last tapped layer needs computing."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FeatureExtractor:
    """Taps ``layers`` of ``backbone`` with forward hooks.

    ``__call__(x)`` takes a uint8 batch (B, n, n, 3) and returns ``{layer: (B, h·w, d)}`` float32
    L2-normalised local descriptors. The forward pass stops after the deepest tapped layer.
    """

    def __init__(self, backbone: Backbone, layers: Sequence[str] | str | None = None, device=None):
        self.backbone = backbone
        self.layers = backbone.resolve_layers(layers if layers is None or isinstance(layers, str) else list(layers))
        self.device = torch.device(device) if device is not None else default_device()
        backbone.to(self.device)
        # channels-last: 1.5× faster for Lite0's depthwise and 1×1 convolutions on 2 CPU cores
        backbone.module.to(memory_format=torch.channels_last)
        self._maps: dict[str, torch.Tensor] = {}
        modules = dict(backbone.module.named_modules())
        last = self.layers[-1]
        self._handles = [
            modules[backbone.taps[layer]].register_forward_hook(self._hook(layer, stop=layer == last))
            for layer in self.layers
        ]

    def _hook(self, layer: str, stop: bool):
        def hook(_module, _inputs, output):
            self._maps[layer] = output
            if stop:
                raise _Stop

        return hook

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.inference_mode()
    def feature_maps(self, batch: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.as_tensor(batch).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        x = self.backbone.normalize(x).contiguous(memory_format=torch.channels_last)
        self._maps = {}
        try:
            self.backbone.module(x)
        except _Stop:
            pass
        maps, self._maps = self._maps, {}
        return maps

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        return {layer: local_descriptors(m) for layer, m in self.feature_maps(batch).items()}


@dataclass
class Batch:
    """Local descriptors of a batch of images: ``features[(layer, scale)]`` is (B, N, d)."""

    indices: list[int]
    features: dict[tuple[str, float], torch.Tensor]
    errors: list[tuple[int, ImageError]] = field(default_factory=list)


def _decode(item, sizes, mode):
    path, box = (item, None) if isinstance(item, (str, os.PathLike)) else item
    try:
        return load_warped(path, sizes, mode, box)
    except ImageError as e:
        return e


def iter_batches(
    extractor: FeatureExtractor,
    paths: Sequence[str],
    scales: Sequence[float] = (1,),
    batch_size: int = 16,
    workers: int = 2,
    progress=None,
    resize: str = "warp",
) -> Iterator[Batch]:
    """Decode in a thread pool (Pillow releases the GIL) while the network runs on the previous batch.

    ``paths`` items are file paths, or ``(path, box)`` pairs to crop to a box (x1, y1, x2, y2) first,
    as for Oxford/Paris queries. Unreadable images do not stop the run: they come back in
    ``Batch.errors`` with their index.
    With ``resize="keep"`` images of different shapes are split into one sub-batch per shape, so a
    Batch's ``indices`` are not always consecutive. ``progress`` (tqdm-like) advances per image.
    """
    sizes = [scale_size(s) for s in scales]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        chunks = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
        # keep up to two chunks of decoding in flight ahead of the forward pass
        pending = [[pool.submit(_decode, paths[i], sizes, resize) for i in c] for c in chunks[:2]]
        for ci, chunk in enumerate(chunks):
            futures = pending.pop(0)
            if ci + 2 < len(chunks):
                pending.append([pool.submit(_decode, paths[i], sizes, resize) for i in chunks[ci + 2]])
            decoded = [f.result() for f in futures]
            errors = [(i, d) for i, d in zip(chunk, decoded) if isinstance(d, ImageError)]
            by_shape: dict[tuple, list] = {}
            for i, d in zip(chunk, decoded):
                if not isinstance(d, ImageError):
                    by_shape.setdefault(tuple(a.shape for a in d), []).append((i, d))
            if progress is not None:
                progress.update(len(chunk))
            if not by_shape:
                yield Batch(indices=[], features={}, errors=errors)
            for gi, group in enumerate(by_shape.values()):
                features = {}
                for si, scale in enumerate(scales):
                    stacked = np.stack([d[si] for _, d in group])
                    for layer, desc in extractor(stacked).items():
                        features[(layer, scale)] = desc
                yield Batch(indices=[i for i, _ in group], features=features, errors=errors if gi == 0 else [])
