# The top-k of a scan, collected in a reservoir: a candidate that ranks before the k-th best
# known so far is appended; when the buffer is full, the k best are moved to its front
# (quickselect) and the threshold becomes the worst of them. A candidate costs an append, and
# a selection over 2k entries is paid once per k appends, where a heap pays a sift-down of
# log2(k) unpredictable branches per candidate (at k = 100 those were a quarter of a 4-bit
# index search's time). Pairs rank by distance, then id (empty (inf, -1) last), so equal
# distances never make results depend on the order entries were scanned (or stored) in.
from libc.math cimport INFINITY
from libc.stdint cimport int32_t, int64_t, uint32_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from radix cimport float_key, radix_sort


cdef extern from "sortnet.h" nogil:
    enum:
        CYPQ_SORTNET_MAX
    int cypq_sortnet_enabled
    int cypq_sortnet_ready() noexcept
    int cypq_sortnet_u32(uint32_t *x, int n) noexcept
    int cypq_sortnet_u32_portable(uint32_t *x, int n) noexcept

cdef enum:
    RANK_ROOM = 512     # topk_finish sorts up to this many entries by radix (keys on the stack)
    FEW_AFTER = 8       # and up to this many after its ordered ones by insertion alone


cdef struct TopK:
    float *d            # 2 cap entries each (the second cap: a partition's scratch): distances,
    int64_t *i          # ids,
    uintptr_t *w        # carried values (NULL: none)
    int64_t n           # entries held
    int64_t k
    int64_t cap
    float td            # the k-th best so far: a candidate must rank before (td, ti)
    int64_t ti
    int64_t ordered     # the first this many entries are in rank order (pushes append after
                        # them; a selection leaves none)


cdef inline TopK *topk_alloc(int64_t k, bint carry) noexcept nogil:
    """An empty top-k of k (k >= 1) with buffers of its own (carrying values if ``carry``);
    NULL if out of memory. Free with topk_free."""
    cdef int64_t cap = 2 * k if k >= 32 else k + 32
    cdef TopK *t = <TopK *> malloc(sizeof(TopK))
    cdef char *mem
    if t == NULL:
        return NULL
    mem = <char *> malloc(2 * cap * (sizeof(int64_t) + sizeof(float)
                                     + (sizeof(uintptr_t) if carry else 0)))
    if mem == NULL:
        free(t)
        return NULL
    t.i = <int64_t *> mem
    t.w = <uintptr_t *> (mem + 2 * cap * sizeof(int64_t)) if carry else NULL
    t.d = <float *> (mem + 2 * cap * (sizeof(int64_t) + (sizeof(uintptr_t) if carry else 0)))
    t.k = k
    t.cap = cap
    topk_reset(t)
    return t


cdef inline void topk_free(TopK *t) noexcept nogil:
    if t != NULL:
        free(t.i)
        free(t)


cdef inline void topk_reset(TopK *t) noexcept nogil:
    """Empty it, for the next query."""
    t.n = 0
    t.td = INFINITY
    t.ti = -1
    t.ordered = 0


cdef inline bint _worse(float d1, int64_t i1, float d2, int64_t i2) noexcept nogil:
    """(d1, i1) ranks after (d2, i2). Empty slots (inf, -1) rank after every entry."""
    if d1 != d2:
        return d1 > d2
    return (i1 > i2) if (i1 >= 0 and i2 >= 0) else (i1 < 0 and i2 >= 0)


cdef inline bint _before(float d1, int64_t i1, float d2, int64_t i2) noexcept nogil:
    """(d1, i1) ranks before (d2, i2), for the entries held (ids >= 0): no branches, so the
    partitions below cost the same whatever the data."""
    return (d1 < d2) | ((d1 == d2) & (i1 < i2))


cdef inline void _swap(TopK *t, int64_t a, int64_t b) noexcept nogil:
    cdef float d = t.d[a]
    cdef int64_t i = t.i[a]
    cdef uintptr_t w
    t.d[a] = t.d[b]
    t.i[a] = t.i[b]
    t.d[b] = d
    t.i[b] = i
    if t.w != NULL:
        w = t.w[a]
        t.w[a] = t.w[b]
        t.w[b] = w


cdef inline int64_t _partition(TopK *t, int64_t lo, int64_t hi) noexcept nogil:
    """Partition [lo, hi) (hi - lo >= 2) around the median of its first, middle and last
    entries: returns p, with that entry at p, those ranking before it in [lo, p) and the
    others in (p, hi). Without branches or a chain through memory: every entry is written
    both to the front (in place: that position was read already) and to the scratch, and
    the comparison advances one of the two ends; the scratch's entries follow the pivot."""
    cdef int64_t m = lo + (hi - lo) // 2, j, nl = lo, nh = 0, last = hi - 1
    cdef float pd, x
    cdef int64_t pi, xi
    cdef uintptr_t pw = 0, xw = 0
    cdef bint c
    cdef float *sd = t.d + t.cap
    cdef int64_t *si = t.i + t.cap
    cdef uintptr_t *sw = t.w + t.cap if t.w != NULL else NULL
    # median of three to the end
    if _before(t.d[m], t.i[m], t.d[lo], t.i[lo]):
        _swap(t, m, lo)
    if _before(t.d[last], t.i[last], t.d[lo], t.i[lo]):
        _swap(t, last, lo)
    if _before(t.d[m], t.i[m], t.d[last], t.i[last]):
        _swap(t, m, last)
    pd = t.d[last]
    pi = t.i[last]
    if t.w != NULL:
        pw = t.w[last]
    for j in range(lo, last):
        x = t.d[j]
        xi = t.i[j]
        c = _before(x, xi, pd, pi)
        t.d[nl] = x
        t.i[nl] = xi
        sd[nh] = x
        si[nh] = xi
        if sw != NULL:
            xw = t.w[j]
            t.w[nl] = xw
            sw[nh] = xw
        nl += c
        nh += 1 - c
    t.d[nl] = pd
    t.i[nl] = pi
    if t.w != NULL:
        t.w[nl] = pw
    for j in range(nh):
        t.d[nl + 1 + j] = sd[j]
        t.i[nl + 1 + j] = si[j]
        if sw != NULL:
            t.w[nl + 1 + j] = sw[j]
    return nl


cdef inline void _select(TopK *t, int64_t k) noexcept nogil:
    """Move the k best of the n entries (n > k >= 1) to [0, k), the k-th best at k - 1."""
    cdef int64_t lo = 0, hi = t.n, p
    t.ordered = 0
    while hi - lo > 1:
        p = _partition(t, lo, hi)
        if p == k - 1:
            return
        if p > k - 1:
            hi = p
        else:
            lo = p + 1


cdef inline void _worst_to_threshold(TopK *t) noexcept nogil:
    """(td, ti) = the last-ranking of the n entries."""
    cdef int64_t j
    t.td = t.d[0]
    t.ti = t.i[0]
    for j in range(1, t.n):
        if _before(t.td, t.ti, t.d[j], t.i[j]):
            t.td = t.d[j]
            t.ti = t.i[j]


cdef inline bint topk_takes(const TopK *t, float d, int64_t idx) noexcept nogil:
    """(d, idx) ranks before the k-th best so far (a caller may first test d <= t.td)."""
    return _worse(t.td, t.ti, d, idx)


cdef inline void topk_tighten(TopK *t) noexcept nogil:
    """Keep only the k best of the entries held, the threshold the worst of them (when the
    buffer is full, or for a scan going on after many entries at once)."""
    if t.n > t.k:
        _select(t, t.k)
        t.n = t.k
        t.td = t.d[t.k - 1]
        t.ti = t.i[t.k - 1]


cdef inline void topk_push(TopK *t, float d, int64_t idx, uintptr_t w) noexcept nogil:
    """Append (d, idx) carrying w; the caller checked topk_takes."""
    t.d[t.n] = d
    t.i[t.n] = idx
    if t.w != NULL:
        t.w[t.n] = w
    t.n += 1
    if t.n == t.k:              # the first k: the threshold is the worst of them
        _worst_to_threshold(t)
    elif t.n == t.cap:          # full: keep the k best
        topk_tighten(t)


cdef inline void topk_offer(TopK *t, float d, int64_t idx, uintptr_t w) noexcept nogil:
    """Append (d, idx) carrying w if it ranks before the k-th best (the id only decides ties)."""
    if d < t.td or topk_takes(t, d, idx):
        topk_push(t, d, idx, w)


cdef inline void _insertion_sort(TopK *t, int64_t lo, int64_t hi) noexcept nogil:
    """Sort [lo, hi) in rank order by insertion: for short runs, and for entries already
    nearly in order (each moves as far as it is out of place)."""
    cdef int64_t a, b
    cdef float d
    cdef int64_t idx
    cdef uintptr_t w
    for a in range(lo + 1, hi):
        d = t.d[a]
        idx = t.i[a]
        w = t.w[a] if t.w != NULL else 0
        b = a
        while b > lo and _before(d, idx, t.d[b - 1], t.i[b - 1]):
            t.d[b] = t.d[b - 1]
            t.i[b] = t.i[b - 1]
            if t.w != NULL:
                t.w[b] = t.w[b - 1]
            b -= 1
        t.d[b] = d
        t.i[b] = idx
        if t.w != NULL:
            t.w[b] = w


cdef inline void _sort(TopK *t, int64_t lo, int64_t hi) noexcept nogil:
    """Sort [lo, hi) in rank order: quicksort down to runs of 16, then insertion sort."""
    cdef int64_t stack[128]
    cdef int64_t top, p, a, b
    stack[0] = lo
    stack[1] = hi
    top = 2
    while top > 0:
        top -= 2
        a = stack[top]
        b = stack[top + 1]
        while b - a > 16:
            p = _partition(t, a, b)
            # the smaller side waits on the stack (depth <= log2 n); the larger goes on
            if p - a < b - p - 1:
                stack[top] = a
                stack[top + 1] = p
                a = p + 1
            else:
                stack[top] = p + 1
                stack[top + 1] = b
                b = p
            top += 2
    _insertion_sort(t, lo, hi)


cdef inline void _sort_held(TopK *t) noexcept nogil:
    """Sort the n entries held in rank order: by their distances' top bits above the smallest
    (the keys' span scaled to 23 bits, each with its entry's place below them: distinct keys,
    sorted in AVX-512 registers by sortnet.h's network, up to CYPQ_SORTNET_MAX entries; else
    16 bits by a stable radix sort), then by insertion (each entry moves only within its run of
    equal keys: distances within a 2^23rd (2^16th) of the span of each other, and equal
    distances by id). The insertion pass alone would sort any order, so the keys decide only
    the time, never the result. The radix sort's two counting passes, each with a prefix over
    256 buckets, were 13% of a short 4-bit search where the network of ~128 keys is ~900
    instructions; the quicksort's insertion runs of 16 mispredicted a branch per move, and its
    partitions copy every entry per level. Beyond RANK_ROOM entries, _sort."""
    cdef uint32_t key[RANK_ROOM]
    cdef uint32_t tkey[RANK_ROOM]
    cdef int32_t val[RANK_ROOM]
    cdef int32_t tval[RANK_ROOM]
    cdef int64_t n = t.n, j
    cdef float *sd = t.d + t.cap
    cdef int64_t *si = t.i + t.cap
    cdef uintptr_t *sw = t.w + t.cap if t.w != NULL else NULL
    cdef uint32_t lo = 0xFFFFFFFF, hi = 0
    cdef int shift = 0
    cdef bint ties
    t.ordered = n
    if n > RANK_ROOM:
        _sort(t, 0, n)
        return
    for j in range(n):
        key[j] = float_key(t.d[j])
        lo = key[j] if key[j] < lo else lo
        hi = key[j] if key[j] > hi else hi
    if n <= CYPQ_SORTNET_MAX and cypq_sortnet_ready():   # (8 bits of place: n <= 256)
        while ((hi - lo) >> shift) > 0x7FFFFF:
            shift += 1
        for j in range(n):
            tkey[j] = (((key[j] - lo) >> shift) << 8) | <uint32_t> j
        cypq_sortnet_u32(tkey, <int> n)
        ties = False
        for j in range(n):
            val[j] = <int32_t> (tkey[j] & 0xFF)
            ties = ties | (j > 0 and (tkey[j] >> 8) == (tkey[j - 1] >> 8))
    else:
        ties = True
        while ((hi - lo) >> shift) > 0xFFFF:
            shift += 1
        for j in range(n):
            key[j] = (key[j] - lo) >> shift
            val[j] = <int32_t> j
        radix_sort(key, val, n, tkey, tval)
    memcpy(sd, t.d, n * sizeof(float))     # the scratch halves hold cap >= n entries
    memcpy(si, t.i, n * sizeof(int64_t))
    for j in range(n):
        t.d[j] = sd[val[j]]
        t.i[j] = si[val[j]]
    if sw != NULL:
        memcpy(sw, t.w, n * sizeof(uintptr_t))
        for j in range(n):
            t.w[j] = sw[val[j]]
    if ties:   # (keys all distinct: already in distance order, and no distances equal)
        _insertion_sort(t, 0, n)


cdef inline void topk_settle(TopK *t) noexcept nogil:
    """topk_tighten, sorting (up to RANK_ROOM entries held) where it selects: for a scan that
    expects few more entries, so that its finish need not sort the k best again (a two-phase
    scan's first sweep takes ~1.2 k entries and its second few or none: the selection and
    then the finish's sort of the same entries were a sixth of a one-cell search)."""
    if t.n <= t.k or t.n > RANK_ROOM:
        topk_tighten(t)
        return
    _sort_held(t)
    t.n = t.k
    t.ordered = t.k
    t.td = t.d[t.k - 1]
    t.ti = t.i[t.k - 1]


cdef inline void topk_finish(TopK *t, float *dist, int64_t *ids, uintptr_t *where) noexcept nogil:
    """Write the k best, ascending, to dist / ids (/ where, if not NULL), padded with
    (inf, -1, 0) where fewer than k were pushed."""
    cdef int64_t j
    if t.n - t.ordered <= FEW_AFTER:   # (sorted by topk_settle, a few pushed after)
        _insertion_sort(t, 0, t.n)
    else:
        if t.n > RANK_ROOM:   # (up to it, one sort of all held: no selection first, ~2% of
            topk_tighten(t)   # a short search; the first k of the sorted entries are the k best)
        _sort_held(t)
    if t.n > t.k:
        t.n = t.k
    for j in range(t.k):
        if j < t.n:
            dist[j] = t.d[j]
            ids[j] = t.i[j]
        else:
            dist[j] = INFINITY
            ids[j] = -1
        if where != NULL:
            where[j] = t.w[j] if (j < t.n and t.w != NULL) else 0
