"""The storage interface: everything the index and the edges use of a storage, and its rules.

A storage keeps inverted lists: for each cell id in ``[0, n_cells)``, entries of (int64 id,
fine code of ``code_width`` values of ``code_dtype``), and an id -> cell table. It knows
nothing of models or of how codes are made; it keeps opaque named metadata (bytes) for the
layer above (the index stores its model there).

Concurrency contract (what callers may rely on):

- One storage object may be shared by the threads of a process. Any number of threads may
  search (``snapshot``, ``cell_sizes``, ``lookup``, ``tags``, ``tag_counts``, ``len``,
  ``stats``, ``meta``) while one writes; write calls (``add``, ``remove``, ``set_tags``,
  ``merge``, bulk writing) are serialised by the storage, never interleaved.
- A snapshot is one committed state: its sizes and segments agree with each other and with
  no later write. Segment addresses stay valid until the snapshot's context exits; nothing
  may be kept past that.
- Every write call is all or nothing: after an exception (or, on disk, a crash) the
  storage holds either the whole call's effect or none of it. A merge or bulk load runs in
  steps that are each all or nothing and are resumed by the next write (merge) or the same
  command (bulk load).
- On disk (LMDB) many processes may open the same storage: any number of readers and one
  writer at a time (the others wait). A reader's next snapshot sees every write committed
  before it started. In memory, writes and snapshots wait for each other.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


class IndexFormatError(ValueError):
    """The directory is not a cypq index, or one this version cannot read."""


class IndexCorruptError(IndexFormatError):
    """Stored data is damaged: a value or record does not parse as its layout says."""


# The storage features this cypq's layers understand (see Storage.features); the names are
# defined here so that the storage can check them, their meaning by the layer that asks.
PACKED4 = "codes4"      # the index's 4-bit codes are two per byte (cypq.code_layout)
VECTORS = "vectors"     # every entry keeps a vector beside its code (Storage.vectors)
TAGS = "tags"           # every entry keeps a uint64 tag set beside its id (Storage.keeps_tags)
SQ8 = "sq8"             # the kept vectors are 8-bit scalar-quantised (the index's meta[sq8])
KNOWN_FEATURES = frozenset({PACKED4, VECTORS, TAGS, SQ8})


def check_features(features, where: str) -> frozenset:
    """features as a frozenset; IndexFormatError naming any this cypq does not know."""
    out = frozenset(str(f) for f in features)
    unknown = sorted(out - KNOWN_FEATURES)
    if unknown:
        raise IndexFormatError(f"{where} uses {', '.join(unknown)}, which this cypq does "
                               "not know: it was made by a newer cypq; upgrade cypq")
    return out


@dataclass
class Segments:
    """Where the entries of some cells are, for the search kernel.

    The entries of ``cells[j]`` are the segments ``start[j] : start[j+1]``; segment s holds
    ``length[s]`` entries whose fine codes (length, M) and int64 ids (length,) are at the
    addresses ``codes[s]`` and ``ids[s]``, and, in a storage that keeps vectors, their
    vectors (length, vector_width) at ``vectors[s]`` (0: not addressable, e.g. staged
    entries; read them by id, :meth:`Snapshot.vectors`), and, in a storage that keeps tags,
    their uint64 tag sets (length,) at ``tags[s]``. The addresses are valid while the
    context that produced this object is open.
    """
    cells: np.ndarray    # (n,) int64, ascending
    start: np.ndarray    # (n + 1,) int64
    codes: np.ndarray    # (n_segments,) uintp
    ids: np.ndarray      # (n_segments,) uintp
    length: np.ndarray   # (n_segments,) int64
    vectors: Optional[np.ndarray] = None   # (n_segments,) uintp, or None: no vectors kept
    tags: Optional[np.ndarray] = None      # (n_segments,) uintp, or None: no tags kept


class Snapshot(ABC):
    """What a search reads, all from one committed state.

    Attributes
    ----------
    generation : int or None
        Names the committed state: every write makes a new one, so two snapshots of one
        storage with the same generation hold the same entries (None: not known; then
        nothing derived from a snapshot may be reused by a later one).
    """

    generation: Optional[int] = None

    @abstractmethod
    def cell_sizes(self) -> np.ndarray:
        """(n_cells,) int64 entries per cell (read-only; do not modify)."""

    @abstractmethod
    def segments(self, cells: np.ndarray) -> Segments:
        """Segments of the ascending, distinct cells (valid while the snapshot is open)."""

    @abstractmethod
    def entries(self, lo: int, hi: int, vectors: bool = False, tags: bool = False) -> tuple:
        """Copies of the entries of cells lo .. hi-1: (cells (n,) int64 ascending, ids (n,)
        int64, codes (n, M)), then with ``vectors`` (in a storage that keeps them) their
        vectors (n, vector_width), then with ``tags`` (in one that keeps them) their tag
        sets (n,) uint64; each cell's in the order a search scans them."""

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found (n,) bool, rows (n, vector_width) of vector_dtype, zero where not found)
        of ids (n,) int64 in this snapshot's state (see :meth:`Storage.vectors`)."""
        raise ValueError("this storage keeps no vectors")

    @abstractmethod
    def lookup(self, ids: np.ndarray) -> tuple:
        """(found (n,) bool, cells (n,) int64 (-1 if absent), codes (n, M), tags (n,)
        uint64 (zero where absent or not kept)) of ids (n,) int64 in this snapshot's
        state."""


class BulkWriter(ABC):
    """Writes the entries of a storage created for a bulk load, in cell order, resumably.

    The caller owns a ``state`` (bytes) that each step commits together with its data, so
    after an interruption :attr:`state` says exactly what is stored.
    """

    @property
    @abstractmethod
    def state(self) -> Optional[bytes]:
        """The caller's state committed by the last step (or given at creation)."""

    @abstractmethod
    def append(self, cells: np.ndarray, ids: np.ndarray, codes: np.ndarray,
               state: bytes, vectors: Optional[np.ndarray] = None,
               tags: Optional[np.ndarray] = None) -> None:
        """Store entries whose cells all come after every cell stored so far, in one step.

        Parameters
        ----------
        cells : numpy.ndarray int64 (n,)
            Ascending.
        ids : numpy.ndarray int64 (n,)
        codes : numpy.ndarray (n, code_width) of code_dtype
        state : bytes
            Committed with these entries.
        vectors : numpy.ndarray (n, vector_width) of vector_dtype
            The entries' vectors: required exactly when the storage keeps vectors.
        tags : numpy.ndarray uint64 (n,)
            The entries' tag sets, in a storage that keeps tags (None: all zero).
        """

    @abstractmethod
    def finish(self, state: bytes, progress: Optional[Callable[[int], None]] = None) -> None:
        """Complete the load (the id table, in steps each committing ``state``), then mark
        the storage complete. ``progress(n)`` is called with the ids written by each step.

        Raises
        ------
        KeyError
            An id occurs more than once (nothing of the id table is kept).
        """


class Storage(ABC):
    """Inverted lists of fine codes, keyed by cell id, with an id -> cell table.

    Attributes
    ----------
    n_cells : int
    code_width : int
        Stored code values per entry.
    code_dtype : numpy.dtype
    features : frozenset of str
        What the layer above asked, at creation, that every reader understand (e.g.
        ``codes4``: its codes are packed); a storage naming a feature this cypq does not
        know is refused when opened (IndexFormatError), never misread.
    vector_width : int
        Values of the vector each entry keeps beside its code (0: none; feature
        ``vectors``), stored in the same write as the entry and removed with it.
    vector_dtype : numpy.dtype or None
    keeps_tags : bool
        Each entry keeps a uint64 tag set (64 boolean labels; feature ``tags``), stored in
        the same write as the entry, changed by :meth:`set_tags`.
    """

    n_cells: int
    code_width: int
    code_dtype: np.dtype
    features: frozenset = frozenset()
    vector_width: int = 0
    vector_dtype: Optional[np.dtype] = None
    keeps_tags: bool = False

    @abstractmethod
    def __len__(self) -> int:
        """Number of stored entries."""

    @abstractmethod
    def add(self, cells: np.ndarray, ids: Optional[np.ndarray], codes: np.ndarray,
            replace: bool = False, vectors: Optional[np.ndarray] = None,
            tags: Optional[np.ndarray] = None) -> np.ndarray:
        """Store entries: cells (n,) int64, ids (n,) int64 unique (None: fresh ids after the
        largest so far, :func:`fresh_ids`), codes (n, M), and, when the storage keeps
        vectors, vectors (n, vector_width) of vector_dtype (:func:`check_vectors`), and
        when it keeps tags, their tag sets (n,) uint64 (None: zero; :func:`check_tags`).
        Returns the ids.

        An id already stored is an error (KeyError, :func:`refuse_present`, nothing stored)
        unless replace is true, in which case its old entry is removed first. All or nothing.
        """

    @abstractmethod
    def remove(self, ids: np.ndarray) -> int:
        """Remove the entries of these ids (absent ids are ignored); returns how many."""

    @abstractmethod
    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found (n,) bool, cells (n,) int64 (-1 if absent), codes (n, M))."""

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found (n,) bool, rows (n, vector_width) of vector_dtype, zero where not found)
        of ids (n,) int64, from the newest committed state."""
        with self.snapshot() as snap:
            return snap.vectors(ids)

    def tags(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found (n,) bool, tag sets (n,) uint64, zero where not found) of ids (n,) int64,
        from the newest committed state."""
        raise ValueError("this storage keeps no tags")

    def tag_counts(self) -> np.ndarray:
        """(64,) int64: how many stored entries have each tag bit set (newest committed
        state; what a filtered search's planner estimates pass rates from)."""
        raise ValueError("this storage keeps no tags")

    def set_tags(self, ids: np.ndarray, tags: np.ndarray) -> int:
        """Replace the tag sets of the present ids (n,) int64 by tags (n,) uint64 (absent
        ids are ignored) in one write; returns how many changed hands."""
        raise ValueError("this storage keeps no tags")

    def keep_tags(self, meta: Optional[dict] = None) -> None:
        """Start keeping tags (feature ``tags``) in a storage made without them: every
        stored entry's tag set is zero, in one write; ``meta`` (str -> bytes) is stored in
        that write. Nothing happens when the storage keeps tags already."""
        raise ValueError("this storage cannot start keeping tags")

    @abstractmethod
    def next_id(self) -> int:
        """One past the largest id ever stored: where fresh ids (``add`` without ids) start."""

    @abstractmethod
    def snapshot(self) -> AbstractContextManager[Snapshot]:
        """A consistent read view for one search: sizes and segments of the same state."""

    @abstractmethod
    def meta(self, name: str) -> Optional[bytes]:
        """The metadata stored under ``name`` at creation (None when there is none)."""

    def merge(self) -> int:
        """Finish deferred work of earlier adds now (on disk: move staged entries into
        their cells' blocks). Returns how many entries moved; 0 where nothing is deferred."""
        return 0

    def stats(self) -> dict:
        """Storage facts beside the counts the index computes: ``bytes_on_disk`` (0 in
        memory), ``staged`` (entries not yet in their cells' blocks), ``merge_pending``
        (a merge is under way: later adds go on with it step by step, ``merge()`` finishes
        it)."""
        return {"bytes_on_disk": 0, "staged": 0, "merge_pending": False}

    def options(self) -> dict:
        """The layout options the storage was created with (to make another like it)."""
        return {}

    def verify(self) -> list[str]:
        """Check everything stored against everything else (values against their headers,
        cell sizes, block numbering, the id table, the stage, the counters); one line per
        problem found, none when the storage is sound."""
        return []

    def backup(self, path: str, compact: bool = False) -> None:
        """A consistent copy of the storage in directory ``path`` (new or empty), taken from
        one committed state while writers go on."""
        raise ValueError("only an on-disk storage can be backed up")

    def bulk_state(self, finished: bool = False) -> Optional[bytes]:
        """The state of an unfinished bulk load (None when there is none); with
        ``finished``, the last state of the bulk load that built the storage, if one did."""
        return None

    def bulk_writer(self, scratch_dir: str, step: int = 200_000) -> BulkWriter:
        """The writer of a storage created for a bulk load; ``scratch_dir`` (existing) is
        where it may keep temporary files between steps and across restarts; ``step``: about
        how many entries each step of :meth:`BulkWriter.finish` writes."""
        raise ValueError("this storage was not created for a bulk load")

    def cell_ranges(self) -> list[tuple[Optional[str], int, int]]:
        """(name, first cell, end cell) of each part that owns a range of cells and can be
        opened alone by that name (a shard set's shards, :mod:`cypq.storage.sharded`); one
        part with no name of its own, owning every cell, for any other storage."""
        return [(None, 0, self.n_cells)]

    def close(self) -> None:
        """Release resources."""


def vector_spec(vectors, features, where: str) -> tuple[int, Optional[np.dtype], frozenset]:
    """(width, dtype, features) of a new storage: its ``vectors`` option (None: no vectors,
    or (width, dtype)) and the features asked for, with ``vectors`` added when it keeps
    them, all checked (:func:`check_features`)."""
    if vectors is None:
        return 0, None, check_features(features, where)
    width, dtype = vectors
    if not 1 <= int(width) <= 1 << 16:
        raise ValueError(f"vector width must be in [1, 65536], got {width}")
    return int(width), np.dtype(dtype), check_features(set(features) | {VECTORS}, where)


def check_vectors(storage: "Storage", vectors, n: int) -> Optional[np.ndarray]:
    """The vectors of an add, C-contiguous in the storage's dtype (None when it keeps none).

    Raises
    ------
    ValueError
        Vectors missing where the storage keeps them, given where it keeps none, or of
        another shape or dtype.
    """
    if not storage.vector_width:
        if vectors is not None:
            raise ValueError("this storage keeps no vectors: create it with vectors")
        return None
    if vectors is None:
        raise ValueError("this storage keeps a vector per entry: pass the entries' vectors")
    arr = np.asarray(vectors)
    want = (n, storage.vector_width)
    if arr.shape != want or arr.dtype != storage.vector_dtype:
        raise ValueError(f"vectors must be {storage.vector_dtype} of shape {want}, got "
                         f"{arr.dtype} of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def check_tags(storage: "Storage", tags, n: int) -> Optional[np.ndarray]:
    """The tag sets of an add as C-contiguous uint64 (n,); None when none are given (all
    zero) or the storage keeps none.

    Raises
    ------
    ValueError
        Tags given where the storage keeps none, or not n whole numbers in [0, 2**64).
    """
    if tags is None:
        return None
    if not storage.keeps_tags:
        raise ValueError("this storage keeps no tags: create it with tags")
    return as_tags(tags, n)


def as_tags(tags, n: int) -> np.ndarray:
    """The tag sets of n entries as C-contiguous uint64 (n,) (ValueError: see
    :func:`check_tags`)."""
    arr = np.asarray(tags)
    if arr.shape != (n,) or not (arr.dtype.kind == "u" or (arr.dtype.kind == "i" and (
            not arr.size or arr.min() >= 0))):
        raise ValueError(f"tags must be {n} unsigned (or non-negative) integers, one uint64 "
                         f"bit set per entry; got {arr.dtype} of shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.uint64)


def bit_counts(tags) -> np.ndarray:
    """(64,) int64: how many of the uint64 tag sets (n,) have each bit set."""
    t = np.ascontiguousarray(tags, dtype="<u8")
    if not len(t):
        return np.zeros(64, np.int64)
    return np.unpackbits(t.view(np.uint8).reshape(-1, 8), axis=1,
                         bitorder="little").sum(0, dtype=np.int64)


def row_addresses(a: np.ndarray) -> np.ndarray:
    """(n,) uintp addresses of the rows of a C-contiguous (n, ...) array."""
    return np.uintp(a.ctypes.data) + np.uintp(a.strides[0] if a.ndim else 0) * \
        np.arange(len(a), dtype=np.uintp)


# ---------------------------------------------------------------------------- id policy
ID_MAX = np.iinfo(np.int64).max


def check_id_range(ids: np.ndarray, what: str = "ids") -> None:
    """ValueError naming an id of the integer array ``ids`` outside [0, ID_MAX]: the id
    table keys ids as u64 of non-negative int64 (a negative one could not be looked up, and
    -1 marks a missing result)."""
    if ids.size and (ids.min() < 0 or ids.max() > ID_MAX):
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise ValueError(f"{what} must be in [0, 2**63-1], found {bad} (ids are non-negative: "
                         "-1 marks a missing result)")


def fresh_ids(next_id: int, n: int) -> np.ndarray:
    """n fresh ids continuing at ``next_id`` (one past the largest id ever stored)."""
    if n and next_id > ID_MAX - n + 1:
        raise OverflowError(f"no room for {n} fresh ids after {next_id - 1}: the ids would "
                            "pass 2**63-1; give your own ids")
    return np.arange(next_id, next_id + n, dtype=np.int64)


def refuse_present(present) -> None:
    """KeyError naming the ids of an add that are already stored (when there are any)."""
    if len(present):
        raise KeyError(f"{len(present)} ids are already in the index (first: "
                       f"{int(present[0])}); pass replace=True to overwrite them")
