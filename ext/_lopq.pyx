# cython: freethreading_compatible = True
"""Kernels of LOPQ's local frames: per-cluster residual statistics, and the projection of
vectors into (and back out of) the local frame of their coarse centroid.

Both work cluster by cluster over rows grouped by cluster (``order`` lists the rows of cluster
c at ``order[offsets[c]:offsets[c+1]]``), so each cluster's rotation is applied to a block of
rows at once and each cluster's statistics are summed by one thread, in row order.
"""
from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from simd cimport cypq_matmul_t, cypq_prefetch_span, cypq_shift2, cypq_transpose

cdef enum:
    BLOCK = 256       # rows gathered per block (scratch of (2 * BLOCK + d) * d floats per thread)


def group_rows(const int32_t[::1] labels, int n_clusters):
    """Counting sort of rows by label.

    labels (n,) int32 in [0, n_clusters). Returns (order (n,) int64, offsets (n_clusters + 1,)
    int64): the rows of cluster c, ascending, are order[offsets[c]:offsets[c + 1]].
    """
    import numpy as np
    cdef Py_ssize_t n = labels.shape[0], i
    cdef int c
    offsets_arr = np.zeros(n_clusters + 1, dtype=np.int64)
    order_arr = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] offsets = offsets_arr
    cdef int64_t[::1] order = order_arr
    cdef int64_t[::1] fill = np.empty(n_clusters, dtype=np.int64)
    with nogil:
        for i in range(n):
            c = labels[i]
            if c < 0 or c >= n_clusters:
                with gil:
                    raise ValueError(f"label {c} outside [0, {n_clusters})")
            offsets[c + 1] += 1
        for c in range(n_clusters):
            offsets[c + 1] += offsets[c]
            fill[c] = offsets[c]
        for i in range(n):
            c = labels[i]
            order[fill[c]] = i
            fill[c] += 1
    return order_arr, offsets_arr


def residual_stats(const float[:, ::1] X, int col0, const float[:, ::1] C,
                   const int64_t[::1] order, const int64_t[::1] offsets,
                   double[:, ::1] mean, double[:, :, ::1] cov, int n_threads):
    """Mean and covariance of the residuals x - C[c] of every cluster.

    X (n, D) float32, of which columns col0 : col0 + d are used; C (V, d) float32 centroids;
    order, offsets from group_rows; mean (V, d) float64 and cov (V, d, d) float64 outputs
    (population covariance; zero for clusters with no rows).
    """
    cdef int V = C.shape[0], d = C.shape[1], a, b, c
    cdef Py_ssize_t t, i, cnt
    cdef double s, inv
    cdef double *r
    cdef int failed = 0
    cdef int *fail = &failed
    if col0 < 0 or col0 + d > X.shape[1] or offsets.shape[0] != V + 1:
        raise ValueError("residual_stats: inconsistent arguments")
    if mean.shape[0] != V or mean.shape[1] != d or cov.shape[0] != V or cov.shape[1] != d:
        raise ValueError("residual_stats: outputs must be (V, d) and (V, d, d)")
    with nogil, parallel(num_threads=n_threads):
        r = <double *> malloc(d * sizeof(double))
        for c in prange(V, schedule="dynamic"):
            if r == NULL:
                fail[0] = 1
                continue
            cnt = offsets[c + 1] - offsets[c]
            for a in range(d):
                mean[c, a] = 0
                for b in range(d):
                    cov[c, a, b] = 0
            if cnt == 0:
                continue
            inv = 1.0 / cnt
            for t in range(offsets[c], offsets[c + 1]):
                i = order[t]
                for a in range(d):
                    mean[c, a] += <double> X[i, col0 + a] - C[c, a]
            for a in range(d):
                mean[c, a] *= inv
            # Second pass around the mean: accurate even when the mean is large.
            for t in range(offsets[c], offsets[c + 1]):
                i = order[t]
                for a in range(d):
                    r[a] = <double> X[i, col0 + a] - C[c, a] - mean[c, a]
                for a in range(d):
                    s = r[a]
                    for b in range(a, d):
                        cov[c, a, b] += s * r[b]
            for a in range(d):
                for b in range(a, d):
                    cov[c, a, b] *= inv
                    cov[c, b, a] = cov[c, a, b]
        free(r)
    if failed:
        raise MemoryError()


def project(const float[:, ::1] X, int col0, const float[:, ::1] C, const float[:, :, ::1] R,
            const float[:, ::1] mu, const int64_t[::1] order,
            const int64_t[::1] offsets, float[:, ::1] out, int out_col0, bint inverse,
            int n_threads, const int64_t[::1] src=None, const float[:, :, ::1] RT=None):
    """Local projection of every row in its cluster's frame, or its inverse.

    X (n, D) float32 (columns col0 : col0 + d); C (V, d) centroids; R (V, d, d) rotations;
    mu (V, d) residual means; order, offsets from group_rows;
    out (n, E) float32 output, columns
    out_col0 : out_col0 + d written. Forward: out = R[c] @ (x - C[c] - mu[c]).
    Inverse: out = R[c].T @ x + mu[c] + C[c]. A row's result does not depend on the rows it
    is grouped with (see cypq_matmul_t). ``src`` (n,) int64: row i of the output is made
    from X[src[i]] (order and offsets then group 0 .. n-1), so repeated rows of X need not
    be copied first (a search projects each query into many frames). ``RT`` (V, d, d): the
    rotations transposed, made once (KernelView.RT), for a forward projection to read
    instead of transposing each visited one per call; the same results.
    """
    cdef int V = C.shape[0], d = C.shape[1], c, a, nb
    cdef Py_ssize_t t0, t, i, n = X.shape[0]
    cdef float *Z
    cdef float *Y
    cdef float *Rt
    cdef int failed = 0
    cdef int *fail = &failed
    cdef const int64_t *sp = NULL
    cdef Py_ssize_t j
    if col0 < 0 or col0 + d > X.shape[1] or out_col0 < 0 or out_col0 + d > out.shape[1]:
        raise ValueError("project: column range outside the arrays")
    if src is not None:
        n = src.shape[0]
        for j in range(n):
            if src[j] < 0 or src[j] >= X.shape[0]:
                raise ValueError("project: src out of range")
        if n:
            sp = &src[0]
    if (R.shape[0] != V or R.shape[1] != d or R.shape[2] != d or mu.shape[0] != V
            or mu.shape[1] != d or offsets.shape[0] != V + 1 or out.shape[0] != n):
        raise ValueError("project: inconsistent shapes")
    cdef const float *RTs = NULL
    if RT is not None and not inverse:
        if RT.shape[0] != V or RT.shape[1] != d or RT.shape[2] != d:
            raise ValueError("project: RT's shape is not R's")
        if V:
            RTs = &RT[0, 0, 0]
    cdef const float *A
    with nogil, parallel(num_threads=n_threads):
        Z = <float *> malloc((2 * BLOCK + d) * d * sizeof(float))
        Y = Z + BLOCK * d
        Rt = Y + BLOCK * d
        for c in prange(V, schedule="dynamic"):
            if Z == NULL:
                fail[0] = 1
                continue
            t0 = offsets[c]
            if inverse:
                A = &R[c, 0, 0]
            else:
                A = RTs + <int64_t> c * d * d if RTs != NULL else Rt
            if not inverse and t0 < offsets[c + 1]:
                if RTs == NULL:
                    # R[c]^T made here where the view keeps no transposed copy (models whose
                    # rotations pass KernelView's budget: a copy would double them)
                    cypq_transpose(&R[c, 0, 0], d, Rt)
                # the next cluster's rotation, read while this one's rows are projected: the
                # transposes waited on its misses (8% of a REALSIFT1M 4-bit search); into L2,
                # which holds it whole (16-36 KB), where L1 held its rows and tables (0.97-1.0x
                # the time of a search, 4-bit and 8-bit, REALSIFT1M and MANMINILM)
                if c + 1 < V and offsets[c + 2] > offsets[c + 1]:
                    cypq_prefetch_span(RTs + <int64_t> (c + 1) * d * d if RTs != NULL
                                       else &R[c + 1, 0, 0], <int64_t> d * d * sizeof(float), 1)
            while t0 < offsets[c + 1]:
                nb = <int> (offsets[c + 1] - t0 if offsets[c + 1] - t0 < BLOCK else BLOCK)
                for t in range(nb):
                    i = order[t0 + t]
                    j = sp[i] if sp != NULL else i
                    if inverse:
                        memcpy(Z + t * d, &X[j, col0], d * sizeof(float))
                    else:
                        cypq_shift2(&X[j, col0], &C[c, 0], &mu[c, 0], -1, d, Z + t * d)
                # y = R[c] z is a sum of the rows of R[c]^T (A), R[c]^T z of R[c]'s.
                cypq_matmul_t(A, Z, nb, d, Y)
                for t in range(nb):
                    i = order[t0 + t]
                    if inverse:
                        cypq_shift2(Y + t * d, &mu[c, 0], &C[c, 0], 1, d, &out[i, out_col0])
                    else:
                        memcpy(&out[i, out_col0], Y + t * d, d * sizeof(float))
                t0 = t0 + nb
        free(Z)
    if failed:
        raise MemoryError()
