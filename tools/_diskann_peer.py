"""DiskANN's static disk index as a benchmark peer, run by bench_rerank.py in a virtualenv of
its own (diskannpy 0.7 needs NumPy 1.x; this script imports neither cypq nor the tools).

    python _diskann_peer.py --base X.npy --queries Q.npy --index DIR --out RESULT.npz
        [--Ls 10 20 40 80] [--k 10] [--nq 1000] [--pq-bytes 16] [--degree 64]
        [--build-L 100] [--repeat 3]

Builds the disk index in DIR unless it is there (full vectors on disk in their own dtype, PQ
codes of about --pq-bytes per vector in RAM), opens it and searches one query per call (its
API's unit) with complexity L and beam width 2, 1 search thread, for each --Ls; writes the
ids per L to RESULT.npz, and to RESULT.npz.json the build seconds, bytes on disk, ms/query
per L (best of --repeat passes) and the searching process's RssAnon (and how much of it came with
the index). The index is opened with 2 thread contexts: with one, diskannpy 0.7's load waits
forever for a free context (DiskANN issue #462); the searches still run one at a time on
this thread. Its own RssAnon reader: cypq (NumPy 2) is not installed beside it.
"""
import argparse
import json
import os
import time

import numpy as np


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    import diskannpy as dap
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--Ls", type=int, nargs="+", default=[10, 20, 40, 80])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nq", type=int, default=1000)
    p.add_argument("--pq-bytes", type=int, default=16)
    p.add_argument("--degree", type=int, default=64)
    p.add_argument("--build-L", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    base = np.load(a.base, mmap_mode="r")
    dtype = np.uint8 if base.dtype == np.uint8 else np.float32
    xq = np.ascontiguousarray(np.load(a.queries)[:a.nq], dtype=dtype)
    build_s = None
    if not os.path.exists(os.path.join(a.index, "ann_disk.index")):
        os.makedirs(a.index, exist_ok=True)
        data = np.ascontiguousarray(base, dtype=dtype)
        t = time.perf_counter()
        dap.build_disk_index(data, "l2", a.index, complexity=a.build_L, graph_degree=a.degree,
                             search_memory_maximum=len(data) * a.pq_bytes / 2 ** 30,
                             build_memory_maximum=8.0, num_threads=2, vector_dtype=dtype)
        build_s = time.perf_counter() - t
        del data
    size = sum(os.path.getsize(os.path.join(a.index, f)) for f in os.listdir(a.index))
    rss0 = rss_anon_mb()
    index = dap.StaticDiskIndex(a.index, num_threads=2, num_nodes_to_cache=0,
                                vector_dtype=dtype, distance_metric="l2",
                                dimensions=xq.shape[1])
    out, ms = {}, {}
    for L in a.Ls:
        L = max(L, a.k)
        ids = np.full((len(xq), a.k), -1, dtype=np.int64)
        best = float("inf")
        for _ in range(a.repeat):
            t = time.perf_counter()
            for j in range(len(xq)):
                r = index.search(xq[j], k_neighbors=a.k, complexity=L, beam_width=2)
                ids[j, :len(r.identifiers)] = r.identifiers
            best = min(best, time.perf_counter() - t)
        out[f"L{L}"], ms[L] = ids, best / len(xq) * 1e3
    np.savez(a.out, **out)
    with open(a.out + ".json", "w") as f:   # not stdout: DiskANN logs there
        json.dump({"build_s": build_s, "disk_bytes": size, "ms": ms,
                   "rss_anon_mb": rss_anon_mb(), "rss_anon_index_mb": rss_anon_mb() - rss0}, f)


if __name__ == "__main__":
    main()
