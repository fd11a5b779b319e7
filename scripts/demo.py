"""`make demo`: train, index and search real photos with the default pipeline, through the CLI.

Uses ../shared/data (mvbench-train to learn the vocabulary and PCA-whitening, mvbench-dev's photos
to index and query). Without that folder it says so and falls back to a tiny generated set: a few
synthetic scenes, each seen from several viewpoints.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("demo-out")


def sh(*args, echo: bool = True) -> str:
    cmd = ["convlad", *map(str, args)]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "convlad", *map(str, args)], text=True, stdout=subprocess.PIPE)
    if p.returncode != 0:
        sys.exit(p.returncode)
    if echo:
        print(p.stdout.rstrip())
    print(f"  ({time.time() - t:.0f}s)")
    return p.stdout


def synthetic_set(root: Path) -> tuple[Path, Path, dict]:
    """Six textured scenes × four viewpoints (perspective warps, crops, lighting)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageEnhance

    rng = np.random.default_rng(0)
    train, photos = root / "train", root / "photos"
    train.mkdir(parents=True, exist_ok=True)
    photos.mkdir(parents=True, exist_ok=True)

    def scene(seed):
        r = np.random.default_rng(seed)
        im = Image.fromarray((r.random((8, 8, 3)) * 255).astype("uint8")).resize((480, 480), Image.BICUBIC)
        d = ImageDraw.Draw(im)
        for _ in range(40):
            x, y = r.integers(0, 480, 2)
            s = int(r.integers(10, 80))
            color = tuple(int(c) for c in r.integers(0, 256, 3))
            [d.ellipse, d.rectangle][int(r.integers(2))]((x, y, x + s, y + s), fill=color, outline=(0, 0, 0))
        return im

    groups = {}
    for g in range(6):
        base = scene(g)
        groups[f"scene{g}"] = []
        for v in range(4):
            c = rng.uniform(-0.12, 0.12, 8) * 480
            quad = (0 + c[0], 0 + c[1], 0 + c[2], 480 + c[3], 480 + c[4], 480 + c[5], 480 + c[6], 0 + c[7])
            view = base.transform((480, 480), Image.QUAD, quad, Image.BILINEAR)
            view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.7, 1.3))
            name = f"scene{g}_{v}.jpg"
            view.save(photos / name, quality=90)
            groups[f"scene{g}"].append(name)
    for i in range(30):  # unrelated scenes for the vocabulary
        scene(1000 + i).save(train / f"train{i:02d}.jpg", quality=90)
    return train, photos, groups


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="../shared/data")
    a = ap.parse_args()
    shared = Path(a.shared)
    OUT.mkdir(exist_ok=True)
    if (shared / "mvbench-train" / "images").is_dir() and (shared / "mvbench-dev" / "images").is_dir():
        train = shared / "mvbench-train" / "images"
        photos = shared / "mvbench-dev" / "images"
        groups = json.loads((shared / "mvbench-dev" / "groups.json").read_text())
        queries = [groups[g][0] for g in ("bundler_kermit", "holidays_1000", "ukbench_obj0001") if g in groups]
        queries = queries or [next(iter(groups.values()))[0]]
        train_args = []
        print(f"convlad demo on real photos: vocabulary/PCA from {train}, searching {photos}")
    else:
        print(f"NOTE: {shared} is absent, so the real photos are not available; "
              f"falling back to a tiny generated set of synthetic scenes in {OUT / 'synthetic'}.")
        train, photos, groups = synthetic_set(OUT / "synthetic")
        queries = [groups["scene0"][0], groups["scene3"][0]]
        train_args = ["--dim", "0"]  # 30 training images are too few to learn a PCA-whitening
    group_of = {f: g for g, fs in groups.items() for f in fs}

    sh("train", "--images", train, "--out", OUT / "model.npz", *train_args)
    sh("index", OUT / "model.npz", photos, "--out", OUT / "photos.index")
    sh("info", OUT / "photos.index")
    res = json.loads(sh("search", OUT / "photos.index", *[photos / q for q in queries], "-k", "5", "--json", echo=False))
    print("\nranked results, the top 100 spatially verified (rank 1, the query itself, omitted); "
          "✓ = same object or place as the query by the benchmark; same/alike: what the search says")
    for r in res:
        q = Path(r["query"]).name
        print(f"query {q}:")
        for hit in r["results"][1:]:  # rank 1 is the query itself
            name = Path(hit["path"]).name
            mark = "✓" if group_of.get(name) == group_of.get(q) else " "
            inliers = f"{hit['inliers']:4d} inliers  " if hit.get("inliers") is not None else ""
            said = {True: "same  ", False: "alike ", None: ""}[hit.get("same")]  # what the search itself says
            print(f"  {mark} {hit['rank']:2d}  {hit['distance']:.3f}  {inliers}{said}{name}")
    # the whole collection: which photos show the same thing (the groups the index's verified pairs join)
    print()
    sh("groups", OUT / "photos.index", "--limit", "3")


if __name__ == "__main__":
    main()
