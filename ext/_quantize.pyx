# cython: freethreading_compatible = True
"""Kernels: nearest-codeword encoding per subspace, decoding, and distance tables.

A PQ codebook set is C (M, Ks, Ds) float32: subspace m of a D = M * Ds vector is quantised by
C[m]. The same encode kernel is the assignment step of k-means (M subspaces trained at once).
"""
from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport sgemm

from simd cimport (cypq_argmin_shifted, cypq_ip_ny, cypq_l2sqr_ny, cypq_nearest_l2,
                   cypq_nearest_l2_x4)
from types cimport code_t

# From this sub-dimension on, the assignment uses sgemm (-2 x.c + ||c||^2) on blocks of rows;
# below it, exact differences in a SIMD loop are faster and match faiss's codes exactly.
BLAS_MIN_DIM = 32
cdef int _BLAS_MIN_DIM = BLAS_MIN_DIM
cdef enum:
    ROW_CHUNK = 256


cdef float *transpose_codebooks(const float[:, :, ::1] C) noexcept nogil:
    """Malloc'ed CT (M, Ds, Ks) with CT[m, j, k] = C[m, k, j]; NULL when out of memory."""
    cdef Py_ssize_t M = C.shape[0], Ks = C.shape[1], Ds = C.shape[2], m, k, j
    cdef float *CT = <float *> malloc(M * Ks * Ds * sizeof(float))
    if CT == NULL:
        return NULL
    for m in range(M):
        for k in range(Ks):
            for j in range(Ds):
                CT[(m * Ds + j) * Ks + k] = C[m, k, j]
    return CT


def encode(const float[:, ::1] X, const float[:, :, ::1] C, code_t[:, ::1] codes,
           float[::1] err, int n_threads):
    """Nearest codeword of every subvector.

    X (n, D) float32; C (M, Ks, Ds) float32 with D == M * Ds; codes (n, M) output;
    err (n,) output, each row's squared quantisation error summed over subspaces, or an empty
    array to skip it.
    """
    cdef Py_ssize_t n = X.shape[0], D = X.shape[1]
    cdef int M = C.shape[0], Ks = C.shape[1], Ds = C.shape[2]
    cdef bint want_err = err.shape[0] > 0
    if D != M * Ds or codes.shape[0] != n or codes.shape[1] != M:
        raise ValueError("encode: inconsistent shapes")
    if want_err and err.shape[0] != n:
        raise ValueError("encode: err must have n entries")
    if n == 0:
        return
    if Ds >= _BLAS_MIN_DIM:
        _encode_blas(X, C, codes, err, want_err, n_threads)
    else:
        _encode_direct(X, C, codes, err, want_err, n_threads)


cdef int _encode_direct(const float[:, ::1] X, const float[:, :, ::1] C, code_t[:, ::1] codes,
                        float[::1] err, bint want_err, int n_threads) except -1:
    cdef Py_ssize_t n = X.shape[0], n_quads = n // 4, i, q
    cdef int M = C.shape[0], Ks = C.shape[1], Ds = C.shape[2], m, p
    cdef int failed = 0
    cdef float best, e
    cdef float *scratch
    cdef float *e4
    cdef float *b4
    cdef int32_t *i4
    cdef float *CT
    with nogil:
        CT = transpose_codebooks(C)
    if CT == NULL:
        raise MemoryError()
    try:
        with nogil, parallel(num_threads=n_threads):
            # Rows four at a time (see cypq_nearest_l2_x4) with per-thread scratch.
            scratch = <float *> malloc(12 * sizeof(float))
            e4 = scratch
            b4 = scratch + 4
            i4 = <int32_t *> (scratch + 8)
            for q in prange(n_quads, schedule="static", chunksize=64):
                if scratch == NULL:
                    failed = 1
                    continue
                i = 4 * q
                for p in range(4):
                    e4[p] = 0
                for m in range(M):
                    cypq_nearest_l2_x4(&X[i, m * Ds], &X[i + 1, m * Ds], &X[i + 2, m * Ds],
                                       &X[i + 3, m * Ds], CT + m * Ds * Ks, Ds, Ks, i4, b4)
                    for p in range(4):
                        codes[i + p, m] = <code_t> i4[p]
                        e4[p] += b4[p]
                if want_err:
                    for p in range(4):
                        err[i + p] = e4[p]
            free(scratch)
        with nogil:
            for i in range(4 * n_quads, n):
                e = 0
                for m in range(M):
                    codes[i, m] = <code_t> cypq_nearest_l2(&X[i, m * Ds], CT + m * Ds * Ks,
                                                          Ds, Ks, &best)
                    e = e + best
                if want_err:
                    err[i] = e
    finally:
        free(CT)
    if failed:
        raise MemoryError()
    return 0


cdef int _encode_blas(const float[:, ::1] X, const float[:, :, ::1] C, code_t[:, ::1] codes,
                      float[::1] err, bint want_err, int n_threads) except -1:
    cdef Py_ssize_t n = X.shape[0], n_chunks = (n + ROW_CHUNK - 1) // ROW_CHUNK
    cdef Py_ssize_t ch, i0, r
    cdef int D = X.shape[1], M = C.shape[0], Ks = C.shape[1], Ds = C.shape[2]
    cdef int m, j, nb
    cdef float best, xn, e, alpha = -2.0, beta = 0.0
    cdef char transa = b'T', transb = b'N'
    cdef float *G
    cdef int failed = 0
    cdef float *cnorm = <float *> malloc(M * Ks * sizeof(float))
    if cnorm == NULL:
        raise MemoryError()
    with nogil:
        for m in range(M):
            for r in range(Ks):
                xn = 0
                for j in range(Ds):
                    xn = xn + C[m, r, j] * C[m, r, j]
                cnorm[m * Ks + r] = xn
        with parallel(num_threads=n_threads):
            G = <float *> malloc(ROW_CHUNK * Ks * sizeof(float))
            for ch in prange(n_chunks, schedule="dynamic"):
                if G == NULL:
                    failed = 1
                    continue
                i0 = ch * ROW_CHUNK
                nb = <int> (n - i0 if n - i0 < ROW_CHUNK else ROW_CHUNK)
                if want_err:
                    for r in range(nb):
                        err[i0 + r] = 0
                for m in range(M):
                    # Column-major view: G^T (Ks x nb) = -2 * C[m] (Ds x Ks)^T @ Xsub (Ds x nb).
                    sgemm(&transa, &transb, &Ks, &nb, &Ds, &alpha, <float *> &C[m, 0, 0], &Ds,
                          <float *> &X[i0, m * Ds], &D, &beta, G, &Ks)
                    for r in range(nb):
                        codes[i0 + r, m] = <code_t> cypq_argmin_shifted(
                            G + r * Ks, cnorm + m * Ks, Ks, &best)
                        if want_err:
                            xn = 0
                            for j in range(Ds):
                                xn = xn + X[i0 + r, m * Ds + j] * X[i0 + r, m * Ds + j]
                            e = best + xn
                            err[i0 + r] += e if e > 0 else 0
            free(G)
    free(cnorm)
    if failed:
        raise MemoryError()
    return 0


def decode(const code_t[:, ::1] codes, const float[:, :, ::1] C, float[:, ::1] out,
           int n_threads):
    """out[i, m*Ds:(m+1)*Ds] = C[m, codes[i, m]]. Codes must be < Ks (checked by the caller).

    codes (n, M); C (M, Ks, Ds) float32; out (n, M * Ds) float32 output.
    """
    cdef Py_ssize_t n = codes.shape[0], i
    cdef int M = C.shape[0], Ds = C.shape[2], m
    if codes.shape[1] != M or out.shape[0] != n or out.shape[1] != M * Ds:
        raise ValueError("decode: inconsistent shapes")
    with nogil:
        for i in prange(n, num_threads=n_threads, schedule="static", chunksize=ROW_CHUNK):
            for m in range(M):
                memcpy(&out[i, m * Ds], &C[m, codes[i, m], 0], Ds * sizeof(float))


def tables(const float[:, ::1] Q, const float[:, :, ::1] C, float[:, :, ::1] out, bint ip,
           int n_threads):
    """Distance tables of queries against every codeword of every subspace.

    Q (nq, D) float32; C (M, Ks, Ds) float32; out (nq, M, Ks) float32 output: squared L2
    distances, or inner products when ip is true.
    """
    cdef Py_ssize_t nq = Q.shape[0], q
    cdef int M = C.shape[0], Ks = C.shape[1], Ds = C.shape[2], m
    cdef float *CT
    if Q.shape[1] != M * Ds or out.shape[0] != nq or out.shape[1] != M or out.shape[2] != Ks:
        raise ValueError("tables: inconsistent shapes")
    if nq == 0:
        return
    with nogil:
        CT = transpose_codebooks(C)
    if CT == NULL:
        raise MemoryError()
    with nogil:
        for q in prange(nq, num_threads=n_threads, schedule="static"):
            for m in range(M):
                if ip:
                    cypq_ip_ny(&Q[q, m * Ds], CT + m * Ds * Ks, Ds, Ks, &out[q, m, 0])
                else:
                    cypq_l2sqr_ny(&Q[q, m * Ds], CT + m * Ds * Ks, Ds, Ks, &out[q, m, 0])
    free(CT)
