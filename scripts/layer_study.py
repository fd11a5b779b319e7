"""Layer × scale study on a groups benchmark (mvbench layout): the measurement behind the defaults.

Extracts every requested layer of both sets once per scale (one forward pass per image and scale),
then fits vocabulary and PCA-whitening on the training set for each (layer, scale) and variant, and
prints mAP uncompressed and at --dim. Usage:

    python scripts/layer_study.py ../shared/data/mvbench-dev ../shared/data/mvbench-train \
        --layers block5,block8,block10,block11,block13,block15,head --scales 1,2
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np
import torch

from convlad.backbones import get_backbone
from convlad.encoding import PCAWhitening, VLAD
from convlad.evaluate import evaluate_descriptors, load_groups_dataset
from convlad.extract import FeatureExtractor, iter_batches
from convlad.functional import l2n
from convlad.images import list_images


def extract(ex, paths, scales, resize="warp"):
    """{(layer, scale): [(indices, (B, N, d) float16), ...]}: batches of one shape each."""
    feats = {}
    for b in iter_batches(ex, paths, scales, batch_size=16, resize=resize):
        assert not b.errors, b.errors
        for key, f in b.features.items():
            feats.setdefault(key, []).append((b.indices, f.half()))
    return feats


def encode_all(v, batches):
    order = np.concatenate([idx for idx, _ in batches])
    V = torch.cat([v.encode(f.float()) for _, f in batches])
    return V[torch.as_tensor(np.argsort(order))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset"); ap.add_argument("train")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--layers", default="all"); ap.add_argument("--scales", default="1,2")
    ap.add_argument("--dim", type=int, default=128); ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--powers", default="1,0.5"); ap.add_argument("--rn", default="0")
    ap.add_argument("--whiten", default="0.5"); ap.add_argument("--json")
    ap.add_argument("--cache", help="file to keep the extracted features in, reused when present")
    ap.add_argument("--resize", default="warp", choices=["warp", "keep"])
    a = ap.parse_args()
    scales = [float(s) for s in a.scales.split(",")]
    bb = get_backbone(a.backbone)
    ex = FeatureExtractor(bb, a.layers)
    bench = load_groups_dataset(a.dataset)
    train = [f"{a.train}/images/{p}" for p in list_images(f"{a.train}/images")]
    t = time.time()
    if a.cache and os.path.exists(a.cache):
        Fd, Ft = torch.load(a.cache)
    else:
        Fd, Ft = extract(ex, bench.paths, scales, a.resize), extract(ex, train, scales, a.resize)
        if a.cache:
            torch.save((Fd, Ft), a.cache)
    print(f"# features ready in {time.time() - t:.0f}s", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for layer in dict.fromkeys(l for l, _ in Ft):
        vl = {}
        for s in scales:
            encode_layer(a, rng, Ft, Fd, layer, s, vl)
        evaluate_layer(a, bench, scales, vl, rows)
        if a.json:
            json.dump(rows, open(a.json, "w"), indent=1)


def encode_layer(a, rng, Ft, Fd, layer, s, vl):
    ft = Ft[(layer, s)]
    n = sum(len(idx) for idx, _ in ft)
    X = []
    for _, f in ft:
        N, d = f.shape[1:]
        pick = torch.as_tensor(rng.choice(N, size=min(N, 200_000 // n + 1), replace=False))
        X.append(f[:, pick].reshape(-1, d).float().numpy())
    X = np.concatenate(X)
    for power, rn in itertools.product([float(p) for p in a.powers.split(",")],
                                       [bool(int(r)) for r in a.rn.split(",")]):
        v = VLAD(a.k, power=power, residual_norm=rn, max_points_per_centroid=256).fit(X)
        vl[(layer, s, power, rn)] = (encode_all(v, Fd[(layer, s)]), encode_all(v, ft))


def evaluate_layer(a, bench, scales, vl, rows):
    for (layer, s, power, rn), (Vd, Vt) in vl.items():
        combos = [((layer, s), Vd, Vt)]
        if s == scales[0] and len(scales) > 1 and (layer, scales[1], power, rn) in vl:
            Vd2, Vt2 = vl[(layer, scales[1], power, rn)]
            combos.append(((layer, "+".join(f"{x:g}" for x in scales)), l2n(torch.cat([Vd, Vd2], 1)), l2n(torch.cat([Vt, Vt2], 1))))
        for (lay, sc), D, T in combos:
            full = evaluate_descriptors(bench, D.numpy()).mAP
            res = {"layer": lay, "scale": str(sc), "power": power, "rn": rn, "full": full}
            for w in [float(x) for x in a.whiten.split(",")]:
                pca = PCAWhitening(a.dim, whiten_power=w).fit(T.numpy())
                res[f"pca{a.dim}_w{w:g}"] = evaluate_descriptors(bench, pca.transform(D.numpy())).mAP
            rows.append(res)
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
