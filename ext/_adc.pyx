# cython: freethreading_compatible = True
"""Kernels: asymmetric distances (ADC) of PQ codes, and exhaustive top-k search over them."""
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport free, malloc

from topk cimport TopK, topk_alloc, topk_finish, topk_free, topk_reset
from scan cimport SCAN_BLOCK, adc_block, scan_topk
from types cimport code_t


def adc(const float[:, ::1] T, const code_t[:, ::1] codes, float[::1] out, int n_threads):
    """out[i] = sum_m T[m, codes[i, m]].

    T (M, Ks) float32 table of one query; codes (n, M), each < Ks (checked by the caller);
    out (n,) float32 output.
    """
    cdef Py_ssize_t n = codes.shape[0], ch, n_chunks = (n + SCAN_BLOCK - 1) // SCAN_BLOCK, i0
    cdef int M = T.shape[0], Ks = T.shape[1]
    cdef int failed = 0
    cdef int *fail = &failed  # shared: Cython makes names assigned in parallel blocks private
    cdef int32_t *ibuf
    if codes.shape[1] != M or out.shape[0] != n:
        raise ValueError("adc: inconsistent shapes")
    if n == 0:
        return
    with nogil, parallel(num_threads=n_threads):
        ibuf = <int32_t *> malloc(SCAN_BLOCK * sizeof(int32_t))  # row numbers, unused here
        for ch in prange(n_chunks, schedule="static"):
            if ibuf == NULL:
                fail[0] = 1
                continue
            i0 = ch * SCAN_BLOCK
            adc_block(&T[0, 0], &T[M // 2, 0], M, Ks, False, NULL, &codes[i0, 0],
                      n - i0 if n - i0 < SCAN_BLOCK else SCAN_BLOCK, INFINITY, &out[i0], ibuf)
        free(ibuf)
    if failed:
        raise MemoryError()


def adc_topk(const float[:, :, ::1] tables, const code_t[:, ::1] codes, float[:, ::1] D,
             int64_t[:, ::1] I, int n_threads):
    """The k smallest asymmetric distances of every query over all codes, ascending.

    tables (nq, M, Ks) float32; codes (n, M), each < Ks (checked by the caller);
    D (nq, k) float32 and I (nq, k) int64 outputs (row numbers into codes; inf / -1 where n < k).
    Queries run in parallel; the (nq, n) distance matrix is never formed.
    """
    cdef Py_ssize_t nq = tables.shape[0], n = codes.shape[0], q
    cdef int M = tables.shape[1], Ks = tables.shape[2], k = D.shape[1]
    cdef int failed = 0
    cdef int *fail = &failed  # shared: Cython makes names assigned in parallel blocks private
    cdef float *buf
    cdef int32_t *ibuf
    cdef TopK *top
    if codes.shape[1] != M or D.shape[0] != nq or I.shape[0] != nq or I.shape[1] != k:
        raise ValueError("adc_topk: inconsistent shapes")
    if nq == 0 or k == 0:
        return
    with nogil, parallel(num_threads=n_threads):
        buf = <float *> malloc(SCAN_BLOCK * sizeof(float))
        ibuf = <int32_t *> malloc(SCAN_BLOCK * sizeof(int32_t))
        top = topk_alloc(k, False)
        for q in prange(nq, schedule="dynamic"):
            if buf == NULL or ibuf == NULL or top == NULL:
                fail[0] = 1
                continue
            topk_reset(top)
            if n > 0:
                scan_topk(&tables[q, 0, 0], &tables[q, M // 2, 0], M, Ks, False, NULL,
                          &codes[0, 0], n, NULL, 0, top, 0, 0, buf, ibuf, NULL, NULL, NULL)
            topk_finish(top, &D[q, 0], &I[q, 0], NULL)
        free(buf)
        free(ibuf)
        topk_free(top)
    if failed:
        raise MemoryError()
