"""LMDBStorage: the on-disk storage, one directory holding an LMDB environment.

It joins the parts, each in a module of its own: the key and value layouts (layout.py), the
environment (env.py: opening, format, transactions, map growth, commit bookkeeping), the
read path (reader.py), the write path (writer.py: add, remove, merge), the stage (stage.py)
and the bulk writer (bulk.py). The concurrency contract is the Storage interface's.
"""
from __future__ import annotations

import functools
import os
import weakref
from contextlib import contextmanager
from typing import Callable, Optional

import numpy as np

from ..base import Storage, check_tags, check_vectors, vector_spec
from . import env as E
from . import layout as L
from .bulk import LMDBBulkWriter
from .reader import ReadPath
from .tags_column import add_tags_column
from .verify import verify
from .writer import WritePath


def _reports_damage(method):
    """LMDB's own reports of a damaged file, raised as IndexCorruptError."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with E.damage_reported(self.path):
            return method(self, *args, **kwargs)
    return wrapped


class LMDBStorage(Storage):
    """The LMDB inverted lists. Make with :meth:`create` / :meth:`open`."""

    def __init__(self, env: E.Env):
        self._env = env
        self.path, self.readonly = env.path, env.readonly
        self.n_cells, self.code_width, self.code_dtype = \
            env.n_cells, env.code_width, env.code_dtype
        self.block_capacity, self.stage_capacity = env.block_capacity, env.stage_capacity
        self.features = env.features
        self.vector_width, self.vector_dtype = env.vector_width, env.vector_dtype
        self.keeps_tags = env.keeps_tags
        self._closed = False
        try:
            self._reader = ReadPath(env)
        except BaseException:  # a failed open must not keep the environment registered
            env.release()
            raise
        self._writer = WritePath(env, self._reader)
        self._finalizer = weakref.finalize(self, env.release)

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str, n_cells: int, code_width: int, code_dtype,
               meta: Optional[dict] = None, block_capacity: int = 128,
               map_size: int = E.DEFAULT_MAP, sync: bool = True,
               bulk_state: Optional[bytes] = None,
               stage_capacity: int = E.DEFAULT_STAGE, features=(),
               vectors=None) -> "LMDBStorage":
        """Create an empty storage in directory ``path`` (created; must be empty if it
        exists, or hold only what an interrupted create left), in one transaction.

        Parameters
        ----------
        path : str
        n_cells : int
            Cells are ``0 .. n_cells - 1``.
        code_width : int
            Stored code values per entry.
        code_dtype : numpy dtype
        meta : dict of str -> bytes, optional
            Metadata kept for the layer above (:meth:`meta`).
        block_capacity : int
            Entries per block (a block is rewritten whole when an entry is added to it).
        map_size : int
            Initial LMDB map size in bytes; it doubles whenever full.
        sync : bool
            fsync at every commit (durable against power loss; a killed process loses
            nothing committed either way).
        bulk_state : bytes, optional
            Creates the storage for a bulk load (:meth:`bulk_writer`): until the writer
            finishes, :meth:`open` refuses it unless ``allow_incomplete``.
        stage_capacity : int
            Adds are staged (one sequential record per add, no id-table rows); once this
            many entries are staged they are frozen and merged into the cells' blocks in
            bounded steps that later adds do as they go (about 3 entries of merge work per
            entry added), while new adds stage anew. 0 writes every add into the blocks at
            once. Larger: faster adds (a merge costs about one pass over the blocks and the
            id table), more memory in every process that searches or adds (about 40 bytes
            per staged entry, up to twice the capacity while a merge is under way).
        features : iterable of str
            See :attr:`Storage.features`; recorded in the config (format 5: cypq 0.2
            refuses the index rather than misread it).
        vectors : (int, dtype), optional
            Keep a vector of this width and dtype per entry, by id (feature ``vectors``).
        """
        if not 1 <= block_capacity <= 65535:
            raise ValueError("block_capacity must be in [1, 65535]")
        if not 0 <= stage_capacity <= 1 << 30:
            raise ValueError("stage_capacity must be in [0, 2**30]")
        if not 1 <= n_cells <= 1 << 40:
            raise ValueError("n_cells must be in [1, 2**40]")
        config = {"M": int(code_width), "code_dtype": np.dtype(code_dtype).name,
                  "block_capacity": int(block_capacity), "stage_capacity": int(stage_capacity),
                  "n_cells": int(n_cells)}
        width, dtype, features = vector_spec(vectors, features, path)
        if width:
            config.update(vector_width=width, vector_dtype=dtype.name)
        features = sorted(features)
        if features:
            config["features"] = features
        with E.damage_reported(path):
            return cls(E.create(path, config, meta or {}, bulk_state, map_size, sync))

    @classmethod
    def open(cls, path: str, readonly: bool = False, map_size: int = E.DEFAULT_MAP,
             sync: bool = True, allow_incomplete: bool = False,
             n_cells_of: Optional[Callable] = None) -> "LMDBStorage":
        """Open an existing storage.

        Parameters
        ----------
        path : str
        readonly : bool
            No writes; an index of an older format is read as it is, not upgraded.
        allow_incomplete : bool
            Open an unfinished bulk load (refused otherwise, IndexFormatError).
        n_cells_of : callable, optional
            ``n_cells_of(meta)`` gives the number of cells of an index written by cypq 0.1
            (format 1 or 2, which did not record it) from its metadata.
        """
        with E.damage_reported(path):
            return cls(E.open_env(path, readonly, map_size, sync, allow_incomplete,
                                  n_cells_of))

    @staticmethod
    def holds_index(path: str) -> bool:
        """Whether ``path`` holds a storage (complete or a bulk load in progress)."""
        return E.holds_index(path)

    @staticmethod
    def is_environment(path: str) -> bool:
        """Whether directory ``path`` is itself an LMDB environment (has its data file),
        as opposed to a directory of other things (e.g. of shards)."""
        return os.path.isfile(os.path.join(path, "data.mdb"))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._reader.invalidate()
            self._finalizer()

    # ------------------------------------------------------------------ reading
    @_reports_damage
    def __len__(self) -> int:
        with self._env.read() as txn:
            return self._env.counter(txn, b"count")

    @_reports_damage
    def next_id(self) -> int:
        with self._env.read() as txn:
            return self._env.counter(txn, b"next_id")

    @_reports_damage
    def meta(self, name: str) -> Optional[bytes]:
        with self._env.read() as txn:
            v = self._env.get_meta(txn, name.encode())
            return None if v is None else bytes(v)

    @_reports_damage
    def cell_sizes(self) -> np.ndarray:
        """(n_cells,) int64 entries per cell, of the newest committed state."""
        return self._reader.cell_sizes()

    @contextmanager
    def snapshot(self):
        with E.damage_reported(self.path), self._reader.snapshot() as snap:
            yield snap

    @_reports_damage
    def lookup(self, ids):
        return self._reader.lookup(np.asarray(ids, dtype=np.int64))[:3]

    @_reports_damage
    def tags(self, ids):
        if not self.keeps_tags:
            return super().tags(ids)
        out = self._reader.lookup(np.asarray(ids, dtype=np.int64))
        return out[0], out[4]

    @_reports_damage
    def stats(self) -> dict:
        size = os.path.getsize(os.path.join(self._env.real, "data.mdb"))
        with self._env.read() as txn:
            stage = self._env.stage_meta(txn)
        return {"bytes_on_disk": size, "map_size": self._env.lmdb.info()["map_size"],
                "staged": stage.staged, "merge_pending": stage.frozen}

    # ------------------------------------------------------------------ writing
    @_reports_damage
    def add(self, cells, ids, codes, replace=False, vectors=None, tags=None):
        vectors = check_vectors(self, vectors, len(cells))
        tags = check_tags(self, tags, len(cells))
        return self._writer.add(cells, ids, codes, replace, vectors, tags)

    @_reports_damage
    def tag_counts(self):
        if not self.keeps_tags:
            return super().tag_counts()
        with self._env.read() as txn:
            return L.parse_tag_counts(self._env.get_meta(txn, b"tag_counts"))

    @_reports_damage
    def set_tags(self, ids, tags):
        if not self.keeps_tags:
            return super().set_tags(ids, tags)
        ids = np.asarray(ids, dtype=np.int64)
        return self._writer.set_tags(ids, check_tags(self, tags, len(ids)))

    @_reports_damage
    def keep_tags(self, meta=None) -> None:
        if not self.keeps_tags:
            add_tags_column(self._env, meta or {})
            self._reader.reload()
            self.features, self.keeps_tags = self._env.features, self._env.keeps_tags

    @_reports_damage
    def remove(self, ids):
        return self._writer.remove(ids)

    @_reports_damage
    def merge(self) -> int:
        return self._writer.merge()

    def options(self) -> dict:
        return {"block_capacity": self.block_capacity, "stage_capacity": self.stage_capacity}

    @_reports_damage
    def verify(self) -> list:
        return verify(self._env)

    @_reports_damage
    def backup(self, path: str, compact: bool = False) -> None:
        """LMDB's copy of one committed state into directory ``path`` (new or empty);
        ``compact`` leaves out free pages. Writers go on meanwhile."""
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise FileExistsError(f"{path} exists and is not an empty directory")
        os.makedirs(path, exist_ok=True)
        self._env.lmdb.copy(path, compact=compact)

    def bulk_state(self, finished: bool = False) -> Optional[bytes]:
        return self.meta("bulk_done" if finished else "bulk")

    def bulk_writer(self, scratch_dir: str, step: int = 200_000) -> LMDBBulkWriter:
        """The writer of a storage created with ``bulk_state`` (see :mod:`.bulk`); ``step``
        is about how many ids each id-table transaction writes."""
        return LMDBBulkWriter(self._env, scratch_dir, step)
