"""Inverted lists in RAM: per cell, growable arrays of ids and codes."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

from .base import (TAGS, Segments, Snapshot, Storage, bit_counts, check_tags, check_vectors,
                   fresh_ids, refuse_present, vector_spec)


class _Cell:
    __slots__ = ("ids", "codes", "vectors", "tags", "n")

    def __init__(self, M, dtype, cap, vector_width=0, vector_dtype=None, tags=False):
        self.ids = np.empty(cap, dtype=np.int64)
        self.codes = np.empty((cap, M), dtype=dtype)
        self.vectors = (np.empty((cap, vector_width), dtype=vector_dtype) if vector_width
                        else None)
        self.tags = np.empty(cap, dtype=np.uint64) if tags else None
        self.n = 0

    def append(self, ids, codes, vectors, tags):
        need = self.n + len(ids)
        if need > len(self.ids):
            cap = max(need, 2 * len(self.ids))
            self.ids = np.resize(self.ids, cap)
            self.codes = _grown(self.codes, self.n, cap)
            if self.vectors is not None:
                self.vectors = _grown(self.vectors, self.n, cap)
            if self.tags is not None:
                self.tags = np.resize(self.tags, cap)
        self.ids[self.n:need] = ids
        self.codes[self.n:need] = codes
        if self.vectors is not None:
            self.vectors[self.n:need] = vectors
        if self.tags is not None:
            self.tags[self.n:need] = 0 if tags is None else tags
        self.n = need

    def move(self, src: int, dst: int) -> None:
        """Entry src's id, code, vector and tags into position dst."""
        self.ids[dst], self.codes[dst] = self.ids[src], self.codes[src]
        if self.vectors is not None:
            self.vectors[dst] = self.vectors[src]
        if self.tags is not None:
            self.tags[dst] = self.tags[src]


def _grown(rows: np.ndarray, n: int, cap: int) -> np.ndarray:
    """rows (m, w) -> (cap, w) with the first n rows kept."""
    out = np.empty((cap, rows.shape[1]), dtype=rows.dtype)
    out[:n] = rows[:n]
    return out


class MemoryStorage(Storage):
    """Inverted lists held in memory.

    Parameters
    ----------
    n_cells : int
    code_width : int
        Stored code values per entry.
    code_dtype : numpy dtype
    meta : dict of str -> bytes, optional
        Metadata kept for the layer above (see :meth:`Storage.meta`).
    features : iterable of str
        See :attr:`Storage.features`.
    vectors : (int, dtype), optional
        Keep a vector of this width and dtype per entry (see :attr:`Storage.vector_width`).
    """

    def __init__(self, n_cells: int, code_width: int, code_dtype, meta=None, features=(),
                 vectors=None):
        self.n_cells = int(n_cells)
        self.code_width = int(code_width)
        self.code_dtype = np.dtype(code_dtype)
        self.vector_width, self.vector_dtype, self.features = vector_spec(
            vectors, features, "the storage")
        self.keeps_tags = TAGS in self.features
        self._cells: dict[int, _Cell] = {}
        self._where: dict[int, tuple[int, int]] = {}   # id -> (cell, position)
        self._sizes = np.zeros(self.n_cells, dtype=np.int64)
        self._next_id = 0
        self._meta = {k: bytes(v) for k, v in (meta or {}).items()}
        # Adds move and resize the cells' arrays, so writes wait for searches in progress
        # and the reverse (LMDB readers have snapshots and need no such lock).
        self._lock = threading.RLock()
        # Addresses of each cell's arrays, so a search finds its cells' segments in NumPy.
        self._codes_at = np.zeros(self.n_cells, dtype=np.uintp)
        self._ids_at = np.zeros(self.n_cells, dtype=np.uintp)
        self._vecs_at = np.zeros(self.n_cells, dtype=np.uintp)
        self._tags_at = np.zeros(self.n_cells, dtype=np.uintp)
        self._tag_counts = np.zeros(64, dtype=np.int64)
        self._gen = 0   # bumped by every write (Snapshot.generation)

    def __len__(self) -> int:
        return len(self._where)

    def next_id(self) -> int:
        return self._next_id

    def meta(self, name):
        return self._meta.get(name)

    def add(self, cells, ids, codes, replace=False, vectors=None, tags=None):
        vectors = check_vectors(self, vectors, len(cells))
        tags = check_tags(self, tags, len(cells))
        with self._lock:
            return self._add(cells, ids, codes, replace, vectors, tags)

    def _add(self, cells, ids, codes, replace, vectors, tags):
        self._gen += 1
        if ids is None:
            ids = fresh_ids(self._next_id, len(cells))
        ids = np.asarray(ids, dtype=np.int64)
        present = [i for i in ids.tolist() if i in self._where]
        if not replace:
            refuse_present(present)
        if present:
            self._remove(np.asarray(present, dtype=np.int64))
        cells = np.asarray(cells, dtype=np.int64)
        codes = np.asarray(codes, dtype=self.code_dtype)
        order = np.argsort(cells, kind="stable")
        bounds = np.flatnonzero(np.diff(cells[order])) + 1
        for grp in np.split(order, bounds):
            if not len(grp):
                continue
            c = int(cells[grp[0]])
            cell = self._cells.get(c)
            if cell is None:
                cell = self._cells[c] = _Cell(self.code_width, self.code_dtype,
                                              max(4, len(grp)), self.vector_width,
                                              self.vector_dtype, self.keeps_tags)
            start = cell.n
            cell.append(ids[grp], codes[grp], None if vectors is None else vectors[grp],
                        None if tags is None else tags[grp])
            self._codes_at[c] = cell.codes.ctypes.data
            self._ids_at[c] = cell.ids.ctypes.data
            if cell.vectors is not None:
                self._vecs_at[c] = cell.vectors.ctypes.data
            if cell.tags is not None:
                self._tags_at[c] = cell.tags.ctypes.data
            for j, i in enumerate(ids[grp].tolist()):
                self._where[i] = (c, start + j)
            self._sizes[c] += len(grp)
        if len(ids):
            self._next_id = max(self._next_id, int(ids.max()) + 1)
        if tags is not None:
            self._tag_counts += bit_counts(tags)
        return ids

    def remove(self, ids):
        with self._lock:
            return self._remove(ids)

    def _remove(self, ids):
        self._gen += 1
        removed = 0
        for i in np.asarray(ids, dtype=np.int64).tolist():
            loc = self._where.pop(i, None)
            if loc is None:
                continue
            c, pos = loc
            cell = self._cells[c]
            if cell.tags is not None:
                self._tag_counts -= bit_counts(cell.tags[pos:pos + 1])
            last = cell.n - 1
            if pos != last:  # move the last entry into the hole
                cell.move(last, pos)
                self._where[int(cell.ids[pos])] = (c, pos)
            cell.n = last
            self._sizes[c] -= 1
            removed += 1
        return removed

    def lookup(self, ids):
        with self._lock:
            return self._lookup(ids)

    def tags(self, ids):
        if not self.keeps_tags:
            return super().tags(ids)
        ids = np.asarray(ids, dtype=np.int64)
        found = np.zeros(len(ids), dtype=bool)
        out = np.zeros(len(ids), dtype=np.uint64)
        with self._lock:
            for j, i in enumerate(ids.tolist()):
                loc = self._where.get(i)
                if loc is not None:
                    found[j], out[j] = True, self._cells[loc[0]].tags[loc[1]]
        return found, out

    def set_tags(self, ids, tags):
        if not self.keeps_tags:
            return super().set_tags(ids, tags)
        ids = np.asarray(ids, dtype=np.int64)
        tags = check_tags(self, tags, len(ids))
        with self._lock:
            self._gen += 1
            locs = [(self._where.get(i), t) for i, t in zip(ids.tolist(), tags.tolist())]
            for loc, t in locs:
                if loc is not None:
                    cell = self._cells[loc[0]]
                    self._tag_counts += bit_counts([t]) - bit_counts(cell.tags[loc[1]:loc[1] + 1])
                    cell.tags[loc[1]] = t
            return sum(loc is not None for loc, _ in locs)

    def keep_tags(self, meta=None):
        with self._lock:
            if self.keeps_tags:
                return
            self._gen += 1
            for c, cell in self._cells.items():
                cell.tags = np.zeros(len(cell.ids), dtype=np.uint64)
                self._tags_at[c] = cell.tags.ctypes.data
            self._meta.update({k: bytes(v) for k, v in (meta or {}).items()})
            self.features, self.keeps_tags = self.features | {TAGS}, True

    def tag_counts(self):
        if not self.keeps_tags:
            return super().tag_counts()
        with self._lock:
            return self._tag_counts.copy()

    def _lookup(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        found = np.zeros(len(ids), dtype=bool)
        cells = np.full(len(ids), -1, dtype=np.int64)
        codes = np.zeros((len(ids), self.code_width), dtype=self.code_dtype)
        for j, i in enumerate(ids.tolist()):
            loc = self._where.get(i)
            if loc is not None:
                found[j] = True
                cells[j] = loc[0]
                codes[j] = self._cells[loc[0]].codes[loc[1]]
        return found, cells, codes

    @contextmanager
    def snapshot(self):
        with self._lock:  # the live arrays are the snapshot: no writes meanwhile
            yield _MemorySnapshot(self)


class _MemorySnapshot(Snapshot):
    def __init__(self, storage: MemoryStorage):
        self._s = storage
        self.generation = storage._gen

    def cell_sizes(self):
        return self._s._sizes

    def segments(self, cells):
        cells = np.asarray(cells, dtype=np.int64)
        s = self._s
        return Segments(cells, np.arange(len(cells) + 1, dtype=np.int64), s._codes_at[cells],
                        s._ids_at[cells], s._sizes[cells],
                        s._vecs_at[cells] if s.vector_width else None,
                        s._tags_at[cells] if s.keeps_tags else None)

    def lookup(self, ids):
        s = self._s
        found, cells, codes = s._lookup(ids)
        if not s.keeps_tags:
            return found, cells, codes, np.zeros(len(found), np.uint64)
        return found, cells, codes, s.tags(ids)[1]

    def vectors(self, ids):
        s = self._s
        if not s.vector_width:
            return super().vectors(ids)
        ids = np.asarray(ids, dtype=np.int64)
        found = np.zeros(len(ids), dtype=bool)
        rows = np.zeros((len(ids), s.vector_width), dtype=s.vector_dtype)
        for j, i in enumerate(ids.tolist()):
            loc = s._where.get(i)
            if loc is not None:
                found[j], rows[j] = True, s._cells[loc[0]].vectors[loc[1]]
        return found, rows

    def entries(self, lo, hi, vectors=False, tags=False):
        s = self._s
        keep, keep_tags = vectors and s.vector_width, tags and s.keeps_tags
        parts = [(np.empty(0, np.int64), np.empty(0, np.int64),
                  np.empty((0, s.code_width), s.code_dtype))
                 + ((np.empty((0, s.vector_width), s.vector_dtype),) if keep else ())
                 + ((np.empty(0, np.uint64),) if keep_tags else ())]
        for c in sorted(c for c in s._cells if lo <= c < hi and s._cells[c].n):
            cell = s._cells[c]
            n = cell.n
            parts.append((np.full(n, c, np.int64), cell.ids[:n], cell.codes[:n])
                         + ((cell.vectors[:n],) if keep else ())
                         + ((cell.tags[:n],) if keep_tags else ()))
        return tuple(np.concatenate(p) for p in zip(*parts))
