"""Rebuilding an index under a new model from the vectors it keeps: retrain when the data
drifts without going back to the source.

The old index is read from one committed state (a snapshot held for the whole rebuild) and
stays readable throughout, and writable on disk (an in-memory index's writes wait for the
rebuild); writes made to it meanwhile are not in the new index. The new one is written by
the bulk loader (cypq.bulk): streaming, in chunks, and resumable by running the same rebuild
again while the old index is unchanged.
"""
from __future__ import annotations

import os
import warnings
import zlib
from typing import Callable, Optional

import numpy as np

from ._runs import ranges
from .bulk import BulkLoadError, BulkSummary, bulk_load
from .index_parts import kept_vectors
from .lopq import LOPQModel
from .vector_files import VectorSource


class StoredVectors(VectorSource):
    """The vectors an index keeps, as the bulk loader's input: rows in the index's cell
    order, from one committed state; ``ids`` (N,) int64 their ids. Close it when done.

    Parameters
    ----------
    index : cypq.Index
        An index that keeps vectors (``vectors=...`` at creation).
    """

    def __init__(self, index):   # noqa: D107 - not the dataclass's: no files here
        if index.vector_kind is None:
            raise ValueError("this index keeps no vectors, so it cannot be rebuilt from "
                             "itself: build the new index from the source vectors")
        self.files, self.dim, self._index = [], index.model.D, index
        self._kept = kept_vectors(index.storage, index.model.D)   # sq8: values from codes
        self._held = index.storage.snapshot()
        self._snap = self._held.__enter__()
        self._ends = np.cumsum(self._snap.cell_sizes())
        lo, ids = 0, []
        for hi in ranges(self._ends, 1 << 20):
            ids.append(self._snap.entries(lo, hi)[1])
            lo = hi
        self.ids = np.concatenate(ids + [np.empty(0, np.int64)])

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def vector_ranges(self):
        """The sq8 ranges the vectors were kept over (None for another kind): a rebuild
        keeps them."""
        return self._kept.ranges()

    def identity(self) -> dict:
        return {"rebuild_of": os.path.abspath(self._index.path) if self._index.path
                else "memory", "entries": len(self), "ids": zlib.crc32(self.ids.tobytes())}

    def rows(self, start: int, stop: int) -> np.ndarray:
        """float32 (stop - start, D): rows start .. stop - 1 (in cell order)."""
        lo = int(np.searchsorted(self._ends, start, side="right"))
        hi = int(np.searchsorted(self._ends, stop - 1, side="right")) + 1
        first = int(self._ends[lo - 1]) if lo else 0
        vectors = self._snap.entries(lo, hi, vectors=True)[3]
        return self._kept.read(vectors[start - first:stop - first]).astype(np.float32)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """float32 (n, D): n stored vectors drawn at random (all when n >= N)."""
        pick = np.sort(np.random.default_rng(seed).choice(len(self), min(n, len(self)),
                                                          replace=False))
        return self._kept.read(self._snap.vectors(self.ids[pick])[1]).astype(np.float32)

    def close(self) -> None:
        if self._held is not None:
            self._held.__exit__(None, None, None)
            self._held = None


def rebuild(index, path: str | os.PathLike, model: Optional[LOPQModel] = None,
            sample: int = 100_000, chunk_size: int = 200_000, n_threads: Optional[int] = None,
            progress: bool = True, out: Callable[[str], None] = print,
            seed: int = 0) -> BulkSummary:
    """Write a new on-disk index of the same ids and vectors under a new model.

    Parameters
    ----------
    index : cypq.Index
        Keeps vectors; read from one committed state, and usable meanwhile.
    path : str or os.PathLike
        The new index's directory: new (or empty), or an unfinished rebuild to go on with.
    model : LOPQModel, optional
        Trained, of the index's input dimension. None: a model with the old one's settings
        (V, M, codewords, metric, PCA) is trained on ``sample`` stored vectors.
    sample : int
        Vectors to train on when no model is given.
    chunk_size, n_threads, progress, out
        As :func:`cypq.bulk.bulk_load`.
    seed : int
        Of the training sample and the training.

    Returns
    -------
    cypq.bulk.BulkSummary

    Raises
    ------
    ValueError
        The index keeps no vectors, or the model has another input dimension.
    cypq.bulk.BulkLoadError
        ``path`` holds something else (a complete index, another load), or the old index
        changed since the rebuild into ``path`` began.
    """
    if model is not None and model.D != index.model.D:
        raise ValueError(f"the new model takes {model.D}-d vectors, the index holds "
                         f"{index.model.D}-d ones")
    source = StoredVectors(index)
    old = index.model

    def train() -> LOPQModel:
        out(f"training a new model on {min(sample, len(source)):,} stored vectors")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # small cells: reported by fit
            return LOPQModel(V=old.V, M=old.M, subquantizer_clusters=old.subquantizer_clusters,
                             metric=old.metric, pca=old.pca_dim is not None,
                             pca_dim=old.pca_dim, n_threads=n_threads
                             ).fit(source.sample(sample, seed), random_state=seed)
    try:
        if not len(source):
            raise BulkLoadError("the index is empty: nothing to rebuild")
        return bulk_load(path, source, model=model, train=train, ids=source.ids,
                         chunk_size=chunk_size, n_threads=n_threads,
                         block_capacity=index.storage.options().get("block_capacity", 128),
                         progress=progress, out=out, vectors=index.vector_kind,
                         vector_ranges=source.vector_ranges)
    finally:
        source.close()
