"""PQ / OPQ / DistanceTable: nanopq 0.2.2's API and semantics, exact search references, errors."""
import contextlib
import io
import pickle
import warnings

import numpy as np
import pytest

import cypq
import cypq as nanopq_compat  # what users write: import cypq as nanopq
from cypq import NotFittedError

import reference as ref
from conftest import clustered

nanopq = pytest.importorskip("nanopq")


@pytest.fixture(scope="module")
def data():
    X = clustered(4000, 32, seed=11)
    Q = clustered(50, 32, seed=12)
    return X, Q


@pytest.fixture(scope="module")
def fitted(data):
    X, _ = data
    return cypq.PQ(M=4, Ks=64, verbose=False).fit(X, iter=15, seed=3)


def test_constructor_and_attributes_like_nanopq():
    for Ks, dt in [(256, np.uint8), (257, np.uint16), (2**16, np.uint16), (2**16 + 1, np.uint32)]:
        ours = cypq.PQ(M=4, Ks=Ks, verbose=False)
        theirs = nanopq.PQ(M=4, Ks=Ks, verbose=False)
        assert ours.code_dtype is theirs.code_dtype is dt
        assert (ours.M, ours.Ks, ours.metric, ours.codewords, ours.Ds) == \
            (theirs.M, theirs.Ks, theirs.metric, theirs.codewords, theirs.Ds)
    opq = cypq.OPQ(M=4, verbose=False)
    assert opq.R is None and opq.M == 4 and opq.Ks == 256 and opq.code_dtype is np.uint8


def test_verbose_prints_progress(data):
    X, _ = data
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cypq.PQ(M=4, Ks=16, verbose=True).fit(X, iter=3)
    text = buf.getvalue()
    assert "M: 4, Ks: 16" in text and "iteration" in text
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cypq.PQ(M=4, Ks=16, verbose=False).fit(X, iter=3)
    assert buf.getvalue() == ""


def test_same_codewords_give_nanopqs_results(data, fitted):
    """With the codewords copied into nanopq, every method returns what nanopq returns."""
    X, Q = data
    theirs = nanopq.PQ(M=4, Ks=64, verbose=False)
    theirs.codewords, theirs.Ds = fitted.codewords.copy(), fitted.Ds
    codes = fitted.encode(X)
    np.testing.assert_array_equal(codes, theirs.encode(X))
    assert codes.dtype == theirs.encode(X).dtype
    np.testing.assert_array_equal(fitted.decode(codes), theirs.decode(codes))
    dt, dt_theirs = fitted.dtable(Q[0]), theirs.dtable(Q[0])
    np.testing.assert_allclose(dt.dtable, dt_theirs.dtable, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(dt.adist(codes), dt_theirs.adist(codes), rtol=1e-5, atol=1e-2)
    assert dt.adist(codes).dtype == np.float32 and dt.adist(codes).shape == (len(X),)


def test_fit_quality_matches_nanopq(data):
    """Same iterations and data: quantisation error within a few % of nanopq's (scipy k-means)."""
    X, _ = data
    ours = cypq.PQ(M=4, Ks=64, verbose=False).fit(X, iter=20)
    theirs = nanopq.PQ(M=4, Ks=64, verbose=False).fit(X, iter=20)
    mse = lambda pq: ((pq.decode(pq.encode(X)) - X) ** 2).sum(1).mean()
    assert mse(ours) <= 1.03 * mse(theirs)


@pytest.mark.parametrize("minit", ["points", "++", "random"])
def test_fit_deterministic_for_seed_and_threads(data, minit):
    X, _ = data
    a = cypq.PQ(M=4, Ks=32, verbose=False, n_threads=1).fit(X, iter=8, seed=5, minit=minit)
    b = cypq.PQ(M=4, Ks=32, verbose=False, n_threads=2).fit(X, iter=8, seed=5, minit=minit)
    c = cypq.PQ(M=4, Ks=32, verbose=False, n_threads=2).fit(X, iter=8, seed=6, minit=minit)
    assert a == b
    assert a != c
    assert np.isfinite(a.codewords).all()


def test_kmeans_reduces_error_and_converges(data):
    X, _ = data
    mse = []
    for it in (1, 5, 30):
        pq = cypq.PQ(M=4, Ks=32, verbose=False).fit(X, iter=it)
        mse.append(((pq.decode(pq.encode(X)) - X) ** 2).sum(1).mean())
    assert mse[0] > mse[1] >= mse[2] * 0.999


def test_empty_clusters_are_reseeded():
    """Few distinct points and many centroids: no centroid stays a duplicate of another."""
    rng = np.random.default_rng(0)
    X = np.repeat(rng.normal(0, 1, (40, 8)), 10, axis=0).astype(np.float32)  # 40 distinct
    pq = cypq.PQ(M=1, Ks=32, verbose=False).fit(X, iter=10)
    assert np.isfinite(pq.codewords).all()
    assert len(np.unique(pq.codewords[0], axis=0)) == 32
    # Every codeword is used: no empty cluster left at the end.
    assert len(np.unique(pq.encode(X))) == 32


def test_subsampling(data):
    X, _ = data
    pq = cypq.PQ(M=4, Ks=16, verbose=False).fit(X, iter=5, max_points_per_centroid=20)
    assert pq.codewords.shape == (4, 16, 8)


def test_warm_start_with_init(data, fitted):
    X, _ = data
    pq = cypq.PQ(M=4, Ks=64, verbose=False).fit(X, iter=1, minit="matrix",
                                                init=fitted.codewords)
    # One more Lloyd step from converged codewords changes little.
    np.testing.assert_allclose(pq.codewords, fitted.codewords, atol=0.5)


def test_search_equals_bruteforce_adc(data, fitted):
    X, Q = data
    codes = fitted.encode(X)
    D, I = fitted.search(Q, codes, k=20)
    assert D.shape == I.shape == (len(Q), 20) and D.dtype == np.float32 and I.dtype == np.int64
    dist = np.stack([fitted.dtable(q).adist(codes) for q in Q])
    wantD, _ = ref.topk(dist, 20)
    np.testing.assert_allclose(D, wantD, rtol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(dist, I, 1), D, rtol=1e-6)
    # One query as a 1-d array gives a (1, k) answer; k beyond N pads with -1 / inf.
    D1, I1 = fitted.search(Q[0], codes[:5], k=8)
    assert D1.shape == (1, 8) and (I1[0, 5:] == -1).all() and np.isinf(D1[0, 5:]).all()


def test_search_recall_against_exact_ground_truth(data, fitted):
    X, Q = data
    codes = fitted.encode(X)
    gt = ((Q[:, None, :] - X[None]) ** 2).sum(-1).argmin(1)
    _, I = fitted.search(Q, codes, k=50)
    recall_at_50 = np.mean([gt[i] in I[i] for i in range(len(Q))])
    # Chance is 50 / 4000; the faiss test checks the recall equals faiss's exactly.
    assert recall_at_50 >= 0.4


def test_dtables_batch_equals_single(data, fitted):
    _, Q = data
    T = fitted.dtables(Q)
    assert T.shape == (len(Q), 4, 64)
    np.testing.assert_array_equal(T[3], fitted.dtable(Q[3]).dtable)
    np.testing.assert_allclose(T, ref.tables(Q, fitted.codewords), rtol=1e-5, atol=1e-3)


def test_dot_metric(data):
    X, Q = data
    pq = cypq.PQ(M=4, Ks=64, metric="dot", verbose=False).fit(X, iter=10)
    theirs = nanopq.PQ(M=4, Ks=64, metric="dot", verbose=False)
    theirs.codewords, theirs.Ds = pq.codewords, pq.Ds
    codes = pq.encode(X)
    np.testing.assert_allclose(pq.dtable(Q[0]).dtable, theirs.dtable(Q[0]).dtable, rtol=1e-5,
                               atol=1e-3)
    D, I = pq.search(Q, codes, k=10)
    ip = np.stack([pq.dtable(q).adist(codes) for q in Q])
    assert (np.diff(D, axis=1) <= 0).all()  # largest first
    np.testing.assert_allclose(D[:, 0], ip.max(1), rtol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(ip, I, 1), D, rtol=1e-5)


def test_opq_nanopq_semantics(data):
    X, Q = data
    opq = cypq.OPQ(M=4, Ks=32, verbose=False).fit(X, rotation_iter=4, pq_iter=10)
    R = opq.R
    assert R.shape == (32, 32) and R.dtype == np.float32
    np.testing.assert_allclose(R.T @ R, np.eye(32), atol=1e-4)
    np.testing.assert_allclose(opq.rotate(X[:3]), X[:3] @ R, rtol=1e-5)
    np.testing.assert_allclose(opq.rotate(X[0]), X[0] @ R, rtol=1e-5)
    # nanopq's OPQ, given our R and codewords, computes the same codes, decodes and tables.
    theirs = nanopq.OPQ(M=4, Ks=32, verbose=False)
    theirs.R = R
    theirs.pq.codewords, theirs.pq.Ds = opq.codewords, opq.Ds
    codes = opq.encode(X)
    np.testing.assert_array_equal(codes, theirs.encode(X))
    np.testing.assert_allclose(opq.decode(codes), theirs.decode(codes), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(opq.dtable(Q[0]).dtable, theirs.dtable(Q[0]).dtable, rtol=1e-4,
                               atol=1e-2)


def test_opq_beats_pq_on_correlated_data():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (3000, 8))
    X = (base @ rng.normal(0, 1, (8, 32))).astype(np.float32)  # correlated, low rank
    mse = lambda m: ((m.decode(m.encode(X)) - X) ** 2).sum(1).mean()
    pq = cypq.PQ(M=4, Ks=32, verbose=False).fit(X, iter=20)
    for parametric in (False, True):
        opq = cypq.OPQ(M=4, Ks=32, verbose=False).fit(X, parametric_init=parametric,
                                                     rotation_iter=8, pq_iter=20)
        assert mse(opq) < 0.9 * mse(pq)


def test_eigenvalue_allocation_is_rotation(data):
    X, _ = data
    R = cypq.OPQ(M=4, verbose=False).eigenvalue_allocation(X)
    np.testing.assert_allclose(R.T @ R, np.eye(32), atol=1e-4)


def test_opq_dot_metric_is_honoured(data):
    X, Q = data
    opq = cypq.OPQ(M=4, Ks=32, metric="dot", verbose=False).fit(X, rotation_iter=2)
    assert opq.metric == "dot" and opq.pq.metric == "dot"
    codes = opq.encode(X)
    D, I = opq.search(Q, codes, k=5)
    approx = opq.decode(codes)
    ip = Q @ approx.T
    np.testing.assert_allclose(D, np.take_along_axis(ip, I, 1), rtol=1e-3, atol=1e-2)
    assert (np.diff(D, axis=1) <= 1e-3).all()


def test_pickle_and_equality(data, fitted):
    X, _ = data
    for model in (fitted, cypq.OPQ(M=4, Ks=16, verbose=False).fit(X, rotation_iter=2)):
        again = pickle.loads(pickle.dumps(model))
        assert again == model
        np.testing.assert_array_equal(again.encode(X[:10]), model.encode(X[:10]))
    assert fitted != cypq.PQ(M=4, Ks=64, verbose=False)
    assert fitted != "not a PQ"


def test_nanopq_code_runs_unchanged(data):
    """nanopq's README example, with `import cypq as nanopq`."""
    X, Q = data
    pq = nanopq_compat.PQ(M=8, verbose=False)
    pq.fit(vecs=X[:1000], iter=20, seed=123)
    X_code = pq.encode(vecs=X)
    dists = pq.dtable(query=Q[0]).adist(codes=X_code)
    assert dists.shape == (len(X),)
    X_reconstructed = pq.decode(codes=X_code)
    assert X_reconstructed.shape == X.shape
    opq = nanopq_compat.OPQ(M=8, verbose=False)
    opq.fit(vecs=X[:1000], pq_iter=20, rotation_iter=10, seed=123)
    assert opq.dtable(Q[0]).adist(opq.encode(X)).shape == (len(X),)


def test_input_conversion(data, fitted):
    X, _ = data
    codes = fitted.encode(X[:100])
    np.testing.assert_array_equal(fitted.encode(X[:100].astype(np.float64)), codes)
    np.testing.assert_array_equal(fitted.encode(np.asfortranarray(X[:100])), codes)
    np.testing.assert_array_equal(fitted.encode(X[:200:2]), fitted.encode(X[:200][::2].copy()))
    np.testing.assert_array_equal(fitted.decode(codes.astype(np.int64)), fitted.decode(codes))
    assert fitted.encode(np.empty((0, 32), np.float32)).shape == (0, 4)


@pytest.mark.parametrize("bad,exc,msg", [
    (np.zeros(32, np.float32), ValueError, "shape"),
    (np.zeros((10, 31), np.float32), ValueError, "dimension 31"),
    (np.full((10, 32), np.nan, np.float32), ValueError, "NaN"),
    (np.full((10, 32), np.inf), ValueError, "infinity"),
    (np.full((10, 32), 1e300), ValueError, "float32"),
    (np.zeros((10, 32), complex), TypeError, "real-valued"),
    (np.array([["a"] * 32] * 3), TypeError, "numeric"),
    (np.empty((0, 32), np.float32), None, None),
])
def test_encode_bad_input(fitted, bad, exc, msg):
    if exc is None:
        return
    with pytest.raises(exc, match=msg):
        fitted.encode(bad)


def test_finite_check_anywhere_and_past_float32_sums(fitted):
    """Validation sums float32 input in float32 first: one NaN or infinity anywhere is caught
    (inf and -inf together too), and finite values whose float32 sum overflows pass (summed
    again in float64)."""
    from cypq._checks import as_vectors
    X = np.ones((10, 32), np.float32)
    for spots in ([(7, 19, np.nan)], [(0, 0, np.inf)], [(9, 31, -np.inf)],
                  [(0, 0, np.inf), (3, 4, -np.inf)]):
        Y = X.copy()
        for i, j, v in spots:
            Y[i, j] = v
        with pytest.raises(ValueError, match="NaN or infinity"):
            fitted.encode(Y)
    big = np.full((10, 32), 3e38, np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(big.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # and without an overflow warning
        assert as_vectors(big, "x") is big


def test_fit_errors(data):
    X, _ = data
    with pytest.raises(ValueError, match="fewer than Ks"):
        cypq.PQ(M=4, Ks=256, verbose=False).fit(X[:100])
    with pytest.raises(ValueError, match="divisible by M"):
        cypq.PQ(M=5, Ks=16, verbose=False).fit(X)
    with pytest.raises(ValueError, match="empty"):
        cypq.PQ(M=4, Ks=16, verbose=False).fit(np.empty((0, 32), np.float32))
    with pytest.raises(ValueError, match="minit"):
        cypq.PQ(M=4, Ks=16, verbose=False).fit(X, minit="bogus")
    with pytest.raises(ValueError, match="init="):
        cypq.PQ(M=4, Ks=16, verbose=False).fit(X, minit="matrix")
    with pytest.raises(ValueError, match="metric"):
        cypq.PQ(M=4, metric="cosine")
    with pytest.raises(ValueError, match="M must be positive"):
        cypq.PQ(M=0)
    with pytest.raises(ValueError, match="n_threads"):
        cypq.PQ(M=4, n_threads=0)


def test_unfitted_errors(data):
    X, Q = data
    for model in (cypq.PQ(M=4, verbose=False), cypq.OPQ(M=4, verbose=False)):
        for call in (lambda: model.encode(X), lambda: model.decode(np.zeros((1, 4), np.uint8)),
                     lambda: model.dtable(Q[0]), lambda: model.search(Q, np.zeros((1, 4)), 1)):
            with pytest.raises(NotFittedError, match="fit()"):
                call()


def test_code_errors(fitted, data):
    X, Q = data
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        fitted.decode(np.zeros((3, 5), np.uint8))
    with pytest.raises(ValueError, match="Ks=64"):
        fitted.decode(np.full((3, 4), 64, np.uint8))
    with pytest.raises(ValueError, match="Ks=64"):
        fitted.decode(np.full((3, 4), -1, np.int64))
    with pytest.raises(TypeError, match="integer"):
        fitted.decode(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="k must be positive"):
        fitted.search(Q, fitted.encode(X[:10]), k=0)
    with pytest.raises(ValueError, match="dimension"):
        fitted.dtable(Q[0, :10])
    with pytest.raises(ValueError, match="Ks=64"):
        fitted.dtable(Q[0]).adist(np.full((2, 4), 200, np.uint8))
