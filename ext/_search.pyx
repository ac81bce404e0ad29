# cython: freethreading_compatible = True
"""Kernels of LOPQ search over an inverted multi-index.

Phase A, ``cell_order``: per query, the coarse distances of both halves and the cells
(c0, c1) in multi-sequence order (Babenko & Lempitsky, CVPR 2012), up to a candidate quota.
Phase B (Python, the storage): the code segments of those cells.
Phase C, ``scan_cells``: per query, project into each visited centroid's local frame (tables
cached per (half, centroid): a centroid recurs in many cells), ADC over the cells' codes into
a top-k heap. Both phases run queries in parallel with the GIL released.
"""
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uintptr_t
from libc.stdlib cimport free, malloc, qsort, realloc

from heap cimport heap_init, heap_sort_ascending
from scan cimport SCAN_BLOCK, scan_topk
from simd cimport cypq_l2sqr_ny, cypq_l2sqr_ny_norm, cypq_matvec_t


cdef int _cmp_i64(const void *a, const void *b) noexcept nogil:
    cdef int64_t x = (<const int64_t *> a)[0], y = (<const int64_t *> b)[0]
    return (x > y) - (x < y)


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
    cdef int V = C0.shape[0], Dh = C0.shape[1], i, j, k, nh
    cdef int64_t cand, cell, nc, nv, cap = cells.shape[1]
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
                    if cell_sizes[cell] > 0:
                        cells[q, nc] = cell
                        nc = nc + 1
                        cand = cand + cell_sizes[cell]
                    if i + 1 < V and (j == 0 or lim[i + 1] > j - 1):
                        _push(frontier, &nh, d0[_sorted_at(s0, d0, i + 1)]
                              + d1[_sorted_at(s1, d1, j)], i + 1, j)
                    if j + 1 < V and (i == 0 or lim[i - 1] > j + 1):
                        _push(frontier, &nh, d0[_sorted_at(s0, d0, i)]
                              + d1[_sorted_at(s1, d1, j + 1)], i, j + 1)
                # Scan order does not change the result; by cell id (c0-major), consecutive
                # cells share their half-0 table, which then stays in cache.
                qsort(&cells[q, 0], nc, sizeof(int64_t), _cmp_i64)
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


cdef struct Frames:       # per-thread cache of local-frame tables of one query
    int *slot             # (2, V): table index of (half, centroid), -1 if not computed
    int *touched          # (2 * cap) (half * V + centroid) entries to reset
    int n_touched, n_tables, cap
    float *tables         # (cap, M/2, S)
    float *z              # (Dh) scratch
    float *pz             # (Dh) scratch


cdef inline void _frames_reset(Frames *f) noexcept nogil:
    """Forget the query's tables (only the touched slots are cleared)."""
    cdef int a
    for a in range(f.n_touched):
        f.slot[f.touched[a]] = -1
    f.n_touched = 0
    f.n_tables = 0


cdef inline float *_frame_table(Frames *f, int half, int c, const float *q,
                                const float[:, ::1] C, const float[:, :, ::1] RT,
                                const float[:, ::1] mu, const float *subTm2,
                                const float *subnorm, int Mh, int S, int Ds) noexcept nogil:
    """Tables (Mh, S) of the query half q in centroid c's local frame; NULL if out of memory.
    RT holds the rotations transposed; subTm2 / subnorm the half's fine codebooks as -2 * C^T
    and squared norms."""
    cdef int Dh = C.shape[1], V = C.shape[0], a, s, t
    cdef float xn
    cdef float *grown
    t = f.slot[half * V + c]
    if t >= 0:
        return f.tables + <Py_ssize_t> t * Mh * S
    if f.n_tables == f.cap:
        grown = <float *> realloc(f.tables, <Py_ssize_t> 2 * f.cap * Mh * S * sizeof(float))
        if grown == NULL:
            return NULL
        f.tables = grown
        f.cap = 2 * f.cap
        f.touched = <int *> realloc(f.touched, 2 * f.cap * sizeof(int))
        if f.touched == NULL:
            return NULL
    t = f.n_tables
    f.n_tables += 1
    f.slot[half * V + c] = t
    f.touched[f.n_touched] = half * V + c
    f.n_touched += 1
    for a in range(Dh):
        f.z[a] = q[a] - C[c, a] - mu[c, a]
    cypq_matvec_t(&RT[c, 0, 0], f.z, Dh, f.pz)          # R[c] @ z
    for s in range(Mh):
        xn = 0
        for a in range(Ds):
            xn = xn + f.pz[s * Ds + a] * f.pz[s * Ds + a]
        cypq_l2sqr_ny_norm(f.pz + s * Ds, xn, subTm2 + <Py_ssize_t> s * Ds * S, subnorm + s * S,
                           Ds, S, f.tables + (<Py_ssize_t> t * Mh + s) * S)
    return f.tables + <Py_ssize_t> t * Mh * S


def scan_cells(const float[:, ::1] Q, const float[:, ::1] C0, const float[:, ::1] C1,
               const float[:, :, ::1] RT0, const float[:, :, ::1] RT1,
               const float[:, ::1] mu0, const float[:, ::1] mu1,
               const float[:, :, ::1] subs,
               const int64_t[:, ::1] cells, const int64_t[::1] n_cells,
               const int64_t[:, ::1] cell_slot, const int64_t[::1] seg_start,
               const uintptr_t[::1] seg_codes, const uintptr_t[::1] seg_ids,
               const int64_t[::1] seg_len, int code_bytes,
               float[:, ::1] D, int64_t[:, ::1] I, int64_t[::1] n_scanned, int n_threads):
    """ADC top-k of every query over the codes of its visited cells.

    Q (nq, D) float32; C0, C1 (V, Dh); RT0, RT1 (V, Dh, Dh) the rotations transposed;
    mu0, mu1 (V, Dh): the LOPQ model,
    halves 0 and 1; subs (M, S, D/M) fine codebooks (the first M/2 for half 0).
    cells (nq, >= max n_cells) and n_cells (nq,) from cell_order; cell_slot (nq, same) gives,
    for each visited cell, its entry in seg_start (-1: no entries); segments
    seg_start[s] : seg_start[s+1] of the flat arrays seg_codes (address of (len, M) codes,
    uint8 or uint16 as code_bytes says), seg_ids (address of (len,) int64 ids) and seg_len.
    The memory behind those addresses must stay valid for the call.
    Outputs: D (nq, k) float32 ascending squared distances, I (nq, k) int64 ids (inf / -1
    padding); n_scanned (nq,) codes scanned.
    """
    cdef Py_ssize_t nq = Q.shape[0], q
    cdef int V = C0.shape[0], Dh = C0.shape[1], M = subs.shape[0], S = subs.shape[1]
    cdef int Ds = subs.shape[2], Mh = M // 2, k = D.shape[1], t, a, m, j
    cdef int64_t cell, sl, g, scanned
    cdef float *T0
    cdef float *T1
    cdef float *subT
    cdef float *subnorm
    cdef float acc
    cdef float *buf
    cdef int32_t *ibuf
    cdef Frames *f
    cdef int failed = 0
    cdef int *fail = &failed
    if M % 2 or Mh * Ds != Dh or Q.shape[1] != 2 * Dh or C1.shape[0] != V:
        raise ValueError("scan_cells: inconsistent model shapes")
    if code_bytes not in (1, 2) or (code_bytes == 1 and S > 256):
        raise ValueError("scan_cells: codes must be uint8 (S <= 256) or uint16")
    if D.shape[0] != nq or I.shape[0] != nq or I.shape[1] != k or n_scanned.shape[0] != nq:
        raise ValueError("scan_cells: outputs must be (nq, k)")
    if k == 0 or nq == 0:
        return
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
            f = <Frames *> malloc(sizeof(Frames))
            buf = <float *> malloc(SCAN_BLOCK * sizeof(float))
            ibuf = <int32_t *> malloc(SCAN_BLOCK * sizeof(int32_t))
            if f != NULL:
                f.cap = 16
                f.n_tables = 0
                f.n_touched = 0
                f.slot = <int *> malloc(2 * V * sizeof(int))
                f.touched = <int *> malloc(2 * f.cap * sizeof(int))
                f.tables = <float *> malloc(<Py_ssize_t> f.cap * Mh * S * sizeof(float))
                f.z = <float *> malloc(2 * Dh * sizeof(float))
                f.pz = f.z + Dh if f.z != NULL else NULL
                if f.slot != NULL:
                    for a in range(2 * V):
                        f.slot[a] = -1
            for q in prange(nq, schedule="dynamic"):
                if (f == NULL or buf == NULL or ibuf == NULL or f.slot == NULL
                        or f.touched == NULL or f.tables == NULL or f.z == NULL):
                    fail[0] = 1
                    continue
                heap_init(&D[q, 0], &I[q, 0], k)
                scanned = 0
                for t in range(n_cells[q]):
                    sl = cell_slot[q, t]
                    if sl < 0:
                        continue
                    cell = cells[q, t]
                    T0 = _frame_table(f, 0, <int> (cell // V), &Q[q, 0], C0, RT0, mu0, subT,
                                      subnorm, Mh, S, Ds)
                    T1 = _frame_table(f, 1, <int> (cell % V), &Q[q, Dh], C1, RT1, mu1,
                                      subT + <Py_ssize_t> Mh * Ds * S, subnorm + Mh * S,
                                      Mh, S, Ds)
                    # Making T1 may have grown (moved) the table store: look T0 up again
                    # (cached now, so this cannot move it).
                    T0 = _frame_table(f, 0, <int> (cell // V), &Q[q, 0], C0, RT0, mu0, subT,
                                      subnorm, Mh, S, Ds)
                    if T0 == NULL or T1 == NULL:
                        fail[0] = 1
                        break
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
                _frames_reset(f)
            if f != NULL:
                free(f.slot)
                free(f.touched)
                free(f.tables)
                free(f.z)
            free(f)
            free(buf)
            free(ibuf)
    free(subT)
    if failed:
        raise MemoryError()
