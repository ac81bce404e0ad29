"""cypq: compressed approximate nearest-neighbour search (PQ, OPQ, LOPQ) with Cython kernels.

``import cypq as nanopq`` runs nanopq 0.2.2 code unchanged: PQ, OPQ, DistanceTable,
nanopq_to_faiss and faiss_to_nanopq keep their names, arguments and semantics.
"""
from . import demo
from .convert_faiss import faiss_to_nanopq, nanopq_to_faiss
from .index import Index
from .lopq import LOPQCode, LOPQModel
from .model_io import ModelFileError
from .opq import OPQ
from .pq import PQ, DistanceTable, NotFittedError

__version__ = "0.1.0"

__all__ = ["PQ", "OPQ", "DistanceTable", "NotFittedError", "nanopq_to_faiss",
           "faiss_to_nanopq", "LOPQModel", "LOPQCode", "ModelFileError", "Index", "__version__"]
