"""Every kernel against its NumPy reference (tests/reference.py), with 1 and 2 threads."""
import numpy as np
import pytest

from cypq import _adc, _kmeans, _quantize

import reference as ref
from conftest import clustered


def _codebooks(rng, M, Ks, Ds):
    return rng.normal(0, 3, (M, Ks, Ds)).astype(np.float32)


@pytest.mark.parametrize("M,Ks,Ds", [(4, 256, 8), (2, 100, 3), (3, 16, 40), (2, 1024, 64),
                                     (1, 300, 5)])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_encode_matches_reference(M, Ks, Ds, dtype, n_threads):
    rng = np.random.default_rng(1)
    C = _codebooks(rng, M, Ks, Ds)
    X = rng.normal(0, 3, (203, M * Ds)).astype(np.float32)  # 203: not a multiple of 4
    codes = np.empty((len(X), M), dtype=dtype)
    err = np.empty(len(X), dtype=np.float32)
    _quantize.encode(X, C, codes, err, n_threads)
    want, want_err = ref.encode(X, C)
    # The sgemm path (Ds >= 32) may break near-ties differently: compare distances there.
    got_d = ref.tables(X, C)[np.arange(len(X))[:, None], np.arange(M)[None], codes]
    best_d = ref.tables(X, C).min(2)
    np.testing.assert_allclose(got_d, best_d, rtol=1e-4, atol=1e-3)
    if Ds < _quantize.BLAS_MIN_DIM:
        np.testing.assert_array_equal(codes, want)
    else:
        assert (codes == want).mean() > 0.99
    np.testing.assert_allclose(err, want_err, rtol=1e-4, atol=1e-2)


def test_encode_uint8_and_no_err(n_threads):
    rng = np.random.default_rng(2)
    C = _codebooks(rng, 8, 256, 4)
    X = rng.normal(0, 3, (1001, 32)).astype(np.float32)
    codes = np.empty((1001, 8), dtype=np.uint8)
    _quantize.encode(X, C, codes, np.empty(0, np.float32), n_threads)
    np.testing.assert_array_equal(codes, ref.encode(X, C)[0])


def test_encode_shape_errors():
    C = np.zeros((2, 4, 3), np.float32)
    with pytest.raises(ValueError):
        _quantize.encode(np.zeros((5, 7), np.float32), C, np.zeros((5, 2), np.uint8),
                         np.empty(0, np.float32), 1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_decode_matches_reference(dtype, n_threads):
    rng = np.random.default_rng(3)
    C = _codebooks(rng, 4, 200, 5)
    codes = rng.integers(0, 200, (77, 4)).astype(dtype)
    out = np.empty((77, 20), np.float32)
    _quantize.decode(codes, C, out, n_threads)
    np.testing.assert_array_equal(out, ref.decode(codes, C))


@pytest.mark.parametrize("ip", [False, True])
@pytest.mark.parametrize("Ds", [1, 8, 33])
@pytest.mark.parametrize("Ks", [70, 45, 16])
def test_tables_match_reference(ip, Ds, Ks, n_threads):
    """From 16 dimensions the kernel sums blocks of 64, 32 and 8 codewords in registers, the
    rest one by one: Ks = 70 (64 + 6), 45 (32 + 8 + 5), 16 (8 + 8) take each."""
    rng = np.random.default_rng(4)
    C = _codebooks(rng, 3, Ks, Ds)
    Q = rng.normal(0, 3, (9, 3 * Ds)).astype(np.float32)
    out = np.empty((9, 3, Ks), np.float32)
    _quantize.tables(Q, C, out, ip, n_threads)
    np.testing.assert_allclose(out, ref.tables(Q, C, ip), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M,dtype", [(8, np.uint8), (16, np.uint8), (5, np.uint16),
                                     (16, np.uint16), (3, np.uint32)])
def test_adc_matches_reference(M, dtype, n_threads):
    rng = np.random.default_rng(5)
    Ks = 256 if dtype == np.uint8 else 1000
    T = rng.random((M, Ks)).astype(np.float32)
    codes = rng.integers(0, Ks, (3000, M)).astype(dtype)
    out = np.empty(3000, np.float32)
    _adc.adc(T, codes, out, n_threads)
    np.testing.assert_allclose(out, ref.adc(T.astype(np.float64), codes), rtol=1e-5)


@pytest.mark.parametrize("n,k", [(5000, 10), (2500, 100), (7, 10), (1, 1), (0, 3)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_adc_topk_matches_reference(n, k, dtype, n_threads):
    rng = np.random.default_rng(6)
    M, Ks, nq = 8, 256, 13
    T = rng.random((nq, M, Ks)).astype(np.float32)
    codes = rng.integers(0, Ks, (n, M)).astype(dtype)
    D = np.empty((nq, k), np.float32)
    I = np.empty((nq, k), np.int64)
    _adc.adc_topk(T, codes, D, I, n_threads)
    dist = np.stack([ref.adc(T[q], codes) for q in range(nq)]) if n else np.empty((nq, 0))
    wantD, wantI = ref.topk(dist.astype(np.float32), k)
    np.testing.assert_allclose(D, wantD, rtol=1e-6)
    # Ids agree wherever the distance is not tied with a neighbour.
    untied = np.ones_like(wantD, dtype=bool)
    untied[:, 1:] &= wantD[:, 1:] != wantD[:, :-1]
    untied[:, :-1] &= wantD[:, :-1] != wantD[:, 1:]
    np.testing.assert_array_equal(I[untied], wantI[untied])


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("k", [1, 31, 32, 100, 400, 600])
def test_adc_topk_ties_rank_by_id(k, signed, n_threads):
    # Tables of a few integers make most distances tied: the top k must be the k smallest
    # (distance, row) pairs in that order, however the reservoir compacts (k and 2k or
    # k + 32 entries), whatever the order of the rows, and whichever way the final sort
    # goes (with AVX-512 a sorting network up to 256 entries; else by counting up to 96, by
    # radix up to 512; quicksort beyond). Signed: negative distances too (inner products),
    # and -0.0 sums, tied with +0.0 ones.
    rng = np.random.default_rng(16)
    M, Ks, nq, n = 4, 256, 7, 6000
    T = rng.integers(-2 if signed else 0, 3, (nq, M, Ks)).astype(np.float32)
    if signed:
        T[T == 0] = np.float32(-0.0)
    codes = rng.integers(0, Ks, (n, M)).astype(np.uint8)
    D = np.empty((nq, k), np.float32)
    I = np.empty((nq, k), np.int64)
    _adc.adc_topk(T, codes, D, I, n_threads)
    for q in range(nq):
        dist = ref.adc(T[q], codes)
        order = np.lexsort((np.arange(n), dist))[:k]
        np.testing.assert_array_equal(I[q], order)
        np.testing.assert_array_equal(D[q], dist[order])


@pytest.mark.parametrize("portable", [False, True])
def test_sortnet_matches_numpy(portable):
    """The top k's sorting network (sortnet.h), in AVX-512 registers and in plain C, against
    np.sort: distinct keys (as the top k gives them), 0-256 of them (padded to a power of two
    within), random, ascending, descending, and keys a unit apart; more than 256 declined."""
    from cypq import _search
    rng = np.random.default_rng(3)
    for n in (0, 1, 2, 3, 15, 16, 17, 31, 64, 100, 127, 128, 129, 200, 255, 256):
        random = rng.choice(2**32 - 1, n, replace=False).astype(np.uint32)
        close = (rng.permutation(n) + np.uint32(2**31)).astype(np.uint32)
        for x in (random, np.sort(random), np.sort(random)[::-1].copy(), close):
            y = x.copy()
            if not _search.sortnet(y, portable):
                pytest.skip("no AVX-512 here: the network's AVX-512 build is not taken")
            np.testing.assert_array_equal(y, np.sort(x))
    x = np.arange(257, dtype=np.uint32)[::-1].copy()
    assert not _search.sortnet(x, portable) and x[0] == 256


def _bound_quantile_reference(lb: np.ndarray, want: int) -> np.float32:
    """cypq_bound_quantile in NumPy: of a sample of every step-th bound (4 want of them, 256
    at least), the upper edge of the first of 256 buckets between the bounds' minimum a and
    maximum b by which want / step of the sample have come (b where none before the last)."""
    a, b = lb.min(), lb.max()
    if not b > a or not np.isfinite(b - a):
        return b
    step = max(len(lb) // max(4 * want, 256), 1)
    scale = np.float32(256) / (b - a)
    k = np.clip(np.trunc((lb[::step] - a) * scale), 0, 255).astype(np.int64)
    reached = np.flatnonzero(np.cumsum(np.bincount(k, minlength=256))[:255]
                             >= -(-want // step))
    return a + np.float32(reached[0] + 1) / scale if len(reached) else b


def test_bound_quantile_matches_reference():
    """The two-phase scan's threshold guess (a histogram of a sample of the bounds) against
    NumPy's: lengths around the min / max pass's vectors of 8, samples 1 to ~19 apart, heavy
    ties, a few distinct values, a constant (which returns the constant)."""
    from cypq import _search
    rng = np.random.default_rng(5)
    for n in (2, 7, 8, 9, 100, 257, 1000, 2900, 5003, 20000):
        for lb in (rng.normal(50, 10, n), rng.integers(0, 4, n) * 3.5 + 10,
                   np.round(rng.exponential(20, n)), np.full(n, 7.0), np.arange(n)[::-1]):
            lb = np.ascontiguousarray(lb, dtype=np.float32)
            for want in {1, 3, 12, 120, n // 2, n - 1} - {0, n}:
                if not 0 < want < n:
                    continue
                got = _search.bound_quantile(lb, want)
                if got is None:
                    pytest.skip("no AVX2 here: no two-phase scan, no guess")
                assert np.float32(got) == _bound_quantile_reference(lb, want), (n, want)


def test_update_centroids_matches_reference(n_threads):
    rng = np.random.default_rng(7)
    X = clustered(3000, 24, seed=7)
    C0 = rng.normal(0, 1, (3, 50, 8)).astype(np.float32)
    codes = rng.integers(0, 40, (3000, 3)).astype(np.uint8)  # codes 40..49 stay empty
    C = C0.copy()
    counts = np.empty((3, 50), np.int64)
    _kmeans.update_centroids(X, codes, C, counts, n_threads)
    wantC, wantCounts = ref.update(X, codes, C0)
    np.testing.assert_array_equal(counts, wantCounts)
    np.testing.assert_allclose(C, wantC, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(C[:, 40:], C0[:, 40:])  # empty ones untouched


def test_kmeanspp_matches_reference(n_threads):
    rng = np.random.default_rng(8)
    X = clustered(10000, 12, seed=8)
    u = rng.random(64)
    C = np.empty((64, 4), np.float32)
    _kmeans.kmeanspp(X, 4, u, 17, C, n_threads)
    np.testing.assert_allclose(C, ref.kmeanspp(X, 4, 4, u, 17, 64), rtol=1e-6)


# ---------------------------------------------------------------- LOPQ kernels

def test_group_rows_matches_argsort():
    from cypq import _lopq
    labels = np.random.default_rng(9).integers(0, 7, 500).astype(np.int32)
    order, offsets = _lopq.group_rows(labels, 9)
    np.testing.assert_array_equal(order, np.argsort(labels, kind="stable"))
    np.testing.assert_array_equal(
        offsets, np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=9))]))
    with pytest.raises(ValueError):
        _lopq.group_rows(np.array([0, 9], np.int32), 9)


def test_residual_stats_match_reference(n_threads):
    from cypq import _lopq
    rng = np.random.default_rng(10)
    X = rng.normal(5, 2, (800, 12)).astype(np.float32)
    C = rng.normal(5, 2, (6, 4)).astype(np.float32)
    labels = rng.integers(0, 5, 800).astype(np.int32)  # cluster 5 stays empty
    order, offsets = _lopq.group_rows(labels, 6)
    mean, cov = np.empty((6, 4)), np.empty((6, 4, 4))
    _lopq.residual_stats(X, 8, C, order, offsets, mean, cov, n_threads)
    for c in range(6):
        r = X[labels == c, 8:12].astype(np.float64) - C[c]
        if len(r):
            np.testing.assert_allclose(mean[c], r.mean(0), rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(cov[c], np.cov(r, rowvar=False, bias=True), rtol=1e-5,
                                       atol=1e-9)
        else:
            assert not mean[c].any() and not cov[c].any()


@pytest.mark.parametrize("d", [8, 13, 24, 56, 120])
@pytest.mark.parametrize("inverse", [False, True])
def test_project_matches_reference(inverse, d, n_threads):
    """d = 120: four 16-wide column blocks at once (on AVX-512), then two, one and a tail;
    d = 56: two blocks at once, one alone and a scalar tail; d = 24: one block and the
    tail; d = 8: the tail only; d = 13: the forward transpose of R[c] (8 x 8 tiles) with
    edges of 5 rows and columns."""
    from cypq import _lopq
    rng = np.random.default_rng(11)
    X = rng.normal(0, 1, (700, 2 * d)).astype(np.float32)   # 700 rows: several row blocks
    C = rng.normal(0, 1, (5, d)).astype(np.float32)
    R = np.stack([np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(5)]).astype(np.float32)
    mu = rng.normal(0, 0.1, (5, d)).astype(np.float32)
    labels = rng.integers(0, 5, 700).astype(np.int32)
    order, offsets = _lopq.group_rows(labels, 5)
    out = np.full((700, 3 * d), np.nan, np.float32)
    _lopq.project(X, d, C, R, mu, order, offsets, out, 2 * d, inverse, n_threads)
    # a few rows alone (groups of 1 to 3, not blocks of 4): the same bits as in the big groups,
    # so a vector's projection does not depend on the batch it comes in
    few = np.flatnonzero(labels < 3)[:7]
    o2, off2 = _lopq.group_rows(np.ascontiguousarray(labels[few]), 5)
    out2 = np.empty((len(few), d), np.float32)
    _lopq.project(np.ascontiguousarray(X[few]), d, C, R, mu, o2, off2, out2, 0, inverse,
                  n_threads)
    x = X[:, d:]
    c = labels
    if inverse:
        want = np.einsum("nba,nb->na", R[c], x) + mu[c] + C[c]
    else:
        want = np.einsum("nab,nb->na", R[c], x - C[c] - mu[c])
    np.testing.assert_allclose(out[:, 2 * d:], want, rtol=1e-4, atol=1e-5)
    assert np.isnan(out[:, :2 * d]).all()   # other columns untouched
    np.testing.assert_array_equal(out2, out[few, 2 * d:])
    # the rotations given transposed (KernelView.RT): the same bits as transposed per call
    # (an inverse projection multiplies by R itself and ignores them)
    RT = np.ascontiguousarray(R.transpose(0, 2, 1))
    out3 = np.full((700, d), np.nan, np.float32)
    _lopq.project(X, d, C, R, mu, order, offsets, out3, 0, inverse, n_threads, None, RT)
    np.testing.assert_array_equal(out3, out[:, 2 * d:])
    if not inverse:   # (which alone reads them, and so checks their shape)
        with pytest.raises(ValueError, match="RT's shape"):
            _lopq.project(X, d, C, R, mu, order, offsets, out3, 0, inverse, n_threads, None,
                          np.ascontiguousarray(RT[:4]))
