"""faiss defines the expected answer: same codebooks give the same codes and ADC distances,
training reaches the same quality, and models convert both ways."""
import numpy as np
import pytest

import cypq

from conftest import clustered

faiss = pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def data():
    return clustered(20000, 64, n_clusters=50, seed=21), clustered(100, 64, n_clusters=50,
                                                                    seed=22)


@pytest.fixture(scope="module")
def fitted(data):
    X, _ = data
    return cypq.PQ(M=8, Ks=256, verbose=False).fit(X, iter=10)


def test_codes_and_distances_equal_faiss(data, fitted):
    X, Q = data
    index = cypq.nanopq_to_faiss(fitted)
    codes = fitted.encode(X)
    faiss_codes = index.pq.compute_codes(X)
    assert (codes == faiss_codes).mean() > 0.9999  # ties aside
    index.add(X)
    Df, If = index.search(Q, 10)
    D, I = fitted.search(Q, faiss_codes, k=10)
    np.testing.assert_allclose(D, Df, rtol=1e-5, atol=1e-3)
    assert (I == If).mean() > 0.99


def test_recall_equals_faiss_recall(data, fitted):
    X, Q = data
    gt = ((Q[:, None, :] - X[None]) ** 2).sum(-1).argmin(1)
    index = cypq.nanopq_to_faiss(fitted)
    index.add(X)
    _, If = index.search(Q, 100)
    _, I = fitted.search(Q, fitted.encode(X), k=100)
    for R in (1, 10, 100):
        ours = np.mean([gt[i] in I[i, :R] for i in range(len(Q))])
        theirs = np.mean([gt[i] in If[i, :R] for i in range(len(Q))])
        assert abs(ours - theirs) <= 0.01, (R, ours, theirs)


def test_dot_metric_equals_faiss(data):
    X, Q = data
    pq = cypq.PQ(M=8, Ks=256, metric="dot", verbose=False).fit(X, iter=5)
    index = cypq.nanopq_to_faiss(pq)
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    index.add(X)
    Df, If = index.search(Q, 10)
    codes = pq.encode(X)
    D, I = pq.search(Q, codes, k=10)
    np.testing.assert_allclose(D, Df, rtol=1e-4, atol=1e-2)
    # the same ids, but for ties between vectors with identical codes (any order is right)
    same = (I == If) | (codes[I] == codes[If]).all(axis=-1)
    assert same.mean() > 0.99


def test_training_quality_matches_faiss(data):
    X, _ = data
    fpq = faiss.ProductQuantizer(64, 8, 8)
    fpq.cp.niter = 20
    fpq.cp.max_points_per_centroid = 1000  # no subsampling: same data for both
    fpq.train(X)
    f_mse = ((fpq.decode(fpq.compute_codes(X)) - X) ** 2).sum(1).mean()
    pq = cypq.PQ(M=8, Ks=256, verbose=False).fit(X, iter=20)
    mse = ((pq.decode(pq.encode(X)) - X) ** 2).sum(1).mean()
    assert mse <= 1.01 * f_mse


def test_roundtrip_pq(data, fitted):
    X, _ = data
    index = cypq.nanopq_to_faiss(fitted)
    index.add(X[:100])
    back, codes = cypq.faiss_to_nanopq(index)
    assert isinstance(back, cypq.PQ)
    np.testing.assert_array_equal(back.codewords, fitted.codewords)
    np.testing.assert_array_equal(codes, fitted.encode(X[:100]))
    assert back.code_dtype is np.uint8


def test_roundtrip_opq(data):
    X, Q = data
    opq = cypq.OPQ(M=8, Ks=256, verbose=False).fit(X, rotation_iter=3, pq_iter=5)
    index = cypq.nanopq_to_faiss(opq)
    index.add(X)
    Df, If = index.search(Q, 10)
    D, I = opq.search(Q, opq.encode(X), k=10)
    np.testing.assert_allclose(D, Df, rtol=1e-4, atol=1e-2)
    back, codes = cypq.faiss_to_nanopq(index)
    assert isinstance(back, cypq.OPQ)
    np.testing.assert_allclose(back.R, opq.R, atol=1e-6)
    np.testing.assert_array_equal(back.codewords, opq.codewords)
    assert (codes == opq.encode(X)).mean() > 0.999


def test_from_faiss_trained_opq(data):
    X, _ = data
    index = faiss.index_factory(64, "OPQ8,PQ8")
    faiss.downcast_VectorTransform(index.chain.at(0)).niter = 4
    index.train(X[:5000])
    index.add(X[:500])
    model, codes = cypq.faiss_to_nanopq(index)
    assert isinstance(model, cypq.OPQ)
    assert (model.encode(X[:500]) == codes).mean() > 0.999


@pytest.mark.parametrize("M,nbits", [(8, 6), (2, 16)])
def test_faiss_16bit_and_generic_nbits(data, M, nbits):
    X, _ = data
    index = faiss.IndexPQ(64, M, nbits)
    rng = np.random.default_rng(0)
    faiss.copy_array_to_vector(X[rng.choice(len(X), 2**nbits)].reshape(-1) if nbits < 16 else
                               rng.normal(0, 10, 2**nbits * 64).astype(np.float32),
                               index.pq.centroids)
    if hasattr(index.pq, "sync_transposed_centroids"):
        index.pq.sync_transposed_centroids()
    index.is_trained = True
    index.add(X[:50])
    model, codes = cypq.faiss_to_nanopq(index)
    assert model.Ks == 2**nbits
    ours = model.encode(X[:50])
    # With 65536 codewords near-ties are common: our pick is as close as faiss's.
    err = lambda c: ((model.decode(c) - X[:50]) ** 2).sum(1)
    np.testing.assert_allclose(err(ours), err(codes), rtol=1e-4)
    assert (ours.astype(np.int64) == codes).mean() >= 0.9


def test_conversion_errors():
    with pytest.raises(ValueError, match="power|2\\*\\*nbits"):
        pq = cypq.PQ(M=2, Ks=100, verbose=False).fit(np.random.rand(500, 8))
        cypq.nanopq_to_faiss(pq)
    with pytest.raises(cypq.NotFittedError):
        cypq.nanopq_to_faiss(cypq.PQ(M=2, verbose=False))
    with pytest.raises(TypeError):
        cypq.faiss_to_nanopq(faiss.IndexFlatL2(8))
