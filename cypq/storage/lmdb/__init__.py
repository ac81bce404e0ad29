"""The on-disk storage: inverted lists in an LMDB environment (one directory per index).

Modules, by job: ``layout`` (keys and values, pure NumPy), ``env`` (opening, format,
transactions, bookkeeping), ``reader`` (committed state, snapshots, segment cache, lookups),
``writer`` (add, remove, merge), ``stage`` (the staged entries searches read), ``bulk`` (the
bulk writer), ``store`` (LMDBStorage, joining them).
"""
from ..base import IndexCorruptError, IndexFormatError
from .store import LMDBStorage

__all__ = ["LMDBStorage", "IndexFormatError", "IndexCorruptError"]
