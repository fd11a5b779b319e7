"""Encoders and the pipeline on real photos: fit/transform contract, PCA-whitening, persistence."""
import numpy as np
import pytest
import torch

from convlad.encoding import NotFittedError, PCAWhitening, VLAD
from convlad.extract import FeatureExtractor, iter_batches
from convlad.pipeline import ConvVLAD
from convlad.storage import FileFormatError

from .test_functional import naive_vlad


@pytest.fixture(scope="module")
def local_features(lite0, train_images):
    ex = FeatureExtractor(lite0, ["block11"], device="cpu")
    feats = [b.features[("block11", 1.0)] for b in iter_batches(ex, train_images[:24], [1.0], batch_size=8)]
    ex.close()
    return torch.cat(feats).numpy()  # (24, 49, 192)


def test_vlad_contract_on_real_descriptors(local_features):
    X = local_features.reshape(-1, local_features.shape[-1])
    with pytest.raises(NotFittedError):
        VLAD(k=8).transform(local_features[:2])
    v = VLAD(k=8, power=None, intra=False)
    assert v.fit(X) is v and v.centroids_.shape == (8, 192) and v.centroids_.dtype == np.float32
    out = v.transform(local_features[:3])
    assert out.shape == (3, 8 * 192) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    want = naive_vlad(local_features[1], v.centroids_).ravel()
    np.testing.assert_allclose(out[1], want / np.linalg.norm(want), rtol=1e-4, atol=1e-6)
    # transform is pure: same input, same output, state untouched
    c = v.centroids_.copy()
    np.testing.assert_array_equal(v.transform(local_features[:3]), out)
    np.testing.assert_array_equal(v.centroids_, c)
    # one image as (N, d) equals the batched row
    np.testing.assert_allclose(v.transform(local_features[1])[0], out[1], rtol=1e-6)


def test_vlad_state_roundtrip(local_features):
    X = local_features.reshape(-1, local_features.shape[-1])
    v = VLAD(k=8, power=0.5, residual_norm=True).fit(X)
    w = VLAD.from_state(v.get_state())
    np.testing.assert_array_equal(w.transform(local_features[:2]), v.transform(local_features[:2]))


@pytest.mark.parametrize("n, d", [(40, 300), (500, 20)])  # both branches: n < d (Gram), n > d (covariance)
def test_pca_whitening_matches_svd(n, d):
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(n, d)) * np.linspace(3, 0.1, d)).astype(np.float32) + 5
    p = PCAWhitening(n_components=10, whiten_power=0.5).fit(X)
    Xc = X - X.mean(0)
    _, S, Vt = np.linalg.svd(Xc.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(np.abs(p.components_ @ Vt[:10].T), np.eye(10), atol=1e-3)
    np.testing.assert_allclose(p.explained_variance_, S[:10] ** 2 / (n - 1), rtol=1e-3)
    # whitening: the training set's projections have unit variance on every component
    Y = (X - p.mean_) @ p.components_.T * p._scale()
    np.testing.assert_allclose(Y.var(0, ddof=1), 1.0, rtol=1e-3)
    out = p.transform(X[:5])
    assert out.shape == (5, 10)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    q = PCAWhitening.from_state(p.get_state())
    np.testing.assert_array_equal(q.transform(X[:5]), out)


def test_pipeline_fit_transform_save_load(tmp_path, train_images):
    model = ConvVLAD(layers=["block11", "block13"], pooled=["block15"], scales=[1, 1.5], k=8, dim=16)
    assert model.fit(train_images[:20], progress=False) is model
    assert sorted(model.vlads_) == ["block11@1", "block11@1.5", "block13@1", "block13@1.5"]
    ok, X, errors = model.transform(train_images[20:26], progress=False)
    assert ok == list(range(6)) and X.shape == (6, 16) and not errors
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:  # plain arrays, no pickled objects
        assert "__meta__" in z.files
    loaded = ConvVLAD.load(tmp_path / "m.npz")
    assert loaded.fingerprint() == model.fingerprint()
    _, Y, _ = loaded.transform(train_images[20:26], progress=False)
    np.testing.assert_allclose(Y, X, rtol=1e-5, atol=1e-6)
    # uncompressed: 4 intra-normalised VLADs (8 × 192) and 2 means of block15 (320), concatenated
    _, V, _ = model.transform_vlad(train_images[20:22], progress=False)
    assert V.shape == (2, 4 * 8 * 192 + 2 * 320)
    (tmp_path / "bad.npz").write_text("nope")
    with pytest.raises(FileFormatError, match="bad.npz: not a convlad file"):
        ConvVLAD.load(tmp_path / "bad.npz")


def test_pipeline_memory_budget_second_pass_gives_same_model(train_images):
    a = ConvVLAD(layers=["block11"], scales=[1], k=8, dim=8).fit(train_images[:12], progress=False)
    b = ConvVLAD(layers=["block11"], scales=[1], k=8, dim=8).fit(train_images[:12], progress=False, memory_budget=0)
    np.testing.assert_array_equal(a.vlads_["block11@1"].centroids_, b.vlads_["block11@1"].centroids_)
    np.testing.assert_allclose(np.abs(a.pca_.components_), np.abs(b.pca_.components_), atol=2e-3)


def test_pure_vlad_and_pooled_parts_are_what_they_say(train_images, lite0):
    """pooled=[] is the paper's VLAD; the pooled part is the L2-normalised mean of the local
    descriptors, and each part has equal weight in the concatenation."""
    paper = ConvVLAD(layers=["block11"], pooled=[], scales=[1], k=8, dim=None).fit(train_images[:10], progress=False)
    both = ConvVLAD(layers=["block11"], pooled=["block15"], scales=[1], k=8, dim=None)
    both.vlads_, both.pca_, both.pooled_dims_, both.n_train_ = paper.vlads_, None, {"block15@1": 320}, 10
    _, V, _ = paper.transform_vlad(train_images[10:13], progress=False)
    _, W, _ = both.transform_vlad(train_images[10:13], progress=False)
    ex = FeatureExtractor(lite0, ["block11", "block15"], device="cpu")
    b = next(iter_batches(ex, train_images[10:13], [1.0], batch_size=8))
    ex.close()
    np.testing.assert_allclose(V, paper.vlads_["block11@1"].transform(b.features[("block11", 1.0)].numpy()), atol=1e-6)
    mean = b.features[("block15", 1.0)].mean(1)
    mean = (mean / mean.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(W * np.sqrt(2), np.concatenate([V, mean], 1), atol=1e-5)


def test_keep_aspect_mixed_orientations_come_back_in_order(train_images):
    """Portrait and landscape photos go through separate sub-batches; rows still follow the input."""
    from .conftest import SAMPLES, need

    holidays = sorted(str(p) for p in need(SAMPLES / "holidays").glob("*.jpg"))  # 2 portrait, 1 landscape
    model = ConvVLAD(layers=["block11"], pooled=["block15"], scales=[1], k=8, dim=None, resize="keep")
    model.fit(train_images[:8], progress=False)
    paths = [holidays[0], holidays[2], holidays[1]]
    ok, X, _ = model.transform(paths, progress=False)
    assert ok == [0, 1, 2]
    for i, p in enumerate(paths):
        _, x, _ = model.transform([p], progress=False)
        np.testing.assert_allclose(X[i], x[0], rtol=1e-4, atol=1e-5)
