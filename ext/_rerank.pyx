# cython: freethreading_compatible = True
"""Exact scores of candidate vectors against their queries, for re-ranking."""
from cython.parallel cimport prange
from libc.math cimport INFINITY, sqrtf
from libc.stdint cimport int64_t, uint8_t

ctypedef fused row_t:
    uint8_t
    float


cdef inline float score(const float *q, const row_t *x, Py_ssize_t d, int kind) noexcept nogil:
    """kind 0: |q - x|^2; 1: -<q, x>; 2: -<q, x> / |x| (q of unit norm; 0 for a zero x)."""
    cdef Py_ssize_t j
    cdef float s = 0, n = 0, t
    if kind == 0:
        for j in range(d):
            t = q[j] - <float> x[j]
            s = s + t * t
        return s
    for j in range(d):
        s = s + q[j] * <float> x[j]
    if kind == 1:
        return -s
    for j in range(d):
        n = n + <float> x[j] * <float> x[j]
    return -s / sqrtf(n) if n > 0 else 0


def exact_scores(const float[:, ::1] Q, const row_t[:, ::1] X, const int64_t[:, ::1] row,
                 int kind, float[:, ::1] out, int n_threads):
    """Scores of candidates, smaller first.

    Parameters
    ----------
    Q : float32 (nq, d)
        Queries (of unit norm for kind 2).
    X : uint8 or float32 (n, d)
        Candidate vectors.
    row : int64 (nq, r)
        Row of X of each candidate of each query; -1 for none.
    kind : int
        0: squared L2 distance; 1: minus the inner product; 2: minus the cosine.
    out : float32 (nq, r)
        The scores; inf where row is -1.
    n_threads : int
    """
    cdef Py_ssize_t nq = Q.shape[0], r = row.shape[1], d = Q.shape[1], q, c
    if X.shape[1] != d or row.shape[0] != nq or out.shape[0] != nq or out.shape[1] != r:
        raise ValueError("exact_scores: shapes do not match")
    if row.size and (min_of(row) < -1 or max_of(row) >= X.shape[0]):
        raise ValueError("exact_scores: a row is outside X")
    with nogil:
        for q in prange(nq, num_threads=max(1, n_threads), schedule="static"):
            for c in range(r):
                if row[q, c] < 0:
                    out[q, c] = INFINITY
                else:
                    out[q, c] = score(&Q[q, 0], &X[row[q, c], 0], d, kind)


cdef int64_t min_of(const int64_t[:, ::1] a) noexcept nogil:
    cdef int64_t m = a[0, 0]
    cdef Py_ssize_t i, j
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if a[i, j] < m:
                m = a[i, j]
    return m


cdef int64_t max_of(const int64_t[:, ::1] a) noexcept nogil:
    cdef int64_t m = a[0, 0]
    cdef Py_ssize_t i, j
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if a[i, j] > m:
                m = a[i, j]
    return m
