"""LOPQ search over any storage: multi-sequence cell order, then ADC over the cells' codes.

One code path for every storage: the kernels of cypq._search do the work with the GIL
released, queries in parallel; the storage only says where the cells' codes are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _search
from .storage.base import Storage

# Queries per kernel call: bounds the (batch, quota) cell lists kept in memory.
_BATCH = 256
# Up to this many cells, distinct cells are found through a table over all cells.
_DENSE_CELLS = 1 << 22


@dataclass
class SearchStats:
    """Per query: non-empty cells scanned, cells visited (empty ones too), codes scanned."""
    cells: np.ndarray
    visited: np.ndarray
    scanned: np.ndarray


def search(model, storage: Storage, Q: np.ndarray, k: int, quota: int, w: int | None,
           n_threads: int) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """Top-k by LOPQ asymmetric distance over whole cells in multi-sequence order.

    Parameters
    ----------
    model : cypq.LOPQModel
        Trained.
    storage : Storage
    Q : numpy.ndarray float32 (nq, model_dim)
        Queries already in the model's space (after its PCA).
    k : int
    quota : int
        Visit cells until they hold at least this many entries (<= 0: no quota).
    w : int or None
        Visit at most this many cells (empty ones included).
    n_threads : int

    Returns
    -------
    D : numpy.ndarray float32 (nq, k)
        Squared distances to the entries' reconstructions, ascending; inf where fewer than k.
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
    C0, C1 = model.Cs
    RT0, RT1 = model._rotations_transposed()
    mu0, mu1 = model.mus
    subs = model._fine_stack()
    code_bytes = np.dtype(model.fine_code_dtype).itemsize
    D = np.empty((nq, k), dtype=np.float32)
    I = np.empty((nq, k), dtype=np.int64)
    stats = SearchStats(np.zeros(nq, np.int64), np.zeros(nq, np.int64), np.zeros(nq, np.int64))
    batch = max(1, min(_BATCH, (1 << 22) // cap))  # cell lists of at most 32 MB
    with storage.snapshot() as snap:
        sizes = snap.cell_sizes()
        for q0 in range(0, nq, batch):
            _search_batch(model, snap, sizes, Q, q0, min(nq, q0 + batch), k, quota, w, cap,
                          (C0, C1, RT0, RT1, mu0, mu1, subs, code_bytes), D, I, stats, n_threads)
    return D, I, stats


def _search_batch(model, snap, sizes, Q, q0, q1, k, quota, w, cap, params, D, I, stats,
                  n_threads):
    """Search queries q0:q1 (phase A, the snapshot's segments, phase C)."""
    C0, C1, RT0, RT1, mu0, mu1, subs, code_bytes = params
    Qb = Q[q0:q1]
    cells = np.empty((q1 - q0, cap), dtype=np.int64)
    n_cand = np.empty(q1 - q0, dtype=np.int64)
    _search.cell_order(Qb, C0, C1, sizes, quota, w or 0, cells, stats.cells[q0:q1],
                       stats.visited[q0:q1], n_cand, n_threads)
    used = np.arange(cap)[None, :] < stats.cells[q0:q1, None]
    flat = cells[used]
    slot = np.full(cells.shape, -1, dtype=np.int64)
    if len(sizes) <= _DENSE_CELLS:
        # Distinct cells and their positions through a table over all cells: linear, where
        # np.unique sorts (it was ~10% of a search at quota 4000).
        seen = np.zeros(len(sizes), dtype=bool)
        seen[flat] = True
        distinct = np.flatnonzero(seen)
        where = np.empty(len(sizes), dtype=np.int64)
        where[distinct] = np.arange(len(distinct))
        slot[used] = where[flat]
    else:
        distinct = np.unique(flat)
        slot[used] = np.searchsorted(distinct, flat)
    seg = snap.segments(distinct)
    _search.scan_cells(Qb, C0, C1, RT0, RT1, mu0, mu1, subs, cells, stats.cells[q0:q1], slot,
                       seg.start, seg.codes, seg.ids, seg.length, code_bytes, D[q0:q1],
                       I[q0:q1], stats.scanned[q0:q1], n_threads)
