"""Incremental adds from 0 to 10M vectors: vectors/s per 1M added, with and without fsync.

    python tools/bench_add.py [--data DIR] [--sync both|on|off] [--reps 10] [--batch 1000]
                              [--stage 1048576] [--ids ascending|random]

Trains LOPQ (V=1024, M=16) on the learn set, encodes the 1M base once, then grows an on-disk
index with ``Index.add_codes`` in batches (the base's codes ``--reps`` times, fresh ids each
time), printing the rate of every 1M added and the median, 99.9th percentile and slowest add call
(merges run in bounded steps inside the adds).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _data import DEFAULT_DATA  # noqa: E402

import cypq  # noqa: E402


def grow(model, code, n, reps, batch, sync, root, stage, random_ids) -> list[float]:
    path = tempfile.mkdtemp(dir=root)
    # ascending fresh ids append to the id table; random ones land on random pages of it
    ids = np.random.default_rng(0).integers(0, 2 ** 62, n * reps) if random_ids \
        else np.arange(n * reps)
    assert len(np.unique(ids)) == len(ids)
    rates = []
    t0 = time.perf_counter()
    with cypq.Index.create(os.path.join(path, "ix"), model, sync=sync,
                           stage_capacity=stage) as ix:
        for rep in range(reps):
            t = time.perf_counter()
            calls = []
            for b in range(0, n, batch):
                e = min(n, b + batch)
                tc = time.perf_counter()
                ix.add_codes((code.coarse[b:e], code.fine[b:e]), ids[rep * n + b:rep * n + e])
                calls.append(time.perf_counter() - tc)
            rates.append(n / (time.perf_counter() - t))
            calls = np.sort(calls)
            print(f"sync={sync} {len(ix):,}: last {n:,} at {rates[-1]:,.0f}/s, overall "
                  f"{len(ix) / (time.perf_counter() - t0):,.0f}/s; add calls: median "
                  f"{calls[len(calls) // 2] * 1e3:.2f} ms, p99.9 "
                  f"{np.quantile(calls, 0.999) * 1e3:.1f} ms, slowest {calls[-1] * 1e3:.1f} ms; "
                  f"{ix.stats()['staged']:,} staged", flush=True)
    shutil.rmtree(path, ignore_errors=True)
    return rates


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--sync", choices=["both", "on", "off"], default="both")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--stage", type=int, default=1 << 20,
                   help="stage_capacity of the index (0: adds write the blocks directly)")
    p.add_argument("--ids", choices=["ascending", "random"], default="ascending")
    p.add_argument("--dir", default=None, help="where to build (default: the temp directory)")
    args = p.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        xt = np.load(os.path.join(str(args.data), "learn.u8.npy")).astype(np.float32)
        model = cypq.LOPQModel(V=1024, M=16).fit(xt, random_state=1)
    xb = np.load(os.path.join(str(args.data), "base.u8.npy")).astype(np.float32)
    code = model.predict(xb)
    for sync in {"both": (True, False), "on": (True,), "off": (False,)}[args.sync]:
        grow(model, code, len(xb), args.reps, args.batch, sync, args.dir, args.stage,
             args.ids == "random")


if __name__ == "__main__":
    main()
