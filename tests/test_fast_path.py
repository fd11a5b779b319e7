"""The fast path (draft decoding, decode threads, channels-last, folded batch norm, a traced graph
ending at the deepest layer, torch.compile, pixel-budget chunks, batched VLAD) against
the plain implementation of ``convlad.reference``: the same descriptors, the same mAP."""
import numpy as np
import pytest

from convlad.study.datasets import load_groups
from convlad.study.evalcache import EvalCache
from convlad.study.evaluate import evaluate_descriptors
from convlad.pipeline import ConvVLAD
from convlad.reference import plain_descriptors, vlad_numpy

from .conftest import MVBENCH_DEV, need

pytestmark = pytest.mark.e2e


def test_batched_vlad_equals_the_per_image_loop(train_images):
    import torch

    from convlad.encoding import VLAD

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3, 500, 24)).astype(np.float32)
    X /= np.linalg.norm(X, axis=-1, keepdims=True)
    v = VLAD(k=16, power=0.5).fit(X.reshape(-1, 24))
    fast = v.encode(torch.from_numpy(X)).numpy()
    plain = np.stack([vlad_numpy(x, v.centroids_, 0.5, True) for x in X])
    np.testing.assert_allclose(fast, plain, atol=2e-5)


def test_fast_path_keeps_the_map_on_mvbench(train_images, tmp_path):
    # mvbench-dev's 191 grouped photos without its 217 distractors: the same comparison of two
    # encoders at half the encoding time (the suite's time budget)
    for name in ("images", "groups.json"):
        (tmp_path / name).symlink_to(need(MVBENCH_DEV) / name)
    bench = load_groups(tmp_path)
    assert len(bench.paths) == 191
    # the defaults (block6 + mean block15, scales 1, 2) fitted as `convlad eval` fits them, through the
    # suite's eval cache: the default eval test's fit where it ran first
    model = ConvVLAD()
    EvalCache().fit(model, train_images, progress=False)
    model = model.with_runtime(compile=True)  # the path of large jobs (fit above ran eager)
    _, fast, errors = model.transform(bench.paths, progress=False)
    assert not errors and model.extractor.compile
    plain = plain_descriptors(model, bench.paths)
    cos = (fast * plain).sum(1)
    assert cos.mean() > 0.99 and cos.min() > 0.95, (cos.mean(), cos.min())
    m_fast, m_plain = evaluate_descriptors(bench, fast).mAP, evaluate_descriptors(bench, plain).mAP
    assert abs(m_fast - m_plain) <= 0.005, (m_fast, m_plain)
    assert m_fast > 0.7  # and it is a working descriptor, not two equal failures
