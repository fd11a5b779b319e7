"""Issue 36: local features small enough for 100 M photos. Re-ranked mAP against bytes a photo.

Today each photo keeps 300 local features of 80 int8 values and two uint8 cells (24 602 bytes:
246 GB at 10 M photos). The candidates, each applied to the benchmark's photos and to the training
photos alike (the chance level is measured again on the training photos' features, as a fit does):
- **fewer features**: the strongest N of the 300 (``features``);
- **product-quantised descriptors**: faiss PQ of the 80-D descriptors, M sub-quantisers of 8 bits
  (M bytes a feature), trained on the training photos' features; the search decodes them
  (``pq``);
- **coarser cells**: the 28×28 map's cells halved to 14×14, one byte a cell (``cells=1``).
Everything the local features feed is run with each: mining the pairs, augmenting over them, and
re-ranking the top 100 with the links, as ``eval`` does. Judged as the other probes
(``convlad.study.folds.judge``: 5 group-wise folds, 3 seeds) against today's format, and scored on
the synthetic views (``convlad.study.synviews``):

    python experiments/probe_local_bytes.py [--views /tmp/synviews] [--out docs/results/probe-local-bytes.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def pq_codes(local, pq):
    """``local`` with each descriptor replaced by its PQ reconstruction (as int8, as stored)."""
    from convlad.verify import LocalCodes

    n, k, d = local.codes.shape
    valid = np.arange(k)[None, :] < local.count[:, None]
    X = local.codes[valid].astype(np.float32)
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    R = pq.decode(pq.compute_codes(np.ascontiguousarray(X)))
    q = np.round(R * 127 / np.maximum(np.abs(R).max(1, keepdims=True), 1e-12)).astype(np.int8)
    codes = np.zeros_like(local.codes)
    codes[valid] = q
    return LocalCodes(codes, local.cells, local.count, local.grid)


def coarse(local):
    """Cells of a map of half the side (one byte a cell on a 28×28 map): the cell's centre kept."""
    from convlad.verify import LocalCodes

    return LocalCodes(local.codes, (local.cells // 2 * 2 + 1).astype(local.cells.dtype), local.count, local.grid)


def variant(local, spec, pqs):
    from convlad.study.folds import _truncate

    out = _truncate(local, spec["features"])
    exact = coarse(out) if spec["cells"] == 1 else out
    if spec["pq"]:
        out = pq_codes(out, pqs[spec["pq"]])
    if spec["cells"] == 1:
        out = coarse(out)
    return Asymmetric(out, exact) if spec.get("adc") else out


def Asymmetric(stored, exact):
    """Stored (quantised) features as the candidates, the exact ones of the photo being verified:
    as an index verifies a photo it has just encoded (an addition's mining, a query) against the
    stored ones (asymmetric distances, Jégou et al. 2011)."""
    from convlad.verify import LocalCodes

    class _Asymmetric(LocalCodes):
        def features(self, i):
            return exact.features(i)

    return _Asymmetric(stored.codes, stored.cells, stored.count, stored.grid)


def bytes_of(spec) -> int:
    return spec["features"] * ((spec["pq"] or 80) + spec["cells"]) + 2


def name_of(spec) -> str:
    return f"features={spec['features']} " + (f"pq={spec['pq']}" if spec["pq"] else "int8") + \
        f" cells={spec['cells']}" + (" adc" if spec.get("adc") else "")


SPECS = [{"features": f, "pq": 0, "cells": 2} for f in (300, 200, 150, 100, 64)] + \
        [{"features": 300, "pq": m, "cells": 2} for m in (40, 20, 16, 10, 8)] + \
        [{"features": f, "pq": m, "cells": 2} for f, m in ((200, 16), (200, 10), (150, 20), (150, 16), (100, 20))] + \
        [{"features": f, "pq": m, "cells": 1} for f, m in ((300, 10), (200, 16), (300, 8))] + \
        [{"features": f, "pq": m, "cells": 2, "adc": True} for f, m in ((300, 40), (300, 20), (300, 16), (300, 10), (300, 8),
                                                                        (200, 16), (150, 20), (150, 16))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default=str(SHARED / "mvbench-dev"))
    ap.add_argument("--train", default=str(SHARED / "mvbench-train"))
    ap.add_argument("--views", default=None, help="a synthetic-views benchmark (python -m convlad.study.synviews)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="run the candidates whose name contains this (and today's format)")
    ap.add_argument("--fixed-chance", action="store_true", help="every format at today's chance level, not its own")
    a = ap.parse_args()
    specs = [s for s in SPECS if a.only is None or s is SPECS[0] or a.only in name_of(s)]
    os.environ.setdefault("CONVLAD_PRECISION", "fp32")
    import faiss

    from convlad.pairs import augment, mine_pairs
    from convlad.pipeline import ConvVLAD
    from convlad.study.datasets import load_groups, training_paths
    from convlad.study.evalcache import EvalCache
    from convlad.study.evaluate import encode_benchmark, evaluate_descriptors, fit_model
    from convlad.study.folds import judge
    from convlad.study.metrics import bootstrap_difference
    from convlad.verify import LOCAL_K, chance_level

    def scored(bench_dir, train_dir, label):
        cache = EvalCache()
        bench = load_groups(bench_dir)
        train, _ = training_paths(train_dir)
        model = ConvVLAD()
        fit_model(model, train, cache=cache)
        enc, _, _, _ = encode_benchmark(model, bench, LOCAL_K, cache=cache)
        tr, _, _ = cache.transform(model, train, LOCAL_K, True)
        # PQ codebooks from the training photos' features (100 000 of them at most)
        T = tr.local.codes[np.arange(tr.local.codes.shape[1])[None, :] < tr.local.count[:, None]].astype(np.float32)
        T /= np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-12)
        T = T[np.random.default_rng(0).permutation(len(T))[:100_000]]
        pqs = {}
        for m in sorted({s["pq"] for s in specs if s["pq"]}):
            pq = faiss.ProductQuantizer(T.shape[1], m, 8)
            pq.train(np.ascontiguousarray(T))
            pqs[m] = pq
        aps, rows = {}, {}
        for spec in specs:
            t = time.time()
            L, Lt = variant(enc.local, spec, pqs), variant(tr.local, spec, pqs)
            v = model.verifier(chance=chance_level(variant(tr.local, SPECS[0], pqs) if a.fixed_chance else Lt, seed=0))
            pairs = mine_pairs(enc.X, L, v)
            res = evaluate_descriptors(bench, augment(enc.X, pairs), rerank=100, local=L, verifier=v, pairs=pairs)
            aps[name_of(spec)] = res.aps
            rows[name_of(spec)] = {"bytes": bytes_of(spec), "mAP": float(res.mAP), "chance": v.chance,
                                   "pairs": int(len(pairs)), "global": float(res.extra["mAP_without_rerank"])}
            print(f"{label} {name_of(spec):<28} {bytes_of(spec):>6} B  mAP {res.mAP:.4f} (global "
                  f"{res.extra['mAP_without_rerank']:.4f}), chance {v.chance}, {len(pairs)} pairs, {time.time() - t:.0f}s",
                  flush=True)
        return bench, aps, rows

    out = {}
    bench, aps, rows = scored(a.bench, a.train, "dev")
    ref = aps[name_of(SPECS[0])]
    sym = {k: v for k, v in aps.items() if "adc" not in k}
    families = {"fewer features": {k: v for k, v in sym.items() if "int8" in k and k != name_of(SPECS[0])},
                "pq, 300 features": {k: v for k, v in sym.items() if "features=300 pq" in k and "cells=2" in k},
                "pq, fewer features": {k: v for k, v in sym.items() if "pq" in k and "features=300" not in k and "cells=2" in k},
                "coarser cells": {k: v for k, v in sym.items() if "cells=1" in k},
                "pq, asymmetric": {k: v for k, v in aps.items() if "adc" in k}}
    families = {k: v for k, v in families.items() if v}
    out["dev"] = {"deltas": {k: bootstrap_difference(ref, v) for k, v in aps.items() if k != name_of(SPECS[0])}}
    for k, (d, lo, hi) in out["dev"]["deltas"].items():
        print(f"{k:<34} {rows[k]['bytes']:>6} B  {d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    out["dev"].update(rows=rows, families=judge(families, lambda name: ref, bench))
    if a.views:
        _, aps_v, rows_v = scored(a.views, a.bench, "views")
        ref_v = aps_v[name_of(SPECS[0])]
        out["views"] = {"rows": rows_v, "deltas": {k: bootstrap_difference(ref_v, v) for k, v in aps_v.items()
                                                   if k != name_of(SPECS[0])}}
        for k, (d, lo, hi) in out["views"]["deltas"].items():
            print(f"views {k:<34} {rows_v[k]['bytes']:>6} B  {d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1, default=float))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
