"""The read path of the on-disk index: the first search after a write, and opening, for this
build and (with --old) an older cypq checkout side by side in one run.

    python tools/bench_read_path.py [--data DIR] [--old CHECKOUT] [--n 300000] [--stage 0]
                                    [--big]
    python tools/bench_read_path.py --data ../shared/data/manminilm --n 90000 [--old CHECKOUT]

Part A (issue #12's measurement): train LOPQ (V=256, M=16) on the learn set of REALSIFT1M (or
of MANMINILM, 384-d, when --data names it), build an index of the first --n base vectors
with staging off (stage_capacity=0: every add writes its cells' blocks; --stage N: with
stage_capacity N, so that with N >= n every entry is read from the stage), then, per quota
(2000, 10000), 1000 queries, 1 thread: the warm search time (median of 5 searches in a row),
the first search after each of 5 adds of 1000 vectors (median of the 5), and the time to
open the index read-only (best of 3). Each build runs in a child process of its own.

Part B (--big): a 10M-vector index (the base 10 times, the shape of bench_index.py --big)
bulk-loaded by the older build (format 2) when --old is given, else by this one; then the
time to open it read-only: the older build; this build on the format-2 index as it is; this
build again after it was opened for writing once (the upgrade to format 3, timed too).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_codecs.py

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _data import DEFAULT_DATA, Timer, load_set, load_sift  # noqa: E402

QUOTAS = (2000, 10000)


def child_a(args) -> dict:
    import cypq
    xt, xb, xq, _ = load_set(args.data, 1000)
    model = cypq.LOPQModel(V=256, M=16, pca=False).fit(xt, random_state=1)  # as old builds
    path = os.path.join(args.dir, "ix")
    out = {"cypq": os.path.dirname(cypq.__file__)}
    with cypq.Index.create(path, model, stage_capacity=args.stage, n_threads=1) as ix:
        for s in range(0, args.n, 100_000):
            ix.add(xb[s:min(s + 100_000, args.n)])
        nxt = args.n
        for quota in QUOTAS:
            ix.search(xq[:50], k=100, quota=quota)
            warm = []
            for _ in range(5):
                with Timer() as t:
                    ix.search(xq, k=100, quota=quota)
                warm.append(t.s)
            after = []
            for _ in range(5):
                ix.add(xb[nxt:nxt + 1000])
                nxt = nxt + 1000 if nxt + 2000 <= len(xb) else args.n
                with Timer() as t:
                    ix.search(xq, k=100, quota=quota)
                after.append(t.s)
            out[f"warm_ms_{quota}"] = statistics.median(warm) / len(xq) * 1e3
            out[f"after_write_ms_{quota}"] = statistics.median(after) / len(xq) * 1e3
    opens = []
    for _ in range(3):
        with Timer() as t:
            ix = cypq.Index.open(path, readonly=True)
        ix.close()
        opens.append(t.s)
    out["open_s"] = min(opens)
    return out


def child_open(args) -> dict:
    """Open args.index read-only 3 times (best), optionally writable once first."""
    import cypq
    out = {}
    if args.upgrade:
        with Timer() as t:
            cypq.Index.open(args.index).close()
        out["upgrade_s"] = t.s
    best = float("inf")
    for _ in range(3):
        with Timer() as t:
            ix = cypq.Index.open(args.index, readonly=True)
        best = min(best, t.s)
        n = len(ix)
        ix.close()
    out["open_s"], out["vectors"] = best, n
    return out


def child_build_big(args) -> dict:
    import cypq
    from cypq.bulk import bulk_load
    from cypq.vector_files import VectorSource
    xt, xb, _, _ = load_sift(args.data, 10)
    model = cypq.LOPQModel(V=1024, M=16).fit(xt, random_state=1)
    src = os.path.join(args.dir, "base10x.npy")
    big = np.lib.format.open_memmap(src, mode="w+", dtype=np.uint8, shape=(10 * len(xb), 128))
    for r in range(10):
        big[r * len(xb):(r + 1) * len(xb)] = xb.astype(np.uint8)
    big.flush()
    del big
    with Timer() as t:
        bulk_load(args.index, VectorSource.open(src), model, progress=False,
                  out=lambda m: None)
    os.remove(src)
    return {"build_s": t.s}


def run_child(kind: str, build: str | None, extra: list[str]) -> dict:
    env = dict(os.environ)
    if build:
        env["PYTHONPATH"] = os.path.abspath(build)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE)
    if res.returncode:
        raise SystemExit(f"child {kind} ({build or 'this build'}) failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--old", help="an older cypq checkout, built in place, to compare with")
    p.add_argument("--n", type=int, default=300_000)
    p.add_argument("--stage", type=int, default=0, help="stage_capacity of part A's index")
    p.add_argument("--big", action="store_true")
    p.add_argument("--dir", help="work directory (default: a temporary one)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--index", help=argparse.SUPPRESS)
    p.add_argument("--upgrade", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = {"a": child_a, "open": child_open, "build": child_build_big}[args.child]
        print(json.dumps(fn(args)))
        return
    root = args.dir or tempfile.mkdtemp(prefix="cypq-readpath-")
    builds = ([("old", args.old)] if args.old else []) + [("new", None)]
    print(f"load before: {os.getloadavg()[0]:.2f}")
    print(f"## Part A: {args.n:,} vectors of {os.path.basename(os.path.normpath(args.data))}, "
          f"V=256, M=16, {f'stage_capacity {args.stage:,}' if args.stage else 'staging off'}, "
          "1000 queries, k=100, 1 thread")
    print("| build | quota | warm ms/q | first search after a write ms/q | ratio | open s |")
    print("|---|---|---|---|---|---|")
    for name, build in builds:
        work = os.path.join(root, f"a-{name}")
        os.makedirs(work, exist_ok=True)
        r = run_child("a", build, ["--data", args.data, "--n", str(args.n), "--dir", work,
                                   "--stage", str(args.stage)])
        for quota in QUOTAS:
            w, a = r[f"warm_ms_{quota}"], r[f"after_write_ms_{quota}"]
            print(f"| {name} | {quota} | {w:.3f} | {a:.3f} | {a / w:.2f}x | "
                  f"{r['open_s']:.3f} |", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    if args.big:
        index = os.path.join(root, "big")
        built = run_child("build", args.old, ["--data", args.data, "--dir", root,
                                              "--index", index])
        print(f"\n## Part B: 10M-vector index (V=1024, M=16), bulk-loaded by "
              f"{'the old build (format 2)' if args.old else 'this build'} in "
              f"{built['build_s']:.0f} s; open read-only, best of 3, warm page cache")
        print("| build | index format | open s |")
        print("|---|---|---|")
        if args.old:
            r = run_child("open", args.old, ["--index", index])
            print(f"| old | 2 | {r['open_s']:.3f} |", flush=True)
            r = run_child("open", None, ["--index", index])
            print(f"| new | 2 (read as it is) | {r['open_s']:.3f} |", flush=True)
        r = run_child("open", None, ["--index", index] + (["--upgrade"] if args.old else []))
        up = f" (after the upgrade, which took {r['upgrade_s']:.1f} s)" if args.old else ""
        print(f"| new | 4{up} | {r['open_s']:.3f} |", flush=True)
        shutil.rmtree(index, ignore_errors=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
