"""Conversion between cypq's PQ / OPQ and faiss's IndexPQ / IndexPreTransform(OPQ, PQ).

Same functions as nanopq's, so ``import cypq as nanopq`` keeps working; faiss is imported on use.
"""
from __future__ import annotations

import numpy as np

from .opq import OPQ
from .pq import PQ


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("faiss is not installed: pip install faiss-cpu") from e
    return faiss


def _nbits(Ks: int) -> int:
    nbits = int(Ks).bit_length() - 1
    if 2**nbits != Ks or nbits > 16:
        raise ValueError(f"faiss needs Ks = 2**nbits with nbits <= 16, got Ks={Ks}")
    return nbits


def nanopq_to_faiss(pq_nanopq):
    """Convert a fitted PQ to ``faiss.IndexPQ``, or an OPQ to
    ``faiss.IndexPreTransform(LinearTransform(R.T), IndexPQ)``.

    Parameters
    ----------
    pq_nanopq : PQ or OPQ
        Fitted; Ks must be a power of two up to 2**16.

    Returns
    -------
    faiss.IndexPQ or faiss.IndexPreTransform
        Trained, with the same codewords (and rotation), no codes stored.
    """
    faiss = _faiss()
    if isinstance(pq_nanopq, OPQ):
        pq_nanopq._require_fitted("nanopq_to_faiss")
        inner = nanopq_to_faiss(pq_nanopq.pq)
        D = pq_nanopq.R.shape[0]
        lt = faiss.LinearTransform(D, D, False)
        # faiss applies y = A x; cypq applies y = x R, so A = R^T.
        faiss.copy_array_to_vector(np.ascontiguousarray(pq_nanopq.R.T).ravel(), lt.A)
        lt.is_trained = True
        index = faiss.IndexPreTransform(lt, inner)
        index.own_fields = True
        inner.this.disown()
        lt.this.disown()
        return index
    if not isinstance(pq_nanopq, PQ):
        raise TypeError(f"expected a cypq PQ or OPQ, got {type(pq_nanopq).__name__}")
    pq_nanopq._require_fitted("nanopq_to_faiss")
    metric = {"l2": faiss.METRIC_L2, "dot": faiss.METRIC_INNER_PRODUCT}[pq_nanopq.metric]
    index = faiss.IndexPQ(pq_nanopq.D, pq_nanopq.M, _nbits(pq_nanopq.Ks), metric)
    faiss.copy_array_to_vector(np.ascontiguousarray(pq_nanopq.codewords).ravel(),
                               index.pq.centroids)
    if hasattr(index.pq, "sync_transposed_centroids"):
        index.pq.sync_transposed_centroids()
    index.is_trained = True
    return index


def faiss_to_nanopq(pq_faiss):
    """Convert a trained ``faiss.IndexPQ`` (to PQ) or ``IndexPreTransform`` of one linear
    transform and an IndexPQ (to OPQ).

    Parameters
    ----------
    pq_faiss : faiss.IndexPQ or faiss.IndexPreTransform

    Returns
    -------
    model : PQ or OPQ
    codes : numpy.ndarray, shape (ntotal, M), code_dtype
        The codes stored in the faiss index (empty if none).
    """
    faiss = _faiss()
    R = None
    if isinstance(pq_faiss, faiss.IndexPreTransform):
        if pq_faiss.chain.size() != 1:
            raise ValueError("only an IndexPreTransform with one (OPQ) transform is supported")
        lt = faiss.downcast_VectorTransform(pq_faiss.chain.at(0))
        if not isinstance(lt, faiss.LinearTransform) or lt.d_in != lt.d_out:
            raise ValueError("the transform must be a square LinearTransform (e.g. OPQMatrix)")
        R = faiss.vector_to_array(lt.A).reshape(lt.d_out, lt.d_in).T.astype(np.float32)
        if lt.have_bias and np.any(faiss.vector_to_array(lt.b)):
            raise ValueError("a LinearTransform with a bias has no OPQ equivalent")
        pq_faiss = faiss.downcast_index(pq_faiss.index)
    if not isinstance(pq_faiss, faiss.IndexPQ):
        raise TypeError(f"expected faiss.IndexPQ or IndexPreTransform, got "
                        f"{type(pq_faiss).__name__}")
    if not pq_faiss.is_trained:
        raise ValueError("the faiss index is not trained")
    fpq = pq_faiss.pq
    M, nbits, D = fpq.M, fpq.nbits, fpq.d
    metric = "dot" if pq_faiss.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"
    if pq_faiss.metric_type not in (faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT):
        raise ValueError("only METRIC_L2 and METRIC_INNER_PRODUCT indexes can be converted")
    model = OPQ(M, 2**nbits, metric=metric) if R is not None else PQ(M, 2**nbits, metric=metric)
    pq = model.pq if R is not None else model
    pq.Ds = D // M
    pq.codewords = faiss.vector_to_array(fpq.centroids).reshape(M, 2**nbits, D // M).copy()
    if R is not None:
        model.R = R
    raw = faiss.vector_to_array(pq_faiss.codes).reshape(pq_faiss.ntotal, fpq.code_size)
    return model, _unpack_codes(raw, M, nbits).astype(pq.code_dtype)


def _unpack_codes(raw: np.ndarray, M: int, nbits: int) -> np.ndarray:
    """faiss's packed codes (n, code_size) uint8 -> (n, M) integers (LSB-first bit stream)."""
    n = raw.shape[0]
    if nbits == 8:
        return raw[:, :M]
    if nbits == 16:
        return raw.view("<u2")[:, :M]
    bits = np.unpackbits(raw, axis=1, bitorder="little")[:, :M * nbits].reshape(n, M, nbits)
    return (bits.astype(np.uint32) << np.arange(nbits, dtype=np.uint32)).sum(axis=2)
