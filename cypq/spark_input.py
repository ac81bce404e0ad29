"""Spark input for cypq's jobs: a DataFrame (id, vector) or an RDD of (id, vector) pairs as
blocks of rows (ids int64 (n,), vectors float32 (n, D)), columnar through Arrow where the
vector column allows it. Needs pyspark only where a Spark object is passed in."""
from __future__ import annotations

import pickle

import numpy as np

from ._checks import as_vectors

BLOCK_ROWS = 16384


def _as_row_vector(v) -> np.ndarray:
    return np.asarray(v.toArray() if hasattr(v, "toArray") else v, dtype=np.float32)


def _rows(data, id_col: str, vector_col: str):
    """RDD of (id, vector) from a DataFrame or an RDD of pairs."""
    if hasattr(data, "rdd") and hasattr(data, "columns"):
        missing = [c for c in (id_col, vector_col) if c not in data.columns]
        if missing:
            raise ValueError(f"the DataFrame has no column {', '.join(missing)} (columns: "
                             f"{', '.join(data.columns)}): pass id_col= / vector_col=")
        return data.select(id_col, vector_col).rdd.map(lambda r: (r[0], r[1]))
    if hasattr(data, "mapPartitions"):
        return data
    raise TypeError(f"expected a Spark DataFrame or an RDD of (id, vector), got "
                    f"{type(data).__name__}")


def _to_blocks(rows, block_rows: int = BLOCK_ROWS):
    """Partition rows (id, vector) -> blocks (ids int64 (n,), X float32 (n, D))."""
    ids, vecs = [], []
    for row in rows:
        try:
            i, v = row
        except (TypeError, ValueError):   # (a vector alone unpacks as too many values)
            raise ValueError(
                f"expected an RDD of (id, vector) pairs, got a row of type {type(row).__name__}"
                + (f" and length {len(row)}" if hasattr(row, "__len__") else "")
                + ": pair each vector with its id first, e.g. "
                "rdd.zipWithIndex().map(lambda t: (t[1], t[0]))") from None
        ids.append(i)
        vecs.append(_as_row_vector(v))
        if len(ids) == block_rows:
            yield _block(ids, vecs)
            ids, vecs = [], []
    if ids:
        yield _block(ids, vecs)


def _block(ids, vecs):
    if len({len(v) for v in vecs}) > 1:
        raise ValueError("vectors of different lengths in the input")
    return np.asarray(ids, dtype=np.int64), as_vectors(np.stack(vecs), "vectors")


def blocks(data, id_col: str = "id", vector_col: str = "vector",
           block_rows: int = BLOCK_ROWS):
    """RDD of blocks (ids int64 (n,), vectors float32 (n, D)), each from one partition."""
    if _arrow_vectors(data, id_col, vector_col):
        # Columnar: Arrow batches become blocks on the executors, and each block crosses to
        # Python as one pickled value instead of a Python object per row.
        return data.select(id_col, vector_col).mapInArrow(
            _arrow_blocks, "block binary").rdd.map(lambda r: pickle.loads(r[0]))
    return _rows(data, id_col, vector_col).mapPartitions(
        lambda rows: _to_blocks(rows, block_rows))


def _arrow_blocks(batches):
    import pyarrow as pa
    for rb in batches:
        if rb.num_rows:
            block = (rb.column(0).to_numpy(zero_copy_only=False).astype(np.int64),
                     _arrow_matrix(rb.column(1)))
            yield pa.RecordBatch.from_arrays(
                [pa.array([pickle.dumps(block, protocol=pickle.HIGHEST_PROTOCOL)],
                          pa.binary())], names=["block"])


def _arrow_matrix(vec) -> np.ndarray:
    """An Arrow list<float> column of equal-length lists as float32 (n, D)."""
    from .code_files import fixed_rows
    return as_vectors(fixed_rows(vec, "vectors"), "vectors")


def _arrow_vectors(data, id_col: str, vector_col: str) -> bool:
    """Whether data is a DataFrame whose vector column Arrow can carry as a list of floats."""
    if not (hasattr(data, "schema") and hasattr(data, "mapInArrow")):
        return False
    try:
        import pandas  # noqa: F401  (Spark's Arrow functions insist on it)
        import pyarrow  # noqa: F401
        from pyspark.sql.types import ArrayType, DoubleType, FloatType, IntegralType
        fields = {f.name: f.dataType for f in data.schema.fields}
    except ImportError:
        return False
    vt, it = fields.get(vector_col), fields.get(id_col)
    return (isinstance(vt, ArrayType) and isinstance(vt.elementType, (FloatType, DoubleType))
            and isinstance(it, IntegralType))
