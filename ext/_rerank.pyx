# cython: freethreading_compatible = True
"""Exact scores of candidates against their queries, for re-ranking: of vectors at the
addresses where the scan found them (address_scores), or given as rows (row_scores)."""
from cython.parallel cimport prange
from libc.math cimport INFINITY, NAN
from libc.stdint cimport int64_t, uintptr_t

cdef extern from "rerank.h" nogil:
    float cypq_score(const float *q, const void *x, int64_t d, int vtype, int kind)

VTYPES = {"uint8": 0, "float16": 1, "float32": 2}   # stored vector dtype -> vtype


def address_scores(const float[:, ::1] X, const int64_t[:, ::1] I,
                   const uintptr_t[:, ::1] W, int vtype, int kind, float[:, ::1] out,
                   int n_threads):
    """Exact scores of each query's candidates, their vectors read where the scan found
    them: ``W[q, c]`` the address of candidate ``I[q, c]``'s vector (X's width, ``vtype``),
    0 where it is not addressable. ``out[q, c]``: its score (see rerank.h for ``kind``),
    inf where I[q, c] < 0, NaN where W[q, c] is 0 (read that vector by id).

    The addresses come from the scan of the same snapshot (cypq._search.scan_cells) and
    must still be valid.
    """
    cdef Py_ssize_t nq = X.shape[0], r = I.shape[1], d = X.shape[1], q, c
    if I.shape[0] != nq or W.shape[0] != nq or W.shape[1] != r or out.shape[0] != nq or \
            out.shape[1] != r:
        raise ValueError("address_scores: shapes do not match")
    with nogil:
        for q in prange(nq, num_threads=max(1, n_threads), schedule="static"):
            for c in range(r):
                if I[q, c] < 0:
                    out[q, c] = INFINITY
                elif W[q, c] == 0:
                    out[q, c] = NAN
                else:
                    out[q, c] = cypq_score(&X[q, 0], <const void *> W[q, c], d, vtype, kind)


def row_scores(const float[:, ::1] X, const unsigned char[:, ::1] rows,
               const int64_t[:, ::1] row, int vtype, int kind, float[:, ::1] out,
               int n_threads):
    """out[q, c] = the score of vector ``rows[row[q, c]]`` (bytes of X's width in ``vtype``)
    for query q, where row[q, c] >= 0; entries where row[q, c] < 0 are left as they are."""
    cdef Py_ssize_t nq = X.shape[0], r = row.shape[1], d = X.shape[1], q, c
    cdef int vb = (1 if vtype == 0 else 2 if vtype == 1 else 4) * <int> d
    if rows.shape[1] != vb or row.shape[0] != nq or out.shape[0] != nq or out.shape[1] != r:
        raise ValueError("row_scores: shapes do not match")
    for q in range(nq):
        for c in range(r):
            if row[q, c] >= rows.shape[0]:
                raise ValueError("row_scores: a row outside rows")
    with nogil:
        for q in prange(nq, num_threads=max(1, n_threads), schedule="static"):
            for c in range(r):
                if row[q, c] >= 0:
                    out[q, c] = cypq_score(&X[q, 0], &rows[row[q, c], 0], d, vtype, kind)
