"""The direct plan of a filtered search: the entries that pass the filter, all of them,
scored against the queries without walking cells.

A rare filter makes the walk visit many cells to find few passing entries; scoring just
those entries is then cheaper, and exact (every passing entry is a candidate). Each is
reconstructed once per search call (``C + mu + R^T s`` per half, in the model's space) and
the queries' distances to the reconstructions come from one matrix product: the same
quantity ADC sums from tables, since the local rotations are orthogonal (equal up to float
rounding).
"""
from __future__ import annotations

import numpy as np

from . import _quantize, _search
from ._threads import blas_threads

# Queries scored per matrix product (bounds the (queries, entries) score block).
_ROWS = 256


def passing_entries(snap, sizes: np.ndarray, filt, mask: np.ndarray, code_bytes: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (n,) int64, cells (n,) int64, stored codes (n, code_bytes) uint8) of every entry
    of the snapshot that passes ``filt`` with the tag masks ``mask`` (3,) uint64: an id
    list's entries looked up by id, else every stored entry checked in one pass."""
    if filt.id_mode == 1:
        found, cells, codes, tags = snap.lookup(filt.id_set)
        a, al, no = (np.uint64(m) for m in mask)
        keep = found & ((tags & a) != 0 if a else True) & ((tags & al) == al) & \
            ((tags & no) == 0)
        raw = np.ascontiguousarray(codes[keep]).view(np.uint8).reshape(int(keep.sum()), -1)
        return filt.id_set[keep], cells[keep], raw
    cells = np.flatnonzero(sizes).astype(np.int64)
    seg = snap.segments(cells)
    total = int(seg.length.sum())
    ids = np.empty(total, np.int64)
    codes = np.empty((total, code_bytes), np.uint8)
    where = np.empty(total, np.int64)
    id_set = filt.id_set if filt.id_set is not None else np.empty(0, np.int64)
    n = _search.select_entries(seg.codes, seg.ids, seg.tags, seg.length, code_bytes, mask,
                               id_set, filt.id_mode, ids, codes, where)
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
    padding; BLAS on n_threads. Returns D (nq, k) float32, I (nq, k) int64."""
    with blas_threads(n_threads):
        return _top_k(Q, X, ids, k, ip)


def _top_k(Q, X, ids, k, ip):
    nq, n = len(Q), len(X)
    D = np.full((nq, k), np.inf, dtype=np.float32)
    I = np.full((nq, k), -1, dtype=np.int64)
    kk = min(k, n)
    if not kk:
        return D, I
    xn = None if ip else np.einsum("ij,ij->i", X, X)
    for a in range(0, nq, _ROWS):
        q = Q[a:a + _ROWS]
        S = q @ X.T
        if ip:
            S = -S
        else:
            S *= -2
            S += xn
            S += np.einsum("ij,ij->i", q, q)[:, None]
        part = np.argpartition(S, kk - 1, axis=1)[:, :kk] if kk < n else \
            np.broadcast_to(np.arange(n), (len(q), n))
        s = np.take_along_axis(S, part, axis=1)
        order = np.lexsort((ids[part], s), axis=-1)
        D[a:a + len(q), :kk] = np.take_along_axis(s, order, axis=1)
        I[a:a + len(q), :kk] = ids[np.take_along_axis(part, order, axis=1)]
    return D, I
