# cython: freethreading_compatible = True
"""Exact scores of candidates against their queries, for re-ranking: of vectors found where
the scan found the candidates' codes (locate_scores), or of vectors given as rows (row_scores)."""
from cython.parallel cimport prange
from libc.math cimport INFINITY, NAN
from libc.stdint cimport int32_t, int64_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc

cdef extern from "rerank.h" nogil:
    float cypq_score(const float *q, const void *x, int64_t d, int vtype, int kind)

VTYPES = {"uint8": 0, "float16": 1, "float32": 2}   # stored vector dtype -> vtype


cdef inline int hash_bits(Py_ssize_t r) noexcept nogil:
    cdef int b = 4
    while (<Py_ssize_t> 1 << b) < 2 * r:
        b += 1
    return b


cdef inline uint64_t slot_of(int64_t i, int bits) noexcept nogil:
    return (<uint64_t> i * 0x9E3779B97F4A7C15ULL) >> (64 - bits)


def locate_scores(const float[:, ::1] X, const int64_t[:, ::1] I,
                  const int64_t[::1] cell_start, const int64_t[::1] slot,
                  const int64_t[::1] seg_start, const uintptr_t[::1] seg_ids,
                  const uintptr_t[::1] seg_vecs, const int64_t[::1] seg_len,
                  int vtype, int kind, float[:, ::1] out, int n_threads):
    """Exact scores of each query's candidates, their vectors read where the scan found them.

    Query q's candidates ``I[q]`` (ids, -1 for none) are looked for among the entries of
    the cells it visited (``slot[cell_start[q]:cell_start[q + 1]]``: indices into the
    segment table ``seg_start`` (n_slots + 1,); segment s: ``seg_len[s]`` entries, ids at
    ``seg_ids[s]``, vectors of X's width and ``vtype`` at ``seg_vecs[s]``, 0 where they are
    not addressable). ``out[q, c]``: the score of candidate c (see rerank.h for ``kind``),
    inf where I[q, c] < 0, NaN where its vector is not addressable (read it by id).
    """
    cdef Py_ssize_t nq = X.shape[0], r = I.shape[1], d = X.shape[1]
    cdef Py_ssize_t q, c, j, s, p, nslots = seg_start.shape[0] - 1
    cdef int bits, vb = (1 if vtype == 0 else 2 if vtype == 1 else 4) * <int> d
    cdef uint64_t h, mask
    cdef int64_t *keys
    cdef int32_t *cand
    cdef const int64_t *ids
    cdef int64_t i, left
    if I.shape[0] != nq or out.shape[0] != nq or out.shape[1] != r or \
            cell_start.shape[0] != nq + 1 or seg_vecs.shape[0] != seg_ids.shape[0] or \
            seg_len.shape[0] != seg_ids.shape[0]:
        raise ValueError("locate_scores: shapes do not match")
    for j in range(slot.shape[0]):
        if slot[j] < 0 or slot[j] >= nslots:
            raise ValueError("locate_scores: a slot outside the segment table")
    bits = hash_bits(r)
    mask = (<uint64_t> 1 << bits) - 1
    with nogil:
        for q in prange(nq, num_threads=max(1, n_threads), schedule="dynamic"):
            keys = <int64_t *> malloc(sizeof(int64_t) * (mask + 1))
            cand = <int32_t *> malloc(sizeof(int32_t) * (mask + 1))
            if keys == NULL or cand == NULL:   # no memory: every vector read by id
                for c in range(r):
                    out[q, c] = NAN if I[q, c] >= 0 else INFINITY
            else:
                for h in range(mask + 1):
                    keys[h] = -1
                left = 0
                for c in range(r):
                    i = I[q, c]
                    if i < 0:
                        out[q, c] = INFINITY
                        continue
                    out[q, c] = NAN
                    left = left + 1
                    h = slot_of(i, bits)
                    while keys[h] >= 0:
                        h = (h + 1) & mask
                    keys[h], cand[h] = i, <int32_t> c
                for j in range(cell_start[q], cell_start[q + 1]):
                    if left == 0:
                        break
                    for s in range(seg_start[slot[j]], seg_start[slot[j] + 1]):
                        ids = <const int64_t *> seg_ids[s]
                        for p in range(seg_len[s]):
                            h = slot_of(ids[p], bits)
                            while keys[h] >= 0 and keys[h] != ids[p]:
                                h = (h + 1) & mask
                            if keys[h] < 0:
                                continue
                            left = left - 1
                            if seg_vecs[s] != 0:
                                out[q, cand[h]] = cypq_score(
                                    &X[q, 0], <const void *> (seg_vecs[s] + <uintptr_t> (p * vb)),
                                    d, vtype, kind)
            free(keys)
            free(cand)


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
