"""The staging area of an LMDB index: the view of the staged entries that searches read.

An add writes its entries as one record (key: record number) instead of into the blocks of
up to one cell per entry, so a commit writes a few sequential pages however many cells the
batch spreads over. Records are merged into the cells' blocks in large batches (writer.py).
Searches read staged entries from a process-local copy sorted by cell: one segment per cell.
"""
from __future__ import annotations

import numpy as np

from .layout import cell_runs


class _Tier:
    """Entries sorted by cell (stably), with the ranges of the distinct cells."""

    __slots__ = ("cells", "ids", "codes", "ucells", "ustart")

    def __init__(self, cells, ids, codes):
        self.cells, self.ids, self.codes = cells, ids, codes
        self.ustart = cell_runs(cells)
        self.ucells = cells[self.ustart[:-1]]

    def __len__(self) -> int:
        return len(self.cells)

    def inserted(self, cells, ids, codes) -> "_Tier":
        """A tier with these entries (sorted by cell) after this tier's entries of their
        cells."""
        if not len(cells):
            return self
        at = np.searchsorted(self.cells, cells, side="right")
        return _Tier(np.insert(self.cells, at, cells), np.insert(self.ids, at, ids),
                     np.insert(self.codes, at, codes, axis=0))

    def below_dropped(self, cell: int) -> "_Tier":
        start = int(np.searchsorted(self.cells, cell, side="left"))
        return self if not start else _Tier(self.cells[start:], self.ids[start:],
                                            self.codes[start:])

    def add_counts(self, sizes: np.ndarray) -> np.ndarray:
        if not len(self.cells):
            return sizes
        out = sizes.copy()
        out[self.ucells] += np.diff(self.ustart)
        return out

    def locate(self, cells: np.ndarray):
        if not len(self.ucells):
            zero = np.zeros(len(cells), dtype=np.int64)
            return zero.astype(bool), zero, zero
        j = np.minimum(np.searchsorted(self.ucells, cells), len(self.ucells) - 1)
        has = self.ucells[j] == cells
        start = self.ustart[j]
        return has, start, np.where(has, self.ustart[j + 1] - start, 0)


class StageView:
    """The staged entries of one committed state, sorted by cell (stably: in add order).

    Two tiers, so that taking in one more add costs about the size of the recent tier, not
    of the whole stage: ``recent`` (the latest adds) is folded into ``base`` when it grows
    past a quarter of it. Immutable: a newer state is a new view, so a search holding a view
    can read its arrays by address while other threads move on.

    Attributes
    ----------
    epoch : int
        Bumped by every completed merge (the records are then gone).
    next_seq : int
        Records ``0 .. next_seq-1`` of this epoch are in the view.
    merged_below : int
        Entries of cells below this are already merged into the blocks (a merge in
        progress); they are left out.
    tiers : tuple of (base, recent)
        Each with ``cells``, ``ids`` (n,) int64, ``codes`` (n, M), sorted by cell; the
        distinct cells ``ucells`` and their ranges ``ustart``. A cell's entries in base come
        before (are older than) its entries in recent.
    """

    __slots__ = ("epoch", "next_seq", "merged_below", "tiers")
    FOLD_MIN = 1 << 16

    def __init__(self, epoch, next_seq, merged_below, base: _Tier, recent: _Tier):
        self.epoch, self.next_seq, self.merged_below = epoch, next_seq, merged_below
        self.tiers = (base, recent)

    @classmethod
    def empty(cls, epoch: int, width: int, dtype) -> "StageView":
        tier = _Tier(np.empty(0, np.int64), np.empty(0, np.int64),
                     np.empty((0, width), dtype=dtype))
        return cls(epoch, 0, 0, tier, tier)

    def __len__(self) -> int:
        return len(self.tiers[0]) + len(self.tiers[1])

    def extended(self, next_seq: int, merged_below: int, records) -> "StageView":
        """This view with ``records`` (list of (cells, ids, codes), in record order) added
        and the entries of cells below ``merged_below`` dropped."""
        base, recent = self.tiers
        if records:
            rc = np.concatenate([r[0] for r in records])
            order = np.argsort(rc, kind="stable")
            recent = recent.inserted(rc[order], np.concatenate([r[1] for r in records])[order],
                                     np.concatenate([r[2] for r in records])[order])
            if len(recent) > max(self.FOLD_MIN, len(base) // 4):
                base = base.inserted(recent.cells, recent.ids, recent.codes)
                recent = _Tier(recent.cells[:0], recent.ids[:0], recent.codes[:0])
        if merged_below != self.merged_below:
            base, recent = base.below_dropped(merged_below), recent.below_dropped(merged_below)
        return StageView(self.epoch, next_seq, merged_below, base, recent)

    def add_counts(self, sizes: np.ndarray) -> np.ndarray:
        """Cell sizes (n_cells,) int64 plus the staged entries (a new array when any)."""
        base, recent = self.tiers
        return recent.add_counts(base.add_counts(sizes))

    def entries(self):
        """(cells, ids, codes) of every staged entry, sorted by cell, each cell's in add
        order."""
        base, recent = self.tiers
        t = base.inserted(recent.cells, recent.ids, recent.codes)
        return t.cells, t.ids, t.codes
