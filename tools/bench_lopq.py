"""LOPQ on REALSIFT1M: train, encode, search (multi-sequence + ADC) at several quotas, side by
side with faiss IVF / IMI / OPQ+IMI at the same code size.

    python tools/bench_lopq.py [--data DIR] [--M 16 8] [--V 1024 ...] [--S 256]
                               [--chosen-pca | --pca-dim 128 ...] [--nq 1000] [--threads 1]
                               [--defaults] [--skip-faiss]

(--data may also name a float16 set such as ../shared/data/manminilm; --defaults adds
LOPQModel(M=M) with V and the PCA chosen from the data; each --V is a model of its own,
without PCA unless --chosen-pca gives it the PCA LOPQModel would choose, or --pca-dim one
model per listed dimension (those M does not divide are skipped); --S 16: 4-bit codes, M
subquantizers of 16 codewords. faiss runs with 256 codewords only.)

Prints recall@1/10/100 and ms/query per setting, and training / encoding times.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_codecs.py

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _data import DEFAULT_DATA, Timer, best_of, load_set, recalls  # noqa: E402

import cypq  # noqa: E402
from cypq.lopq_parts import auto_pca_dim  # noqa: E402

try:
    import faiss
except ImportError:
    faiss = None


def row(system, setting, train_s, encode_s, ms, rec):
    return (f"| {system} | {setting} | {train_s:.1f} | {encode_s:.1f} | {ms:.3f} | "
            f"{rec[1]:.3f} | {rec[10]:.3f} | {rec[100]:.3f} |")


@dataclass
class Timed:
    """A point timed by time_point, as retime times it again."""
    system: str
    search: Callable
    prepare: Optional[Callable]
    nq: int
    ms: float
    rows: list
    row_at: int
    points: Optional[list]
    point_at: Optional[int]
    make_row: Callable


def time_point(search, system, setting, train_s, encode_s, args, gt, rows, points, later,
               prepare=None):
    """Time ``search()`` (-> (D, I) of the queries) best of args.repeat, after
    ``prepare()`` if given; add its table row to rows and (system, setting, ms, recalls)
    to points (if not None); with ``later`` (a list), a Timed for :func:`retime`."""
    if prepare is not None:
        prepare()
    s, (D, I) = best_of(search, args.repeat)
    nq, rec = len(I), recalls(I, gt)
    make_row = lambda ms: row(system, setting, train_s, encode_s, ms, rec)  # noqa: E731
    rows.append(make_row(s / nq * 1e3))
    if points is not None:
        points.append((system, setting, s / nq * 1e3, rec))
    if later is not None:
        later.append(Timed(system, search, prepare, nq, s / nq * 1e3, rows, len(rows) - 1,
                           points, None if points is None else len(points) - 1, make_row))
    print(rows[-1], flush=True)


def retime(later: list, rounds: int) -> None:
    """Time every point of ``later`` (Timed, from time_point) ``rounds`` more times, once
    per round, cypq's points and the peers' taking turns, and keep each point's least time
    in its row and point. This VM's speed drifts by 10-20% within a run: points timed only
    where each system was built compare the phases they ran in as much as the systems."""
    mine = [t for t in later if t.system.startswith("cypq")]
    theirs = [t for t in later if not t.system.startswith("cypq")]
    order = [t for turn in itertools.zip_longest(mine, theirs) for t in turn if t is not None]
    for _ in range(rounds):
        for t in order:
            if t.prepare is not None:
                t.prepare()
            ms = best_of(t.search, 1)[0] / t.nq * 1e3
            if ms < t.ms:
                t.ms = ms
                t.rows[t.row_at] = t.make_row(ms)
                if t.points is not None:
                    p = t.points[t.point_at]
                    t.points[t.point_at] = (p[0], p[1], ms, p[3])


def bench_cypq(M, args, xt, xb, xq, gt, rows, V=None, pca_dim=None, points=None,
               defaults=False, S=256, later=None):
    """LOPQ (V, M, pca_dim, S codewords per subquantizer; with ``defaults``, V and the PCA
    as LOPQModel chooses them) over args.quotas; rows get table lines, points (system,
    setting, ms, recalls) tuples, later what retime needs (see time_point). Returns the
    index (in memory)."""
    V = V or args.V
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with Timer() as t:
            model = (cypq.LOPQModel(M=M, subquantizer_clusters=S) if defaults else
                     cypq.LOPQModel(V=V, M=M, pca_dim=pca_dim,   # no PCA unless asked
                                    pca=pca_dim is not None,
                                    subquantizer_clusters=S)).fit(xt, random_state=1)
    train_s = t.s
    V, pca_dim = model.V, model.pca_dim
    system = f"cypq LOPQ V={V}, M={M}" + (f"x{S.bit_length() - 1}" if S != 256 else "") + \
        (f", pca_dim={pca_dim}" if pca_dim else "") + (" (defaults)" if defaults else "")
    with Timer() as t:
        code = model.predict(xb)
    encode_s = t.s
    index = cypq.Index.in_memory(model, n_threads=args.threads)
    index.add_codes(code, np.arange(len(xb)))
    for quota in args.quotas:
        time_point(lambda quota=quota: index.search(xq, k=100, quota=quota), system,
                   f"quota={quota}", train_s, encode_s, args, gt, rows, points, later)
    return index


def bench_faiss(M, args, xt, xb, xq, gt, rows, specs=None, points=None, V=None, later=None):
    """faiss index_factory keys with their search settings (default: IVF / IMI / OPQ+IMI at
    V, default args.V); rows, points and later as in bench_cypq."""
    faiss.omp_set_num_threads(2)
    V = V or args.V
    logv = int(np.log2(V)) if specs is None else 0
    specs = specs or [
        (f"IVF{V},PQ{M}", [f"nprobe={p}" for p in (8, 16, 32, 64, 128)]),
        (f"IMI2x{logv},PQ{M}", [f"nprobe={p},max_codes={q}" for p, q in
                                ((16384, 2000), (16384, 5000), (65536, 10000),
                                 (65536, 20000))]),
        (f"OPQ{M},IMI2x{logv},PQ{M}", [f"nprobe={p},max_codes={q}" for p, q in
                                      ((16384, 5000), (65536, 10000), (65536, 20000))])]
    for key, settings in specs:
        index = faiss.index_factory(xb.shape[1], key)
        with Timer() as t:
            index.train(xt)
        train_s = t.s
        with Timer() as t:
            index.add(xb)
        encode_s = t.s
        ps = faiss.ParameterSpace()
        for setting in settings:
            def prepare(index=index, setting=setting, ps=ps):   # (threads: training takes 2)
                faiss.omp_set_num_threads(args.threads)
                ps.set_index_parameters(index, setting)
            time_point(lambda index=index: index.search(xq, 100), "faiss " + key, setting,
                       train_s, encode_s, args, gt, rows, points, later, prepare)
        faiss.omp_set_num_threads(2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--M", type=int, nargs="+", default=[16, 8])
    p.add_argument("--V", type=int, nargs="+", default=[1024])
    p.add_argument("--S", type=int, default=256, help="codewords per subquantizer (cypq)")
    p.add_argument("--chosen-pca", action="store_true",
                   help="the --V models take the PCA LOPQModel(M=M) would choose")
    p.add_argument("--pca-dim", type=int, nargs="+", default=None,
                   help="a --V model per PCA dimension listed (skipped where M does not divide it)")
    p.add_argument("--nq", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="search threads (training: all)")
    p.add_argument("--quotas", type=int, nargs="+",
                   default=[1000, 2000, 3000, 3500, 4000, 5000, 10000, 20000])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--skip-faiss", action="store_true")
    p.add_argument("--defaults", action="store_true",
                   help="also LOPQModel(M=M) with V and the PCA chosen from the data")
    args = p.parse_args(argv)
    xt, xb, xq, gt = load_set(args.data, args.nq)
    print(f"cypq {cypq.__version__}, faiss {getattr(faiss, '__version__', '-')}; "
          f"{len(xb)} base, {len(xq)} queries, search threads {args.threads}")
    rows = []
    for M in args.M:
        dims = args.pca_dim or [auto_pca_dim(xt.shape[1], M) if args.chosen_pca else None]
        for V in args.V:
            for pca_dim in dims:
                try:
                    bench_cypq(M, args, xt, xb, xq, gt, rows, V=V, pca_dim=pca_dim, S=args.S)
                except ValueError as e:   # M does not divide the PCA's dimension
                    print(f"cypq M={M}, pca_dim={pca_dim}: skipped ({e})")
        if args.defaults:
            bench_cypq(M, args, xt, xb, xq, gt, rows, defaults=True, S=args.S)
        if faiss and not args.skip_faiss and args.S == 256:
            bench_faiss(M, args, xt, xb, xq, gt, rows, V=args.V[0])
    print("\n| system | setting | train s | encode 1M s | ms/query | R@1 | R@10 | R@100 |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
