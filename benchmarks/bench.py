"""convlad's speed and memory against a plain baseline measured in the same run (``make bench``).

Prints a table and writes ``benchmarks/results.json``. Every figure is a ratio against a baseline
timed on the same machine in the same run, so the figures hold on a noisy machine:

- end to end, JPEG files → 128-D descriptors, images/s: the plain implementation
  (``convlad.reference``: batches of 16, full-resolution Pillow decode, resize, the whole network,
  per-image numpy VLAD; one step after the other) against ``ConvVLAD.transform``, at scale 1 and 2,
  on mvbench-dev photos and on the 8-megapixel Holidays samples (repeated to make batches);
- where the time goes (decode / forward / encode), each stage timed alone;
- the forward pass in GFLOP/s against this machine's fp32 matmul GFLOP/s, per kind of layer;
- peak memory (each measurement runs in its own process);
- search latency and recall@10 against exact search, exact and IVF-PQ, 10k / 100k / 1M vectors.

    python benchmarks/bench.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CONVLAD_SHARED", REPO.parent / "shared")) / "data"


def peak_rss_mb() -> float:
    """This process' resident high-water mark. VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss across exec, so a child would report its parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- child jobs (each in a fresh process: peak memory is its own) --------------------------------
def job_e2e(method: str, model_path: str, paths: list[str]) -> dict:
    import torch

    from convlad.pipeline import ConvVLAD
    from convlad.reference import plain_descriptors

    model = ConvVLAD.load(model_path)
    model.device = "cpu"
    _ = model.extractor if method == "convlad" else model.backbone
    warm = paths[: min(4, len(paths))]  # first-call costs (allocator, kernels) are not per-image costs
    if method == "convlad":
        model.transform(warm, progress=False)
    else:
        plain_descriptors(model, warm)
    timings: dict = {}
    t = time.perf_counter()
    if method == "convlad":
        _, X, errors = model.transform(paths, progress=False)
        assert not errors, errors
    else:
        X = plain_descriptors(model, paths, timings=timings)
    seconds = time.perf_counter() - t
    out = {"images": len(paths), "seconds": seconds, "img_per_s": len(paths) / seconds, "dim": int(X.shape[1]),
           "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}
    if method == "convlad":
        timings = stage_times(model, paths)
    total = sum(timings.values())
    out["stages_s"] = timings
    out["shares"] = {k: v / total for k, v in timings.items()}
    return out


def stage_times(model, paths) -> dict:
    """The fast path's stages, each timed alone (end to end, decoding overlaps the forward pass)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from convlad.extract import scale_size
    from convlad.functional import local_descriptors
    from convlad.images import load_warped

    sizes = [scale_size(s) for s in model.config.scales]
    t = time.perf_counter()
    with ThreadPoolExecutor(model.workers) as pool:
        decoded = list(pool.map(lambda p: load_warped(p, sizes, model.config.resize), paths))
    decode = time.perf_counter() - t
    ex = model.extractor
    forward = encode = 0.0
    for s in range(0, len(paths), model.batch_size):
        chunk = decoded[s:s + model.batch_size]
        feats = {}
        for si, scale in enumerate(model.config.scales):
            t = time.perf_counter()
            maps = ex.feature_maps(np.stack([d[si] for d in chunk]))
            forward += time.perf_counter() - t
            t = time.perf_counter()
            for layer, m in maps.items():
                feats[(layer, scale)] = local_descriptors(m)
            encode += time.perf_counter() - t
        t = time.perf_counter()
        with torch.inference_mode():
            v = model._concat(feats)
            if model.pca_ is not None:
                model.pca_.encode(v)
        encode += time.perf_counter() - t
    return {"decode": decode, "forward": forward, "encode": encode}


def job_forward(backbone: str, size: int, batch: int = 16, reps: int = 3) -> dict:
    """Achieved GFLOP/s of the forward pass (per kind of layer) against the fp32 matmul ceiling."""
    import torch
    from torch import nn

    from convlad.backbones import get_backbone
    from convlad.extract import FeatureExtractor

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    matmul = 5 * 2 * 2048 ** 3 / (time.perf_counter() - t) / 1e9

    bb = get_backbone(backbone)
    ex = FeatureExtractor(bb, bb.default_pooled or [bb.layers[-1]], device="cpu")  # the fast path's layers
    x = np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    kinds: dict[str, dict] = {}
    starts: dict = {}

    def kind(m: nn.Conv2d) -> str:
        if m.groups > 1 and m.groups == m.in_channels:
            return "depthwise conv"
        if m.kernel_size == (1, 1):
            return "pointwise conv (1×1)"
        return "full conv"

    def pre(m, inp):
        starts[m] = time.perf_counter()

    def post(m, inp, out):
        k = kind(m)
        e = kinds.setdefault(k, {"gflop": 0.0, "seconds": 0.0})
        e["seconds"] += time.perf_counter() - starts[m]
        flops = 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        e["gflop"] += flops / 1e9

    ex.feature_maps(x)
    t = time.perf_counter()
    for _ in range(reps):
        ex.feature_maps(x)
    total_s = (time.perf_counter() - t) / reps
    hooks = [m.register_forward_pre_hook(pre) for m in bb.module.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(post) for m in bb.module.modules() if isinstance(m, nn.Conv2d)]
    ex.feature_maps(x)  # one pass timed layer by layer (the hooks' own cost is small at batch 16)
    for h in hooks:
        h.remove()
    gflop = sum(e["gflop"] for e in kinds.values())
    conv_s = sum(e["seconds"] for e in kinds.values())
    for e in kinds.values():
        e["gflop_per_s"] = e["gflop"] / max(e["seconds"], 1e-9)
        e["share_of_conv_time"] = e["seconds"] / conv_s
        e["share_of_flops"] = e["gflop"] / gflop
    achieved = gflop / total_s
    return {"matmul_gflop_per_s": matmul, "forward_gflop": gflop, "forward_s": total_s, "batch": batch,
            "size": size, "img_per_s": batch / total_s, "forward_gflop_per_s": achieved,
            "fraction_of_matmul": achieved / matmul, "non_conv_share": 1 - conv_s / total_s, "by_kind": kinds,
            "peak_rss_mb": peak_rss_mb()}


def job_search(n: int, d: int = 128, nq: int = 200, seed: int = 0) -> dict:
    """Exact and IVF-PQ search on synthetic descriptors shaped like a photo collection: views in
    clusters (places, objects) of a few to tens of images, unit-norm; queries are new views."""
    import faiss

    from convlad.index import ANN_NPROBE, ExactIndex, build_ann

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 20), d)).astype(np.float32)
    label = rng.integers(0, len(centres), n)
    X = centres[label] + 0.35 * rng.normal(size=(n, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    # a query is one more view of a stored place: its centre plus fresh view noise
    Q = centres[label[rng.integers(0, n, nq)]] + 0.35 * rng.normal(size=(nq, d)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    flat = faiss.IndexFlatL2(d)
    flat.add(X)
    flat.search(Q[:2], 10)
    t = time.perf_counter()
    gt = np.stack([flat.search(Q[i:i + 1], 10)[1][0] for i in range(nq)])  # one query at a time
    faiss_ms = (time.perf_counter() - t) / nq * 1e3
    exact = ExactIndex(X)
    exact.search(Q[:2], 10)
    t = time.perf_counter()
    got = np.stack([exact.search(Q[i:i + 1], 10)[1][0] for i in range(nq)])
    exact_ms = (time.perf_counter() - t) / nq * 1e3
    out = {"n": n, "faiss_flat_ms": faiss_ms, "exact_ms": exact_ms,
           "exact_recall_at_10": float(np.mean([len(set(g) & set(r)) / 10 for g, r in zip(got, gt)]))}
    t = time.perf_counter()
    ann = build_ann(X)
    out["ann_build_s"] = time.perf_counter() - t
    out["ann_factory"] = ann.factory
    curve = []
    for nprobe in sorted({4, 8, 16, 32, 64, ANN_NPROBE}):
        ann.set_nprobe(nprobe)
        ann.search(Q[:2], 10)
        t = time.perf_counter()
        got = np.stack([ann.search(Q[i:i + 1], 10)[1][0] for i in range(nq)])
        ms = (time.perf_counter() - t) / nq * 1e3
        recall = float(np.mean([len(set(g) & set(r)) / 10 for g, r in zip(got, gt)]))
        curve.append({"nprobe": nprobe, "ms": ms, "recall_at_10": recall})
    out["ivfpq"] = curve
    default = next(c for c in curve if c["nprobe"] == ANN_NPROBE)
    out["ivfpq_ms"], out["ivfpq_recall_at_10"] = default["ms"], default["recall_at_10"]
    out["peak_rss_mb"] = peak_rss_mb()
    return out


JOBS = {"e2e": job_e2e, "forward": job_forward, "search": job_search}


def child(job: str, **kw) -> dict:
    """Run a job in a fresh interpreter; its JSON result is the last line of its output."""
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps({"job": job, **kw})],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"benchmark job {job} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- the run -------------------------------------------------------------------------------------
def fit_models(tmp: Path, n_train: int) -> dict[float, str]:
    """The default descriptor at one scale each, fitted on a slice of mvbench-train."""
    from convlad.images import list_images
    from convlad.pipeline import ConvVLAD

    train_dir = SHARED / "mvbench-train" / "images"
    train = [str(train_dir / p) for p in list_images(train_dir)][::max(1, 577 // n_train)][:n_train]
    out = {}
    for scale in (1.0, 2.0):
        path = tmp / f"model-s{scale:g}.npz"
        ConvVLAD(scales=[scale]).fit(train, progress=False).save(path)
        out[scale] = str(path)
    return out


def main():
    ap = argparse.ArgumentParser(description="convlad benchmarks (make bench)")
    ap.add_argument("--child")
    ap.add_argument("--quick", action="store_true", help="fewer images, no 1M search (a smoke run)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results.json"))
    ap.add_argument("--only", default="e2e,forward,search",
                    help="parts to measure; the others are kept from an existing --out file")
    a = ap.parse_args()
    parts = set(a.only.split(","))
    if a.child:
        spec = json.loads(a.child)
        print(json.dumps(JOBS[spec.pop("job")](**spec)))
        return
    if not (SHARED / "mvbench-dev").is_dir():
        sys.exit(f"benchmarks need the real photos in {SHARED} (the shared data folder beside the repo)")
    from convlad.datasets import load_groups

    n_dev = 32 if a.quick else 64
    dev = load_groups(SHARED / "mvbench-dev").paths[::4][:n_dev]
    holidays = sorted(str(p) for p in (SHARED / "samples" / "holidays").glob("*.jpg"))
    holidays = (holidays * 11)[:16]
    results: dict = {"machine": {"cpus": os.cpu_count()}, "e2e": {}}
    if parts != {"e2e", "forward", "search"} and Path(a.out).is_file():
        results = json.loads(Path(a.out).read_text())
    if "e2e" in parts:
        results["e2e"] = measure_e2e(dev, holidays, a.quick)
    if "forward" in parts:
        print("forward pass GFLOP/s ...", flush=True)
        results["forward"] = child("forward", backbone="efficientnet-lite0", size=224)
    if "search" in parts:
        results["search"] = []
        for n in ([10_000, 100_000] if a.quick else [10_000, 100_000, 1_000_000]):
            print(f"search {n} ...", flush=True)
            results["search"].append(child("search", n=n))
    Path(a.out).write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"\nwrote {a.out}")


def measure_e2e(dev: list[str], holidays: list[str], quick: bool) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        print("fitting the descriptors (scale 1 and 2) on mvbench-train ...", flush=True)
        models = fit_models(Path(tmp), 64 if quick else 160)
        for name, paths in (("mvbench-dev", dev), ("holidays-8MP", holidays)):
            for scale, model in models.items():
                row = {}
                for method in ("baseline", "convlad"):
                    print(f"e2e {name} scale {scale:g} {method} ({len(paths)} images) ...", flush=True)
                    row[method] = child("e2e", method=method, model_path=model, paths=paths)
                row["speedup"] = row["convlad"]["img_per_s"] / row["baseline"]["img_per_s"]
                out[f"{name}@{scale:g}"] = row
    for name in ("mvbench-dev", "holidays-8MP"):
        r1, r2 = out[f"{name}@1"], out[f"{name}@2"]
        out[f"{name}: scale 2 / scale 1 cost"] = {
            "convlad": r1["convlad"]["img_per_s"] / r2["convlad"]["img_per_s"],
            "baseline": r1["baseline"]["img_per_s"] / r2["baseline"]["img_per_s"]}
    return out


def print_table(r: dict) -> None:
    print("\nend to end, JPEG → 128-D descriptor (images/s; each row timed in one run)")
    print(f"{'set @ scale':<18}{'baseline':>10}{'convlad':>10}{'speed-up':>10}{'peak MB b/c':>14}   convlad stage shares (decode/forward/encode)")
    for key, row in r["e2e"].items():
        if "speedup" not in row:
            continue
        b, c = row["baseline"], row["convlad"]
        shares = "/".join(f"{c['shares'][k]:.0%}" for k in ("decode", "forward", "encode"))
        bshares = "/".join(f"{b['shares'][k]:.0%}" for k in ("decode", "forward", "encode"))
        print(f"{key:<18}{b['img_per_s']:>10.1f}{c['img_per_s']:>10.1f}{row['speedup']:>9.1f}×"
              f"{b['peak_rss_mb']:>7.0f}/{c['peak_rss_mb']:<6.0f}   {shares} (baseline {bshares})")
    for key, row in r["e2e"].items():
        if "speedup" not in row:
            print(f"{key}: convlad {row['convlad']:.2f}×, baseline {row['baseline']:.2f}×")
    f = r["forward"]
    print(f"\nforward pass (Lite0, {f['size']}², batch {f['batch']}, to the deepest layer used): "
          f"{f['forward_gflop_per_s']:.1f} GFLOP/s = {f['fraction_of_matmul']:.0%} of fp32 matmul "
          f"({f['matmul_gflop_per_s']:.0f} GFLOP/s); {f['img_per_s']:.1f} img/s")
    for k, e in f["by_kind"].items():
        print(f"  {k:<22}{e['share_of_flops']:>6.0%} of FLOPs {e['share_of_conv_time']:>6.0%} of conv time "
              f"{e['gflop_per_s']:>8.1f} GFLOP/s")
    print(f"  outside convolutions (BN, ReLU6, padding, adds): {f['non_conv_share']:.0%} of the time")
    print("\nsearch, one 128-D query at a time (ms/query; recall@10 against exact)")
    for s in r["search"]:
        curve = ", ".join(f"nprobe {c['nprobe']}: {c['ms']:.2f} ms r {c['recall_at_10']:.3f}" for c in s["ivfpq"])
        print(f"  {s['n']:>9,d}  exact {s['exact_ms']:7.2f} ms (faiss flat {s['faiss_flat_ms']:.2f})   {s['ann_factory']} {s['ivfpq_ms']:.2f} ms "
              f"recall {s['ivfpq_recall_at_10']:.3f}  (build {s['ann_build_s']:.0f}s; {curve})")


if __name__ == "__main__":
    main()
