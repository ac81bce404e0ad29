# A stable sort of uint32 keys carrying int32 values, for the few to few thousand keys of a
# query's cell order and top k.
from libc.stdint cimport int32_t, int64_t, uint32_t
from libc.string cimport memcpy, memset

from simd cimport cypq_sort_places


cdef enum:
    SMALL_SORT = 96     # radix_sort puts up to this many keys in place by counting


cdef inline void radix_sort(uint32_t *key, int32_t *val, int64_t n, uint32_t *tkey,
                            int32_t *tval) noexcept nogil:
    """Sort key[0:n] ascending, carrying val along (val may be NULL), stable: LSD radix sort,
    one pass per byte, skipping bytes all keys share; up to SMALL_SORT keys, each put in its
    place by counting (cypq_sort_places: the histograms cost more there). tkey, tval: scratch
    of n entries. Non-negative floats sort as their bit patterns, so this sorts distances
    too; floats of either sign as their float_key."""
    cdef int32_t hist[4][256]   # (int32: n < 2^31, as the int32 values need anyway; half
                                # the memset of int64 counts, paid by every sort)
    cdef uint32_t sk_small[SMALL_SORT]
    cdef int32_t sv_small[SMALL_SORT]
    cdef int32_t *cnt
    cdef int64_t i
    cdef int32_t pos, c
    cdef int shift, b
    cdef uint32_t *sk = key
    cdef uint32_t *dk = tkey
    cdef int32_t *sv = val
    cdef int32_t *dv = tval
    cdef uint32_t *xk
    cdef int32_t *xv
    cdef uint32_t x
    if n < 2:
        return
    if n <= SMALL_SORT:
        cypq_sort_places(key, <int32_t> n, <int32_t *> tkey)   # tkey holds the places
        for i in range(n):
            sk_small[(<int32_t *> tkey)[i]] = key[i]
            if val != NULL:
                sv_small[(<int32_t *> tkey)[i]] = val[i]
        memcpy(key, sk_small, n * sizeof(uint32_t))
        if val != NULL:
            memcpy(val, sv_small, n * sizeof(int32_t))
        return
    memset(hist, 0, sizeof(hist))
    for i in range(n):   # the four bytes' counts in one pass (a pass permutes, not changes, them)
        x = key[i]
        hist[0][x & 255] += 1
        hist[1][(x >> 8) & 255] += 1
        hist[2][(x >> 16) & 255] += 1
        hist[3][x >> 24] += 1
    for shift in range(0, 32, 8):
        cnt = hist[shift // 8]
        if cnt[(sk[0] >> shift) & 255] == n:     # one value of this byte: nothing to do
            continue
        pos = 0
        for b in range(256):
            c = cnt[b]
            cnt[b] = pos
            pos = pos + c
        for i in range(n):
            b = (sk[i] >> shift) & 255
            dk[cnt[b]] = sk[i]
            if val != NULL:
                dv[cnt[b]] = sv[i]
            cnt[b] += 1
        xk = sk; sk = dk; dk = xk
        xv = sv; sv = dv; dv = xv
    if sk != key:
        memcpy(key, sk, n * sizeof(uint32_t))
        if val != NULL:
            memcpy(val, sv, n * sizeof(int32_t))


cdef inline uint32_t float_key(float d) noexcept nogil:
    """d's bits as an unsigned key in d's order, for radix_sort (-0 as +0, equal to it)."""
    cdef float x = d + <float> 0.0
    cdef uint32_t u
    memcpy(&u, &x, 4)
    return u ^ (<uint32_t> 0xFFFFFFFF if u >> 31 else <uint32_t> 0x80000000)
