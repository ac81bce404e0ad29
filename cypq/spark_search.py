"""LOPQ search on Spark: a batch k-NN join of many queries against a corpus of codes split by
cell range over the executors (``cypq.spark.search``, ``cypq.spark.knn_graph``).

The corpus is a set of parts, each owning a range of cells: the files of the Parquet codes
``cypq.spark.encode`` writes (range-partitioned by cell; consecutive files grouped into
about ``num_partitions`` parts), or the shards of a shard set (:mod:`cypq.shard_set`). The
job runs in three steps, with no RPC or scheduler of its own:

1. route (on the query partitions): each query's cells in multi-sequence order, computed
   once from the corpus's cell sizes (read on the driver and broadcast), exactly as
   ``Index.search`` lists them; each query goes, with its cells, to the parts owning them;
2. scan (one task per part): the part's entries read where they are stored, each query's
   ADC tables built there, its cells scanned by cypq's kernels (one thread per task);
3. merge (per batch of queries): the parts' top-k merged by (distance, id), the scan's own
   ranking, so the result is the one ``Index.search`` returns on the same codes.

Every input is checked on the driver before the search is scheduled.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np

from ._checks import positive_int
from .code_files import CodeSource, _pq, find_code_files
from .direct_scan import list_shape
from .lopq import LOPQModel
from .index import DEFAULT_QUOTA, Index
from .search import cell_lists, merge_top_k, metric_distances, scan_lists
from .shard_set import is_one_index, shard_dirs
from .spark_input import _arrow_vectors, blocks
from .storage.frozen import FrozenCells

RESULT_SCHEMA = "query_id long, ids array<long>, distances array<float>"
QUERY_BATCH = 512      # queries routed, scanned and merged together


class Corpus:
    """The parts of a corpus, as the driver plans a search over them.

    Attributes
    ----------
    kind : {'codes', 'shards'}
    parts : list of list of str
        Per part, its Parquet files or its shard directory.
    starts : numpy.ndarray int64 (n_parts,)
        The first cell each part owns (parts in cell order; a part owns up to the next's).
    sizes : numpy.ndarray int64 (V * V,)
        Entries per cell over the whole corpus.
    model : LOPQModel
    """

    def __init__(self, corpus, model: Optional[LOPQModel], num_partitions: int):
        if not isinstance(corpus, (str, os.PathLike, list, tuple)):
            raise TypeError(f"corpus must be a path or a list of shard paths, got "
                            f"{type(corpus).__name__}")
        if isinstance(corpus, (list, tuple)) or shard_dirs(corpus) or is_one_index(corpus):
            self._of_shards(corpus, model)
        else:
            self._of_codes(corpus, model, num_partitions)

    def _of_shards(self, corpus, model) -> None:
        with Index.open(corpus, readonly=True) as ix:   # checks the set is whole and one
            if model is not None and model != ix.model:
                raise ValueError("the model given is not the model inside the shards: "
                                 "leave it out, or search the shards of that model")
            self.model, self.kind = ix.model, "shards"
            with ix.storage.snapshot() as snap:
                self.sizes = snap.cell_sizes().copy()
            parts = ix.storage.cell_ranges()
            self.parts = [[name or ix.path] for name, _, _ in parts]
            self.starts = np.array([lo for _, lo, _ in parts], np.int64)

    def _of_codes(self, corpus, model, num_partitions: int) -> None:
        if model is None:
            raise ValueError("searching Parquet codes needs the model that made them "
                             "(model=...)")
        try:
            files = find_code_files(corpus)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} (the corpus is the Parquet codes of "
                                    "cypq.spark.encode, or a shard set)") from None
        n_cells = model.V * model.V
        pq, lo, hi, sizes = _pq(), [], [], np.zeros(n_cells, np.int64)
        CodeSource(files)   # the columns of every file are checked
        for f in files:
            cells = pq.read_table(f, columns=["cell"]).column(0).to_numpy()
            if not len(cells):
                lo.append(n_cells)
                hi.append(-1)
                continue
            if cells.min() < 0 or cells.max() >= n_cells:
                raise ValueError(f"{f}: cells outside [0, {n_cells}): the codes were made "
                                 f"by another model than this one (V={model.V})")
            sizes += np.bincount(cells, minlength=n_cells)
            lo.append(int(cells.min()))
            hi.append(int(cells.max()))
        keep = [j for j in np.argsort(lo, kind="stable") if hi[j] >= 0]
        for a, b in zip(keep, keep[1:]):
            if hi[a] >= lo[b]:
                raise ValueError(f"{files[a]} and {files[b]} hold cells of one range (cells "
                                 f"{lo[b]}..{hi[a]}): the codes are not range-partitioned "
                                 "by cell; write them with cypq.spark.encode(..., path=)")
        # consecutive files grouped into about num_partitions parts of equal rows
        rows = np.array([sizes[lo[j]:hi[j] + 1].sum() for j in keep], np.int64)
        group = (np.cumsum(rows) - rows) * num_partitions // max(rows.sum(), 1)
        self.parts, starts = [], []
        for g in np.unique(group):
            members = [keep[j] for j in np.flatnonzero(group == g)]
            self.parts.append([files[j] for j in members])
            starts.append(lo[members[0]])
        if not self.parts:   # no entries at all: one empty part, every result -1
            self.parts, starts = [[]], [0]
        self.starts = np.asarray(starts, np.int64)
        self.starts[:1] = 0
        self.kind, self.model, self.sizes = "codes", model, sizes


def search(queries, corpus, model: Optional[LOPQModel] = None, k: int = 10,
           quota: Optional[int] = None, path: Optional[str] = None, id_col: str = "id",
           vector_col: str = "vector", num_partitions: Optional[int] = None,
           mode: str = "errorifexists", spark=None, exclude_self: bool = False,
           timings: Optional[dict] = None):
    """The k nearest corpus entries of every query, by LOPQ (multi-sequence cell order until
    ``quota`` entries, asymmetric distances), searched on Spark where the codes are.

    Parameters
    ----------
    queries : DataFrame (id_col, vector_col), RDD of (id, vector), or str
        The queries, or a vector file (.npy, .fvecs, .bvecs, ...) whose row numbers are
        their ids.
    corpus : str or list of str
        Parquet codes of :func:`cypq.spark.encode` (a directory or glob; range-partitioned
        by cell as it writes them), or a shard set (a directory of ``shard-*`` indexes or
        the list of their directories). Every executor must be able to read it (a shared
        file system).
    model : LOPQModel, optional
        The model of the codes (required for Parquet codes; a shard set holds its own).
    k : int
    quota : int, optional
        As :meth:`cypq.Index.search` (default 10000).
    path : str, optional
        Also write the result there as Parquet.
    num_partitions : int, optional
        Scan tasks over Parquet codes (default: Spark's default parallelism); a shard set
        has a task per shard.
    mode : str
        Spark's save mode for ``path``.
    spark : SparkSession, optional
    exclude_self : bool
        Leave each query's own id out of its results (a query that is also in the corpus).
    timings : dict, optional
        Filled with Spark accumulators of the seconds the tasks spent (summed over tasks,
        read once the result was computed): ``route`` (cell lists), ``load`` (reading the
        parts), ``scan`` (tables and ADC) and ``merge``.

    Returns
    -------
    DataFrame (query_id long, ids array<long>, distances array<float>): per query its k
    results best first, with the distances of :meth:`cypq.Index.search` for the model's
    metric; -1 ids (and inf / -inf distances) where fewer than k. The same results as
    ``Index.search`` over the same codes with the same quota.
    """
    from pyspark.sql import SparkSession

    spark = spark or SparkSession.builder.getOrCreate()
    sc = spark.sparkContext
    k = positive_int(k, "k")
    quota = DEFAULT_QUOTA if quota is None else positive_int(quota, "quota", 0)
    n_tasks = positive_int(num_partitions or sc.defaultParallelism, "num_partitions")
    plan = Corpus(corpus, model, n_tasks)
    model = plan.model
    qblocks = _query_blocks(sc, queries, id_col, vector_col, model.D)
    bc = sc.broadcast((model, plan.sizes, plan.starts, k + bool(exclude_self), quota))
    n_parts = len(plan.parts)
    parts = plan.parts
    kind = plan.kind
    clock = {name: sc.accumulator(0.0) for name in ("route", "load", "scan", "merge")}
    if timings is not None:
        timings.update(clock)

    def route(index, it):
        m, sizes, starts, kk, q = bc.value
        m.n_threads = 1
        view = m.kernel_view()
        cap = list_shape(view.V * view.V, q, None)[0]
        small = np.int32 if view.V ** 2 < 1 << 31 else np.int64   # less through the shuffle
        b, spent = 0, 0.0
        for ids, X in it:
            for a in range(0, len(ids), QUERY_BATCH):
                t0 = time.perf_counter()
                key = (index, b)
                b += 1
                qid, Q = ids[a:a + QUERY_BATCH], m.to_model_space(X[a:a + QUERY_BATCH])
                # the batch's ids ride to any one part, for the merge to know every query
                yield b % n_parts, (key, qid)
                flat, n_cells, _ = cell_lists(view, Q, sizes, q, None, cap, 1)
                owner = np.searchsorted(starts, flat, side="right") - 1
                query_of = np.repeat(np.arange(len(Q)), n_cells)
                out = []
                for p in np.flatnonzero(np.bincount(owner, minlength=len(starts))):
                    sel = owner == p
                    n_p = np.bincount(query_of[sel], minlength=len(Q))
                    rows = np.flatnonzero(n_p)
                    out.append((int(p), (key, rows, Q[rows], flat[sel].astype(small),
                                         n_p[rows])))
                spent += time.perf_counter() - t0
                yield from out
        clock["route"].add(spent)

    def scan(p, it):
        t0 = time.perf_counter()
        m, kk = bc.value[0], bc.value[3]
        m.n_threads = 1
        view = m.kernel_view()
        with _PartSnapshot(kind, parts[p], m) as (snap, packed):
            clock["load"].add(time.perf_counter() - t0)
            spent = 0.0
            for _, rec in it:
                if len(rec) == 2:
                    yield rec[0], ("base", rec[1])
                    continue
                t0 = time.perf_counter()
                key, rows, Q, flat, n_p = rec
                D, I, _, _ = scan_lists(view, snap, Q, flat.astype(np.int64), n_p, kk, 1,
                                        packed)
                spent += time.perf_counter() - t0
                yield key, ("part", rows, D, I)
            clock["scan"].add(spent)

    scanned = qblocks.mapPartitionsWithIndex(route).partitionBy(n_parts, lambda p: p) \
        .mapPartitionsWithIndex(scan)
    metric = model.metric

    def merge(kv):
        t0 = time.perf_counter()
        rows = list(_merged_rows(list(kv[1]), k, metric, exclude_self))
        clock["merge"].add(time.perf_counter() - t0)
        return rows

    out = scanned.groupByKey().flatMap(merge)
    df = spark.createDataFrame(out, RESULT_SCHEMA)
    if path is not None:
        df.write.mode(mode).parquet(path)
    return df


def _query_blocks(sc, queries, id_col, vector_col, dim):
    """RDD of query blocks (ids, X), the dimension checked on the driver first."""
    if isinstance(queries, (str, os.PathLike)):
        from .vector_files import VectorSource
        src = VectorSource.open(queries)
        if src.dim != dim:
            raise ValueError(f"the queries in {queries} have dimension {src.dim}; the model "
                             f"takes {dim}")
        X = src.rows(0, len(src))
        step = max(1, -(-len(X) // max(sc.defaultParallelism, 1)))
        return sc.parallelize([(np.arange(a, min(a + step, len(X)), dtype=np.int64),
                                np.asarray(X[a:a + step], np.float32))
                               for a in range(0, len(X), step)], None)
    rdd = blocks(queries, id_col, vector_col)
    if hasattr(queries, "schema") and _arrow_vectors(queries, id_col, vector_col):
        # array columns: their lengths checked by a job in the JVM alone
        from pyspark.sql import functions as F
        bad = queries.select(F.size(vector_col).alias("d")).where(f"d != {int(dim)}").limit(1)
        first = [r.d for r in bad.collect()]
    else:
        first = rdd.filter(lambda b: len(b[0])).map(lambda b: b[1].shape[1]).take(1)
    if first and first[0] != dim:
        raise ValueError(f"the queries have dimension {first[0]}; the model takes {dim}")
    return rdd


class _PartSnapshot:
    """(snapshot, packed) of one part of the corpus, in a scan task."""

    def __init__(self, kind, where, model):
        self.kind, self.where, self.model, self.index = kind, where, model, None

    def __enter__(self):
        if self.kind == "shards":
            self.index = Index.open(self.where[0], readonly=True)
            self.held = self.index.storage.snapshot()
            return self.held.__enter__(), self.index.packed
        ids, cells, fine = [], [], []
        for _, i, c, f, _t in CodeSource(self.where).chunks(1 << 20, 0,
                                                            self.model.fine_code_dtype):
            ids.append(i)
            cells.append(c)
            fine.append(f)
        M = self.model.M
        snap = FrozenCells(self.model.V ** 2, np.concatenate(cells) if cells else
                           np.zeros(0, np.int64), np.concatenate(ids) if ids else
                           np.zeros(0, np.int64), np.concatenate(fine) if fine else
                           np.zeros((0, M), self.model.fine_code_dtype))
        return snap, False

    def __exit__(self, *exc):
        if self.index is not None:
            self.held.__exit__(*exc)
            self.index.close()


def _merged_rows(values: list, k: int, metric: str, exclude_self: bool):
    """Rows (query id, ids, distances) of one batch from its base and its parts' top-k."""
    qid = next(v[1] for v in values if v[0] == "base")
    kk = k + bool(exclude_self)
    D = np.full((len(qid), kk), np.inf, np.float32)
    I = np.full((len(qid), kk), -1, np.int64)
    for v in values:
        if v[0] == "part":
            _, rows, Dp, Ip = v
            D[rows], I[rows] = merge_top_k(np.hstack([D[rows], Dp]), np.hstack([I[rows], Ip]),
                                           kk)
    if exclude_self:   # each query's own id out (or else its last result)
        mine = I == qid[:, None]
        drop = np.where(mine.any(1), mine.argmax(1), kk - 1)
        keep = np.arange(kk)[None, :] != drop[:, None]
        D, I = D[keep].reshape(len(qid), k), I[keep].reshape(len(qid), k)
    D = metric_distances(D, I, metric)
    for j in range(len(qid)):
        yield int(qid[j]), I[j].tolist(), D[j].tolist()
