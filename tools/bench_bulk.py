"""The bulk loader on REALSIFT1M: time and memory, for two input sizes and two chunk sizes.

    python tools/bench_bulk.py [--data DIR] [--dir DIR] [--copies 4] [--chunks 100000 200000]

Trains LOPQ (V=1024, M=16) on the learn set once, then runs ``cypq build`` - the command a
user runs - in a fresh process per case, on the 1M base (.npy, uint8) and on a directory of
``--copies`` links to it (ids = row numbers, so all distinct), and prints vectors/s and the
loader's peak anonymous memory: it should follow the chunk size, not the input size.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _data import DEFAULT_DATA  # noqa: E402

import cypq  # noqa: E402


def build(index, inp, model, chunk) -> dict:
    cmd = [sys.executable, "-m", "cypq", "build", index, inp, "--model", model, "--chunk",
           str(chunk), "--quiet"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(res.stderr)
    text = res.stdout
    grab = lambda pat: float(re.search(pat, text).group(1).replace(",", ""))
    return {"vectors": int(grab(r"vectors: ([\d,]+)")), "seconds": grab(r"time: ([\d.]+) s"),
            "encode": grab(r"encode ([\d.]+) s"), "write": grab(r"write ([\d.]+) s"),
            "rss": grab(r"peak anonymous memory: ([\d.]+) MB"),
            "mb": grab(r"\(([\d.]+) MB\)"), "wall": wall, "cmd": " ".join(cmd[1:])}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--dir", help="work directory (default: a temporary one)")
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--chunks", type=int, nargs="+", default=[100_000, 200_000])
    args = p.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="cypq-bulk-")
    os.makedirs(root, exist_ok=True)
    base = os.path.join(str(args.data), "base.u8.npy")
    model = os.path.join(root, "sift-V1024-M16.lopq")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        xt = np.load(os.path.join(str(args.data), "learn.u8.npy")).astype(np.float32)
        cypq.LOPQModel(V=1024, M=16).fit(xt, random_state=1).export_proto(model)
    print(f"trained V=1024, M=16 on {len(xt):,} in {time.perf_counter() - t0:.1f} s", flush=True)
    many = os.path.join(root, "input")
    os.makedirs(many, exist_ok=True)
    for k in range(args.copies):
        link = os.path.join(many, f"part{k:02d}.npy")
        if not os.path.exists(link):
            os.symlink(os.path.abspath(base), link)
    print("| input | chunk | vectors | time | vectors/s | encode / write | peak RssAnon | "
          "on disk |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for inp, name in ((base, "base 1M"), (many, f"{args.copies} x base")):
            for chunk in args.chunks:
                ix = os.path.join(root, "ix")
                shutil.rmtree(ix, ignore_errors=True)
                r = build(ix, inp, model, chunk)
                print(f"| {name} | {chunk:,} | {r['vectors']:,} | {r['seconds']:.1f} s | "
                      f"{r['vectors'] / r['seconds']:,.0f} | {r['encode']:.1f} / "
                      f"{r['write']:.1f} s | {r['rss']:.0f} MB | {r['mb']:.0f} MB |", flush=True)
        print(f"command: python -m cypq build INDEX INPUT --model MODEL --chunk N --quiet")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
