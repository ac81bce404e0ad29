"""The inverted multi-index: an LOPQ model joined to a storage of its codes."""
from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from typing import Optional

import numpy as np

from ._checks import as_codes, as_vectors, positive_int
from ._threads import resolve
from .code_layout import CodeLayout
from .filters import make_filter
from .index_parts import (_as_ids, _legacy_n_cells, _require_trained, _stored_model,
                          check_rerank, check_result_size, copy_entries, kept_vectors,
                          shard_of, storage_args, tag_names, tags_meta, vectors_of_codes)
from .lopq import LOPQModel
from .lopq_parts import code_pair
from .shard_set import open_storage
from .search import metric_distances, search as _search
from .stored_vectors import Reranker
from .storage.base import Storage, as_tags
from .storage.memory import MemoryStorage

DEFAULT_QUOTA = 10000
_QUERIES_PER_THREAD = 8   # default threads of a search: one per 8 queries (see _threads.py)


class Index:
    """Search index of LOPQ codes: add, remove, search by multi-sequence + ADC.

    Make one with :meth:`create` (on disk), :meth:`open` (an existing one) or
    :meth:`in_memory`; not by calling the class.
    """

    def __init__(self, model: LOPQModel, storage: Storage, path: Optional[str] = None,
                 readonly: bool = False, n_threads: Optional[int] = None):
        self._model = model
        self._storage = storage
        self._layout = CodeLayout.of_storage(model, storage, path or "the index")
        self.path, self.readonly, self.n_threads = path, readonly, n_threads
        self._closed, self._direct_cache = False, {}   # the latter: cypq.search's
        self.shard = shard_of(storage)   # its place in a shard set (cypq.shards), or None
        self._kept = kept_vectors(storage, model.D)   # how it keeps vectors (or None)

    # ------------------------------------------------------------------ making one
    @classmethod
    def in_memory(cls, model: LOPQModel, n_threads: Optional[int] = None,
                  pack_codes: Optional[bool] = None, vectors: Optional[str] = None,
                  tags=None, vector_ranges=None) -> "Index":
        """An index held in RAM.

        Parameters
        ----------
        model : LOPQModel
            Trained.
        n_threads : int, optional
            Threads of the kernels (None: all cores).
        pack_codes : bool, optional
            Store 4-bit codes two per byte (None: whenever the model's codes are 4-bit,
            ``subquantizer_clusters=16``); see :meth:`create`.
        vectors : str, optional
            Keep each entry's vector for re-ranking; see :meth:`create`.
        tags : bool or list of str, optional
            Keep a tag set per entry for filtered search; see :meth:`create`.
        vector_ranges : (lo, hi), optional
            For ``vectors='sq8'``; see :meth:`create`.
        """
        _require_trained(model)
        layout = CodeLayout.for_model(model, pack_codes)
        storage = MemoryStorage(model.V * model.V, layout.width, layout.dtype,
                                **storage_args(model, layout.features, vectors, tags, None,
                                               vector_ranges))
        return cls(model, storage, n_threads=n_threads)

    @classmethod
    def create(cls, path: str | os.PathLike, model: LOPQModel, n_threads: Optional[int] = None,
               pack_codes: Optional[bool] = None, vectors: Optional[str] = None,
               tags=None, vector_ranges=None, **options) -> "Index":
        """Create an on-disk index (an LMDB environment in the directory ``path``).

        Parameters
        ----------
        path : str or os.PathLike
            A directory that does not exist or is empty.
        model : LOPQModel
            Trained; stored inside the index.
        n_threads : int, optional
        pack_codes : bool, optional
            Store 4-bit codes (a model with ``subquantizer_clusters=16``) two per byte:
            half the code bytes, and the fastest scan. None: packed whenever the codes are
            4-bit and M a multiple of 4. False keeps a byte per code, which cypq 0.2 can
            read too (it refuses a packed index: format 5). True for another model is a
            ValueError.
        vectors : {None, 'float32', 'float16', 'uint8', 'sq8'}
            Keep each entry's vector (as given, in the input space), for exact re-ranking
            (``search(..., rerank=R)``) and :meth:`vectors`: 'float32' as given, 'float16'
            (finite values within +-65504), 'uint8' (whole numbers in [0, 255], e.g. SIFT):
            a vector the kind cannot hold is refused, not rounded; 'sq8': a byte per
            dimension, rounded to 256 levels within that dimension's ``vector_ranges``
            (lo, hi), learned from training vectors (:func:`cypq.stored_vectors.data_ranges`;
            values outside are kept as the nearest end). Stored in the same transaction as
            the entry, in its block after the codes (format 5: cypq 0.2 refuses it).
        tags : bool or list of str, optional
            Keep a uint64 tag set (64 boolean labels) per entry, for filtered search
            (``search(..., tags_any=...)``): True, or up to 64 names, bit j named by the
            j-th, so that filters may name bits. Stored with the entry's id (feature
            ``tags``: format 5); given at :meth:`add` (zero when not), changed by
            :meth:`set_tags`.
        **options
            Storage options (``block_capacity``, ``stage_capacity``, ``map_size``, ``sync``,
            ``bulk_state``), see :meth:`cypq.storage.lmdb.LMDBStorage.create`.
        """
        _require_trained(model)
        from .storage.lmdb import LMDBStorage
        layout = CodeLayout.for_model(model, pack_codes)
        shard = options.pop("shard", None)   # cypq.shards makes its shards so
        storage = LMDBStorage.create(os.fspath(path), model.V * model.V, layout.width,
                                     layout.dtype, **storage_args(
                                         model, layout.features, vectors, tags, shard,
                                         vector_ranges), **options)
        return cls(model, storage, os.fspath(path), n_threads=n_threads)

    @classmethod
    def open(cls, path: str | os.PathLike, readonly: bool = False,
             n_threads: Optional[int] = None, **options) -> "Index":
        """Open an on-disk index; the model comes from inside it.

        Parameters
        ----------
        path : str or os.PathLike, or a list of them
            An index directory; or a shard set (:mod:`cypq.shard_set`): a directory of
            ``shard-*`` indexes or the list of their directories, used as one index (the
            same results as the index they were split from; a transaction per shard).
        readonly : bool
            Open for searching only (no writer lock is taken).
        n_threads : int, optional
        **options
            ``map_size``, ``sync``, ``allow_incomplete`` (open an unfinished bulk load), see
            :meth:`cypq.storage.lmdb.LMDBStorage.open`.

        Raises
        ------
        cypq.IndexFormatError
            Not an index, a format this cypq cannot read, an unfinished bulk load, a
            model inside that does not fit the stored codes (IndexCorruptError when the
            data is damaged), or shards that are not one whole set.
        """
        storage, path = open_storage(path, readonly, _legacy_n_cells, **options)
        try:
            return cls(_stored_model(storage, path), storage, path, readonly, n_threads)
        except BaseException:
            storage.close()
            raise

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """Whether ``path`` holds an on-disk index (complete, or a bulk load in progress),
        as opposed to nothing or what an interrupted :meth:`create` leaves."""
        from .storage.lmdb import LMDBStorage
        return LMDBStorage.holds_index(os.fspath(path))

    # ------------------------------------------------------------------ basics
    @property
    def model(self) -> LOPQModel:
        """LOPQModel: the model whose codes the index holds."""
        return self._model

    @property
    def packed(self) -> bool:
        """bool: whether the index stores its 4-bit codes two per byte."""
        return self._layout.packed

    @property
    def vector_dtype(self) -> Optional[np.dtype]:
        """numpy.dtype or None: how the index keeps each entry's vector (None: none)."""
        return self._storage.vector_dtype if self._storage.vector_width else None

    @property
    def vector_kind(self) -> Optional[str]:
        """str or None: the ``vectors`` the index was created with (None: none)."""
        return self._kept and self._kept.kind

    @property
    def storage(self) -> Storage:
        """The storage behind the index, through its interface (:class:`cypq.storage.Storage`:
        bulk writing, merge, stats); the index's own methods are the way to change it."""
        return self._storage

    def __len__(self) -> int:
        self._check_open()
        return len(self._storage)

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the storage; the index cannot be used afterwards. Idempotent."""
        if not self._closed:
            self._closed = True
            self._storage.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} vectors"
        m = self._model
        return f"<cypq.Index {self.path or 'memory'}: {state}, V={m.V}, M={m.M}>"

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this index is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise PermissionError("this index was opened read-only: open it with "
                                  "readonly=False to change it")

    def _threads(self, rows: Optional[int] = None, per_thread: int = 64) -> int:
        return resolve(self.n_threads, rows, per_thread)

    def stats(self) -> dict:
        """Counts: vectors, cells, non-empty cells, largest cell; and the storage's
        (:meth:`cypq.storage.Storage.stats`: bytes on disk, entries staged, ...)."""
        self._check_open()
        with self._storage.snapshot() as snap:
            sizes = snap.cell_sizes()
            out = {"vectors": len(self._storage), "cells": int(sizes.size),
                   "non_empty_cells": int(np.count_nonzero(sizes)),
                   "largest_cell": int(sizes.max()) if sizes.size else 0}
        out.update(self._storage.stats())
        return out

    # ------------------------------------------------------------------ changes
    def add(self, vectors, ids=None, replace: bool = False, tags=None) -> np.ndarray:
        """Encode and add vectors in one transaction (on disk: staged, and followed by a
        merge of the stage when it reaches ``stage_capacity``; see :meth:`merge`).

        Parameters
        ----------
        vectors : array_like (N, D) or (D,)
        ids : array_like of int64 (N,), optional
            Unique; generated (continuing after the largest id so far) when omitted.
        replace : bool
            Overwrite ids already in the index instead of failing.
        tags : array_like of uint64 (N,), optional
            Each entry's tag set (an index made with ``tags``; zero when omitted).

        Returns
        -------
        numpy.ndarray int64 (N,): the ids.
        """
        self._check_writable()
        X = self._batch(vectors, "vectors")
        tags = self._check_tags(tags, len(X))
        stored = self._kept.store(X) if self._kept is not None else None
        code = self._model.predict(X)
        return self._add(code.coarse, code.fine, ids, replace, stored, tags)

    def add_codes(self, codes, ids, replace: bool = False, vectors=None,
                  tags=None) -> np.ndarray:
        """Add precomputed LOPQ codes in one transaction.

        Parameters
        ----------
        codes : LOPQCode or (coarse (N, 2), fine (N, M))
            As returned by ``model.predict`` for a batch.
        ids : array_like of int64 (N,)
        replace : bool
        vectors : array_like (N, D), optional
            The vectors the codes were made from: required by an index that keeps vectors
            (see :meth:`create`), refused by one that does not.
        tags : array_like of uint64 (N,), optional
            As :meth:`add`.

        Returns
        -------
        numpy.ndarray int64 (N,): the ids.
        """
        self._check_writable()
        coarse, fine = code_pair(codes)
        fine = np.asarray(fine)
        if fine.ndim == 1:
            fine, coarse = fine[None, :], np.asarray(coarse)[None, :]
        fine = as_codes(fine, self._model.M, self._model.subquantizer_clusters, "fine codes")
        coarse = self._model.check_coarse_codes(coarse, fine.shape[0])
        if ids is None:
            raise ValueError("add_codes needs the ids of the codes")
        stored = vectors_of_codes(self._kept, vectors if vectors is None else self._batch(
            vectors, "vectors"), len(fine))
        return self._add(coarse, fine, ids, replace, stored,
                         self._check_tags(tags, len(fine)))

    def _add(self, coarse, fine, ids, replace, vectors=None, tags=None):
        n = fine.shape[0]
        if ids is not None:
            ids = _as_ids(ids, n)
        if not n:
            return np.empty(0, dtype=np.int64)
        cells = self._model.get_cell_id_for_coarse_codes(coarse)
        if self.shard is not None and not np.all((cells >= self.shard["cells"][0]) & (
                cells < self.shard["cells"][1])):
            raise ValueError(f"{self.path} is shard {self.shard['number']} of a shard set and "
                             "does not own every cell of these vectors: open the whole "
                             "set (Index.open of its directory) and add there")
        return self._storage.add(cells, ids, self._layout.pack(fine), replace=replace,
                                 vectors=vectors, tags=tags)

    def _check_tags(self, tags, n: int) -> Optional[np.ndarray]:
        tags = None if tags is None else as_tags(np.atleast_1d(tags), n)
        if tags is not None and not self._storage.keeps_tags:
            self.keep_tags()   # an index without tags gets them when tags are first written
        return tags

    def keep_tags(self, names=None) -> None:
        """Start keeping tags (all zero) in an index made without them, in place, in one
        transaction (every block rewritten); done by itself when tags are first given.
        ``names``: list of str, as :meth:`create`'s ``tags``. Other processes reopen it."""
        self._check_writable()
        self._storage.keep_tags(tags_meta(names))

    @property
    def tag_names(self) -> list[str]:
        """The names of the tag bits (bit j is the j-th; [] when unnamed or no tags)."""
        return tag_names(self._storage)

    def set_tags(self, ids, tags) -> int:
        """Replace the tag sets of ids in one transaction (absent ids are ignored).

        ids : array_like of int64 (N,); tags : array_like of uint64 (N,). Returns how many
        entries changed.
        """
        self._check_writable()
        ids = _as_ids(ids, None)
        tags = self._check_tags(tags, len(ids))
        return self._storage.set_tags(ids, tags) if tags is not None else 0

    def merge(self) -> int:
        """Move the entries staged by recent adds into their cells' blocks now (adds do it
        once ``stage_capacity`` are staged). Returns how many moved (0 in memory)."""
        self._check_writable()
        return self._storage.merge()

    def remove(self, ids) -> int:
        """Remove vectors by id in one transaction; absent ids are ignored.

        Returns
        -------
        int: how many were removed.
        """
        self._check_writable()
        ids = _as_ids(ids, None, unique=False)
        return self._storage.remove(ids)

    def contains(self, ids) -> np.ndarray:
        """bool array (N,): which ids are in the index."""
        self._check_open()
        return self._storage.lookup(_as_ids(ids, None, unique=False))[0]

    def lookup(self, ids, with_tags: bool = False) -> tuple:
        """Where ids are: (found (N,) bool, cells (N,) int64, -1 if absent, fine codes (N, M)),
        and with ``with_tags`` their tag sets (N,) uint64 (0 if absent or without tags)."""
        self._check_open()
        ids = _as_ids(ids, None, unique=False)
        found, cells, codes = self._storage.lookup(ids)
        if not with_tags:
            return found, cells, self._layout.unpack(codes)
        tags = (self._storage.tags(ids)[1] if self._storage.keeps_tags
                else np.zeros(len(ids), np.uint64))     # an index without tags: all zero
        return found, cells, self._layout.unpack(codes), tags

    def vectors(self, ids) -> np.ndarray:
        """The stored vectors of ids, as the index keeps them (see :meth:`create`).

        Parameters
        ----------
        ids : array_like of int64 (N,)

        Returns
        -------
        numpy.ndarray (N, D) of :attr:`vector_dtype` (sq8: float32, the rounded values)

        Raises
        ------
        ValueError
            The index keeps no vectors.
        KeyError
            An id is not in the index (naming the first).
        """
        self._check_open()
        if self._kept is None:
            raise ValueError("this index keeps no vectors: create it with vectors='float32', "
                             "'float16', 'uint8' or 'sq8' (or rebuild it so)")
        ids = _as_ids(ids, None, unique=False)
        found, rows = self._storage.vectors(ids)
        if not found.all():
            raise KeyError(f"{int((~found).sum())} ids are not in the index (first: "
                           f"{int(ids[~found][0])})")
        return self._kept.read(rows)

    def stored_vectors(self, X: np.ndarray, first_row: int = 0) -> np.ndarray:
        """Validated float32 vectors X (N, D) as this index keeps them, for writers that go
        to the storage directly (the bulk loader); ``first_row`` numbers X's rows in errors."""
        return self._kept.store(X, first_row)

    def stored_codes(self, fine) -> np.ndarray:
        """Fine codes (N, M) of this index's model as its storage holds them (N, width):
        packed two per byte in a packed index (see :attr:`packed`), else as they are. For
        writers that go to the storage directly (the bulk loader)."""
        return self._layout.pack(as_codes(fine, self._model.M,
                                          self._model.subquantizer_clusters, "fine codes"))

    # ------------------------------------------------------------------ operating
    def verify(self) -> list[str]:
        """Check the whole index (see :meth:`cypq.storage.Storage.verify`): one line per
        problem, an empty list when it is sound."""
        self._check_open()
        return self._storage.verify()

    def backup(self, path: str | os.PathLike) -> None:
        """A consistent copy of the index in directory ``path`` (new or empty), taken from
        one committed state while writers go on; it opens like the original."""
        self._check_open()
        self._storage.backup(os.fspath(path))

    def compact(self, path: str | os.PathLike, step: int = 200_000, tags=None,
                **options) -> "Index":
        """Write the index anew, compactly, into directory ``path`` (new or empty) and
        return it open: entries in cell order through the bulk writer (full pages, staged
        entries merged, the id table in id order), from one committed state while writers
        go on. An incrementally built index shrinks to about the size of a bulk-built one.

        Parameters
        ----------
        path : str or os.PathLike
        step : int
            Entries per write transaction.
        tags : bool or list of str, optional
            The new index keeps tags so (see :meth:`create`; default: as this one, its
            tags copied): how an index without tags gets them (all zero).
        **options
            Storage options of the new index (default: this one's block and stage
            capacities); :func:`cypq.shards.split` adds ``cells`` (lo, hi), ``shard`` and
            ``snapshot``: one cell range of its snapshot, a shard.
        """
        self._check_open()
        path, (lo, hi) = os.fspath(path), options.pop("cells", (0, None))
        held = options.pop("snapshot", None)
        options = {**self._storage.options(), "shard": self.shard, **options}
        state = b'{"compact": true}'   # the bulk marker until the copy is complete
        new = Index.create(path, self._model, n_threads=self.n_threads, bulk_state=state,
                           pack_codes=self._layout.packed,
                           vectors=self.vector_kind, vector_ranges=self._kept and
                           self._kept.ranges(), tags=tags
                           if tags is not None else self._storage.keeps_tags and (
                               self.tag_names or True), **options)
        try:
            scratch = os.path.join(path, "compact-runs")
            os.makedirs(scratch, exist_ok=True)
            writer = new.storage.bulk_writer(scratch, step=step)
            with nullcontext(held) if held else self._storage.snapshot() as snap:
                copy_entries(snap, self._storage, writer, state, step, lo, hi)
            writer.finish(state)
            shutil.rmtree(scratch, ignore_errors=True)
        except BaseException:
            new.close()
            raise
        return new

    # ------------------------------------------------------------------ search
    def search(self, queries, k: int = 10, quota: Optional[int] = None, w: Optional[int] = None,
               return_stats: bool = False, rerank: Optional[int] = None, tags_any=None,
               tags_all=None, tags_none=None, ids=None, exclude_ids=None, plan: str = "auto"):
        """Approximate nearest neighbours by LOPQ: whole cells in multi-sequence order until
        they hold at least ``quota`` vectors (or ``w`` cells were visited), ranked by
        asymmetric distance.

        Parameters
        ----------
        queries : array_like (nq, D) or (D,)
        k : int
            Results per query. Above 2**20 it must not exceed the number of stored
            entries, and nq * k must stay under 2**26 (ValueError, before anything is
            allocated): an output the machine cannot hold is refused, not attempted.
        quota : int, optional
            Candidates to gather (default 10000; 0 scans every cell).
        w : int, optional
            Cap on the cells visited, empty ones included.
        return_stats : bool
            Also return a SearchStats (cells scanned and visited, codes scanned per query).
        rerank : int, optional
            Re-rank the best ``rerank`` (>= k) candidates by ADC exactly with the stored
            vectors (an index made with ``vectors``), read from the same committed state
            as the codes; the k best by exact score are returned with exact distances.
        tags_any, tags_all, tags_none : optional
            Only entries whose tags have any of / all of / none of these bits (an index
            made with ``tags``): a uint64 mask, a tag name or list of names, or an array
            of one mask per query. The quota then counts only entries that pass: a
            selective filter visits more cells rather than return fewer results.
        ids, exclude_ids : array_like of int64, optional
            Only entries whose ids are in (not in) these.
        plan : {'auto', 'scan', 'direct'}
            How a filtered search finds its entries: 'scan' walks the cells, 'direct'
            scores every passing entry (exact over them), 'auto' picks by the number of
            passing entries (see :func:`cypq.search.filtered`).

        Returns
        -------
        D : numpy.ndarray float32 (nq, k)
            Squared L2 distances from the query to the vectors' reconstructions, ascending,
            inf where a query has fewer than k results; for a model with metric='cosine',
            cosine similarities to the reconstructions, descending, -inf where fewer; for
            metric='ip', inner products with the reconstructions, descending, -inf where
            fewer (faiss's conventions for each). With ``rerank``: the same, of the stored
            vectors themselves (cosine: of the query and the stored vector).
        I : numpy.ndarray int64 (nq, k)
            Ids; -1 where a query has fewer than k results.
        """
        self._check_open()
        k = positive_int(k, "k")
        nq = np.shape(queries)[0] if np.ndim(queries) == 2 else 1
        check_result_size(k, nq, len(self))
        quota = DEFAULT_QUOTA if quota is None else positive_int(quota, "quota", 0)
        if w is not None:
            w = positive_int(w, "w")
        threads = self._threads(nq, _QUERIES_PER_THREAD)
        Q = self._model.to_model_space(queries, "queries", threads)
        exact = None
        if rerank is not None:
            rerank = check_rerank(rerank, k, self._kept)
            X = self._model.normalize(self._batch(queries, "queries"))
            exact = Reranker(X, k, self._model.metric, self._kept, threads)
        D, I, stats = _search(self._model, self._storage, Q, rerank or k, quota, w, threads,
                              self._layout.packed, exact, make_filter(
                                  len(Q), self._storage.keeps_tags, self.tag_names, tags_any,
                                  tags_all, tags_none, ids, exclude_ids, plan),
                              self._layout.unpack, self._direct_cache)
        D = metric_distances(D, I, self._model.metric, rerank is not None)
        return (D, I, stats) if return_stats else (D, I)

    def _batch(self, x, name: str) -> np.ndarray:
        """float32 (N, D), validated, of one vector (D,) or a batch (N, D) (N may be 0)."""
        arr = np.asarray(x)
        return as_vectors(arr[None, :] if arr.ndim == 1 else arr, name, dim=self._model.D,
                          allow_empty=True)
