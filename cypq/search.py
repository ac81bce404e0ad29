"""LOPQ search over any storage: multi-sequence cell order, then ADC over the cells' codes.

One code path for every storage: the kernels of cypq._search do the work with the GIL
released, queries in parallel; the storage only says where the cells' codes are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _lopq, _search
from .storage.base import Storage

# Queries per kernel call: bounds the (batch, quota) cell lists kept in memory.
_BATCH = 256
# Up to this many possible values, _distinct finds the distinct ones through a table over all
# of them (cells; (query, centroid) pairs of a batch).
_DENSE_CELLS = 1 << 22


@dataclass
class SearchStats:
    """Per query: non-empty cells scanned, cells visited (empty ones too), codes scanned."""
    cells: np.ndarray
    visited: np.ndarray
    scanned: np.ndarray


def search(model, storage: Storage, Q: np.ndarray, k: int, quota: int, w: int | None,
           n_threads: int, packed: bool = False, rerank=None
           ) -> tuple[np.ndarray, np.ndarray, SearchStats]:
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
        Visit cells until they hold at least this many entries (<= 0: no quota).
    w : int or None
        Visit at most this many cells (empty ones included).
    n_threads : int
    packed : bool
        The storage holds 4-bit codes two per byte (cypq.code_layout).
    rerank : cypq.stored_vectors.Reranker, optional
        Re-rank each batch's top k by ADC exactly with the stored vectors, read where the
        scan found the codes (in the same snapshot); D and I are then its top ``rerank.k``
        by exact score.

    Returns
    -------
    D : numpy.ndarray float32 (nq, k)
        Squared distances to the entries' reconstructions, ascending; inf where fewer than k.
        For a model with metric='ip': minus the inner products with the reconstructions
        (ascending: largest product first), and cells visited by inner product.
    I : numpy.ndarray int64 (nq, k)
        Ids; -1 where fewer than k.
    stats : SearchStats
    """
    nq = Q.shape[0]
    V = model.V
    cap = V * V
    if quota > 0:
        cap = min(cap, quota)
    if w:
        cap = min(cap, w)
    view = model.kernel_view()
    D = np.empty((nq, k), dtype=np.float32)
    I = np.empty((nq, k), dtype=np.int64)
    stats = SearchStats(np.zeros(nq, np.int64), np.zeros(nq, np.int64), np.zeros(nq, np.int64))
    batch = max(1, min(_BATCH, (1 << 22) // cap))  # cell lists of at most 32 MB
    out = None if rerank is None else (np.empty((nq, rerank.k), np.float32),
                                       np.empty((nq, rerank.k), np.int64))
    with storage.snapshot() as snap:
        sizes = snap.cell_sizes()
        for q0 in range(0, nq, batch):
            _search_batch(view, snap, sizes, Q, q0, min(nq, q0 + batch), k, quota, w, cap,
                          D, I, stats, n_threads, packed, rerank, out)
    return (D, I, stats) if out is None else (*out, stats)


def _search_batch(view, snap, sizes, Q, q0, q1, k, quota, w, cap, D, I, stats, n_threads,
                  packed, rerank, out):
    """Search queries q0:q1 (phase A, the snapshot's segments and local frames, phase C;
    then the re-ranking into ``out``)."""
    Qb = Q[q0:q1]
    nb = q1 - q0
    cells = np.empty((nb, cap), dtype=np.int64)
    n_cand = np.empty(nb, dtype=np.int64)
    n_cells = stats.cells[q0:q1]
    ip = view.Cmu is not None
    _search.cell_order(Qb, view.Cs[0], view.Cs[1], sizes, quota, w or 0, cells, n_cells,
                       stats.visited[q0:q1], n_cand, n_threads, ip)
    # From here on the visited cells are flat, query-major: query q's are
    # flat[cell_start[q]:cell_start[q + 1]].
    flat = cells[np.arange(cap)[None, :] < n_cells[:, None]]
    cell_start = np.zeros(nb + 1, dtype=np.int64)
    np.cumsum(n_cells, out=cell_start[1:])
    distinct, slot = _distinct(flat, len(sizes))
    seg = snap.segments(distinct)
    query_of = np.repeat(np.arange(nb), n_cells)
    P0, start0, tab0, off0 = _local_frames(view, 0, Qb, query_of, flat // view.V, n_threads)
    P1, start1, tab1, off1 = _local_frames(view, 1, Qb, query_of, flat % view.V, n_threads)
    W = vecs = None
    if rerank is not None:   # where each result's vector is (0: staged, read by id)
        W, vecs = np.empty((nb, D.shape[1]), dtype=np.uintp), seg.vectors
    _search.scan_cells(P0, P1, start0, start1, view.fine, cell_start, tab0, tab1, slot,
                       seg.start, seg.codes, seg.ids, seg.length,
                       1 if packed else view.code_dtype.itemsize,
                       D[q0:q1], I[q0:q1], stats.scanned[q0:q1], n_threads, off0, off1, packed,
                       vecs, rerank.vec_bytes if rerank is not None else 0, W)
    if rerank is not None:
        out[0][q0:q1], out[1][q0:q1] = rerank.batch(snap, q0, I[q0:q1], W)


def _distinct(values: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, position of each value in them) of int64 values in [0, size)."""
    if size <= _DENSE_CELLS:
        # Through a table over all values: linear, where np.unique sorts (it was ~10% of a
        # search at quota 4000).
        seen = np.zeros(size, dtype=bool)
        seen[values] = True
        distinct = np.flatnonzero(seen)
        where = np.empty(size, dtype=np.int64)
        where[distinct] = np.arange(len(distinct))
        return distinct, where[values]
    distinct = np.unique(values)
    return distinct, np.searchsorted(distinct, values)


def _local_frames(view, h, Qb, query_of, centroid, n_threads):
    """Half h of every query projected into the local frame of each centroid it visits.

    query_of, centroid (n,) int64: the query and half-h centroid of each visited cell.
    Returns P (m, Dh) float32, one row per distinct (query, centroid), query-major; start
    (nq + 1,) int64, query q's rows P[start[q]:start[q + 1]]; and tab (n,) int32, for each
    visited cell the row of its centroid among its query's rows. The rows are projected
    grouped by centroid, so each rotation is read once per batch, not once per query.
    For an inner-product view, P's rows are R[c] @ q_h / 2 instead, and off (m,) float32
    holds -<q_h, C[c] + mu[c]> per row (else off is None): see scan_cells.
    """
    nb, V = len(Qb), view.V
    Dh = Qb.shape[1] // 2
    keys, row = _distinct(query_of * V + centroid, nb * V)
    key_query = keys // V
    cent = keys % V
    P = np.empty((len(keys), Dh), dtype=np.float32)
    order, offsets = _lopq.group_rows(cent.astype(np.int32), V)
    # each row from its query's half in place (a query recurs in many rows)
    _lopq.project(Qb, h * Dh, view.Cs[h], view.Rs[h], view.RT[h], view.mus[h], order, offsets,
                  P, 0, False, n_threads, key_query)
    start = np.searchsorted(key_query, np.arange(nb + 1))
    off = None
    if view.Cmu is not None:
        P += view.RCmu[h][cent]
        P *= np.float32(0.5)
        off = -np.einsum("ij,ij->i", Qb[key_query, h * Dh:(h + 1) * Dh],
                         view.Cmu[h][cent]).astype(np.float32)
    return P, start, (row - start[query_of]).astype(np.int32), off
