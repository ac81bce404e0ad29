"""Optimized Product Quantization: nanopq's ``OPQ`` on the Cython kernels."""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np

from ._checks import as_vectors, positive_int
from .pq import PQ, DistanceTable, Metric, NotFittedError, adc_search


class OPQ:
    """Optimized Product Quantization (Ge et al., TPAMI 2014), API-compatible with nanopq 0.2.2.

    Vectors are rotated by an orthogonal D x D matrix R (x @ R) learnt with the codewords so
    that PQ loses less, then quantised by an inner :class:`PQ` (``self.pq``). Unlike nanopq's,
    this OPQ honours ``metric='dot'`` (rotation preserves inner products).

    Parameters
    ----------
    M, Ks, metric, verbose, n_threads
        As for :class:`PQ`.

    Attributes
    ----------
    R : numpy.ndarray, float32, shape (D, D), or None before fit.
    pq : PQ
        The product quantiser of the rotated vectors.
    """

    def __init__(self, M: int, Ks: int = 256, metric: Metric = "l2", verbose: bool = True,
                 n_threads: Optional[int] = None):
        self.pq = PQ(M, Ks, metric=metric, verbose=verbose, n_threads=n_threads)
        self.R: Optional[np.ndarray] = None

    def __eq__(self, other):
        if not isinstance(other, OPQ):
            return False
        return self.pq == other.pq and np.array_equal(self.R, other.R)

    __hash__ = None

    def __repr__(self) -> str:
        state = f"D={self.pq.D}" if self.R is not None else "not fitted"
        return f"OPQ(M={self.M}, Ks={self.Ks}, metric={self.metric!r}, {state})"

    M = property(lambda self: self.pq.M, doc="int: number of subspaces")
    Ks = property(lambda self: self.pq.Ks, doc="int: codewords per subspace")
    metric = property(lambda self: self.pq.metric, doc="str: 'l2' or 'dot'")
    code_dtype = property(lambda self: self.pq.code_dtype, doc="type: dtype of codes")
    codewords = property(lambda self: self.pq.codewords,
                         doc="numpy.ndarray (M, Ks, Ds): codewords of the rotated space")
    Ds = property(lambda self: self.pq.Ds, doc="int: sub-vector dimension")

    @property
    def verbose(self) -> bool:
        """bool: verbose flag."""
        return self.pq.verbose

    @verbose.setter
    def verbose(self, v: bool) -> None:
        self.pq.verbose = v

    @property
    def n_threads(self) -> Optional[int]:
        """int or None: threads of the kernels (None: all cores)."""
        return self.pq.n_threads

    @n_threads.setter
    def n_threads(self, v: Optional[int]) -> None:
        self.pq.n_threads = v

    def _require_fitted(self, what: str) -> None:
        if self.R is None or self.pq.codewords is None:
            raise NotFittedError(f"this OPQ is not fitted: call fit() before {what}()")

    def eigenvalue_allocation(self, vecs) -> np.ndarray:
        """Parametric OPQ rotation: PCA with eigenvalues balanced across the M subspaces.

        Each principal direction, in decreasing eigenvalue order, goes to the subspace whose
        product of eigenvalues (sum of logs) is smallest and that still has room.

        Parameters
        ----------
        vecs : array_like, shape (N, D)

        Returns
        -------
        numpy.ndarray, float32, shape (D, D)
            Columns are the eigenvectors, grouped by subspace.
        """
        X = as_vectors(vecs, "vecs")
        D = X.shape[1]
        if D % self.M != 0:
            raise ValueError(f"input dimension {D} is not divisible by M={self.M}")
        return eigenvalue_allocation_matrix(np.cov(X, rowvar=False), self.M).astype(np.float32)

    def fit(self, vecs, parametric_init: bool = False, pq_iter: int = 20,
            rotation_iter: int = 10, seed: int = 123,
            minit: Literal["random", "++", "points", "matrix"] = "points"):
        """Alternately train the codewords (R fixed) and the rotation (codes fixed).

        The codewords are warm-started from the previous rotation iteration: one k-means
        iteration per rotation iteration, ``pq_iter`` in the last one.

        Parameters
        ----------
        vecs : array_like, shape (N, D)
            Training vectors (N >= Ks).
        parametric_init : bool
            Start from :meth:`eigenvalue_allocation` instead of the identity.
        pq_iter : int
            k-means iterations in the final PQ training.
        rotation_iter : int
            Rotation updates.
        seed : int
            Random seed.
        minit : {'points', '++', 'random'}
            k-means initialisation.

        Returns
        -------
        self
        """
        X = as_vectors(vecs, "vecs")
        N, D = X.shape
        positive_int(rotation_iter, "rotation_iter")
        positive_int(pq_iter, "pq_iter")
        if D % self.M != 0:
            raise ValueError(f"input dimension {D} is not divisible by M={self.M}")
        R = self.eigenvalue_allocation(X) if parametric_init else np.eye(D, dtype=np.float32)
        pq = self.pq
        init = None
        for i in range(rotation_iter):
            last = i == rotation_iter - 1
            if self.verbose:
                print(f"OPQ rotation training: {i} / {rotation_iter}")
            XR = X @ R
            pq.fit(XR, iter=pq_iter if last else 1, seed=seed, minit=minit, init=init)
            init = pq.codewords
            if last:
                break
            Xhat = pq.decode(pq.encode(XR))
            if self.verbose:
                print("==== Reconstruction error:", np.linalg.norm(XR - Xhat, "fro"), "====")
            # Orthogonal Procrustes: the R minimising ||X R - Xhat||. A float32 product is
            # accurate enough for the D x D matrix, and converting X every step is not free.
            U, _, Vt = np.linalg.svd((X.T @ Xhat).astype(np.float64))
            R = (U @ Vt).astype(np.float32)
        self.R = R
        return self

    def rotate(self, vecs) -> np.ndarray:
        """Rotate vector(s) by R.

        Parameters
        ----------
        vecs : array_like, shape (D,) or (N, D)

        Returns
        -------
        numpy.ndarray, float32, same shape: vecs @ R.
        """
        self._require_fitted("rotate")
        arr = np.asarray(vecs)
        X = as_vectors(arr, "vecs", dim=self.R.shape[0], ndim=arr.ndim if arr.ndim in (1, 2)
                       else 2, allow_empty=True)
        return X @ self.R

    def encode(self, vecs) -> np.ndarray:
        """Rotate, then PQ-encode. vecs (N, D) -> codes (N, M) of code_dtype."""
        self._require_fitted("encode")
        return self.pq.encode(self.rotate(as_vectors(vecs, "vecs", allow_empty=True)))

    def decode(self, codes) -> np.ndarray:
        """PQ-decode, then rotate back (R is orthogonal). codes (N, M) -> (N, D) float32."""
        self._require_fitted("decode")
        return self.pq.decode(codes) @ self.R.T

    def dtables(self, queries) -> np.ndarray:
        """Tables of rotated queries. queries (nq, D) -> (nq, M, Ks) float32."""
        self._require_fitted("dtables")
        return self.pq.dtables(self.rotate(as_vectors(queries, "queries", allow_empty=True)))

    def dtable(self, query) -> DistanceTable:
        """Table of one rotated query. query (D,) -> DistanceTable of (M, Ks)."""
        self._require_fitted("dtable")
        return self.pq.dtable(self.rotate(as_vectors(query, "query", ndim=1)))

    def search(self, queries, codes, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Exhaustive ADC search over codes; see :meth:`PQ.search`."""
        self._require_fitted("search")
        return adc_search(self.dtables, np.asarray(queries), codes, k, self.M, self.Ks,
                          self.metric, self.pq.D, self.n_threads)


def eigenvalue_allocation_matrix(cov: np.ndarray, M: int,
                                 keep: int | None = None) -> np.ndarray:
    """Eigenvectors of a covariance, grouped into M buckets of balanced eigenvalue products.

    Parameters
    ----------
    cov : numpy.ndarray, shape (D, D)
        Symmetric covariance; D (or keep) divisible by M.
    M : int
        Number of buckets (subspaces).
    keep : int, optional
        Keep only the eigenvectors of the ``keep`` largest eigenvalues (a dimension
        reduction); default all D.

    Returns
    -------
    numpy.ndarray, float64, shape (D, keep)
        Columns: eigenvectors, bucket 0's first. Also used for LOPQ's local rotations and
        its PCA.
    """
    w, v = np.linalg.eigh(cov)
    order = np.argsort(np.abs(w))[::-1][:keep]
    w, v = w[order], v[:, order]
    D = len(w)
    Ds = D // M
    logs = np.log(np.abs(w) + 1e-10)
    logs = logs - logs.min() + 1
    buckets: list[list[int]] = [[] for _ in range(M)]
    sums = np.zeros(M)
    full = 1e10 + logs.sum()
    cur = 0
    for d in range(D):
        buckets[cur].append(d)
        sums[cur] += logs[d]
        if len(buckets[cur]) == Ds:
            sums[cur] = full
        cur = int(np.argmin(sums))
    return v[:, [d for b in buckets for d in b]]
