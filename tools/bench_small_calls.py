"""Small calls (one vector, one query) on a machine kept busy by other processes: default
threads against n_threads=1, for this build and (with --old) an older checkout.

    python tools/bench_small_calls.py [--old CHECKOUT] [--hogs 2] [--calls 200]

Starts --hogs processes that spin on the CPU (all cores busy, as on a loaded server), then
times, per call kind, the median of --calls calls with the default settings and with
n_threads=1: LOPQ get_subquantizer_distances, predict and reconstruct of one vector, an
on-disk index search of one query, PQ encode of one vector. Without hogs (--hogs 0) it shows
the quiet case. Each build runs in a child process of its own; the model (V=64, M=16,
REALSIFT1M's learn set, 20k vectors) and index (100k base vectors) are the same for both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _data import DEFAULT_DATA, load_sift  # noqa: E402

HOG = "while True: pass"


def child(args) -> dict:
    import cypq
    xt, xb, xq, _ = load_sift(args.data, 100)
    model = cypq.LOPQModel(V=64, M=16).fit(xt[:20000], random_state=1)
    pq = cypq.PQ(M=16, verbose=False).fit(xt[:20000], iter=5)
    path = os.path.join(args.dir, "ix")
    cypq.Index.create(path, model).close()
    with cypq.Index.open(path) as ix:
        ix.add(xb[:100_000])
    x, q = xb[0], xq[0]
    code = model.predict(x)
    out = {}
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
    try:
        time.sleep(0.5)
        with cypq.Index.open(path, readonly=True) as ix:
            for threads in (None, 1):
                model.n_threads = threads
                ix.n_threads = threads
                pq.n_threads = threads
                calls = {
                    "get_subquantizer_distances": lambda: model.get_subquantizer_distances(
                        x, code.coarse),
                    "predict": lambda: model.predict(x),
                    "reconstruct": lambda: model.reconstruct(code),
                    "index search, 1 query, quota 1000": lambda: ix.search(q, k=10,
                                                                          quota=1000),
                    "PQ encode": lambda: pq.encode(x[None, :]),
                }
                for name, fn in calls.items():
                    fn()
                    times = []
                    for _ in range(args.calls):
                        t0 = time.perf_counter()
                        fn()
                        times.append(time.perf_counter() - t0)
                    out[f"{name}|{threads or 'default'}"] = statistics.median(times) * 1e3
    finally:
        for h in hogs:
            h.kill()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--old", help="an older cypq checkout, built in place")
    p.add_argument("--hogs", type=int, default=2)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    print(f"load before: {os.getloadavg()[0]:.2f}; {args.hogs} CPU hogs while timing; "
          f"median of {args.calls} calls, ms")
    results = {}
    for name, build in ([("old", args.old)] if args.old else []) + [("new", None)]:
        env = dict(os.environ)
        if build:
            env["PYTHONPATH"] = os.path.abspath(build)
        with tempfile.TemporaryDirectory() as d:
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                                  "--data", args.data, "--hogs", str(args.hogs), "--calls",
                                  str(args.calls), "--dir", d], capture_output=True,
                                 text=True, env=env, cwd=HERE)
        if res.returncode:
            raise SystemExit(res.stderr)
        results[name] = json.loads(res.stdout.strip().splitlines()[-1])
    kinds = sorted({k.split("|")[0] for k in results["new"]}, key=list(
        k.split("|")[0] for k in results["new"]).index)
    print("| call | " + " | ".join(f"{b} default | {b} n_threads=1 | {b} ratio"
                                   for b in results) + " |")
    print("|---|" + "---|---|---|" * len(results))
    for kind in kinds:
        cells = []
        for r in results.values():
            d, one = r[f"{kind}|default"], r[f"{kind}|1"]
            cells.append(f"{d:.3f} | {one:.3f} | {d / one:.2f}x")
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
