# cython: freethreading_compatible = True
"""Kernels of LOPQ search over an inverted multi-index.

Phase A, ``cell_order``: per query, the coarse distances of both halves and the cells
(c0, c1) in multi-sequence order (Babenko & Lempitsky, CVPR 2012), up to a candidate quota.
Phase B (Python): the code segments of those cells (the storage), and each query half
projected into the local frame of every centroid the query visits (cypq._lopq.project, a
batch of queries grouped by centroid, so each rotation is read once per batch).
Phase C, ``scan_cells``: per query, the ADC tables of all its centroids, then ADC over the
cells' codes into a top-k heap. Phases A and C run queries in parallel with the GIL released.
"""
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uintptr_t
from libc.stdlib cimport free, malloc

from heap cimport heap_init, heap_sort_ascending
from scan cimport SCAN_BLOCK, scan_topk
from simd cimport cypq_l2sqr_ny, cypq_l2sqr_ny_norm, cypq_l2sqr_ny_norm_x4


cdef extern from *:
    """
    #define cypq_prefetch(p) __builtin_prefetch(p)
    """
    void cypq_prefetch(const void *p) noexcept nogil


cdef void _sort_i64(int64_t *a, int64_t n) noexcept nogil:
    """Sort a[0:n] ascending: quicksort (middle pivot) down to runs of 16, then insertion
    sort; inlined comparisons, where qsort's callback per comparison cost ~5% of a search."""
    cdef int64_t lo = 0, hi, i, j, p, t
    cdef int64_t stack[128]
    cdef int top = 0
    hi = n - 1
    while True:
        while hi - lo >= 16:
            p = a[lo + (hi - lo) // 2]
            i = lo
            j = hi
            while i <= j:
                while a[i] < p:
                    i = i + 1
                while a[j] > p:
                    j = j - 1
                if i <= j:
                    t = a[i]; a[i] = a[j]; a[j] = t
                    i = i + 1
                    j = j - 1
            # Recurse into (push) the larger part, loop on the smaller: the stack stays
            # within 2 * log2(n) entries.
            if j - lo > hi - i:
                stack[top] = lo; stack[top + 1] = j
                lo = i
            else:
                stack[top] = i; stack[top + 1] = hi
                hi = j
            top = top + 2
        if top == 0:
            break
        top = top - 2
        lo = stack[top]
        hi = stack[top + 1]
    for i in range(1, n):
        t = a[i]
        j = i - 1
        while j >= 0 and a[j] > t:
            a[j + 1] = a[j]
            j = j - 1
        a[j + 1] = t


cdef struct Entry:        # multi-sequence frontier: cell (i, j) of the sorted lists
    float d
    int i, j


cdef inline void _push(Entry *h, int *n, float d, int i, int j) noexcept nogil:
    cdef int k = n[0], p
    n[0] += 1
    while k > 0:
        p = (k - 1) // 2
        if h[p].d <= d:
            break
        h[k] = h[p]
        k = p
    h[k].d, h[k].i, h[k].j = d, i, j


cdef inline Entry _pop(Entry *h, int *n) noexcept nogil:
    cdef Entry top = h[0], last
    cdef int k = 0, c
    n[0] -= 1
    last = h[n[0]]
    while True:
        c = 2 * k + 1
        if c >= n[0]:
            break
        if c + 1 < n[0] and h[c + 1].d < h[c].d:
            c += 1
        if last.d <= h[c].d:
            break
        h[k] = h[c]
        k = c
    if n[0] > 0:
        h[k] = last
    return top


cdef inline bint _after(const float *d, int a, int b) noexcept nogil:
    """Index a sorts after index b: by value, then index."""
    return d[a] > d[b] or (d[a] == d[b] and a > b)


cdef inline void _sift_down_min(const float *d, int *h, int k, int end) noexcept nogil:
    """Restore the min-heap below position k of h[0:end] (ordered by _after)."""
    cdef int c, t
    while True:
        c = 2 * k + 1
        if c >= end:
            return
        if c + 1 < end and _after(d, h[c], h[c + 1]):
            c += 1
        if not _after(d, h[k], h[c]):
            return
        t = h[k]; h[k] = h[c]; h[c] = t
        k = c


cdef struct Sorted:       # indices of a distance list in ascending order, sorted lazily
    int *order            # order[0:n] is the sorted prefix
    int *heap             # the rest, as a min-heap of size hn
    int n, hn


cdef inline void _sorted_init(Sorted *s, const float *d, int V) noexcept nogil:
    cdef int i
    for i in range(V):
        s.heap[i] = i
    for i in range(V // 2 - 1, -1, -1):
        _sift_down_min(d, s.heap, i, V)
    s.n = 0
    s.hn = V


cdef inline int _sorted_at(Sorted *s, const float *d, int i) noexcept nogil:
    """The index with rank i: the multi-sequence walk reads only a short prefix, so entries
    are popped from the heap as it gets there instead of sorting the whole list."""
    while s.n <= i:
        s.order[s.n] = s.heap[0]
        s.n += 1
        s.hn -= 1
        s.heap[0] = s.heap[s.hn]
        _sift_down_min(d, s.heap, 0, s.hn)
    return s.order[i]


def cell_order(const float[:, ::1] Q, const float[:, ::1] C0, const float[:, ::1] C1,
               const int64_t[::1] cell_sizes, int64_t quota, int64_t max_visits,
               int64_t[:, ::1] cells, int64_t[::1] n_cells, int64_t[::1] n_visited,
               int64_t[::1] n_candidates, int n_threads):
    """Cells of every query in multi-sequence order, until the candidate quota is reached.

    Q (nq, D) float32 queries; C0, C1 (V, D/2) coarse centroids of the halves;
    cell_sizes (V*V,) int64 entries per cell (cell id = c0 * V + c1); quota: stop once the
    visited cells hold at least this many entries (<= 0: no quota); max_visits: visit at most
    this many cells, empty ones included (<= 0: no cap). Outputs: cells (nq, L) int64 the
    non-empty visited cells in visiting order (L >= min(quota, max_visits) suffices: each
    adds at least one candidate), n_cells (nq,) how many, n_visited (nq,) cells visited
    including empty ones, n_candidates (nq,) entries in them.
    Order: non-decreasing d0[c0] + d1[c1]; from (0, 0), (i+1, j) is pushed when j == 0 or
    (i+1, j-1) was visited, (i, j+1) when i == 0 or (i-1, j+1) was visited (LOPQ's rule).
    """
    cdef Py_ssize_t nq = Q.shape[0], q
    cdef int V = C0.shape[0], Dh = C0.shape[1], i, j, k, nh, a, b
    cdef int64_t cand, cell, nc, nv, sz, cap = cells.shape[1]
    cdef Entry e
    cdef float *d0
    cdef float *d1
    cdef int *o0
    cdef Sorted *s0
    cdef Sorted *s1
    cdef int *lim       # lim[i]: cells (i, 0 .. lim[i]-1) of the sorted lists are visited
    cdef Entry *frontier
    cdef float *CT
    cdef int failed = 0
    cdef int *fail = &failed
    if C1.shape[0] != V or C1.shape[1] != Dh or Q.shape[1] != 2 * Dh:
        raise ValueError("cell_order: inconsistent shapes")
    if cell_sizes.shape[0] != <Py_ssize_t> V * V or cells.shape[0] != nq:
        raise ValueError("cell_order: cell_sizes must be (V*V,), cells (nq, L)")
    CT = <float *> malloc(2 * V * Dh * sizeof(float))
    if CT == NULL:
        raise MemoryError()
    with nogil:
        for k in range(V):
            for i in range(Dh):
                CT[i * V + k] = C0[k, i]
                CT[V * Dh + i * V + k] = C1[k, i]
        with parallel(num_threads=n_threads):
            d0 = <float *> malloc(2 * V * sizeof(float))
            d1 = d0 + V
            o0 = <int *> malloc(5 * V * sizeof(int))
            lim = o0 + 4 * V
            s0 = <Sorted *> malloc(2 * sizeof(Sorted))
            s1 = s0 + 1 if s0 != NULL else NULL
            if s0 != NULL and o0 != NULL:
                s0.order, s0.heap = o0, o0 + V
                s1.order, s1.heap = o0 + 2 * V, o0 + 3 * V
            frontier = <Entry *> malloc((V + 2) * sizeof(Entry))
            for q in prange(nq, schedule="dynamic"):
                if d0 == NULL or o0 == NULL or frontier == NULL or s0 == NULL:
                    fail[0] = 1
                    continue
                cypq_l2sqr_ny(&Q[q, 0], CT, Dh, V, d0)
                cypq_l2sqr_ny(&Q[q, Dh], CT + V * Dh, Dh, V, d1)
                _sorted_init(s0, d0, V)
                _sorted_init(s1, d1, V)
                for i in range(V):
                    lim[i] = 0
                nh = 0
                nc = 0
                nv = 0
                cand = 0
                _push(frontier, &nh, d0[_sorted_at(s0, d0, 0)] + d1[_sorted_at(s1, d1, 0)], 0, 0)
                while (nh > 0 and (max_visits <= 0 or nv < max_visits)
                       and (quota <= 0 or cand < quota) and nc < cap):
                    e = _pop(frontier, &nh)
                    i = e.i
                    j = e.j
                    lim[i] = j + 1
                    cell = <int64_t> _sorted_at(s0, d0, i) * V + _sorted_at(s1, d1, j)
                    nv = nv + 1
                    # Branch-free: whether a cell is empty is a coin toss to the predictor.
                    sz = cell_sizes[cell]
                    cells[q, nc] = cell
                    nc = nc + (sz > 0)
                    cand = cand + sz
                    # A pushed cell's size is read when it is popped: fetch it now, the
                    # random reads into cell_sizes were half of this loop's time.
                    if i + 1 < V and (j == 0 or lim[i + 1] > j - 1):
                        a = _sorted_at(s0, d0, i + 1)
                        b = _sorted_at(s1, d1, j)
                        _push(frontier, &nh, d0[a] + d1[b], i + 1, j)
                        cypq_prefetch(&cell_sizes[<int64_t> a * V + b])
                    if j + 1 < V and (i == 0 or lim[i - 1] > j + 1):
                        a = _sorted_at(s0, d0, i)
                        b = _sorted_at(s1, d1, j + 1)
                        _push(frontier, &nh, d0[a] + d1[b], i, j + 1)
                        cypq_prefetch(&cell_sizes[<int64_t> a * V + b])
                # Scan order does not change the result; by cell id (c0-major), consecutive
                # cells share their half-0 table, which then stays in cache.
                _sort_i64(&cells[q, 0], nc)
                n_cells[q] = nc
                n_visited[q] = nv
                n_candidates[q] = cand
            free(d0)
            free(o0)
            free(s0)
            free(frontier)
    free(CT)
    if failed:
        raise MemoryError()


cdef enum:
    AHEAD = 4     # scan_cells fetches a cell's entries this many cells ahead (see there)


cdef void _half_tables(const float *P, int n, int Dh, int Mh, int Ds, int S,
                       const float *subTm2, const float *subnorm, float *out) noexcept nogil:
    """Tables out (n, Mh, S) of n projected query halves P (n, Dh) against the half's fine
    codebooks (subTm2: Mh blocks of -2 * C^T (Ds, S); subnorm (Mh, S) squared norms).
    Subquantizer-major, four rows at a time: the codebook of one subquantizer stays in L1."""
    cdef const float *xs[4]
    cdef float *outs[4]
    cdef float xn[4]
    cdef int s, r, p, a
    cdef const float *x
    for s in range(Mh):
        r = 0
        while r < n:
            p = 0
            while p < 4 and r + p < n:
                x = P + <Py_ssize_t> (r + p) * Dh + s * Ds
                xs[p] = x
                xn[p] = 0
                for a in range(Ds):
                    xn[p] = xn[p] + x[a] * x[a]
                outs[p] = out + (<Py_ssize_t> (r + p) * Mh + s) * S
                p = p + 1
            if p == 4:
                cypq_l2sqr_ny_norm_x4(xs, xn, subTm2 + <Py_ssize_t> s * Ds * S, subnorm + s * S,
                                      Ds, S, outs)
            else:
                for a in range(p):
                    cypq_l2sqr_ny_norm(xs[a], xn[a], subTm2 + <Py_ssize_t> s * Ds * S,
                                       subnorm + s * S, Ds, S, outs[a])
            r = r + p


def scan_cells(const float[:, ::1] P0, const float[:, ::1] P1,
               const int64_t[::1] pstart0, const int64_t[::1] pstart1,
               const float[:, :, ::1] subs, const int64_t[::1] cell_start,
               const int32_t[::1] tab0, const int32_t[::1] tab1,
               const int64_t[::1] cell_slot, const int64_t[::1] seg_start,
               const uintptr_t[::1] seg_codes, const uintptr_t[::1] seg_ids,
               const int64_t[::1] seg_len, int code_bytes,
               float[:, ::1] D, int64_t[:, ::1] I, int64_t[::1] n_scanned, int n_threads):
    """ADC top-k of every query over the codes of its visited cells.

    P0, P1 (n0, Dh), (n1, Dh) float32: the query halves projected into the local frames of
    the centroids each query visits, R[c] @ (q_h - C[c] - mu[c]); query q's rows are
    pstart0[q] : pstart0[q + 1] (pstart1 likewise), (nq + 1,) int64. subs (M, S, D/M) fine
    codebooks (the first M/2 for half 0). Visited cells, flat: query q's are
    cell_start[q] : cell_start[q + 1] ((nq + 1,) int64); for each, tab0[t], tab1[t] (n,)
    int32 the rows of its two centroids among its query's rows and cell_slot[t] (n,) int64
    its entry in seg_start; segments seg_start[s] : seg_start[s+1] of the flat arrays
    seg_codes (address of (len, M) codes, uint8 or uint16 as code_bytes says), seg_ids
    (address of (len,) int64 ids) and seg_len. The memory behind those addresses must stay
    valid for the call.
    Outputs: D (nq, k) float32 ascending squared distances, I (nq, k) int64 ids (inf / -1
    padding); n_scanned (nq,) codes scanned.
    Per query: every table of its centroids first (four rows per codebook pass), then the
    cells' codes.
    """
    cdef Py_ssize_t nq = D.shape[0], q
    cdef int M = subs.shape[0], S = subs.shape[1], Ds = subs.shape[2], Mh = M // 2
    cdef int Dh = P0.shape[1], k = D.shape[1], a, m, j, n0, n1
    cdef int64_t t, t1, sl, g, scanned, need, maxrows = 0
    cdef int64_t n_slots = seg_start.shape[0] - 1
    cdef Py_ssize_t tsize = <Py_ssize_t> Mh * S
    cdef const float *T0
    cdef const float *T1
    cdef const float *p0
    cdef const float *p1
    cdef float *subT
    cdef float *subnorm
    cdef float acc
    cdef float *buf
    cdef float *tables
    cdef int32_t *ibuf
    cdef int failed = 0
    cdef int *fail = &failed
    if M % 2 or Mh * Ds != Dh or P1.shape[1] != Dh:
        raise ValueError("scan_cells: inconsistent model shapes")
    if code_bytes not in (1, 2) or (code_bytes == 1 and S > 256):
        raise ValueError("scan_cells: codes must be uint8 (S <= 256) or uint16")
    if (I.shape[0] != nq or I.shape[1] != k or n_scanned.shape[0] != nq
            or pstart0.shape[0] != nq + 1 or pstart1.shape[0] != nq + 1
            or cell_start.shape[0] != nq + 1):
        raise ValueError("scan_cells: per-query arrays must have nq (+ 1) rows")
    if tab0.shape[0] != cell_slot.shape[0] or tab1.shape[0] != cell_slot.shape[0]:
        raise ValueError("scan_cells: tab0, tab1 and cell_slot must have one entry per cell")
    if k == 0 or nq == 0:
        return
    for q in range(nq):
        if (pstart0[q + 1] < pstart0[q] or pstart1[q + 1] < pstart1[q]
                or pstart0[q + 1] > P0.shape[0] or pstart1[q + 1] > P1.shape[0]
                or cell_start[q] < 0 or cell_start[q + 1] < cell_start[q]
                or cell_start[q + 1] > cell_slot.shape[0]):
            raise ValueError("scan_cells: pstart0 / pstart1 / cell_start out of range")
        need = pstart0[q + 1] - pstart0[q] + pstart1[q + 1] - pstart1[q]
        if need > maxrows:
            maxrows = need
        for t in range(cell_start[q], cell_start[q + 1]):
            if (cell_slot[t] < 0 or cell_slot[t] >= n_slots or tab0[t] < 0
                    or tab0[t] >= pstart0[q + 1] - pstart0[q] or tab1[t] < 0
                    or tab1[t] >= pstart1[q + 1] - pstart1[q]):
                raise ValueError("scan_cells: a cell's slot or table row is out of range")
    p0 = &P0[0, 0] if P0.shape[0] else NULL
    p1 = &P1[0, 0] if P1.shape[0] else NULL
    subT = <float *> malloc(<Py_ssize_t> M * S * (Ds + 1) * sizeof(float))
    if subT == NULL:
        raise MemoryError()
    subnorm = subT + <Py_ssize_t> M * S * Ds
    with nogil:
        for m in range(M):
            for a in range(S):
                acc = 0
                for j in range(Ds):
                    subT[(<Py_ssize_t> m * Ds + j) * S + a] = -2 * subs[m, a, j]
                    acc = acc + subs[m, a, j] * subs[m, a, j]
                subnorm[m * S + a] = acc
        with parallel(num_threads=n_threads):
            buf = <float *> malloc(SCAN_BLOCK * sizeof(float))
            ibuf = <int32_t *> malloc(SCAN_BLOCK * sizeof(int32_t))
            tables = <float *> malloc((maxrows if maxrows > 0 else 1) * tsize * sizeof(float))
            for q in prange(nq, schedule="dynamic"):
                if buf == NULL or ibuf == NULL or tables == NULL:
                    fail[0] = 1
                    continue
                n0 = <int> (pstart0[q + 1] - pstart0[q])
                n1 = <int> (pstart1[q + 1] - pstart1[q])
                _half_tables(p0 + pstart0[q] * Dh, n0, Dh, Mh, Ds, S, subT, subnorm,
                             tables)
                _half_tables(p1 + pstart1[q] * Dh, n1, Dh, Mh, Ds, S,
                             subT + <Py_ssize_t> Mh * Ds * S, subnorm + Mh * S,
                             tables + n0 * tsize)
                heap_init(&D[q, 0], &I[q, 0], k)
                scanned = 0
                t1 = cell_start[q + 1]
                for t in range(cell_start[q], t1):
                    # The cells' segment records and entries are scattered: fetch them a few
                    # cells ahead, each step using what an earlier step fetched (the misses
                    # were a third of the scan's time).
                    if t + 3 * AHEAD < t1:
                        cypq_prefetch(&seg_start[cell_slot[t + 3 * AHEAD]])
                    if t + 2 * AHEAD < t1:
                        g = seg_start[cell_slot[t + 2 * AHEAD]]
                        cypq_prefetch(&seg_len[g])
                        cypq_prefetch(&seg_codes[g])
                        cypq_prefetch(&seg_ids[g])
                    if t + AHEAD < t1:
                        g = seg_start[cell_slot[t + AHEAD]]
                        if seg_start[cell_slot[t + AHEAD] + 1] > g:
                            cypq_prefetch(<const void *> seg_codes[g])
                            cypq_prefetch(<const void *> seg_ids[g])
                    sl = cell_slot[t]
                    T0 = tables + tab0[t] * tsize
                    T1 = tables + (n0 + tab1[t]) * tsize
                    for g in range(seg_start[sl], seg_start[sl + 1]):
                        scanned = scanned + seg_len[g]
                        if code_bytes == 1:
                            scan_topk(T0, T1, M, S, <const uint8_t *> seg_codes[g],
                                      seg_len[g], <const int64_t *> seg_ids[g], 0,
                                      &D[q, 0], &I[q, 0], k, buf, ibuf)
                        else:
                            scan_topk(T0, T1, M, S, <const uint16_t *> seg_codes[g],
                                      seg_len[g], <const int64_t *> seg_ids[g], 0,
                                      &D[q, 0], &I[q, 0], k, buf, ibuf)
                heap_sort_ascending(&D[q, 0], &I[q, 0], k)
                n_scanned[q] = scanned
            free(buf)
            free(ibuf)
            free(tables)
    free(subT)
    if failed:
        raise MemoryError()
