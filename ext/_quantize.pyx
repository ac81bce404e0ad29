# cython: freethreading_compatible = True
"""Kernels: nearest-codeword encoding per subspace, decoding, and distance tables.

A PQ codebook set is C (M, Ks, Ds) float32: subspace m of a D = M * Ds vector is quantised by
C[m]. The same encode kernel is the assignment step of k-means (M subspaces trained at once).
"""
from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from nearest cimport (BLAS_MIN_DIM as _BLAS_MIN_DIM, ROW_CHUNK, Codebooks, Scratch,
                      codebooks_free, codebooks_init, nearest_rows, scratch_free, scratch_init,
                      scipy_sgemm)
from simd cimport cypq_ip_ny, cypq_l2sqr_ny
from types cimport code_t

# Sub-dimension from which nearest-codeword search uses sgemm (see ext/nearest.pxd).
BLAS_MIN_DIM = _BLAS_MIN_DIM


def encode(const float[:, ::1] X, const float[:, :, ::1] C, code_t[:, ::1] codes,
           float[::1] err, int n_threads):
    """Nearest codeword of every subvector.

    X (n, D) float32; C (M, Ks, Ds) float32 with D == M * Ds; codes (n, M) output;
    err (n,) output, each row's squared quantisation error summed over subspaces, or an empty
    array to skip it. Uses sgemm when Ds >= BLAS_MIN_DIM: hold BLAS to one thread around it.
    """
    cdef Py_ssize_t n = X.shape[0], D = X.shape[1]
    cdef Py_ssize_t n_chunks = (n + ROW_CHUNK - 1) // ROW_CHUNK, ch, i0, j
    cdef int M = C.shape[0], Ks = C.shape[1], Ds = C.shape[2], m, nb
    cdef bint want_err = err.shape[0] > 0
    cdef int failed = 0
    cdef int *fail = &failed  # shared: Cython makes names assigned in parallel blocks private
    cdef Codebooks cb
    cdef Scratch *s
    cdef Py_ssize_t *rows
    cdef int32_t *idx
    cdef float *d1
    if D != M * Ds or codes.shape[0] != n or codes.shape[1] != M:
        raise ValueError("encode: inconsistent shapes")
    if want_err and err.shape[0] != n:
        raise ValueError("encode: err must have n entries")
    if n == 0:
        return
    try:
        with nogil:
            if codebooks_init(&cb, &C[0, 0, 0], M, Ks, Ds, Ds < _BLAS_MIN_DIM) != 0:
                fail[0] = 1
        if failed:
            raise MemoryError()
        if Ds >= _BLAS_MIN_DIM:
            cb.sgemm = scipy_sgemm()
        with nogil, parallel(num_threads=n_threads):
            rows = <Py_ssize_t *> malloc(ROW_CHUNK * (sizeof(Py_ssize_t) + sizeof(int32_t)
                                                      + sizeof(float)))
            idx = <int32_t *> (rows + ROW_CHUNK)
            d1 = <float *> (idx + ROW_CHUNK)
            s = <Scratch *> malloc(sizeof(Scratch))  # per thread (assigned here -> private)
            if s == NULL or scratch_init(s, &cb) != 0:
                fail[0] = 1
            for ch in prange(n_chunks, schedule="static"):
                if rows == NULL or fail[0]:
                    fail[0] = 1
                    continue
                i0 = ch * ROW_CHUNK
                nb = <int> (n - i0 if n - i0 < ROW_CHUNK else ROW_CHUNK)
                for j in range(nb):
                    rows[j] = i0 + j
                    if want_err:
                        err[i0 + j] = 0
                for m in range(M):
                    nearest_rows(&cb, m, &X[0, 0], D, rows, nb, idx, d1, s)
                    for j in range(nb):
                        codes[i0 + j, m] = <code_t> idx[j]
                        if want_err:
                            err[i0 + j] += d1[j]
            if s != NULL:
                scratch_free(s)
            free(s)
            free(rows)
    finally:
        codebooks_free(&cb)
    if failed:
        raise MemoryError()


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
    cdef int M = C.shape[0], Ks = C.shape[1], Ds = C.shape[2], m, k, j
    cdef float *CT
    if Q.shape[1] != M * Ds or out.shape[0] != nq or out.shape[1] != M or out.shape[2] != Ks:
        raise ValueError("tables: inconsistent shapes")
    if nq == 0:
        return
    CT = <float *> malloc(M * Ks * Ds * sizeof(float))
    if CT == NULL:
        raise MemoryError()
    with nogil:
        for m in range(M):
            for k in range(Ks):
                for j in range(Ds):
                    CT[(m * Ds + j) * Ks + k] = C[m, k, j]
    with nogil:
        for q in prange(nq, num_threads=n_threads, schedule="static"):
            for m in range(M):
                if ip:
                    cypq_ip_ny(&Q[q, m * Ds], CT + m * Ds * Ks, Ds, Ks, &out[q, m, 0])
                else:
                    cypq_l2sqr_ny(&Q[q, m * Ds], CT + m * Ds * Ks, Ds, Ks, &out[q, m, 0])
    free(CT)
