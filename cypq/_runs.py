"""Sorted run files, for the bulk loader and the storage's bulk writer: written atomically,
read memory-mapped, merged over a key range; and the cell ranges such writes go in."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np


def write_atomic(path: str, arr: np.ndarray) -> None:
    """Write arr as .npy under a temporary name, flush it to disk, then rename it."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def gather(runs, key: str, lo: int, hi: Optional[int], dtype) -> np.ndarray:
    """The records with lo <= record[key] < hi (hi None: no upper bound) of structured
    arrays each sorted by ``key``, merged stably (run order within equal keys)."""
    parts = []
    for run in runs:
        a = int(np.searchsorted(run[key], lo))
        b = len(run) if hi is None else int(np.searchsorted(run[key], hi))
        if b > a:
            parts.append(np.asarray(run[a:b]))
    batch = np.concatenate(parts) if parts else np.empty(0, dtype)
    return batch[np.argsort(batch[key], kind="stable")]


def ranges(cum: np.ndarray, per_range: int) -> list[int]:
    """Exclusive ends of consecutive ranges of a histogram's bins holding about per_range
    entries each (``cum``: its cumulative sum); a range holds at least one bin."""
    total = int(cum[-1]) if len(cum) else 0
    targets = np.arange(per_range, total, per_range)
    ends = np.unique(np.searchsorted(cum, targets, side="left") + 1)
    ends = ends[ends < len(cum)]
    return ends.tolist() + [len(cum)]
