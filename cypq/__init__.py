"""cypq: compressed approximate nearest-neighbour search (PQ, OPQ, LOPQ) with Cython kernels.

``import cypq as nanopq`` runs nanopq 0.2.2 code unchanged: PQ, OPQ, DistanceTable,
nanopq_to_faiss and faiss_to_nanopq keep their names, arguments and semantics.

The edges (``cypq.demo``, ``cypq.cli``, ``cypq.spark``, ``cypq.bulk``) are imported when first
used, so importing the library does not load them.
"""
from __future__ import annotations

import importlib

from .convert_faiss import faiss_to_nanopq, nanopq_to_faiss
from .index import Index
from .lopq import LOPQCode, LOPQModel
from .model_io import ModelFileError
from .opq import OPQ
from .pq import PQ, DistanceTable, NotFittedError
from .storage import IndexCorruptError, IndexFormatError

__version__ = "0.1.0"

__all__ = ["PQ", "OPQ", "DistanceTable", "NotFittedError", "nanopq_to_faiss",
           "faiss_to_nanopq", "LOPQModel", "LOPQCode", "ModelFileError", "Index",
           "IndexFormatError", "IndexCorruptError", "__version__"]

_EDGES = ("demo", "cli", "spark", "bulk")


def __getattr__(name: str):
    if name in _EDGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cypq' has no attribute {name!r}")
