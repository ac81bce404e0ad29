# cython: freethreading_compatible = True
"""Exact scores of candidates against their queries, for re-ranking: of vectors at the
addresses where the scan found them (address_scores), or given as rows (row_scores)."""
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, NAN
from libc.stdint cimport int64_t, uintptr_t

from topk cimport TopK, topk_alloc, topk_finish, topk_free, topk_offer, topk_reset

cdef extern from "rerank.h" nogil:
    float cypq_score(const float *q, const void *x, int64_t d, int vtype, int kind,
                     const float *sq)

VTYPES = {"uint8": 0, "float16": 1, "float32": 2, "sq8": 3}   # kept vectors' kind -> vtype


cdef const float *_ranges(const float[::1] sq, int vtype, Py_ssize_t d) except? NULL:
    """sq8's ranges (lo then step, 2 * d floats) for the kernel; NULL for other vtypes."""
    if vtype != 3:
        return NULL
    if sq is None or sq.shape[0] != 2 * d:
        raise ValueError("sq8 scores need the ranges: 2 * d floats (lo, then step)")
    return &sq[0]


def address_scores(const float[:, ::1] X, const int64_t[:, ::1] I,
                   const uintptr_t[:, ::1] W, int vtype, int kind, float[:, ::1] out,
                   int n_threads, const float[::1] sq=None):
    """Exact scores of each query's candidates, their vectors read where the scan found
    them: ``W[q, c]`` the address of candidate ``I[q, c]``'s vector (X's width, ``vtype``),
    0 where it is not addressable. ``out[q, c]``: its score (see rerank.h for ``kind``),
    inf where I[q, c] < 0, NaN where W[q, c] is 0 (read that vector by id).

    The addresses come from the scan of the same snapshot (cypq._search.scan_cells) and
    must still be valid. ``sq``: the ranges of sq8 vectors (vtype 3), else None.
    """
    cdef Py_ssize_t nq = X.shape[0], r = I.shape[1], d = X.shape[1], q, c
    cdef const float *rg = _ranges(sq, vtype, d)
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
                    out[q, c] = cypq_score(&X[q, 0], <const void *> W[q, c], d, vtype, kind,
                                           rg)


def row_scores(const float[:, ::1] X, const unsigned char[:, ::1] rows,
               const int64_t[:, ::1] row, int vtype, int kind, float[:, ::1] out,
               int n_threads, const float[::1] sq=None):
    """out[q, c] = the score of vector ``rows[row[q, c]]`` (bytes of X's width in ``vtype``)
    for query q, where row[q, c] >= 0; entries where row[q, c] < 0 are left as they are."""
    cdef Py_ssize_t nq = X.shape[0], r = row.shape[1], d = X.shape[1], q, c
    cdef int vb = (1 if vtype in (0, 3) else 2 if vtype == 1 else 4) * <int> d
    cdef const float *rg = _ranges(sq, vtype, d)
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
                    out[q, c] = cypq_score(&X[q, 0], &rows[row[q, c], 0], d, vtype, kind, rg)


def cell_rows_topk(const float[:, ::1] Q, const float[:, ::1] X, const int64_t[::1] ids,
                   const int64_t[::1] start, const int64_t[:, ::1] lists,
                   const int64_t[::1] n_listed, int kind, float[:, ::1] D, int64_t[:, ::1] I,
                   int64_t[::1] n_scored, int n_threads):
    """Top k of each query over the rows of the cells it lists, scored exactly.

    X (n, d) float32 rows grouped by cell: cell c's are start[c] : start[c + 1] (start
    (n_cells + 1,) int64), with ids (n,). Query q (Q (nq, d)) lists lists[q, :n_listed[q]].
    Scores as rerank.h's ``kind`` (0 squared L2, 1 minus the inner product); D (nq, k)
    ascending, ties by id, inf / -1 padding; n_scored (nq,) rows scored per query.
    """
    cdef Py_ssize_t nq = Q.shape[0], d = Q.shape[1], q, t, k = D.shape[1]
    cdef int64_t r, c, n_cells = start.shape[0] - 1, scored
    cdef float s
    cdef TopK *top
    cdef int failed = 0
    cdef int *fail = &failed  # shared: Cython makes names assigned in parallel blocks private
    if (X.shape[1] != d or ids.shape[0] != X.shape[0] or lists.shape[0] != nq
            or n_listed.shape[0] != nq or I.shape[0] != nq or I.shape[1] != k
            or D.shape[0] != nq or n_scored.shape[0] != nq or n_cells < 0):
        raise ValueError("cell_rows_topk: shapes do not match")
    if kind not in (0, 1):
        raise ValueError("cell_rows_topk: kind must be 0 (L2) or 1 (inner product)")
    for c in range(n_cells):
        if start[c + 1] < start[c]:
            raise ValueError("cell_rows_topk: start must not decrease")
    if n_cells >= 0 and start[n_cells] > X.shape[0]:
        raise ValueError("cell_rows_topk: start points past X")
    for q in range(nq):
        if n_listed[q] < 0 or n_listed[q] > lists.shape[1]:
            raise ValueError("cell_rows_topk: n_listed out of range")
        for t in range(n_listed[q]):
            if lists[q, t] < 0 or lists[q, t] >= n_cells:
                raise ValueError("cell_rows_topk: a listed cell outside start")
    if k == 0:
        return
    with nogil, parallel(num_threads=max(1, n_threads)):
        top = topk_alloc(k, False)
        for q in prange(nq, schedule="dynamic"):
            if top == NULL:
                fail[0] = 1
                continue
            topk_reset(top)
            scored = 0
            for t in range(n_listed[q]):
                c = lists[q, t]
                for r in range(start[c], start[c + 1]):
                    s = cypq_score(&Q[q, 0], &X[r, 0], d, 2, kind, NULL)
                    topk_offer(top, s, ids[r], 0)
                scored = scored + start[c + 1] - start[c]
            topk_finish(top, &D[q, 0], &I[q, 0], NULL)
            n_scored[q] = scored
        topk_free(top)
    if failed:
        raise MemoryError()
