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


def resolve(n_threads: int | None) -> int:
    """n_threads as a positive int; None or -1 means every available core."""
    if n_threads is None or n_threads == -1:
        return available_cores()
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
        raise ValueError(f"n_threads must be a positive integer, -1 or None, got {n_threads!r}")
    return n_threads


_controller = None


@contextmanager
def single_threaded_blas():
    """Keep BLAS on one thread while an OpenMP kernel calls it from its own threads."""
    global _controller
    if _controller is None:  # finding the BLAS libraries is slow: do it once
        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield
