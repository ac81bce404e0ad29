# A bounded max-heap of (distance, id) pairs kept in caller-owned arrays: the top-k of a few
# candidates (re-ranking; scans over many codes collect theirs in topk.pxd instead).
# The root holds the worst of the k best so far; a candidate enters only if it beats the root.
# Pairs are ordered by distance, then id, so equal distances never make results depend on the
# order entries were scanned in (or stored in). ``where`` (NULL: none) carries a value along
# with each pair (where the entry's stored vector is, for re-ranking).
from libc.math cimport INFINITY
from libc.stdint cimport int64_t, uintptr_t


cdef inline void heap_init(float *dist, int64_t *ids, uintptr_t *where, int k) noexcept nogil:
    cdef int i
    for i in range(k):
        dist[i] = INFINITY
        ids[i] = -1
        if where != NULL:
            where[i] = 0


cdef inline bint heap_worse(float d1, int64_t i1, float d2, int64_t i2) noexcept nogil:
    """(d1, i1) ranks after (d2, i2). Empty slots (inf, -1) rank after every entry."""
    if d1 != d2:
        return d1 > d2
    return (i1 > i2) if (i1 >= 0 and i2 >= 0) else (i1 < 0 and i2 >= 0)


cdef inline void heap_replace_top(float *dist, int64_t *ids, uintptr_t *where, int k, float d,
                                  int64_t idx, uintptr_t w) noexcept nogil:
    """Replace the root by (d, idx) (carrying w) and sift it down."""
    cdef int i = 0, child
    while True:
        child = 2 * i + 1
        if child >= k:
            break
        if child + 1 < k and heap_worse(dist[child + 1], ids[child + 1], dist[child], ids[child]):
            child += 1
        if not heap_worse(dist[child], ids[child], d, idx):
            break
        dist[i] = dist[child]
        ids[i] = ids[child]
        if where != NULL:
            where[i] = where[child]
        i = child
    dist[i] = d
    ids[i] = idx
    if where != NULL:
        where[i] = w


cdef inline void heap_sort_ascending(float *dist, int64_t *ids, uintptr_t *where,
                                     int k) noexcept nogil:
    """Turn the heap into its k entries sorted by increasing distance, in place."""
    cdef int n
    cdef float d
    cdef int64_t idx
    cdef uintptr_t w
    for n in range(k - 1, 0, -1):
        d = dist[0]
        idx = ids[0]
        w = where[0] if where != NULL else 0
        # Move the last entry to the root and sift it down over the first n entries.
        heap_replace_top(dist, ids, where, n, dist[n], ids[n],
                         where[n] if where != NULL else 0)
        dist[n] = d
        ids[n] = idx
        if where != NULL:
            where[n] = w
