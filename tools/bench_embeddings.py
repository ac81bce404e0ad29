"""LOPQ on high-dimensional text embeddings against faiss, in one run.

    python tools/bench_embeddings.py [--data ../shared/data/manminilm] [--M 16 32 48]
                                     [--nq 2000] [--plot embeddings.png] [--four-bit]

Per code size M (bytes with 8-bit codes): cypq LOPQ (V and the PCA as LOPQModel chooses
them) over a quota sweep, and for the top recalls, where the chosen model has a PCA, V=16
(--top-V: few centroids, each local rotation trained on many points) with a PCA to 2D/3
(top_pca_dim) over larger quotas (--top-quotas), slower per query but with a higher ceiling
(without a PCA: V=256, --V); with --four-bit also 2M subquantizers of 16 codewords (the same
bytes), chosen and top; and the faiss peers at the same code bytes: IVF{256,1024},PQ{M},
OPQ{M},IVF{256,1024},PQ{M} over nprobe, OPQ{M},IMI2x8,PQ{M} over max_codes. All train on
the learn set (MANMINILM: 20k) and index the base (100k); 1 search thread, k=100. Prints
recall@1/10/100 and ms/query per point, then per code size whether every faiss point has a
cypq point with recall@10 >= it at <= its ms/query, and the best recall@10 of each side;
with --plot, recall@10 against ms/query (PNG, needs matplotlib). REALSIFT1M with --data.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_codecs.py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _data import load_set  # noqa: E402
from bench_lopq import bench_cypq, bench_faiss, faiss  # noqa: E402

import cypq  # noqa: E402

MINILM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                      "data", "manminilm")
NPROBE = [f"nprobe={p}" for p in (1, 2, 4, 8, 16, 32, 64)]
MAX_CODES = [f"nprobe={p},max_codes={q}" for p, q in
             ((256, 500), (1024, 1000), (4096, 2000), (4096, 4000), (16384, 8000),
              (65536, 16000))]


def top_pca_dim(dim: int, M: int):
    """The PCA of the top-recall curves: 2D/3 rounded up to a multiple of M (MANMINILM: 256,
    288 for M = 48 and 96), None where that is not below D or not even. On MANMINILM with
    V=16 it beat D/2 and no PCA at the top (32 bytes, 4-bit: 0.971 against 0.967 with 192
    and 0.952 with 384)."""
    k = -(-2 * dim // (3 * M)) * M
    return k if k < dim and k % 2 == 0 else None


def top_options(p, quotas) -> None:
    """The options of the top-recall curves (bench_top)."""
    p.add_argument("--top-V", type=int, default=16,
                   help="the top-recall curves' V (where the chosen model has a PCA)")
    p.add_argument("--top-quotas", type=int, nargs="+", default=quotas)


def bench_top(M, S, args, xt, xb, xq, gt, rows, points, later=None):
    """The top-recall curve of M subquantizers of S codewords, as bench_cypq runs it: V =
    args.top_V, a PCA to top_pca_dim, over args.top_quotas; None where D has no such PCA."""
    pca_dim = top_pca_dim(xt.shape[1], M)
    if pca_dim is None:
        return None
    top_args = argparse.Namespace(**{**vars(args), "quotas": args.top_quotas})
    return bench_cypq(M, top_args, xt, xb, xq, gt, rows, V=args.top_V, S=S, pca_dim=pca_dim,
                      points=points, later=later)


def dominated(point, mine) -> bool:
    """Whether one of mine has recall@10 >= point's at <= its ms/query."""
    return any(r[10] >= point[3][10] and ms <= point[2] for _, _, ms, r in mine)


def summary_row(size, mine, theirs) -> str:
    """A line of the summary table: at code size ``size`` (bytes), how many of their points
    one of mine dominates, and the best recall@10 of each side."""
    beaten = sum(dominated(t, mine) for t in theirs)
    best_mine = max(r[10] for *_, r in mine)
    best_theirs = max(r[10] for *_, r in theirs)
    return (f"| {size} B | {beaten} of {len(theirs)} | {best_mine:.3f} | {best_theirs:.3f} | "
            f"{best_mine - best_theirs:+.3f} |")


def print_tables(rows, summary, peers="faiss points") -> None:
    """Every point's row, then the summary lines (summary_row) if any."""
    print("\n| system | setting | train s | encode s | ms/query | R@1 | R@10 | R@100 |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if summary:
        print(f"\n| code size | {peers} with a cypq point at >= R@10 and <= ms | "
              "best cypq R@10 | best faiss R@10 | difference |")
        print("|---|---|---|---|---|")
        print("\n".join(summary))


QUOTAS = [250, 500, 1000, 2000, 3000, 4000, 6000, 8000, 12000, 16000]


def sweep_options(p, nq: int, quotas=QUOTAS) -> None:
    """The options of a benchmark that sweeps quotas / nprobe against faiss."""
    p.add_argument("--nq", type=int, default=nq)
    p.add_argument("--threads", type=int, default=1, help="search threads (training: all)")
    p.add_argument("--quotas", type=int, nargs="+", default=quotas)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--plot", help="write recall@10 vs ms/query here (PNG)")


def load_and_say(args):
    """(learn, base, queries, groundtruth) of args.data, after a line saying what runs."""
    xt, xb, xq, gt = load_set(args.data, args.nq)
    print(f"cypq {cypq.__version__}, faiss {getattr(faiss, '__version__', '-')}; "
          f"{os.path.basename(os.path.normpath(args.data))}: learn {xt.shape}, base "
          f"{xb.shape}, {len(xq)} queries, k=100, search threads {args.threads}")
    return xt, xb, xq, gt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=MINILM)
    p.add_argument("--M", type=int, nargs="+", default=[16, 32, 48])
    p.add_argument("--V", type=int, default=256,
                   help="cypq coarse centroids per half, beside the V LOPQModel chooses, "
                   "where the chosen model has no PCA")
    top_options(p, [8000, 16000, 32000, 50000, 100000])
    p.add_argument("--four-bit", action="store_true",
                   help="also cypq with 2M subquantizers of 16 codewords (the same bytes)")
    sweep_options(p, nq=2000)
    args = p.parse_args(argv)
    xt, xb, xq, gt = load_and_say(args)
    rows, summary, by_m = [], [], {}
    for M in args.M:
        mine, theirs = [], []
        chosen = bench_cypq(M, args, xt, xb, xq, gt, rows, points=mine, defaults=True)
        if args.four_bit:
            bench_cypq(2 * M, args, xt, xb, xq, gt, rows, points=mine, defaults=True, S=16)
        if chosen.model.pca_dim:
            for m, S in ((M, 256), (2 * M, 16))[:2 if args.four_bit else 1]:
                bench_top(m, S, args, xt, xb, xq, gt, rows, mine)
        elif chosen.model.V != args.V:
            bench_cypq(M, args, xt, xb, xq, gt, rows, V=args.V, points=mine)
        if faiss is not None:
            specs = [(f"{pre}IVF{nlist},PQ{M}", NPROBE) for pre in ("", f"OPQ{M},")
                     for nlist in (256, 1024)] + [(f"OPQ{M},IMI2x8,PQ{M}", MAX_CODES)]
            bench_faiss(M, args, xt, xb, xq, gt, rows, specs=specs, points=theirs)
        by_m[M] = (mine, theirs)
        if theirs:
            summary.append(summary_row(M, mine, theirs))
    print_tables(rows, summary)
    if args.plot:
        _plot(by_m, args.plot)


def _plot(by_m, path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(by_m), figsize=(5 * len(by_m), 4), squeeze=False)
    for ax, (M, (mine, theirs)) in zip(axes[0], by_m.items()):
        for points, style in ((mine, "-o"), (theirs, "--."),):
            for system in dict.fromkeys(s for s, *_ in points):
                pts = sorted((ms, r[10]) for s, _, ms, r in points if s == system)
                ax.plot([a for a, _ in pts], [b for _, b in pts], style, ms=3,
                        label=system.replace("cypq LOPQ ", "cypq ").replace("faiss ", ""))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # (they overlapped)
        ax.set_xlabel("ms / query (1 thread)")
        ax.set_ylabel("recall@10")
        ax.set_title(f"{M} bytes per code")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
