"""The plain implementation of a fitted ``ConvVLAD``'s descriptors: the yardstick of the fast path.

Batches of 16 decoded one after the other at full resolution (Pillow, no draft mode, no worker
threads), resized, run through the whole network as defined (batch norm not folded, default memory
layout, every layer to the classifier), then a per-image numpy VLAD with a loop over visual words. It is what a first implementation looks like; the
benchmarks measure the fast path against it, and a test checks both give the same mAP.
"""
from __future__ import annotations

import inspect
import time
from collections import defaultdict

import numpy as np
import torch
from PIL import Image, ImageOps

from .backbones import BACKBONES
from .extract import scale_size
from .pipeline import ConvVLAD, _key


def _l2(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def vlad_numpy(x: np.ndarray, centroids: np.ndarray, power: float | None, intra: bool) -> np.ndarray:
    """One image's VLAD, the textbook way: nearest word per descriptor, then a loop over words."""
    d2 = (x * x).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)
    a = d2.argmin(1)
    v = np.zeros_like(centroids)
    for j in range(len(centroids)):
        members = x[a == j]
        if len(members):
            v[j] = (members - centroids[j]).sum(0)
    if power is not None and power != 1.0:
        v = np.sign(v) * np.abs(v) ** power
    if intra:
        v = _l2(v)
    return _l2(v.reshape(-1))


def plain_descriptors(model: ConvVLAD, paths, batch_size: int = 16, timings: dict | None = None) -> np.ndarray:
    """(n, dim) descriptors of ``paths``, computed plainly; ``timings`` (if given) accumulates the
    seconds spent in 'decode', 'forward' and 'encode'."""
    # the network as defined, batch norm unfolded, in its own copy in the default memory layout
    factory = BACKBONES[model.config.backbone]
    kw = {"fold_bn": False} if "fold_bn" in inspect.signature(factory).parameters else {}
    bb = factory(model.config.weights, **kw)
    module = bb.module.to("cpu").to(memory_format=torch.contiguous_format)
    _ = model.backbone  # resolves the model's default layers
    layers = list(dict.fromkeys(model.config.layers + model.config.pooled))
    maps: dict[str, torch.Tensor] = {}
    modules = dict(module.named_modules())
    hooks = [modules[bb.taps[layer]].register_forward_hook(
        lambda _m, _i, out, layer=layer: maps.__setitem__(layer, out)) for layer in layers]
    t = timings if timings is not None else {}
    for stage in ("decode", "forward", "encode"):
        t.setdefault(stage, 0.0)
    mean = np.array(bb.mean, np.float32)
    std = np.array(bb.std, np.float32)
    out = []
    try:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            feats: dict[tuple[str, float], list[np.ndarray]] = defaultdict(list)
            for scale in model.config.scales:
                n = scale_size(scale)
                t0 = time.perf_counter()
                imgs = []
                for p in chunk:
                    with Image.open(p) as im:
                        im = ImageOps.exif_transpose(im).convert("RGB").resize((n, n), Image.BILINEAR)
                        imgs.append((np.asarray(im, np.float32) / 255 - mean) / std)
                t1 = time.perf_counter()
                x = torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2).copy())
                with torch.no_grad():
                    module(x)
                t2 = time.perf_counter()
                for layer in layers:
                    f = maps[layer].numpy()
                    for i in range(len(chunk)):
                        feats[(layer, scale)].append(_l2(f[i].reshape(f.shape[1], -1).T))
                t["decode"] += t1 - t0
                t["forward"] += t2 - t1
                t["encode"] += time.perf_counter() - t2
            t0 = time.perf_counter()
            for i in range(len(chunk)):
                parts = []
                for key in model.keys:
                    v = model.vlads_[_key(*key)]
                    parts.append(vlad_numpy(feats[key][i], v.centroids_, v.power, v.intra))
                parts += [_l2(feats[key][i].mean(0)) for key in model.pooled_keys]
                z = np.concatenate(parts)
                z = _l2(z) if len(parts) > 1 else z
                if model.pca_ is not None:
                    p = model.pca_
                    z = _l2((z - p.mean_) @ p.components_.T * p._scale())
                out.append(z.astype(np.float32))
            t["encode"] += time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    return np.stack(out)
