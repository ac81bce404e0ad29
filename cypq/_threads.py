"""Thread counts for the kernels, and holding BLAS to one thread inside OpenMP regions."""
from __future__ import annotations

import os
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


_controller = None


@contextmanager
def blas_threads(n: int):
    """Hold BLAS to n threads (a call's own thread count, for the matrix products it makes)."""
    global _controller
    if _controller is None:  # finding the BLAS libraries is slow: do it once
        _controller = ThreadpoolController()
    with _controller.limit(limits=n, user_api="blas"):
        yield


def single_threaded_blas():
    """Keep BLAS on one thread while an OpenMP kernel calls it from its own threads."""
    return blas_threads(1)
