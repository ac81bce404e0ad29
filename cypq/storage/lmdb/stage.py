"""The staging area of an LMDB index: the view of the staged entries that searches read.

An add writes its entries as one record (key: record number) instead of into the blocks of
up to one cell per entry, so a commit writes a few sequential pages however many cells the
batch spreads over, and no id-table rows (random ids would land on random pages). Records
are merged into the cells' blocks in bounded steps (writer.py): the *active* stage takes
adds; once full it is *frozen* and merged while a new active stage fills.

Searches read staged entries from a process-local copy sorted by cell: one segment per cell
and tier. Writers ask the same copy whether an id is staged (sorted ids, kept up to date
incrementally).
"""
from __future__ import annotations

import numpy as np

from .layout import cell_runs


def _in_sorted(s: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(n,) bool: which of ids (n,) are in the sorted array s."""
    if not len(s):
        return np.zeros(len(ids), dtype=bool)
    j = np.minimum(np.searchsorted(s, ids), len(s) - 1)
    return s[j] == ids


def _with_sorted(s: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The sorted array s with ids (any order) inserted in their places."""
    new = np.sort(ids)
    return np.insert(s, np.searchsorted(s, new), new)


class _Tier:
    """Entries sorted by cell (stably), with the ranges of the distinct cells."""

    __slots__ = ("cells", "ids", "codes", "tags", "ucells", "ustart", "_sids")

    def __init__(self, cells, ids, codes, tags, sids=None):
        self.cells, self.ids, self.codes, self.tags = cells, ids, codes, tags
        self.ustart = cell_runs(cells)
        self.ucells = cells[self.ustart[:-1]]
        self._sids = sids

    def sorted_ids(self) -> np.ndarray:
        """The ids, sorted (computed once; tiers made from this one keep it up to date)."""
        if self._sids is None:
            self._sids = np.sort(self.ids)
        return self._sids

    def holds(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool: which of ids (n,) int64 are in this tier."""
        return _in_sorted(self.sorted_ids(), ids)

    def __len__(self) -> int:
        return len(self.cells)

    def inserted(self, cells, ids, codes, tags, sids=None) -> "_Tier":
        """A tier with these entries (sorted by cell) after this tier's entries of their
        cells (``sids``: the new tier's sorted ids, when known)."""
        if not len(cells):
            return self
        at = np.searchsorted(self.cells, cells, side="right")
        if sids is None and self._sids is not None:
            sids = _with_sorted(self._sids, ids)
        return _Tier(np.insert(self.cells, at, cells), np.insert(self.ids, at, ids),
                     np.insert(self.codes, at, codes, axis=0), np.insert(self.tags, at, tags),
                     sids)

    def below_dropped(self, cell: int) -> "_Tier":
        start = int(np.searchsorted(self.cells, cell, side="left"))
        return self if not start else _Tier(self.cells[start:], self.ids[start:],
                                            self.codes[start:], self.tags[start:])

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
    """The staged entries of one part of the stage (records ``start .. next_seq-1``), sorted
    by cell (stably: in add order).

    Two tiers, so that taking in one more add costs about the size of the recent tier, not
    of the whole stage: ``recent`` (the latest adds) is folded into ``base`` when it grows
    past a sixteenth of it (about sqrt(stage x batch) for batches of a thousand into a
    stage of a million, which balances the two costs). The recent tier is sorted by cell
    only when asked for (a search); until then new records wait as they are, and only
    their ids are kept sorted (what a writer asks). Immutable: a newer state is a new view,
    so a search holding a view can read its arrays by address while other threads move on.

    Attributes
    ----------
    key : tuple
        (format 3 epoch, first record): the part's identity; records are never reused.
    next_seq : int
        Records ``start .. next_seq-1`` are in the view.
    merged_below : int
        Entries of cells below this are already merged into the blocks (a merge in
        progress): ``tiers`` leaves them out, ``all_tiers`` keeps them (their ids may have
        no id-table row yet).
    tiers, all_tiers : tuple of (base, recent)
        Each with ``cells``, ``ids`` (n,) int64, ``codes`` (n, M), ``tags`` (n,) uint64
        (zero in an index without tags), sorted by cell; the
        distinct cells ``ucells`` and their ranges ``ustart``. A cell's entries in base come
        before (are older than) its entries in recent.
    """

    __slots__ = ("key", "next_seq", "merged_below", "base", "_r", "_rsids", "_n_recent",
                 "_tiers")
    FOLD_MIN = 1 << 15

    def __init__(self, key, next_seq, merged_below, base: _Tier, recent: _Tier,
                 pending=(), rsids=None):
        self.key, self.next_seq, self.merged_below = key, next_seq, merged_below
        self.base = base
        self._r = (recent, tuple(pending))  # one attribute: threads swap it whole
        self._rsids = recent.sorted_ids() if rsids is None else rsids
        self._n_recent = len(recent) + sum(len(r[0]) for r in pending)
        self._tiers = None

    @classmethod
    def empty(cls, key, width: int, dtype) -> "StageView":
        tier = _Tier(np.empty(0, np.int64), np.empty(0, np.int64),
                     np.empty((0, width), dtype=dtype), np.empty(0, np.uint64),
                     np.empty(0, np.int64))
        return cls(key, key[1], 0, tier, tier)

    @property
    def recent(self) -> _Tier:
        """The recent tier, the waiting records sorted in (made once, when asked for)."""
        recent, pend = self._r
        if pend:
            rc = np.concatenate([r[0] for r in pend])
            order = np.argsort(rc, kind="stable")
            recent = recent.inserted(rc[order], np.concatenate([r[1] for r in pend])[order],
                                     np.concatenate([r[2] for r in pend])[order],
                                     np.concatenate([r[3] for r in pend])[order],
                                     self._rsids)
            self._r = (recent, ())
        return recent

    @property
    def all_tiers(self):
        return self.base, self.recent

    @property
    def tiers(self):
        if self._tiers is None:
            below = self.merged_below
            self._tiers = self.all_tiers if not below else tuple(
                t.below_dropped(below) for t in self.all_tiers)
        return self._tiers

    def __len__(self) -> int:
        if not self.merged_below:
            return len(self.base) + self._n_recent
        return sum(len(t) for t in self.tiers)

    def extended(self, next_seq: int, records) -> "StageView":
        """This view with ``records`` (list of (cells, ids, codes, tags), in record order)
        added."""
        recent, pend = self._r
        if not records:
            return StageView(self.key, next_seq, self.merged_below, self.base, recent, pend,
                             self._rsids)
        rsids = _with_sorted(self._rsids, np.concatenate([r[1] for r in records]))
        view = StageView(self.key, next_seq, self.merged_below, self.base, recent,
                         pend + tuple(records), rsids)
        if view._n_recent > max(self.FOLD_MIN, len(self.base) // 16):
            return view._folded_view()
        return view

    def _folded_view(self) -> "StageView":
        recent = self.recent
        if not len(recent):
            return self
        empty = _Tier(recent.cells[:0], recent.ids[:0], recent.codes[:0], recent.tags[:0],
                      recent.ids[:0])
        return StageView(self.key, self.next_seq, self.merged_below,
                         self.base.inserted(recent.cells, recent.ids, recent.codes,
                                            recent.tags), empty)

    def folded(self, merged_below: int) -> "StageView":
        """This view as a frozen part: one tier (``all_tiers[0]`` holds every entry) and
        the entries of cells below ``merged_below`` left out of ``tiers``."""
        view = self._folded_view()
        if merged_below == view.merged_below:
            return view
        return StageView(view.key, view.next_seq, merged_below, view.base, view.recent)

    def holds(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool: which of ids (n,) int64 the part's records hold (merged or not)."""
        return self.base.holds(ids) | _in_sorted(self._rsids, ids)


class Stage:
    """The stage of one committed state: the frozen part (being merged) and the active
    part (taking adds). A cell's frozen entries come before its active ones."""

    __slots__ = ("frozen", "active")

    def __init__(self, frozen: StageView, active: StageView):
        self.frozen, self.active = frozen, active

    @property
    def tiers(self) -> tuple:
        """Every tier, in order: the frozen part's, then the active part's base and recent."""
        return self.frozen.tiers + self.active.tiers

    @property
    def fixed_tiers(self) -> tuple:
        """The tiers but the active recent one (which changes with every add)."""
        return self.frozen.tiers + (self.active.base,)

    @classmethod
    def empty(cls, width: int, dtype) -> "Stage":
        view = StageView.empty((-1, 0), width, dtype)
        return cls(view, view)

    def __len__(self) -> int:
        """Entries staged and not yet in the blocks."""
        return len(self.frozen) + len(self.active)

    def add_counts(self, sizes: np.ndarray, tiers=None) -> np.ndarray:
        """Cell sizes (n_cells,) int64 plus the staged entries of ``tiers`` (default: all;
        a new array when any)."""
        for tier in self.tiers if tiers is None else tiers:
            sizes = tier.add_counts(sizes)
        return sizes

    def holds(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool: which of ids (n,) int64 are staged (or frozen and merged, possibly
        without an id-table row yet)."""
        return self.frozen.holds(ids) | self.active.holds(ids)

    def find(self, ids: np.ndarray):
        """Where staged ids (n,) int64 are: (part (n,) int8: 0 not staged, 1 frozen, 2
        active; cell (n,) int64; codes (n, M); tags (n,) uint64), from the parts' full
        tiers."""
        part = np.zeros(len(ids), dtype=np.int8)
        base0 = self.active.all_tiers[0]
        cells = np.full(len(ids), -1, dtype=np.int64)
        codes = np.zeros((len(ids), base0.codes.shape[1]), dtype=base0.codes.dtype)
        tags = np.zeros(len(ids), dtype=np.uint64)
        for p, view in ((1, self.frozen), (2, self.active)):
            for tier in view.all_tiers:
                want = tier.holds(ids) & (part == 0)
                if not want.any():
                    continue
                rows = np.flatnonzero(np.isin(tier.ids, ids[want]))
                at = {x: r for r, x in zip(rows.tolist(), tier.ids[rows].tolist())}
                for j in np.flatnonzero(want).tolist():
                    r = at[int(ids[j])]
                    part[j], cells[j], codes[j] = p, tier.cells[r], tier.codes[r]
                    tags[j] = tier.tags[r]
        return part, cells, codes, tags
