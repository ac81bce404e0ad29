"""Entries held in arrays sorted by cell, read-only: a snapshot of what one part of a corpus
holds (e.g. a file of Parquet codes that a Spark task scans), made without the per-entry
bookkeeping of a writable storage."""
from __future__ import annotations

from contextlib import AbstractContextManager

import numpy as np

from .base import Segments, Snapshot, row_addresses


class FrozenCells(Snapshot, AbstractContextManager):
    """A read-only snapshot over arrays of entries (it is its own context).

    Parameters
    ----------
    n_cells : int
    cells : numpy.ndarray int64 (n,)
        Each entry's cell, in [0, n_cells).
    ids : numpy.ndarray int64 (n,)
    codes : numpy.ndarray (n, code_width)
        As the search kernel reads them (the index's stored code layout).

    The entries are sorted by (cell, id) once; a cell's entries are then scanned in id order.
    """

    def __init__(self, n_cells: int, cells: np.ndarray, ids: np.ndarray, codes: np.ndarray):
        cells = np.asarray(cells, dtype=np.int64)
        if len(cells) and (cells.min() < 0 or cells.max() >= n_cells):
            raise ValueError(f"cell ids must be in [0, {n_cells}): the codes were made by "
                             "another model")
        ids = np.asarray(ids, dtype=np.int64)
        if len(cells) > 1 and not np.all((cells[1:] > cells[:-1]) | (
                (cells[1:] == cells[:-1]) & (ids[1:] > ids[:-1]))):   # not yet in order
            order = np.lexsort((ids, cells))
            cells, ids, codes = cells[order], ids[order], codes[order]
        self._cells = cells
        self._ids = np.ascontiguousarray(ids)
        self._codes = np.ascontiguousarray(codes)
        self._sizes = np.bincount(self._cells, minlength=n_cells).astype(np.int64)
        self._first = np.zeros(n_cells + 1, dtype=np.int64)
        np.cumsum(self._sizes, out=self._first[1:])
        self._codes_at = row_addresses(self._codes) if len(cells) else np.zeros(0, np.uintp)
        self._ids_at = row_addresses(self._ids) if len(cells) else np.zeros(0, np.uintp)

    def __exit__(self, *exc) -> None:
        return None

    def cell_sizes(self) -> np.ndarray:
        return self._sizes

    def segments(self, cells: np.ndarray) -> Segments:
        cells = np.asarray(cells, dtype=np.int64)
        first, length = self._first[cells], self._sizes[cells]
        at = np.minimum(first, max(len(self._ids) - 1, 0))   # an empty cell's: never read
        none = np.zeros(len(cells), np.uintp)
        return Segments(cells, np.arange(len(cells) + 1, dtype=np.int64),
                        self._codes_at[at] if len(self._ids) else none,
                        self._ids_at[at] if len(self._ids) else none, length)

    def entries(self, lo: int, hi: int, vectors: bool = False, tags: bool = False) -> tuple:
        a, b = self._first[lo], self._first[hi]
        return self._cells[a:b].copy(), self._ids[a:b].copy(), self._codes[a:b].copy()

    def lookup(self, ids: np.ndarray) -> tuple:
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(self._ids, kind="stable")
        pos = np.searchsorted(self._ids[order], ids)
        pos = np.minimum(pos, max(len(order) - 1, 0))
        found = (self._ids[order][pos] == ids) if len(order) else np.zeros(len(ids), bool)
        row = order[pos] if len(order) else pos
        cells = np.where(found, self._cells[row] if len(order) else -1, -1)
        codes = np.zeros((len(ids), self._codes.shape[1]), self._codes.dtype)
        codes[found] = self._codes[row[found]]
        return found, cells, codes, np.zeros(len(ids), np.uint64)
