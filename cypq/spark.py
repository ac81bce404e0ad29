"""LOPQ on Spark: train and encode when the data outgrows one machine (``pip install
'cypq[spark]'``; importing cypq does not need pyspark, this module does).

The data never comes to the driver: every pass runs cypq's kernels on blocks of rows inside
``mapPartitions`` (one kernel thread per task: Spark's tasks are the parallelism) and brings
back only sums, tree-aggregated:

- PCA (optional): the data's moments (count, mean, centred second moment), merged exactly;
- coarse k-means per half: Lloyd steps with the centroids broadcast and per-centroid sums
  and counts aggregated; empty clusters split the largest, as in :meth:`LOPQModel.fit`;
- local rotations: per-cluster residual moments, merged exactly, then the eigen-decompositions
  on the driver (:func:`cypq.lopq_training.rotations_from_moments`, the same code as the local fit);
- fine subquantizers: on a sample collected to the driver (``sample_fraction``) with
  :meth:`LOPQModel.fit`, which trains only what is missing.

Input: a DataFrame with an id column and a vector column (array<float/double> or an ML
``Vector``), an RDD of (id, vector), or LOPQ's Spark text format (:func:`read_lopq_text`).
"""
from __future__ import annotations

import base64
import copy
import os
import pickle
import shutil
import tempfile
from typing import Optional

import numpy as np

from .kmeans import centroids_from_sums, lloyd_sums
from .lopq import LOPQModel
from .lopq_parts import choose_auto
from .lopq_training import (combine_moments, data_moments, pca_from_moments,
                            rotation_report, rotations_from_moments)
from .spark_input import _arrow_matrix, _arrow_vectors, _rows, _to_blocks, blocks
from .spark_search import search

try:
    import pyspark  # noqa: F401
except ImportError:  # pragma: no cover - the message is the point
    raise ImportError("cypq.spark needs pyspark: pip install 'cypq[spark]'") from None

CODES_SCHEMA = "id long, cell long, c0 int, c1 int, fine binary"


__all__ = ["train_lopq", "encode", "search", "knn_graph", "blocks", "read_lopq_text",
           "write_lopq_text"]


# ---------------------------------------------------------------------------- input
def read_lopq_text(sc, path: str, min_partitions: Optional[int] = None, parse_id=int):
    """The LOPQ Spark scripts' data format: one line per vector, ``id<TAB>base64(pickled
    numpy array)`` (pickles of Python 2 included).

    Parameters
    ----------
    sc : SparkContext
    path : str
        Text file(s), as ``sc.textFile`` takes them.
    min_partitions : int, optional
    parse_id : callable
        Turns the id text into the id (default int: cypq indexes use int64 ids; map string
        ids to numbers first, e.g. with ``zipWithIndex``).

    Returns
    -------
    RDD of (id, numpy.ndarray)
    """
    def parse(line):
        key, _, payload = line.partition("\t")
        vec = pickle.loads(base64.b64decode(payload), encoding="latin1")
        return parse_id(key), np.asarray(vec)
    return sc.textFile(path, min_partitions).filter(lambda s: s.strip()).map(parse)


def write_lopq_text(rdd, path: str) -> None:
    """Write an RDD of (id, numpy array) in the LOPQ Spark scripts' text format."""
    rdd.map(lambda kv: f"{kv[0]}\t"
            + base64.b64encode(pickle.dumps(np.asarray(kv[1]), protocol=2)).decode()) \
        .saveAsTextFile(path)


# ---------------------------------------------------------------------------- training
def _add(a, b):
    return tuple(x + y for x, y in zip(a, b))


def train_lopq(data, V: Optional[int], M: int, subquantizer_clusters: int = 256,
               pca: Optional[bool] = None,
               sample_fraction: Optional[float] = None, seed: int = 0,
               kmeans_coarse_iters: int = 10, kmeans_local_iters: int = 20,
               model: Optional[LOPQModel] = None, id_col: str = "id",
               vector_col: str = "vector", verbose: bool = False,
               pca_dim: Optional[int] = None, metric: str = "l2") -> LOPQModel:
    """Train an LOPQ model on a Spark DataFrame or RDD (see the module docstring).

    Parameters
    ----------
    data : DataFrame (id_col, vector_col) or RDD of (id, vector)
    V, M, subquantizer_clusters : int
        As :class:`cypq.LOPQModel` (V None: chosen from the number of rows, by the same
        rule).
    pca : bool, optional
        PCA + eigenvalue-balanced halves first; None: as :class:`cypq.LOPQModel` chooses
        (to D/2 from 256 dimensions on).
    pca_dim : int, optional
        Keep this many leading PCA directions (implies pca), as :class:`cypq.LOPQModel`.
    metric : {'l2', 'cosine', 'ip'}
        As :class:`cypq.LOPQModel` (cosine: vectors scaled to unit norm on the executors).
    sample_fraction : float, optional
        Share of the rows the fine subquantizers train on (collected to the driver); default:
        enough for about 200,000 rows (all rows when there are fewer).
    seed : int
        Seed of every sample and initialisation.
    kmeans_coarse_iters, kmeans_local_iters : int
        Lloyd iterations of the coarse and fine k-means.
    model : LOPQModel, optional
        A partly trained model (e.g. loaded from an LOPQ file with only Cs): only its missing
        parts are trained, as by :meth:`LOPQModel.fit`. It is copied, not changed.
    id_col, vector_col : str
        DataFrame columns.
    verbose : bool
        Print progress.

    Returns
    -------
    LOPQModel
    """
    log = print if verbose else (lambda *a: None)
    model = copy.deepcopy(model) if model is not None else LOPQModel(
        V=V, M=M, subquantizer_clusters=subquantizer_clusters, pca=pca, pca_dim=pca_dim,
        metric=metric)
    if model.is_trained:
        return model
    raw = blocks(data, id_col, vector_col).persist(_storage_level())
    try:
        n, D = raw.map(lambda b: (len(b[0]), b[1].shape[1])).reduce(
            lambda a, b: (a[0] + b[0], a[1] if a[1] == b[1] else -1))
        if D < 0:
            raise ValueError("vectors of different lengths in the input")
        choose_auto(model, n, D)
        model.check_training_shape(n, D)
        sc = raw.context
        if model.pca and model.pca_matrix is None and model.Cs is None:
            log("cypq.spark: PCA moments")
            nbc = sc.broadcast(model)
            m = raw.map(lambda b: data_moments(nbc.value.normalize(b[1]))).treeReduce(
                combine_moments)
            model.set_pca(*pca_from_moments(int(m[0]), m[1], m[2], model.pca_dim))
        X = raw
        if model.pca_matrix is not None or model.metric != "l2":
            pbc = sc.broadcast(model)  # the model's own steps (cosine, PCA), on the executors
            X = raw.map(lambda b: (b[0], pbc.value.to_model_space(b[1]))).persist(
                _storage_level())
        if model.Cs is None:
            model.Cs = _coarse_kmeans(X, n, model.V, kmeans_coarse_iters, seed, log)
        if model.Rs is None or model.mus is None:
            log("cypq.spark: residual moments per coarse cluster")
            mbc = sc.broadcast(_coarse_only(model))
            per_half = X.map(lambda b: mbc.value.residual_moments(b[1], n_threads=1)).treeReduce(
                lambda a, b: tuple(combine_moments(x, y) for x, y in zip(a, b)))
            Rs, mus, sources = zip(*(rotations_from_moments(*h, model.num_fine_splits,
                                                            report=True) for h in per_half))
            model.Rs = model.Rs if model.Rs is not None else tuple(Rs)
            model.mus = model.mus if model.mus is not None else tuple(mus)
            model.rotation_sources = tuple(sources)
            log("cypq.spark: " + rotation_report(sources))
            mbc.unpersist()
        if model.subquantizers is None:
            frac = sample_fraction if sample_fraction is not None else min(1.0, 200_000 / n)
            if not 0 < frac <= 1:
                raise ValueError("sample_fraction must be in (0, 1]")
            log(f"cypq.spark: fine subquantizers on a {frac:.3g} sample")
            sample = _sample_rows(raw, frac, seed + 2)
            if len(sample) < model.subquantizer_clusters:
                raise ValueError(f"the sample has {len(sample)} rows, fewer than "
                                 f"{model.subquantizer_clusters}: raise sample_fraction")
            model.fit(sample, kmeans_local_iters=kmeans_local_iters, random_state=seed)
        if X is not raw:
            X.unpersist()
    finally:
        raw.unpersist()
    return model


def _storage_level():
    from pyspark import StorageLevel
    return StorageLevel.MEMORY_AND_DISK


def _sample_rows(rdd_blocks, fraction: float, seed: int) -> np.ndarray:
    """Rows drawn independently with probability ``fraction`` (seeded per partition)."""
    def pick(index, it):
        rng = np.random.default_rng([seed, index])
        for _, X in it:
            keep = rng.random(len(X)) < fraction
            if keep.any():
                yield X[keep]
    parts = rdd_blocks.mapPartitionsWithIndex(pick).collect()
    return np.concatenate(parts) if parts else np.empty((0, 0), np.float32)


def _coarse_kmeans(X, n: int, V: int, iters: int, seed: int, log):
    """Distributed Lloyd on the two halves at once: (C0, C1), each (V, D/2) float32.
    Stops early when no centroid moves (no assignment changed)."""
    sc = X.context
    # Initial centroids: V distinct rows per half drawn exactly as subspace_kmeans's
    # minit='points' draws them, by row number, so the same data in the same order and seed
    # start (and, up to float rounding of the sums, end) where LOPQModel.fit does.
    rng = np.random.default_rng(seed)
    picks = [rng.choice(n, V, replace=False) for _ in range(2)]
    rows = _rows_at(X, np.concatenate(picks))
    Dh = rows.shape[1] // 2
    C = np.stack([rows[h * V:(h + 1) * V, h * Dh:(h + 1) * Dh] for h in range(2)])
    C = np.ascontiguousarray(C, dtype=np.float32)
    for it in range(iters):
        bc = sc.broadcast(C)
        sums, counts = X.map(lambda b: lloyd_sums(b[1], bc.value, 1)).treeReduce(_add)
        bc.unpersist()
        new = centroids_from_sums(sums, counts, C)
        moved = float(np.abs(new - C).max())
        C = new
        log(f"cypq.spark: coarse k-means iteration {it + 1}/{iters}, largest move {moved:.3g}")
        if moved == 0.0:
            break
    return C[0], C[1]


def _rows_at(X, index: np.ndarray) -> np.ndarray:
    """Rows by global row number (blocks in RDD order), collected to the driver."""
    sizes = np.asarray(X.map(lambda b: len(b[1])).collect(), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    want = np.unique(index)
    bc = X.context.broadcast((starts, want))

    def pick(pair):
        (_, block), k = pair
        starts, want = bc.value
        lo, hi = np.searchsorted(want, [starts[k], starts[k] + len(block)])
        return [(int(r), block[r - starts[k]]) for r in want[lo:hi]]
    found = dict(X.zipWithIndex().flatMap(pick).collect())
    bc.unpersist()
    return np.stack([found[int(r)] for r in index])


def _coarse_only(model: LOPQModel) -> LOPQModel:
    """A model with the coarse quantizers only, to ship to the executors."""
    return LOPQModel(V=model.V, M=model.M, subquantizer_clusters=model.subquantizer_clusters,
                     parameters=(model.Cs, None, None, None))


# ---------------------------------------------------------------------------- encoding
def encode(data, model: LOPQModel, path: Optional[str] = None, id_col: str = "id",
           vector_col: str = "vector", num_partitions: Optional[int] = None,
           mode: str = "errorifexists", spark=None, tags_col: Optional[str] = None):
    """LOPQ codes of every row, computed by cypq's encoder inside ``mapPartitions`` with the
    model broadcast once.

    Parameters
    ----------
    data : DataFrame (id_col, vector_col) or RDD of (id, vector)
        Ids must be integers (int64).
    model : LOPQModel
        Trained.
    path : str, optional
        Write the codes there as Parquet, range-partitioned by cell and sorted by (cell, id)
        within each file: ``cypq build INDEX path --model MODEL`` loads it directly.
    num_partitions : int, optional
        Output files (default: the input's partitions).
    mode : str
        Spark's save mode for ``path``.
    spark : SparkSession, optional
    tags_col : str, optional
        A long column of each row's tag bit set (a DataFrame input): carried into the
        codes as ``tags``, so that ``cypq build`` makes an index with tags.

    Returns
    -------
    DataFrame with columns id long, cell long (= c0 * V + c1), c0 int, c1 int, fine binary
    (the M fine codes as bytes, little-endian), and with ``tags_col`` tags long.
    """
    from pyspark.sql import SparkSession
    if not model.is_trained:
        from .pq import NotFittedError
        raise NotFittedError("the model is not fully trained: train it first")
    if hasattr(data, "schema") and id_col in data.columns:
        from pyspark.sql.types import IntegralType
        for col, what in ((id_col, "ids are int64; map them to numbers first (e.g. "
                           "zipWithIndex)"), (tags_col, "tags are 64-bit sets (long)")):
            if col is None:
                continue
            if col not in data.columns:
                raise ValueError(f"the DataFrame has no column {col!r}")
            kind = data.schema[col].dataType
            if not isinstance(kind, IntegralType):
                raise TypeError(f"the column {col!r} is {kind.simpleString()}: cypq {what}")
    elif tags_col is not None:
        raise TypeError("tags_col needs a DataFrame input")
    schema = CODES_SCHEMA + (", tags long" if tags_col else "")
    if _arrow_vectors(data, id_col, vector_col):
        # Columnar path: Arrow batches in and out, no Python object per row.
        bc = data.sparkSession.sparkContext.broadcast(model)
        df = data.select(id_col, vector_col, *([tags_col] if tags_col else [])).mapInArrow(
            lambda batches: _encode_arrow(bc.value, batches), schema)
        n_in = data.rdd.getNumPartitions() if num_partitions is None else num_partitions
    else:
        rows = _rows(data, id_col, vector_col)
        if tags_col:   # (id, tags) pairs ride where the ids do, split again in enc
            rows = data.select(id_col, vector_col, tags_col).rdd.map(
                lambda r: ((r[0], r[2]), r[1]))
        spark = spark or SparkSession.builder.getOrCreate()
        bc = rows.context.broadcast(model)

        def enc(it):
            for ids, X in _to_blocks(it):
                tags = None
                if ids.ndim == 2:
                    ids, tags = ids[:, 0].copy(), ids[:, 1].copy()
                for rec in _encode_rows(bc.value, ids, X, tags):
                    yield rec
        df = spark.createDataFrame(rows.mapPartitions(enc), schema)
        n_in = rows.getNumPartitions() if num_partitions is None else num_partitions
    if path is not None:
        df.repartitionByRange(n_in, "cell").sortWithinPartitions("cell", "id") \
            .write.mode(mode).parquet(path)
    return df


def _codes_of(model: LOPQModel, X: np.ndarray):
    """(cells, c0, c1 int64 (n,), fine as little-endian bytes (n, width) uint8) of X."""
    model.n_threads = 1  # one kernel thread per task: Spark's tasks are the parallelism
    code = model.predict(X)
    fine = np.ascontiguousarray(code.fine.astype(code.fine.dtype.newbyteorder("<")))
    return (model.get_cell_id_for_coarse_codes(code.coarse), code.coarse[:, 0].astype(np.int64),
            code.coarse[:, 1].astype(np.int64), fine.view(np.uint8).reshape(len(X), -1))


def _encode_rows(model, ids, X, tags=None):
    """Row tuples (id, cell, c0, c1, fine bytes[, tags])."""
    cells, c0, c1, fine = _codes_of(model, X)
    raw, w = fine.tobytes(), fine.shape[1]
    extra = [()] * len(ids) if tags is None else [(t,) for t in tags.tolist()]
    for j, rec in enumerate(zip(ids.tolist(), cells.tolist(), c0.tolist(), c1.tolist())):
        yield (*rec, raw[j * w:(j + 1) * w], *extra[j])


def _encode_arrow(model, batches):
    """Arrow record batches (id, vector list<float>) -> (id, cell, c0, c1, fine binary)."""
    import pyarrow as pa
    for rb in batches:
        n = rb.num_rows
        if not n:
            continue
        X = _arrow_matrix(rb.column(1))
        ids = rb.column(0).to_numpy(zero_copy_only=False).astype(np.int64)
        cells, c0, c1, fine = _codes_of(model, X)
        w = fine.shape[1]
        fine_col = pa.Array.from_buffers(
            pa.binary(), n, [None, pa.py_buffer(np.arange(0, (n + 1) * w, w, dtype=np.int32)),
                             pa.py_buffer(fine.tobytes())])
        tags = [rb.column(2).cast(pa.int64())] if rb.num_columns > 2 else []
        yield pa.RecordBatch.from_arrays(
            [pa.array(ids), pa.array(cells), pa.array(c0.astype(np.int32)),
             pa.array(c1.astype(np.int32)), fine_col] + tags,
            names=["id", "cell", "c0", "c1", "fine"] + ["tags"] * len(tags))


# ---------------------------------------------------------------------------- k-NN graph
def knn_graph(data, model: LOPQModel, k: int = 10, quota: Optional[int] = None,
              path: Optional[str] = None, codes_path: Optional[str] = None,
              id_col: str = "id", vector_col: str = "vector",
              num_partitions: Optional[int] = None, mode: str = "errorifexists", spark=None):
    """Every item's k nearest other items by LOPQ (a k-NN graph: near-duplicates,
    recommendations): the items encoded (:func:`encode`), then each searched against all of
    them (:func:`search`, its own id left out).

    Parameters
    ----------
    data : DataFrame (id_col, vector_col) or RDD of (id, vector)
        Ids unique int64.
    model : LOPQModel
        Trained.
    k, quota : int
        As :func:`search`.
    path : str, optional
        Write the graph there as Parquet (and return it read back).
    codes_path : str, optional
        Where the items' codes go (default: a temporary directory, removed at the end;
        on a cluster give a path every executor can read).
    num_partitions, mode, spark : as :func:`search`.

    Returns
    -------
    DataFrame (query_id long, ids array<long>, distances array<float>): per item its k
    neighbours, best first.
    """
    from pyspark.sql import SparkSession
    spark = spark or SparkSession.builder.getOrCreate()
    tmp = None
    if codes_path is None:
        tmp = tempfile.mkdtemp(prefix="cypq-knn-")
        codes_path = os.path.join(tmp, "codes")
    try:
        encode(data, model, path=codes_path, id_col=id_col, vector_col=vector_col,
               num_partitions=num_partitions, spark=spark)
        df = search(data, codes_path, model, k, quota, path, id_col, vector_col,
                    num_partitions, mode, spark, exclude_self=True)
        # computed now: the codes it reads are removed below
        return spark.read.parquet(path) if path is not None else df.localCheckpoint(True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
