"""Vector files read without loading them: .npy, TEXMEX .fvecs / .bvecs / .ivecs, shard sets.

Every format is memory-mapped, so a chunk costs its own size in RAM and nothing more.
"""
from __future__ import annotations

import glob as _glob
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

VECTOR_SUFFIXES = (".npy", ".fvecs", ".bvecs", ".ivecs")
# TEXMEX record: int32 d, then d components (float32 / uint8 / int32).
_TEXMEX = {".fvecs": np.dtype("<f4"), ".bvecs": np.dtype("u1"), ".ivecs": np.dtype("<i4")}


class VectorFileError(ValueError):
    """A vector file that cannot be read as claimed."""


def open_vector_file(path: str | os.PathLike) -> np.ndarray:
    """Memory-map one vector file as an (N, D) array view.

    Parameters
    ----------
    path : str or os.PathLike
        ``.npy`` (2-D, real dtype), or TEXMEX ``.fvecs`` / ``.bvecs`` / ``.ivecs``.

    Returns
    -------
    numpy.ndarray (N, D), read-only memmap view (float32, uint8 or int32 for TEXMEX; the
    stored dtype for .npy).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        try:
            with open(path, "rb") as f:   # (np.load takes a file without it for a pickle)
                if f.read(6) != b"\x93NUMPY":
                    raise ValueError("no .npy header: write it with numpy.save")
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise VectorFileError(f"{path}: not a readable .npy file ({e})") from None
        if arr.ndim != 2:
            raise VectorFileError(f"{path}: expected a 2-D array (N, D), got shape {arr.shape}")
        if arr.dtype.kind not in "iuf":
            raise VectorFileError(f"{path}: vectors must be real numbers (integer or float), "
                                  f"got dtype {arr.dtype}")
        return arr
    if suffix not in _TEXMEX:
        raise VectorFileError(f"{path}: unknown vector file type {suffix!r} (expected one of "
                              f"{', '.join(VECTOR_SUFFIXES)})")
    dtype = _TEXMEX[suffix]
    size = os.path.getsize(path)
    if size == 0:
        return np.empty((0, 0), dtype=dtype)
    with open(path, "rb") as f:
        head = f.read(4)
    d = int(np.frombuffer(head, dtype="<i4")[0]) if len(head) == 4 else -1
    record = 4 + d * dtype.itemsize
    if d <= 0 or size % record:
        raise VectorFileError(f"{path}: not a {suffix} file (first record says dimension {d}; "
                              f"file size {size} is not a multiple of the record size)")
    n = size // record
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, record))
    dims = raw[:, :4].view("<i4")
    # One vectorised check of every record header; a bad one means a truncated or mixed file.
    if n and not (dims == d).all():
        bad = int(np.flatnonzero(dims[:, 0] != d)[0])
        raise VectorFileError(f"{path}: record {bad} has dimension {int(dims[bad, 0])}, "
                              f"the first has {d}: the file is corrupt or mixes dimensions")
    return raw[:, 4:].view(dtype)


def write_vector_file(path: str | os.PathLike, X) -> None:
    """Write (N, D) vectors as .npy or TEXMEX (.fvecs float32, .bvecs uint8, .ivecs int32).

    Parameters
    ----------
    path : str or os.PathLike
        The suffix picks the format; TEXMEX values are converted to its dtype (uint8 and
        int32 must already fit).
    X : array_like (N, D)
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"vectors must have shape (N, D), got {X.shape}")
    if suffix == ".npy":
        np.save(path, X)
        return
    if suffix not in _TEXMEX:
        raise VectorFileError(f"{path}: unknown vector file type {suffix!r}")
    dtype = _TEXMEX[suffix]
    if dtype.kind in "iu" and X.size and (X.min() < np.iinfo(dtype).min
                                          or X.max() > np.iinfo(dtype).max):
        raise ValueError(f"values outside the range of {dtype} for {suffix}")
    rec = np.empty(len(X), dtype=[("d", "<i4"), ("x", dtype, (X.shape[1],))])
    rec["d"], rec["x"] = X.shape[1], X
    rec.tofile(path)


def find_files(spec: str | os.PathLike, suffixes: tuple[str, ...]) -> list[str]:
    """The files with one of ``suffixes`` that a path, a directory (the files directly in it)
    or a glob names, sorted by name."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        files = [os.path.join(spec, f) for f in os.listdir(spec)]
    elif os.path.exists(spec):
        return [spec]
    else:
        files = _glob.glob(spec)
        if not files:
            raise FileNotFoundError(f"no such file, directory or glob match: {spec}")
    files = sorted(f for f in files if os.path.isfile(f) and f.lower().endswith(suffixes))
    if not files:
        raise FileNotFoundError(f"{spec}: no {', '.join(suffixes)} files there")
    return files


def find_vector_files(spec: str | os.PathLike) -> list[str]:
    """The vector files a path, a directory or a glob names (:func:`find_files`)."""
    return find_files(spec, VECTOR_SUFFIXES)


class ShardedSource:
    """Rows spread over files read in order: ``files`` and the cumulative row counts
    ``_ends`` are set by the subclass."""
    files: list
    _ends: np.ndarray

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def identity(self) -> list:
        """(name, size, mtime) of each file: what a resumed load compares."""
        return [[os.path.abspath(f), os.path.getsize(f), int(os.path.getmtime(f))]
                for f in self.files]


@dataclass
class VectorSource(ShardedSource):
    """Shards read as one (N, D) sequence of rows, in order.

    Parameters
    ----------
    files : sequence of str
        Vector files (see :func:`open_vector_file`), all of one dimension.
    """
    files: Sequence[str]

    def __post_init__(self):
        self.files = list(self.files)
        self._shards = [open_vector_file(f) for f in self.files]
        dims = {s.shape[1] for s in self._shards if len(s)}
        if len(dims) > 1:
            raise VectorFileError(f"the input files have different dimensions {sorted(dims)}")
        self.dim = dims.pop() if dims else 0
        self._ends = np.cumsum([len(s) for s in self._shards]).astype(np.int64)

    @classmethod
    def open(cls, spec: str | os.PathLike) -> "VectorSource":
        """A source from a file, a directory or a glob (:func:`find_vector_files`)."""
        return cls(find_vector_files(spec))

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start .. stop-1 as float32 (stop - start, D), read from the shards."""
        parts, pos = [], start
        while pos < stop:
            s = int(np.searchsorted(self._ends, pos, side="right"))
            first = int(self._ends[s - 1]) if s else 0
            take = min(stop, int(self._ends[s])) - pos
            parts.append(self._shards[s][pos - first:pos - first + take])
            pos += take
        if not parts:
            return np.empty((0, self.dim), dtype=np.float32)
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return np.ascontiguousarray(out, dtype=np.float32)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """n rows drawn uniformly without replacement (all rows if n >= N), float32."""
        N = len(self)
        if n >= N:
            return self.rows(0, N)
        idx = np.sort(np.random.default_rng(seed).choice(N, size=n, replace=False))
        out = np.empty((n, self.dim), dtype=np.float32)
        for s, shard in enumerate(self._shards):
            first = int(self._ends[s - 1]) if s else 0
            lo, hi = np.searchsorted(idx, [first, int(self._ends[s])])
            out[lo:hi] = shard[idx[lo:hi] - first]
        return out

    def chunks(self, size: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 rows) for consecutive chunks of ``size`` rows from ``start``."""
        for a in range(start, len(self), size):
            yield a, self.rows(a, min(a + size, len(self)))


def read_ids(path: str | os.PathLike, n: int, what: str = "ids",
             top: int = np.iinfo(np.int64).max) -> np.ndarray:
    """An ids file: .npy of n non-negative integers (at most ``top``), memory-mapped, as
    int64 on access (a tags file, ``what='tags'``, ``top=2**64-1``: read it as uint64)."""
    ids = np.load(os.fspath(path), mmap_mode="r")
    if ids.ndim != 1 or len(ids) != n:
        raise VectorFileError(f"{path}: {what} must have shape ({n},) to match the vectors, "
                              f"got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise VectorFileError(f"{path}: {what} must be integers, got dtype {ids.dtype}")
    if len(ids):  # one pass over the file: each must be in [0, top]
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi > top:
            raise VectorFileError(f"{path}: {what} must be in [0, 2**{top.bit_length()}-1], "
                                  f"found {lo if lo < 0 else hi}")
    return ids
