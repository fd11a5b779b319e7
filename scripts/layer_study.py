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
import time

import numpy as np
import torch

from convlad.backbones import get_backbone
from convlad.encoding import PCAWhitening, VLAD
from convlad.evaluate import evaluate_descriptors, load_groups_dataset
from convlad.extract import FeatureExtractor, iter_batches
from convlad.functional import l2n
from convlad.images import list_images


def extract(ex, paths, scales, max_per_image=None, seed=0):
    feats = {}
    for b in iter_batches(ex, paths, scales, batch_size=16):
        assert not b.errors, b.errors
        for key, f in b.features.items():
            feats.setdefault(key, []).append(f.half())
    return {k: torch.cat(v) for k, v in feats.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset"); ap.add_argument("train")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--layers", default="all"); ap.add_argument("--scales", default="1,2")
    ap.add_argument("--dim", type=int, default=128); ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--powers", default="1,0.5"); ap.add_argument("--rn", default="0")
    ap.add_argument("--whiten", default="0.5"); ap.add_argument("--json")
    a = ap.parse_args()
    scales = [float(s) for s in a.scales.split(",")]
    bb = get_backbone(a.backbone)
    ex = FeatureExtractor(bb, a.layers)
    bench = load_groups_dataset(a.dataset)
    train = [f"{a.train}/images/{p}" for p in list_images(f"{a.train}/images")]
    t = time.time()
    Fd, Ft = extract(ex, bench.paths, scales), extract(ex, train, scales)
    print(f"# extracted in {time.time() - t:.0f}s", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    vl = {}
    for (layer, s) in Ft:
        ft = Ft[(layer, s)]
        n, N, d = ft.shape
        pick = torch.as_tensor(rng.choice(N, size=min(N, 200_000 // n + 1), replace=False))
        X = ft[:, pick].reshape(-1, d).float().numpy()
        for power, rn in itertools.product([float(p) for p in a.powers.split(",")], [bool(int(r)) for r in a.rn.split(",")]):
            v = VLAD(a.k, power=power, residual_norm=rn).fit(X)
            enc = lambda F: torch.cat([v.encode(F[i:i + 64].float()) for i in range(0, len(F), 64)])
            vl[(layer, s, power, rn)] = (enc(Fd[(layer, s)]), enc(ft))
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
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
