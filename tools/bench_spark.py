"""Spark vs one machine on REALSIFT1M (or MANMINILM, ``--data``): LOPQ training and encoding
of the base; search; a k-NN graph.

    python tools/bench_spark.py [train] [--data DIR] [--master local[2]] [--V 1024] [--M 16]
    python tools/bench_spark.py search [--nq 10000] [--quota 3500] [--k 10]
    python tools/bench_spark.py knn-graph [--n 100000] [--V 256] [--quota 1000] [--k 10]

Writes the base as Parquet (id, vector array<float>) once, untimed.

train: times ``cypq.spark.train_lopq`` + ``cypq.spark.encode`` (to Parquet, range-partitioned
by cell) on the given master against ``LOPQModel.fit`` + ``predict`` in this process with all
cores, with the same settings (fine subquantizers on a 20% sample in both), and prints the
times and the two models' quantisation errors.

search: a model fitted on the learn set, the base encoded on Spark to Parquet codes and
split into a shard set (untimed); then ``Index.search`` of the queries in this process with
all cores (in-memory index) against ``cypq.spark.search`` on the master over the Parquet
codes and over the shard set (the result written as Parquet), results compared; where the
Spark tasks spent their time; a projection to N executors from those costs.

knn-graph: ``cypq.spark.knn_graph`` of the first n base vectors (encoding included) and its
recall@k against the exact graph (brute force in NumPy, untimed).
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
from _data import DEFAULT_DATA, load_set, recalls  # noqa: E402

import cypq  # noqa: E402


def errors(model, X):
    code = model.predict(X)
    C = np.concatenate([model.Cs[0][code.coarse[:, 0]], model.Cs[1][code.coarse[:, 1]]], 1)
    return (float(((X - C) ** 2).sum(1).mean()),
            float(((X - model.reconstruct(code)) ** 2).sum(1).mean()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", nargs="?", choices=("train", "search", "knn-graph"), default="train")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--V", type=int, default=1024)
    p.add_argument("--M", type=int, default=16)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--dir", help="work directory (default: a temporary one)")
    p.add_argument("--nq", type=int, default=10000)
    p.add_argument("--quota", type=int, default=None, help="search: 3500; knn-graph: 1000")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--n", type=int, default=100_000, help="knn-graph: vectors")
    args = p.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="cypq-spark-")
    xb = load_set(args.data, 1)[1]   # REALSIFT1M, or a float16 set such as MANMINILM
    vec_path = write_vectors(os.path.join(root, "base.parquet"), xb)
    try:
        {"train": bench_train, "search": bench_search, "knn-graph": bench_knn_graph}[
            args.what](args, root, xb, vec_path)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


def write_vectors(path: str, X: np.ndarray, ids=None) -> str:
    """X as Parquet (id long, vector array<float>) at path, unless it is there already."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if not os.path.exists(path):
        ids = np.arange(len(X)) if ids is None else ids
        pq.write_table(pa.table({"id": pa.array(ids, pa.int64()),
                                 "vector": pa.FixedSizeListArray.from_arrays(
                                     pa.array(X.ravel()), X.shape[1]).cast(
                                     pa.list_(pa.float32()))}), path, row_group_size=65536)
    return path


def spark_session(master: str):
    from pyspark.sql import SparkSession
    spark = (SparkSession.builder.master(master).appName("cypq bench")
             .config("spark.driver.memory", "8g").config("spark.ui.enabled", "false")
             .config("spark.driver.maxResultSize", "4g").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def bench_train(args, root, xb, vec_path):
    import cypq.spark as cs
    rows = []
    warnings.simplefilter("ignore", RuntimeWarning)
    # one machine
    t0 = time.perf_counter()
    local = cypq.LOPQModel(V=args.V, M=args.M).fit(xb, subquantizer_sample_ratio=0.2,
                                                     random_state=0)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    local.predict(xb)
    t_enc = time.perf_counter() - t0
    rows.append(("one machine (LOPQModel.fit / predict, 2 threads)", t_fit, t_enc,
                 errors(local, xb)))
    print(rows[-1], flush=True)
    spark = spark_session(args.master)
    try:
        df = spark.read.parquet(vec_path).repartition(args.partitions)
        t0 = time.perf_counter()
        model = cs.train_lopq(df, V=args.V, M=args.M, sample_fraction=0.2, seed=0,
                              verbose=True)
        t_fit = time.perf_counter() - t0
        out = os.path.join(root, "codes")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        cs.encode(df, model, path=out, num_partitions=args.partitions)
        t_enc = time.perf_counter() - t0
        rows.append((f"Spark {args.master}, {args.partitions} partitions (train_lopq / "
                     "encode to Parquet)", t_fit, t_enc, errors(model, xb)))
        print(rows[-1], flush=True)
    finally:
        spark.stop()
    print(f"\nREALSIFT1M base (1M x 128), V={args.V}, M={args.M}:\n")
    print("| where | train | encode | coarse error | fine error |")
    print("|---|---|---|---|---|")
    for name, tf, te, (ce, fe) in rows:
        print(f"| {name} | {tf:.1f} s | {te:.1f} s | {ce:,.0f} | {fe:,.0f} |")


def _read_results(path: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(D, I) of a Spark search written as Parquet, rows in query-id order 0..n-1."""
    import pyarrow.parquet as pq
    t = pq.read_table(path).sort_by("query_id")
    assert t.column("query_id").to_numpy().tolist() == list(range(n))
    return (np.stack(t.column("distances").to_numpy(zero_copy_only=False)).astype(np.float32),
            np.stack(t.column("ids").to_numpy(zero_copy_only=False)).astype(np.int64))


def bench_search(args, root, xb, vec_path):
    import cypq.spark as cs
    from cypq.bulk import bulk_load
    from cypq.code_files import CodeSource
    from cypq.shards import split
    quota = args.quota or 3500
    xt, _, xq, gt = load_set(args.data, args.nq)
    warnings.simplefilter("ignore", RuntimeWarning)
    model = cypq.LOPQModel(V=args.V, M=args.M).fit(xt, random_state=0)
    q_path = write_vectors(os.path.join(root, f"queries{len(xq)}.parquet"), xq)
    spark = spark_session(args.master)
    try:
        codes = os.path.join(root, "codes")
        shutil.rmtree(codes, ignore_errors=True)
        cs.encode(spark.read.parquet(vec_path).repartition(args.partitions), model,
                  path=codes, num_partitions=args.partitions)
        ix = cypq.Index.in_memory(model)
        ix.add(xb, np.arange(len(xb)))
        shard_dir = os.path.join(root, "shards")
        shutil.rmtree(shard_dir, ignore_errors=True)
        bulk_load(os.path.join(root, "whole"), CodeSource.open(codes), model, progress=False,
                  out=lambda s: None)
        with cypq.Index.open(os.path.join(root, "whole"), readonly=True) as whole:
            split(whole, shard_dir, args.shards).close()
        shutil.rmtree(os.path.join(root, "whole"))
        # one process, all cores (best of 2)
        best = np.inf
        for _ in range(2):
            t0 = time.perf_counter()
            D, I = ix.search(xq, k=args.k, quota=quota)
            best = min(best, time.perf_counter() - t0)
        rec = recalls(I, gt, (1, 10) if args.k >= 10 else (1,))
        print(f"one process: {best:.2f} s, {len(xq) / best:,.0f} queries/s, recall {rec}",
              flush=True)
        queries = spark.read.parquet(q_path).repartition(2)
        queries.cache().count()
        rows = [("one process, Index.search, 2 threads (in-memory index)", best, None, 1.0)]
        for name, corpus, mdl in (("Parquet codes", codes, model),
                                  (f"a shard set of {args.shards}", shard_dir, None)):
            out = os.path.join(root, "result")
            for rep in range(2):   # the first warms the Python workers up
                shutil.rmtree(out, ignore_errors=True)
                timings = {}
                t0 = time.perf_counter()
                cs.search(queries, corpus, mdl, k=args.k, quota=quota, path=out,
                          spark=spark, timings=timings)
                wall = time.perf_counter() - t0
            Ds, Is = _read_results(out, len(xq))
            same = float(np.mean((Is == I).all(1)))
            spent = {k: v.value for k, v in timings.items()}
            print(f"Spark {args.master} over {name}: {wall:.2f} s, identical rows {same:.4f}, "
                  f"task seconds {spent}", flush=True)
            rows.append((f"Spark {args.master}, cypq.spark.search over {name}", wall, spent,
                         same))
    finally:
        spark.stop()
    print(f"\n{os.path.basename(os.path.normpath(str(args.data)))}: {len(xq):,} queries over "
          f"the {len(xb):,} base vectors (D={xb.shape[1]}), V={args.V}, M={args.M}, "
          f"quota {quota}, k={args.k}, recall@10 {rec.get(10, float('nan')):.3f}:\n")
    print("| where | wall s | queries/s | share of one process | identical results | "
          "task s: route / load / scan / merge |")
    print("|---|---|---|---|---|---|")
    for name, wall, spent, same in rows:
        tasks = "" if spent is None else " / ".join(
            f"{spent[k]:.2f}" for k in ("route", "load", "scan", "merge"))
        print(f"| {name} | {wall:.2f} | {len(xq) / wall:,.0f} | {best / wall:.0%} | "
              f"{same:.2%} | {tasks} |")
    # projection: the measured task seconds per query and per part, spread over N executors
    spent = rows[1][2]
    per_query = (spent["route"] + spent["scan"] + spent["merge"]) / len(xq)
    fixed = rows[1][1] - sum(spent.values()) / 2   # what two busy cores do not explain
    load = spent["load"] * 1e6 / len(xb)            # per 1M codes
    print(f"\nProjection (Parquet codes; per query {per_query * 1e3:.3f} ms of task time, "
          f"load {load:.2f} s per 1M codes, {fixed:.2f} s fixed per job):\n")
    print("| executors x 4 cores | 10k queries, 1M codes | 1M queries, 1M codes | "
          "1M queries, 100M codes |")
    print("|---|---|---|---|")
    for n in (1, 4, 16, 64):
        cores = 4 * n
        cells = []
        for nq, scale in ((1e4, 1), (1e6, 1), (1e6, 100)):
            # scan time per query grows with the quota, not the corpus (same quota); each
            # executor loads its share of the codes once
            t = fixed + nq * per_query / cores + load * scale / cores
            cells.append(f"{t:,.1f} s")
        print(f"| {n} x 4 | " + " | ".join(cells) + " |")


def bench_knn_graph(args, root, xb, vec_path):
    import cypq.spark as cs
    quota = args.quota or 1000
    xt = load_set(args.data, 1)[0]
    X = np.ascontiguousarray(xb[:args.n])
    warnings.simplefilter("ignore", RuntimeWarning)
    model = cypq.LOPQModel(V=args.V, M=args.M).fit(xt, random_state=0)
    path = write_vectors(os.path.join(root, f"items{len(X)}.parquet"), X)
    # exact graph by brute force, in blocks (untimed; kept in the work directory)
    exact = os.path.join(root, f"exact{len(X)}k{args.k}.npy")
    if os.path.exists(exact):
        truth = np.load(exact)
    else:
        t0 = time.perf_counter()
        sq = (X.astype(np.float64) ** 2).sum(1).astype(np.float32)
        truth = np.empty((len(X), args.k), np.int64)
        for a in range(0, len(X), 2000):
            d = sq[a:a + 2000, None] - 2 * X[a:a + 2000] @ X.T + sq[None, :]
            d[np.arange(len(d)), np.arange(a, a + len(d))] = np.inf   # not itself
            truth[a:a + 2000] = np.argpartition(d, args.k, axis=1)[:, :args.k]
        np.save(exact, truth)
        print(f"exact graph: {time.perf_counter() - t0:.1f} s", flush=True)
    spark = spark_session(args.master)
    try:
        items = spark.read.parquet(path).repartition(args.partitions)
        out = os.path.join(root, "graph")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        cs.knn_graph(items, model, k=args.k, quota=quota, path=out, spark=spark,
                     num_partitions=args.partitions)
        wall = time.perf_counter() - t0
    finally:
        spark.stop()
    _, G = _read_results(out, len(X))
    hit = np.mean([len(np.intersect1d(G[j], truth[j])) for j in range(len(X))]) / args.k
    print(f"\nk-NN graph of {len(X):,} vectors of {os.path.basename(str(args.data))} "
          f"(k={args.k}, V={args.V}, "
          f"M={args.M}, quota {quota}) on Spark {args.master}: {wall:.1f} s including "
          f"encoding, recall@{args.k} against the exact graph {hit:.3f}")


if __name__ == "__main__":
    main()
