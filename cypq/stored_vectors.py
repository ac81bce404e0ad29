"""Vectors an index keeps beside its codes (``Index.create(..., vectors=...)``): the kinds,
the checks that make storing them lossless or refused, and exact re-ranking with them."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from . import _rerank

VECTOR_KINDS = ("float32", "float16", "uint8")
# Scores of the exact re-ranking kernel (smaller first), per metric of the model.
_SCORE_KIND = {"l2": 0, "ip": 1, "cosine": 2}
# Queries re-ranked per fetch of their candidates' vectors: bounds the rows held at once.
_CHUNK = 512


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
    return np.dtype(kind)


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


def rerank(X: np.ndarray, I: np.ndarray, k: int, fetch: Callable, metric: str,
           n_threads: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each query's candidates by exact score with their stored vectors.

    Parameters
    ----------
    X : numpy.ndarray float32 (nq, D)
        Queries in the input space (of unit norm under cosine).
    I : numpy.ndarray int64 (nq, r)
        Candidate ids, best first by ADC; -1 for none.
    k : int
        Results per query (<= r).
    fetch : callable
        ``fetch(ids (n,) int64) -> (found (n,) bool, rows (n, D))``: the stored vectors.
    metric : str
        The model's: 'l2' scores by squared distance, 'ip' by minus the inner product,
        'cosine' by minus the cosine.
    n_threads : int

    Returns
    -------
    S : numpy.ndarray float32 (nq, k)
        Scores, ascending (inf where fewer than k); ties keep the ADC order.
    J : numpy.ndarray int64 (nq, k)
        Ids; -1 where fewer than k.
    """
    nq, r = I.shape
    S = np.full((nq, k), np.inf, dtype=np.float32)
    J = np.full((nq, k), -1, dtype=np.int64)
    for a in range(0, nq, _CHUNK):
        b = min(nq, a + _CHUNK)
        Ib = I[a:b]
        ids, inv = np.unique(Ib, return_inverse=True)
        inv = inv.reshape(Ib.shape)
        found, rows = fetch(ids)
        row = np.where((Ib >= 0) & found[inv], inv, -1).astype(np.int64)
        if rows.dtype != np.uint8:
            rows = np.ascontiguousarray(rows, dtype=np.float32)
        scores = np.empty(Ib.shape, dtype=np.float32)
        _rerank.exact_scores(X[a:b], rows, row, _SCORE_KIND[metric], scores, n_threads)
        best = np.argsort(scores, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(scores, best, axis=1)
        S[a:b, :best.shape[1]] = top
        J[a:b, :best.shape[1]] = np.where(np.isinf(top), -1,
                                          np.take_along_axis(Ib, best, axis=1))
    return S, J

