"""Thread counts for the kernels, and holding BLAS to one thread inside OpenMP regions."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from threadpoolctl import ThreadpoolController


def available_cores() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# Rows per thread below which the default (n_threads=None) stays on one thread: a parallel
# region for a few rows costs more than it saves, and on a machine kept busy by other
# processes waking a second thread can take milliseconds (measured by
# tools/bench_small_calls.py).
ROWS_PER_THREAD = 64


def resolve(n_threads: int | None, rows: int | None = None,
            per_thread: int = ROWS_PER_THREAD) -> int:
    """n_threads as a positive int; None or -1 means every available core, but no more than
    one per ``per_thread`` rows of work when ``rows`` is given (small calls run on one
    thread). An explicit count is taken as given."""
    if n_threads is None or n_threads == -1:
        cores = available_cores()
        return cores if rows is None else max(1, min(cores, rows // per_thread))
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
        raise ValueError(f"n_threads must be a positive integer, -1 or None, got {n_threads!r}")
    return n_threads


# The encode kernels' BLAS is scipy's, loaded only when one first needs it (ext/nearest.pxd).
_SCIPY_BLAS = "scipy.linalg.cython_blas"
_controller = None
_controller_has_scipy = False


@contextmanager
def blas_threads(n: int):
    """Hold BLAS to n threads (a call's own thread count, for the matrix products it makes)."""
    global _controller, _controller_has_scipy
    has_scipy = _SCIPY_BLAS in sys.modules
    # Finding the BLAS libraries is slow: once, and again when scipy's has come since.
    if _controller is None or has_scipy != _controller_has_scipy:
        _controller, _controller_has_scipy = ThreadpoolController(), has_scipy
    with _controller.limit(limits=n, user_api="blas"):
        yield


def single_threaded_blas():
    """Keep BLAS on one thread while an OpenMP kernel calls it from its own threads (scipy's
    BLAS loaded first, so that it is held too)."""
    __import__(_SCIPY_BLAS)
    return blas_threads(1)
