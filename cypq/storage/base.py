"""The interface every storage implements, and the segment list the search kernel reads."""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np


@dataclass
class Segments:
    """Where the entries of some cells are, for the search kernel.

    The entries of ``cells[j]`` are the segments ``start[j] : start[j+1]``; segment s holds
    ``length[s]`` entries whose fine codes (length, M) and int64 ids (length,) are at the
    addresses ``codes[s]`` and ``ids[s]``. The addresses are valid while the context that
    produced this object is open.
    """
    cells: np.ndarray    # (n,) int64, ascending
    start: np.ndarray    # (n + 1,) int64
    codes: np.ndarray    # (n_segments,) uintp
    ids: np.ndarray      # (n_segments,) uintp
    length: np.ndarray   # (n_segments,) int64


class Snapshot(ABC):
    """What a search reads, all from one committed state."""

    @abstractmethod
    def cell_sizes(self) -> np.ndarray:
        """(n_cells,) int64 entries per cell."""

    @abstractmethod
    def segments(self, cells: np.ndarray) -> Segments:
        """Segments of the ascending, distinct cells (valid while the snapshot is open)."""


class Storage(ABC):
    """Inverted lists of fine codes, keyed by cell id, with an id -> cell table."""

    n_cells: int
    code_width: int          # M
    code_dtype: np.dtype

    @abstractmethod
    def __len__(self) -> int:
        """Number of stored entries."""

    @abstractmethod
    def add(self, cells: np.ndarray, ids: np.ndarray | None, codes: np.ndarray,
            replace: bool = False) -> np.ndarray:
        """Store entries: cells (n,) int64, ids (n,) int64 unique (None: fresh ids after the
        largest so far), codes (n, M). Returns the ids.

        An id already stored is an error (KeyError, nothing stored) unless replace is true,
        in which case its old entry is removed first. All or nothing.
        """

    @abstractmethod
    def remove(self, ids: np.ndarray) -> int:
        """Remove the entries of these ids (absent ids are ignored); returns how many."""

    @abstractmethod
    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found (n,) bool, cells (n,) int64 (-1 if absent), codes (n, M))."""

    @abstractmethod
    def snapshot(self) -> AbstractContextManager["Snapshot"]:
        """A consistent read view for one search: sizes and segments of the same state."""

    def close(self) -> None:
        """Release resources."""
