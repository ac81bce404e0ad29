"""The staging area of an LMDB index: the record format and the view searches read.

An add writes its entries as one record (key: record number) instead of into the blocks of
up to one cell per entry, so a commit writes a few sequential pages however many cells the
batch spreads over. Records are merged into the cells' blocks in large batches (lmdb.py).
Searches read staged entries from a process-local copy sorted by cell: one segment per cell.
"""
from __future__ import annotations

import numpy as np


def pack_record(cells: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> bytes:
    """A stage record: u32 n, u32 pad, n cells (<i8), n ids (<i8), n codes (n, M)."""
    n = len(cells)
    return (n.to_bytes(4, "little") + b"\0\0\0\0" + cells.astype("<i8").tobytes()
            + ids.astype("<i8").tobytes() + np.ascontiguousarray(codes).tobytes())


def unpack_record(value, width: int, dtype: np.dtype):
    """(cells (n,) int64, ids (n,) int64, codes (n, width)) copies of a stage record."""
    raw = bytes(value)
    n = int.from_bytes(raw[:4], "little")
    cells = np.frombuffer(raw, dtype="<i8", count=n, offset=8).astype(np.int64)
    ids = np.frombuffer(raw, dtype="<i8", count=n, offset=8 + 8 * n).astype(np.int64)
    codes = np.frombuffer(raw, dtype=dtype, count=n * width,
                          offset=8 + 16 * n).reshape(n, width).copy()
    return cells, ids, codes


class StageView:
    """The staged entries of one committed state, sorted by cell (stably: in add order).

    Immutable: a newer state is a new view, so a search holding a view can read its arrays
    by address while other threads move on.

    Attributes
    ----------
    epoch : int
        Bumped by every completed merge (the records are then gone).
    next_seq : int
        Records ``0 .. next_seq-1`` of this epoch are in the view.
    merged_below : int
        Entries of cells below this are already merged into the blocks (a merge in
        progress); they are left out.
    cells, ids : numpy.ndarray int64 (n,)
    codes : numpy.ndarray (n, M)
    ucells : numpy.ndarray int64 (u,)
        The distinct cells, ascending; ``ustart`` (u + 1,) their ranges in the arrays.
    """

    __slots__ = ("epoch", "next_seq", "merged_below", "cells", "ids", "codes", "ucells",
                 "ustart")

    def __init__(self, epoch, next_seq, merged_below, cells, ids, codes):
        self.epoch, self.next_seq, self.merged_below = epoch, next_seq, merged_below
        start = int(np.searchsorted(cells, merged_below, side="left"))
        self.cells, self.ids, self.codes = cells[start:], ids[start:], codes[start:]
        n = len(self.cells)
        if n:
            first = np.flatnonzero(np.r_[True, self.cells[1:] != self.cells[:-1]])
        else:
            first = np.empty(0, np.int64)
        self.ucells = self.cells[first]
        self.ustart = np.append(first, n).astype(np.int64)

    @classmethod
    def empty(cls, epoch: int, width: int, dtype) -> "StageView":
        return cls(epoch, 0, 0, np.empty(0, np.int64), np.empty(0, np.int64),
                   np.empty((0, width), dtype=dtype))

    def __len__(self) -> int:
        return len(self.cells)

    def extended(self, next_seq: int, merged_below: int, records) -> "StageView":
        """This view with ``records`` (list of (cells, ids, codes), in record order) added
        and the entries of cells below ``merged_below`` dropped."""
        cells, ids, codes = self.cells, self.ids, self.codes
        if records:
            rc = np.concatenate([r[0] for r in records])
            order = np.argsort(rc, kind="stable")
            rc = rc[order]
            ri = np.concatenate([r[1] for r in records])[order]
            rx = np.concatenate([r[2] for r in records])[order]
            # after every staged entry of the same cell: the cell keeps add order
            at = np.searchsorted(cells, rc, side="right")
            cells, ids = np.insert(cells, at, rc), np.insert(ids, at, ri)
            codes = np.insert(codes, at, rx, axis=0)
        return StageView(self.epoch, next_seq, merged_below, cells, ids, codes)

    def add_counts(self, sizes: np.ndarray) -> np.ndarray:
        """Cell sizes (n_cells,) int64 plus the staged entries (a new array when any)."""
        if not len(self.cells):
            return sizes
        out = sizes.copy()
        out[self.ucells] += np.diff(self.ustart)
        return out

    def locate(self, cells: np.ndarray):
        """For ascending cells (n,): (has (n,) bool, start (n,), count (n,)) of their staged
        entries in this view's arrays."""
        if not len(self.ucells):
            zero = np.zeros(len(cells), dtype=np.int64)
            return zero.astype(bool), zero, zero
        j = np.minimum(np.searchsorted(self.ucells, cells), len(self.ucells) - 1)
        has = self.ucells[j] == cells
        start = self.ustart[j]
        return has, start, np.where(has, self.ustart[j + 1] - start, 0)
