"""int8 for the network, measured (issue: "Measure int8"): PT2E post-training quantization with
torchao's X86InductorQuantizer (oneDNN's int8 kernels: AMX-INT8 or VNNI where the CPU has them),
calibrated on training photos, then compiled. Reports images/s against compiled fp32 on the same
chunks, and mvbench-dev's mAP with and without re-ranking, each with the bootstrap interval of its
difference from fp32. Needs `pip install torchao` (not a dependency of convlad).

    python benchmarks/int8.py [--calibrate 64] [--model model.npz] [--out benchmarks/int8.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def quantize(ex, shapes, calibration):
    """One int8 module per chunk shape (exported with static shapes), compiled with frozen weights."""
    from torch._inductor import config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    from convlad.extract import network_input

    out = {}
    for shape in shapes:
        # the traced graph on its own (exporting it nested in extract._Tapped loses its attributes);
        # the input normalisation stays outside, in float
        example = network_input(ex.backbone, torch.zeros(shape, dtype=torch.uint8))
        m = torch.export.export(ex._net.graph, (example,)).module()
        # the quantizer finds convolutions by the module type export records as each node's
        # source; the graph traced by torch.fx first reaches export without it
        for node in m.graph.nodes:
            if node.target == torch.ops.aten.conv2d.default and "source_fn_stack" not in node.meta:
                node.meta["source_fn_stack"] = [(node.name, torch.nn.Conv2d)]
            elif node.target == torch.ops.aten.relu6.default and "source_fn_stack" not in node.meta:
                node.meta["source_fn_stack"] = [(node.name, torch.nn.ReLU6)]
        m = prepare_pt2e(m, quantizer)
        with torch.no_grad():
            for batch in calibration[shape]:
                m(network_input(ex.backbone, batch))
        m = convert_pt2e(m)
        with inductor_config.patch(freezing=True), torch.no_grad():
            c = torch.compile(m)
            c(example)
        out[shape] = lambda x, c=c: c(network_input(ex.backbone, x))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibrate", type=int, default=64, help="training photos to calibrate on")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "int8.json"))
    ap.add_argument("--model", help="a fitted model (`convlad train`) instead of fitting the default one")
    a = ap.parse_args()
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        sys.exit("benchmarks/int8.py needs torchao: pip install torchao")
    from convlad.study.datasets import load_groups, training_paths
    from convlad.study.evaluate import evaluate_descriptors
    from convlad.extract import scale_size
    from convlad.runtime import cpu_flags
    from convlad.images import load_warped
    from convlad.study.metrics import bootstrap_difference
    from convlad.pipeline import ConvVLAD

    torch.manual_seed(0)
    bench = load_groups(SHARED / "mvbench-dev")
    train, _ = training_paths(SHARED / "mvbench-train")
    model = ConvVLAD.load(a.model) if a.model else ConvVLAD().fit(train, progress=True)
    model = model.with_runtime(precision="fp32")
    ex = model.extractor
    sizes = [scale_size(s) for s in model.config.scales]
    steps = {n: max(1, ex.max_batch_pixels // (n * n)) for n in sizes}
    shapes = [(steps[n], n, n, 3) for n in sizes]
    calib = {s: [] for s in shapes}
    rng = np.random.default_rng(0)
    picks = [train[i] for i in rng.choice(len(train), min(a.calibrate, len(train)), replace=False)]
    for s in shapes:
        n, step = s[1], s[0]
        imgs = [load_warped(p, [n], model.config.resize)[0] for p in picks]
        calib[s] = [torch.from_numpy(np.stack(imgs[i:i + step])) for i in range(0, len(imgs) - step + 1, step)]
    print(f"calibrating and compiling int8 for chunk shapes {shapes} ...", flush=True)
    t = time.time()
    q = quantize(ex, shapes, calib)
    quantize_s = time.time() - t

    # speed: the same chunks, compiled fp32 against compiled int8, interleaved
    ex.compile = True
    inputs = {s: calib[s][:8] for s in shapes}

    def run_fp32():
        for s in shapes:
            for x in inputs[s]:
                ex.feature_maps(x.numpy())

    def run_int8():
        with torch.no_grad():
            for s in shapes:
                for x in inputs[s]:
                    q[s](x)

    run_fp32(), run_int8()
    times = {"fp32": [], "int8": []}
    for _ in range(3):
        for name, f in (("fp32", run_fp32), ("int8", run_int8)):
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    n_img = sum(len(inputs[s]) * s[0] for s in shapes) / len(shapes)  # images, each at every scale
    speed = {k: n_img / float(np.median(v)) for k, v in times.items()}

    # quality: mvbench-dev encoded through fp32 and through int8, the same vocabularies and PCA
    enc32 = model.transform(bench.paths, local=300)
    compiled, ex._compiled = ex._compiled, None

    orig_run = ex._run_chunk

    def run_chunk(x, step):
        b = x.shape[0]
        shape = (step, *x.shape[1:])
        if shape in q:
            if b < step:
                x = torch.cat([x, x.new_zeros((step - b, *x.shape[1:]))])
            out = q[shape](x)
            return tuple(o[:b].float() for o in out)
        return orig_run(x, step)

    ex._run_chunk = run_chunk
    model = model.with_runtime(compile=False)
    enc8 = model.transform(bench.paths, local=300)
    ex._run_chunk, ex._compiled = orig_run, compiled
    v = model.verifier()
    r32 = evaluate_descriptors(bench, enc32.X, rerank=100, local=enc32.local, verifier=v)
    r8 = evaluate_descriptors(bench, enc8.X, rerank=100, local=enc8.local, verifier=v)
    cos = (enc32.X * enc8.X).sum(1)
    out = {
        "cpu_flags": list(cpu_flags()), "threads": torch.get_num_threads(), "chunk_shapes": shapes,
        "calibration_photos": len(picks), "quantize_and_compile_s": quantize_s,
        "img_per_s": speed, "int8_over_fp32": speed["int8"] / speed["fp32"],
        "mAP": {"fp32": r32.extra["mAP_without_rerank"], "int8": r8.extra["mAP_without_rerank"]},
        "mAP_rerank": {"fp32": r32.mAP, "int8": r8.mAP},
        "difference_global": bootstrap_difference(r32.aps_without_rerank, r8.aps_without_rerank),
        "difference_rerank": bootstrap_difference(r32.aps, r8.aps),
        "descriptor_cosine": {"mean": float(cos.mean()), "min": float(cos.min())},
    }
    Path(a.out).write_text(json.dumps(out, indent=1, default=float))
    print(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
