"""Storages that own contiguous cell ranges, used as one (a shard set).

Each part holds the entries of the cells ``[lo, hi)`` it owns; together the ranges cover
every cell once. A snapshot is the parts' snapshots side by side, so a search over the set
scans exactly the cells, entries and codes it would scan in one storage holding them all
(same results, ties included). Writes go to the part owning each entry's cell; ids are
unique across the set.

What a set cannot give that one storage does: a write that touches several parts is one
transaction per part, not one for the set (a crash may keep some parts' share of it: an
add with ids given, repeated with ``replace=True``, puts it right), and the checks that
keep ids unique across parts hold for one writing process at a time.
"""
from __future__ import annotations

import os
import threading
from contextlib import ExitStack, contextmanager
from typing import Optional, Sequence

import numpy as np

from .base import (IndexFormatError, Segments, Snapshot, Storage, fresh_ids, refuse_present)


class ShardedStorage(Storage):
    """Storages owning consecutive cell ranges, read and written as one.

    Parameters
    ----------
    parts : sequence of Storage
        Alike (cells, code layout, features, vectors, tags), in cell order.
    bounds : sequence of int (len(parts) + 1,)
        Part j owns the cells ``bounds[j] .. bounds[j + 1] - 1``; from 0 to n_cells.
    names : sequence of str, optional
        What to call each part in messages (e.g. its path).
    """

    def __init__(self, parts: Sequence[Storage], bounds: Sequence[int],
                 names: Optional[Sequence[str]] = None):
        self.parts = list(parts)
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.names = list(names) if names is not None else [f"shard {j}" for j in
                                                               range(len(self.parts))]
        first = self.parts[0]
        for name, p in zip(self.names, self.parts):
            got = (p.n_cells, p.code_width, p.code_dtype, p.features, p.vector_width,
                   p.vector_dtype, p.keeps_tags)
            want = (first.n_cells, first.code_width, first.code_dtype, first.features,
                    first.vector_width, first.vector_dtype, first.keeps_tags)
            if got != want:
                raise IndexFormatError(f"{name} is not laid out like {self.names[0]} (cells, "
                                       "codes, features, vectors or tags differ): not one "
                                       "shard set")
        if (len(self.bounds) != len(self.parts) + 1 or self.bounds[0] != 0
                or self.bounds[-1] != first.n_cells or np.any(np.diff(self.bounds) <= 0)):
            raise IndexFormatError(f"the shards' cell ranges {self.bounds.tolist()} do not "
                                   f"cover the {first.n_cells} cells once each")
        self.n_cells, self.code_width, self.code_dtype = (first.n_cells, first.code_width,
                                                          first.code_dtype)
        self.features, self.vector_width = first.features, first.vector_width
        self.vector_dtype, self.keeps_tags = first.vector_dtype, first.keeps_tags
        self._lock = threading.Lock()   # one write at a time, across the parts

    def cell_ranges(self) -> list[tuple[Optional[str], int, int]]:
        return [(name, int(self.bounds[j]), int(self.bounds[j + 1]))
                for j, name in enumerate(self.names)]

    def owner(self, cells: np.ndarray) -> np.ndarray:
        """(n,) int64: the part owning each cell."""
        return np.searchsorted(self.bounds, cells, side="right") - 1

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def next_id(self) -> int:
        return max(p.next_id() for p in self.parts)

    def meta(self, name: str) -> Optional[bytes]:
        # the set's (the model, tag names); a part's place in it is the part's own
        return None if name == "shard" else self.parts[0].meta(name)

    def _found(self, ids: np.ndarray) -> np.ndarray:
        """(n_parts, n) bool: which part holds each id."""
        return np.stack([p.lookup(ids)[0] for p in self.parts]) if len(ids) else \
            np.zeros((len(self.parts), 0), bool)

    def add(self, cells, ids, codes, replace=False, vectors=None, tags=None):
        cells = np.asarray(cells, dtype=np.int64)
        with self._lock:
            ids = fresh_ids(self.next_id(), len(cells)) if ids is None else \
                np.asarray(ids, dtype=np.int64)
            found = self._found(ids)
            if not replace:
                refuse_present(ids[found.any(0)])
            dest = self.owner(cells)
            for j, p in enumerate(self.parts):
                moved = found[j] & (dest != j)   # replaced into another part: out of this one
                if moved.any():
                    p.remove(ids[moved])
            for j, p in enumerate(self.parts):
                sel = np.flatnonzero(dest == j)
                if len(sel):
                    p.add(cells[sel], ids[sel], codes[sel], replace,
                          None if vectors is None else vectors[sel],
                          None if tags is None else np.asarray(tags)[sel])
            return ids

    def remove(self, ids):
        with self._lock:
            return sum(p.remove(ids) for p in self.parts)

    def lookup(self, ids):
        with self.snapshot() as snap:
            return snap.lookup(ids)[:3]

    def tags(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        return _overlay([p.tags(ids) for p in self.parts])

    def tag_counts(self):
        return sum(p.tag_counts() for p in self.parts)

    def set_tags(self, ids, tags):
        with self._lock:
            return sum(p.set_tags(ids, tags) for p in self.parts)

    def keep_tags(self, meta=None) -> None:
        """Part by part (a set interrupted half way is finished when next opened for
        writing: :func:`cypq.shard_set.open_storage`)."""
        with self._lock:
            for p in self.parts:
                p.keep_tags(meta)
            self.features, self.keeps_tags = self.parts[0].features, True

    @contextmanager
    def snapshot(self):
        with ExitStack() as stack:
            yield ShardedSnapshot([stack.enter_context(p.snapshot()) for p in self.parts],
                                  self.bounds)

    def merge(self) -> int:
        with self._lock:
            return sum(p.merge() for p in self.parts)

    def stats(self) -> dict:
        st = [p.stats() for p in self.parts]
        return {"bytes_on_disk": sum(s["bytes_on_disk"] for s in st),
                "staged": sum(s["staged"] for s in st),
                "merge_pending": any(s["merge_pending"] for s in st), "shards": len(st)}

    def options(self) -> dict:
        return self.parts[0].options()

    def verify(self) -> list[str]:
        out, ids = [], []
        with self.snapshot() as snap:
            for j, (name, s) in enumerate(zip(self.names, snap.parts)):
                lo, hi = self.bounds[j], self.bounds[j + 1]
                sizes = s.cell_sizes()
                stray = int(sizes.sum() - sizes[lo:hi].sum())
                if stray:
                    out.append(f"{name}: {stray} entries in cells it does not own "
                               f"({lo}..{hi - 1})")
                ids.append(s.entries(lo, hi)[1])
        ids = np.sort(np.concatenate(ids))
        twice = ids[1:][ids[1:] == ids[:-1]]
        if len(twice):
            out.append(f"{len(twice)} ids are in more than one shard (first: {int(twice[0])})")
        for name, p in zip(self.names, self.parts):
            out += [f"{name}: {line}" for line in p.verify()]
        return out

    def backup(self, path: str, compact: bool = False) -> None:
        """Each part into ``path/shard-NNNN`` (one committed state per part)."""
        for j, p in enumerate(self.parts):
            p.backup(os.path.join(path, f"shard-{j:04d}"), compact)

    def close(self) -> None:
        for p in self.parts:
            p.close()


class ShardedSnapshot(Snapshot):
    """The parts' snapshots read as one (see :class:`ShardedStorage`)."""

    def __init__(self, parts: list, bounds: np.ndarray):
        self.parts, self.bounds = parts, bounds
        gens = [s.generation for s in parts]
        self.generation = None if any(g is None for g in gens) else tuple(gens)
        self._sizes = None

    def cell_sizes(self) -> np.ndarray:
        if self._sizes is None:
            b = self.bounds
            self._sizes = np.concatenate([s.cell_sizes()[b[j]:b[j + 1]]
                                          for j, s in enumerate(self.parts)])
        return self._sizes

    def segments(self, cells: np.ndarray) -> Segments:
        cells = np.asarray(cells, dtype=np.int64)
        cut = np.searchsorted(cells, self.bounds)
        segs = [s.segments(cells[cut[j]:cut[j + 1]]) for j, s in enumerate(self.parts)]
        offsets = np.cumsum([0] + [len(g.length) for g in segs])
        start = np.concatenate([g.start[:-1] + o for g, o in zip(segs, offsets)] +
                               [offsets[-1:]]).astype(np.int64)

        def cat(name):
            got = [getattr(g, name) for g in segs]
            return None if got[0] is None else np.concatenate(got)
        return Segments(cells, start, cat("codes"), cat("ids"), cat("length"),
                        cat("vectors"), cat("tags"))

    def entries(self, lo: int, hi: int, vectors: bool = False, tags: bool = False) -> tuple:
        b = self.bounds
        got = [s.entries(max(lo, b[j]), min(hi, b[j + 1]), vectors, tags)
               for j, s in enumerate(self.parts) if max(lo, b[j]) < min(hi, b[j + 1])]
        return tuple(np.concatenate(col) for col in zip(*got))

    def lookup(self, ids: np.ndarray) -> tuple:
        return _overlay([s.lookup(ids) for s in self.parts])

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _overlay([s.vectors(ids) for s in self.parts])


def _overlay(got: list) -> tuple:
    """The parts' answers about the same ids, each (found (n,) bool, columns...), as one:
    an id's columns from the part that found it (an id is in one part at most)."""
    out = [np.array(x) for x in got[0]]
    for answer in got[1:]:
        f = answer[0]
        for a, b in zip(out, answer):
            a[f] = b[f]
    return tuple(out)
