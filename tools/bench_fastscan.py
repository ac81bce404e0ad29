"""4-bit LOPQ codes against faiss's 4-bit fast-scan, at equal code bytes, in one run.

    python tools/bench_fastscan.py [--data ../shared/data/realsift1m] [--bytes 8 16 24 32]
                                   [--nq 1000] [--rounds 3] [--plot fastscan.png]

Per code size B (bytes per vector): cypq LOPQ with 4-bit codes (M = 2B subquantizers of 16
codewords, stored two per byte) and with 8-bit codes (M = B of 256), V and the PCA as
LOPQModel chooses them from the data, over a quota sweep, and where the chosen 4-bit model
has a PCA, the top-recall curve of bench_embeddings (V=16 with a PCA to 2D/3 over
--top-quotas); and faiss IVF{256,1024},PQ{2B}x4fs
and x4fsr (fast-scan, by residual / not) over nprobe. A size is skipped for a system whose
subquantizers do not divide its dimension. All train on the learn set and index the base;
1 search thread, k=100. Each point is timed best of --repeat where its system is built, then
--rounds more times once all of a size's systems are, cypq's and faiss's points taking turns
(each keeps its least time: see bench_lopq.retime). Prints recall@1/10/100 and ms/query per
point; per code size, how many faiss points have a cypq point with recall@10 >= it at <= its
ms/query; and where a 4-bit search's time goes (cell order, local frames, tables + scan, the
rest) at one quota.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_codecs.py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _data import DEFAULT_DATA  # noqa: E402
from bench_embeddings import (NPROBE, _plot, bench_top, load_and_say,  # noqa: E402
                             print_tables, summary_row, sweep_options, top_options)
from bench_lopq import bench_cypq, bench_faiss, faiss, retime  # noqa: E402

from cypq import search as search_mod  # noqa: E402

# Quotas 1.2-1.5x apart up to 6000 (bench_embeddings': up to 2x), where most faiss fast-scan
# points lie: a faiss point between two of cypq's counts as unmatched even where a quota
# between them would match it.
QUOTAS = [250, 500, 750, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 6000, 8000, 10000, 12000,
          16000]
PHASES_QUOTA = 4000   # where the breakdown of a search's time is taken


def phases(index, xq, quota) -> str:
    """ms/query of each phase of index.search(xq, 100, quota), timed around the kernels."""
    spent = {}

    def timed(name, f):
        def g(*a, **kw):
            t = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return g
    saved = (search_mod._search, search_mod._local_frames)

    class Kernels:   # the module's kernels, two of them timed, the others as they are
        cell_order = staticmethod(timed("cell order", saved[0].cell_order))
        scan_cells = staticmethod(timed("tables + scan", saved[0].scan_cells))

        def __getattr__(self, name):
            return getattr(saved[0], name)
    search_mod._search = Kernels()
    search_mod._local_frames = timed("local frames", saved[1])
    try:
        t = time.perf_counter()
        index.search(xq, k=100, quota=quota)
        total = time.perf_counter() - t
    finally:
        search_mod._search, search_mod._local_frames = saved
    spent["the rest (Python, cell lists)"] = total - sum(spent.values())
    ms = lambda s: s / len(xq) * 1e3  # noqa: E731
    return f"quota {quota}: {ms(total):.3f} ms/query = " + ", ".join(
        f"{name} {ms(s):.3f}" for name, s in spent.items())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--bytes", type=int, nargs="+", default=[8, 16, 24, 32])
    top_options(p, [8000, 12000, 16000, 24000, 32000])
    sweep_options(p, nq=1000, quotas=QUOTAS)
    p.add_argument("--rounds", type=int, default=3,
                   help="times each point is timed again, the systems taking turns")
    args = p.parse_args(argv)
    args.V = None   # bench_cypq: LOPQModel chooses V
    xt, xb, xq, gt = load_and_say(args)
    D = xb.shape[1]
    rows, summary, by_size, profile = [], [], {}, []
    for B in args.bytes:
        mine, theirs, later = [], [], []
        for M, S in ((2 * B, 16), (B, 256)):
            try:
                index = bench_cypq(M, args, xt, xb, xq, gt, rows, points=mine, defaults=True,
                                   S=S, later=later)
            except ValueError as e:   # M does not divide the (reduced) dimension
                print(f"cypq M={M}, {S} codewords: skipped ({e})")
                continue
            if S == 16:
                profile.append(f"{B} B, {index.model!r}: " +
                               phases(index, xq, PHASES_QUOTA))
                if index.model.pca_dim:   # (the 4-bit top-recall curve, where it has one)
                    bench_top(M, S, args, xt, xb, xq, gt, rows, mine, later)
        if faiss is not None and D % (2 * B) == 0:
            specs = [(f"IVF{nlist},PQ{2 * B}x4{kind}", NPROBE) for nlist in (256, 1024)
                     for kind in ("fs", "fsr")]
            bench_faiss(2 * B, args, xt, xb, xq, gt, rows, specs=specs, points=theirs,
                        later=later)
        retime(later, args.rounds)
        index = later = None   # (this size's indexes, which its points held)
        if mine or theirs:   # (a size no system here can make draws no panel)
            by_size[B] = (mine, theirs)
        if theirs and mine:
            summary.append(summary_row(B, mine, theirs))
    print_tables(rows, summary, "faiss fast-scan points")
    print("\nwhere a 4-bit search's time goes (ms/query, 1 thread):")
    print("\n".join(profile))
    if args.plot:
        _plot({f"{B}": v for B, v in by_size.items()}, args.plot)


if __name__ == "__main__":
    main()
