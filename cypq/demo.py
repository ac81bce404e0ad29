"""The end-to-end demo: train LOPQ on a real sample, build an on-disk index, search, report.

    python -m cypq.demo [--dir DIR]

Uses the REALSIFT1M sample shipped in the package (cypq/data/sift20k.npz).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from importlib import resources

import numpy as np


def load_sample() -> dict:
    """The packaged sample: learn (10000, 128), base (20000, 128), query (200, 128) uint8 and
    groundtruth (200, 100) int32."""
    with resources.files("cypq").joinpath("data/sift20k.npz").open("rb") as f:
        with np.load(f) as z:
            return {k: z[k] for k in z.files}


def run(directory: str | None = None, V: int = 64, M: int = 16, quotas=(500, 1000, 2000),
        out=print) -> dict:
    """Train, build, search; returns {quota: (recall@1, recall@10, recall@100, ms/query)}.

    Parameters
    ----------
    directory : str, optional
        Where to build the index (created; must not exist or be empty). Default: a temporary
        directory, removed at the end.
    V, M : int
        LOPQ coarse centroids per half and fine subquantizers.
    quotas : sequence of int
        Candidate quotas to search with.
    out : callable
        Where progress lines go.
    """
    import cypq
    data = load_sample()
    learn, base = data["learn"].astype(np.float32), data["base"].astype(np.float32)
    query, gt = data["query"].astype(np.float32), data["groundtruth"]
    out(f"cypq {cypq.__version__} demo: REALSIFT1M sample, learn {learn.shape}, "
        f"base {base.shape}, {len(query)} queries")
    t0 = time.perf_counter()
    model = cypq.LOPQModel(V=V, M=M).fit(learn, random_state=0)
    out(f"trained LOPQ (V={V}, M={M}, {model.subquantizer_clusters} codewords) in "
        f"{time.perf_counter() - t0:.2f} s")
    tmp = None
    if directory is None:
        tmp = tempfile.mkdtemp(prefix="cypq-demo-")
        directory = os.path.join(tmp, "index")
    results = {}
    try:
        t0 = time.perf_counter()
        with cypq.Index.create(directory, model) as index:
            for s in range(0, len(base), 5000):
                index.add(base[s:s + 5000])
        elapsed = time.perf_counter() - t0
        out(f"built on-disk index at {directory}: {len(base)} vectors in {elapsed:.2f} s "
            f"({len(base) / elapsed:,.0f} vectors/s)")
        with cypq.Index.open(directory, readonly=True) as index:
            st = index.stats()
            out(f"index: {st['non_empty_cells']} non-empty cells of {st['cells']}, "
                f"{st['bytes_on_disk'] / 1e6:.1f} MB on disk")
            out("| quota | recall@1 | recall@10 | recall@100 | ms/query |")
            out("|---|---|---|---|---|")
            for quota in quotas:
                index.search(query[:20], k=100, quota=quota)  # warm up
                t0 = time.perf_counter()
                D, I = index.search(query, k=100, quota=quota)
                ms = (time.perf_counter() - t0) / len(query) * 1e3
                r = [float(np.mean((I[:, :R] == gt[:, :1]).any(axis=1))) for R in (1, 10, 100)]
                results[quota] = (*r, ms)
                out(f"| {quota} | {r[0]:.3f} | {r[1]:.3f} | {r[2]:.3f} | {ms:.3f} |")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            out(f"removed the temporary index {tmp} (keep one with --dir DIR)")
    return results


def write_sample(directory: str, out=print) -> list[str]:
    """Write the packaged sample as TEXMEX files (learn/base/query .bvecs, groundtruth .ivecs)
    into ``directory``, to try the ``cypq`` command on; returns the paths."""
    from .vector_files import write_vector_file
    os.makedirs(directory, exist_ok=True)
    data = load_sample()
    paths = []
    for name, suffix in (("learn", ".bvecs"), ("base", ".bvecs"), ("query", ".bvecs"),
                         ("groundtruth", ".ivecs")):
        paths.append(os.path.join(directory, name + suffix))
        write_vector_file(paths[-1], data[name])
        out(f"wrote {paths[-1]} {data[name].shape}")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cypq.demo", description=__doc__.split("\n")[0])
    p.add_argument("--dir", help="build the index here (default: a temporary directory)")
    args = p.parse_args(argv)
    run(args.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
