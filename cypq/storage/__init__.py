"""Storage of inverted lists: cell -> entries (id, fine code). Knows nothing of how codes are
made. ``MemoryStorage`` keeps them in RAM; ``LMDBStorage`` (cypq.storage.lmdb) on disk."""
from .base import Storage, Segments
from .memory import MemoryStorage

__all__ = ["Storage", "Segments", "MemoryStorage"]
