"""PQ / OPQ codecs: cypq, faiss-cpu and nanopq side by side on REALSIFT1M.

    python tools/bench_codecs.py [--data DIR] [--M 8 16] [--nq 1000] [--iter 20]

All three train on the same learn set (100k, no subsampling) for the same number of k-means
iterations; encoding, search and quality use each library's own trained model except where a
row says "same codebooks". A peer that is not installed is skipped.
"""
from __future__ import annotations

import argparse
import os
import sys

# Two OpenMP runtimes (cypq's and the one inside faiss) and OpenBLAS's threads spin-wait after
# each parallel region; on 2 cores that steals the CPU from whichever library runs next.
# Passive waiting for everyone keeps the comparison fair.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _data import DEFAULT_DATA, Timer, best_of, load_sift, recalls  # noqa: E402

import cypq  # noqa: E402

try:
    import faiss
except ImportError:
    faiss = None
try:
    import nanopq
except ImportError:
    nanopq = None


def mse(decoded, X):
    return float(((decoded - X) ** 2).sum(1).mean())


def nanopq_search(pq, Q, codes, k):
    I = np.empty((len(Q), k), np.int64)
    for i, q in enumerate(Q):
        d = pq.dtable(q).adist(codes)
        part = np.argpartition(d, k)[:k]
        I[i] = part[np.argsort(d[part])]
    return I


class Table:
    def __init__(self):
        self.rows = []

    def add(self, task, ours, faiss_v=None, nano_v=None, unit="s", higher_better=False):
        self.rows.append((task, ours, faiss_v, nano_v, unit, higher_better))
        print(self.format_row(self.rows[-1]), flush=True)

    @staticmethod
    def _fmt(v, unit):
        if v is None:
            return "-"
        return f"{v:.4f}" if unit in ("", "recall") else f"{v:.3f} {unit}"

    def format_row(self, r):
        task, ours, f, n, unit, hb = r
        ratio = lambda other: "-" if other is None or not ours else (
            f"{ours / other:.2f}x" if hb else f"{other / ours:.2f}x")
        return (f"| {task} | {self._fmt(ours, unit)} | {self._fmt(f, unit)} | "
                f"{self._fmt(n, unit)} | {ratio(f)} | {ratio(n)} |")

    def markdown(self):
        head = ("| task | cypq | faiss | nanopq | faiss / cypq | nanopq / cypq |\n"
                "|---|---|---|---|---|---|")
        return "\n".join([head] + [self.format_row(r) for r in self.rows])


def bench_pq(M, xt, xb, xq, gt, args, table):
    k = 100
    # --- training: same data, same iterations
    t_ours, ours = best_of(lambda: cypq.PQ(M, 256, verbose=False, n_threads=2).fit(
        xt, iter=args.iter, seed=1), args.repeat)
    t_f = t_n = None
    if faiss:
        faiss.omp_set_num_threads(2)
        fpq = faiss.ProductQuantizer(xt.shape[1], M, 8)
        fpq.cp.niter = args.iter
        fpq.cp.max_points_per_centroid = 10**9  # no subsampling: the same 100k for all
        fpq.cp.seed = 1
        t_f, _ = best_of(lambda: fpq.train(xt), args.repeat)
    if nanopq and not args.skip_nanopq:
        with Timer() as t:
            npq = nanopq.PQ(M, 256, verbose=False).fit(xt, iter=args.iter, seed=1)
        t_n = t.s
    table.add(f"PQ{M} train (100k, {args.iter} it, 2 thr)", t_ours, t_f, t_n)

    # --- encoding 1M with the same codebooks (ours)
    rep = args.repeat
    for nt in (1, 2):
        ours.n_threads = nt
        t_ours, codes = best_of(lambda: ours.encode(xb), rep)
        t_f = t_n = None
        if faiss:
            faiss.omp_set_num_threads(nt)
            same = cypq.nanopq_to_faiss(ours).pq
            # faiss's speed depends on whether its centroids are transposed: take its best.
            plain = faiss.ProductQuantizer(same.d, same.M, same.nbits)
            faiss.copy_array_to_vector(ours.codewords.ravel(), plain.centroids)
            # (seconds each: once per configuration is enough)
            t_plain, fcodes = best_of(lambda: plain.compute_codes(xb), 1)
            t_tr, _ = best_of(lambda: same.compute_codes(xb), 1)
            t_f = min(t_plain, t_tr)
            if nt == 1:
                same_codes = float((fcodes == codes).mean())
        if nanopq and not args.skip_nanopq and nt == 1:
            nq_ = nanopq.PQ(M, 256, verbose=False)
            nq_.codewords, nq_.Ds = ours.codewords, ours.Ds
            t_n, _ = best_of(lambda: nq_.encode(xb), 1)
        table.add(f"PQ{M} encode 1M ({nt} thr)", t_ours, t_f, t_n)
    if faiss:
        table.add(f"PQ{M} codes equal to faiss's (same codebooks)", same_codes, unit="",
                  higher_better=True)

    # --- exhaustive ADC search, same codebooks and the same codes
    for nt in (1, 2):
        ours.n_threads = nt
        t_ours, (D, I) = best_of(lambda: ours.search(xq, codes, k=k), rep)
        t_ours = t_ours / len(xq) * 1e3
        t_f = t_n = None
        if faiss:
            faiss.omp_set_num_threads(nt)
            findex = cypq.nanopq_to_faiss(ours)
            findex.add_sa_codes(codes)             # the same codes as cypq searches
            t_f, (Df, If) = best_of(lambda: findex.search(xq, k), rep)
            t_f = t_f / len(xq) * 1e3
            if nt == 1:
                same_ids = float((I == If).mean())
                dist_err = float(np.max(np.abs(D - Df) / np.maximum(np.abs(Df), 1e-6)))
        if nanopq and not args.skip_nanopq and nt == 1:
            nq_ = nanopq.PQ(M, 256, verbose=False)
            nq_.codewords, nq_.Ds = ours.codewords, ours.Ds
            nn = min(args.nanopq_queries, len(xq))
            t_n, _ = best_of(lambda: nanopq_search(nq_, xq[:nn], codes, k), 1)
            t_n = t_n / nn * 1e3
        table.add(f"PQ{M} search 1M, k={k} ({nt} thr)", t_ours, t_f, t_n, unit="ms/q")
    if faiss:
        table.add(f"PQ{M} top-{k} ids equal to faiss's (same codes)", same_ids, unit="",
                  higher_better=True)
        table.add(f"PQ{M} max rel. distance diff vs faiss", dist_err, unit="")

    # --- quality: each library's own model
    ours.n_threads = 2
    q_ours = mse(ours.decode(codes), xb)
    r_ours = recalls(ours.search(xq, codes, k=k)[1], gt)
    q_f = q_n = None
    r_f = r_n = {}
    if faiss:
        faiss.omp_set_num_threads(2)
        fc = fpq.compute_codes(xb)
        q_f = mse(fpq.decode(fc), xb)
        fidx = faiss.IndexPQ(xb.shape[1], M, 8)
        fidx.pq = fpq
        fidx.is_trained = True
        fidx.add(xb)
        r_f = recalls(fidx.search(xq, k)[1], gt)
    if nanopq and not args.skip_nanopq:
        nc = npq.encode(xb)
        q_n = mse(npq.decode(nc), xb)
        nn = min(args.nanopq_queries, len(xq))
        r_n = recalls(nanopq_search(npq, xq[:nn], nc, k), gt[:nn])
    table.add(f"PQ{M} quantisation MSE on base", q_ours, q_f, q_n, unit="")
    for R in (1, 10, 100):
        table.add(f"PQ{M} recall@{R}", r_ours[R], r_f.get(R), r_n.get(R), unit="recall",
                  higher_better=True)


def bench_opq(M, xt, xb, args, table):
    rot = args.rotation_iter
    with Timer() as t:
        ours = cypq.OPQ(M, 256, verbose=False, n_threads=2).fit(
            xt, rotation_iter=rot, pq_iter=args.iter, seed=1)
    t_ours = t.s
    q_ours = mse(ours.decode(ours.encode(xb)), xb)
    t_f = t_n = q_f = q_n = None
    if faiss:
        faiss.omp_set_num_threads(2)
        index = faiss.index_factory(xt.shape[1], f"OPQ{M},PQ{M}")
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        opq.niter, opq.niter_pq, opq.niter_pq_0 = rot - 1, 1, 1
        opq.max_train_points = len(xt)
        ipq = faiss.downcast_index(index.index)
        ipq.pq.cp.niter = args.iter
        ipq.pq.cp.max_points_per_centroid = 10**9
        with Timer() as t:
            index.train(xt)
        t_f = t.s
        model, _ = cypq.faiss_to_nanopq(index)
        q_f = mse(model.decode(model.encode(xb)), xb)
    if nanopq and not args.skip_nanopq:
        with Timer() as t:
            nopq = nanopq.OPQ(M, 256, verbose=False).fit(xt, rotation_iter=rot,
                                                          pq_iter=args.iter, seed=1)
        t_n = t.s
        q_n = mse(nopq.decode(nopq.encode(xb)), xb)
    table.add(f"OPQ{M} train ({rot} rotations, {args.iter} it)", t_ours, t_f, t_n)
    table.add(f"OPQ{M} quantisation MSE on base", q_ours, q_f, q_n, unit="")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--M", type=int, nargs="+", default=[8, 16])
    p.add_argument("--nq", type=int, default=1000)
    p.add_argument("--iter", type=int, default=20)
    p.add_argument("--rotation-iter", type=int, default=10)
    p.add_argument("--nanopq-queries", type=int, default=50,
                   help="queries timed for nanopq's (slow) search")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (best)")
    p.add_argument("--skip-nanopq", action="store_true")
    p.add_argument("--skip-opq", action="store_true")
    args = p.parse_args(argv)
    xt, xb, xq, gt = load_sift(args.data, args.nq)
    print(f"cypq {cypq.__version__}, faiss {getattr(faiss, '__version__', '-')}, "
          f"nanopq {getattr(nanopq, '__version__', 'installed' if nanopq else '-')}; "
          f"learn {xt.shape}, base {xb.shape}, queries {xq.shape}")
    table = Table()
    for M in args.M:
        bench_pq(M, xt, xb, xq, gt, args, table)
    if not args.skip_opq:
        for M in args.M:
            bench_opq(M, xt, xb, args, table)
    print()
    print(table.markdown())


if __name__ == "__main__":
    main()
