"""Handing freed memory back to the system.

glibc keeps what a process frees for its next allocations, and raises the size from which it
maps large blocks (rather than taking them from the heap) each time such a block is freed; so a
searching process that once parsed a model or made a batch's temporaries keeps their pages
resident, unused, for good. ``malloc_trim`` returns the free pages. Elsewhere (musl, macOS,
Windows) this does nothing.
"""
from __future__ import annotations

import ctypes

# Temporaries from which a call hands back what it freed: below it, the pages are kept
# for the next call (returning and faulting them in again would cost more than they hold).
TRIM_FROM_BYTES = 8 << 20


def _malloc_trim():
    try:
        fn = ctypes.CDLL(None).malloc_trim   # the C library the interpreter runs on
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_TRIM = _malloc_trim()


def release_free_memory(freed_bytes: int = TRIM_FROM_BYTES) -> None:
    """Return the process's free heap pages to the system when a call has just freed about
    ``freed_bytes`` of temporaries (nothing below :data:`TRIM_FROM_BYTES`)."""
    if _TRIM is not None and freed_bytes >= TRIM_FROM_BYTES:
        _TRIM(0)
