"""k-means for product quantisers: M independent k-means, one per subspace, run in lockstep.

One Lloyd iteration is one pass of the encode kernel (assignment for all subspaces at once) and
one of the update kernel. With M = 1 this is plain k-means.
"""
from __future__ import annotations

import numpy as np

from . import _kmeans, _quantize
from ._checks import code_dtype_for
from ._threads import single_threaded_blas

MINITS = ("random", "++", "points", "matrix")
# Relative perturbation used when an empty cluster takes half of the largest one (as faiss).
_SPLIT_EPS = 1.0 / 1024


def subspace_kmeans(X: np.ndarray, M: int, Ks: int, *, iter: int = 20, seed: int = 123,
                    minit: str = "points", init: np.ndarray | None = None,
                    max_points_per_centroid: int | None = None, n_threads: int = 1,
                    verbose: bool = False, label: str = "k-means",
                    scipy_points: bool = False) -> np.ndarray:
    """Train Ks centroids in each of the M subspaces of X.

    Parameters
    ----------
    X : numpy.ndarray, float32, shape (N, D), C-contiguous
        Training vectors (validated by the caller); D must be a multiple of M.
    M, Ks : int
        Number of subspaces and of centroids per subspace. N >= Ks is required.
    iter : int
        Maximum Lloyd iterations; stops early when no assignment changes.
    seed : int
        Seed of every random choice (sampling, initialisation): same seed, same result.
    minit : {'points', '++', 'random', 'matrix'}
        Initialisation: distinct random rows, k-means++, Gaussian with the data's mean and
        covariance, or the given ``init`` ('matrix').
    init : numpy.ndarray, float32, shape (M, Ks, D // M), optional
        Starting centroids (warm start); overrides minit.
    max_points_per_centroid : int, optional
        Train on a random sample of at most Ks * max_points_per_centroid rows.
    n_threads : int
        Threads of the kernels.
    verbose : bool
        Print progress per iteration.
    label : str
        Prefix of the progress lines.
    scipy_points : bool
        With minit='points', start from the rows scipy's ``kmeans2(minit='points',
        seed=seed)`` picks (``RandomState(seed).choice(N, Ks, replace=False)``, the same rows
        in every subspace), as nanopq does: the nanopq API's initial centroids.

    Returns
    -------
    numpy.ndarray, float32, shape (M, Ks, D // M)
        The centroids.
    """
    N, D = X.shape
    Ds = D // M
    rng = np.random.default_rng(seed)
    if max_points_per_centroid is not None and N > Ks * max_points_per_centroid:
        rows = np.sort(rng.choice(N, Ks * max_points_per_centroid, replace=False))
        X = X[rows]
        N = X.shape[0]
        if verbose:
            print(f"{label}: sampled {N} training points")
    if init is not None:
        C = np.array(init, dtype=np.float32, order="C", copy=True)
        if C.shape != (M, Ks, Ds):
            raise ValueError(f"init must have shape {(M, Ks, Ds)}, got {C.shape}")
    elif minit == "points" and scipy_points:
        rows = np.random.RandomState(seed).choice(N, Ks, replace=False)
        C = np.ascontiguousarray(X[rows].reshape(Ks, M, Ds).transpose(1, 0, 2))
    else:
        C = _initial_centroids(X, M, Ks, minit, rng, n_threads)

    codes = np.empty((N, M), dtype=code_dtype_for(Ks))
    prev = np.empty_like(codes)
    counts = np.empty((M, Ks), dtype=np.int64)
    no_err = np.empty(0, dtype=np.float32)
    with single_threaded_blas():
        for it in range(iter):
            _quantize.encode(X, C, codes, no_err, n_threads)
            if it > 0:
                changed = int(np.count_nonzero(codes != prev))
                if verbose:
                    print(f"{label}: iteration {it + 1}/{iter}, {changed} assignments changed")
                if changed == 0:
                    break  # converged: the update would give the same centroids
            elif verbose:
                print(f"{label}: iteration 1/{iter}")
            _kmeans.update_centroids(X, codes, C, counts, n_threads)
            _split_empty(C, counts)
            codes, prev = prev, codes
    return C


def lloyd_sums(X: np.ndarray, C: np.ndarray, n_threads: int = 1):
    """The assignment half of a Lloyd step on one part of the data, as sums that add up
    across parts (distributed k-means: sum them, then :func:`centroids_from_sums`).

    Parameters
    ----------
    X : numpy.ndarray float32 (N, D), C-contiguous
    C : numpy.ndarray float32 (M, Ks, D // M)

    Returns
    -------
    sums : numpy.ndarray float64 (M, Ks, D // M)
    counts : numpy.ndarray int64 (M, Ks)
    """
    M, Ks, Ds = C.shape
    codes = np.empty((X.shape[0], M), dtype=code_dtype_for(Ks))
    means = np.zeros_like(C)
    counts = np.empty((M, Ks), dtype=np.int64)
    with single_threaded_blas():
        _quantize.encode(X, C, codes, np.empty(0, dtype=np.float32), n_threads)
        _kmeans.update_centroids(X, codes, means, counts, n_threads)
    return means.astype(np.float64) * counts[:, :, None], counts


def centroids_from_sums(sums: np.ndarray, counts: np.ndarray, C: np.ndarray) -> np.ndarray:
    """New centroids (M, Ks, Ds) float32 from summed :func:`lloyd_sums`; an empty cluster
    splits the largest of its subspace, as in :func:`subspace_kmeans`."""
    new = np.array(C, dtype=np.float32, copy=True)
    full = counts > 0
    new[full] = (sums[full] / counts[full][:, None]).astype(np.float32)
    counts = counts.copy()
    _split_empty(new, counts)
    return new


def _initial_centroids(X: np.ndarray, M: int, Ks: int, minit: str, rng: np.random.Generator,
                       n_threads: int) -> np.ndarray:
    N, D = X.shape
    Ds = D // M
    C = np.empty((M, Ks, Ds), dtype=np.float32)
    if minit == "matrix":
        raise ValueError("minit='matrix' needs the initial centroids: pass init=")
    for m in range(M):
        cols = slice(m * Ds, (m + 1) * Ds)
        if minit == "points":
            C[m] = X[rng.choice(N, Ks, replace=False), cols]
        elif minit == "++":
            _kmeans.kmeanspp(X, m * Ds, rng.random(Ks), int(rng.integers(N)), C[m], n_threads)
        elif minit == "random":
            sub = X[:, cols].astype(np.float64)
            mean = sub.mean(axis=0)
            cov = np.atleast_2d(np.cov(sub, rowvar=False))
            # Gaussian with the data's mean and covariance (scipy kmeans2's 'random').
            w, v = np.linalg.eigh(cov)
            z = rng.standard_normal((Ks, Ds)) * np.sqrt(np.clip(w, 0, None))
            C[m] = mean + z @ v.T
        else:
            raise ValueError(f"minit must be one of {MINITS}, got {minit!r}")
    return C


def _split_empty(C: np.ndarray, counts: np.ndarray) -> None:
    """Re-seed every empty centroid by splitting the currently largest cluster of its subspace."""
    for m in np.flatnonzero((counts == 0).any(axis=1)):
        for k in np.flatnonzero(counts[m] == 0):
            j = int(np.argmax(counts[m]))
            if counts[m, j] < 2:
                break  # nothing left to split
            sign = np.where(np.arange(C.shape[2]) % 2 == 0, 1.0, -1.0)
            # Additive, so a centroid with zero coordinates still splits into two.
            delta = (sign * _SPLIT_EPS * (np.abs(C[m, j]) + np.abs(C[m]).mean() + 1e-8))
            C[m, k] = C[m, j] + delta
            C[m, j] = C[m, j] - delta
            counts[m, k] = counts[m, j] // 2
            counts[m, j] -= counts[m, k]
