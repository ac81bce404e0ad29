# ADC scan of a run of codes into a top-k (topk.pxd): shared by exhaustive PQ search and the
# index's per-cell scans, so both rank candidates by the same arithmetic.
from libc.math cimport INFINITY
from libc.string cimport memcpy
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t

from topk cimport TopK, topk_offer
from fastscan cimport cypq_adc4_cell, cypq_adc4_cells
from simd cimport cypq_adc_u8, cypq_adc_u16, cypq_adc_u32, cypq_prefetch_line
from types cimport code_t

# Codes are scored in blocks of this many, so the distance buffer stays in L1.
cdef enum:
    SCAN_BLOCK = 1024
    PEND_CAP = 64       # Pending: entries held at most,
    PEND_FLUSH = 16     # and from how many scan_cells pushes them (after a cell)


cdef struct Pending:
    # Candidates whose ids are on their way: a code that beats the threshold needs its id to
    # enter the top k, and the ids of a cell's codes, read only for those few, were a demand
    # miss each (or, prefetched whole, a third of the lines a scan fetched). Their id's line
    # is prefetched and they enter a few cells later (pending_flush), checked against the
    # threshold then: the top k is the same in any order of entry.
    float d[PEND_CAP]
    const char *idp[PEND_CAP]
    uintptr_t w[PEND_CAP]
    int n


cdef inline void pending_flush(Pending *p, TopK *top) noexcept nogil:
    """Push the pending candidates that still rank before the k-th best; empty p."""
    cdef int j
    cdef float d
    cdef int64_t idv
    for j in range(p.n):
        d = p.d[j]
        if d <= top.td:
            memcpy(&idv, p.idp[j], 8)
            topk_offer(top, d, idv, p.w[j])
    p.n = 0


cdef inline int64_t load_id(const int64_t *ids, int64_t i) noexcept nogil:
    """ids[i] without assuming alignment (LMDB values are only 2-byte aligned)."""
    cdef int64_t v
    memcpy(&v, <const char *> ids + i * 8, 8)
    return v


cdef struct Filter:
    # Which entries a filtered scan keeps: tags with any of ``any`` (0: no condition), all
    # of ``all``, none of ``none``; and, with id_mode 1 (-1), ids in (not in) the sorted
    # ids[0 : n_ids] (id_mode 0: no condition).
    uint64_t any
    uint64_t all
    uint64_t none
    const int64_t *ids
    int64_t n_ids
    int id_mode


cdef inline bint in_sorted(const int64_t *s, int64_t n, int64_t x) noexcept nogil:
    """x is in the ascending s[0:n] (binary search)."""
    cdef int64_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if s[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo < n and s[lo] == x


cdef inline int64_t pass_flags(const Filter *f, const char *tags, const int64_t *ids,
                               int64_t id_offset, int64_t n, uint8_t *flags) noexcept nogil:
    """flags[i] = entry i passes f (tags: n uint64, NULL reads as all zero; ids as in
    scan_topk); returns how many pass."""
    cdef int64_t i, cnt = 0
    cdef uint64_t t = 0
    cdef bint ok
    for i in range(n):
        if tags != NULL:
            memcpy(&t, tags + i * 8, 8)   # unaligned in LMDB values
        ok = ((f.any == 0 or (t & f.any) != 0) and (t & f.all) == f.all
              and (t & f.none) == 0)
        if ok and f.id_mode != 0:
            ok = in_sorted(f.ids, f.n_ids,
                           load_id(ids, i) if ids != NULL else id_offset + i) == (f.id_mode > 0)
        flags[i] = ok
        cnt += ok
    return cnt


cdef inline int64_t adc_block(const float *T0, const float *T1, int M, int Ks, bint packed,
                              const cypq_adc4_cell *cell, const code_t *codes, int64_t n,
                              float thresh, float *out, int32_t *idx) noexcept nogil:
    """Distances below thresh of n codes (at most SCAN_BLOCK) -> out / idx; returns how many.
    Tables: T0 (M/2, Ks) for the first M/2 subspaces, T1 for the rest (see simd.h).
    ``packed``: uint8 codes of M/2 bytes, two 4-bit codes per byte (Ks = 16, M % 4 == 0),
    with ``cell`` the uint8 tables of their bounds or NULL (fastscan.h)."""
    if code_t is uint8_t:
        if packed:
            return cypq_adc4_cells(T0, T1, M // 2, cell, codes, n, thresh, out, idx)
        return cypq_adc_u8(T0, T1, M, Ks, codes, n, thresh, out, idx)
    elif code_t is uint16_t:
        return cypq_adc_u16(T0, T1, M, Ks, codes, n, thresh, out, idx)
    else:
        return cypq_adc_u32(T0, T1, M, Ks, codes, n, thresh, out, idx)


cdef inline int64_t scan_topk(const float *T0, const float *T1, int M, int Ks, bint packed,
                              const cypq_adc4_cell *cell, const code_t *codes, int64_t n,
                              const int64_t *ids, int64_t id_offset, TopK *top,
                              uintptr_t vecs, int64_t vec_bytes, float *buf,
                              int32_t *ibuf, const Filter *filt, const char *tags,
                              uint8_t *flags, Pending *pend=NULL) noexcept nogil:
    """Push the n codes into the top-k ``top``; tables T0, T1 as adc_block.
    Returns how many of them pass ``filt`` (n when filt is NULL).

    A code's id is ids[i] when ids is not NULL, else id_offset + i. Where top carries values,
    each entry carries where its vector is: vecs + i * vec_bytes (0 when vecs is 0). buf and
    ibuf (and flags, with a filter) hold SCAN_BLOCK entries each. Only codes at most the
    top-k's threshold at the start of a block come back from the SIMD loop; they are
    checked again, (distance, id), against the threshold as it tightens. With ``filt``, only
    entries that pass it (pass_flags; ``tags`` their n uint64 tag sets or NULL) enter, and
    a block none of whose entries pass is not scored at all. With ``pend`` (and ids), the
    candidates wait there for their ids (see Pending); the caller flushes it.
    """
    cdef int64_t b0 = 0, j, nb, cnt, i, passed = 0, ok
    cdef int64_t stride = M // 2 if packed else M     # code values per code
    cdef float d
    while b0 < n:
        nb = n - b0
        if nb > SCAN_BLOCK:
            nb = SCAN_BLOCK
        if filt != NULL:
            ok = pass_flags(filt, tags + b0 * 8 if tags != NULL else NULL,
                            ids + b0 if ids != NULL else NULL, id_offset + b0, nb, flags)
            passed += ok
            if ok == 0:
                b0 += nb
                continue
        cnt = adc_block(T0, T1, M, Ks, packed, cell, codes + b0 * stride, nb, top.td, buf,
                        ibuf)
        for j in range(cnt):
            d = buf[j]
            if d <= top.td and (filt == NULL or flags[ibuf[j]]):
                i = b0 + ibuf[j]
                offer_code(top, pend, d, ids, id_offset, i,
                           vecs + <uintptr_t> (i * vec_bytes) if vecs else 0)
        b0 += nb
    return n if filt == NULL else passed


cdef inline void offer_code(TopK *top, Pending *pend, float d, const int64_t *ids,
                            int64_t id_offset, int64_t i, uintptr_t wv) noexcept nogil:
    """Code i (distance d, at most top's threshold; carrying wv) into the top k, as
    scan_topk says: through pend (when given, with ids) or at once."""
    if pend != NULL and ids != NULL:
        if pend.n == PEND_CAP:
            pending_flush(pend, top)
            if d > top.td:
                return
        pend.idp[pend.n] = <const char *> ids + i * 8
        cypq_prefetch_line(pend.idp[pend.n])
        pend.d[pend.n] = d
        pend.w[pend.n] = wv
        pend.n += 1
        return
    topk_offer(top, d, load_id(ids, i) if ids != NULL else id_offset + i, wv)
