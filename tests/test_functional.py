"""VLAD and normalisations against values computed by hand or by the plainest possible loop."""
import numpy as np
import torch

from convlad import functional as Fn


def naive_vlad(x, c):
    """Per-descriptor loop: nearest centroid, add the residual."""
    v = np.zeros_like(c)
    for d in x:
        j = np.argmin(((c - d) ** 2).sum(1))
        v[j] += d - c[j]
    return v


def test_vlad_matches_naive_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 50, 8)).astype(np.float32)
    c = rng.normal(size=(5, 8)).astype(np.float32)
    got = Fn.vlad(torch.from_numpy(x), torch.from_numpy(c)).numpy()
    for b in range(3):
        np.testing.assert_allclose(got[b], naive_vlad(x[b], c), rtol=1e-5, atol=1e-5)


def test_vlad_residual_norm_sums_unit_residuals():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 30, 4)).astype(np.float32)
    c = rng.normal(size=(3, 4)).astype(np.float32)
    got = Fn.vlad(torch.from_numpy(x), torch.from_numpy(c), residual_norm=True).numpy()[0]
    want = np.zeros_like(c)
    for d in x[0]:
        j = np.argmin(((c - d) ** 2).sum(1))
        want[j] += (d - c[j]) / np.linalg.norm(d - c[j])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_normalize_vlad_intra_then_l2():
    v = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]]])
    out = Fn.normalize_vlad(v, power=None, intra=True)
    # blocks → [.6 .8], [0 0], [1 0]; then L2 of the whole: divide by sqrt(2)
    np.testing.assert_allclose(out.numpy()[0], np.array([0.6, 0.8, 0, 0, 1, 0]) / np.sqrt(2), rtol=1e-6)
    ssr = Fn.normalize_vlad(torch.tensor([[[4.0, -9.0]]]), power=0.5, intra=False)
    np.testing.assert_allclose(ssr.numpy()[0], np.array([2.0, -3.0]) / np.sqrt(13), rtol=1e-6)


def test_local_descriptors_are_unit_rows_in_raster_order():
    fmap = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2) + 1
    d = Fn.local_descriptors(fmap)
    assert d.shape == (2, 4, 3)
    np.testing.assert_allclose(d.norm(dim=-1).numpy(), 1.0, rtol=1e-6)
    # position (0, 1) of image 1 is the channel vector fmap[1, :, 0, 1]
    np.testing.assert_allclose(d[1, 1].numpy(), Fn.l2n(fmap[1, :, 0, 1]).numpy(), rtol=1e-6)


def test_alpha_query_expansion_hand_computed():
    q = np.array([[1.0, 0.0]], np.float32)
    nb = np.array([[[0.6, 0.8], [0.0, 1.0]]], np.float32)  # similarities 0.6 and 0
    out = Fn.alpha_query_expansion(q, nb, alpha=2.0)
    # q + 0.6² · (0.6, 0.8) + 0² · (0, 1) = (1.216, 0.288), normalised
    want = np.array([1.216, 0.288]) / np.hypot(1.216, 0.288)
    np.testing.assert_allclose(out[0], want, rtol=1e-5)
    # a neighbour pointing away (negative similarity) gets no weight at all
    np.testing.assert_allclose(Fn.alpha_query_expansion(q, -nb, alpha=3.0)[0], [1.0, 0.0], atol=1e-7)
