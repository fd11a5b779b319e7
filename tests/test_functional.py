"""AP, VLAD and normalisations against values computed by hand or by the plainest possible loop."""
import numpy as np
import pytest
import torch

from convlad import functional as Fn


def oxford_compute_ap(pos, amb, ranked_list):
    """The official Oxford compute_ap.cpp, transcribed line by line: the reference for our AP."""
    old_recall, old_precision, ap, intersect_size, j = 0.0, 1.0, 0.0, 0, 0
    for r in ranked_list:
        if r in amb:
            continue
        if r in pos:
            intersect_size += 1
        recall = intersect_size / len(pos)
        precision = intersect_size / (j + 1.0)
        ap += (recall - old_recall) * ((old_precision + precision) / 2.0)
        old_recall, old_precision = recall, precision
        j += 1
    return ap


def test_ap_hand_computed_perfect_and_single():
    # two positives ranked first: the curve is flat at precision 1 → AP 1
    assert Fn.ap_of_ranking(["a", "b", "c"], {"a", "b"}) == pytest.approx(1.0)
    # one positive at rank 2: after x precision is 0 (recall still 0), so the step to recall 1 is a
    # trapezoid between precision 0 and 1/2: (0 + 0.5)/2 = 0.25
    assert Fn.ap_of_ranking(["x", "a", "y"], {"a"}) == pytest.approx(0.25)
    # one positive at rank 3: precision has fallen to 0 after x and y, so the only step (recall
    # 0 → 1) is a trapezoid between precision 0 and 1/3: (0 + 1/3)/2
    assert Fn.ap_of_ranking(["x", "y", "a"], {"a"}) == pytest.approx(1 / 6)


def test_ap_hand_computed_two_positives():
    # ranking: a(pos) x b(pos): steps recall 0→.5 at rank 0 (p 1→1), .5→1 at rank 2 (p 1/2 → 2/3)
    # AP = .5·(1+1)/2 + .5·(1/2 + 2/3)/2 = .5 + 7/24
    assert Fn.ap_of_ranking(["a", "x", "b"], {"a", "b"}) == pytest.approx(0.5 + 7 / 24)


def test_ap_junk_consumes_no_rank():
    # junk j before the positive: skipped, so a is effectively first
    assert Fn.ap_of_ranking(["j", "a", "x"], {"a"}, junk={"j"}) == pytest.approx(1.0)
    # junk between two positives changes nothing either
    assert Fn.ap_of_ranking(["a", "j", "x", "b"], {"a", "b"}, junk={"j"}) == pytest.approx(0.5 + 7 / 24)


def test_ap_unretrieved_positive_and_no_positives():
    # a positive never retrieved contributes nothing: half the recall at most
    assert Fn.ap_of_ranking(["a", "x"], {"a", "b"}) == pytest.approx(0.5)
    assert np.isnan(Fn.ap_of_ranking(["a", "x"], set()))


def test_ap_ties_in_rank_positions_are_order_independent():
    # average_precision takes ranks in any order
    assert Fn.average_precision(np.array([2, 0]), 2) == Fn.average_precision(np.array([0, 2]), 2)


@pytest.mark.parametrize("seed", range(20))
def test_ap_equals_official_loop_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    ranking = list(rng.permutation(n))
    pos = set(rng.choice(n, size=int(rng.integers(1, n // 2 + 1)), replace=False).tolist())
    rest = [i for i in range(n) if i not in pos]
    junk = set(rng.choice(rest, size=min(len(rest), int(rng.integers(0, 4))), replace=False).tolist())
    assert Fn.ap_of_ranking(ranking, pos, junk) == pytest.approx(oxford_compute_ap(pos, junk, ranking))


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
