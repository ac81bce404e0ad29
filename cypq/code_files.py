"""LOPQ codes in Parquet, as :func:`cypq.spark.encode` writes them, read in chunks for the bulk
loader (needs pyarrow: ``pip install cypq[spark]``).

Columns: ``id`` int64, ``cell`` int64 (= c0 * V + c1), ``c0`` / ``c1`` int32 (the coarse codes),
``fine`` binary (the M fine codes, little-endian, 1 byte each for up to 256 clusters, 2 for up
to 65536). Files are read in name order.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from .vector_files import ShardedSource, find_files

CODE_COLUMNS = ("id", "cell", "c0", "c1", "fine")


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet codes needs pyarrow: pip install 'cypq[spark]'") \
            from None
    return pq


def find_code_files(spec: str | os.PathLike) -> list[str]:
    """Parquet files of a file, a directory (Spark's output: its part files) or a glob."""
    return find_files(spec, (".parquet",))


class CodeSource(ShardedSource):
    """Parquet code files read as one sequence of rows.

    Parameters
    ----------
    files : sequence of str

    Attributes
    ----------
    has_tags : bool
        The files carry a ``tags`` column (``cypq.spark.encode(..., tags_col=...)``): each
        row's uint64 tag set, as a signed long.
    """

    def __init__(self, files: Sequence[str]):
        pq = _pq()
        self.files = list(files)
        rows, tagged = [], set()
        for f in self.files:
            meta = pq.ParquetFile(f)
            names = set(meta.schema_arrow.names)
            missing = [c for c in ("id", "cell", "fine") if c not in names]
            if missing:
                raise ValueError(f"{f}: not a cypq codes file (no column {', '.join(missing)})")
            rows.append(meta.metadata.num_rows)
            tagged.add("tags" in names)
        if len(tagged) > 1:
            raise ValueError("some code files have a tags column and some do not: encode "
                             "them all the same way")
        self.has_tags = tagged == {True}
        self._ends = np.cumsum(rows).astype(np.int64)

    @classmethod
    def open(cls, spec: str | os.PathLike) -> "CodeSource":
        return cls(find_code_files(spec))

    def _batches(self, start: int, size: int):
        """Record batches of about ``size`` rows from row ``start`` on, as (ids, cells, fine
        bytes, tags) arrays (tags uint64, zero where the files carry none)."""
        pq = _pq()
        columns = ["id", "cell", "fine"] + (["tags"] if self.has_tags else [])
        for k, f in enumerate(self.files):
            first = int(self._ends[k - 1]) if k else 0
            if self._ends[k] <= start:
                continue
            skip = max(0, start - first)
            for batch in pq.ParquetFile(f).iter_batches(batch_size=size, columns=columns):
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                batch = batch.slice(skip)
                skip = 0
                n = batch.num_rows
                if self.has_tags and batch.column(3).null_count:
                    raise ValueError(f"{f}: the tags column has nulls")
                yield (batch.column(0).to_numpy().astype(np.int64),
                       batch.column(1).to_numpy().astype(np.int64),
                       fixed_rows(batch.column(2), f"{f}: fine codes"),
                       batch.column(3).to_numpy().astype(np.int64).view(np.uint64)
                       if self.has_tags else np.zeros(n, np.uint64))

    def chunks(self, size: int, start: int = 0, code_dtype=np.uint8
               ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(first row, ids (n,) int64, cells (n,) int64, fine (n, M) code_dtype, tags (n,)
        uint64 or None where the files carry none) per chunk of ``size`` rows from
        ``start``."""
        code_dtype = np.dtype(code_dtype).newbyteorder("<")
        parts, have, pos = [], 0, start
        tags = (lambda t: t) if self.has_tags else (lambda t: None)  # noqa: E731
        for part in self._batches(start, size):
            parts.append(part)
            have += len(part[0])
            while have >= size:
                ids, cells, fine, tg = (np.concatenate(x) for x in zip(*parts))
                yield pos, ids[:size], cells[:size], _codes(fine[:size], code_dtype), \
                    tags(tg[:size])
                parts = [(ids[size:], cells[size:], fine[size:], tg[size:])]
                have -= size
                pos += size
        if have:
            ids, cells, fine, tg = (np.concatenate(x) for x in zip(*parts))
            yield pos, ids, cells, _codes(fine, code_dtype), tags(tg)


def fixed_rows(col, name: str) -> np.ndarray:
    """An Arrow column of equal-length values - binary (fine codes) or list<number>
    (vectors) - as one (n, width) array over its values buffer, no copy per row."""
    import pyarrow as pa
    if isinstance(col, pa.ChunkedArray):
        col = pa.concat_arrays(col.chunks)
    n = len(col)
    if col.null_count:
        raise ValueError(f"{name}: the column has nulls")
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False)
    else:
        bufs = col.buffers()
        off_type = np.int64 if pa.types.is_large_binary(col.type) else np.int32
        offsets = np.frombuffer(bufs[1], dtype=off_type)[col.offset:col.offset + n + 1]
        values = np.frombuffer(bufs[2], dtype=np.uint8)
    if n == 0:
        return values[:0].reshape(0, 0)
    width = int(offsets[1] - offsets[0])
    if not np.all(np.diff(offsets) == width):
        raise ValueError(f"{name}: values of different lengths")
    return values[offsets[0]:offsets[-1]].reshape(n, width)


def _codes(fine_bytes: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if fine_bytes.shape[1] % dtype.itemsize:
        raise ValueError(f"fine codes of {fine_bytes.shape[1]} bytes do not split into "
                         f"{dtype} codes")
    return np.ascontiguousarray(fine_bytes).view(dtype).astype(dtype.newbyteorder("="))
