"""Locally Optimized Product Quantization (Kalantidis & Avrithis, CVPR 2014).

The model follows the LOPQ Python code's conventions: the vector is split into two halves; each
half has a coarse quantizer of V centroids, so a cell is (c0, c1) with id c0 * V + c1; the
residual of a half is expressed in a local frame of its coarse centroid,
``R[c] @ (x_half - C[c] - mu[c])``; M fine subquantizers (M/2 per half, shared by all cells)
encode the locally projected residual. Optionally the vectors first go through a PCA whose
directions are dealt to the two halves so both carry a balanced share of the variance.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Callable, Optional, Sequence

import numpy as np

from . import _quantize, model_io
from ._checks import as_codes, as_vectors, code_dtype_for, positive_int
from ._threads import blas_threads, resolve
from .lopq_parts import (check_coarse_codes, check_parts, check_training_shape, choose_auto,
                         code_pair, pair, pca_parts, same, subquantizer_parts, unit_rows)
from .lopq_training import residual_moments, train_missing_parts
from .lopq_view import KernelView
from .pq import NotFittedError

METRICS = ("l2", "cosine", "ip")

LOPQCode = namedtuple("LOPQCode", ["coarse", "fine"])
LOPQCode.__doc__ = """An LOPQ code: ``coarse`` = (c0, c1), ``fine`` = (f_0 .. f_{M-1}).

For one vector these are tuples of ints; for a batch of N vectors, arrays (N, 2) and (N, M)."""


class LOPQModel:
    """An LOPQ model: PCA (optional), coarse quantizers, local rotations, fine subquantizers.

    Parameters
    ----------
    V : int, optional
        Coarse centroids per half (V * V cells). Default: chosen by ``fit`` from the number
        n of training vectors of dimension D: the largest power of two <= n / (64 f) (4-bit
        codes: n / (512 sqrt(f))), f = max(1, D / 128), in [8, 1024]
        (:func:`cypq.lopq_parts.auto_V`: 100k 128-d SIFT vectors give 1024 (4-bit: 128), 20k
        384-d MiniLM ones 64 (16)).
    M : int
        Fine subquantizers in all (M / 2 per half); even.
    subquantizer_clusters : int
        Centroids per fine subquantizer (256: a byte each; 16: 4-bit codes, packed by an index).
    parameters : tuple, optional
        ``((C0, C1), (Rs0, Rs1), (mu0, mu1), (subs0, subs1))`` as in the LOPQ code: C (V, D/2);
        Rs (V, D/2, D/2); mu (V, D/2); subs a sequence of M/2 arrays (S, D/M) per half. Any part
        may be None; ``fit`` trains only the missing parts.
    pca : bool, optional
        Learn a PCA of the training data in ``fit`` (when not already present) and apply it to
        every vector; its directions are balanced between the two halves. Default (None):
        a PCA to about D/3 from 256 dimensions on (more recall per unit of time on 384-d
        MiniLM embeddings than D/2 or none, 4-bit and 8-bit codes), else none (on REALSIFT1M
        a full PCA lowers recall: SIFT's natural halves are better coarse subspaces); see
        :func:`cypq.lopq_parts.auto_pca_dim`. ``pca=False`` turns it off.
    metric : {'l2', 'cosine', 'ip'}
        How vectors are compared. 'l2': squared Euclidean distances, smallest first.
        'cosine' scales every vector (training, added, searched) to unit norm first, so
        users never have to (a zero vector is an error); an index returns cosine
        similarities, largest first. 'ip': inner products, largest first (faiss's
        METRIC_INNER_PRODUCT): cells are visited by the inner product of the query with
        their coarse centroids and entries scored by the inner product with their
        reconstruction; training and encoding are as for 'l2' (the codes that reconstruct
        best also give the best inner products).
    pca_dim : int, optional
        Keep only this many leading PCA directions (a dimension reduction, LOPQ's first phase;
        implies ``pca``): even, divisible by M, less than the input dimension. The model
        then works in pca_dim dimensions; its file is an LOPQ model of that dimension, with
        the PCA in extra fields (see :mod:`cypq.model_io`).

    Attributes
    ----------
    Cs, Rs, mus : tuple of two numpy.ndarray (float32) or None
    subquantizers : tuple of two lists of numpy.ndarray (float32) or None
    pca_mean : numpy.ndarray (D,) float32 or None
    pca_matrix : numpy.ndarray (D, D') float32 or None
        Vectors enter the model as ``(x - pca_mean) @ pca_matrix``.
    V, M, subquantizer_clusters, num_coarse_splits (2), num_fine_splits (M / 2)
    rotation_sources : tuple of two numpy.ndarray int8 (V,) or None
        How ``fit`` obtained each cluster's local rotation: 0 from its own residual
        covariance (at least D/2 points), 1 shrunk toward the half's pooled covariance (fewer
        points), 2 the pooled covariance (an empty cluster). Not stored in model files.
    n_threads : int or None
        Threads of the kernels (None: all cores).
    """

    num_coarse_splits = 2

    def __init__(self, V: Optional[int] = None, M: int = 4, subquantizer_clusters: int = 256,
                 parameters: Optional[Sequence] = None, pca: Optional[bool] = None,
                 n_threads: Optional[int] = None, pca_dim: Optional[int] = None,
                 metric: str = "l2"):
        Cs, Rs, mus, subs = parameters if parameters is not None else (None,) * 4
        self.Cs = pair(Cs, "Cs", 2)
        self.Rs = pair(Rs, "Rs", 3)
        self.mus = pair(mus, "mus", 2)
        self.subquantizers = subquantizer_parts(subs)
        self.V = int(self.Cs[0].shape[0]) if self.Cs is not None else \
            None if V is None else positive_int(V, "V")   # None: fit chooses
        if self.subquantizers is not None:
            self.M = 2 * len(self.subquantizers[0])
            self.subquantizer_clusters = int(self.subquantizers[0][0].shape[0])
        else:
            self.M = positive_int(M, "M")
            self.subquantizer_clusters = positive_int(subquantizer_clusters,
                                                      "subquantizer_clusters")
        if self.M % 2:
            raise ValueError(f"M must be even (M/2 subquantizers per half), got {self.M}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.metric = metric
        given = any(p is not None for p in (Cs, Rs, mus, subs))
        # None: fit chooses (a model given parts has no PCA unless set_pca says so)
        self.pca = True if pca_dim is not None else \
            (False if given else None) if pca is None else bool(pca)
        self.pca_dim = None if pca_dim is None else positive_int(pca_dim, "pca_dim")
        if self.pca_dim is not None and (self.pca_dim % 2 or self.pca_dim % self.M):
            raise ValueError(f"pca_dim={self.pca_dim} must be even and divisible by "
                             f"M={self.M}")
        self.pca_mean: Optional[np.ndarray] = None
        self.pca_matrix: Optional[np.ndarray] = None
        # How training obtained each cluster's local rotation, per half: int8 (V,) of
        # lopq_training.OWN / SHRUNK / POOLED (None when the rotations were not trained here).
        self.rotation_sources: Optional[tuple] = None
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
        check_parts(self)

    def _require(self, *parts: str) -> None:
        missing = [p for p in parts if getattr(self, p) is None]
        if missing:
            raise NotFittedError(f"this LOPQ model has no {', '.join(missing)}: call fit() "
                                 "(it trains only the missing parts) or load a full model")

    def _threads(self, rows: Optional[int] = None) -> int:
        return resolve(getattr(self, "n_threads", None), rows)

    def __repr__(self) -> str:
        parts = [p for p in ("Cs", "Rs", "mus", "subquantizers") if getattr(self, p) is not None]
        return (f"LOPQModel(V={self.V}, M={self.M}, subquantizer_clusters="
                f"{self.subquantizer_clusters}, D={self.D}, metric={self.metric!r}, "
                f"pca={self.pca_matrix is not None}, "
                f"parts={parts})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, LOPQModel):
            return False
        if (self.V, self.M, self.subquantizer_clusters, self.metric) != (
                other.V, other.M, other.subquantizer_clusters, other.metric):
            return False
        return all(same(getattr(self, a), getattr(other, a))
                   for a in ("Cs", "Rs", "mus", "subquantizers", "pca_mean", "pca_matrix"))

    __hash__ = None

    def __setstate__(self, state):
        state.setdefault("n_threads", None)
        state.setdefault("pca_dim", None)
        state.setdefault("metric", "l2")
        state.setdefault("rotation_sources", None)
        state.pop("_rt_cache", None)       # pickles of cypq 0.1.0 carry this old cache
        self.__dict__.update(state)

    def get_split_parameters(self, split: int):
        """(C, R, mu, subquantizers) of half ``split`` (None for missing parts)."""
        return tuple(None if p is None else p[split]
                     for p in (self.Cs, self.Rs, self.mus, self.subquantizers))

    # ------------------------------------------------------------------ training
    def fit(self, data, kmeans_coarse_iters: int = 10, kmeans_local_iters: int = 20,
            n_init: int = 1, subquantizer_sample_ratio: float = 1.0,
            random_state: Optional[int] = None, verbose: bool = False,
            n_threads: Optional[int] = None,
            progress: Optional[Callable[[str], None]] = None) -> "LOPQModel":
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
            Print progress: a line per phase and per k-means iteration.
        n_threads : int, optional
            Threads for this call (default: the model's).
        progress : callable, optional
            Called with one line per phase (PCA, coarse quantizers, local rotations and how
            they were obtained, fine subquantizers), each with the seconds since the start.

        Returns
        -------
        self
        """
        nt = resolve(n_threads) if n_threads is not None else self._threads()
        seed = 0 if random_state is None else int(random_state)
        if not 0 < subquantizer_sample_ratio <= 1:
            raise ValueError("subquantizer_sample_ratio must be in (0, 1]")
        X = as_vectors(data, "data", dim=self.D)
        choose_auto(self, *X.shape)
        self.check_training_shape(*X.shape)
        train_missing_parts(self, X, kmeans_coarse_iters, kmeans_local_iters,
                            subquantizer_sample_ratio, seed, verbose, nt, progress)
        self._check_consistent()
        return self

    def check_training_shape(self, n: int, dim: int) -> None:
        """Raise ValueError unless n training vectors of dimension dim can train the missing
        parts (:func:`cypq.lopq_parts.check_training_shape`)."""
        check_training_shape(self, n, dim)

    def set_pca(self, mean: np.ndarray, matrix: np.ndarray) -> None:
        """Set a trained PCA (from a model file, or a distributed training): vectors then
        enter the model as ``(x - mean) @ matrix``.

        Parameters
        ----------
        mean : array_like (D_in,)
        matrix : array_like (D_in, model_dim)
        """
        self.pca = True
        self.pca_mean, self.pca_matrix = pca_parts(mean, matrix)
        if matrix.shape[1] < matrix.shape[0]:
            self.pca_dim = int(matrix.shape[1])
        self._check_consistent()

    # ------------------------------------------------------------------ public face for the
    # layers above (index, search, Spark): model space, coarse codes -> cells, kernel view
    def to_model_space(self, x, name: str = "x", n_threads: Optional[int] = None) -> np.ndarray:
        """Vectors brought into the model's space: validated, float32, PCA applied.

        Parameters
        ----------
        x : array_like, shape (D,) or (N, D)
            Finite numbers; D the model's input dimension.
        name : str
            What to call x in error messages.
        n_threads : int, optional
            Threads for the PCA's product (default: as the model's other calls).

        Returns
        -------
        numpy.ndarray float32, shape (N, model_dim) (N = 1 for one vector), C-contiguous.
        """
        return self._prepare(x, name, n_threads=n_threads)[0]

    def check_coarse_codes(self, coarse, n: int) -> np.ndarray:
        """Coarse codes (array_like of int, (2,) or (n, 2)) validated against the model:
        int32 (n, 2), each in [0, V) (:func:`cypq.lopq_parts.check_coarse_codes`)."""
        return check_coarse_codes(coarse, n, self.V)

    def kernel_view(self) -> "KernelView":
        """The model's arrays laid out as the kernels read them, built once per set of
        parameters (rebuilt only when a part is replaced, e.g. by ``fit``). Replace parts; an
        edit in place misses the view's copies (coarse, fine, small rotations transposed).

        Returns
        -------
        KernelView
        """
        parts = (self.Cs, self.Rs, self.mus, self.subquantizers)
        cached = self.__dict__.get("_kernel_view")
        if cached is None or any(a is not b for a, b in zip(cached[0], parts)):
            cached = (parts, KernelView.of(self))
            self.__dict__["_kernel_view"] = cached
        return cached[1]

    def residual_moments(self, X: np.ndarray, n_threads: Optional[int] = None):
        """Per half, the moments of the residuals of X's rows to their coarse centroids.

        Parameters
        ----------
        X : numpy.ndarray float32 (N, model_dim)
            Vectors in the model's space (:meth:`to_model_space`).
        n_threads : int, optional

        Returns
        -------
        tuple of two (counts (V,) int64, mean (V, D/2) float64, m2 (V, D/2, D/2) float64);
        moments of disjoint parts combine exactly with :func:`combine_moments`.
        """
        self._require("Cs")
        nt = resolve(n_threads) if n_threads is not None else self._threads()
        groups = self.kernel_view().groups(self.kernel_view().coarse_codes(X, nt))
        Dh = X.shape[1] // 2
        return tuple(residual_moments(X, h * Dh, self.Cs[h], *groups[h], nt) for h in range(2))

    # ------------------------------------------------------------------ helpers
    def _prepare(self, x, name="x", allow_empty=True, n_threads=None):
        """(float32 (N, model_dim) array after PCA, whether the input was one vector). BLAS
        is held to the call's threads: past them, its idle threads would spin on free cores."""
        arr = np.asarray(x)
        X = self.normalize(as_vectors(arr[None, :] if arr.ndim == 1 else arr, name, dim=self.D,
                                      allow_empty=allow_empty), name)
        if self.pca_matrix is not None:
            with blas_threads(n_threads or self._threads(len(X))):
                X = np.ascontiguousarray((X - self.pca_mean) @ self.pca_matrix, np.float32)
        return X, arr.ndim == 1

    def normalize(self, X: np.ndarray, name: str = "x") -> np.ndarray:
        """For metric='cosine', the rows of float32 X (N, D) scaled to unit norm (a zero row
        is a ValueError); X itself otherwise."""
        return unit_rows(X, name) if self.metric == "cosine" else X

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_kernel_view", None)
        return state

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
        codes = self.kernel_view().coarse_codes(X, self._threads(len(X)))
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
        coarse = self.check_coarse_codes(coarse_codes, X.shape[0])
        P = self.kernel_view().project(X, coarse, self._threads(len(X)))
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
        nt = self._threads(len(X))
        coarse = (self.kernel_view().coarse_codes(X, nt) if coarse_codes is None
                  else self.check_coarse_codes(coarse_codes, X.shape[0]))
        fine = self._fine(X, coarse, nt)
        return tuple(int(c) for c in fine[0]) if single else fine

    def _fine(self, X, coarse, nt):
        view = self.kernel_view()
        return view.fine_codes(view.project(X, coarse, nt), nt)

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
        nt = self._threads(len(X))
        coarse = self.kernel_view().coarse_codes(X, nt)
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
        numpy.ndarray float32, shape (D,) or (N, D), in the input space (PCA undone; for
        metric='cosine', of the vectors scaled to unit norm).
        """
        self._require("Cs", "Rs", "mus", "subquantizers")
        coarse, fine = code_pair(codes)
        single = np.ndim(fine) == 1
        fine = np.asarray(fine)[None, :] if single else np.asarray(fine)
        coarse = self.check_coarse_codes(coarse, fine.shape[0])
        fine = as_codes(fine, self.M, self.subquantizer_clusters, "fine codes")
        sub = np.empty((fine.shape[0], self.model_dim), dtype=np.float32)
        nt = self._threads(len(fine))
        _quantize.decode(fine, self.kernel_view().fine, sub, nt)
        X = self.kernel_view().project(sub, coarse, nt, inverse=True)
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
        coarse = self.check_coarse_codes(coarse_codes, X.shape[0])
        nt = self._threads(len(X))
        PX = self.kernel_view().project(X, coarse, nt)
        T = np.empty((X.shape[0], self.M, self.subquantizer_clusters), dtype=np.float32)
        _quantize.tables(PX, self.kernel_view().fine, T, False, nt)
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
    def to_proto_bytes(self) -> bytes:
        """The model as serialized LOPQ protobuf (the bytes of :meth:`export_proto`)."""
        return model_io.model_to_bytes(self)

    @classmethod
    def from_proto_bytes(cls, data: bytes, name: str = "model bytes") -> "LOPQModel":
        """A model from serialized LOPQ protobuf (see :meth:`load_proto`); raises
        :class:`cypq.ModelFileError` for corrupt or inconsistent bytes, naming ``name``."""
        return model_io.model_from_bytes(cls, data, name)

    def export_proto(self, path_or_file) -> None:
        """Write the LOPQ protobuf model file (layout: :mod:`cypq.model_io`).

        Parameters
        ----------
        path_or_file : str, os.PathLike or binary file object
            A path is written atomically (temporary file, then rename).
        """
        model_io.write_bytes(self.to_proto_bytes(), path_or_file)

    @classmethod
    def load_proto(cls, path_or_file) -> "LOPQModel":
        """Read an LOPQ protobuf model file, written by LOPQ's Python/Spark code or by cypq.

        Parameters
        ----------
        path_or_file : str, os.PathLike, binary file object, or the file's bytes

        Returns
        -------
        LOPQModel
            Possibly partly trained (e.g. only Cs), as the file holds.
        """
        return cls.from_proto_bytes(*model_io.read_bytes(path_or_file))
