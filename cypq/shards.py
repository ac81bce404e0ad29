"""Making shard sets (:mod:`cypq.shard_set`): an index split by cell range into N on-disk
indexes that open and search as one (``Index.open(directory)``), so that an index can live
on several disks, or its shards be scanned where they are (``cypq.spark.search``)."""
from __future__ import annotations

import os
import uuid
from typing import Optional

import numpy as np

from .index import Index
from .lopq import LOPQModel
from .shard_set import SHARD_DIR, is_one_index, shard_dirs


def shard_bounds(sizes: np.ndarray, shards: int) -> np.ndarray:
    """(shards + 1,) int64 cell boundaries: consecutive ranges, each at least one cell,
    holding about equal numbers of entries (equal numbers of cells when there are none).

    Parameters
    ----------
    sizes : numpy.ndarray int64 (n_cells,)
        Entries per cell.
    shards : int
        In [1, n_cells].
    """
    n_cells = len(sizes)
    if not 1 <= int(shards) <= n_cells:
        raise ValueError(f"shards must be in [1, {n_cells}] (one cell at least each), "
                         f"got {shards}")
    cum = np.cumsum(sizes)
    if not len(cum) or cum[-1] == 0:
        b = np.round(np.linspace(0, n_cells, shards + 1)).astype(np.int64)
    else:
        cut = np.searchsorted(cum, cum[-1] * np.arange(1, shards) / shards, side="left") + 1
        b = np.concatenate([[0], cut, [n_cells]]).astype(np.int64)
    for j in range(1, shards):            # strictly increasing: every shard owns a cell
        b[j] = max(b[j], b[j - 1] + 1)
    for j in range(shards - 1, 0, -1):
        b[j] = min(b[j], b[j + 1] - 1)
    return b


def split(index: Index, path: str | os.PathLike, shards: int, step: int = 200_000,
          bounds: Optional[np.ndarray] = None, **options) -> Index:
    """Write an index as a shard set in directory ``path`` (new or empty) and return the
    set open: shard j (``path/shard-000j``) holds the entries of one cell range, ranges
    balanced by entries, all from one committed state of ``index`` (which stays usable).
    ``path`` may hold other files, not an index or shards.
    Each shard is written as :meth:`cypq.Index.compact` writes an index.

    Parameters
    ----------
    index : cypq.Index
    path : str or os.PathLike
    shards : int
        How many shards (at most the number of cells).
    step : int
        Entries per write transaction.
    bounds : numpy.ndarray int64 (shards + 1,), optional
        The cell ranges (default: :func:`shard_bounds` of the index's cell sizes).
    **options
        Storage options of the shards (see :meth:`cypq.Index.create`).
    """
    path = os.fspath(path)
    if shard_dirs(path) or is_one_index(path):
        raise FileExistsError(f"{path} holds an index or shards already: split into a new "
                              "directory")
    name = uuid.uuid4().hex
    with index.storage.snapshot() as snap:
        if bounds is None:
            bounds = shard_bounds(snap.cell_sizes(), shards)
        bounds = np.asarray(bounds, dtype=np.int64)
        if len(bounds) != shards + 1:
            raise ValueError(f"bounds must have {shards + 1} values, got {len(bounds)}")
        for j in range(shards):
            lo, hi = int(bounds[j]), int(bounds[j + 1])
            index.compact(os.path.join(path, SHARD_DIR.format(j)), step, cells=(lo, hi),
                          shard=_place(name, j, bounds), snapshot=snap, **options).close()
    return Index.open(path, n_threads=index.n_threads)


def create(path: str | os.PathLike, model: LOPQModel, shards: int,
           n_threads: Optional[int] = None, **kwargs) -> Index:
    """A new, empty shard set of ``shards`` shards owning equal numbers of cells, in
    directory ``path`` (new or empty), returned open; ``kwargs`` as
    :meth:`cypq.Index.create` (vectors, tags, storage options) for every shard."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(f"{path} is not empty: create the shard set in a new directory")
    bounds = shard_bounds(np.zeros(model.V * model.V, np.int64), shards)
    name = uuid.uuid4().hex
    for j in range(shards):
        Index.create(os.path.join(path, SHARD_DIR.format(j)), model,
                     shard=_place(name, j, bounds), **kwargs).close()
    return Index.open(path, n_threads=n_threads)


def _place(name: str, j: int, bounds: np.ndarray) -> dict:
    """Shard j's record of its place in set ``name`` whose cell ranges are ``bounds``."""
    return {"set": name, "number": j, "count": len(bounds) - 1,
            "cells": [int(bounds[j]), int(bounds[j + 1])]}
