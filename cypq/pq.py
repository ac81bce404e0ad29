"""Product Quantization: nanopq's ``PQ`` and ``DistanceTable``, on the Cython kernels."""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np

from . import _adc, _quantize
from ._checks import as_codes, as_vectors, code_dtype_for, positive_int
from ._threads import resolve, single_threaded_blas
from .kmeans import MINITS, subspace_kmeans

Metric = Literal["l2", "dot"]
METRICS = ("l2", "dot")
# Queries per batch in search(): bounds the (batch, M, Ks) tables kept in memory.
_SEARCH_BATCH = 1024


class NotFittedError(ValueError, AttributeError):
    """A model was used before ``fit`` (or loading) gave it its parameters."""


class PQ:
    """Product Quantization (Jegou et al., TPAMI 2011), API-compatible with nanopq 0.2.2.

    A D-dim vector is split into M sub-vectors of Ds = D / M dims; each is replaced by the
    index of its nearest of Ks codewords. Distances from a query to codes are computed
    asymmetrically from a table of query-to-codeword distances.

    Parameters
    ----------
    M : int
        Number of subspaces.
    Ks : int
        Codewords per subspace (256 gives one byte per subspace).
    metric : {'l2', 'dot'}
        Distance of the tables and of search: squared L2, or inner product (search then
        returns the largest). k-means and encoding are Euclidean either way, as in nanopq.
    verbose : bool
        Print progress.
    n_threads : int, optional
        Threads of the kernels; None or -1 for all available cores.

    Attributes
    ----------
    M, Ks, metric, verbose
    code_dtype : type
        numpy.uint8, uint16 or uint32, the smallest that holds Ks codes.
    codewords : numpy.ndarray, float32, shape (M, Ks, Ds), or None before fit.
    Ds : int or None
        Sub-vector dimension, D / M.
    """

    def __init__(self, M: int, Ks: int = 256, metric: Metric = "l2", verbose: bool = True,
                 n_threads: Optional[int] = None):
        positive_int(M, "M")
        positive_int(Ks, "Ks")
        if Ks > 2**32:
            raise ValueError(f"Ks must be at most 2**32, got {Ks}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.M, self.Ks, self.metric, self.verbose = int(M), int(Ks), metric, verbose
        self.code_dtype = code_dtype_for(self.Ks)
        self.codewords: Optional[np.ndarray] = None
        self.Ds: Optional[int] = None
        self.n_threads = n_threads
        resolve(n_threads)
        if verbose:
            print(f"M: {self.M}, Ks: {self.Ks}, metric: {metric}, "
                  f"code_dtype: {np.dtype(self.code_dtype).name}")

    def __eq__(self, other):
        if not isinstance(other, PQ):
            return False
        return ((self.M, self.Ks, self.metric, self.verbose, self.code_dtype, self.Ds)
                == (other.M, other.Ks, other.metric, other.verbose, other.code_dtype, other.Ds)
                and np.array_equal(self.codewords, other.codewords))

    __hash__ = None

    def __repr__(self) -> str:
        state = f"D={self.D}" if self.codewords is not None else "not fitted"
        return f"PQ(M={self.M}, Ks={self.Ks}, metric={self.metric!r}, {state})"

    def __setstate__(self, state):
        state.setdefault("n_threads", None)  # pickles from nanopq or older versions
        self.__dict__.update(state)

    @property
    def D(self) -> Optional[int]:
        """int or None: input dimension, M * Ds."""
        return None if self.Ds is None else self.M * self.Ds

    def _threads(self, rows: Optional[int] = None, per_thread: int = 64) -> int:
        return resolve(getattr(self, "n_threads", None), rows, per_thread)

    def _require_fitted(self, what: str) -> None:
        if self.codewords is None or self.Ds is None:
            raise NotFittedError(f"this PQ is not fitted: call fit() before {what}()")

    def fit(self, vecs, iter: int = 20, seed: int = 123,
            minit: Literal["random", "++", "points", "matrix"] = "points", *,
            init: Optional[np.ndarray] = None, max_points_per_centroid: Optional[int] = None):
        """Train the codewords: one k-means per subspace.

        Parameters
        ----------
        vecs : array_like, shape (N, D)
            Training vectors, N >= Ks; converted to float32.
        iter : int
            Maximum k-means iterations (stops early on convergence).
        seed : int
            Random seed; the same seed gives the same codewords.
        minit : {'points', '++', 'random', 'matrix'}
            Initialisation (see :func:`cypq.kmeans.subspace_kmeans`); 'matrix' needs ``init``.
        init : array_like, shape (M, Ks, D / M), optional
            Initial codewords (warm start).
        max_points_per_centroid : int, optional
            Train on a random sample of at most Ks * this many vectors.

        Returns
        -------
        self
        """
        X = as_vectors(vecs, "vecs")
        N, D = X.shape
        if D % self.M != 0:
            raise ValueError(f"input dimension {D} is not divisible by M={self.M}")
        if N < self.Ks:
            raise ValueError(f"{N} training vectors are fewer than Ks={self.Ks}: "
                             "give at least Ks vectors or lower Ks")
        if minit not in MINITS:
            raise ValueError(f"minit must be one of {MINITS}, got {minit!r}")
        positive_int(iter, "iter")
        if init is not None:
            init = as_vectors(np.asarray(init).reshape(self.M * self.Ks, -1), "init",
                              dim=D // self.M).reshape(self.M, self.Ks, D // self.M)
        if self.verbose:
            print(f"iter: {iter}, seed: {seed}")
        self.codewords = subspace_kmeans(
            X, self.M, self.Ks, iter=iter, seed=seed, minit=minit, init=init,
            max_points_per_centroid=max_points_per_centroid, n_threads=self._threads(),
            verbose=self.verbose, label="PQ k-means", scipy_points=True)
        self.Ds = D // self.M
        return self

    def encode(self, vecs) -> np.ndarray:
        """PQ codes of vectors.

        Parameters
        ----------
        vecs : array_like, shape (N, D)

        Returns
        -------
        numpy.ndarray, shape (N, M), dtype code_dtype
        """
        self._require_fitted("encode")
        X = as_vectors(vecs, "vecs", dim=self.D, allow_empty=True)
        codes = np.empty((X.shape[0], self.M), dtype=self.code_dtype)
        with single_threaded_blas():   # (sgemm from each thread from 32 dimensions on)
            _quantize.encode(X, self.codewords, codes, np.empty(0, np.float32),
                             self._threads(len(X)))
        return codes

    def decode(self, codes) -> np.ndarray:
        """Reconstruct vectors from PQ codes.

        Parameters
        ----------
        codes : array_like of int, shape (N, M)

        Returns
        -------
        numpy.ndarray, float32, shape (N, D)
        """
        self._require_fitted("decode")
        codes = as_codes(codes, self.M, self.Ks)
        out = np.empty((codes.shape[0], self.D), dtype=np.float32)
        _quantize.decode(codes, self.codewords, out, self._threads(len(codes)))
        return out

    def dtables(self, queries) -> np.ndarray:
        """Distance tables of many queries.

        Parameters
        ----------
        queries : array_like, shape (nq, D)

        Returns
        -------
        numpy.ndarray, float32, shape (nq, M, Ks)
            [q, m, k]: squared L2 distance (or inner product for metric='dot') between
            sub-vector m of query q and codeword k of subspace m.
        """
        self._require_fitted("dtables")
        Q = as_vectors(queries, "queries", dim=self.D, allow_empty=True)
        out = np.empty((Q.shape[0], self.M, self.Ks), dtype=np.float32)
        _quantize.tables(Q, self.codewords, out, self.metric == "dot",
                         self._threads(len(Q)))
        return out

    def dtable(self, query) -> "DistanceTable":
        """Distance table of one query.

        Parameters
        ----------
        query : array_like, shape (D,)

        Returns
        -------
        DistanceTable
            Holding ``dtable`` (M, Ks) float32.
        """
        self._require_fitted("dtable")
        q = as_vectors(query, "query", dim=self.D, ndim=1)
        if self.metric == "dot":
            # nanopq's own arithmetic, so that its users get the same float32 values to the
            # bit (its tests compare them with ==); dtables / search are the fast path.
            T = np.empty((self.M, self.Ks), dtype=np.float32)
            for m in range(self.M):
                sub = q[m * self.Ds:(m + 1) * self.Ds]
                T[m] = np.matmul(self.codewords[m], sub[None, :].T).sum(axis=-1)
            return DistanceTable(T, metric=self.metric)
        return DistanceTable(self.dtables(q[None, :])[0], metric=self.metric)

    def search(self, queries, codes, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Exhaustive ADC search: the k nearest codes of every query.

        Parameters
        ----------
        queries : array_like, shape (nq, D) or (D,)
        codes : array_like of int, shape (N, M)
        k : int

        Returns
        -------
        D : numpy.ndarray, float32, shape (nq, k)
            Asymmetric distances, ascending (inner products, descending, for metric='dot').
        I : numpy.ndarray, int64, shape (nq, k)
            Row numbers into ``codes``; -1 (with distance inf, or -inf for 'dot') where N < k.
        """
        self._require_fitted("search")
        return adc_search(lambda Q: self.dtables(Q), np.asarray(queries), codes, k, self.M,
                          self.Ks, self.metric, self.D, getattr(self, "n_threads", None))


def adc_search(make_tables, queries, codes, k, M, Ks, metric, D, n_threads):
    """Batched exhaustive ADC top-k shared by PQ and OPQ (make_tables: queries -> tables;
    n_threads: the owner's setting, resolved here by the number of queries)."""
    k = positive_int(k, "k")
    if np.ndim(queries) == 1:
        queries = np.asarray(queries)[None, :]
    Q = as_vectors(queries, "queries", dim=D, allow_empty=True)
    codes = as_codes(codes, M, Ks)
    nq = Q.shape[0]
    n_threads = resolve(n_threads, nq, 8)
    Dist = np.empty((nq, k), dtype=np.float32)
    I = np.empty((nq, k), dtype=np.int64)
    for q0 in range(0, nq, _SEARCH_BATCH):
        T = make_tables(Q[q0:q0 + _SEARCH_BATCH])
        if metric == "dot":
            np.negative(T, out=T)  # largest inner product = smallest negated one
        _adc.adc_topk(T, codes, Dist[q0:q0 + _SEARCH_BATCH], I[q0:q0 + _SEARCH_BATCH],
                      n_threads)
    if metric == "dot":
        np.negative(Dist, out=Dist)
    return Dist, I


_ADC_PER_THREAD = 1 << 14   # codes per thread of one query's adist (default threads)
_DOT_CHUNK = 1 << 16   # codes per NumPy step of a metric='dot' adist (bounds its memory)


class DistanceTable:
    """Distances from one query to every codeword, for asymmetric distances to codes.

    Parameters
    ----------
    dtable : array_like, float32, shape (M, Ks)
        From :meth:`PQ.dtable` or :meth:`OPQ.dtable`.
    metric : {'l2', 'dot'}

    Attributes
    ----------
    dtable : numpy.ndarray, float32, shape (M, Ks)
    metric : str
    """

    def __init__(self, dtable, metric: Metric = "l2", n_threads: Optional[int] = None):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.dtable = as_vectors(dtable, "dtable")
        self.metric = metric
        self.n_threads = n_threads

    def adist(self, codes) -> np.ndarray:
        """Asymmetric distances from the query to codes.

        Parameters
        ----------
        codes : array_like of int, shape (N, M)

        Returns
        -------
        numpy.ndarray, float32, shape (N,)
            sum over m of dtable[m, codes[n, m]].
        """
        M, Ks = self.dtable.shape
        codes = as_codes(codes, M, Ks)
        out = np.empty(codes.shape[0], dtype=np.float32)
        if self.metric == "dot":  # nanopq's sum, to the bit (see PQ.dtable)
            rows = np.arange(M)
            for a in range(0, len(codes), _DOT_CHUNK):
                out[a:a + _DOT_CHUNK] = np.sum(self.dtable[rows, codes[a:a + _DOT_CHUNK]],
                                               axis=1)
            return out
        _adc.adc(self.dtable, codes, out,
                 resolve(getattr(self, "n_threads", None), len(codes), _ADC_PER_THREAD))
        return out
