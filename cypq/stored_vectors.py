"""Vectors an index keeps beside its codes (``Index.create(..., vectors=...)``): the kinds,
the checks that make storing them lossless or refused (or, for 'sq8', the scalar quantiser
that says how they are rounded), and exact re-ranking with them."""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import _rerank

VECTOR_KINDS = ("float32", "float16", "uint8", "sq8")
SQ8_META = "sq8"   # the index metadata holding an sq8 index's ranges (lo, then step)
# Scores of the exact re-ranking kernel (smaller first), per metric of the model.
_SCORE_KIND = {"l2": 0, "ip": 1, "cosine": 2}


def vector_dtype(kind: Optional[str]) -> Optional[np.dtype]:
    """The dtype of a ``vectors`` option (None or "none": the index keeps no vectors).

    Raises
    ------
    ValueError
        Another kind.
    """
    if kind is None or kind == "none":
        return None
    if kind not in VECTOR_KINDS:
        raise ValueError(f"vectors must be one of none, {', '.join(VECTOR_KINDS)}; got {kind!r}")
    return np.dtype(np.uint8 if kind == "sq8" else kind)


def data_ranges(X) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) float32 (D,): each dimension's smallest and largest value over vectors X
    (n, D) - the ranges ``vectors='sq8'`` quantises over (``vector_ranges=``)."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or not len(X) or not np.isfinite(X).all():
        raise ValueError("vector ranges are learned from a non-empty (n, D) array of finite "
                         "training vectors")
    return X.min(0), X.max(0)


class Kept:
    """How an index keeps its vectors: ``kind`` (see :data:`VECTOR_KINDS`), ``dtype`` as
    stored, and for 'sq8' the per-dimension ranges: value = lo + step * code, code a uint8
    (step = (hi - lo) / 255; values outside [lo, hi] are stored as the nearest end).

    Parameters
    ----------
    kind : str
    sq : numpy.ndarray float32 (2 * D,), optional
        sq8's lo then step (:meth:`for_ranges` makes it from (lo, hi)).
    """

    def __init__(self, kind: str, sq: Optional[np.ndarray] = None):
        self.kind, self.dtype, self.sq = kind, vector_dtype(kind), sq
        self.vtype = _rerank.VTYPES[kind]

    @classmethod
    def for_ranges(cls, ranges, dim: int) -> "Kept":
        """sq8 over ``ranges`` (lo, hi), arrays (dim,) with lo <= hi, finite."""
        try:
            lo, hi = (np.asarray(r, dtype=np.float32) for r in ranges)
        except (TypeError, ValueError):
            raise ValueError("vector_ranges must be (lo, hi), two arrays of one value per "
                             "dimension") from None
        if lo.shape != (dim,) or hi.shape != (dim,) or not (
                np.isfinite(lo).all() and np.isfinite(hi).all() and (hi >= lo).all()):
            raise ValueError(f"vector_ranges must be (lo, hi) of shape ({dim},) each, finite, "
                             "lo <= hi (e.g. cypq.stored_vectors.data_ranges(training vectors))")
        step = np.maximum(hi - lo, np.float32(1e-30)) / np.float32(255)
        return cls("sq8", np.concatenate([lo, step]).astype(np.float32))

    def ranges(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """sq8's (lo, hi); None for the other kinds."""
        if self.sq is None:
            return None
        lo, step = np.split(self.sq, 2)
        return lo, lo + step * np.float32(255)

    def store(self, X: np.ndarray, first_row: int = 0) -> np.ndarray:
        """Validated float32 vectors X (n, D) as kept (see :func:`to_stored`)."""
        if self.sq is None:
            return to_stored(X, self.dtype, first_row)
        lo, step = np.split(self.sq, 2)
        return np.clip(np.rint((X - lo) / step), 0, 255).astype(np.uint8)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Kept rows (n, D) as vectors: sq8 codes as float32 values, the others as they are."""
        if self.sq is None:
            return rows
        lo, step = np.split(self.sq, 2)
        return lo + step * rows.astype(np.float32)


def to_stored(X: np.ndarray, dtype: np.dtype, first_row: int = 0) -> np.ndarray:
    """Validated float32 vectors X (n, D) as the index keeps them, never silently changed:
    uint8 holds whole numbers in [0, 255] only, float16 finite values within its range.

    Raises
    ------
    ValueError
        A vector the kind cannot hold (naming its row, counted from ``first_row``).
    """
    if dtype == np.float32:
        return X
    if dtype == np.uint8:
        bad = np.flatnonzero(((X < 0) | (X > 255) | (X != np.round(X))).any(axis=1))
        if len(bad):
            raise ValueError(f"vector {first_row + int(bad[0])} is not whole numbers in "
                             "[0, 255], which an index with vectors='uint8' keeps: create it "
                             "with vectors='float16' or 'float32'")
        return X.astype(np.uint8)
    with np.errstate(over="ignore"):  # an overflow is refused below
        out = X.astype(dtype)
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if len(bad):
        raise ValueError(f"vector {first_row + int(bad[0])} is beyond float16's range "
                         "(+-65504): create the index with vectors='float32'")
    return out


class Reranker:
    """Exact re-ranking of a search's candidates with the stored vectors.

    Parameters
    ----------
    X : numpy.ndarray float32 (nq, D)
        The queries in the input space (of unit norm under cosine).
    k : int
        Results per query.
    metric : str
        The model's: 'l2' ranks by squared distance, 'ip' by minus the inner product,
        'cosine' by minus the cosine (smaller first, as the kernels rank).
    kept : Kept
        How the storage keeps the vectors.
    n_threads : int
    """

    def __init__(self, X: np.ndarray, k: int, metric: str, kept: Kept, n_threads: int):
        self.X, self.k, self.n_threads = X, k, n_threads
        self.kind, self.vtype, self.sq = _SCORE_KIND[metric], kept.vtype, kept.sq
        self.vec_bytes = X.shape[1] * kept.dtype.itemsize

    def batch(self, snap, rows, I: np.ndarray, W: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """The best k of candidates I (nb, r) of the queries ``rows`` (a slice or an index
        array of nb), whose vectors the scan of ``snap`` found at W (nb, r) uintp (0: not
        addressable, read by id).

        Returns
        -------
        S : numpy.ndarray float32 (nb, k)
            Exact scores, ascending (inf where fewer than k); ties keep the ADC order.
        J : numpy.ndarray int64 (nb, k)
            Ids; -1 where fewer than k.
        """
        X = np.ascontiguousarray(self.X[rows])
        scores = np.empty(I.shape, dtype=np.float32)
        _rerank.address_scores(X, I, W, self.vtype, self.kind, scores, self.n_threads, self.sq)
        by_id = np.isnan(scores)   # staged entries: their vectors are read by id
        if by_id.any():
            ids, inv = np.unique(I[by_id], return_inverse=True)
            found, rows = snap.vectors(ids)
            row = np.full(I.shape, -1, dtype=np.int64)
            row[by_id] = np.where(found[inv], inv, -1)
            scores[by_id] = np.inf   # gone (cannot happen in one snapshot): never returned
            _rerank.row_scores(X, rows.view(np.uint8).reshape(len(rows), -1), row,
                               self.vtype, self.kind, scores, self.n_threads, self.sq)
        k = self.k
        best = np.argsort(scores, axis=1, kind="stable")[:, :k]
        S = np.full((len(I), k), np.inf, dtype=np.float32)
        J = np.full((len(I), k), -1, dtype=np.int64)
        top = np.take_along_axis(scores, best, axis=1)
        S[:, :best.shape[1]] = top
        J[:, :best.shape[1]] = np.where(np.isinf(top), -1, np.take_along_axis(I, best, axis=1))
        return S, J
