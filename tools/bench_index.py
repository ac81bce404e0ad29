"""The on-disk index on REALSIFT1M: build speed, search speed warm and cold, memory use.

    python tools/bench_index.py [--data DIR] [--M 16 8] [--big] [--dir DIR]

Per M: train LOPQ (V=1024) on the learn set; build the 1M-vector LMDB index incrementally
(batches of 1000 through ``Index.add``, which encodes too) and with the bulk loader; search
1000 queries at several quotas, LMDB vs in memory, 1 and 2 threads, with a warm page cache;
then, in a fresh process after dropping the index file from the page cache (posix_fadvise
DONTNEED), the cold search time and the process's anonymous memory (RssAnon). ``--big``
grows the index to 10M vectors (the base 10 times, fresh ids) and repeats the cold search
and memory measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_codecs.py

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _data import (DEFAULT_DATA, Timer, cold_child, load_queries, load_sift,  # noqa: E402
                   recalls)

import cypq  # noqa: E402
from cypq.bulk import bulk_load, rss_anon_mb  # noqa: E402
from cypq.vector_files import VectorSource  # noqa: E402


def child_cold(path: str, data: str, nq: int, quota: int, threads: int) -> dict:
    """Run in a fresh process: open, search cold, report times and memory."""
    xq, gt = load_queries(data, nq)   # not the base: only the index should use memory
    out = {"rss_start": rss_anon_mb()}
    with Timer() as t:
        index = cypq.Index.open(path, readonly=True, n_threads=threads)
    out["open_s"] = t.s
    out["rss_open"] = rss_anon_mb()
    with Timer() as t:
        D, I = index.search(xq, k=100, quota=quota)
    out["cold_ms"] = t.s / len(xq) * 1e3
    out["rss_search"] = rss_anon_mb()
    out["recall"] = recalls(I, gt)
    with Timer() as t:
        index.search(xq, k=100, quota=quota)
    out["warm_ms"] = t.s / len(xq) * 1e3
    return out


def cold_run(path, args, quota, threads=1):
    return cold_child(path, __file__, "--data", args.data, "--nq", args.cold_nq, "--quota",
                      quota, "--threads", threads)


def bench(M, args, xt, xb, xq, gt, root, lines):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = cypq.LOPQModel(V=1024, M=M).fit(xt, random_state=1)
    path = os.path.join(root, f"ix{M}")
    index = cypq.Index.create(path, model)
    rates = []
    t0 = time.perf_counter()
    for s in range(0, len(xb), 100_000):
        with Timer() as t:
            for b in range(s, min(len(xb), s + 100_000), 1000):
                index.add(xb[b:b + 1000])
        rates.append(100_000 / t.s)
    build_s = time.perf_counter() - t0
    staged = index.stats()["staged"]
    with Timer() as t:
        index.merge()  # the searches below read the blocks, not the process-local stage
    lines.append(f"| M={M} incremental add, batches of 1000 (encode + write) | "
                 f"{len(xb) / build_s:,.0f} vectors/s overall; per 100k: "
                 f"{min(rates):,.0f} .. {max(rates):,.0f}; then merging the {staged:,} "
                 f"staged entries: {t.s:.1f} s |")
    print(lines[-1], flush=True)
    bulk_path = path + "-bulk"
    summary = bulk_load(bulk_path, VectorSource.open(os.path.join(str(args.data), "base.u8.npy")),
                        model, progress=False, out=lambda m: None)
    with cypq.Index.open(bulk_path, readonly=True) as bulk_ix:
        same = all(np.array_equal(bulk_ix.search(xq[:200], k=100, quota=q)[1],
                                  index.search(xq[:200], k=100, quota=q)[1])
                   for q in args.quotas)
    shutil.rmtree(bulk_path, ignore_errors=True)
    rate = summary.vectors / summary.seconds
    lines.append(f"| M={M} bulk load (cypq build), 1M from base.u8.npy | {rate:,.0f} "
                 f"vectors/s ({summary.seconds:.1f} s), "
                 f"{summary.bytes_on_disk / 1e6:.0f} MB on disk; same search results as the "
                 f"incremental index: {same} |")
    print(lines[-1], flush=True)
    mem = cypq.Index.in_memory(model)
    code = model.predict(xb)
    mem.add_codes(code, np.arange(len(xb)))
    st = index.stats()
    lines.append(f"| M={M} index | {st['vectors']:,} vectors, {st['non_empty_cells']:,} cells, "
                 f"{st['bytes_on_disk'] / 1e6:.0f} MB on disk |")
    print(lines[-1], flush=True)
    for threads in (1, 2):
        for quota in args.quotas:
            res = {}
            for name, ix in (("memory", mem), ("lmdb", index)):
                ix.n_threads = threads
                ix.search(xq[:50], k=100, quota=quota)  # warm
                best = float("inf")
                for _ in range(args.repeat):
                    with Timer() as t:
                        D, I = ix.search(xq, k=100, quota=quota)
                    best = min(best, t.s)
                res[name] = (best / len(xq) * 1e3, I)
            same = np.array_equal(res["memory"][1], res["lmdb"][1])
            r = recalls(res["lmdb"][1], gt)
            lines.append(f"| M={M} search quota={quota}, {threads} thr, warm | memory "
                         f"{res['memory'][0]:.3f} ms/q, LMDB {res['lmdb'][0]:.3f} ms/q "
                         f"({res['lmdb'][0] / res['memory'][0]:.2f}x), same results: {same}, "
                         f"R@1/10/100 {r[1]:.3f}/{r[10]:.3f}/{r[100]:.3f} |")
            print(lines[-1], flush=True)
    index.close()
    for quota in args.quotas:
        c = cold_run(path, args, quota)
        lines.append(f"| M={M} 1M cold search quota={quota} (fresh process) | "
                     f"{c['cold_ms']:.2f} ms/q cold, {c['warm_ms']:.3f} warm; RssAnon "
                     f"{c['rss_open']:.0f} MB open, {c['rss_search']:.0f} MB after search |")
        print(lines[-1], flush=True)
    if args.big:
        index = cypq.Index.open(path)
        t0 = time.perf_counter()
        calls = []
        for rep in range(1, 10):
            for b in range(0, len(xb), 1000):
                with Timer() as t:
                    index.add_codes((code.coarse[b:b + 1000], code.fine[b:b + 1000]),
                                    np.arange(b, min(len(xb), b + 1000)) + rep * len(xb))
                calls.append(t.s)
            print(f"  {len(index):,} vectors, {time.perf_counter() - t0:.0f} s", flush=True)
        total = 9 * len(xb) / (time.perf_counter() - t0)
        calls = np.sort(calls)
        staged = index.stats()["staged"]
        lines.append(f"| M={M} grow 1M -> 10M by add_codes, batches of 1000 | {total:,.0f} "
                     f"vectors/s overall; add calls: median {calls[len(calls) // 2] * 1e3:.2f}"
                     f" ms, slowest {calls[-1]:.2f} s (a merge); {staged:,} staged at the end |")
        print(lines[-1], flush=True)
        index.close()
        c = cold_run(path, args, 10000)
        lines.append(f"| M={M} 10M cold search quota=10000 (fresh process, {staged:,} staged) "
                     f"| {c['cold_ms']:.2f} ms/q cold, {c['warm_ms']:.3f} warm; open "
                     f"{c['open_s']:.2f} s; RssAnon {c['rss_open']:.0f} MB open, "
                     f"{c['rss_search']:.0f} MB after search |")
        print(lines[-1], flush=True)
    shutil.rmtree(path, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--M", type=int, nargs="+", default=[16, 8])
    p.add_argument("--nq", type=int, default=1000)
    p.add_argument("--cold-nq", type=int, default=200)
    p.add_argument("--quotas", type=int, nargs="+", default=[1000, 5000, 10000])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--big", action="store_true", help="also grow to 10M vectors")
    p.add_argument("--dir", help="where to build (default: a temporary directory)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quota", type=int, default=10000, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child_cold(args.child, args.data, args.nq, args.quota, args.threads)))
        return
    xt, xb, xq, gt = load_sift(args.data, args.nq)
    root = args.dir or tempfile.mkdtemp(prefix="cypq-bench-", dir=os.environ.get("TMPDIR"))
    lines = []
    try:
        for M in args.M:
            bench(M, args, xt, xb, xq, gt, root, lines)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| measurement | result |\n|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
