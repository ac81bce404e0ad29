"""Spark vs one machine on REALSIFT1M: LOPQ training and encoding of the 1M base.

    python tools/bench_spark.py [--data DIR] [--master local[2]] [--V 1024] [--M 16]

Writes the base as Parquet (id, vector array<float>) once, untimed; then times
``cypq.spark.train_lopq`` + ``cypq.spark.encode`` (to Parquet, range-partitioned by cell) on
the given master against ``LOPQModel.fit`` + ``predict`` in this process with all cores, with
the same settings (fine subquantizers on a 20% sample in both), and prints the times and the
two models' quantisation errors.
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
from _data import DEFAULT_DATA  # noqa: E402

import cypq  # noqa: E402


def errors(model, X):
    code = model.predict(X)
    C = np.concatenate([model.Cs[0][code.coarse[:, 0]], model.Cs[1][code.coarse[:, 1]]], 1)
    return (float(((X - C) ** 2).sum(1).mean()),
            float(((X - model.reconstruct(code)) ** 2).sum(1).mean()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--V", type=int, default=1024)
    p.add_argument("--M", type=int, default=16)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--dir", help="work directory (default: a temporary one)")
    args = p.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql import SparkSession

    import cypq.spark as cs
    root = args.dir or tempfile.mkdtemp(prefix="cypq-spark-")
    xb = np.load(os.path.join(str(args.data), "base.u8.npy")).astype(np.float32)
    vec_path = os.path.join(root, "base.parquet")
    if not os.path.exists(vec_path):
        pq.write_table(pa.table({"id": pa.array(np.arange(len(xb)), pa.int64()),
                                 "vector": pa.FixedSizeListArray.from_arrays(
                                     pa.array(xb.ravel()), xb.shape[1]).cast(
                                     pa.list_(pa.float32()))}), vec_path, row_group_size=65536)
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
    spark = (SparkSession.builder.master(args.master).appName("cypq bench")
             .config("spark.driver.memory", "8g").config("spark.ui.enabled", "false")
             .config("spark.driver.maxResultSize", "4g").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
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
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
