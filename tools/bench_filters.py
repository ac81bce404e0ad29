"""Filtered search on REALSIFT1M (1M): tags drawn at random at selectivities 50%, 10%, 1%,
0.1%, and an id list of 1,000, each against the exact filtered ground truth, side by side with
faiss IVF1024,PQ16 searched with an IDSelector and LanceDB IVF_PQ with a pre-filter.

    python tools/bench_filters.py [--data DIR] [--nq 1000] [--V 1024] [--M 16]
        [--quotas 250 500 1000 2000 3500 7000] [--nprobes 8 16 32 64 128] [--skip-faiss]
        [--skip-lancedb] [--lance-nq 200] [--work DIR]

cypq: an LOPQ model (V, M; 8-bit codes, the README's 16-byte setting), a bulk-built on-disk
index keeping tags (bit j set on each entry with probability 0.5, 0.1, 0.01, 0.001 for
j = 0..3), searched with 1 thread, k=10, per quota: unfiltered (its own ground truth), then
each filter with plan 'auto' (and the plan it picked: 'direct' when no cell was scanned).
faiss: IVF1024,PQ16 with ``SearchParametersIVF(sel=IDSelectorBitmap)`` per nprobe, 1 thread.
LanceDB: IVF_PQ (1024 partitions, 16 sub-vectors: 16 B) with a boolean column per tag and
``where(..., prefilter=True)`` (the id list as ``id IN (...)``), one query per call,
``--lance-nq`` queries. The filtered ground truth: exact L2 top 10 among the passing vectors
(faiss's flat search on them). ``--data ../shared/data/manminilm`` runs the 384-d set.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_codecs.py

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _data import DEFAULT_DATA, Timer, best_of, load_set  # noqa: E402

import cypq  # noqa: E402
from cypq.bulk import bulk_load  # noqa: E402
from cypq.vector_files import VectorSource  # noqa: E402

K = 10
BITS = (0.5, 0.1, 0.01, 0.001)
HEAD = ("| filter | system | setting | plan | ms/query | recall@10 | 10-recall@10 |\n"
        "|---|---|---|---|---|---|---|")


def recall10(I, gt) -> tuple[float, float]:
    """(recall@10 as in the PQ paper and the README: share of queries whose true nearest
    passing vector is among the 10 returned; share of the true 10 nearest among them)."""
    nn = float(np.mean([g[0] in set(a.tolist()) for a, g in zip(I, gt)]))
    overlap = float(np.mean([len(set(a[a >= 0].tolist()) & set(g[g >= 0].tolist()))
                             / max(1, min(K, (g >= 0).sum())) for a, g in zip(I, gt)]))
    return nn, overlap


def make_filters(n: int, seed: int = 7):
    """(tags (n,) uint64, {name: (passing mask (n,) bool, cypq kwargs, LanceDB where)})."""
    rng = np.random.default_rng(seed)
    tags = np.zeros(n, np.uint64)
    out = {}
    for j, p in enumerate(BITS):
        on = rng.random(n) < p
        tags[on] |= np.uint64(1 << j)
        out[f"tag {p:.1%}"] = (on, {"tags_any": 1 << j}, f"t{j} = true")
    ids = np.sort(rng.choice(n, 1000, replace=False))
    mask = np.zeros(n, bool)
    mask[ids] = True
    out["1,000 ids"] = (mask, {"ids": ids},
                        "id IN (" + ",".join(map(str, ids.tolist())) + ")")
    return tags, out


def exact_truth(xb, xq, mask):
    """Exact L2 top K of each query among xb[mask] (ids into xb)."""
    import faiss
    faiss.omp_set_num_threads(2)
    pos = np.flatnonzero(mask)
    flat = faiss.IndexFlatL2(xb.shape[1])
    for a in range(0, len(pos), 200_000):
        flat.add(np.ascontiguousarray(xb[pos[a:a + 200_000]], dtype=np.float32))
    _, I = flat.search(xq, K)
    faiss.omp_set_num_threads(1)
    return np.where(I >= 0, pos[np.maximum(I, 0)], -1)


def row(name, system, setting, plan, ms, rec):
    return f"| {name} | {system} | {setting} | {plan} | {ms:.3f} | {rec[0]:.3f} | {rec[1]:.3f} |"


def bench_cypq(args, xt, xq, gts, filters, tags, work):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with Timer() as t:
            model = cypq.LOPQModel(V=args.V, M=args.M).fit(xt, random_state=1)
    print(f"cypq: trained V={args.V}, M={args.M} in {t.s:.1f} s", flush=True)
    path = os.path.join(work, "ix")
    src = VectorSource.open(base_file(args.data))
    with Timer() as t:
        bulk_load(path, src, model, progress=False, out=lambda m: None, tags=tags)
    print(f"cypq: bulk-built with tags in {t.s:.1f} s", flush=True)
    table = []
    with cypq.Index.open(path, readonly=True, n_threads=1) as index:
        for name, gt in gts.items():
            kw = {} if name == "none" else filters[name][1]
            for quota in args.quotas:
                index.search(xq[:50], k=K, quota=quota, **kw)   # warm up
                s, (_, I, st) = best_of(lambda: index.search(
                    xq, k=K, quota=quota, return_stats=True, **kw), 2)
                plan = "-" if name == "none" else "direct" if st.direct.all() else \
                    "scan" if not st.direct.any() else "mixed"
                table.append(row(name, f"cypq LOPQ V={args.V} M={args.M}",
                                 f"quota={quota}", plan, s / len(xq) * 1e3, recall10(I, gt)))
                print(table[-1], flush=True)
    shutil.rmtree(path)
    return table


def bench_faiss(args, xt, xb, xq, gts, filters):
    import faiss
    faiss.omp_set_num_threads(2)
    with Timer() as t:
        index = faiss.index_factory(xb.shape[1], f"IVF1024,PQ{args.M}")
        index.train(xt)
        index.add(xb)
    faiss.omp_set_num_threads(1)
    print(f"faiss IVF1024,PQ{args.M}: built in {t.s:.1f} s", flush=True)
    table = []
    for name, gt in gts.items():
        sel = None
        if name != "none":
            bits = np.packbits(filters[name][0], bitorder="little")
            sel = faiss.IDSelectorBitmap(len(xb), faiss.swig_ptr(bits))
        for nprobe in args.nprobes:
            params = faiss.SearchParametersIVF(nprobe=nprobe, sel=sel)
            index.search(xq[:50], K, params=params)
            s, (_, I) = best_of(lambda: index.search(xq, K, params=params), 2)
            table.append(row(name, f"faiss IVF1024,PQ{args.M} + IDSelector",
                             f"nprobe={nprobe}", "-", s / len(xq) * 1e3, recall10(I, gt)))
            print(table[-1], flush=True)
    return table


def bench_lancedb(args, xb, xq, gts, filters, work):
    import lancedb
    import pyarrow as pa
    nq = min(len(xq), args.lance_nq)
    path = os.path.join(work, "lance")
    cols = {"id": np.arange(len(xb)),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(xb.ravel()), xb.shape[1])}
    for j in range(len(BITS)):
        cols[f"t{j}"] = filters[f"tag {BITS[j]:.1%}"][0]
    with Timer() as t:
        db = lancedb.connect(path)
        tbl = db.create_table("v", pa.table(cols))
        tbl.create_index(metric="l2", num_partitions=1024, num_sub_vectors=args.M,
                         index_type="IVF_PQ")
    print(f"LanceDB IVF_PQ 1024 x {args.M}: built in {t.s:.1f} s", flush=True)
    table = []
    for name, gt in gts.items():
        where = None if name == "none" else filters[name][2]
        for nprobes in args.nprobes[:4]:
            def run():
                out = np.full((nq, K), -1, dtype=np.int64)
                for j in range(nq):
                    q = tbl.search(xq[j]).limit(K).nprobes(nprobes)
                    if where:
                        q = q.where(where, prefilter=True)
                    ids = q.select(["id", "_distance"]).to_arrow()["id"].to_numpy()
                    out[j, :len(ids)] = ids
                return out
            run()
            s, I = best_of(run, 1)
            table.append(row(name, "LanceDB IVF_PQ + prefilter", f"nprobes={nprobes}", "-",
                             s / nq * 1e3, recall10(I, gt[:nq])))
            print(table[-1], flush=True)
    return table


def base_file(data) -> str:
    u8 = os.path.join(str(data), "base.u8.npy")
    return u8 if os.path.exists(u8) else os.path.join(str(data), "base.f16.npy")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--nq", type=int, default=1000)
    p.add_argument("--V", type=int, default=1024)
    p.add_argument("--M", type=int, default=16)
    p.add_argument("--quotas", type=int, nargs="+", default=[250, 500, 1000, 2000, 3500, 7000])
    p.add_argument("--nprobes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--lance-nq", type=int, default=200)
    p.add_argument("--skip-faiss", action="store_true")
    p.add_argument("--skip-lancedb", action="store_true")
    p.add_argument("--work", help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    xt, xb, xq, _ = load_set(args.data, args.nq)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    xt, xq = (np.ascontiguousarray(a, dtype=np.float32) for a in (xt, xq))
    tags, filters = make_filters(len(xb))
    with Timer() as t:
        gts = {"none": exact_truth(xb, xq, np.ones(len(xb), bool))}
        for name, (mask, _, _) in filters.items():
            gts[name] = exact_truth(xb, xq, mask)
    print(f"{len(xb):,} base, {len(xq)} queries; filtered ground truth in {t.s:.1f} s; "
          "passing: " + ", ".join(f"{n} {m.sum():,}" for n, (m, _, _) in filters.items()),
          flush=True)
    work = args.work or tempfile.mkdtemp(prefix="cypq-filters-")
    os.makedirs(work, exist_ok=True)
    try:
        tables = [bench_cypq(args, xt, xq, gts, filters, tags, work)]
        if not args.skip_faiss:
            tables.append(bench_faiss(args, xt, xb, xq, gts, filters))
        if not args.skip_lancedb:
            try:
                tables.append(bench_lancedb(args, xb, xq, gts, filters, work))
            except ImportError:
                print("LanceDB skipped: pip install lancedb", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(HEAD)
    for table in tables:
        print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
