"""The IVF-PQ search structure against exact search on clustered descriptors."""
import faiss
import numpy as np

from convlad.index.ann import ExactIndex


def clustered(n, d=128, seed=0):
    """Views in tight clusters (places, objects), unit-norm; queries are new views."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 20, d)).astype(np.float32)
    label = rng.integers(0, len(centres), n)
    X = centres[label] + 0.35 * rng.normal(size=(n, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q = centres[label[rng.integers(0, n, 100)]] + 0.35 * rng.normal(size=(100, d)).astype(np.float32)
    return X, Q / np.linalg.norm(Q, axis=1, keepdims=True)


def _ivfpq_store(path, X):
    from convlad.index.store import IndexStore

    st = IndexStore.create(path, dim=X.shape[1], ann="ivfpq")
    st.add_vectors(X, [f"{i}.jpg" for i in range(len(X))])
    return st


def test_ivfpq_recall_exact_distances_and_reopen(tmp_path):
    """The IVF-PQ that serves the store: its recall against exact search, exact distances for the
    shortlist, and the same answers from a reader that opens it from disk."""
    from convlad.index.store import IndexStore

    X, Q = clustered(10_000)
    flat = faiss.IndexFlatL2(X.shape[1])
    flat.add(X)
    D_gt, I_gt = flat.search(Q, 10)
    with _ivfpq_store(tmp_path / "ix", X) as st:
        assert st.info()["search"].startswith("IVF-PQ IVF128,PQ32") and len(st) == len(X)
        D, I = st.search(Q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, I_gt)])
    assert recall >= 0.9, recall
    # distances are exact ones, recomputed for the shortlist
    np.testing.assert_allclose(D, ((X[I] - Q[:, None]) ** 2).sum(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(IndexStore.open(tmp_path / "ix").search(Q, 10)[1], I)


def test_nprobe_trades_recall_on_unclustered_data(tmp_path):
    """Without clusters a query's neighbours are spread over many lists: visiting one finds
    fewer of them than visiting all."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(4_000, 32)).astype(np.float32)
    Q = rng.normal(size=(50, 32)).astype(np.float32)
    flat = faiss.IndexFlatL2(32)
    flat.add(X)
    _, I_gt = flat.search(Q, 10)
    recall = {}
    with _ivfpq_store(tmp_path / "ix", X) as st:
        for nprobe in (1, 64):
            st.set_nprobe(nprobe)
            recall[nprobe] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(st.search(Q, 10)[1], I_gt)])
    assert recall[1] < 0.8 * recall[64], recall


def test_ivfpq_add_keeps_new_vectors_searchable(tmp_path):
    X, Q = clustered(5_000, seed=1)
    with _ivfpq_store(tmp_path / "ix", X[:4_000]) as st:
        trained = st.m["ivf"]
        st.add_vectors(X[4_000:], [f"n{i}.jpg" for i in range(1_000)])
        assert st.m["ivf"] == trained  # encoded with the trained quantiser, not retrained
        _, I = st.search(X[4_500:4_510], 1)
    assert I[:, 0].tolist() == list(range(4_500, 4_510))  # each vector finds itself


def test_exact_index_breaks_ties_by_row_order():
    X = np.array([[1, 0], [0, 0], [1, 0], [1, 0], [0, 0]], np.float32)
    D, I = ExactIndex(X).search(np.zeros((1, 2), np.float32), 5)
    assert I[0].tolist() == [1, 4, 0, 2, 3] and D[0].tolist() == [0, 0, 1, 1, 1]


def test_exact_index_matches_faiss():
    X, Q = clustered(3_000, seed=2)
    flat = faiss.IndexFlatL2(X.shape[1])
    flat.add(X)
    D_gt, I_gt = flat.search(Q, 5)
    D, I = ExactIndex(X).search(Q, 5, block=7)  # several blocks
    np.testing.assert_array_equal(I, I_gt)
    np.testing.assert_allclose(D, D_gt, atol=1e-4)
