"""A batch's 4-bit codes in blocks of 32, for the two-phase scan's AVX2 bounds.

The bounds of 32 packed codes are looked up byte column by byte column (byte j of the 32
codes in one register), so the scan transposed each block in registers first: half of
the bounds' time on MANMINILM. A cell that several queries of a batch list (MANMINILM's
V = 16: 256 cells, a batch of 1024 queries visits each ~60 times) is transposed once per
batch here, and its scans read the columns straight from the blocks.
"""
from __future__ import annotations

import numpy as np

from . import _search

# A segment is put in blocks when at least MIN_VISITS of a batch's queries list its cell (one
# transposes as much as one scan, and the blocks are written and read back) and it holds at
# least MIN_CODES codes. REALSIFT1M 4-bit (V = 256, cells of ~15 codes) took 1.15-1.3x the
# time with every cell listed twice in blocks (half of each block padding); with 64 codes
# and 3 visits still 1.1x at quota 16000; with 8 visits as without blocks. MANMINILM's cells
# (~400 codes, ~60 visits) are far past both.
MIN_VISITS = 8
MIN_CODES = 64


def code_blocks(seg, slot: np.ndarray, code_bytes: int, n_threads: int, room=None
                ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``seg_blocks`` of ``scan_cells`` for one batch, or None where its scan reads none.

    Parameters
    ----------
    seg : cypq.storage.base.Segments
        The segments of the batch's distinct cells.
    slot : numpy.ndarray int64 (n,)
        Each listed cell's entry among them (query-major, as scan_cells takes it).
    code_bytes : int
        Bytes per packed 4-bit code (M / 2).
    n_threads : int
    room : optional
        The search's temporaries (``empty(name, shape, dtype)``); else a new buffer.

    Returns
    -------
    (addresses (n_segments,) uintp, 0 where a segment is not in blocks; the buffer they
    point into, uint8, which must outlive the scan), or (None, None).
    """
    if not len(slot) or not _search.scans_blocks(code_bytes):
        return None, None
    chosen = seg.length >= MIN_CODES
    if not chosen.any():
        return None, None
    visits = np.bincount(slot, minlength=len(seg.start) - 1)
    chosen &= np.repeat(visits >= MIN_VISITS, np.diff(seg.start))
    size = np.where(chosen, (seg.length + 31) // 32 * 32 * code_bytes, 0)
    total = int(size.sum())
    if not total:
        return None, None
    buf = np.empty(total, np.uint8) if room is None else room.empty("blocks", (total,),
                                                                     np.uint8)
    at = np.cumsum(size) - size
    addresses = np.where(chosen, buf.ctypes.data + at, 0).astype(np.uintp)
    _search.code_blocks(seg.codes, seg.length, addresses, code_bytes, n_threads)
    return addresses, buf
