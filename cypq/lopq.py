"""Locally Optimized Product Quantization (Kalantidis & Avrithis, CVPR 2014).

The model follows the LOPQ Python code's conventions: the vector is split into two halves; each
half has a coarse quantizer of V centroids, so a cell is (c0, c1) with id c0 * V + c1; the
residual of a half is expressed in a local frame of its coarse centroid,
``R[c] @ (x_half - C[c] - mu[c])``; M fine subquantizers (M/2 per half, shared by all cells)
encode the locally projected residual. Optionally the vectors first go through a PCA whose
directions are dealt to the two halves so both carry a balanced share of the variance.
"""
from __future__ import annotations

import warnings
from collections import namedtuple
from typing import Optional, Sequence

import numpy as np

from . import _lopq, _quantize
from ._checks import as_codes, as_vectors, code_dtype_for, positive_int
from ._threads import resolve, single_threaded_blas
from .kmeans import subspace_kmeans
from .opq import eigenvalue_allocation_matrix
from .pq import NotFittedError

LOPQCode = namedtuple("LOPQCode", ["coarse", "fine"])
LOPQCode.__doc__ = """An LOPQ code: ``coarse`` = (c0, c1), ``fine`` = (f_0 .. f_{M-1}).

For one vector these are tuples of ints; for a batch of N vectors, arrays (N, 2) and (N, M)."""


class LOPQModel:
    """An LOPQ model: PCA (optional), coarse quantizers, local rotations, fine subquantizers.

    Parameters
    ----------
    V : int
        Coarse centroids per half (V * V cells).
    M : int
        Fine subquantizers in all (M / 2 per half); even.
    subquantizer_clusters : int
        Centroids per fine subquantizer (256: one byte per subquantizer).
    parameters : tuple, optional
        ``((C0, C1), (Rs0, Rs1), (mu0, mu1), (subs0, subs1))`` as in the LOPQ code: C (V, D/2);
        Rs (V, D/2, D/2); mu (V, D/2); subs a sequence of M/2 arrays (S, D/M) per half. Any part
        may be None; ``fit`` trains only the missing parts.
    pca : bool
        Learn a PCA of the training data in ``fit`` (when not already present) and apply it to
        every vector; its directions are balanced between the two halves. Off by default: on
        REALSIFT1M (V=1024, M=16) it lowers recall@10 from 0.94 to 0.89 at quota 5000, as
        the natural halves of SIFT are better coarse subspaces than balanced PCA halves.

    Attributes
    ----------
    Cs, Rs, mus : tuple of two numpy.ndarray (float32) or None
    subquantizers : tuple of two lists of numpy.ndarray (float32) or None
    pca_mean : numpy.ndarray (D,) float32 or None
    pca_matrix : numpy.ndarray (D, D') float32 or None
        Vectors enter the model as ``(x - pca_mean) @ pca_matrix``.
    V, M, subquantizer_clusters, num_coarse_splits (2), num_fine_splits (M / 2)
    n_threads : int or None
        Threads of the kernels (None: all cores).
    """

    num_coarse_splits = 2

    def __init__(self, V: int = 8, M: int = 4, subquantizer_clusters: int = 256,
                 parameters: Optional[Sequence] = None, pca: bool = False,
                 n_threads: Optional[int] = None):
        Cs, Rs, mus, subs = parameters if parameters is not None else (None,) * 4
        self.Cs = _pair(Cs, "Cs", 2)
        self.Rs = _pair(Rs, "Rs", 3)
        self.mus = _pair(mus, "mus", 2)
        self.subquantizers = None
        if subs is not None:
            if len(subs) != 2 or len(subs[0]) != len(subs[1]) or len(subs[0]) == 0:
                raise ValueError("subquantizers must be two equally long sequences of "
                                 "(S, D/M) arrays")
            self.subquantizers = tuple([_f32(s, "subquantizer", 2) for s in half]
                                       for half in subs)
        self.V = int(self.Cs[0].shape[0]) if self.Cs is not None else positive_int(V, "V")
        if self.subquantizers is not None:
            self.M = 2 * len(self.subquantizers[0])
            self.subquantizer_clusters = int(self.subquantizers[0][0].shape[0])
        else:
            self.M = positive_int(M, "M")
            self.subquantizer_clusters = positive_int(subquantizer_clusters,
                                                      "subquantizer_clusters")
        if self.M % 2:
            raise ValueError(f"M must be even (M/2 subquantizers per half), got {self.M}")
        self.pca = bool(pca)
        self.pca_mean: Optional[np.ndarray] = None
        self.pca_matrix: Optional[np.ndarray] = None
        self.n_threads = n_threads
        resolve(n_threads)
        self._check_consistent()

    # ------------------------------------------------------------------ structure
    @property
    def num_fine_splits(self) -> int:
        """int: fine subquantizers per half, M / 2."""
        return self.M // 2

    @property
    def fine_code_dtype(self) -> type:
        """type: dtype of fine codes (uint8 for subquantizer_clusters <= 256)."""
        return code_dtype_for(self.subquantizer_clusters)

    @property
    def D(self) -> Optional[int]:
        """int or None: dimension of the vectors the model takes (before PCA)."""
        if self.pca_matrix is not None:
            return int(self.pca_matrix.shape[0])
        return self.model_dim

    @property
    def model_dim(self) -> Optional[int]:
        """int or None: dimension inside the model (after PCA)."""
        if self.Cs is not None:
            return 2 * int(self.Cs[0].shape[1])
        if self.mus is not None:
            return 2 * int(self.mus[0].shape[1])
        if self.subquantizers is not None:
            return self.M * int(self.subquantizers[0][0].shape[1])
        return None

    @property
    def is_trained(self) -> bool:
        """bool: every part present, so vectors can be encoded."""
        return None not in (self.Cs, self.Rs, self.mus, self.subquantizers)

    def _check_consistent(self) -> None:
        dims = set()
        if self.Cs is not None:
            if self.Cs[0].shape != self.Cs[1].shape:
                raise ValueError(f"Cs halves differ in shape: {self.Cs[0].shape} vs "
                                 f"{self.Cs[1].shape}")
            dims.add(self.Cs[0].shape[1])
        if self.Rs is not None:
            V, a, b = self.Rs[0].shape
            if a != b or self.Rs[1].shape != (V, a, b) or V != self.V:
                raise ValueError(f"Rs must be two (V={self.V}, D/2, D/2) arrays, got "
                                 f"{self.Rs[0].shape} and {self.Rs[1].shape}")
            dims.add(a)
        if self.mus is not None:
            if self.mus[0].shape != self.mus[1].shape or self.mus[0].shape[0] != self.V:
                raise ValueError(f"mus must be two (V={self.V}, D/2) arrays, got "
                                 f"{self.mus[0].shape} and {self.mus[1].shape}")
            dims.add(self.mus[0].shape[1])
        if self.subquantizers is not None:
            shapes = {s.shape for half in self.subquantizers for s in half}
            if len(shapes) != 1:
                raise ValueError(f"subquantizers differ in shape: {sorted(shapes)}")
            S, ds = shapes.pop()
            dims.add(ds * self.num_fine_splits)
        if len(dims) > 1:
            raise ValueError(f"model parts disagree on the half dimension D/2: {sorted(dims)}")
        if self.pca_matrix is not None and dims and self.pca_matrix.shape[1] != 2 * dims.pop():
            raise ValueError("the PCA's output dimension does not match the model")

    def _require(self, *parts: str) -> None:
        missing = [p for p in parts if getattr(self, p) is None]
        if missing:
            raise NotFittedError(f"this LOPQ model has no {', '.join(missing)}: call fit() "
                                 "(it trains only the missing parts) or load a full model")

    def _threads(self) -> int:
        return resolve(getattr(self, "n_threads", None))

    def __repr__(self) -> str:
        parts = [p for p in ("Cs", "Rs", "mus", "subquantizers") if getattr(self, p) is not None]
        return (f"LOPQModel(V={self.V}, M={self.M}, subquantizer_clusters="
                f"{self.subquantizer_clusters}, D={self.D}, pca={self.pca_matrix is not None}, "
                f"parts={parts})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, LOPQModel):
            return False
        if (self.V, self.M, self.subquantizer_clusters) != (other.V, other.M,
                                                            other.subquantizer_clusters):
            return False
        return all(_same(getattr(self, a), getattr(other, a))
                   for a in ("Cs", "Rs", "mus", "subquantizers", "pca_mean", "pca_matrix"))

    __hash__ = None

    def __setstate__(self, state):
        state.setdefault("n_threads", None)
        self.__dict__.update(state)

    def get_split_parameters(self, split: int):
        """(C, R, mu, subquantizers) of half ``split`` (None for missing parts)."""
        return tuple(None if p is None else p[split]
                     for p in (self.Cs, self.Rs, self.mus, self.subquantizers))

    # ------------------------------------------------------------------ training
    def fit(self, data, kmeans_coarse_iters: int = 10, kmeans_local_iters: int = 20,
            n_init: int = 1, subquantizer_sample_ratio: float = 1.0,
            random_state: Optional[int] = None, verbose: bool = False,
            n_threads: Optional[int] = None) -> "LOPQModel":
        """Train the missing parts of the model.

        Parameters
        ----------
        data : array_like, shape (N, D)
            Training vectors; D even and divisible by M, N >= V and N >= S.
        kmeans_coarse_iters : int
            k-means iterations of the coarse quantizers.
        kmeans_local_iters : int
            k-means iterations of the fine subquantizers.
        n_init : int
            Accepted for LOPQ compatibility; cypq runs one (seeded) k-means per quantizer.
        subquantizer_sample_ratio : float
            Share of the training vectors used for the fine subquantizers.
        random_state : int, optional
            Seed; the same seed gives the same model.
        verbose : bool
            Print progress.
        n_threads : int, optional
            Threads for this call (default: the model's).

        Returns
        -------
        self
        """
        nt = resolve(n_threads) if n_threads is not None else self._threads()
        seed = 0 if random_state is None else int(random_state)
        if not 0 < subquantizer_sample_ratio <= 1:
            raise ValueError("subquantizer_sample_ratio must be in (0, 1]")
        X = as_vectors(data, "data", dim=self.D)
        N, D = X.shape
        if D % 2 or D % self.M:
            raise ValueError(f"dimension {D} must be even and divisible by M={self.M}")
        need = max(self.V if self.Cs is None else 1,
                   self.subquantizer_clusters if self.subquantizers is None else 1)
        if N < need:
            raise ValueError(f"{N} training vectors are fewer than V={self.V} or "
                             f"subquantizer_clusters={self.subquantizer_clusters}")
        log = print if verbose else (lambda *a, **k: None)
        if self.pca and self.pca_matrix is None and self.Cs is None:
            log("LOPQ: PCA")
            self.pca_mean, self.pca_matrix = train_pca(X)
        X = self._apply_pca(X)
        Dh = X.shape[1] // 2
        with single_threaded_blas():
            if self.Cs is None:
                log(f"LOPQ: coarse quantizers, 2 x {self.V} centroids")
                C = subspace_kmeans(X, 2, self.V, iter=kmeans_coarse_iters, seed=seed,
                                    n_threads=nt, verbose=verbose, label="coarse k-means")
                self.Cs = (C[0], C[1])
            coarse = self._coarse(X, nt)
            groups = self._groups(coarse)
            if self.Rs is None or self.mus is None:
                log("LOPQ: local rotations")
                Rs, mus = [], []
                for h in range(2):
                    R, mu = local_rotations(X, h * Dh, self.Cs[h], *groups[h],
                                            self.num_fine_splits, nt)
                    Rs.append(R)
                    mus.append(mu)
                self.Rs = self.Rs if self.Rs is not None else tuple(Rs)
                self.mus = self.mus if self.mus is not None else tuple(mus)
            if self.subquantizers is None:
                rows = None
                if subquantizer_sample_ratio < 1:
                    rng = np.random.default_rng(seed + 1)
                    n = max(self.subquantizer_clusters, int(N * subquantizer_sample_ratio))
                    rows = np.sort(rng.choice(N, n, replace=False))
                PX = self._project_grouped(X, coarse, nt, groups, rows)
                log(f"LOPQ: {self.M} fine subquantizers of {self.subquantizer_clusters}")
                subs = subspace_kmeans(PX, self.M, self.subquantizer_clusters,
                                       iter=kmeans_local_iters, seed=seed + 2, n_threads=nt,
                                       verbose=verbose, label="fine k-means")
                h = self.num_fine_splits
                self.subquantizers = ([s for s in subs[:h]], [s for s in subs[h:]])
        self._check_consistent()
        return self

    # ------------------------------------------------------------------ helpers
    def _apply_pca(self, X: np.ndarray) -> np.ndarray:
        if self.pca_matrix is None:
            return X
        return np.ascontiguousarray((X - self.pca_mean) @ self.pca_matrix, dtype=np.float32)

    def _prepare(self, x, name="x", allow_empty=True):
        """(float32 (N, model_dim) array after PCA, whether the input was one vector)."""
        arr = np.asarray(x)
        single = arr.ndim == 1
        X = as_vectors(arr[None, :] if single else arr, name, dim=self.D,
                       allow_empty=allow_empty)
        return self._apply_pca(X), single

    def _coarse_stack(self) -> np.ndarray:
        return np.ascontiguousarray(np.stack(self.Cs), dtype=np.float32)

    def _coarse(self, X: np.ndarray, nt: int) -> np.ndarray:
        codes = np.empty((X.shape[0], 2), dtype=np.int32 if self.V > 65536 else
                         code_dtype_for(self.V))
        with single_threaded_blas():
            _quantize.encode(X, self._coarse_stack(), codes, np.empty(0, np.float32), nt)
        return codes.astype(np.int32)

    def _rotations_transposed(self) -> tuple[np.ndarray, np.ndarray]:
        """Rs with each rotation transposed (what the search kernel reads), cached."""
        cache = getattr(self, "_rt_cache", None)
        if cache is None or cache[0] is not self.Rs:
            rt = tuple(np.ascontiguousarray(R.transpose(0, 2, 1)) for R in self.Rs)
            self._rt_cache = cache = (self.Rs, rt)
        return cache[1]

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_rt_cache", None)
        return state

    def _fine_stack(self) -> np.ndarray:
        return np.ascontiguousarray(np.stack(list(self.subquantizers[0])
                                             + list(self.subquantizers[1])), dtype=np.float32)

    def _check_coarse(self, coarse, n: int) -> np.ndarray:
        c = np.asarray(coarse)
        if c.ndim == 1:
            c = c[None, :]
        if c.shape != (n, 2):
            raise ValueError(f"coarse codes must have shape ({n}, 2), got {np.shape(coarse)}")
        if not np.issubdtype(c.dtype, np.integer):
            raise TypeError(f"coarse codes must be integers, got {c.dtype}")
        if c.size and (c.min() < 0 or c.max() >= self.V):
            raise ValueError(f"coarse codes must be in [0, {self.V})")
        return np.ascontiguousarray(c, dtype=np.int32)

    def _groups(self, coarse):
        """Rows grouped by coarse centroid, per half: [(order, offsets), (order, offsets)]."""
        return [_lopq.group_rows(np.ascontiguousarray(coarse[:, h]), self.V) for h in range(2)]

    def _project_grouped(self, X, coarse, nt, groups=None, rows=None, inverse=False):
        """Forward (or inverse) local projection of the rows of X; rows selects a subset;
        groups (from _groups) when the caller has them already."""
        Dh = X.shape[1] // 2
        if rows is not None:
            X = np.ascontiguousarray(X[rows])
            coarse = coarse[rows]
            groups = None
        if groups is None:
            groups = self._groups(coarse)
        out = np.empty_like(X)
        RT = self._rotations_transposed()
        for h in range(2):
            _lopq.project(X, h * Dh, self.Cs[h], self.Rs[h], RT[h], self.mus[h],
                          *groups[h], out, h * Dh, inverse, nt)
        return out

    # ------------------------------------------------------------------ encoding
    def predict_coarse(self, x):
        """Coarse codes.

        Parameters
        ----------
        x : array_like, shape (D,) or (N, D)

        Returns
        -------
        tuple (c0, c1) for one vector, or numpy.ndarray (N, 2) int32.
        """
        self._require("Cs")
        X, single = self._prepare(x)
        codes = self._coarse(X, self._threads())
        return tuple(int(c) for c in codes[0]) if single else codes

    def project(self, x, coarse_codes, coarse_split: Optional[int] = None):
        """Local projection ``R[c] @ (x_half - C[c] - mu[c])`` of each half.

        Parameters
        ----------
        x : array_like, shape (D,) or (N, D)
        coarse_codes : (c0, c1), or array_like (N, 2)
        coarse_split : {0, 1}, optional
            Project only this half.

        Returns
        -------
        numpy.ndarray float32, shape (model_dim,) or (N, model_dim); (model_dim / 2) per row
        when coarse_split is given.
        """
        self._require("Cs", "Rs", "mus")
        X, single = self._prepare(x)
        coarse = self._check_coarse(coarse_codes, X.shape[0])
        P = self._project_grouped(X, coarse, self._threads())
        if coarse_split is not None:
            if coarse_split not in (0, 1):
                raise ValueError("coarse_split must be 0 or 1")
            Dh = P.shape[1] // 2
            P = P[:, coarse_split * Dh:(coarse_split + 1) * Dh]
        return P[0] if single else P

    def predict_fine(self, x, coarse_codes=None):
        """Fine codes of the locally projected residuals.

        Parameters
        ----------
        x : array_like, shape (D,) or (N, D)
        coarse_codes : optional, as returned by predict_coarse (computed when omitted)

        Returns
        -------
        tuple of M ints, or numpy.ndarray (N, M) of fine_code_dtype.
        """
        self._require("Cs", "Rs", "mus", "subquantizers")
        X, single = self._prepare(x)
        nt = self._threads()
        coarse = (self._coarse(X, nt) if coarse_codes is None
                  else self._check_coarse(coarse_codes, X.shape[0]))
        fine = self._fine(X, coarse, nt)
        return tuple(int(c) for c in fine[0]) if single else fine

    def _fine(self, X, coarse, nt):
        PX = self._project_grouped(X, coarse, nt)
        fine = np.empty((X.shape[0], self.M), dtype=self.fine_code_dtype)
        _quantize.encode(PX, self._fine_stack(), fine, np.empty(0, np.float32), nt)
        return fine

    def predict(self, x) -> LOPQCode:
        """LOPQ code(s) of vector(s).

        Parameters
        ----------
        x : array_like, shape (D,) or (N, D)

        Returns
        -------
        LOPQCode
            (coarse, fine): tuples for one vector, arrays (N, 2) int32 and (N, M) for a batch.
        """
        self._require("Cs", "Rs", "mus", "subquantizers")
        X, single = self._prepare(x)
        nt = self._threads()
        coarse = self._coarse(X, nt)
        fine = self._fine(X, coarse, nt)
        if single:
            return LOPQCode(tuple(int(c) for c in coarse[0]), tuple(int(c) for c in fine[0]))
        return LOPQCode(coarse, fine)

    def reconstruct(self, codes):
        """Approximate vector(s) from LOPQ code(s): ``R[c].T @ sub + mu[c] + C[c]`` per half.

        Parameters
        ----------
        codes : LOPQCode or ((c0, c1), (f_0 .. f_{M-1})), or (coarse (N, 2), fine (N, M))

        Returns
        -------
        numpy.ndarray float32, shape (D,) or (N, D), in the input space (PCA undone).
        """
        self._require("Cs", "Rs", "mus", "subquantizers")
        coarse, fine = codes
        single = np.ndim(fine) == 1
        fine = np.asarray(fine)[None, :] if single else np.asarray(fine)
        coarse = self._check_coarse(coarse, fine.shape[0])
        fine = as_codes(fine, self.M, self.subquantizer_clusters, "fine codes")
        sub = np.empty((fine.shape[0], self.model_dim), dtype=np.float32)
        nt = self._threads()
        _quantize.decode(fine, self._fine_stack(), sub, nt)
        X = self._project_grouped(sub, coarse, nt, inverse=True)
        if self.pca_matrix is not None:
            X = X @ self.pca_matrix.T + self.pca_mean
        return X[0] if single else X

    def get_subquantizer_distances(self, x, coarse_codes, coarse_split: Optional[int] = None):
        """Squared distances of the projected sub-vectors to every fine codeword.

        Parameters
        ----------
        x : array_like, shape (D,)
        coarse_codes : (c0, c1)
        coarse_split : {0, 1}, optional
            Only that half's M/2 subquantizers.

        Returns
        -------
        list of numpy.ndarray (S,) float32: M of them (M/2 with coarse_split), as LOPQ's.
        For a batch x (N, D) with coarse codes (N, 2): numpy.ndarray (N, M, S).
        """
        self._require("Cs", "Rs", "mus", "subquantizers")
        X, single = self._prepare(x)
        coarse = self._check_coarse(coarse_codes, X.shape[0])
        PX = self._project_grouped(X, coarse, self._threads())
        T = np.empty((X.shape[0], self.M, self.subquantizer_clusters), dtype=np.float32)
        _quantize.tables(PX, self._fine_stack(), T, False, self._threads())
        if coarse_split is not None:
            if coarse_split not in (0, 1):
                raise ValueError("coarse_split must be 0 or 1")
            h = self.num_fine_splits
            T = T[:, coarse_split * h:(coarse_split + 1) * h]
        return list(T[0]) if single else T

    def get_cell_id_for_coarse_codes(self, coarse_codes):
        """Cell id(s) c0 * V + c1 of coarse codes (a pair, or an (N, 2) array -> int64 (N,))."""
        c = np.asarray(coarse_codes)
        if c.ndim == 1:
            return int(c[0]) * self.V + int(c[1])
        return c[:, 0].astype(np.int64) * self.V + c[:, 1]

    def get_coarse_codes_for_cell_id(self, cell_id):
        """Coarse codes of cell id(s): (c0, c1), or an (N, 2) array for an array of ids."""
        if np.ndim(cell_id) == 0:
            return (int(cell_id) // self.V, int(cell_id) % self.V)
        ids = np.asarray(cell_id, dtype=np.int64)
        return np.stack([ids // self.V, ids % self.V], axis=1)

    # ------------------------------------------------------------------ model files
    def export_proto(self, path_or_file) -> None:
        """Write the LOPQ protobuf model file (see cypq.model_io)."""
        from .model_io import export_proto
        export_proto(self, path_or_file)

    @staticmethod
    def load_proto(path_or_file) -> "LOPQModel":
        """Read an LOPQ protobuf model file (see cypq.model_io)."""
        from .model_io import load_proto
        return load_proto(path_or_file)


def train_pca(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA whose directions are dealt to the two halves by eigenvalue allocation.

    Parameters
    ----------
    X : numpy.ndarray float32 (N, D), D even

    Returns
    -------
    mean : numpy.ndarray float32 (D,)
    P : numpy.ndarray float32 (D, D), orthogonal; the first D/2 columns span half 0.
    """
    return pca_from_moments(*data_moments(X))


def data_moments(X: np.ndarray):
    """(n, mean (D,) float64, m2 (D, D) float64: sum of the centred outer products) of
    float32 rows X (N, D); moments of parts combine exactly (:func:`combine_moments`)."""
    mean = X.mean(axis=0, dtype=np.float64)
    Xc = X - mean.astype(np.float32)
    return np.int64(X.shape[0]), mean, (Xc.T @ Xc).astype(np.float64)


def pca_from_moments(n: int, mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`train_pca` from the data's moments (what a distributed pass aggregates).

    Parameters
    ----------
    n : int
        Number of vectors.
    mean : numpy.ndarray float64 (D,)
    m2 : numpy.ndarray float64 (D, D)
        Sum of the outer products of the centred vectors.
    """
    P = eigenvalue_allocation_matrix(m2 / max(1, n - 1), 2)
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
    """Local rotations and residual means of one half's coarse clusters (see
    :func:`rotations_from_moments`)."""
    return rotations_from_moments(*residual_moments(X, col0, C, order, offsets, n_threads),
                                  num_buckets)


def rotations_from_moments(counts, mean, m2, num_buckets):
    """Local rotations from the residual moments of one half's clusters.

    Returns
    -------
    R : numpy.ndarray float32 (V, d, d)
        Rows: eigenvectors of the cluster's residual covariance, eigenvalue-allocated into
        num_buckets groups (identity for clusters with fewer points than dimensions).
    mu : numpy.ndarray float32 (V, d)
        Mean residual (zero for empty clusters).
    """
    V, d = mean.shape
    R = np.empty((V, d, d), dtype=np.float32)
    small = counts < d
    for c in np.flatnonzero(~small):
        R[c] = eigenvalue_allocation_matrix(m2[c] / counts[c], num_buckets).T
    R[small] = np.eye(d, dtype=np.float32)
    if small.any():
        warnings.warn(f"{int(small.sum())} of {V} coarse clusters have fewer points than "
                      f"dimensions ({d}): their local rotation is the identity", RuntimeWarning,
                      stacklevel=3)
    return R, np.asarray(mean, dtype=np.float32)


def _f32(a, name, ndim):
    arr = np.ascontiguousarray(a, dtype=np.float32)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return arr


def _pair(p, name, ndim):
    if p is None:
        return None
    if len(p) != 2:
        raise ValueError(f"{name} must hold two arrays, one per half; got {len(p)}")
    return (_f32(p[0], name, ndim), _f32(p[1], name, ndim))


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
