"""Storage of inverted lists: cell -> entries (id, fine code). Knows nothing of how codes are
made. ``MemoryStorage`` keeps them in RAM; ``LMDBStorage`` (cypq.storage.lmdb) on disk; both
implement ``Storage`` (base.py), whose docstring states the concurrency contract."""
from .base import (BulkWriter, IndexCorruptError, IndexFormatError, Segments, Snapshot,
                   Storage)
from .memory import MemoryStorage

__all__ = ["Storage", "Snapshot", "Segments", "BulkWriter", "MemoryStorage",
           "IndexFormatError", "IndexCorruptError"]
