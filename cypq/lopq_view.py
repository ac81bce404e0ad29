"""The kernel view of a trained LOPQ model: its arrays laid out once as the kernels read them
(what the index, the search and the encoders use, instead of re-stacking per call)."""
from __future__ import annotations

import numpy as np

from . import _lopq, _quantize
from ._checks import code_dtype_for
from ._threads import single_threaded_blas


# Rotations (both halves) up to this size are also kept transposed, so that a search no
# longer transposes each rotation it visits once per batch of queries (one process
# alternating, identical results: REALSIFT1M 4-bit M=64 V=128 0.95-0.98x the time at quota
# 1000-4000, M=32 V=128 0.95x; MANMINILM's V=16 0.99-1.0x). Within it: 4-bit models at
# V <= 128 and D/2 <= 64 (REALSIFT1M's chosen ones), and MANMINILM's. Past it the copy is
# not worth its memory in a searching process (README, "Where cypq's 33 MB go": 8 MB for
# V=256, which gained 0.94-0.99x; 32 MB for 8-bit V=1024, whose search took 0.97-0.99x with
# no transposes at all).
ROTATIONS_T_BYTES = 4 << 20


class KernelView:
    """A trained model's arrays as the kernels read them (read-only, C-contiguous float32).

    Attributes
    ----------
    V : int
    coarse : numpy.ndarray (2, V, D/2): both halves' coarse centroids.
    Cs, Rs, mus : tuple of two arrays (V, D/2), (V, D/2, D/2), (V, D/2); the model's own.
    RT : tuple of two numpy.ndarray (V, D/2, D/2), or None: the rotations transposed, what a
        forward projection multiplies by, kept where both halves' rotations take at most
        ROTATIONS_T_BYTES (else each call transposes the rotations it visits).
    fine : numpy.ndarray (M, S, D/M): the fine subquantizers, half 0's first.
    code_dtype : numpy.dtype of fine codes.
    Cmu, RCmu : tuple of two numpy.ndarray (V, D/2), or None: C[c] + mu[c] and
        R[c] @ (C[c] + mu[c]) of each half's centroids (for inner-product search:
        <q, C + mu + R^T s> = <q, C + mu> + <R q, s>).
    """

    __slots__ = ("V", "coarse", "Cs", "Rs", "RT", "mus", "fine", "code_dtype", "Cmu", "RCmu")

    @classmethod
    def of(cls, model) -> "KernelView":
        v = cls()
        v.V, v.Cs, v.Rs, v.mus = model.V, model.Cs, model.Rs, model.mus
        v.code_dtype = np.dtype(model.fine_code_dtype)
        v.coarse = v.fine = v.Cmu = v.RCmu = v.RT = None
        if model.Cs is not None:
            v.coarse = _frozen(np.stack(model.Cs))
        if model.Rs is not None:
            if sum(R.nbytes for R in model.Rs) <= ROTATIONS_T_BYTES:
                v.RT = tuple(_frozen(R.transpose(0, 2, 1)) for R in model.Rs)
            if model.metric == "ip":
                v.Cmu = tuple(_frozen(C + mu) for C, mu in zip(model.Cs, model.mus))
                v.RCmu = tuple(_frozen(np.einsum("vij,vj->vi", R, Cm, optimize=True))
                               for R, Cm in zip(model.Rs, v.Cmu))
        if model.subquantizers is not None:
            v.fine = _frozen(np.stack(list(model.subquantizers[0])
                                      + list(model.subquantizers[1])))
        return v

    # The numeric steps of encoding and training, on float32 rows in the model's space.
    def coarse_codes(self, X: np.ndarray, n_threads: int) -> np.ndarray:
        """(N, 2) int32 nearest coarse centroid of each half of X's rows (N, D)."""
        codes = np.empty((X.shape[0], 2), dtype=np.int32 if self.V > 65536 else
                         code_dtype_for(self.V))
        with single_threaded_blas():
            _quantize.encode(X, self.coarse, codes, np.empty(0, np.float32), n_threads)
        return codes.astype(np.int32)

    def fine_codes(self, PX: np.ndarray, n_threads: int) -> np.ndarray:
        """(N, M) fine codes (code_dtype) of rows PX (N, D) already in their local frames."""
        fine = np.empty((PX.shape[0], self.fine.shape[0]), dtype=self.code_dtype)
        with single_threaded_blas():   # (sgemm from each thread from 32 dimensions on)
            _quantize.encode(PX, self.fine, fine, np.empty(0, np.float32), n_threads)
        return fine

    def groups(self, coarse: np.ndarray) -> list:
        """Rows grouped by coarse centroid, per half: [(order, offsets), (order, offsets)]."""
        return [_lopq.group_rows(np.ascontiguousarray(coarse[:, h]), self.V) for h in range(2)]

    def project(self, X: np.ndarray, coarse: np.ndarray, n_threads: int, groups=None,
                rows=None, inverse: bool = False) -> np.ndarray:
        """Forward (or inverse) local projection (N, D) float32 of the rows of X (N, D) with
        coarse codes (N, 2); ``rows`` selects a subset; ``groups`` (from :meth:`groups`)
        when the caller has them already."""
        Dh = X.shape[1] // 2
        if rows is not None:
            X = np.ascontiguousarray(X[rows])
            coarse = coarse[rows]
            groups = None
        if groups is None:
            groups = self.groups(coarse)
        out = np.empty_like(X)
        for h in range(2):
            _lopq.project(X, h * Dh, self.Cs[h], self.Rs[h], self.mus[h],
                          *groups[h], out, h * Dh, inverse, n_threads,
                          RT=None if self.RT is None else self.RT[h])
        return out


def _frozen(a) -> np.ndarray:
    out = np.array(a, dtype=np.float32, order="C")  # one copy, the view's own
    out.flags.writeable = False
    return out
