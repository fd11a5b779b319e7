"""convlad's speed and memory against a plain baseline measured in the same run (``make bench``).

Prints a table and writes ``benchmarks/results.json``. Every figure is a ratio against a baseline
timed on the same machine in the same run, so the figures hold on a noisy machine:

- end to end, JPEG files → 128-D descriptors, images/s: the plain implementation
  (``convlad.reference``: batches of 16, full-resolution Pillow decode, resize, the whole network,
  per-image numpy VLAD; one step after the other) against ``ConvVLAD.transform``, eager and
  compiled, at scale 1 and 2, on mvbench-dev photos and on the 8-megapixel Holidays samples
  (repeated to make batches). The three run in turn, for several rounds, in one process; the
  speed-up is the median of the per-round ratios (min and max shown);
- where the time goes (decode / forward / encode), each stage timed alone;
- the forward pass in GFLOP/s against this machine's fp32 matmul GFLOP/s, per kind of layer;
- peak memory (one pass of each method in its own process);
- search latency and recall@10 against exact search, exact and IVF-PQ, 10k / 100k / 1M vectors;
- the index store at 10M synthetic 128-D descriptors on disk: build, IVF-PQ search latency, recall
  and resident memory of a fresh reader, appending 1 000 photos, deleting, compacting.

- compact local features (``codec``): encoding and decoding beside the network, and the default
  search over 100 000 and 1 000 000 photos with int8 and with compact local features.

    python benchmarks/bench.py [--quick] [--only e2e,forward,search,store,serve,ray,rerank,groups,shards,codec]
        [--store-n 10000000]
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
sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/load.py
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
METHODS = ("baseline", "eager", "compiled")


def _runner(method: str, model_path: str):
    """A function paths → descriptors for one method, and the fitted model behind it."""
    from convlad.pipeline import ConvVLAD
    from convlad.reference import plain_descriptors

    from convlad.runtime import Runtime

    model = ConvVLAD.load(model_path, runtime=Runtime(device="cpu", compile=method == "compiled"))
    if method == "baseline":
        timings: dict = {}
        return (lambda ps: plain_descriptors(model, ps, timings=timings)), model, timings

    def run(ps):
        _, X, errors = model.transform(ps, progress=False)
        assert not errors, errors
        return X

    return run, model, None


def worker_e2e(method: str, model_path: str, paths: list[str]) -> None:
    """One method's end-to-end runs, on request: a process per method, so that nothing one does to
    its process (convlad tunes glibc's malloc, compiles kernels) reaches the others. Protocol: one
    JSON line per request on stdout ("ready" after warm-up, then the seconds of each run, then the
    summary when stdin says "quit")."""
    run, model, timings = _runner(method, model_path)
    t = time.perf_counter()
    run(paths[:16])  # first-call costs (allocator, kernels, compilation) are not per-image costs
    print(json.dumps({"ready": True, "warmup_s": time.perf_counter() - t}), flush=True)
    if timings is not None:
        timings.clear()
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        t = time.perf_counter()
        X = run(paths)
        assert X.shape[0] == len(paths), X.shape
        print(json.dumps({"seconds": time.perf_counter() - t}), flush=True)
    import torch

    if timings is None:
        timings = stage_times(model, paths)
    total = sum(timings.values())
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
                      "shares": {k: v / total for k, v in timings.items()}}), flush=True)


def measure_row(model_path: str, paths: list[str], rounds: int) -> dict:
    """Images/s of the baseline and of convlad (eager, compiled), each in its own process, run in
    turn round after round (one at a time: no contention), so that a slow spell of a shared machine
    hits all three alike; the speed-up is the median of the per-round ratios."""
    procs, warmup = {}, {}
    for m in METHODS:  # started one after the other: warm-ups (compilation) do not overlap
        spec = json.dumps({"worker": m, "model_path": model_path, "paths": paths})
        procs[m] = subprocess.Popen([sys.executable, __file__, "--worker", spec], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        warmup[m] = _reply(procs[m])["warmup_s"]
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(rounds):
        for m in METHODS[r % 3:] + METHODS[:r % 3]:  # no method always runs first
            procs[m].stdin.write("run\n")
            procs[m].stdin.flush()
            seconds[m].append(_reply(procs[m])["seconds"])
    out: dict = {"images": len(paths), "rounds": rounds, "compile_s": warmup["compiled"] - warmup["eager"]}
    for m in METHODS:
        procs[m].stdin.write("quit\n")
        procs[m].stdin.flush()
        out[m] = {"seconds": seconds[m], "img_per_s": len(paths) / float(np.median(seconds[m])),
                  **_reply(procs[m])}
        procs[m].wait()
    for m in ("eager", "compiled"):
        ratios = [b / c for b, c in zip(seconds["baseline"], seconds[m])]
        out[f"speedup_{m}"] = {"median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios)}
    return out


def _reply(proc) -> dict:
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"benchmark worker failed (exit {proc.returncode}); its error is above")
    return json.loads(line)


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


def _median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def job_forward(backbone: str, size: int, batch: int = 16, reps: int = 7) -> dict:
    """Achieved GFLOP/s of the forward pass (eager per kind of layer, and compiled) against the fp32
    matmul ceiling, each the median of ``reps`` runs."""
    import torch
    from torch import nn

    from convlad.backbones import get_backbone
    from convlad.extract import FeatureExtractor

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul = 2 * 2048 ** 3 / _median_s(lambda: a @ b, reps) / 1e9
    # the bf16 ceiling of the same run: native on AMX-BF16/AVX512-BF16; emulated elsewhere, where a
    # 2048² product took 100 s (0.17 GFLOP/s) on this AVX2 machine, so a 512² one is timed once
    from convlad.runtime import cpu_has_bf16_engine

    engine = cpu_has_bf16_engine()
    n16 = 2048 if engine else 512
    a16, b16 = a[:n16, :n16].bfloat16(), b[:n16, :n16].bfloat16()
    matmul_bf16 = 2 * n16 ** 3 / _median_s(lambda: a16 @ b16, reps if engine else 1) / 1e9

    bb = get_backbone(backbone)
    layers = [bb.default_layer, *bb.default_pooled] if bb.default_layer else [bb.layers[-1]]
    ex = FeatureExtractor(bb, layers, device="cpu")  # the fast path's layers
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

    total_s = _median_s(lambda: ex.feature_maps(x), reps)
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
    ex.compile = True
    compiled_s = _median_s(lambda: ex.feature_maps(x), reps)
    # the same passes under bf16 autocast, against the bf16 ceiling. Without a bf16 engine it is
    # emulated, 20× slower than fp32 here: one eager pass shows that, and the compiled one (which
    # ran for more than 15 min) is left out
    ex.compile, ex.precision = False, "bf16"
    bf16_s = _median_s(lambda: ex.feature_maps(x), reps if engine else 1)
    bf16_compiled_s = None
    if engine:
        ex.compile = True
        bf16_compiled_s = _median_s(lambda: ex.feature_maps(x), reps)

    def rate(seconds: float | None, ceiling: float) -> dict | None:
        if seconds is None:
            return None
        return {"forward_s": seconds, "img_per_s": batch / seconds, "forward_gflop_per_s": gflop / seconds,
                "fraction_of_matmul": gflop / seconds / ceiling}

    return {"matmul_gflop_per_s": matmul, "matmul_bf16_gflop_per_s": matmul_bf16, "matmul_bf16_size": n16,
            "forward_gflop": gflop,
            "forward_s": total_s, "batch": batch, "size": size, "img_per_s": batch / total_s,
            "forward_gflop_per_s": achieved, "fraction_of_matmul": achieved / matmul,
            "non_conv_share": 1 - conv_s / total_s, "by_kind": kinds, "compiled": rate(compiled_s, matmul),
            "bf16": {"engine": engine, "eager": rate(bf16_s, matmul_bf16),
                     "compiled": rate(bf16_compiled_s, matmul_bf16)},
            "peak_rss_mb": peak_rss_mb()}


def job_search(n: int, d: int = 128, nq: int = 200, seed: int = 0) -> dict:
    """Exact and IVF-PQ search on synthetic descriptors shaped like a photo collection: views in
    clusters (places, objects) of a few to tens of images, unit-norm; queries are new views."""
    import faiss

    from convlad.index.ann import ExactIndex, default_nprobe
    from convlad.index.store import IndexStore

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
    # the IVF-PQ as the store serves it (trained, its shortlist made exact), in a scratch folder
    tmp = tempfile.TemporaryDirectory()
    t = time.perf_counter()
    ann = IndexStore.create(Path(tmp.name) / "ix", dim=d, ann="ivfpq")
    ann.add_vectors(X, [f"{i}.jpg" for i in range(n)])
    ann.search(Q[:1], 10)  # the inverted lists are filled on first use
    out["ann_build_s"] = time.perf_counter() - t
    out["ann_factory"] = ann.m["ivf"]["factory"]
    curve = []
    default = default_nprobe(faiss.extract_index_ivf(ann._ivf).nlist)
    for nprobe in sorted({4, 8, 16, 32, 64, default}):
        ann.set_nprobe(nprobe)
        ann.search(Q[:2], 10)
        t = time.perf_counter()
        got = np.stack([ann.search(Q[i:i + 1], 10)[1][0] for i in range(nq)])
        ms = (time.perf_counter() - t) / nq * 1e3
        recall = float(np.mean([len(set(g) & set(r)) / 10 for g, r in zip(got, gt)]))
        curve.append({"nprobe": nprobe, "ms": ms, "recall_at_10": recall})
    out["ivfpq"] = curve
    default = next(c for c in curve if c["nprobe"] == default)
    out["ivfpq_ms"], out["ivfpq_recall_at_10"] = default["ms"], default["recall_at_10"]
    out["peak_rss_mb"] = peak_rss_mb()
    ann.close()
    tmp.cleanup()
    return out


def _collection(n: int, d: int, seed: int):
    """Synthetic descriptors as job_search makes them, in chunks of 1M rows: (centres, chunk → X)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 20), d)).astype(np.float32)

    def chunk(start: int, stop: int) -> np.ndarray:
        r = np.random.default_rng([seed, start])
        X = centres[r.integers(0, len(centres), stop - start)] + 0.35 * r.normal(size=(stop - start, d)).astype(np.float32)
        return X / np.linalg.norm(X, axis=1, keepdims=True)

    return centres, chunk


def job_store_build(folder: str, n: int, d: int = 128, nq: int = 200, seed: int = 0, segment: int = 1_000_000) -> dict:
    """Write n descriptors into a store a segment at a time, then train its shared IVF-PQ once; keep
    queries and their exact top 10 (a scan of every segment) for the search job."""
    import faiss

    from convlad.index.store import IndexStore

    centres, chunk = _collection(n, d, seed)
    rng = np.random.default_rng(seed + 1)
    Q = centres[rng.integers(0, len(centres), nq)] + 0.35 * rng.normal(size=(nq, d)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    out, t = {"n": n}, time.perf_counter()
    D_gt = np.full((nq, 10), np.inf, np.float32)
    I_gt = np.full((nq, 10), -1, np.int64)
    with IndexStore.create(folder, dim=d, ann="exact") as st:
        for start in range(0, n, segment):
            X = chunk(start, min(n, start + segment))
            ids = st.add_vectors(X, [f"photos/{i:09d}.jpg" for i in range(start, start + len(X))])
            flat = faiss.IndexFlatL2(d)
            flat.add(X)
            D, I = flat.search(Q, 10)
            D, I = np.concatenate([D_gt, D], 1), np.concatenate([I_gt, ids[I]], 1)
            order = np.argsort(D, 1, kind="stable")[:, :10]
            D_gt, I_gt = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
            print(f"  {start + len(X):,d} written", file=sys.stderr, flush=True)
    out["write_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with IndexStore.create(folder, ann="ivfpq") as st:  # trains once on a sample, encodes every segment
        out["ivf"] = st.m["ivf"]
    out["ivf_train_encode_s"] = time.perf_counter() - t
    np.save(Path(folder) / "bench-queries.npy", Q)
    np.save(Path(folder) / "bench-gt.npy", I_gt)
    out["bytes_on_disk"] = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def job_store_search(folder: str) -> dict:
    """A fresh reader: open, then one query at a time through the shared IVF-PQ (its shortlist
    re-ranked from the memory-mapped descriptors)."""
    import faiss

    from convlad.index.store import IndexStore

    Q = np.load(Path(folder) / "bench-queries.npy")
    gt = np.load(Path(folder) / "bench-gt.npy")
    t = time.perf_counter()
    st = IndexStore.open(folder)
    st.search(Q[:2], 10)  # builds the in-memory inverted lists from the segments' codes
    out = {"open_s": time.perf_counter() - t, "images": len(st), "curve": [], "rss_open_mb": _rss_mb()}
    default = faiss.extract_index_ivf(st._ivf).nprobe
    for nprobe in sorted({8, 16, default, 32, 64}) + [default]:  # the default again, last: warm
        st.set_nprobe(nprobe)
        st.search(Q[:2], 10)
        t = time.perf_counter()
        got = np.stack([st.search(Q[i:i + 1], 10)[1][0] for i in range(len(Q))])
        ms = (time.perf_counter() - t) / len(Q) * 1e3
        recall = float(np.mean([len(set(g) & set(r)) / 10 for g, r in zip(got, gt)]))
        out["curve"].append({"nprobe": nprobe, "ms": ms, "recall_at_10": recall})
    out["nprobe"], out["ms"], out["recall_at_10"] = default, out["curve"][-1]["ms"], out["curve"][-1]["recall_at_10"]
    out["curve"] = out["curve"][:-1]
    out["rss_mb"], out["peak_rss_mb"] = _rss_mb(), peak_rss_mb()
    return out


def job_store_write(folder: str, appends: int = 5, batch: int = 1000, d: int = 128) -> dict:
    """The writer on the big store: append 1 000 photos' descriptors (one commit each), delete
    1 000 photos, compact (the small segments merged, the dead rows dropped)."""
    from convlad.index.store import IndexStore

    rng = np.random.default_rng(7)
    t = time.perf_counter()
    st = IndexStore.open(folder, write=True)
    out = {"open_writer_s": time.perf_counter() - t, "append_s": []}
    for a in range(appends):
        X = rng.normal(size=(batch, d)).astype(np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        t = time.perf_counter()
        st.add_vectors(X, [f"new/{a}/{i}.jpg" for i in range(batch)])
        out["append_s"].append(time.perf_counter() - t)
    out["append_1000_s"] = float(np.median(out["append_s"]))
    t = time.perf_counter()
    out["removed"] = st.remove(rng.choice(1_000_000, size=1000, replace=False))
    out["remove_1000_s"] = time.perf_counter() - t
    segments = len(st.m["segments"])
    t = time.perf_counter()
    out["compact"] = st.compact()
    out["compact_s"] = time.perf_counter() - t
    out["segments_before_after"] = [segments, len(st.m["segments"])]
    out["images"] = len(st)
    st.close()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def job_index(model: str, folder: str, out: str, ray: bool) -> dict:
    """Index a folder into a new store, in this process or on a local Ray (2 actors of 1 CPU)."""
    from convlad.pipeline import ConvVLAD
    from convlad.index.store import IndexStore
    from convlad.index.sync import sync

    t = time.perf_counter()
    from convlad.runtime import Runtime

    with IndexStore.create(out, model=ConvVLAD.load(model), root=folder, runtime=Runtime(compile=False)) as st:
        if ray:
            from convlad.index.cluster import sync_with_ray

            s = sync_with_ray(st, None, batch_size=16, progress=False, report=lambda m: None)
        else:
            s = sync(st, progress=False, report=lambda m: None)
        n = len(st)
    seconds = time.perf_counter() - t
    return {"images": n, "seconds": seconds, "img_per_s": n / seconds, "added": s["added"],
            "steady_img_per_s": s.get("steady_img_per_s") or n / seconds}


def job_groups(n: int, method: str, seed: int = 0) -> dict:
    """The graph part of `convlad groups` on synthetic verified pairs: ``n`` photos in groups of 1-12
    (sizes drawn as a collection's: most alone), each group a random tree plus a few more pairs, as
    mining makes them. ``method`` "convlad": ``groups.walks`` (components, representatives, walks);
    "baseline": a plain union-find in Python over the same pairs (components only)."""
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.geometric(0.45, n), 12)
    sizes = sizes[np.cumsum(sizes) <= n]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pairs = [(int(s + rng.integers(0, j)), int(s + j)) for s, k in zip(starts, sizes) for j in range(1, k)]
    pairs += [(int(s + a), int(s + b)) for s, k in zip(starts, sizes) if k > 3
              for a, b in [sorted(rng.choice(k, 2, replace=False))]]
    P, ids = np.array(pairs, np.int64).reshape(-1, 2), np.arange(int(sizes.sum()), dtype=np.int64)
    from convlad.groups import unique, walks  # its imports (SciPy, faiss, torch) are not the graph's cost

    base = peak_rss_mb()
    t = time.perf_counter()
    if method == "convlad":
        found = sum(1 for _ in walks(unique(P), P, 2))  # components, representatives, walks
    else:
        parent = list(range(len(ids)))

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, b in P.tolist():
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        roots = [find(x) for x in range(len(ids))]
        found = sum(1 for c in np.bincount(roots) if c >= 2)
    seconds = time.perf_counter() - t
    return {"n": int(len(ids)), "pairs": int(len(P)), "groups": int(found), "seconds": seconds,
            "peak_rss_mb": peak_rss_mb(), "extra_mb": peak_rss_mb() - base}


def _group_sizes(n: int, rng) -> np.ndarray:
    """Sizes of groups of a collection of about ``n`` photos: 1-12, most alone (geometric)."""
    sizes = np.minimum(rng.geometric(0.45, n), 12)
    return sizes[np.cumsum(sizes) <= n]


def job_groups_build(model: str, folder: str, n: int, photos: list[str], seed: int = 0, chunk: int = 10_000) -> dict:
    """An index of ``n`` photos as `convlad groups` finds one: synthetic descriptors (each group
    around a centre), the real local features of ``photos`` (encoded by ``model``) dealt round, and
    the mining as the index keeps it (``add_vectors(mined=...)``): each photo's 20 candidates, its
    group mates first, their inliers those of real pairs (a tree of sure pairs, 30 inliers, and
    weak ones, 15, between mates; 0-11 with the rest)."""
    from convlad.index.store import IndexStore
    from convlad.pipeline import ConvVLAD
    from convlad.runtime import Runtime
    from convlad.verify import LOCAL_K

    rng = np.random.default_rng(seed)
    m = ConvVLAD.load(model, runtime=Runtime(compile=False))
    real = m.transform(photos, progress=False, local=LOCAL_K).local
    sizes = _group_sizes(n, rng)
    n = int(sizes.sum())
    group = np.repeat(np.arange(len(sizes)), sizes)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])[group]  # each photo's group's first photo
    parent = np.where(np.arange(n) > first, first + (np.arange(n) - first - 1) // 2, -1)  # a binary tree
    centres = rng.normal(size=(len(sizes), m.dim)).astype(np.float32)
    t = time.perf_counter()
    with IndexStore.create(folder, model=m) as st:
        for lo in range(0, n, chunk):
            rows = np.arange(lo, min(n, lo + chunk))
            X = centres[group[rows]] + 0.6 * rng.normal(size=(len(rows), m.dim)).astype(np.float32)
            X /= np.linalg.norm(X, axis=1, keepdims=True)
            cand, inl = rng.integers(0, n, (len(rows), 20)), rng.integers(0, 12, (len(rows), 20))
            for k, i in enumerate(rows):
                mates = np.arange(first[i], first[i] + sizes[group[i]])
                mates = mates[mates != i]
                cand[k, :len(mates)] = mates
                inl[k, :len(mates)] = np.where((parent[mates] == i) | (mates == parent[i]), 30, 15)
            at = rows % len(real)
            st.add_vectors(X, [photos[j] for j in at], local=real[at], mined=(cand, inl))
            print(f"  {rows[-1] + 1:,d} written", file=sys.stderr, flush=True)
    return {"n": n, "write_s": time.perf_counter() - t,
            "bytes_on_disk": sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())}


def job_groups_run(folder: str) -> dict:
    """`convlad groups` on an index, from a fresh reader: every group with its evidence (the
    duplicates verified), as ``convlad groups --csv`` lists them."""
    from convlad.groups import groups
    from convlad.index.store import IndexStore

    import threading

    def anon_mb() -> float:  # memory of its own, not the index's files mapped in
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    t = time.perf_counter()
    st = IndexStore.open(folder)
    opened, base, base_anon = time.perf_counter() - t, _rss_mb(), anon_mb()
    peak, done = [base_anon], threading.Event()

    def sample():
        while not done.wait(0.05):
            peak.append(anon_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    found = groups(st)
    seconds = time.perf_counter() - t
    done.set()
    sampler.join()
    return {"images": len(st), "groups": len(found), "grouped": int(sum(g["size"] for g in found)),
            "duplicates": int(sum(m["duplicate_of"] is not None for g in found for m in g["members"])),
            "open_s": opened, "seconds": seconds, "rss_open_mb": base, "peak_rss_mb": peak_rss_mb(),
            "extra_mb": max(peak + [anon_mb()]) - base_anon, "extra_with_mapped_mb": peak_rss_mb() - base}


def job_shards_build(model: str, folder: str, n: int, photos: list[str], segments: int = 24, seed: int = 0) -> dict:
    """A store of ``n`` photos as the default search meets one: synthetic 128-D descriptors
    (``_collection``), the real local features of ``photos`` (the default 300 a photo, encoded by
    ``model``) dealt round, in ``segments`` segments (24: evenly over 1, 2, 3 or 4 shards), the
    IVF-PQ kept in step as `convlad index` keeps it. No pairs are mined (verifying 20 candidates of
    each of a million photos is hours here); the search verifies its shortlist all the same."""
    from convlad.index.store import IndexStore
    from convlad.pipeline import ConvVLAD
    from convlad.runtime import Runtime
    from convlad.verify import LOCAL_K

    m = ConvVLAD.load(model, runtime=Runtime(compile=False))
    # a compact codec's codes made once for the photos dealt round, as a cluster's workers make them
    real = m.local_codec_.encoded(m.transform(photos, progress=False, local=LOCAL_K).local)
    _, chunk = _collection(n, m.dim, seed)
    t = time.perf_counter()
    step = -(-n // segments)
    with IndexStore.create(folder, model=m, augment="none") as st:
        for lo in range(0, n, step):
            rows = np.arange(lo, min(n, lo + step))
            at = rows % len(real)
            st.add_vectors(chunk(lo, rows[-1] + 1), [photos[j] for j in at], local=real[at])
            print(f"  {rows[-1] + 1:,d} written", file=sys.stderr, flush=True)
        search = st.info()["search"]
    return {"n": n, "write_s": time.perf_counter() - t, "search": search,
            "bytes_on_disk": sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())}


def job_shards_run(folder: str, shards: int, nq: int = 200, clients: int = 4, seed: int = 1, cpus: float = 1.0) -> dict:
    """The default search (global top 100 through the IVF-PQ, re-ranked by verification) of
    ``nq`` queries, from this process over the store (``shards`` 0) or through ``shards`` shards on
    Ray Serve on this machine (the store re-spread first: a manifest change): latency one query at a
    time (p50, p99), then queries/s with ``clients`` at once. A query is a stored photo's
    descriptor, perturbed, with its local features (each finds itself, and verifies 99 others).
    ``cpus``: each replica's CPUs (and threads)."""
    from concurrent.futures import ThreadPoolExecutor

    from convlad import search as S
    from convlad.index.shards import ShardedIndex
    from convlad.index.store import IndexStore

    if shards:
        with IndexStore.open(folder, write=True) as w:
            w.reshard(shards)
    store = IndexStore.open(folder)
    index, verifier = store, store.model.verifier(threads=1)
    if shards:
        from convlad.serving.ray_shards import deploy, undeploy

        t = time.perf_counter()
        index = ShardedIndex(store, deploy(folder, "local", cpus=cpus), timeout=60)
        deploy_s = time.perf_counter() - t
    rng = np.random.default_rng(seed)
    ids = rng.choice(len(store), nq, replace=False)  # ids are 0 … n-1: nothing was deleted
    Q = store.vectors(ids) + 0.05 * rng.normal(size=(nq, store.dim)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    codes, _ = store.local_codes(ids)
    feats = [codes.features(j) for j in range(nq)]

    def one(j):
        t = time.perf_counter()
        (hits,) = S.rank(index, Q[j:j + 1], [feats[j]], S.DEFAULTS, verifier=verifier)
        return time.perf_counter() - t, hits[0].id == ids[j]

    for j in range(5):  # warm: the IVF-PQ built, the pages of the first lists read
        one(j)
    lat = [one(j) for j in range(nq)]
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(nq)))
    qps = nq / (time.perf_counter() - t)
    ms = np.sort([x for x, _ in lat]) * 1e3
    out = {"shards": shards, "cpus": cpus if shards else os.cpu_count(), "queries": nq, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
           "qps": qps, "clients": clients, "found_itself": float(np.mean([ok for _, ok in lat])), "rss_mb": _rss_mb()}
    if shards:
        out["deploy_s"] = deploy_s
        undeploy(folder, shards)
        import ray

        ray.shutdown()
    return out


def job_codec_speed(model: str, photos: list[str], reps: int = 3) -> dict:
    """The compact local codec's cost, per photo, against the network's encoding of the same photos
    (scales 1+2 with their local features, as `convlad index` encodes; threads as the machine has):
    encoding the codes (where `convlad index --ray` runs it: on the workers), and decoding the 100
    photos a query verifies (the search reads them through ``IndexStore.local_codes``)."""
    from convlad.pipeline import ConvVLAD
    from convlad.runtime import Runtime
    from convlad.verify import LOCAL_K

    m = ConvVLAD.load(model, runtime=Runtime(compile=False))
    codec = m.local_codec_
    m.transform(photos[:4], progress=False, local=LOCAL_K)  # warm
    net = _median_s(lambda: m.transform(photos, progress=False, local=LOCAL_K), reps)
    local = m.transform(photos, progress=False, local=LOCAL_K).local
    enc = _median_s(lambda: codec.encode(local), reps)
    arrays = codec.encode(local)
    rows = np.arange(100) % len(local)
    dec = _median_s(lambda: codec.decode(arrays, rows), reps * 5)
    return {"codec": codec.name, "photos": len(photos), "network_ms_per_photo": 1e3 * net / len(photos),
            "encode_ms_per_photo": 1e3 * enc / len(photos), "encode_ratio": enc / net,
            "decode_ms_per_query": 1e3 * dec, "bytes_per_photo": codec.bytes_of(local),
            "int8_bytes_per_photo": local.bytes_per_image}


JOBS = {"codec_speed": job_codec_speed, "index": job_index, "forward": job_forward, "search": job_search, "store_build": job_store_build,
        "store_search": job_store_search, "store_write": job_store_write, "groups": job_groups,
        "groups_build": job_groups_build, "groups_run": job_groups_run, "shards_build": job_shards_build,
        "shards_run": job_shards_run}


def measure_shards(quick: bool, parent: str | None = None) -> dict:
    """The default search over 1-4 shards on Ray Serve on this machine against one process over the
    same store (``job_shards_run``), at 100 000 photos and at 1 000 000 (unless quick; 25 GB of
    local features, more than this machine's memory: verification reads them from disk)."""
    import shutil

    out = []
    folder = Path(tempfile.mkdtemp(prefix="convlad-bench-shards-", dir=parent))
    try:
        photos = _default_model(folder / "m.npz", "shards")
        for n in ([100_000] if quick else [100_000, 1_000_000]):
            print(f"shards: a store of {n:,d} photos with local features ...", flush=True)
            built = child("shards_build", model=str(folder / "m.npz"), folder=str(folder / f"ix{n}"), n=n, photos=photos)
            rows = []
            # one shard of all the cores: the scatter-gather's own cost, the threads being equal
            for shards, cpus in ((0, 1), (1, os.cpu_count() or 1), (1, 1), (2, 1), (3, 1), (4, 1)):
                print(f"shards: {n:,d} photos, {shards or 'one process, no'} shards ...", flush=True)
                rows.append(child("shards_run", folder=str(folder / f"ix{n}"), shards=shards, cpus=cpus))
            # the baseline again, last: at 1 M the page cache holds part of the local features, and
            # what it holds changes from run to run; the ratios are to the mean of the two
            print(f"shards: {n:,d} photos, one process again ...", flush=True)
            rows.append(child("shards_run", folder=str(folder / f"ix{n}"), shards=0))
            base = {k: (rows[0][k] + rows[-1][k]) / 2 for k in ("qps", "p50_ms")}
            for r in rows[1:-1]:
                r["qps_ratio"], r["p50_ratio"] = r["qps"] / base["qps"], r["p50_ms"] / base["p50_ms"]
            out.append({**built, "rows": rows})
            shutil.rmtree(folder / f"ix{n}", ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"sizes": out}


def _default_model(path: Path, part: str, **config) -> list[str]:
    """The default descriptor (with ``config``'s changes) fitted on 64 mvbench-train photos, saved at
    ``path``; returns the mvbench-dev photos (a quarter) whose real local features the synthetic
    collections deal round."""
    from convlad.images import list_images
    from convlad.pipeline import ConvVLAD
    from convlad.study.datasets import load_groups

    train_dir = SHARED / "mvbench-train" / "images"
    print(f"{part}: fitting the default descriptor{' ' + str(config) if config else ''} on 64 mvbench-train photos ...",
          flush=True)
    ConvVLAD(**config).fit([str(train_dir / p) for p in list_images(train_dir)][::9], progress=False).save(path)
    return load_groups(SHARED / "mvbench-dev").paths[::4]


def measure_codec(quick: bool, parent: str | None = None, codec: str = "rq12") -> dict:
    """The compact local codec against today's int8 features: its cost per photo beside the network
    (``job_codec_speed``), then the default search (IVF-PQ top 100, re-ranked) from one process over a
    store of 100 000 photos (and 1 000 000 unless quick) with each layout, the same synthetic
    descriptors and the same real local features dealt round (``job_shards_build``); int8 measured
    first and again last (at 1 M its 25 GB is more than this machine's memory holds)."""
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="convlad-bench-codec-", dir=parent))
    try:
        photos = _default_model(folder / "int8.npz", "codec")
        _default_model(folder / "compact.npz", "codec", local_codec=codec)
        print(f"codec: {codec} against the network, per photo ...", flush=True)
        out = {"speed": child("codec_speed", model=str(folder / "compact.npz"), photos=photos), "sizes": []}
        for n in ([100_000] if quick else [100_000, 1_000_000]):
            rows = {}
            for name in ("int8", "compact"):
                print(f"codec: a store of {n:,d} photos, {name} local features ...", flush=True)
                built = child("shards_build", model=str(folder / f"{name}.npz"), folder=str(folder / f"{name}{n}"),
                              n=n, photos=photos)
                rows[name] = {**built, **child("shards_run", folder=str(folder / f"{name}{n}"), shards=0)}
            print(f"codec: {n:,d} photos, int8 again ...", flush=True)
            again = child("shards_run", folder=str(folder / f"int8{n}"), shards=0)
            base = {k: (rows["int8"][k] + again[k]) / 2 for k in ("qps", "p50_ms")}
            c = rows["compact"]
            out["sizes"].append({"n": n, "int8": rows["int8"], "int8_again": again, "compact": c,
                                 "bytes_ratio": c["bytes_on_disk"] / rows["int8"]["bytes_on_disk"],
                                 "qps_ratio": c["qps"] / base["qps"], "p50_ratio": c["p50_ms"] / base["p50_ms"]})
            for name in ("int8", "compact"):
                shutil.rmtree(folder / f"{name}{n}", ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def measure_groups(quick: bool, parent: str | None = None) -> dict:
    """Grouping at 10 000 and 100 000 photos, each part in a fresh process: the graph part
    (convlad's against a plain union-find over the same pairs, measured in the same run; and 1 000 000
    and 10 000 000 unless quick), then `convlad groups` end to end on an index (``job_groups_build``): from a fresh
    reader, every group with its evidence, its time and its memory beyond the open index."""
    import shutil

    out = []
    for n in ([10_000, 100_000] if quick else [10_000, 100_000, 1_000_000, 10_000_000]):
        print(f"groups {n} ...", flush=True)
        c, b = child("groups", n=n, method="convlad"), child("groups", n=n, method="baseline")
        assert c["groups"] == b["groups"], (c, b)
        out.append({**c, "baseline_seconds": b["seconds"], "ratio": c["seconds"] / b["seconds"]})
    e2e = []
    folder = Path(tempfile.mkdtemp(prefix="convlad-bench-groups-", dir=parent))
    try:
        photos = _default_model(folder / "m.npz", "groups")
        for n in [10_000, 100_000]:
            print(f"groups: an index of {n:,d} photos ...", flush=True)
            built = child("groups_build", model=str(folder / "m.npz"), folder=str(folder / f"ix{n}"), n=n,
                          photos=photos)
            e2e.append({**child("groups_run", folder=str(folder / f"ix{n}")), "write_s": built["write_s"],
                        "bytes_on_disk": built["bytes_on_disk"]})
            shutil.rmtree(folder / f"ix{n}", ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"rows": out, "end_to_end": e2e}


def measure_serve(quick: bool) -> dict:
    """`convlad serve` under 200 concurrent clients (benchmarks/load.py): the default server
    (micro-batched, compiled, precision auto) against one query per eager fp32 pass, on an index of
    mvbench-dev with the default descriptor."""
    from load import compare

    from convlad.study.datasets import load_groups
    from convlad.images import list_images
    from convlad.pipeline import ConvVLAD
    from convlad.index.store import IndexStore
    from convlad.index.sync import sync

    with tempfile.TemporaryDirectory() as tmp:
        print("serve: fitting the default descriptor, indexing mvbench-dev ...", flush=True)
        train_dir = SHARED / "mvbench-train" / "images"
        train = [str(train_dir / p) for p in list_images(train_dir)][::4]
        model = ConvVLAD().fit(train, progress=False)
        dev = SHARED / "mvbench-dev"
        with IndexStore.create(Path(tmp) / "dev.index", model=model, root=dev / "images") as st:
            sync(st, progress=False, report=lambda m: None)
        queries = load_groups(dev).paths[::3]
        seconds = 15 if quick else 60
        print(f"serve: 200 clients × {seconds} s, one query per eager fp32 pass, then the default server ...", flush=True)
        return compare(str(Path(tmp) / "dev.index"), queries, clients=200, seconds=seconds)


def measure_rerank(quick: bool) -> dict:
    """Re-ranking mvbench-dev's top 100 by spatial verification through the one search
    (``search.rank`` on eval's ``MemoryIndex``, augmented as an index is by default), against the
    global ranking of the same index in the same run (the issue's budget: ≤ 50 ms added per query
    on 2 cores); and the mining that augmentation and the learned whitening share, against the
    encoding of the same photos, both per 1 000 photos."""
    from convlad.study.datasets import load_groups
    from convlad.study.evaluate import evaluate_ranking, query_descriptors
    from convlad.images import list_images
    from convlad.pipeline import ConvVLAD
    from convlad.search import MemoryIndex, Settings, rank
    from convlad.verify import LOCAL_K
    from convlad.whitening import learn_whitening

    print("rerank: fitting the default descriptor, encoding mvbench-dev with its local features ...", flush=True)
    train_dir = SHARED / "mvbench-train" / "images"
    model = ConvVLAD().fit([str(train_dir / p) for p in list_images(train_dir)], progress=False)
    bench = load_groups(SHARED / "mvbench-dev")
    t = time.perf_counter()
    enc = model.transform(bench.paths, progress=False, local=LOCAL_K)
    t_encode = time.perf_counter() - t
    X, L = enc.X, enc.local
    t = time.perf_counter()
    lw, pairs = learn_whitening(X, L, model.pair_verifier(), progress=False)
    t_whiten = time.perf_counter() - t
    index = MemoryIndex(X, L, model.verifier(), pairs)
    queries = list(range(0, bench.n_queries, 4 if quick else 1))
    Q = query_descriptors(bench, X)
    feats = [L.features(bench.query_db[q]) for q in queries]
    junk = [sorted(bench.junk[q]) for q in queries]
    n = 100

    def ranking(rerank):
        """Per query: its ranking (junk first, as eval scores it) and its seconds."""
        R, times = np.zeros((bench.n_queries, len(X)), np.int64), []
        for j, q in enumerate(queries):
            t = time.perf_counter()
            hits, = rank(index, Q[q:q + 1], [feats[j]], Settings(k=len(X), rerank=rerank), exclude=[junk[j]])
            times.append(time.perf_counter() - t)
            R[q] = np.concatenate([np.asarray(junk[j], np.int64), [h.id for h in hits]])
        return R, np.asarray(times)

    R0, t0 = ranking(0)
    R1, t1 = ranking(n)
    score = (lambda R: evaluate_ranking(bench, R).mAP) if not quick else (lambda R: None)
    added = t1 - t0
    return {"mAP": score(R0), "mAP_rerank": score(R1),
            "rank_ms": 1000 * float(np.mean(t0)), "rerank_ms_mean": 1000 * float(np.mean(added)),
            "rerank_ms_p95": 1000 * float(np.percentile(added, 95)), "bytes_per_image": L.bytes_per_image,
            "shortlist": n, "queries": len(queries), "whiten_s_per_1000": 1000 * t_whiten / len(X),
            "encode_s_per_1000": 1000 * t_encode / len(X), "whiten_pairs": len(pairs)}


def measure_ray(quick: bool) -> dict:
    """`convlad index` on mvbench-dev at scale 1: one process against a local Ray cluster (two
    model replicas of one CPU each), alternated over rounds; wall time from start to the last commit,
    Ray's start and the actors' model loading included."""
    from convlad.images import list_images
    from convlad.pipeline import ConvVLAD

    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        train_dir = SHARED / "mvbench-train" / "images"
        train = [str(train_dir / p) for p in list_images(train_dir)][::4]
        ConvVLAD(scales=[1]).fit(train, progress=False).save(Path(tmp) / "m.npz")
        photos = Path(tmp) / "photos"  # mvbench-dev's 408 photos, twice (copies: the walk skips links to one file)
        for copy in range(2):
            for p in list_images(SHARED / "mvbench-dev"):
                (photos / str(copy) / p).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(SHARED / "mvbench-dev" / p, photos / str(copy) / p)
        rows = {"single": [], "ray": []}
        for r in range(1 if quick else 3):
            for kind in ("single", "ray"):
                print(f"ray: round {r + 1}, {kind} ...", flush=True)
                rows[kind].append(child("index", model=str(Path(tmp) / "m.npz"), folder=str(photos),
                                        out=str(Path(tmp) / f"{kind}{r}.index"), ray=kind == "ray"))
        ratios = [b["img_per_s"] / a["img_per_s"] for a, b in zip(rows["single"], rows["ray"])]
        steady = [b["steady_img_per_s"] / a["img_per_s"] for a, b in zip(rows["single"], rows["ray"])]
        return {**rows, "ratio_median": float(np.median(ratios)), "ratios": ratios,
                "steady_ratio_median": float(np.median(steady)), "steady_ratios": steady}


def measure_store(n: int, parent: str | None) -> dict:
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="convlad-bench-store-", dir=parent))
    try:
        print(f"store: writing {n:,d} descriptors, training the IVF-PQ ...", flush=True)
        out = {"build": child("store_build", folder=str(folder / "ix"), n=n)}
        print("store: search from a fresh reader ...", flush=True)
        out["search"] = child("store_search", folder=str(folder / "ix"))
        print("store: append, delete, compact ...", flush=True)
        out["write"] = child("store_write", folder=str(folder / "ix"))
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def child(job: str, **kw) -> dict:
    """Run a job in a fresh interpreter; its JSON result is the last line of its output."""
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps({"job": job, **kw})],
                       stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"benchmark job {job} failed (its error is above)")
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


PARTS = ("e2e", "forward", "search", "store", "serve", "ray", "rerank", "groups", "shards", "codec")


def main():
    ap = argparse.ArgumentParser(description="convlad benchmarks (make bench)")
    ap.add_argument("--child")
    ap.add_argument("--worker")
    ap.add_argument("--quick", action="store_true", help="fewer images, no 1M search (a smoke run)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results.json"))
    ap.add_argument("--only", default=",".join(PARTS),
                    help="parts to measure; the others are kept from an existing --out file")
    ap.add_argument("--store-n", type=int, default=10_000_000, help="descriptors in the store benchmark")
    ap.add_argument("--store-dir", default=None, help="folder for the store benchmark's files (about 0.6 kB "
                    "per descriptor; default: the system's temporary folder)")
    a = ap.parse_args()
    parts = set(a.only.split(","))
    if a.worker:
        spec = json.loads(a.worker)
        worker_e2e(spec.pop("worker"), **spec)
        return
    if a.child:
        spec = json.loads(a.child)
        print(json.dumps(JOBS[spec.pop("job")](**spec)))
        return
    if not (SHARED / "mvbench-dev").is_dir():
        sys.exit(f"benchmarks need the real photos in {SHARED} (the shared data folder beside the repo)")
    from convlad.study.datasets import load_groups

    dev = load_groups(SHARED / "mvbench-dev").paths[::2][:32 if a.quick else 96]
    holidays = sorted(str(p) for p in (SHARED / "samples" / "holidays").glob("*.jpg"))
    # 64: a pipeline that overlaps decoding with the network needs a few batches to reach its steady
    # state, which is what a collection of thousands of photos sees
    holidays = (holidays * 64)[:16 if a.quick else 64]
    import torch

    from convlad.runtime import cpu_flags, resolve_precision

    # every speed figure with the CPU's flags and the arithmetic `--precision auto` picks here
    machine = {"cpus": os.cpu_count(), "cpu_flags": list(cpu_flags()),
               "precision_auto": resolve_precision("auto", torch.device("cpu"))}
    results: dict = {"machine": machine, "e2e": {}}
    every = parts == set(PARTS)
    if not every and Path(a.out).is_file():
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
    if "store" in parts:
        results["store"] = measure_store(1_000_000 if a.quick else a.store_n, a.store_dir)
    if "serve" in parts:
        results["serve"] = measure_serve(a.quick)
    if "ray" in parts:
        results["ray"] = measure_ray(a.quick)
    if "rerank" in parts:
        results["rerank"] = measure_rerank(a.quick)
    if "groups" in parts:
        results["groups"] = measure_groups(a.quick, a.store_dir)
    if "shards" in parts:
        results["shards"] = measure_shards(a.quick, a.store_dir)
    if "codec" in parts:
        results["codec"] = measure_codec(a.quick, a.store_dir)
    # a part measured alone keeps the machine it ran on: the others may come from another one
    for part in parts:
        if isinstance(results.get(part), dict):
            results[part]["machine"] = machine
    if every or "machine" not in results:
        results["machine"] = machine
    Path(a.out).write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"\nwrote {a.out}")


def measure_e2e(dev: list[str], holidays: list[str], quick: bool) -> dict:
    out: dict = {}
    rounds = 2 if quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        print("fitting the descriptors (scale 1 and 2) on mvbench-train ...", flush=True)
        models = fit_models(Path(tmp), 64 if quick else 160)
        for name, paths in (("mvbench-dev", dev), ("holidays-8MP", holidays)):
            for scale, model in models.items():
                print(f"e2e {name} scale {scale:g}: baseline, eager, compiled × {rounds} rounds "
                      f"({len(paths)} images) ...", flush=True)
                row = measure_row(model, paths, rounds)
                out[f"{name}@{scale:g}"] = row
    for name in ("mvbench-dev", "holidays-8MP"):
        r1, r2 = out[f"{name}@1"], out[f"{name}@2"]
        out[f"{name}: scale 2 / scale 1 cost"] = {m: r1[m]["img_per_s"] / r2[m]["img_per_s"] for m in METHODS}
    return out


def print_table(r: dict) -> None:
    print("\nend to end, JPEG → 128-D descriptor (images/s, median of interleaved rounds; speed-up: median "
          "[min–max] of the per-round ratios)")
    print(f"{'set @ scale':<18}{'baseline':>9}{'eager':>8}{'compiled':>9}  {'speed-up eager':<20}"
          f"{'speed-up compiled':<20}{'compile':>8}{'peak MB b/e/c':>17}   compiled shares decode/forward/encode")
    # a part measured alone (--only) carries the machine it ran on among its rows
    rows = {key: row for key, row in r["e2e"].items() if key != "machine"}
    for key, row in rows.items():
        if "speedup_compiled" not in row:
            continue
        su = {m: row[f"speedup_{m}"] for m in ("eager", "compiled")}
        fmt = {m: f"{v['median']:.1f}× [{v['min']:.1f}–{v['max']:.1f}]" for m, v in su.items()}
        mem = "/".join(f"{row[m]['peak_rss_mb']:.0f}" for m in METHODS)
        shares = "/".join(f"{row['compiled']['shares'][k]:.0%}" for k in ("decode", "forward", "encode"))
        print(f"{key:<18}{row['baseline']['img_per_s']:>9.1f}{row['eager']['img_per_s']:>8.1f}"
              f"{row['compiled']['img_per_s']:>9.1f}  {fmt['eager']:<20}{fmt['compiled']:<20}"
              f"{row['compile_s']:>7.0f}s{mem:>17}   {shares}")
    for key, row in rows.items():
        if "speedup_compiled" not in row:
            print(f"{key}: " + ", ".join(f"{m} {row[m]:.2f}×" for m in METHODS))
    if "store" in r:
        b, q, w = r["store"]["build"], r["store"]["search"], r["store"]["write"]
        print(f"\nindex store, {b['n']:,d} synthetic 128-D descriptors on disk ({b['bytes_on_disk'] / 1e9:.1f} GB; "
              f"{b['ivf']['factory']} trained once on a sample)")
        print(f"  build: write {b['write_s']:.0f}s, IVF-PQ train + encode {b['ivf_train_encode_s']:.0f}s")
        curve = ", ".join(f"nprobe {c['nprobe']}: {c['ms']:.2f} ms r {c['recall_at_10']:.3f}" for c in q["curve"])
        print(f"  search (fresh reader, one query at a time, nprobe {q['nprobe']}): {q['ms']:.2f} ms/query, recall@10 "
              f"{q['recall_at_10']:.3f}; resident {q['rss_mb']:.0f} MB (peak {q['peak_rss_mb']:.0f} MB); open "
              f"{q['open_s']:.1f}s  ({curve})")
        print(f"  append 1 000 photos: {w['append_1000_s'] * 1e3:.0f} ms (median of {len(w['append_s'])}); delete 1 000: "
              f"{w['remove_1000_s'] * 1e3:.0f} ms; compact {w['segments_before_after'][0]} → "
              f"{w['segments_before_after'][1]} segments, {w['compact']['dropped']} dead rows: {w['compact_s']:.1f}s")
    if "shards" in r:
        print("\nthe default search (IVF-PQ top 100, re-ranked by verification) over shards on Ray Serve, this machine; "
              "baseline: one process over the same store")
        for size in r["shards"]["sizes"]:
            print(f"  {size['n']:,d} photos with local features ({size['bytes_on_disk'] / 1e9:.1f} GB on disk; {size['search']})")
            for row in size["rows"]:
                label = f"{row['shards']} shard(s) × {row.get('cpus', 1):g} CPU" if row["shards"] else "one process"
                ratio = f"  ×{row['qps_ratio']:.2f} q/s, p50 ×{row['p50_ratio']:.2f}" if row["shards"] else ""
                print(f"    {label:<20} p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                      f"{row['qps']:6.1f} q/s with {row['clients']} clients{ratio}")
    if "codec" in r:
        sp = r["codec"]["speed"]
        print(f"\ncompact local features ({sp['codec']}, {sp['bytes_per_photo']} bytes a photo against "
              f"{sp['int8_bytes_per_photo']}): encoding {sp['encode_ms_per_photo']:.1f} ms a photo, "
              f"×{sp['encode_ratio']:.2f} the network's {sp['network_ms_per_photo']:.1f} ms; decoding a query's "
              f"100 photos {sp['decode_ms_per_query']:.1f} ms")
        for size in r["codec"]["sizes"]:
            i8, again, c = size["int8"], size["int8_again"], size["compact"]
            print(f"  {size['n']:,d} photos, the default search from one process: int8 ({i8['bytes_on_disk'] / 1e9:.1f} GB) "
                  f"p50 {i8['p50_ms']:.1f} / {again['p50_ms']:.1f} ms, {i8['qps']:.1f} / {again['qps']:.1f} q/s; "
                  f"compact ({c['bytes_on_disk'] / 1e9:.2f} GB, ×{size['bytes_ratio']:.2f}) p50 {c['p50_ms']:.1f} ms "
                  f"(×{size['p50_ratio']:.2f}), p99 {c['p99_ms']:.1f} ms, {c['qps']:.1f} q/s (×{size['qps_ratio']:.2f})")
    if "serve" in r:
        print("\nconvlad serve, 200 concurrent clients on loopback posting mvbench-dev photos (default descriptor)")
        for key in ("single", "batched"):
            v = r["serve"][key]
            how = f"{v.get('precision', 'fp32')}, {'compiled' if v.get('compiled') else 'eager'}"
            label = (f"one query per pass ({how})" if key == "single"
                     else f"default: batched ({how}, mean batch {v['mean_batch']})")
            print(f"  {label:<40} {v['qps']:6.1f} queries/s  p50 {v['p50_ms']:6.0f} ms  p95 {v['p95_ms']:6.0f} ms  "
                  f"p99 {v['p99_ms']:6.0f} ms  errors {v['errors']}/{v['requests']}  memory {v['rss_mb']:.0f} MB "
                  f"(peak {v['peak_rss_mb']:.0f})")
        print(f"  the default server: {r['serve']['qps_ratio']:.2f}× the queries/s, p99 × {r['serve']['p99_ratio']:.2f}; "
              f"CPU flags {' '.join(r['serve']['batched'].get('cpu_flags', []))}")
    if "ray" in r:
        v = r["ray"]
        one = ", ".join(f"{x['img_per_s']:.1f}" for x in v["single"])
        ray = ", ".join(f"{x['img_per_s']:.1f}" for x in v["ray"])
        steady = ", ".join(f"{x['steady_img_per_s']:.1f}" for x in v["ray"])
        print(f"\nconvlad index, mvbench-dev × 2 ({v['single'][0]['images']} photos), scale 1, images/s per round: "
              f"one process {one}; local Ray, 2 actors × 1 CPU: {ray} with Ray's start, {steady} once started; "
              f"Ray / one process: median {v['ratio_median']:.2f}× with the start, {v['steady_ratio_median']:.2f}× once started")
    if "rerank" in r:
        v = r["rerank"]
        before, after = (f"{v[k]:.3f}" if v[k] is not None else "(not scored in --quick)" for k in ("mAP", "mAP_rerank"))
        print(f"\nre-ranking mvbench-dev's top {v['shortlist']} by spatial verification ({v['bytes_per_image']} bytes "
              f"per image; the one search, database augmented): mAP {before} → {after}; {v['rerank_ms_mean']:.1f} ms "
              f"added per query (p95 {v['rerank_ms_p95']:.1f}), against {v['rank_ms']:.2f} ms for the global ranking")
        if "whiten_s_per_1000" in v:
            print(f"mining and the learned whitening ({v['whiten_pairs']} pairs): {v['whiten_s_per_1000']:.1f} s per 1 000 "
                  f"photos, against {v['encode_s_per_1000']:.0f} s to encode them "
                  f"({v['whiten_s_per_1000'] / v['encode_s_per_1000']:.2f}×)")
    if "groups" in r:
        print("\ngroups, the graph part (components, representatives, walks) on synthetic verified pairs:")
        for g in r["groups"]["rows"]:
            print(f"  {g['n']:>9,d} photos, {g['pairs']:,d} pairs, {g['groups']:,d} groups: {g['seconds']:.2f} s "
                  f"(a plain union-find {g['baseline_seconds']:.2f} s, {g['ratio']:.1f}×), "
                  f"{g['extra_mb']:.0f} MB beyond the pairs")
        for g in r["groups"].get("end_to_end", []):
            print(f"  `convlad groups` on an index of {g['images']:,d} photos ({g['bytes_on_disk'] / 2**30:.1f} GiB): "
                  f"{g['groups']:,d} groups of {g['grouped']:,d} photos, {g['duplicates']:,d} duplicates, in "
                  f"{g['seconds']:.1f} s (open {g['open_s']:.1f} s), {g['extra_mb']:.0f} MB of its own beyond the open "
                  f"index (with the index's pages it read: {g['extra_with_mapped_mb']:.0f} MB)")
    if "forward" not in r or "search" not in r:
        return
    f = r["forward"]
    print(f"\nforward pass (Lite0, {f['size']}², batch {f['batch']}, to the deepest layer used), fp32 matmul "
          f"{f['matmul_gflop_per_s']:.0f} GFLOP/s:")
    print(f"  eager    {f['forward_gflop_per_s']:6.1f} GFLOP/s = {f['fraction_of_matmul']:.0%} of matmul; "
          f"{f['img_per_s']:.1f} img/s")
    if "compiled" in f:
        c = f["compiled"]
        print(f"  compiled {c['forward_gflop_per_s']:6.1f} GFLOP/s = {c['fraction_of_matmul']:.0%} of matmul; "
              f"{c['img_per_s']:.1f} img/s")
    if "bf16" in f:
        print(f"  bf16 matmul {f['matmul_bf16_gflop_per_s']:.0f} GFLOP/s ({f['matmul_bf16_gflop_per_s'] / f['matmul_gflop_per_s']:.2f}× "
              f"fp32; CPU flags {' '.join(r.get('machine', {}).get('cpu_flags', []))}):")
        for how in ("eager", "compiled"):
            c = f["bf16"][how]
            if c is None:
                print(f"  bf16 {how:<8} not measured: no bf16 engine on this CPU (emulated)")
                continue
            print(f"  bf16 {how:<8} {c['forward_gflop_per_s']:6.1f} GFLOP/s = {c['fraction_of_matmul']:.0%} of bf16 matmul; "
                  f"{c['img_per_s']:.1f} img/s")
    print("  eager, by kind of layer:")
    for k, e in f["by_kind"].items():
        print(f"  {k:<22}{e['share_of_flops']:>6.0%} of FLOPs {e['share_of_conv_time']:>6.0%} of conv time "
              f"{e['gflop_per_s']:>8.1f} GFLOP/s")
    print(f"  outside convolutions (ReLU6, padding, adds): {f['non_conv_share']:.0%} of the eager time")
    print("\nsearch, one 128-D query at a time (ms/query; recall@10 against exact)")
    for s in r["search"]:
        curve = ", ".join(f"nprobe {c['nprobe']}: {c['ms']:.2f} ms r {c['recall_at_10']:.3f}" for c in s["ivfpq"])
        print(f"  {s['n']:>9,d}  exact {s['exact_ms']:7.2f} ms (faiss flat {s['faiss_flat_ms']:.2f})   {s['ann_factory']} {s['ivfpq_ms']:.2f} ms "
              f"recall {s['ivfpq_recall_at_10']:.3f}  (build {s['ann_build_s']:.0f}s; {curve})")


if __name__ == "__main__":
    main()
