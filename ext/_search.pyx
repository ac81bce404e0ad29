# cython: freethreading_compatible = True
"""Kernels of LOPQ search over an inverted multi-index.

Phase A, ``cell_order``: per query, the coarse distances of both halves and the cells
(c0, c1) in multi-sequence order (Babenko & Lempitsky, CVPR 2012), up to a candidate quota.
Phase B (Python): the code segments of those cells (the storage), and each query half
projected into the local frame of every centroid the query visits (cypq._lopq.project, a
batch of queries grouped by centroid, so each rotation is read once per batch).
Phase C, ``scan_cells``: per query, the ADC tables of all its centroids, then ADC over the
cells' codes into a top-k (topk.pxd). Phases A and C run queries in parallel with the GIL
released.
"""
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, nextafterf, sqrt
from libc.string cimport memcpy, memset
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, realloc

from radix cimport SMALL_SORT, radix_sort
from topk cimport (CYPQ_SORTNET_MAX, TopK, cypq_sortnet_enabled, cypq_sortnet_u32,
                  cypq_sortnet_u32_portable, topk_alloc, topk_finish, topk_free, topk_reset,
                  topk_settle)
from nearest cimport Codebooks, codebooks_free, codebooks_init
from fastscan cimport (CYPQ_ADC4_AVX2, cypq_adc4_avx2_block_bounds, cypq_adc4_bounds,
                      cypq_adc4_listed, cypq_adc4_tails, cypq_adc4_blocks,
                      cypq_adc4_cell, cypq_adc4_plan, cypq_adc4_tail,
                      cypq_adc4_plan_init, cypq_bound_quantile, cypq_fastscan_init,
                      cypq_fastscan_limit, cypq_quantize4, cypq_rows_within)
from scan cimport (PEND_FLUSH, SCAN_BLOCK, Filter, Pending, load_id,
                  offer_code, pass_flags, pending_flush, scan_topk)
from simd cimport (cypq_ip_ny, cypq_l2sqr_ny, cypq_l2sqr_ny_norm, cypq_l2sqr_ny_norm_x4,
                  cypq_prefetch_line, cypq_prefetch_span, cypq_tables16)

cypq_fastscan_init()   # (this module's copy of the header's lane table)


cdef extern from *:
    int __builtin_ctzll(unsigned long long x) noexcept nogil
    int __builtin_popcountll(unsigned long long x) noexcept nogil


cdef enum:
    BITMAP_PER_CELL = 8     # cell_order sorts a list by bitmap while it has at most this
                            # many words of it per listed cell
    BITMAP_MAX = 1 << 16    # and the bitmap (a bit per cell) is at most this many words


cdef inline uint32_t _float_bits(float x) noexcept nogil:
    cdef uint32_t u
    memcpy(&u, &x, 4)
    return u


cdef enum:
    BAND_CAP = 4096     # cells enumerated per band at most (a larger band is redone narrower)
    BAND_AIM = 256      # cells a band aims at


cdef enum:
    FIRST_SAMPLE = 32   # a half of more than SMALL_SORT centroids sorts first those within
    FIRST_RANK = 4      # the FIRST_RANK-th smallest of FIRST_SAMPLE of its distances, then
                        # the next tier when the walk reaches it: those within the rank twice
                        # as far in the sample (about V / 8, V / 8, V / 4, V / 2 centroids)


cdef struct Walk:         # per-thread scratch of _walk (V entries each unless said)
    float *D0             # the halves' distances, ascending: the first ns[0], ns[1] of
    float *D1             # them (the rest sorted when the walk reaches them, _need)
    int32_t *o0           # their centroids
    int32_t *o1
    int32_t ns[2]
    const float *hd[2]    # each half's distances by centroid,
    float tau[2]          # and the bound of those sorted so far (the rest are above it)
    uint32_t samp[2][FIRST_SAMPLE]   # a sorted sample of each half's distances (bits),
    int rank[2]           # and the rank in it of tau (the next tier's bound: twice it)
    int32_t *lim          # row i: columns 0 .. lim[i]-1 enumerated
    int32_t *nlim         # the same for the band being enumerated
    float *bd             # (BAND_CAP) the band's cells: sum of the halves' distances,
    int64_t *bc           # (BAND_CAP) cell id,
    int64_t *bs           # (BAND_CAP) entries
    uint32_t *key         # (max(V, BAND_CAP, cap) each) radix sort keys, values
    int32_t *val
    uint32_t *tkey        # and their scratch
    int32_t *tval
    uint64_t *bits        # (nwords) a bit per cell, all zero between uses (_sort_by_bitmap)
    int64_t res[3]        # _walk's results


cdef void _neg_ip_shifted(const float *x, const float *CT, int Dh, int V,
                          float *out) noexcept nogil:
    """out (V,) = max_c <x, C[c]> - <x, C[v]>: minus the inner products, made >= 0 (the
    radix sort orders non-negative floats by their bits)."""
    cdef int v
    cdef float top
    cypq_ip_ny(x, CT, Dh, V, out)
    top = out[0]
    for v in range(1, V):
        if out[v] > top:
            top = out[v]
    for v in range(V):
        out[v] = top - out[v]


cdef void _half_sorted(Walk *w, int h, int V, float lo, float hi) noexcept nogil:
    """Sort half h's distances in (lo, hi] (ties by centroid) and append them, and their
    centroids, to D0 / D1 and o0 / o1 after the ns[h] there."""
    cdef float *D = w.D0 if h == 0 else w.D1
    cdef int32_t *o = w.o0 if h == 0 else w.o1
    cdef const float *d = w.hd[h]
    cdef int i, n = 0, at = w.ns[h]
    for i in range(V):
        if d[i] > lo and d[i] <= hi:
            w.key[n] = _float_bits(d[i])
            w.val[n] = i
            n = n + 1
    radix_sort(w.key, w.val, n, w.tkey, w.tval)
    for i in range(n):
        o[at + i] = w.val[i]
        D[at + i] = d[w.val[i]]
    w.ns[h] = at + n


cdef void _half_order(Walk *w, int h, const float *d, int V) noexcept nogil:
    """Make half h's distances d (V,) ready for the walk, which needs them in ascending
    order (ties by centroid) only as far as it goes (_need): a small quota's walk reaches
    a few of V = 256, where sorting them all was half of a query's cell order. Up to
    SMALL_SORT all are sorted now; past it, those up to a threshold expected to hold about
    V / 8 of them, the next tier when the walk first needs one (_need)."""
    cdef int s
    w.hd[h] = d
    w.ns[h] = 0
    w.tau[h] = INFINITY
    if V > SMALL_SORT:
        for s in range(FIRST_SAMPLE):
            w.samp[h][s] = _float_bits(d[<int64_t> s * V // FIRST_SAMPLE])
        radix_sort(w.samp[h], NULL, FIRST_SAMPLE, w.tkey, NULL)
        w.rank[h] = FIRST_RANK
        memcpy(&w.tau[h], &w.samp[h][FIRST_RANK - 1], sizeof(float))
    _half_sorted(w, h, V, -INFINITY, w.tau[h])


cdef inline void _need(Walk *w, int h, int x, int V) noexcept nogil:
    """Half h's x-th smallest distance (and its centroid) in place in D0 / D1 (o0 / o1):
    the next tiers sorted until it is."""
    cdef float lo
    while x >= w.ns[h] and w.ns[h] < V:
        lo = w.tau[h]
        w.rank[h] = 2 * w.rank[h]
        if w.rank[h] <= FIRST_SAMPLE:
            memcpy(&w.tau[h], &w.samp[h][w.rank[h] - 1], sizeof(float))
        else:
            w.tau[h] = INFINITY
        _half_sorted(w, h, V, lo, w.tau[h])


cdef void _sort_by_bitmap(int64_t *cells, int64_t n, uint64_t *bits,
                          int64_t nwords) noexcept nogil:
    """Sort the n distinct cell ids ascending through a bit per cell (bits: nwords words,
    all zero, and left so): O(n + nwords), where a radix sort's histograms cost more."""
    cdef int64_t e, wd, at = 0
    cdef uint64_t x
    for e in range(n):
        bits[cells[e] >> 6] |= (<uint64_t> 1) << (cells[e] & 63)
    for wd in range(nwords):
        x = bits[wd]
        if x:
            bits[wd] = 0
            while x:
                cells[at] = wd * 64 + __builtin_ctzll(x)
                at = at + 1
                x &= x - 1


cdef void _walk(Walk *w, int V, const int64_t *sizes, int64_t quota, int64_t max_visits,
                int64_t cap, int64_t *cells, int64_t *out, bint ordered) noexcept nogil:
    """Cells in order of D0[i] + D1[j] (w's halves, taken in order as far as needed) until
    they hold quota entries or max_visits cells were visited (<= 0: no limit); the
    non-empty ones go to cells[0:n], n <= cap. out = (n, cells visited, entries in them).

    The order is the multi-sequence one (non-decreasing sum), found band by band rather than
    cell by cell through a heap: every cell with a sum in (t_done, t_next] is enumerated row
    by row (row i's next column is lim[i]), which needs no order among them; only the band
    where a limit falls is sorted (by sum, then enumeration order) to cut it exactly. Band
    widths aim at ~BAND_AIM cells; a band over BAND_CAP cells is redone narrower, and one of
    a single sum value is taken BAND_CAP cells at a time (all its cells tie, so any order of
    them is in order). With ``ordered`` every band is sorted, so that cells[] is in
    multi-sequence order throughout (a filtered scan stops inside the list).
    """
    cdef int i, j, nrows
    cdef int64_t nb, e, nv = 0, nc = 0, cand = 0, band_entries, band_full, last_nb = 0
    cdef int64_t total = <int64_t> V * V
    cdef float a, sm, base, t_done, t_next, width, last_width = 0, retry = INFINITY
    cdef const float *D0 = w.D0
    cdef const float *D1 = w.D1
    cdef bint final, overflow, whole
    for i in range(V):
        w.lim[i] = 0
    _need(w, 0, 1 if V > 1 else 0, V)
    _need(w, 1, 1 if V > 1 else 0, V)
    base = D0[0] + D1[0]
    t_done = nextafterf(base, -INFINITY)    # every sum is above it
    while True:
        if nv == 0:   # first band: the cells within the halves' first gaps
            width = D0[1] - D0[0] + D1[1] - D1[0] if V > 1 else 0
        else:
            # ~BAND_AIM cells at the last band's density (which only grows, so this errs
            # narrow), and at most half the radius so far (early bands are too sparse to
            # extrapolate from).
            width = 0.5 * (t_done - base)
            if last_nb > 0 and BAND_AIM * last_width / last_nb < width:
                width = BAND_AIM * last_width / last_nb
        if width > retry:
            width = retry
        t_next = t_done + width
        if not t_next > t_done:
            t_next = nextafterf(t_done, INFINITY)
        # Enumerate the band (t_done, t_next].
        nb = 0
        overflow = False
        nrows = 0
        for i in range(V):
            _need(w, 0, i, V)
            a = D0[i]
            if a + D1[0] > t_next:
                break
            j = w.lim[i]
            while j < V:
                _need(w, 1, j, V)
                sm = a + D1[j]
                if sm > t_next:
                    break
                if nb == BAND_CAP:
                    overflow = True
                    break
                w.bd[nb] = sm
                w.bc[nb] = <int64_t> w.o0[i] * V + w.o1[j]
                nb = nb + 1
                j = j + 1
            w.nlim[i] = j
            nrows = i + 1
            if overflow:
                break
        whole = True
        if overflow:
            if t_next > nextafterf(t_done, INFINITY):   # redo narrower
                retry = 0.25 * (t_next - t_done)
                continue
            whole = False   # one sum value: take these cells, the rest of it next time
        retry = INFINITY
        for i in range(nrows):
            w.lim[i] = w.nlim[i]
        # The band's sizes in a loop of their own: independent random reads, many in flight
        # (inside the enumeration they were half of its time).
        band_entries = 0
        band_full = 0
        for e in range(nb):
            if e + 16 < nb:
                cypq_prefetch_line(&sizes[w.bc[e + 16]])
            w.bs[e] = sizes[w.bc[e]]
            band_entries = band_entries + w.bs[e]
            band_full = band_full + (w.bs[e] > 0)
        final = ((quota > 0 and cand + band_entries >= quota)
                 or (max_visits > 0 and nv + nb >= max_visits)
                 or nc + band_full >= cap or nv + nb == total)
        if final or ordered:
            # A limit falls in this band (or the order is asked for): its cells in order
            # (sum, then enumeration).
            for e in range(nb):
                w.key[e] = _float_bits(w.bd[e])
                w.val[e] = <int32_t> e
            radix_sort(w.key, w.val, nb, w.tkey, w.tval)
            for e in range(nb):
                i = w.val[e]
                nv = nv + 1
                cells[nc] = w.bc[i]
                nc = nc + (w.bs[i] > 0)
                cand = cand + w.bs[i]
                if final and ((quota > 0 and cand >= quota) or (max_visits > 0 and nv >= max_visits)
                              or nc >= cap):
                    break
            if final:
                break
        else:
            for e in range(nb):
                cells[nc] = w.bc[e]
                nc = nc + (w.bs[e] > 0)
            nv = nv + nb
            cand = cand + band_entries
        if whole:
            last_width = t_next - t_done
            last_nb = nb
            t_done = t_next
    out[0] = nc
    out[1] = nv
    out[2] = cand


def cell_order(const float[:, ::1] Q, const float[:, ::1] C0, const float[:, ::1] C1,
               const int64_t[::1] cell_sizes, int64_t quota, int64_t max_visits,
               int64_t[:, ::1] cells, int64_t[::1] n_cells, int64_t[::1] n_visited,
               int64_t[::1] n_candidates, int n_threads, bint ip=False, bint ordered=False):
    """Cells of every query in multi-sequence order, until the candidate quota is reached.

    Q (nq, D) float32 queries; C0, C1 (V, D/2) coarse centroids of the halves;
    cell_sizes (V*V,) int64 entries per cell (cell id = c0 * V + c1); quota: stop once the
    visited cells hold at least this many entries (<= 0: no quota); max_visits: visit at most
    this many cells, empty ones included (<= 0: no cap). Outputs: cells (nq, L) int64 the
    non-empty visited cells, ascending (L >= min(quota, max_visits) suffices: each adds at
    least one candidate; a smaller L stops the walk at L), n_cells (nq,) how many,
    n_visited (nq,) cells visited including empty ones, n_candidates (nq,) entries in them.
    Order: non-decreasing d0[c0] + d1[c1], ties by (rank of c0, rank of c1), a rank being
    the position in ascending distance, ties by index (see _walk). d_h: squared distances of
    the query halves to the centroids, or with ``ip`` minus their inner products (shifted by
    a constant per half, which keeps the order of the sums). The non-empty cells come
    sorted by cell id (consecutive cells share tables), or with ``ordered`` in that order
    (a filtered scan stops after the cell where enough entries passed).
    """
    cdef Py_ssize_t nq = Q.shape[0], q
    cdef int V = C0.shape[0], Dh = C0.shape[1], i, k
    cdef int64_t cap = cells.shape[1], e, nkey, nwords
    cdef float *fl
    cdef int32_t *ints
    cdef Walk *wk
    cdef float *CT
    cdef int failed = 0
    cdef int *fail = &failed
    if C1.shape[0] != V or C1.shape[1] != Dh or Q.shape[1] != 2 * Dh:
        raise ValueError("cell_order: inconsistent shapes")
    if cell_sizes.shape[0] != <Py_ssize_t> V * V or cells.shape[0] != nq:
        raise ValueError("cell_order: cell_sizes must be (V*V,), cells (nq, L)")
    if <int64_t> V * V > (<int64_t> 1 << 32):
        raise ValueError("cell_order: at most 2^32 cells")
    if nq == 0:
        return
    if cap == 0:
        raise ValueError("cell_order: cells must have room for at least one cell")
    nkey = max(V, BAND_CAP, cap)
    nwords = (<int64_t> V * V + 63) // 64
    CT = <float *> malloc(2 * V * Dh * sizeof(float))
    if CT == NULL:
        raise MemoryError()
    with nogil:
        for k in range(V):
            for i in range(Dh):
                CT[i * V + k] = C0[k, i]
                CT[V * Dh + i * V + k] = C1[k, i]
        with parallel(num_threads=n_threads):
            fl = <float *> malloc((4 * V + BAND_CAP) * sizeof(float))
            ints = <int32_t *> malloc(4 * V * sizeof(int32_t))
            wk = <Walk *> malloc(sizeof(Walk))
            if wk != NULL:
                wk.bc = <int64_t *> malloc(2 * BAND_CAP * sizeof(int64_t))
                wk.key = <uint32_t *> malloc(2 * nkey * sizeof(uint32_t))
                wk.val = <int32_t *> malloc(2 * nkey * sizeof(int32_t))
                wk.bits = NULL   # (without it, the radix sort)
                if not ordered and nwords <= BITMAP_MAX:
                    wk.bits = <uint64_t *> calloc(nwords, sizeof(uint64_t))
                if wk.bc != NULL and wk.key != NULL and wk.val != NULL:
                    wk.bs = wk.bc + BAND_CAP
                    wk.tkey = wk.key + nkey
                    wk.tval = wk.val + nkey
                if fl != NULL and ints != NULL:
                    wk.D0, wk.D1, wk.bd = fl + 2 * V, fl + 3 * V, fl + 4 * V
                    wk.o0, wk.o1 = ints, ints + V
                    wk.lim, wk.nlim = ints + 2 * V, ints + 3 * V
            for q in prange(nq, schedule="dynamic"):
                if (fl == NULL or ints == NULL or wk == NULL or wk.bc == NULL
                        or wk.key == NULL or wk.val == NULL):
                    fail[0] = 1
                    continue
                if ip:
                    _neg_ip_shifted(&Q[q, 0], CT, Dh, V, fl)
                    _neg_ip_shifted(&Q[q, Dh], CT + V * Dh, Dh, V, fl + V)
                else:
                    cypq_l2sqr_ny(&Q[q, 0], CT, Dh, V, fl)
                    cypq_l2sqr_ny(&Q[q, Dh], CT + V * Dh, Dh, V, fl + V)
                _half_order(wk, 0, fl, V)
                _half_order(wk, 1, fl + V, V)
                _walk(wk, V, &cell_sizes[0], quota, max_visits, cap, &cells[q, 0], wk.res,
                      ordered)
                # Scan order does not change the result; by cell id (c0-major), consecutive
                # cells share their half-0 table, which then stays in cache.
                if not ordered and wk.bits != NULL and nwords <= BITMAP_PER_CELL * wk.res[0]:
                    _sort_by_bitmap(&cells[q, 0], wk.res[0], wk.bits, nwords)
                elif not ordered:
                    for e in range(wk.res[0]):
                        wk.key[e] = <uint32_t> cells[q, e]
                    radix_sort(wk.key, NULL, wk.res[0], wk.tkey, NULL)
                    for e in range(wk.res[0]):
                        cells[q, e] = wk.key[e]
                n_cells[q] = wk.res[0]
                n_visited[q] = wk.res[1]
                n_candidates[q] = wk.res[2]
            free(fl)
            free(ints)
            if wk != NULL:
                free(wk.bc)
                free(wk.key)
                free(wk.val)
                free(wk.bits)
            free(wk)
    free(CT)
    if failed:
        raise MemoryError()


cdef enum:
    AHEAD = 4     # scan_cells fetches a cell's entries this many cells ahead (see there)
    PREFETCH_MAX = 1024   # and at most this many bytes of its codes, into L1
    # The two-phase scan reads every code of a query's cells in one pass: a cell of more than
    # PREFETCH_MAX bytes goes into L2 instead, up to PREFETCH_DEEP bytes, with up to
    # PREFETCH_IDS bytes of its ids (which the sweeps read). One process alternating, 4-bit
    # REALSIFT1M: V=128 (cells of ~60 codes) 16 / 32 bytes 0.96-0.98 / 0.92-0.95x the time
    # at quota 1000-8000, V=256 (~15 codes, fetched as before) 0.96-0.99x; every cell into L2
    # cost V=256 1.03x, more cells ahead no better, the 8-bit scans 1.0-1.06x.
    PREFETCH_DEEP = 4096
    PREFETCH_IDS = 1024


cdef struct Segs:      # the segments of scan_cells's cells (see there), as pointers
    const int64_t *cell_slot
    const int64_t *seg_start
    const uintptr_t *codes
    const uintptr_t *ids
    const int64_t *len
    const uintptr_t *vecs     # NULL: results carry no vector addresses
    int64_t vec_bytes
    int64_t cbytes            # bytes per code
    const uintptr_t *blocks   # NULL, or per segment its 4-bit codes in blocks of 32 (0: not)


cdef inline void _prefetch_ahead(const Segs *sg, int64_t t, int64_t t1, bint deep=False
                                 ) noexcept nogil:
    """Before cell t of a query's cells ending at t1: fetch the records and codes of the cells
    a few ahead, each step using what an earlier step fetched (the cells' segment records and
    entries are scattered: the misses were a third of the scan's time); ``deep``: a cell of
    more than PREFETCH_MAX bytes of codes up to PREFETCH_DEEP, and its ids, into L2."""
    cdef int64_t g, span
    if t + 3 * AHEAD < t1:
        cypq_prefetch_line(&sg.seg_start[sg.cell_slot[t + 3 * AHEAD]])
    if t + 2 * AHEAD < t1:
        g = sg.seg_start[sg.cell_slot[t + 2 * AHEAD]]
        cypq_prefetch_line(&sg.len[g])
        cypq_prefetch_line(&sg.codes[g])
        cypq_prefetch_line(&sg.ids[g])
        if sg.vecs != NULL:
            cypq_prefetch_line(&sg.vecs[g])
        if sg.blocks != NULL:
            cypq_prefetch_line(&sg.blocks[g])
    if t + AHEAD < t1:
        g = sg.seg_start[sg.cell_slot[t + AHEAD]]
        if sg.seg_start[sg.cell_slot[t + AHEAD] + 1] > g:
            # every line of the first segment's codes (the cells of small V span several)
            span = sg.len[g] * sg.cbytes
            if deep and span > PREFETCH_MAX:
                # (a segment in blocks of 32 has its bounds made from them, not its codes)
                cypq_prefetch_span(<const void *> (sg.blocks[g] if sg.blocks != NULL
                                                   and sg.blocks[g] != 0 else sg.codes[g]),
                                   span if span < PREFETCH_DEEP else PREFETCH_DEEP, 1)
                span = sg.len[g] * 8
                cypq_prefetch_span(<const void *> sg.ids[g],
                                   span if span < PREFETCH_IDS else PREFETCH_IDS, 1)
            else:
                cypq_prefetch_span(<const void *> sg.codes[g],
                                   span if span < PREFETCH_MAX else PREFETCH_MAX, 0)


# The two-phase scan of 4-bit codes (AVX2 bounds, no filter). Scanning cell by cell, a code
# is summed in float when its bound is within the top k's threshold as it stands then: loose
# until the top k has filled and tightened (at k = 100 over ~2000 codes, about a third of the
# codes were summed and most of those entered the top k). Here every code's bound is made
# first, the top k is filled from the codes whose bounds are among the ~1.2 k smallest, and
# then only the codes whose bound is within the threshold that leaves are summed. Exact: a
# code of the final top k has its bound at most its distance, at most every threshold.
cdef enum:
    TWO_PHASE_MAX = 0x7FFFFFC0    # codes per query at most (their rows are int32)

# The first sweep takes about this many per cent of k codes, and 30% more each time the
# guess of that many leaves the top k short. At k = 100 a query summed 150-240 codes in
# float with 1.5 k and doubling, 120-175 with 1.2 k and 30% (and cypq_quantize4's tighter
# bounds): MANMINILM's and REALSIFT1M's 4-bit codes of 16-32 bytes at quota 500-8000. 1.0 k
# left the top k short too often; 1.1 k was level with 1.2 k. 0: no two-phase scan, see
# two_phase.
cdef enum:
    TWO_PHASE_FIRST = 120
cdef int two_phase_first = TWO_PHASE_FIRST


def two_phase(int first=TWO_PHASE_FIRST):
    """The two-phase scan's first sweep (per cent of k; 0: scan cell by cell instead), for
    tests to take each branch; returns the setting before."""
    global two_phase_first
    if first < 0:
        raise ValueError("two_phase: first must be >= 0")
    first, two_phase_first = two_phase_first, first
    return first


cdef struct TwoPhase:    # per-thread scratch of _scan_two_phase
    float *lb            # the bounds of the query's codes, in scan order (cap + 32)
    int32_t *hit         # the rows a sweep takes (cap + 8)
    int64_t cap
    int64_t *rec         # per segment scanned: its first row in lb, segment, cell (3 rcap)
    int64_t rcap
    int32_t hist[256]


cdef int _two_phase_room(TwoPhase *tp, int64_t n, int64_t nseg) noexcept nogil:
    """Room for n codes and nseg segments (and one end record); -1: out of memory."""
    cdef void *a
    cdef void *b
    if n > tp.cap:
        n = n if n > 2 * tp.cap else 2 * tp.cap
        a = realloc(tp.lb, (n + 32) * sizeof(float))
        if a != NULL:
            tp.lb = <float *> a
        b = realloc(tp.hit, (n + 8) * sizeof(int32_t))
        if b != NULL:
            tp.hit = <int32_t *> b
        if a == NULL or b == NULL:
            return -1
        tp.cap = n
    if nseg + 1 > tp.rcap:
        nseg = nseg + 1 if nseg + 1 > 2 * tp.rcap else 2 * tp.rcap
        a = realloc(tp.rec, 3 * nseg * sizeof(int64_t))
        if a == NULL:
            return -1
        tp.rec = <int64_t *> a
        tp.rcap = nseg
    return 0


cdef void _sweep(const Segs *sg, const TwoPhase *tp, int64_t n, float lo, float hi,
                 const float *tables, int n0, Py_ssize_t tsize, const cypq_adc4_plan *plan,
                 const int32_t *tab0, const int32_t *tab1, TopK *top, Pending *pend,
                 float *buf, int32_t *ibuf) noexcept nogil:
    """The float sums of the codes whose bound is in (lo, hi], into the top k."""
    cdef int64_t nh = cypq_rows_within(tp.lb, n, lo, hi, tp.hit), j = 0, j2, r = 0
    cdef int64_t start, end, g, t, cnt, e, i
    cdef uintptr_t vecs
    cdef int W = plan.W
    while j < nh:   # each code's row fetched first: its sum waits on nothing then
        while tp.rec[3 * (r + 1)] <= tp.hit[j]:
            r += 1
        cypq_prefetch_line(<const char *> sg.codes[tp.rec[3 * r + 1]]
                           + (tp.hit[j] - tp.rec[3 * r]) * W)
        j += 1
    j = 0
    r = 0
    while j < nh:
        while tp.rec[3 * (r + 1)] <= tp.hit[j]:
            r += 1
        start = tp.rec[3 * r]
        end = tp.rec[3 * (r + 1)]
        g = tp.rec[3 * r + 1]
        t = tp.rec[3 * r + 2]
        j2 = j
        while j2 < nh and tp.hit[j2] < end and j2 - j < SCAN_BLOCK:
            tp.hit[j2] -= start
            j2 += 1
        cnt = cypq_adc4_listed(plan, tables + tab0[t] * tsize,
                               tables + (n0 + tab1[t]) * tsize, <const uint8_t *> sg.codes[g],
                               sg.len[g], tp.hit + j, j2 - j, top.td, buf, ibuf)
        vecs = sg.vecs[g] if sg.vecs != NULL else 0
        for e in range(cnt):
            if buf[e] <= top.td:
                i = ibuf[e]
                offer_code(top, pend, buf[e], <const int64_t *> sg.ids[g], 0, i,
                           vecs + <uintptr_t> (i * sg.vec_bytes) if vecs else 0)
        if pend.n >= PEND_FLUSH:
            pending_flush(pend, top)
        j = j2


cdef int64_t _scan_two_phase(const Segs *sg, TwoPhase *tp, cypq_adc4_cell *cell,
                             const float *tables, const uint8_t *qtab, const float *bias,
                             int n0, Py_ssize_t tsize, int W, int64_t c0, int64_t c1,
                             const int32_t *tab0, const int32_t *tab1, TopK *top,
                             Pending *pend, float *buf, int32_t *ibuf) noexcept nogil:
    """A query's cells c0 .. c1 - 1 (as scan_cells's loop takes them) into the top k, in two
    phases (above); returns the codes scanned, -1 out of memory, -2 (nothing done) more codes
    than TWO_PHASE_MAX."""
    cdef int64_t t, g, sl, n = 0, nseg = 0, off = 0, r = 0, want, ln
    cdef float lam, lo = -INFINITY
    cdef cypq_adc4_tail tail[2]   # a tail waiting for another, and that other
    cdef cypq_adc4_tail *tl
    tail[0].n = 0
    tail[1].n = 0
    for t in range(c0, c1):
        sl = sg.cell_slot[t]
        nseg += sg.seg_start[sl + 1] - sg.seg_start[sl]
        for g in range(sg.seg_start[sl], sg.seg_start[sl + 1]):
            n += sg.len[g]
    if n >= TWO_PHASE_MAX:
        return -2
    if _two_phase_room(tp, n, nseg) != 0:
        return -1
    for t in range(c0, c1):
        _prefetch_ahead(sg, t, c1, True)
        cell.Q0 = qtab + tab0[t] * tsize
        cell.Q1 = qtab + (n0 + tab1[t]) * tsize
        cell.base = bias[tab0[t]] + bias[n0 + tab1[t]]
        sl = sg.cell_slot[t]
        for g in range(sg.seg_start[sl], sg.seg_start[sl + 1]):
            tp.rec[3 * r] = off
            tp.rec[3 * r + 1] = g
            tp.rec[3 * r + 2] = t
            r += 1
            ln = sg.len[g]
            if sg.blocks != NULL and sg.blocks[g] != 0:
                cypq_adc4_avx2_block_bounds(cell, <const uint8_t *> sg.blocks[g], ln,
                                            tp.lb + off)
            elif cell.plan.bounds16 or ln % 32 == 0 or ln % 32 > 16:
                cypq_adc4_bounds(cell, <const uint8_t *> sg.codes[g], ln, tp.lb + off)
            else:   # the blocks of 32, then the tail of 1 .. 16 codes with another's
                tl = &tail[1 if tail[0].n else 0]
                tl.cell = cell[0]
                tl.n = ln % 32
                tl.codes = <const uint8_t *> sg.codes[g] + (ln - tl.n) * W
                tl.lb = tp.lb + off + ln - tl.n
                if ln > tl.n:
                    cypq_adc4_bounds(cell, <const uint8_t *> sg.codes[g], ln - tl.n,
                                     tp.lb + off)
                if tail[1].n:
                    cypq_adc4_tails(&tail[0], &tail[1])
                    tail[0].n = 0
                    tail[1].n = 0
            off += ln
    if tail[0].n:
        cypq_adc4_tails(&tail[0], NULL)
    tp.rec[3 * r] = off
    want = top.k * two_phase_first // 100 if top.k * two_phase_first >= 100 else 1
    while True:    # fill the top k (30% more codes while a sample's guess leaves it short)
        lam = cypq_bound_quantile(tp.lb, n, want, tp.hist) if n > want else INFINITY
        if lam > lo:   # (each code swept once: the guesses of other samples may be lower)
            _sweep(sg, tp, n, lo, lam, tables, n0, tsize, cell.plan, tab0, tab1, top, pend,
                   buf, ibuf)
            pending_flush(pend, top)
            lo = lam
        if lam == INFINITY or top.n >= top.k:
            break
        want += 1 + want * 3 // 10
    topk_settle(top)
    if lo < top.td:
        _sweep(sg, tp, n, lo, top.td, tables, n0, tsize, cell.plan, tab0, tab1, top, pend,
               buf, ibuf)
    return n


cdef void _half_tables(const float *P, int n, int Dh, int Mh, int Ds, int S,
                       const float *subTm2, const float *subnorm, float *out,
                       const float *offset) noexcept nogil:
    """Tables out (n, Mh, S) of n projected query halves P (n, Dh) against the half's fine
    codebooks (subTm2: Mh blocks of -2 * C^T (Ds, S); subnorm (Mh, S) squared norms).
    Subquantizer-major, four rows at a time: the codebook of one subquantizer stays in L1;
    16 codewords (4-bit codes): row by row, a table per vector (cypq_tables16). With
    ``offset`` (n,) (inner products: zero subnorm), no query norm, and offset[r] added to row
    r's first table."""
    cdef const float *xs[4]
    cdef float *outs[4]
    cdef float xn[4]
    cdef int s, r, p, a, k
    cdef const float *x
    if S == 16:
        cypq_tables16(P, n, Mh, Ds, subTm2, subnorm, offset, out)
        return
    for s in range(Mh):
        r = 0
        while r < n:
            p = 0
            while p < 4 and r + p < n:
                x = P + <Py_ssize_t> (r + p) * Dh + s * Ds
                xs[p] = x
                xn[p] = 0
                if offset == NULL:
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
            if offset != NULL and s == 0:
                for a in range(p):
                    for k in range(S):
                        outs[a][k] = outs[a][k] + offset[r + a]
            r = r + p


def flatten_lists(const int64_t[:, ::1] cells, const int64_t[::1] n_cells, int64_t[::1] flat):
    """The first n_cells[q] entries of every row q of cells (nq, cap) int64, one row after
    another, into flat (sum of n_cells,) int64: cell_order's lists, query-major."""
    cdef Py_ssize_t q, at = 0
    if n_cells.shape[0] != cells.shape[0]:
        raise ValueError("flatten_lists: one count per row")
    for q in range(cells.shape[0]):
        if n_cells[q] < 0 or n_cells[q] > cells.shape[1] or at + n_cells[q] > flat.shape[0]:
            raise ValueError("flatten_lists: counts do not fit the arrays")
        at += n_cells[q]
    if at != flat.shape[0]:
        raise ValueError("flatten_lists: flat must hold exactly the listed cells")
    at = 0
    with nogil:
        for q in range(cells.shape[0]):
            if n_cells[q] > 0:
                memcpy(&flat[at], &cells[q, 0], n_cells[q] * sizeof(int64_t))
            at += n_cells[q]


def distinct_cells(const int64_t[::1] flat, int64_t size, int64_t[::1] distinct,
                   int64_t[::1] slot):
    """The distinct values of flat (n,) int64 in [0, size), ascending, into distinct[0:nd],
    and each entry's position among them into slot (n,); returns nd. Through a bitmap of
    size bits and its words' ranks: linear, with size / 8 bytes of scratch (np.unique sorts;
    a table of int64 positions took 8 bytes per possible value)."""
    cdef int64_t n = flat.shape[0], t, w, nw = (size + 63) // 64, nd = 0, v
    cdef uint64_t *bits
    cdef int64_t *rank
    cdef uint64_t x
    if size <= 0 or slot.shape[0] != n or distinct.shape[0] < min(n, size):
        raise ValueError("distinct_cells: size > 0, slot (n,), distinct (min(n, size),)")
    bits = <uint64_t *> calloc(nw if nw > 0 else 1, sizeof(uint64_t))
    rank = <int64_t *> malloc((nw if nw > 0 else 1) * sizeof(int64_t))
    if bits == NULL or rank == NULL:
        free(bits)
        free(rank)
        raise MemoryError()
    with nogil:
        for t in range(n):
            v = flat[t]
            if v < 0 or v >= size:
                nd = -1
                break
            bits[v >> 6] |= (<uint64_t> 1) << (v & 63)
        if nd == 0:
            for w in range(nw):
                rank[w] = nd
                x = bits[w]
                while x:
                    distinct[nd] = w * 64 + __builtin_ctzll(x)
                    nd += 1
                    x &= x - 1
            for t in range(n):
                v = flat[t]
                slot[t] = rank[v >> 6] + __builtin_popcountll(
                    bits[v >> 6] & (((<uint64_t> 1) << (v & 63)) - 1))
    free(bits)
    free(rank)
    if nd < 0:
        raise ValueError("distinct_cells: a value outside [0, size)")
    return nd


def frame_rows(const int64_t[::1] flat, const int64_t[::1] n_cells, int V, int h,
               int32_t[::1] cent, int64_t[::1] key_query, int64_t[::1] start, int32_t[::1] tab):
    """The rows of half h's local frames for listed cells: one per distinct (query, centroid).

    flat (n,) int64 cells (id c0 * V + c1), query-major, n_cells (nq,) int64 how many per
    query (as cell_order lists them). Outputs: cent, key_query (at least n,) the centroid and
    query of each row, rows query-major (within a query in order of first listing); start
    (nq + 1,) query q's rows are start[q] : start[q + 1]; tab (n,) int32 each cell's row
    among its query's rows. Returns the number of rows."""
    cdef Py_ssize_t nq = n_cells.shape[0], q
    cdef int64_t n = flat.shape[0], t = 0, t1, m = 0, r0, r, cell
    cdef int c
    cdef int32_t *mark
    if h not in (0, 1) or V <= 0:
        raise ValueError("frame_rows: h must be 0 or 1 and V positive")
    if start.shape[0] != nq + 1 or tab.shape[0] != n or cent.shape[0] < n or key_query.shape[0] < n:
        raise ValueError("frame_rows: start needs nq + 1 entries, tab n, cent and key_query n")
    for q in range(nq):
        if n_cells[q] < 0:
            raise ValueError("frame_rows: negative cell counts")
        t += n_cells[q]
    if t != n:
        raise ValueError("frame_rows: n_cells must add up to the listed cells")
    mark = <int32_t *> malloc(V * sizeof(int32_t))
    if mark == NULL:
        raise MemoryError()
    t = 0
    with nogil:
        for c in range(V):
            mark[c] = -1
        for q in range(nq):
            start[q] = m
            r0 = m
            t1 = t + n_cells[q]
            while t < t1:
                cell = flat[t]
                if cell < 0 or cell >= <int64_t> V * V:
                    break
                c = <int> (cell // V if h == 0 else cell % V)
                if mark[c] < 0:
                    mark[c] = <int32_t> (m - r0)
                    cent[m] = c
                    key_query[m] = q
                    m += 1
                tab[t] = mark[c]
                t += 1
            for r in range(r0, m):     # clear this query's marks
                mark[cent[r]] = -1
            if t < t1:
                break
        start[nq] = m
    free(mark)
    if t != n:
        raise ValueError("frame_rows: a cell id outside [0, V * V)")
    return m


def scan_cells(const float[:, ::1] P0, const float[:, ::1] P1,
               const int64_t[::1] pstart0, const int64_t[::1] pstart1,
               const float[:, :, ::1] subs, const int64_t[::1] cell_start,
               const int32_t[::1] tab0, const int32_t[::1] tab1,
               const int64_t[::1] cell_slot, const int64_t[::1] seg_start,
               const uintptr_t[::1] seg_codes, const uintptr_t[::1] seg_ids,
               const int64_t[::1] seg_len, int code_bytes,
               float[:, ::1] D, int64_t[:, ::1] I, int64_t[::1] n_scanned, int n_threads,
               const float[::1] off0=None, const float[::1] off1=None, bint packed=False,
               const uintptr_t[::1] seg_vecs=None, int64_t vec_bytes=0,
               uintptr_t[:, ::1] W=None, const uintptr_t[::1] seg_tags=None,
               const uint64_t[:, ::1] masks=None, const int64_t[::1] id_set=None,
               int id_mode=0, int64_t pass_quota=0, int64_t[::1] n_passed=None,
               int64_t[::1] n_done=None, const uintptr_t[::1] seg_blocks=None):
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
    valid for the call. ``packed``: 4-bit codes (S = 16, M % 4 == 0) two per byte, low
    nibble first, M/2 bytes (code_bytes 1), scored as fastscan.h says: where the CPU has
    AVX-512 VBMI or AVX2, each query's tables also quantised to uint8 for in-register bounds
    that spare the float sums of codes that cannot enter the top k (same results either way;
    with AVX2 and no filter, in two phases: every code's bound first, then the float sums,
    see _scan_two_phase).
    Outputs: D (nq, k) float32 ascending squared distances, I (nq, k) int64 ids (inf / -1
    padding); n_scanned (nq,) codes scanned; with W (nq, k) uintp, where each result's
    stored vector is: seg_vecs[s] (address of the segment's (len, vec_bytes) vectors, 0:
    none there) + position * vec_bytes, 0 for padding and where seg_vecs is 0.
    Inner products instead (``off0``, ``off1`` given, (n0,), (n1,) float32, one per row of
    P0, P1): the rows are then R[c] @ q_h / 2 and the tables minus the inner products with
    the codewords, each row's offset added to its first table; D holds minus the inner
    products of the queries with the reconstructions (ascending: largest product first).
    Per query: every table of its centroids first (four rows per codebook pass), then the
    cells' codes.

    Filtered (``masks`` (nq, 3) uint64 given: per query tags any-of (0: no condition),
    all-of, none-of; and/or ``id_mode`` 1 (-1): ids in (not in) the ascending ``id_set``):
    only entries that pass enter the top k; seg_tags[s] is the address of segment s's
    (len,) uint64 tag sets (0 or seg_tags None: all zero). n_passed (nq,) counts the
    entries that passed; with ``pass_quota`` > 0 a query stops after the cell in which
    that count reaches it, and n_done (nq,) says how many of its cells it scanned.

    ``seg_blocks`` (per segment, uintp; with ``packed``): the address of the segment's codes
    in blocks of 32 (:func:`code_blocks`), or 0; the two-phase scan reads its bounds from
    them (no transposes; the same results), see :func:`scans_blocks`.
    """
    cdef Py_ssize_t nq = D.shape[0], q
    cdef int M = subs.shape[0], S = subs.shape[1], Ds = subs.shape[2], Mh = M // 2
    cdef int Dh = P0.shape[1], k = D.shape[1], n0, n1
    cdef int64_t t, t1, sl, g, scanned, need, maxrows = 0
    cdef int64_t cbytes = code_bytes * (M // 2 if packed else M)   # bytes per code
    cdef int64_t n_slots = seg_start.shape[0] - 1
    cdef Py_ssize_t tsize = <Py_ssize_t> Mh * S
    cdef const float *T0
    cdef const float *T1
    cdef const float *p0
    cdef const float *p1
    cdef Codebooks cb
    cdef float *buf
    cdef float *tables
    cdef cypq_adc4_plan plan
    cdef cypq_adc4_cell *cell
    cdef uint8_t *qtab
    cdef float *bias
    cdef float qdelta, qslack
    cdef bint bounds = False
    cdef int32_t *ibuf
    cdef int failed = 0
    cdef int *fail = &failed
    cdef const float *o0 = NULL
    cdef const float *o1 = NULL
    cdef float *zero_norms = NULL
    cdef bint where = W is not None
    cdef bint filtering = masks is not None or id_mode != 0
    cdef Filter *filt = NULL
    cdef uint8_t *flags
    cdef int64_t passed
    cdef const char *tg
    cdef TopK *top
    cdef Pending *pend
    cdef bint two_phase = False
    cdef TwoPhase *tp
    cdef Segs sg
    cdef const int32_t *ptab0 = &tab0[0] if tab0.shape[0] else NULL
    cdef const int32_t *ptab1 = &tab1[0] if tab1.shape[0] else NULL
    if filtering:
        if (n_passed is None or n_passed.shape[0] != nq or n_done is None
                or n_done.shape[0] != nq or (masks is not None and (
                    masks.shape[0] != nq or masks.shape[1] != 3))
                or (id_mode != 0 and id_set is None)
                or (seg_tags is not None and seg_tags.shape[0] != seg_ids.shape[0])):
            raise ValueError("scan_cells: a filter needs masks (nq, 3) and/or id_set, "
                             "n_passed and n_done (nq,), seg_tags per segment")
    if where and (W.shape[0] != nq or W.shape[1] != k or seg_vecs is None
                  or seg_vecs.shape[0] != seg_ids.shape[0] or vec_bytes <= 0):
        raise ValueError("scan_cells: W needs (nq, k) rows, seg_vecs per segment, vec_bytes")
    if M % 2 or Mh * Ds != Dh or P1.shape[1] != Dh:
        raise ValueError("scan_cells: inconsistent model shapes")
    if (off0 is None) != (off1 is None):
        raise ValueError("scan_cells: give both offsets or neither")
    if off0 is not None:
        if off0.shape[0] != P0.shape[0] or off1.shape[0] != P1.shape[0]:
            raise ValueError("scan_cells: one offset per row of P0 / P1")
        if off0.shape[0]:
            o0 = &off0[0]
        if off1.shape[0]:
            o1 = &off1[0]
    if code_bytes not in (1, 2) or (code_bytes == 1 and S > 256):
        raise ValueError("scan_cells: codes must be uint8 (S <= 256) or uint16")
    if packed and (S != 16 or code_bytes != 1 or M % 4):
        raise ValueError("scan_cells: packed codes need 16 codewords, M % 4 == 0 and "
                         "code_bytes 1")
    if packed:
        two_phase = not filtering and two_phase_first > 0    # where the path is AVX2
        cypq_adc4_plan_init(&plan, M // 2, two_phase)
        bounds = plan.path != 0
        two_phase = two_phase and plan.path == CYPQ_ADC4_AVX2
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
    sg.cell_slot = &cell_slot[0] if cell_slot.shape[0] else NULL
    sg.seg_start = &seg_start[0]
    sg.codes = &seg_codes[0] if seg_codes.shape[0] else NULL
    sg.ids = &seg_ids[0] if seg_ids.shape[0] else NULL
    sg.len = &seg_len[0] if seg_len.shape[0] else NULL
    sg.vecs = &seg_vecs[0] if where and seg_vecs.shape[0] else NULL
    sg.vec_bytes = vec_bytes
    sg.cbytes = cbytes
    sg.blocks = NULL
    if seg_blocks is not None and seg_blocks.shape[0]:
        if seg_blocks.shape[0] != seg_codes.shape[0] or not packed:
            raise ValueError("scan_cells: seg_blocks needs packed codes, one per segment")
        sg.blocks = &seg_blocks[0]
    if codebooks_init(&cb, &subs[0, 0, 0], M, S, Ds, True) != 0:
        codebooks_free(&cb)
        raise MemoryError()
    if off0 is not None:  # inner products: -2 <x, c> + 0 + 0 of rows x = R q / 2
        zero_norms = <float *> calloc(<Py_ssize_t> M * S, sizeof(float))
        if zero_norms == NULL:
            codebooks_free(&cb)
            raise MemoryError()
    with nogil:
        with parallel(num_threads=n_threads):
            buf = <float *> malloc(SCAN_BLOCK * sizeof(float))
            ibuf = <int32_t *> malloc(SCAN_BLOCK * sizeof(int32_t))
            tables = <float *> malloc((maxrows if maxrows > 0 else 1) * tsize * sizeof(float))
            top = topk_alloc(k, where)
            pend = <Pending *> malloc(sizeof(Pending))
            if pend != NULL:
                pend.n = 0
            flags = NULL
            filt = NULL
            if filtering:
                flags = <uint8_t *> malloc(SCAN_BLOCK)
                filt = <Filter *> malloc(sizeof(Filter))
            cell = NULL
            qtab = NULL
            bias = NULL
            if bounds:
                cell = <cypq_adc4_cell *> malloc(sizeof(cypq_adc4_cell))
                qtab = <uint8_t *> malloc((maxrows if maxrows > 0 else 1) * tsize)  # uint8 tables
                bias = <float *> malloc((maxrows if maxrows > 0 else 1) * sizeof(float))
            tp = NULL
            if two_phase:
                tp = <TwoPhase *> calloc(1, sizeof(TwoPhase))
            for q in prange(nq, schedule="dynamic"):
                if buf == NULL or ibuf == NULL or tables == NULL or top == NULL or (
                        pend == NULL) or (bounds and (
                        cell == NULL or qtab == NULL or bias == NULL)) or (filtering and (
                        flags == NULL or filt == NULL)) or (two_phase and tp == NULL):
                    fail[0] = 1
                    continue
                n0 = <int> (pstart0[q + 1] - pstart0[q])
                n1 = <int> (pstart1[q + 1] - pstart1[q])
                # the first cells' entries, which no cell before them fetches, come in while
                # the query's tables are made
                for t in range(cell_start[q] - AHEAD, cell_start[q]):
                    _prefetch_ahead(&sg, t, cell_start[q + 1], two_phase)
                if zero_norms == NULL:
                    _half_tables(p0 + pstart0[q] * Dh, n0, Dh, Mh, Ds, S, cb.CTm2, cb.cnorm,
                                 tables, NULL)
                    _half_tables(p1 + pstart1[q] * Dh, n1, Dh, Mh, Ds, S,
                                 cb.CTm2 + <Py_ssize_t> Mh * Ds * S, cb.cnorm + Mh * S,
                                 tables + n0 * tsize, NULL)
                else:
                    _half_tables(p0 + pstart0[q] * Dh, n0, Dh, Mh, Ds, S, cb.CTm2, zero_norms,
                                 tables, o0 + pstart0[q])
                    _half_tables(p1 + pstart1[q] * Dh, n1, Dh, Mh, Ds, S,
                                 cb.CTm2 + <Py_ssize_t> Mh * Ds * S, zero_norms,
                                 tables + n0 * tsize, o1 + pstart1[q])
                if bounds:
                    qdelta = cypq_quantize4(tables, n0 + n1, Mh, qtab, bias, &qslack)
                    cell.plan = &plan
                    cell.delta = qdelta
                    cell.slack = qslack
                topk_reset(top)
                scanned = 0
                passed = 0
                if filtering:
                    filt.any = masks[q, 0] if masks is not None else 0
                    filt.all = masks[q, 1] if masks is not None else 0
                    filt.none = masks[q, 2] if masks is not None else 0
                    filt.id_mode = id_mode
                    filt.n_ids = id_set.shape[0] if id_mode != 0 else 0
                    filt.ids = &id_set[0] if filt.n_ids > 0 else NULL
                    n_done[q] = cell_start[q + 1] - cell_start[q]
                t1 = cell_start[q + 1]
                if two_phase:
                    scanned = _scan_two_phase(&sg, tp, cell, tables, qtab, bias, n0, tsize,
                                              M // 2, cell_start[q], t1, ptab0, ptab1, top,
                                              pend, buf, ibuf)
                    if scanned == -1:
                        fail[0] = 1
                        continue
                    if scanned >= 0:
                        t1 = cell_start[q]     # (the cells are done)
                    else:
                        scanned = 0            # (too many for it: cell by cell below)
                for t in range(cell_start[q], t1):
                    _prefetch_ahead(&sg, t, t1)
                    sl = cell_slot[t]
                    T0 = tables + tab0[t] * tsize
                    T1 = tables + (n0 + tab1[t]) * tsize
                    if bounds:
                        cell.Q0 = qtab + tab0[t] * tsize
                        cell.Q1 = qtab + (n0 + tab1[t]) * tsize
                        cell.base = bias[tab0[t]] + bias[n0 + tab1[t]]
                    for g in range(seg_start[sl], seg_start[sl + 1]):
                        scanned = scanned + seg_len[g]
                        tg = NULL
                        if filtering and seg_tags is not None:
                            tg = <const char *> seg_tags[g]
                        if code_bytes == 1:
                            passed = passed + scan_topk(
                                T0, T1, M, S, packed, cell, <const uint8_t *> seg_codes[g],
                                seg_len[g], <const int64_t *> seg_ids[g], 0, top,
                                seg_vecs[g] if where else 0, vec_bytes, buf, ibuf, filt, tg,
                                flags, pend)
                        else:
                            passed = passed + scan_topk(
                                T0, T1, M, S, False, NULL, <const uint16_t *> seg_codes[g],
                                seg_len[g], <const int64_t *> seg_ids[g], 0, top,
                                seg_vecs[g] if where else 0, vec_bytes, buf, ibuf, filt, tg,
                                flags, pend)
                    if pend.n >= PEND_FLUSH:
                        pending_flush(pend, top)
                    if filtering and pass_quota > 0 and passed >= pass_quota:
                        n_done[q] = t + 1 - cell_start[q]
                        break
                pending_flush(pend, top)
                topk_finish(top, &D[q, 0], &I[q, 0], &W[q, 0] if where else NULL)
                n_scanned[q] = scanned
                if filtering:
                    n_passed[q] = passed
            free(buf)
            free(ibuf)
            topk_free(top)
            free(pend)
            free(tables)
            free(flags)
            free(filt)
            free(cell)
            free(qtab)
            free(bias)
            if tp != NULL:
                free(tp.lb)
                free(tp.hit)
                free(tp.rec)
                free(tp)
    codebooks_free(&cb)
    free(zero_norms)
    if failed:
        raise MemoryError()


def scans_blocks(int code_bytes):
    """Whether an unfiltered scan_cells of packed codes of ``code_bytes`` bytes reads its
    bounds from blocks (``seg_blocks``): the two-phase scan's (AVX2); elsewhere they would
    not be read."""
    cdef cypq_adc4_plan p
    if code_bytes <= 0:
        raise ValueError("scans_blocks: code_bytes must be positive")
    cypq_adc4_plan_init(&p, code_bytes, two_phase_first > 0)
    return p.path == CYPQ_ADC4_AVX2 and two_phase_first > 0


def code_blocks(const uintptr_t[::1] seg_codes, const int64_t[::1] seg_len,
                const uintptr_t[::1] seg_blocks, int code_bytes, int n_threads):
    """Each segment s with seg_blocks[s] != 0: its seg_len[s] codes of ``code_bytes`` bytes
    (packed 4-bit, at seg_codes[s]) written in blocks of 32 at seg_blocks[s], which needs
    ceil(len / 32) * 32 * code_bytes bytes: block b holds byte c of its row r at
    32 c + r, rows past the segment zero (fastscan.h ``cypq_adc4_blocks``)."""
    cdef Py_ssize_t s, n = seg_codes.shape[0]
    if seg_len.shape[0] != n or seg_blocks.shape[0] != n or code_bytes <= 0:
        raise ValueError("code_blocks: one length and block address per segment")
    for s in range(n):
        if seg_len[s] < 0 or (seg_blocks[s] != 0 and seg_len[s] > 0 and seg_codes[s] == 0):
            raise ValueError("code_blocks: a segment's codes are missing")
    with nogil:
        for s in prange(n, schedule="dynamic", num_threads=n_threads):
            if seg_blocks[s] != 0 and seg_len[s] > 0:
                cypq_adc4_blocks(<const uint8_t *> seg_codes[s], seg_len[s], code_bytes,
                                 <uint8_t *> seg_blocks[s])


def fast_scan(str limit="best"):
    """The 4-bit scan paths searches may take: "best" (the default: the best the CPU has,
    the two-phase scan where it can run, with AVX-512's sweeps and bounds loops and VBMI's
    bounds where the CPU has them, else AVX-512 VBMI or AVX2; fastscan.h
    cypq_adc4_plan_init), "avx2" (AVX2 at most) or "portable" (no in-register bounds); tests
    compare them. Returns the path an unfiltered search of 16-byte codes now takes: "vbmi",
    "avx2" or "portable"."""
    global cypq_fastscan_limit
    cdef cypq_adc4_plan p
    if limit not in ("best", "avx2", "portable"):
        raise ValueError("fast_scan: limit must be 'best', 'avx2' or 'portable'")
    cypq_fastscan_limit = ("best", "avx2", "portable").index(limit)
    cypq_adc4_plan_init(&p, 16, two_phase_first > 0)
    return ("portable", "avx2", "vbmi")[p.path]


def sort_network(bint enabled=True):
    """Let this module's top-k sorts take sortnet.h's AVX-512 network (the default; where the
    CPU has AVX-512) or not (their radix sort): tests compare them. Returns the setting before."""
    global cypq_sortnet_enabled
    before = bool(cypq_sortnet_enabled)
    cypq_sortnet_enabled = 1 if enabled else 0
    return before


def sortnet(uint32_t[::1] x, bint portable=False):
    """Sort x (distinct keys, at most 256) in place by sortnet.h's network, in AVX-512
    registers or (``portable``) in plain C, for tests; returns False (x untouched) where that
    path declines: no AVX-512, more than 256 keys, or sort_network(False)."""
    cdef int n = <int> x.shape[0]
    if x.shape[0] > CYPQ_SORTNET_MAX:
        return False
    if portable:
        return cypq_sortnet_u32_portable(&x[0] if n else NULL, n) != 0
    return cypq_sortnet_u32(&x[0] if n else NULL, n) != 0


def bound_quantile(const float[::1] lb, int64_t want):
    """cypq_bound_quantile of lb (the two-phase scan's guess at its first sweep's threshold),
    0 < want < len(lb), for tests; None where the CPU takes no two-phase scan (without AVX2
    the function is a stub)."""
    cdef cypq_adc4_plan p
    cdef int32_t hist[256]
    if not 0 < want < lb.shape[0]:
        raise ValueError("bound_quantile: 0 < want < len(lb)")
    cypq_adc4_plan_init(&p, 8, 1)
    if p.path != CYPQ_ADC4_AVX2:
        return None
    return cypq_bound_quantile(&lb[0], lb.shape[0], want, hist)


def select_entries(const uintptr_t[::1] seg_codes, const uintptr_t[::1] seg_ids,
                   const uintptr_t[::1] seg_tags, const int64_t[::1] seg_len,
                   int64_t code_bytes, const uint64_t[::1] mask, const int64_t[::1] id_set,
                   int id_mode, int64_t[::1] out_ids, uint8_t[:, ::1] out_codes,
                   int64_t[::1] out_seg):
    """Copy the entries of the segments that pass a filter; returns how many.

    Segments as scan_cells reads them (seg_tags None or 0: tags all zero); ``mask`` (3,)
    uint64 any-of (0: no condition), all-of, none-of; id_set / id_mode as scan_cells.
    Outputs (at least the segments' total length rows): out_ids int64, out_codes
    (rows, code_bytes) the stored code bytes, out_seg int64 the segment of each.
    """
    cdef Py_ssize_t ns = seg_len.shape[0], s
    cdef int64_t n = 0, i, total = 0, cnt, b0
    cdef Filter f
    cdef uint8_t *flags
    cdef const char *tg
    if seg_codes.shape[0] != ns or seg_ids.shape[0] != ns or (
            seg_tags is not None and seg_tags.shape[0] != ns) or mask.shape[0] != 3:
        raise ValueError("select_entries: one address per segment and a (3,) mask")
    if id_mode != 0 and id_set is None:
        raise ValueError("select_entries: an id filter needs id_set")
    for s in range(ns):
        if seg_len[s] < 0:
            raise ValueError("select_entries: a negative segment length")
        total += seg_len[s]
    if (out_ids.shape[0] < total or out_codes.shape[0] < total or out_seg.shape[0] < total
            or out_codes.shape[1] != code_bytes):
        raise ValueError("select_entries: outputs need a row per entry of code_bytes")
    f.any, f.all, f.none = mask[0], mask[1], mask[2]
    f.id_mode = id_mode
    f.n_ids = id_set.shape[0] if id_mode != 0 else 0
    f.ids = &id_set[0] if f.n_ids > 0 else NULL
    flags = <uint8_t *> malloc(SCAN_BLOCK)
    if flags == NULL:
        raise MemoryError()
    with nogil:
        for s in range(ns):
            tg = <const char *> seg_tags[s] if seg_tags is not None else NULL
            b0 = 0
            while b0 < seg_len[s]:
                cnt = seg_len[s] - b0
                if cnt > SCAN_BLOCK:
                    cnt = SCAN_BLOCK
                if pass_flags(&f, tg + b0 * 8 if tg != NULL else NULL,
                              <const int64_t *> seg_ids[s] + b0, 0, cnt, flags) != 0:
                    for i in range(cnt):
                        if flags[i]:
                            out_ids[n] = load_id(<const int64_t *> seg_ids[s], b0 + i)
                            memcpy(&out_codes[n, 0], <const char *> seg_codes[s]
                                   + (b0 + i) * code_bytes, code_bytes)
                            out_seg[n] = s
                            n += 1
                b0 += cnt
    free(flags)
    return n
