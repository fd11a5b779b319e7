"""Metrics against values computed by hand and against the official code, transcribed line by line."""
import numpy as np
import pytest

from convlad.study import metrics as M


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
    assert M.ap_of_ranking(["a", "b", "c"], {"a", "b"}) == pytest.approx(1.0)
    # one positive at rank 2: after x precision is 0 (recall still 0), so the step to recall 1 is a
    # trapezoid between precision 0 and 1/2: (0 + 0.5)/2 = 0.25
    assert M.ap_of_ranking(["x", "a", "y"], {"a"}) == pytest.approx(0.25)
    # one positive at rank 3: precision has fallen to 0 after x and y, so the only step (recall
    # 0 → 1) is a trapezoid between precision 0 and 1/3: (0 + 1/3)/2
    assert M.ap_of_ranking(["x", "y", "a"], {"a"}) == pytest.approx(1 / 6)


def test_ap_hand_computed_two_positives():
    # ranking: a(pos) x b(pos): steps recall 0→.5 at rank 0 (p 1→1), .5→1 at rank 2 (p 1/2 → 2/3)
    # AP = .5·(1+1)/2 + .5·(1/2 + 2/3)/2 = .5 + 7/24
    assert M.ap_of_ranking(["a", "x", "b"], {"a", "b"}) == pytest.approx(0.5 + 7 / 24)


def test_ap_junk_consumes_no_rank():
    # junk j before the positive: skipped, so a is effectively first
    assert M.ap_of_ranking(["j", "a", "x"], {"a"}, junk={"j"}) == pytest.approx(1.0)
    # junk between two positives changes nothing either
    assert M.ap_of_ranking(["a", "j", "x", "b"], {"a", "b"}, junk={"j"}) == pytest.approx(0.5 + 7 / 24)


def test_ap_unretrieved_positive_and_no_positives():
    # a positive never retrieved contributes nothing: half the recall at most
    assert M.ap_of_ranking(["a", "x"], {"a", "b"}) == pytest.approx(0.5)
    assert np.isnan(M.ap_of_ranking(["a", "x"], set()))


def test_ap_ties_in_rank_positions_are_order_independent():
    # average_precision takes ranks in any order
    assert M.average_precision(np.array([2, 0]), 2) == M.average_precision(np.array([0, 2]), 2)


@pytest.mark.parametrize("seed", range(20))
def test_ap_equals_official_loop_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    ranking = list(rng.permutation(n))
    pos = set(rng.choice(n, size=int(rng.integers(1, n // 2 + 1)), replace=False).tolist())
    rest = [i for i in range(n) if i not in pos]
    junk = set(rng.choice(rest, size=min(len(rest), int(rng.integers(0, 4))), replace=False).tolist())
    assert M.ap_of_ranking(ranking, pos, junk) == pytest.approx(oxford_compute_ap(pos, junk, ranking))


def revisited_compute_map_one(ranking, ok, junk, kappas):
    """The revisited benchmark's compute_map for one query, transcribed (junk shifts later positives)."""
    ranking = np.asarray(ranking)
    pos = np.arange(len(ranking))[np.isin(ranking, list(ok))]
    jpos = np.arange(len(ranking))[np.isin(ranking, list(junk))]
    k, ij = 0, 0
    for ip in range(len(pos)):
        while ij < len(jpos) and pos[ip] > jpos[ij]:
            k += 1
            ij += 1
        pos[ip] -= k
    ap = M.average_precision(pos, len(ok))
    pos = pos + 1
    prs = [(pos <= min(pos.max(), kq)).sum() / min(pos.max(), kq) for kq in kappas]
    return ap, np.array(prs)


def test_precision_at_k_hand_computed_with_junk():
    # ranking p1 x j p2 x: junk j skipped → p1 x p2 x, positives at 1-based ranks 1 and 3
    ranks = M.positive_ranks(np.array([10, 11, 12, 13, 14]), {10, 13}, {12})
    assert ranks.tolist() == [0, 2]
    # mP@1: k' = min(3, 1) = 1 → 1/1; mP@5: k' = min(3, 5) = 3 (the last positive) → 2/3
    assert M.precision_at_k(ranks, [1, 5, 10]) == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert M.average_precision(ranks, 2) == pytest.approx(0.5 + 7 / 24)


def test_precision_at_k_few_positives_on_top_is_perfect():
    # 2 positives, both first: P@10 in the revisited definition is 1, not 2/10
    assert M.precision_at_k(np.array([0, 1]), [1, 5, 10]) == pytest.approx([1, 1, 1])
    assert np.isnan(M.precision_at_k(np.array([]), [1, 5])).all()


@pytest.mark.parametrize("seed", range(10))
def test_ap_and_precision_equal_revisited_code_on_random_rankings(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(10, 80))
    ranking = rng.permutation(n)
    ok = set(rng.choice(n, size=int(rng.integers(1, n // 3 + 1)), replace=False).tolist())
    rest = [i for i in range(n) if i not in ok]
    junk = set(rng.choice(rest, size=int(rng.integers(0, 6)), replace=False).tolist())
    ap, prs = revisited_compute_map_one(ranking, ok, junk, [1, 5, 10])
    ranks = M.positive_ranks(ranking, ok, junk)
    assert M.average_precision(ranks, len(ok)) == pytest.approx(ap)
    assert M.precision_at_k(ranks, [1, 5, 10]) == pytest.approx(prs)


def test_ns_score_counts_the_query_itself():
    # the query q is its own first hit; x is another object's image: 3 of the top 4 are relevant
    assert M.ns_score(["q", "a", "x", "b", "c"], {"q", "a", "b", "c"}) == 3
    assert M.ns_score(["q", "a", "b", "c", "x"], {"q", "a", "b", "c"}) == 4
    assert M.ns_score(["x", "y", "z", "w"], {"q"}) == 0
