# Nearest codeword of a list of rows in one subspace: the one search shared by
# encoding and by the k-means assignment step. Codewords are ranked by ||c||^2 - 2 <x, c>;
# from BLAS_MIN_DIM dims on the dot products come from sgemm, below it from a SIMD loop that
# takes four rows per pass over the codebook.
# sgemm is scipy's (scipy.linalg.cython_blas), looked up when an encode first needs it rather
# than cimported: a cimport loads scipy.linalg (16 MB of a process's memory) when the module is
# imported, and a searching process, which never encodes at that width, would pay for it.
from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer
from libc.stdint cimport int32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from simd cimport cypq_argmin_shifted, cypq_nearest_x4

cdef enum:
    ROW_CHUNK = 256      # rows per work unit; also the most rows one call takes
    BLAS_MIN_DIM = 32


ctypedef void (*sgemm_t)(char *transa, char *transb, int *m, int *n, int *k, float *alpha,
                        float *a, int *lda, float *b, int *ldb, float *beta, float *c,
                        int *ldc) noexcept nogil


cdef inline sgemm_t scipy_sgemm() except NULL:
    """scipy's BLAS sgemm (imports scipy.linalg on the first call)."""
    from scipy.linalg import cython_blas
    capsule = cython_blas.__pyx_capi__["sgemm"]
    return <sgemm_t> PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule))


cdef struct Codebooks:
    int M, Ks, Ds
    sgemm_t sgemm        # the caller's, when Ds >= BLAS_MIN_DIM (scipy_sgemm)
    const float *C       # (M, Ks, Ds), the caller's array
    float *CTm2          # (M, Ds, Ks): -2 * C transposed (SIMD path)
    float *cnorm         # (M, Ks): squared norms


cdef struct Scratch:     # per thread
    float *G             # (ROW_CHUNK, Ks) dot products (sgemm path)
    float *Xg            # (ROW_CHUNK, Ds) gathered rows (sgemm path)


cdef inline int codebooks_init(Codebooks *cb, const float *C, int M, int Ks, int Ds,
                               bint transposed) noexcept nogil:
    """Precompute for C (M, Ks, Ds): the squared norms, and CTm2 if transposed (the SIMD
    path here; the LOPQ search's tables); -1 when out of memory (then codebooks_free is
    safe)."""
    cdef Py_ssize_t m, k, j
    cdef float s
    cb.M, cb.Ks, cb.Ds, cb.C, cb.sgemm = M, Ks, Ds, C, NULL
    cb.CTm2 = NULL
    cb.cnorm = <float *> malloc(<Py_ssize_t> M * Ks * sizeof(float))
    if cb.cnorm == NULL:
        return -1
    if transposed:
        cb.CTm2 = <float *> malloc(<Py_ssize_t> M * Ks * Ds * sizeof(float))
        if cb.CTm2 == NULL:
            return -1
    for m in range(M):
        for k in range(Ks):
            s = 0
            for j in range(Ds):
                s = s + C[(m * Ks + k) * Ds + j] * C[(m * Ks + k) * Ds + j]
                if cb.CTm2 != NULL:
                    cb.CTm2[(m * Ds + j) * Ks + k] = -2 * C[(m * Ks + k) * Ds + j]
            cb.cnorm[m * Ks + k] = s
    return 0


cdef inline void codebooks_free(Codebooks *cb) noexcept nogil:
    free(cb.CTm2)
    free(cb.cnorm)
    cb.CTm2 = NULL
    cb.cnorm = NULL


cdef inline int scratch_init(Scratch *s, const Codebooks *cb) noexcept nogil:
    """Per-thread buffers; -1 when out of memory (then scratch_free is safe). Allocate the
    Scratch itself inside the parallel block: a struct declared outside it is shared."""
    s.G = NULL
    s.Xg = NULL
    if cb.Ds < BLAS_MIN_DIM:
        return 0
    s.G = <float *> malloc(<Py_ssize_t> ROW_CHUNK * cb.Ks * sizeof(float))
    s.Xg = <float *> malloc(<Py_ssize_t> ROW_CHUNK * cb.Ds * sizeof(float))
    return -1 if s.G == NULL or s.Xg == NULL else 0


cdef inline void scratch_free(Scratch *s) noexcept nogil:
    free(s.G)
    free(s.Xg)


cdef inline float sqnorm(const float *x, int d) noexcept nogil:
    cdef float s = 0
    cdef int j
    for j in range(d):
        s = s + x[j] * x[j]
    return s


cdef inline void nearest_rows(const Codebooks *cb, int m, const float *X, Py_ssize_t ldx,
                              const Py_ssize_t *rows, int cnt, int32_t *idx, float *d1,
                              Scratch *s) noexcept nogil:
    """Nearest codeword of subspace m for rows X[rows[j], m*Ds : (m+1)*Ds], j < cnt <= ROW_CHUNK.

    ldx is X's row stride in floats. idx[j] gets the codeword, d1[j] its squared distance.
    """
    cdef int Ds = cb.Ds, Ks = cb.Ks, j, p
    cdef Py_ssize_t r[4]
    cdef int32_t i4[4]
    cdef float b4[4]
    cdef float alpha = -2.0, beta = 0.0, xn, b
    cdef char transa = b'T', transb = b'N'
    if cnt <= 0:
        return
    if Ds < BLAS_MIN_DIM:
        for j in range(0, cnt, 4):
            for p in range(4):  # a last partial quad repeats its final row
                r[p] = rows[j + p] if j + p < cnt else rows[cnt - 1]
            cypq_nearest_x4(X + r[0] * ldx + m * Ds, X + r[1] * ldx + m * Ds,
                            X + r[2] * ldx + m * Ds, X + r[3] * ldx + m * Ds,
                            cb.CTm2 + m * Ds * Ks, cb.cnorm + m * Ks, Ds, Ks, i4, b4)
            for p in range(4):
                if j + p < cnt:
                    xn = sqnorm(X + r[p] * ldx + m * Ds, Ds)
                    idx[j + p] = i4[p]
                    d1[j + p] = b4[p] + xn if b4[p] + xn > 0 else 0
        return
    # sgemm path: gather the rows, then G (cnt x Ks) = -2 Xg C[m]^T (column-major: G^T).
    for j in range(cnt):
        memcpy(s.Xg + j * Ds, X + rows[j] * ldx + m * Ds, Ds * sizeof(float))
    cb.sgemm(&transa, &transb, &Ks, &cnt, &Ds, &alpha, <float *> (cb.C + m * Ks * Ds), &Ds,
             s.Xg, &Ds, &beta, s.G, &Ks)
    for j in range(cnt):
        xn = sqnorm(s.Xg + j * Ds, Ds)
        idx[j] = cypq_argmin_shifted(s.G + j * Ks, cb.cnorm + m * Ks, Ks, &b)
        d1[j] = b + xn if b + xn > 0 else 0
