"""LOPQ training: the procedure that fills a model's missing parts, and the statistics it
computes (the balanced PCA, per-cluster residual moments, the local rotations made from
them). Moments of disjoint parts of the data combine exactly (:func:`combine_moments`), so
the same statistics serve training on one machine and on Spark."""
from __future__ import annotations

import time

import numpy as np

from . import _lopq
from ._threads import single_threaded_blas
from .kmeans import subspace_kmeans
from .opq import eigenvalue_allocation_matrix


def train_pca(X: np.ndarray, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """PCA whose directions are dealt to the two halves by eigenvalue allocation.

    Parameters
    ----------
    X : numpy.ndarray float32 (N, D)
    dim : int, optional
        Keep the ``dim`` leading directions (even, < D); default all D (D even).

    Returns
    -------
    mean : numpy.ndarray float32 (D,)
    P : numpy.ndarray float32 (D, dim), orthonormal columns; the first dim/2 span half 0.
    """
    return pca_from_moments(*data_moments(X), dim)


def data_moments(X: np.ndarray):
    """(n, mean (D,) float64, m2 (D, D) float64: sum of the centred outer products) of
    float32 rows X (N, D); moments of parts combine exactly (:func:`combine_moments`)."""
    mean = X.mean(axis=0, dtype=np.float64)
    Xc = X - mean.astype(np.float32)
    return np.int64(X.shape[0]), mean, (Xc.T @ Xc).astype(np.float64)


def pca_from_moments(n: int, mean: np.ndarray, m2: np.ndarray,
                     dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`train_pca` from the data's moments (what a distributed pass aggregates).

    Parameters
    ----------
    n : int
        Number of vectors.
    mean : numpy.ndarray float64 (D,)
    m2 : numpy.ndarray float64 (D, D)
        Sum of the outer products of the centred vectors.
    dim : int, optional
        Directions kept (default all).
    """
    P = eigenvalue_allocation_matrix(m2 / max(1, n - 1), 2, dim)
    return np.asarray(mean, dtype=np.float32), np.ascontiguousarray(P, dtype=np.float32)


def residual_moments(X, col0, C, order, offsets, n_threads):
    """Per coarse cluster of one half: (counts (V,) int64, mean (V, d) float64, m2 (V, d, d)
    float64) of the residuals x - C[c], m2 being the sum of the centred outer products.

    Moments of disjoint parts of the data combine exactly (:func:`combine_moments`).
    """
    V, d = C.shape
    mean = np.empty((V, d))
    cov = np.empty((V, d, d))
    _lopq.residual_stats(X, col0, C, order, offsets, mean, cov, n_threads)
    counts = np.diff(offsets).astype(np.int64)
    return counts, mean, cov * counts[:, None, None]


def combine_moments(a, b):
    """Moments (counts, mean, m2) of the union of two disjoint parts (Chan et al.), with
    counts, means and m2 batched over any leading axes."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    w = np.where(n > 0, nb / np.maximum(n, 1), 0.0)[..., None]
    delta = mb - ma
    mean = ma + delta * w
    m2 = m2a + m2b + (delta[..., :, None] * delta[..., None, :]) * (
        (na * w[..., 0]))[..., None, None]
    return n, mean, m2


def local_rotations(X, col0, C, order, offsets, num_buckets, n_threads):
    """Local rotations, residual means and how each rotation was obtained, of one half's
    coarse clusters (see :func:`rotations_from_moments`)."""
    return rotations_from_moments(*residual_moments(X, col0, C, order, offsets, n_threads),
                                  num_buckets, report=True)


OWN, SHRUNK, POOLED = 0, 1, 2   # how a cluster's local rotation was obtained
ROTATION_SOURCES = ("own", "shrunk", "pooled")
# Weight of the pooled covariance in a small cluster's, in points per dimension. On MANMINILM
# (V=256, 20k learn: ~140 of 256 clusters per half under 192 points) recall@1 at quota 3000,
# identity / 0.25 / 1 / 4 / 8: M=16 0.49 / 0.49 / 0.53 / 0.53 / 0.52, M=48 0.71 / 0.71 / 0.70
# / 0.74 / 0.74 (1000 queries); recall@10 the same or better than the identity's.
SHRINK_POINTS_PER_DIM = 4


def rotations_from_moments(counts, mean, m2, num_buckets, report: bool = False):
    """Local rotations from the residual moments of one half's clusters.

    A cluster with at least as many points as dimensions d uses its own residual covariance.
    Fewer points cannot determine a d x d covariance (the rotation collapses), so a smaller
    cluster's covariance is shrunk toward the half's pooled within-cluster covariance, with
    the weight of k = SHRINK_POINTS_PER_DIM * d pseudo-points: ``(m2_c + k * S_pool) /
    (n_c + k)``; an empty cluster takes the pooled covariance itself.

    Parameters
    ----------
    counts : numpy.ndarray int64 (V,)
    mean : numpy.ndarray float64 (V, d)
    m2 : numpy.ndarray float64 (V, d, d)
        Sums of the centred outer products (:func:`residual_moments`).
    num_buckets : int
        Subspaces per half the eigenvalues are allocated to.
    report : bool
        Also return how each rotation was obtained.

    Returns
    -------
    R : numpy.ndarray float32 (V, d, d)
        Rows: eigenvectors of the (shrunk) covariance, eigenvalue-allocated into num_buckets
        groups.
    mu : numpy.ndarray float32 (V, d)
        Mean residual (zero for empty clusters).
    sources : numpy.ndarray int8 (V,), with ``report``
        OWN, SHRUNK or POOLED per cluster (names in ROTATION_SOURCES).
    """
    V, d = mean.shape
    counts = np.asarray(counts)
    pooled = m2.sum(axis=0) / max(1, int(counts.sum()))
    sources = np.where(counts >= d, OWN, np.where(counts > 0, SHRUNK, POOLED)).astype(np.int8)
    k = SHRINK_POINTS_PER_DIM * d
    R = np.empty((V, d, d), dtype=np.float32)
    for c in range(V):
        if sources[c] == OWN:
            cov = m2[c] / counts[c]
        else:
            cov = (m2[c] + k * pooled) / (counts[c] + k)
        R[c] = eigenvalue_allocation_matrix(cov, num_buckets).T
    mu = np.asarray(mean, dtype=np.float32)
    return (R, mu, sources) if report else (R, mu)


def rotation_report(sources) -> str:
    """One line: per half, how many clusters' rotations came from each source."""
    return "; ".join(f"half {h}: " + ", ".join(
        f"{int(np.sum(src == k))} {name}" for k, name in enumerate(ROTATION_SOURCES))
        for h, src in enumerate(sources)) + " (rotations from own / shrunk / pooled covariance)"


def train_missing_parts(model, X: np.ndarray, kmeans_coarse_iters: int,
                        kmeans_local_iters: int, sample_ratio: float, seed: int,
                        verbose: bool, nt: int, progress=None) -> None:
    """Train the parts an LOPQ model lacks (PCA when asked for, coarse quantizers, local
    rotations and means, fine subquantizers) on float32 X (N, D), which the caller
    (``LOPQModel.fit``) has validated; sets them on the model. A line per phase goes to
    ``progress`` (and is printed when ``verbose``)."""
    N = X.shape[0]
    X = model.normalize(X, "data")   # cosine: the PCA and all parts learn unit vectors
    t0 = time.perf_counter()

    def log(line: str) -> None:
        line = f"{line} ({time.perf_counter() - t0:.1f} s)"
        if verbose:
            print(line)
        if progress is not None:
            progress(line)
    if model.pca and model.pca_matrix is None and model.Cs is None:
        log("LOPQ: PCA")
        model.set_pca(*train_pca(X, model.pca_dim))
    X = model.to_model_space(X, "data")
    Dh = X.shape[1] // 2
    with single_threaded_blas():
        if model.Cs is None:
            log(f"LOPQ: coarse quantizers, 2 x {model.V} centroids")
            C = subspace_kmeans(X, 2, model.V, iter=kmeans_coarse_iters, seed=seed,
                                n_threads=nt, verbose=verbose, label="coarse k-means")
            model.Cs = (C[0], C[1])
        coarse = model.kernel_view().coarse_codes(X, nt)
        groups = model.kernel_view().groups(coarse)
        if model.Rs is None or model.mus is None:
            log("LOPQ: local rotations")
            Rs, mus, sources = [], [], []
            for h in range(2):
                R, mu, src = local_rotations(X, h * Dh, model.Cs[h], *groups[h],
                                             model.num_fine_splits, nt)
                Rs.append(R)
                mus.append(mu)
                sources.append(src)
            model.Rs = model.Rs if model.Rs is not None else tuple(Rs)
            model.mus = model.mus if model.mus is not None else tuple(mus)
            model.rotation_sources = tuple(sources)
            log("LOPQ: " + rotation_report(sources))
        if model.subquantizers is None:
            rows = None
            if sample_ratio < 1:
                rng = np.random.default_rng(seed + 1)
                n = max(model.subquantizer_clusters, int(N * sample_ratio))
                rows = np.sort(rng.choice(N, n, replace=False))
            PX = model.kernel_view().project(X, coarse, nt, groups, rows)
            log(f"LOPQ: {model.M} fine subquantizers of {model.subquantizer_clusters}")
            subs = subspace_kmeans(PX, model.M, model.subquantizer_clusters,
                                   iter=kmeans_local_iters, seed=seed + 2, n_threads=nt,
                                   verbose=verbose, label="fine k-means")
            h = model.num_fine_splits
            model.subquantizers = ([s for s in subs[:h]], [s for s in subs[h:]])
