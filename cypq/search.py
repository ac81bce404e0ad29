"""LOPQ search over any storage: multi-sequence cell order, then ADC over the cells' codes.

One code path for every storage: the kernels of cypq._search do the work with the GIL
released, queries in parallel; the storage only says where the cells' codes are.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from . import _lopq, _search
from .direct_scan import (cell_grid, list_buffer, list_shape, mapped_array, passing_entries,
                          reconstructions, top_k, walked_top_k)
from ._heap import release_free_memory
from .filters import pass_rates
from .scan_blocks import code_blocks
from .storage.base import Storage

# The planner's cost model (plan 'auto'), in nanoseconds on one core, measured on REALSIFT1M
# (V=1024, M=16): the table scan costs WALK_NS per entry its cells hold; the direct plan,
# per call, SELECT_NS per stored entry (finding the passing ones) and RECON_NS per
# multiply-add reconstructing them (about D * D / 2 each), then per query either SCORE_NS
# per dimension of every passing entry scored, or CELL_NS per cell its walk over the
# passing entries visits (the grid of their cells is sparse) and ROW_NS per dimension of
# each candidate scored (the same scoring kernel: two names, so that tests can make
# either plan dear).
WALK_NS = 150.0
SCORE_NS = 0.15
RECON_NS = 0.12
SELECT_NS = 3.0
CELL_NS = 40.0
ROW_NS = 0.15
# Reconstructions the direct plan keeps between calls (per index): at most this many filters,
# each at most this many bytes.
CACHE_ENTRIES = 4
CACHE_BYTES = 1 << 28
RECUR = 64   # queries a filter asked before is expected to serve (see _reuse)
_CACHE_LOCK = threading.Lock()
# Up to this many possible cells, _distinct finds a batch's distinct ones through a bitmap over
# all of them (size / 8 bytes), beyond through np.unique.
_DENSE_CELLS = 1 << 24
# Heap a batch's temporaries take per listed cell (the lists, each cell's slot and frame
# rows, the local frames, the segments; measured: glibc kept 250 bytes per listed cell after
# a 200-query call re-ranking 50 at quota 10000 on REALSIFT1M (45k cells, one batch), 220
# after 100 queries at quota 25000: the 160 assumed before left such calls' 11-14 MB held).
TEMP_BYTES_PER_CELL = 250


@dataclass
class SearchStats:
    """Per query: non-empty cells scanned, cells visited (empty ones too), codes scanned,
    and whether a filtered search took the direct plan."""
    cells: np.ndarray
    visited: np.ndarray
    scanned: np.ndarray
    direct: np.ndarray = None

    def __post_init__(self):
        if self.direct is None:
            self.direct = np.zeros(len(self.cells), bool)


def search(model, storage: Storage, Q: np.ndarray, k: int, quota: int, w: int | None,
           n_threads: int, packed: bool = False, rerank=None, filt=None, unpack=None,
           cache: dict | None = None) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """Top-k by LOPQ asymmetric distance over whole cells in multi-sequence order.

    Parameters
    ----------
    model : cypq.LOPQModel
        Trained (its kernel view is what the kernels read).
    storage : Storage
    Q : numpy.ndarray float32 (nq, model_dim)
        Queries already in the model's space (after its PCA).
    k : int
    quota : int
        Visit cells until they hold at least this many entries (<= 0: no quota); with a
        filter, this many entries that pass it.
    w : int or None
        Visit at most this many cells (empty ones included).
    n_threads : int
    packed : bool
        The storage holds 4-bit codes two per byte (cypq.code_layout).
    rerank : cypq.stored_vectors.Reranker, optional
        Re-rank each batch's top k by ADC exactly with the stored vectors, read where the
        scan found the codes (in the same snapshot); D and I are then its top ``rerank.k``
        by exact score.
    filt : cypq.filters.Filter, optional
        Only entries that pass it are candidates (see :func:`filtered`).
    unpack : callable, optional
        Stored codes (n, width) -> fine codes (n, M): needed by a filter's direct plan.
    cache : dict, optional
        Where the direct plan keeps the passing entries' reconstructions between calls
        (owned by the caller, one per storage), reused while the storage's generation and
        the filter are the same.

    Returns
    -------
    D : numpy.ndarray float32 (nq, k)
        Squared distances to the entries' reconstructions, ascending; inf where fewer than k.
        For a model with metric='ip': minus the inner products with the reconstructions
        (ascending: largest product first), and cells visited by inner product.
    I : numpy.ndarray int64 (nq, k)
        Ids; -1 where fewer than k.
    stats : SearchStats
        With a filter: ``cells`` counts the cells scanned (by the direct plan: the cells
        holding passing entries it walked, 0 when it scored every passing entry),
        ``visited`` the cells the last walk visited, ``scanned`` the entries scored.
    """
    nq = Q.shape[0]
    view = model.kernel_view()
    D = np.empty((nq, k), dtype=np.float32)
    I = np.empty((nq, k), dtype=np.int64)
    stats = SearchStats(np.zeros(nq, np.int64), np.zeros(nq, np.int64), np.zeros(nq, np.int64))
    out = None if rerank is None else (np.empty((nq, rerank.k), np.float32),
                                       np.empty((nq, rerank.k), np.int64))
    run = _Run(view, Q, k, w, n_threads, packed, rerank, D, I, stats, out, cache,
               room=_Room())
    counts = storage.tag_counts() if filt is not None and filt.masks is not None else None
    with storage.snapshot() as snap:
        run.snap, run.sizes = snap, snap.cell_sizes()
        if filt is None:
            run.walk(np.arange(nq), quota)
        else:
            filtered(run, quota, filt, unpack, counts)
    run.room = None   # (its buffers freed, so that the trim below can return them)
    release_free_memory(run.temp_bytes)
    return (D, I, stats) if out is None else (*out, stats)


class _Room:
    """Temporaries that the batches of one search call reuse: a batch's new arrays were
    pages the kernel mapped and zeroed anew (glibc hands freed blocks back), 5% of a 4-bit
    MANMINILM search at quota 1000. Each name's buffer only grows; an array it gives out
    is valid until the next ``empty`` of that name."""

    def __init__(self):
        self._held = {}

    def empty(self, name: str, shape: tuple, dtype, mapped: bool = False) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype`` in the buffer ``name`` (with
        ``mapped``, one in an anonymous mapping of its own: see list_buffer)."""
        n = int(np.prod(shape))
        buf = self._held.get((name, mapped))
        if buf is None or buf.size < n or buf.dtype != dtype:
            buf = self._held[name, mapped] = mapped_array((max(n, 1),), dtype) if mapped \
                else np.empty(max(n, 1), dtype)
        return buf[:n].reshape(shape)


def _empty(room: _Room | None, name: str, shape: tuple, dtype) -> np.ndarray:
    """room.empty(name, shape, dtype), or a new array without a room."""
    return np.empty(shape, dtype) if room is None else room.empty(name, shape, dtype)


@dataclass
class _Run:
    """One search call: its inputs, outputs and snapshot, for the walks of its queries."""
    view: object
    Q: np.ndarray
    k: int
    w: int | None
    n_threads: int
    packed: bool
    rerank: object
    D: np.ndarray
    I: np.ndarray
    stats: SearchStats
    out: object
    cache: dict | None = None
    snap: object = None
    sizes: np.ndarray = None
    temp_bytes: int = 0   # the largest batch's temporaries
    room: _Room = None    # the batches' temporaries, reused from batch to batch

    def walk(self, rows: np.ndarray, quota: int, filt=None, need: int = 0):
        """Search the queries ``rows`` (ascending) visiting cells until they hold ``quota``
        entries; with ``filt``, only passing entries are candidates and a query stops after
        the cell where ``need`` (> 0) of them passed. Returns the passing counts (len(rows),)
        (None without a filter)."""
        V = self.view.V
        cap, batch = list_shape(V * V, quota, self.w)
        passed = None if filt is None else np.zeros(len(rows), np.int64)
        for b0 in range(0, len(rows), batch):
            r = rows[b0:b0 + batch]
            n = _search_batch(self, r, quota, cap, filt, need)
            if passed is not None:
                passed[b0:b0 + len(r)] = n
        return passed


def _search_batch(run: _Run, r: np.ndarray, quota, cap, filt, need):
    """Search the queries ``r`` (phase A, :func:`cell_lists`; then :func:`scan_lists`; then
    the re-ranking into ``run.out``); returns the passing counts with a filter."""
    view, snap, stats, k = run.view, run.snap, run.stats, run.k
    contiguous = len(r) and r[-1] - r[0] == len(r) - 1
    sl = slice(int(r[0]), int(r[-1]) + 1) if contiguous else r
    Qb = run.Q[sl]
    flat, n_cells, visited = cell_lists(view, Qb, run.sizes, quota, run.w, cap, run.n_threads,
                                        filt is not None, run.room)
    run.temp_bytes = max(run.temp_bytes, len(flat) * TEMP_BYTES_PER_CELL)
    extra = {}
    if filt is not None:
        passed, done = np.empty(len(r), np.int64), np.empty(len(r), np.int64)
        extra = dict(masks=None if filt.masks is None else filt.masks[sl],
                     id_set=filt.id_set, id_mode=filt.id_mode, pass_quota=need,
                     n_passed=passed, n_done=done)
    D, I, scanned, W = scan_lists(view, snap, Qb, flat, n_cells, k, run.n_threads, run.packed,
                                  run.rerank, extra, run.room)
    run.D[sl], run.I[sl] = D, I
    stats.scanned[sl], stats.visited[sl] = scanned, visited
    stats.cells[sl] = n_cells if filt is None else done
    if run.rerank is not None:
        run.out[0][sl], run.out[1][sl] = run.rerank.batch(snap, r, I, W)
    return None if filt is None else passed


def cell_lists(view, Qb: np.ndarray, sizes: np.ndarray, quota: int, w, cap: int,
               n_threads: int, ordered: bool = False, room: _Room | None = None) -> tuple:
    """Each query's non-empty cells in multi-sequence order until they hold ``quota``
    entries (or ``w`` cells were visited), at most ``cap`` per query.

    Parameters
    ----------
    view : the model's kernel view
    Qb : numpy.ndarray float32 (nb, model_dim)
    sizes : numpy.ndarray int64 (V * V,)
        Entries per cell (of the whole index: a shard set's, summed).
    room : _Room, optional
        Where the temporaries come from (the lists are valid until its next use).

    Returns
    -------
    flat : numpy.ndarray int64 (n,)
        The cells, query-major: query q's are ``flat[start[q]:start[q + 1]]`` with ``start``
        the cumulative ``n_cells``; each query's ascending by cell id (with ``ordered``: in
        multi-sequence order).
    n_cells, visited : numpy.ndarray int64 (nb,)
        Non-empty cells listed, and cells visited empty ones included, per query.
    """
    nb = len(Qb)
    cells = list_buffer(nb, cap, room)
    n_cand, n_cells, visited = (np.empty(nb, dtype=np.int64) for _ in range(3))
    _search.cell_order(Qb, view.Cs[0], view.Cs[1], sizes, quota, w or 0, cells, n_cells,
                       visited, n_cand, n_threads, view.Cmu is not None, ordered)
    flat = _empty(room, "flat", int(n_cells.sum()), np.int64)
    _search.flatten_lists(cells, n_cells, flat)
    return flat, n_cells, visited


def scan_lists(view, snap, Qb: np.ndarray, flat: np.ndarray, n_cells: np.ndarray, k: int,
               n_threads: int, packed: bool, rerank=None, extra: dict | None = None,
               room: _Room | None = None) -> tuple:
    """ADC top-k of each query over the entries of its listed cells in one snapshot.

    Parameters
    ----------
    view : the model's kernel view
    snap : cypq.storage.base.Snapshot
    Qb : numpy.ndarray float32 (nb, model_dim)
    flat, n_cells : numpy.ndarray int64
        The cells to scan, query-major, and how many per query (as :func:`cell_lists`
        returns them; a subset of each query's list is fine, e.g. a shard's).
    k, n_threads, packed, rerank : see :func:`search`
    extra : dict, optional
        A filter's arguments of ``scan_cells``.
    room : _Room, optional
        Where the temporaries and the results come from (valid until its next use).

    Returns
    -------
    D (nb, k) float32, I (nb, k) int64 ascending by (distance, id); scanned (nb,) int64
    entries scored; W (nb, k) uintp where each result's stored vector is (0: read it by id),
    None without ``rerank``.
    """
    nb = len(Qb)
    cell_start = np.zeros(nb + 1, dtype=np.int64)
    np.cumsum(n_cells, out=cell_start[1:])
    distinct, slot = _distinct(flat, view.V * view.V)
    seg = snap.segments(distinct)
    P0, start0, tab0, off0 = _local_frames(view, 0, Qb, flat, n_cells, n_threads, room)
    P1, start1, tab1, off1 = _local_frames(view, 1, Qb, flat, n_cells, n_threads, room)
    W = vecs = None
    if rerank is not None:   # where each result's vector is (0: staged, read by id)
        W, vecs = np.empty((nb, k), dtype=np.uintp), seg.vectors
    D = _empty(room, "D", (nb, k), np.float32)
    I = _empty(room, "I", (nb, k), np.int64)
    scanned = np.empty(nb, dtype=np.int64)
    extra = dict(extra or {})
    if extra:
        extra["seg_tags"] = seg.tags
    elif packed:   # (``held`` keeps the blocks alive for the scan)
        extra["seg_blocks"], held = code_blocks(seg, slot, view.fine.shape[0] // 2, n_threads,
                                                room)
    _search.scan_cells(P0, P1, start0, start1, view.fine, cell_start, tab0, tab1, slot,
                       seg.start, seg.codes, seg.ids, seg.length,
                       1 if packed else view.code_dtype.itemsize, D, I, scanned,
                       n_threads, off0, off1, packed, vecs,
                       rerank.vec_bytes if rerank is not None else 0, W, **extra)
    return D, I, scanned, W


def metric_distances(D: np.ndarray, I: np.ndarray, metric: str, exact: bool = False
                     ) -> np.ndarray:
    """The kernels' distances (smaller first) as a search returns them, faiss's convention
    for each metric: l2 squared distances; cosine similarities and inner products, larger
    first, -inf where a query has fewer results (``exact``: re-ranked scores, minus the
    similarity for cosine and ip)."""
    if metric == "l2":
        return D
    if metric == "cosine" and not exact:
        # unit vectors: |q - x|^2 = 2 - 2 cos(q, x); the order stays (largest first)
        return np.where(I >= 0, np.float32(1) - D * np.float32(0.5), -np.inf).astype(np.float32)
    return np.where(I >= 0, -D, -np.inf).astype(np.float32)   # ranked by minus the score


def merge_top_k(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of partial top-k lists side by side, D, I (nq, m): ranked as the scan's
    top-k ranks them (distance, then id; -1 ids last), so merging the top-k of disjoint
    parts gives the top-k of the whole, ties included."""
    key = np.where(I < 0, np.iinfo(np.int64).max, I)
    order = np.lexsort((key, D), axis=-1)[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


def filtered(run: _Run, quota: int, filt, unpack, counts=None) -> None:
    """A filtered search of every query of ``run`` (quota: passing entries to gather).

    Walk plan: cells in multi-sequence order, only passing entries are candidates, and a
    query stops after the cell in which ``quota`` of them passed, so a selective filter
    visits more cells instead of returning fewer results. The walk lists cells up to a
    quota of all entries of ``quota`` / the expected pass rate (:func:`pass_rates`: from
    the index's per-bit tag ``counts`` and the id list's share, at most the highest of the
    batch's queries); queries whose listed cells held too few passing entries walk again
    with the rate the round measured (at least twice as far), until they have enough or
    every cell was listed. Direct plan (:mod:`cypq.direct_scan`): the passing entries
    reconstructed, and all of them scored, or those of the cells a walk over the passing
    entries' counts lists (the same cells as the walk plan's). Plan 'auto' picks the
    cheapest by :func:`_direct_is_cheaper`, from the expected pass rate, and again from the
    rate the first walk measured.
    """
    nq, total = len(run.Q), int(run.sizes.sum())
    rows = np.arange(nq)
    rate = float(pass_rates(filt, counts, total).max())
    if filt.id_mode == 1:   # at most the list's length pass
        rate = min(rate, len(filt.id_set) / max(total, 1))
    masks = filt.masks if filt.masks is not None else np.zeros((nq, 3), np.uint64)
    share = _reuse(run, filt, np.unique(masks, axis=0), nq)
    if filt.plan == "direct" or (filt.plan == "auto" and _direct_is_cheaper(
            run, quota, rate, total, share)):
        return _direct(run, rows, filt, unpack, quota)
    walk = _walk_quota(quota, rate, total)
    while len(rows):
        passed = run.walk(rows, walk, filt, max(quota, 0))
        if walk <= 0:      # every cell was listed: nothing more to find
            return
        short = passed < quota
        if run.w:
            short &= run.stats.visited[rows] < run.w
        scanned = int(run.stats.scanned[rows].sum())
        rate = max(int(passed.sum()), 1) / max(scanned, 1)
        rows = rows[short]
        if not len(rows):
            return
        if filt.plan == "auto" and _direct_is_cheaper(run, quota, rate, total,
                                                      max(share, len(rows))):
            return _direct(run, rows, filt, unpack, quota)
        nxt = _walk_quota(quota, rate, total)
        walk = 0 if nxt <= 0 else max(2 * walk, nxt)
        if walk >= total:
            walk = 0


def _reuse(run: _Run, filt, masks: np.ndarray, nq: int) -> float:
    """Over how many queries the direct plan's per-call work (finding and reconstructing the
    passing entries) is expected to be shared: inf when the cache holds it for every mask,
    else the call's nq, or more for a filter asked before in this state (it recurs: its
    reconstructions, once cached, serve the calls to come; :data:`RECUR` per earlier ask)."""
    keys = [_cache_key(run, filt, m) for m in masks]
    if keys and all(k is not None and k in run.cache for k in keys):
        return np.inf
    seen = run.cache.setdefault("asked", {}) if run.cache is not None else {}
    earlier = min((seen.get(k, 0) for k in keys if k is not None), default=0)
    with _CACHE_LOCK:
        for k in keys:
            if k is not None:
                if any(old[0] != k[0] for old in seen):
                    seen.clear()   # another state: what was asked before does not count
                seen[k] = seen.get(k, 0) + 1
    return max(nq, RECUR * earlier)


def _direct_is_cheaper(run: _Run, quota: int, rate: float, total: int,
                       share: float) -> bool:
    """Whether scoring the passing entries (``rate`` of ``total``) directly is expected to
    cost less than walking cells until ``quota`` of them passed, its per-call work shared by
    ``share`` queries (see :data:`WALK_NS`)."""
    dim = 2 * run.view.Cs[0].shape[1]
    passing = rate * total
    walk = min(quota / max(rate, 1e-12) if quota > 0 else total, total) * WALK_NS
    per_call = total * SELECT_NS + passing * dim * dim / 2 * RECON_NS
    return min(_direct_costs(run, quota, passing)) + per_call / max(share, 1) < walk


def _direct_costs(run: _Run, quota: int, passing: float) -> tuple[float, float]:
    """Per query, the direct plan's cost (ns) of scoring every passing entry, and of
    walking cells over them until ``quota`` (inf where it cannot: no quota below them)."""
    dim, n_cells = 2 * run.view.Cs[0].shape[1], run.view.V ** 2
    every = passing * dim * SCORE_NS
    if not 0 < quota < passing:
        return every, np.inf
    return every, quota * n_cells / passing * CELL_NS + quota * dim * ROW_NS


def _cache_key(run: _Run, filt, mask: np.ndarray):
    """The direct plan's cache key of a filter with tag masks ``mask`` (3,) in run's
    snapshot (None: no cache, or a storage that cannot name its state)."""
    gen = run.snap.generation
    if run.cache is None or gen is None:
        return None
    return (gen, mask.tobytes(), filt.id_mode,
            None if filt.id_set is None else filt.id_set.tobytes())


def _walk_quota(quota: int, rate: float, total: int) -> int:
    """Entries to list cells for, to find ``quota`` passing at ``rate`` (0: every cell)."""
    if quota <= 0:
        return 0
    want = int(np.ceil(quota / max(rate, 1e-12) * 1.1))
    return 0 if want >= total else want


def _direct(run: _Run, rows: np.ndarray, filt, unpack, quota: int) -> None:
    """The direct plan for the queries ``rows``: per distinct tag mask, the passing entries
    reconstructed once and scored against its queries (all of them, or those of the cells
    a walk over them lists, :mod:`cypq.direct_scan`)."""
    view, stats = run.view, run.stats
    masks = filt.masks if filt.masks is not None else np.zeros((len(run.Q), 3), np.uint64)
    M = view.fine.shape[0]
    width = M // 2 if run.packed else M * view.code_dtype.itemsize   # stored bytes a code
    uniq, inv = np.unique(masks[rows], axis=0, return_inverse=True)
    for u in range(len(uniq)):
        r = rows[inv.ravel() == u]
        key = _cache_key(run, filt, uniq[u])
        hit = None if key is None else run.cache.get(key)
        if hit is not None:
            ids, grid, X = hit
        else:
            ids, cells, raw = passing_entries(run.snap, run.sizes, filt, uniq[u], width)
            stored = raw if run.packed else raw.view(view.code_dtype)
            X = reconstructions(view, cells, unpack(stored), run.n_threads)
            grid = cell_grid(cells, len(run.sizes))
            if key is not None and X.nbytes <= CACHE_BYTES:
                with _CACHE_LOCK:   # searching threads share the index's cache
                    held = [c for c in run.cache if isinstance(c, tuple)]
                    for old in [c for c in held if c[0] != key[0]]:
                        del run.cache[old]          # of other states: stale
                    for old in held[:max(0, len(held) - CACHE_ENTRIES + 1)]:
                        run.cache.pop(old, None)    # the oldest
                    run.cache[key] = (ids, grid, X)
        every, walked = _direct_costs(run, quota, len(ids))
        if run.w or walked < every:
            D, I, stats.cells[r], stats.visited[r], stats.scanned[r] = walked_top_k(
                view, run.Q[r], X, ids, grid, run.D.shape[1], quota, run.w, run.n_threads)
        else:
            D, I = top_k(run.Q[r], X, ids, run.D.shape[1], view.Cmu is not None,
                         run.n_threads)
            stats.cells[r], stats.visited[r], stats.scanned[r] = 0, 0, len(ids)
        run.D[r], run.I[r] = D, I
        stats.direct[r] = True
        if run.rerank is not None:   # every vector read by id (no addresses: W = 0)
            run.out[0][r], run.out[1][r] = run.rerank.batch(
                run.snap, r, I, np.zeros(I.shape, np.uintp))


def _distinct(values: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, position of each value in them) of int64 values in [0, size)."""
    if size <= _DENSE_CELLS:
        distinct = np.empty(min(len(values), size), dtype=np.int64)
        slot = np.empty(len(values), dtype=np.int64)
        return distinct[:_search.distinct_cells(values, size, distinct, slot)], slot
    distinct = np.unique(values)
    return distinct, np.searchsorted(distinct, values)


def _local_frames(view, h, Qb, flat, n_cells, n_threads, room=None):
    """Half h of every query projected into the local frame of each centroid it visits.

    flat, n_cells: the listed cells, query-major, and how many per query (see cell_lists).
    Returns P (m, Dh) float32, one row per distinct (query, centroid), query-major; start
    (nq + 1,) int64, query q's rows P[start[q]:start[q + 1]]; and tab (n,) int32, for each
    listed cell the row of its centroid among its query's rows. The rows are projected
    grouped by centroid, so each rotation is read once per batch, not once per query.
    For an inner-product view, P's rows are R[c] @ q_h / 2 instead, and off (m,) float32
    holds -<q_h, C[c] + mu[c]> per row (else off is None): see scan_cells. ``room``: a
    _Room for the temporaries.
    """
    nb, n = len(Qb), len(flat)
    Dh = Qb.shape[1] // 2
    cent, key_query = _empty(room, f"cent{h}", n, np.int32), _empty(room, f"key{h}", n, np.int64)
    start, tab = np.empty(nb + 1, np.int64), _empty(room, f"tab{h}", n, np.int32)
    m = _search.frame_rows(flat, n_cells, view.V, h, cent, key_query, start, tab)
    cent, key_query = cent[:m], key_query[:m]
    P = _empty(room, f"P{h}", (m, Dh), np.float32)
    order, offsets = _lopq.group_rows(cent, view.V)
    # each row from its query's half in place (a query recurs in many rows)
    _lopq.project(Qb, h * Dh, view.Cs[h], view.Rs[h], view.mus[h], order, offsets,
                  P, 0, False, n_threads, key_query, None if view.RT is None else view.RT[h])
    off = None
    if view.Cmu is not None:
        P += view.RCmu[h][cent]
        P *= np.float32(0.5)
        off = -np.einsum("ij,ij->i", Qb[key_query, h * Dh:(h + 1) * Dh],
                         view.Cmu[h][cent]).astype(np.float32)
    return P, start, tab, off
