"""Extraction: the traced graph ends at the deepest tap and equals the network, untraceable modules
fall back to hooks, chunks follow the pixel budget, and the compiled graph equals the eager one."""
import os
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from convlad.backbones import from_module
from convlad.extract import FeatureExtractor
from convlad.runtime import COMPILE_MIN_WORK, PRECISIONS, lower_thread_priority, want_compile
from convlad.images import load_warped


def _photos(paths, n, size):
    return np.stack([load_warped(p, [size])[0] for p in paths[:n]])


def test_traced_graph_gives_the_networks_own_feature_maps(lite0, dev_images):
    x = _photos(dev_images, 3, 224)
    ex = FeatureExtractor(lite0, ["stem", "block6", "block15"], device="cpu")
    assert ex.traced and not ex.compile
    got = ex.feature_maps(x)
    want = {}
    hooks = [lite0.module.get_submodule(lite0.taps[layer]).register_forward_hook(
        lambda _m, _i, out, layer=layer: want.__setitem__(layer, out)) for layer in got]
    try:
        with torch.inference_mode():
            t = torch.as_tensor(x).permute(0, 3, 1, 2).float().div(255)
            lite0.module(lite0.normalize(t))
    finally:
        for h in hooks:
            h.remove()
    for layer in got:
        torch.testing.assert_close(got[layer], want[layer], atol=1e-4, rtol=1e-4)


class DataDependent(nn.Module):
    """fx cannot trace a branch on tensor values: the extractor must use hooks."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, stride=2, padding=1)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.a(x)
        if x.mean() > 0:
            x = x.relu()
        return self.c(self.b(x))


def test_untraceable_module_runs_through_hooks_and_is_not_compiled():
    torch.manual_seed(0)
    net = DataDependent().eval()
    bb = from_module(net, ["a", "b"], name="branchy")
    ex = FeatureExtractor(bb, "all", device="cpu")
    assert not ex.traced and not ex.can_compile
    calls = []
    h = net.c.register_forward_hook(lambda *a: calls.append(1))
    x = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    try:
        maps = ex.feature_maps(x)
    finally:
        h.remove()
    assert maps["a"].shape == (2, 8, 32, 32) and maps["b"].shape == (2, 4, 16, 16)
    assert not calls, "hooks stop the pass after the deepest tap"
    ex.close()
    with torch.inference_mode():
        y = net.a(bb.normalize(torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255))
        want = net.b(y.relu() if y.mean() > 0 else y)
    torch.testing.assert_close(maps["b"], want, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="cannot be compiled"):
        ex.compile = True
    assert not ex.compile


def test_chunks_follow_the_pixel_budget(lite0, dev_images):
    x = _photos(dev_images, 5, 448)
    whole = FeatureExtractor(lite0, ["block6"], device="cpu", max_batch_pixels=5 * 448 * 448).feature_maps(x)
    calls = []
    ex = FeatureExtractor(lite0, ["block6"], device="cpu", max_batch_pixels=2 * 448 * 448)
    h = lite0.module._conv_stem.register_forward_hook(lambda _m, inp, _o: calls.append(inp[0].shape[0]))
    try:
        parts = ex.feature_maps(x)
    finally:
        h.remove()
    assert calls == [2, 2, 1]
    torch.testing.assert_close(parts["block6"], whole["block6"], atol=1e-4, rtol=1e-4)


def test_auto_compile_only_for_large_cpu_jobs(lite0):
    ex = FeatureExtractor(lite0, ["block6"], device="cpu")
    assert not want_compile("auto", ex, 100, [1, 2])
    assert want_compile("auto", ex, COMPILE_MIN_WORK // 5, [1, 2])
    assert not want_compile("auto", ex, COMPILE_MIN_WORK // 5, [1])
    assert want_compile(True, ex, 1, [1]) and not want_compile(False, ex, 10**6, [1, 2])


@pytest.mark.e2e
def test_compiled_graph_equals_eager_and_pads_short_chunks(lite0, dev_images):
    ex = FeatureExtractor(lite0, ["block6", "block15"], device="cpu")
    x = _photos(dev_images, 16, 224)
    eager = ex.feature_maps(x)
    ex.compile = True
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile failed")  # a fallback would hide a bug
        full = ex.feature_maps(x)
        short = ex.feature_maps(x[:10])  # padded to 16, same compiled graph
        single = ex.feature_maps(x[:1])  # under half a chunk: eager
    assert ex.compile
    for layer in eager:
        torch.testing.assert_close(full[layer], eager[layer], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(short[layer], eager[layer][:10], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(single[layer], eager[layer][:1], atol=1e-4, rtol=1e-4)


def test_reduced_precision_keeps_the_local_descriptors(lite0, dev_images):
    """bf16/fp16 autocast (meant for GPUs) runs the network in that precision; the descriptors
    come back float32, unit-norm and close to fp32's."""
    from convlad.functional import local_descriptors

    x = _photos(dev_images, 1, 224)
    ex = FeatureExtractor(lite0, ["block6"], device="cpu")
    want = ex(x)["block6"]
    maps = {}
    for precision in ("bf16", "fp16"):
        ex.precision = precision
        maps[precision] = ex.feature_maps(x)["block6"]
        got = local_descriptors(maps[precision])
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.norm(dim=-1).numpy(), 1.0, rtol=1e-4)
        assert (got * want).sum(-1).mean() > 0.99
    assert maps["bf16"].dtype == torch.bfloat16 and maps["fp16"].dtype == torch.float16
    with pytest.raises(ValueError, match="precision must be one of"):
        ex.precision = "int8"


def test_auto_precision_is_bf16_where_the_cpu_has_an_engine_for_it(lite0, dev_images, monkeypatch):
    """`--precision auto`: bf16 on a CPU with AMX-BF16 or AVX512-BF16, fp32 on one without, the
    detection forced both ways here (CONVLAD_CPU_BF16) so both paths run on any machine; and what
    the detection reads is this machine's /proc/cpuinfo."""
    from convlad.runtime import BF16_FLAGS, cpu_flags, resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.delenv("CONVLAD_PRECISION", raising=False)
    monkeypatch.delenv("CONVLAD_CPU_BF16", raising=False)
    with open("/proc/cpuinfo") as f:
        flags = set(f.read().split())  # read once: a second read() is empty (AVX512-BF16 without AMX came out "none")
    has = any(flag in flags for flag in BF16_FLAGS)
    assert resolve_precision("auto", cpu) == ("bf16" if has else "fp32"), cpu_flags()
    assert any(f.startswith("torch:") for f in cpu_flags())
    x = _photos(dev_images, 1, 224)
    out = {}
    for forced, want in (("0", "fp32"), ("1", "bf16")):
        monkeypatch.setenv("CONVLAD_CPU_BF16", forced)
        ex = FeatureExtractor(lite0, ["block6"], device="cpu")  # precision "auto", the default
        assert ex.precision_setting == "auto" and ex.precision == want
        out[want] = ex.feature_maps(x)["block6"]
        assert out[want].dtype == (PRECISIONS[want] or torch.float32)
    cos = torch.nn.functional.cosine_similarity(out["bf16"].float().flatten(2), out["fp32"].flatten(2), dim=1)
    assert cos.mean() > 0.99
    # an explicit setting is kept, and CONVLAD_PRECISION forces what auto means
    assert resolve_precision("fp16", cpu) == "fp16"
    monkeypatch.setenv("CONVLAD_PRECISION", "fp32")
    assert resolve_precision("auto", cpu) == "fp32"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="niceness is per thread only on Linux")
def test_decoder_priority_lowered_for_its_thread_only():
    before = os.getpriority(os.PRIO_PROCESS, 0)  # the calling (main) thread's niceness
    seen = {}

    def decoder():
        seen["changed"] = lower_thread_priority(3)
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=decoder)
    t.start()
    t.join()
    assert seen == {"changed": True, "nice": min(19, before + 3)}
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
