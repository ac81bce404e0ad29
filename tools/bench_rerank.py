"""Exact re-ranking with the vectors an index keeps, on REALSIFT1M (1M), side by side with
faiss IVF-PQ + refine and LanceDB IVF_PQ with refine_factor.

    python tools/bench_rerank.py [--data DIR] [--nq 1000] [--vectors uint8 float16]
        [--V 256] [--M 32 64] [--S 16] [--quotas 2000 5000 10000 20000]
        [--reranks 0 50 100 200] [--cold-quota 10000] [--cold-nq 200] [--skip-faiss]
        [--skip-lancedb] [--skip-diskann] [--diskann-Ls 10 20 40 80 160] [--repeat 3]
        [--work DIR]

cypq: an LOPQ model per --M (default 4-bit codes, the fast scan: 16 and 32 bytes), bulk-built
on-disk indexes keeping no vectors and each --vectors kind; warm search (1 thread, best of
--repeat runs over nq queries, every system alike) per quota and rerank (k=100 without
re-ranking, k=10 with); cold search
(the index files dropped from the page cache, a fresh process, cold-nq queries) with and
without rerank 100; disk bytes per vector; the searching process's RssAnon; the rebuild of the
first index keeping vectors, training a new model and with one given. faiss: IVF1024,PQ32x4fs (16 B,
its fastest scan) refined by an SQ8 copy of the vectors (the bytes of cypq's uint8), in RAM.
LanceDB: IVF_PQ (1024 partitions, 16 sub-vectors: 16 B) with refine_factor (the full vectors
read from its files), one query per call as its API takes them. DiskANN: its static disk
index (graph degree 64, full vectors on disk, PQ codes of 16 B per vector in RAM), built and
searched (one query per call, 1 thread, k=10, beam width 2, complexity --diskann-Ls) by
tools/_diskann_peer.py in a virtualenv this script makes (--diskann-venv; diskannpy needs
NumPy 1.x); with --work its index is kept for the next run. ``--data ../shared/data/manminilm``
runs the same on the 384-d text embeddings (float vectors: give ``--vectors float16
float32``; no cold run, which reads SIFT's query file).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_codecs.py

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _data import (DEFAULT_DATA, Timer, best_of, cold_child, load_queries,  # noqa: E402
                   load_set, recalls)

import cypq  # noqa: E402
from cypq.bulk import bulk_load, rss_anon_mb  # noqa: E402
from cypq.rebuild import rebuild  # noqa: E402
from cypq.vector_files import VectorSource  # noqa: E402

HEAD = ("| system | setting | R | ms/query | recall@1 | recall@10 | recall@100 |\n"
        "|---|---|---|---|---|---|---|")


def line(system, setting, R, ms, rec):
    r = [f"{rec[x]:.3f}" if x in rec else "-" for x in (1, 10, 100)]
    return f"| {system} | {setting} | {R} | {ms:.3f} | " + " | ".join(r) + " |"


def dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def child(path, data, nq, quota, rerank) -> dict:
    """A fresh process: open, search cold, then warm; times and memory."""
    xq, gt = load_queries(data, nq)
    out = {}
    index = cypq.Index.open(path, readonly=True, n_threads=1)
    out["rss_open"] = rss_anon_mb()
    k = 100 if not rerank else 10
    with Timer() as t:
        _, I = index.search(xq, k=k, quota=quota, rerank=rerank or None)
    out["cold_ms"] = t.s / nq * 1e3
    out["rss_search"] = rss_anon_mb()
    out["recall"] = recalls(I, gt)
    with Timer() as t:
        index.search(xq, k=k, quota=quota, rerank=rerank or None)
    out["warm_ms"] = t.s / nq * 1e3
    return out


def lancedb_child(path, data, nq) -> dict:
    """A fresh process searching the LanceDB table in ``path`` as bench_lancedb does (nprobes
    32, refine_factor 5): its RssAnon, and what importing lancedb, opening and searching add."""
    xq, _ = load_queries(data, nq)
    out = {"rss_start": rss_anon_mb()}
    import lancedb
    out["rss_import"] = rss_anon_mb()
    tbl = lancedb.connect(path).open_table("sift")
    out["rss_open"] = rss_anon_mb()
    for j in range(nq):
        q = tbl.search(xq[j]).limit(10).nprobes(32).refine_factor(5)
        q.select(["id", "_distance"]).to_arrow()
    out["rss_search"] = rss_anon_mb()
    return out


def base_file(data) -> str:
    """The base vectors of a data set directory (REALSIFT1M's uint8, else float16)."""
    u8 = os.path.join(str(data), "base.u8.npy")
    return u8 if os.path.exists(u8) else os.path.join(str(data), "base.f16.npy")


def cold_run(path, args, rerank):
    return cold_child(path, __file__, "--data", args.data, "--nq", args.cold_nq,
                      "--cold-quota", args.cold_quota, "--reranks", rerank)


def bench_cypq(args, M, xt, xq, gt, work, lines):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with Timer() as t:
            model = cypq.LOPQModel(V=args.V, M=M, subquantizer_clusters=args.S
                                   ).fit(xt, random_state=1)
    name = f"cypq M={M}x{args.S.bit_length() - 1}"
    lines.append(f"{name}: trained V={args.V} in {t.s:.1f} s")
    src = VectorSource.open(base_file(args.data))
    sizes = {}
    table = []
    for kind in ["none"] + args.vectors:
        path = os.path.join(work, f"ix-{M}-{kind}")
        shutil.rmtree(path, ignore_errors=True)   # one left in --work would be reused, not timed
        with Timer() as t:
            bulk_load(path, src, model, progress=False, out=lambda m: None, vectors=kind)
        sizes[kind] = dir_bytes(path)
        lines.append(f"{name} build, vectors={kind}: {t.s:.1f} s, {sizes[kind] / 1e6:.0f} MB "
                     f"on disk ({sizes[kind] / len(src):.0f} B/vector"
                     + (f", the vectors {(sizes[kind] - sizes['none']) / len(src):.0f} B/vector"
                        if kind != "none" else "") + ")")
        with cypq.Index.open(path, readonly=True, n_threads=1) as index:
            for quota in args.quotas:
                for R in ([0] if kind == "none" else [r for r in args.reranks if r]):
                    k = 100 if not R else 10
                    index.search(xq[:20], k=k, quota=quota, rerank=R or None)
                    s, (_, I) = best_of(lambda: index.search(xq, k=k, quota=quota,
                                                             rerank=R or None), args.repeat)
                    table.append(line(f"{name} vectors={kind}", f"quota={quota}", R,
                                      s / len(xq) * 1e3, recalls(I, gt)))
                    print(table[-1], flush=True)
        if kind == args.vectors[0] and M == args.M[0]:
            with cypq.Index.open(path, readonly=True) as old:
                for given in (None, model):
                    with Timer() as t:
                        rebuild(old, path + "-rebuilt", given, progress=False,
                                out=lambda m: None)
                    shutil.rmtree(path + "-rebuilt")
                    lines.append(f"{name} rebuild of the {len(src):,}-vector vectors={kind} index "
                                 + ("(training a new model on 100,000 stored vectors)"
                                    if given is None else "(model given)")
                                 + f": {t.s:.1f} s")
                    print(lines[-1], flush=True)
        if kind == args.vectors[0] and args.cold_nq:
            for R in (0, 100):
                c = cold_run(path, args, R)
                lines.append(f"{name} vectors={kind} quota={args.cold_quota} rerank {R}: cold "
                             f"{c['cold_ms']:.2f} ms/q, warm {c['warm_ms']:.3f} ms/q "
                             f"(recall@1 {c['recall']['1']:.3f}, recall@10 "
                             f"{c['recall']['10']:.3f}); RssAnon after open "
                             f"{c['rss_open']:.0f} MB, after the search {c['rss_search']:.0f} MB")
                print(lines[-1], flush=True)
        shutil.rmtree(path)
    return table


def bench_faiss(args, xt, xb, xq, gt, work=None):
    import faiss
    faiss.omp_set_num_threads(1)
    table = []
    with Timer() as t:
        index = faiss.index_factory(xb.shape[1], "IVF1024,PQ32x4fs,Refine(SQ8)")
        faiss.omp_set_num_threads(2)
        index.train(xt)
        index.add(xb)
        faiss.omp_set_num_threads(1)
    size = len(faiss.serialize_index(index))
    print(f"faiss IVF1024,PQ32x4fs,Refine(SQ8): built in {t.s:.1f} s, {size / 1e6:.0f} MB "
          "in RAM (serialized size)", flush=True)
    ivf = faiss.extract_index_ivf(index)
    for nprobe in (8, 16, 32, 64):
        ivf.nprobe = nprobe
        for R in [0] + [r for r in args.reranks if r]:
            k = 100 if not R else 10
            index.k_factor = max(1.0, R / k)
            s, (_, I) = best_of(lambda: index.search(xq, k), args.repeat)
            if not R:  # without refine: the base index alone
                s, (_, I) = best_of(lambda: index.base_index.search(xq, k), args.repeat)
            table.append(line("faiss IVF1024,PQ32x4fs,Refine(SQ8)", f"nprobe={nprobe}", R,
                              s / len(xq) * 1e3, recalls(I, gt)))
            print(table[-1], flush=True)
    return table, f"faiss: built in {t.s:.1f} s, {size / 1e6:.0f} MB in RAM"


def bench_lancedb(args, xt, xb, xq, gt, work):
    import lancedb
    import pyarrow as pa
    nq = min(len(xq), 200)
    path = os.path.join(work, "lance")
    with Timer() as t:
        db = lancedb.connect(path)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(xb.ravel()), xb.shape[1])
        tbl = db.create_table("sift", pa.table({"id": np.arange(len(xb)), "vector": vec}))
        tbl.create_index(metric="l2", num_partitions=1024, num_sub_vectors=16,
                         index_type="IVF_PQ")
    size = dir_bytes(path)
    head = f"LanceDB IVF_PQ 1024 partitions x 16 sub-vectors: built in {t.s:.1f} s, " \
        f"{size / 1e6:.0f} MB on disk"
    print(head, flush=True)
    table = []
    rss0 = rss_anon_mb()
    for nprobes in (8, 16, 32, 64):
        for R in [0] + [r for r in args.reranks if r]:
            k = 100 if not R else 10

            def run():
                out = np.full((nq, k), -1, dtype=np.int64)
                for j in range(nq):
                    q = tbl.search(xq[j]).limit(k).nprobes(nprobes)
                    if R:
                        q = q.refine_factor(max(1, R // k))
                    ids = q.select(["id", "_distance"]).to_arrow()["id"].to_numpy()
                    out[j, :len(ids)] = ids
                return out
            run()
            s, I = best_of(run, args.repeat)
            table.append(line("LanceDB IVF_PQ", f"nprobes={nprobes}", R, s / nq * 1e3,
                              recalls(I, gt[:nq])))
            print(table[-1], flush=True)
    res = subprocess.run([sys.executable, __file__, "--lancedb-child", path, "--data", args.data,
                          "--nq", str(nq)], capture_output=True, text=True, check=True)
    m = json.loads(res.stdout.strip().splitlines()[-1])
    return table, head + f"; RssAnon of the searching process +{rss_anon_mb() - rss0:.0f} MB " \
        f"over the search ({nq} queries per point); of a fresh one searching it " \
        f"{m['rss_search']:.0f} MB ({m['rss_start']:.0f} before importing lancedb, " \
        f"+{m['rss_import'] - m['rss_start']:.0f} importing it, " \
        f"+{m['rss_open'] - m['rss_import']:.0f} opening the table, " \
        f"+{m['rss_search'] - m['rss_open']:.0f} searching)"


DISKANN_VENV = os.path.join(os.path.expanduser("~"), ".cache", "cypq-bench", "diskann-venv")


def diskann_python(venv: str) -> str:
    """The python of a virtualenv holding diskannpy and NumPy 1.x (made on first use: it
    cannot share cypq's, which has NumPy 2)."""
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "numpy<2", "diskannpy==0.7.0"],
                       check=True)   # the version whose hang _diskann_peer.py works around
    return py


def bench_diskann(args, xt, xb, xq, gt, work):
    """DiskANN's static disk index (full vectors on disk, PQ in RAM), in its own virtualenv
    (tools/_diskann_peer.py); the index is kept in ``work`` for later runs."""
    py = diskann_python(args.diskann_venv)
    name = os.path.basename(os.path.normpath(args.data))
    qfile, out = os.path.join(work, "queries.npy"), os.path.join(work, "diskann-ids.npz")
    np.save(qfile, xq)
    cmd = [py, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_diskann_peer.py"),
           "--base", base_file(args.data), "--queries", qfile, "--out", out,
           "--index", os.path.join(work, f"diskann-{name}"), "--nq", str(len(xq)),
           "--k", "10", "--pq-bytes", "16", "--repeat", str(args.repeat),
           "--Ls", *map(str, args.diskann_Ls)]
    subprocess.run(cmd, capture_output=True, check=True)
    with open(out + ".json") as f:
        res = json.load(f)
    ids = np.load(out)
    table = []
    for L, ms in res["ms"].items():
        table.append(line("DiskANN (R=64, PQ 16 B in RAM)", f"L={L}", "L", ms,
                          recalls(ids[f"L{L}"], gt)))
        print(table[-1], flush=True)
    built = ("built in {:.0f} s".format(res["build_s"]) if res["build_s"] is not None
             else "built by an earlier run")
    return table, (f"DiskANN static disk index (diskannpy 0.7, graph degree 64, build L 100, "
                   f"beam width 2): {built}, {res['disk_bytes'] / 1e6:.0f} MB on disk; "
                   f"RssAnon of the searching process {res['rss_anon_mb']:.0f} MB "
                   f"(+{res['rss_anon_index_mb']:.0f} from opening the index on)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--nq", type=int, default=1000)
    p.add_argument("--vectors", nargs="+", default=["uint8", "float16"])
    p.add_argument("--V", type=int, default=256)
    p.add_argument("--M", type=int, nargs="+", default=[32, 64])
    p.add_argument("--S", type=int, default=16)
    p.add_argument("--quotas", type=int, nargs="+", default=[2000, 5000, 10000, 20000])
    p.add_argument("--reranks", type=int, nargs="+", default=[0, 50, 100, 200])
    p.add_argument("--cold-quota", type=int, default=10000)
    p.add_argument("--cold-nq", type=int, default=200)
    p.add_argument("--skip-faiss", action="store_true")
    p.add_argument("--skip-lancedb", action="store_true")
    p.add_argument("--skip-diskann", action="store_true")
    p.add_argument("--diskann-Ls", type=int, nargs="+", default=[10, 20, 40, 80, 160])
    p.add_argument("--diskann-venv", default=DISKANN_VENV,
                   help="the virtualenv DiskANN runs in (made on first use)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed runs per point, the best reported (every system alike)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--lancedb-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.lancedb_child:
        print(json.dumps(lancedb_child(args.lancedb_child, args.data, args.nq)))
        return
    if args.child:
        print(json.dumps(child(args.child, args.data, args.nq, args.cold_quota,
                               args.reranks[0])))
        return
    xt, xb, xq, gt = load_set(args.data, args.nq)
    work = args.work or tempfile.mkdtemp(prefix="bench_rerank-")
    os.makedirs(work, exist_ok=True)
    lines = [f"{os.path.basename(os.path.normpath(args.data))}: {len(xb):,} base, {len(xq)} "
             "queries, 1 search thread"]
    if not os.path.exists(os.path.join(str(args.data), "query.u8.npy")):
        args.cold_nq = 0   # the cold run reads SIFT's query file
    try:
        table = [HEAD]
        for M in args.M:
            table += bench_cypq(args, M, xt, xq, gt, work, lines)
        for skip, peer, run in ((args.skip_faiss, "faiss", bench_faiss),
                                (args.skip_lancedb, "lancedb", bench_lancedb)):
            if skip:
                continue
            try:
                __import__(peer)
            except ImportError:
                package = {"faiss": "faiss-cpu"}.get(peer, peer)
                lines.append(f"{peer} is not installed: not run (pip install {package})")
                continue
            t, head = run(args, xt, xb, xq, gt, work)
            table += t
            lines.append(head)
        if not args.skip_diskann:
            try:
                t, head = bench_diskann(args, xt, xb, xq, gt, work)
                table += t
                lines.append(head)
            except (OSError, subprocess.CalledProcessError) as e:
                lines.append(f"DiskANN could not be run: {e}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("\n".join(lines))
    print()
    print("\n".join(table))


if __name__ == "__main__":
    main()
