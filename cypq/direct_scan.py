"""The direct plan of a filtered search: the entries that pass the filter, scored against
the queries by reconstruction instead of per-cell tables.

A selective filter makes the table scan visit many cells, building tables for every
centroid they touch, to find few passing entries. Here each passing entry is reconstructed
(``C + mu + R^T s`` per half, in the model's space; once per committed state: the caller,
cypq.search, keeps them between calls): a query's
distance to a reconstruction is the quantity ADC sums from tables, since the local
rotations are orthogonal (equal up to float rounding). Then either every passing entry is
scored, or, with a quota below their number, the cells are walked in
multi-sequence order over the passing entries' counts until they hold ``quota`` of them,
as the table scan does, and those cells' entries are scored: the same candidates, far
cheaper per cell.
"""
from __future__ import annotations

import mmap

import numpy as np

from . import _quantize, _rerank, _search
from .storage.base import Segments, row_addresses

_L2, _IP = 0, 1   # rerank.h's score kinds

# Array size from which NumPy advises huge pages on Linux (see list_buffer).
HUGE_FROM = 4 << 20


def passing_entries(snap, sizes: np.ndarray, filt, mask: np.ndarray, code_bytes: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (n,) int64, cells (n,) int64, stored codes (n, code_bytes) uint8) of every entry
    of the snapshot that passes ``filt`` with the tag masks ``mask`` (3,) uint64: an id
    list's entries looked up by id, else every stored entry checked in one pass."""
    if filt.id_mode == 1:   # by id: each found entry a segment of one, for the same check
        found, cells, codes, tags = snap.lookup(filt.id_set)
        order = np.argsort(cells[found], kind="stable")    # by cell, as the pass gives them
        cells = cells[found][order]
        held = [np.ascontiguousarray(a[found][order]) for a in (filt.id_set, codes, tags)]
        seg = Segments(cells, np.arange(len(cells) + 1), row_addresses(held[1]),
                       row_addresses(held[0]), np.ones(len(cells), np.int64), None,
                       row_addresses(held[2]))     # ``held`` keeps the rows alive
        id_set = np.empty(0, np.int64)
        mode = 0
    else:
        seg = snap.segments(np.flatnonzero(sizes).astype(np.int64))
        id_set = filt.id_set if filt.id_set is not None else np.empty(0, np.int64)
        mode = filt.id_mode
    total = int(seg.length.sum())
    ids = np.empty(total, np.int64)
    codes = np.empty((total, code_bytes), np.uint8)
    where = np.empty(total, np.int64)
    n = _search.select_entries(seg.codes, seg.ids, seg.tags, seg.length, code_bytes, mask,
                               id_set, mode, ids, codes, where)
    seg_cell = np.repeat(seg.cells, np.diff(seg.start))
    return ids[:n], seg_cell[where[:n]], codes[:n]


def reconstructions(view, cells: np.ndarray, fine: np.ndarray, n_threads: int) -> np.ndarray:
    """(n, model_dim) float32 reconstructions in the model's space of entries of ``cells``
    (n,) with fine codes (n, M)."""
    sub = np.empty((len(fine), view.Cs[0].shape[1] * 2), dtype=np.float32)
    if not len(fine):
        return sub
    _quantize.decode(np.ascontiguousarray(fine), view.fine, sub, n_threads)
    coarse = np.stack([cells // view.V, cells % view.V], axis=1).astype(np.int32)
    return view.project(sub, coarse, n_threads, inverse=True)


def top_k(Q: np.ndarray, X: np.ndarray, ids: np.ndarray, k: int, ip: bool, n_threads: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """The k best of entries X (n, d) with ids (n,) for queries Q (nq, d), as the scan ranks
    them: ascending squared distance (``ip``: minus the inner product), ties by id; inf / -1
    padding. Each score is made on its own in a fixed order (rerank.h, as
    :func:`walked_top_k` scores its rows), so it does not depend on the other entries: a
    shard set's shards score their entries as the whole index does (a matrix product's
    blocking, and so its rounding, changes with the number of entries). Returns D (nq, k)
    float32, I (nq, k) int64."""
    nq = len(Q)
    D = np.empty((nq, k), dtype=np.float32)
    I = np.empty((nq, k), dtype=np.int64)
    every = np.zeros((nq, 1), np.int64)   # each query lists the one cell of all entries
    _rerank.cell_rows_topk(np.ascontiguousarray(Q, dtype=np.float32), X,
                           np.ascontiguousarray(ids, dtype=np.int64),
                           np.array([0, len(X)], np.int64), every, np.ones(nq, np.int64),
                           _IP if ip else _L2, D, I, np.empty(nq, np.int64), n_threads)
    return D, I


def list_shape(n_cells: int, quota: int, w) -> tuple[int, int]:
    """(cells per query's list, queries per kernel call) of a walk over ``n_cells`` until
    ``quota`` entries (<= 0: no quota) or ``w`` cells (None: no cap): a list needs at most
    min(quota, w) cells (each listed cell holds an entry), and a call's lists stay within
    32 MB. A call takes 256 queries, up to 1024 while their lists stay within 256k cells:
    short searches share a call's fixed costs (each visited rotation transposed, the Python
    between the kernels) among more queries (MANMINILM, quota 250: 0.86x the time)."""
    cap = max(1, min(n_cells, quota if quota > 0 else n_cells, w or n_cells))
    return cap, max(1, min(1024, max(256, (1 << 18) // cap), (1 << 22) // cap))


def list_buffer(nb: int, cap: int, room=None) -> np.ndarray:
    """Room (nb, cap) int64 for nb cell lists of up to cap cells, of which a walk fills only
    each row's start. Large ones are an anonymous mapping of their own (:func:`mapped_array`):
    NumPy asks the kernel for huge pages from 4 MB on, and a 2 MB page is made resident (and
    zeroed) whole as soon as one row's first cells touch it, so the untouched rest of every
    row would be paid for (33 MB zeroed per batch of REALSIFT1M's quota 25000, for 1 MB of
    lists). ``room`` (a search's temporaries, ``empty(name, shape, dtype, mapped)``): the
    batches of one search reuse one buffer, so a mapping's pages are faulted in and zeroed
    once, not per batch (page faults were 7% of a REALSIFT1M 4-bit search at quota 8000)."""
    large = nb * cap * 8 >= HUGE_FROM
    if room is not None:
        return room.empty("cells", (nb, cap), np.int64, mapped=large)
    return mapped_array((nb, cap), np.int64) if large else np.empty((nb, cap), np.int64)


def mapped_array(shape: tuple, dtype) -> np.ndarray:
    """An array of zeros in an anonymous mapping of its own (no huge pages: see list_buffer;
    unmapped when the array goes)."""
    n = max(1, int(np.prod(shape)))
    return np.frombuffer(mmap.mmap(-1, n * np.dtype(dtype).itemsize), dtype)[:n].reshape(shape)


def cell_grid(cells: np.ndarray, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """(sizes (n_cells,) int64, start (n_cells + 1,) int64) of entries sorted by their cells
    (n,): how many each cell holds, and where its rows begin."""
    sizes = np.bincount(cells, minlength=n_cells).astype(np.int64)
    start = np.zeros(n_cells + 1, np.int64)
    np.cumsum(sizes, out=start[1:])
    return sizes, start


def walked_top_k(view, Q: np.ndarray, X: np.ndarray, ids: np.ndarray, grid, k: int,
                 quota: int, w, n_threads: int):
    """The k best of each query among the entries (X (n, d) reconstructions, ids (n,),
    sorted by cell; ``grid`` their :func:`cell_grid`) of the cells it visits in
    multi-sequence order until they hold ``quota`` of them (or ``w`` cells were visited),
    ranked as :func:`top_k`.

    Returns D (nq, k) float32, I (nq, k) int64, and per query the cells listed, the cells
    visited and the entries scored ((nq,) int64 each)."""
    nq, n_cells = len(Q), view.V * view.V
    sizes, start = grid
    cap, batch = list_shape(n_cells, quota, w)
    D = np.empty((nq, k), np.float32)
    I = np.empty((nq, k), np.int64)
    listed, visited, scored = (np.zeros(nq, np.int64) for _ in range(3))
    kind = _IP if view.Cmu is not None else _L2
    for a in range(0, nq, batch):
        Qb = np.ascontiguousarray(Q[a:a + batch])
        nb = len(Qb)
        lists = list_buffer(nb, cap)
        _search.cell_order(Qb, view.Cs[0], view.Cs[1], sizes, quota, w or 0, lists,
                           listed[a:a + nb], visited[a:a + nb], np.empty(nb, np.int64),
                           n_threads, view.Cmu is not None)
        _rerank.cell_rows_topk(Qb, X, ids, start, lists, listed[a:a + nb], kind,
                               D[a:a + nb], I[a:a + nb], scored[a:a + nb], n_threads)
    return D, I, listed, visited, scored
