"""Loading the benchmark data set and scoring results, shared by the tools/ benchmarks."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realsift1m"


def load_sift(data_dir: str | os.PathLike = DEFAULT_DATA, nq: int | None = None):
    """(learn, base, queries, groundtruth) of REALSIFT1M as float32 / int64 arrays."""
    d = Path(data_dir)
    if not (d / "base.u8.npy").exists():
        raise SystemExit(f"REALSIFT1M not found in {d}: pass --data DIR")
    f32 = lambda name: np.load(d / name, mmap_mode="r").astype(np.float32)
    xq = f32("query.u8.npy")
    gt = np.load(d / "groundtruth.i32.npy").astype(np.int64)
    if nq is not None:
        xq, gt = xq[:nq], gt[:nq]
    return f32("learn.u8.npy"), f32("base.u8.npy"), xq, gt


def load_set(data_dir: str | os.PathLike, nq: int | None = None):
    """(learn, base, queries, groundtruth) as float32 / int64 arrays of REALSIFT1M (uint8
    files) or of a float16 set such as MANMINILM (``base.f16.npy`` ...), whichever the
    directory holds."""
    d = Path(data_dir)
    if not (d / "base.f16.npy").exists():
        return load_sift(d, nq)
    f32 = lambda name: np.load(d / name).astype(np.float32)  # noqa: E731
    xq, gt = f32("query.f16.npy"), np.load(d / "groundtruth.i32.npy").astype(np.int64)
    if nq is not None:
        xq, gt = xq[:nq], gt[:nq]
    return f32("learn.f16.npy"), f32("base.f16.npy"), xq, gt


def load_queries(data_dir: str | os.PathLike = DEFAULT_DATA, nq: int | None = None):
    """(queries float32, groundtruth int64) only: what a searching process needs."""
    d = Path(data_dir)
    # mapped, so that only the rows taken are copied into the process (its memory is measured)
    name = "query.f16.npy" if (d / "query.f16.npy").exists() else "query.u8.npy"
    xq = np.load(d / name, mmap_mode="r")[:nq].astype(np.float32)
    gt = np.load(d / "groundtruth.i32.npy", mmap_mode="r")[:nq].astype(np.int64)
    return xq, gt


def recalls(I: np.ndarray, gt: np.ndarray, Rs=(1, 10, 100)) -> dict[int, float]:
    """recall@R as in the PQ paper: share of queries whose true nearest neighbour is in the
    top R."""
    return {R: float(np.mean((I[:, :R] == gt[:, :1]).any(axis=1))) for R in Rs if R <= I.shape[1]}


class Timer:
    """with Timer() as t: ...; t.s is the wall time in seconds."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


def best_of(fn, repeat: int):
    """(least wall time over repeat runs of fn, fn's last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        with Timer() as t:
            out = fn()
        best = min(best, t.s)
    return best, out


def drop_cache(path: str | os.PathLike) -> None:
    """Drop the files of directory ``path`` from the page cache (posix_fadvise DONTNEED): the
    next reads come from the disk."""
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_child(path, script: str, *argv) -> dict:
    """Drop the index in ``path`` from the page cache, run ``script --child path *argv`` in a
    fresh process, and return the JSON object its last line prints."""
    import json
    import subprocess
    import sys
    drop_cache(path)
    cmd = [sys.executable, script, "--child", str(path), *map(str, argv)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])
