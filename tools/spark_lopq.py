"""Train an LOPQ model, encode vectors and search on Spark; the codes feed ``cypq build``.

    spark-submit tools/spark_lopq.py train  --input VECTORS --V 1024 --M 16 --model-out m.lopq
    spark-submit tools/spark_lopq.py encode --input VECTORS --model m.lopq --output codes/
    spark-submit tools/spark_lopq.py search --input QUERIES --codes codes/ --model m.lopq \
        --k 10 --quota 5000 --output results/
    spark-submit tools/spark_lopq.py knn-graph --input VECTORS --model m.lopq --k 10 \
        --output graph/
    cypq build my-index codes/ --model m.lopq [--shards N]

(``search --codes`` also takes a shard set: ``cypq build --shards``'s directory.)

(``python tools/spark_lopq.py ... --master local[2]`` works too.) VECTORS is Parquet with an id
column (long) and a vector column (array<float> or an ML Vector), or, with
``--format lopq-text``, the LOPQ Spark scripts' text format (``id<TAB>base64(pickle)``).
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="spark_lopq.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--input", required=True, help="Parquet vectors or LOPQ text")
    common.add_argument("--format", choices=["parquet", "lopq-text"], default="parquet")
    common.add_argument("--id-col", default="id")
    common.add_argument("--vector-col", default="vector")
    common.add_argument("--master", help="Spark master (default: spark-submit's)")
    common.add_argument("--partitions", type=int, help="repartition the input")
    t = sub.add_parser("train", parents=[common], help="train a model")
    t.add_argument("--V", type=int, default=None, help="default: as cypq.LOPQModel chooses")
    t.add_argument("--M", type=int, required=True)
    t.add_argument("--S", type=int, default=256)
    t.add_argument("--pca", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--pca-dim", type=int, default=None, help="keep this many PCA directions")
    t.add_argument("--metric", choices=("l2", "cosine", "ip"), default="l2")
    t.add_argument("--sample-fraction", type=float)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--coarse-iters", type=int, default=10)
    t.add_argument("--local-iters", type=int, default=20)
    t.add_argument("--resume", help="a partly trained model (.lopq): train only what it lacks")
    t.add_argument("--model-out", required=True, help="where to write the model (.lopq)")
    e = sub.add_parser("encode", parents=[common], help="encode vectors to Parquet codes")
    e.add_argument("--model", required=True, help=".lopq model")
    e.add_argument("--output", required=True, help="Parquet directory of codes")
    e.add_argument("--out-partitions", type=int, help="output files (default: input's)")
    q = sub.add_parser("search", parents=[common], help="k nearest codes of each query")
    q.add_argument("--codes", required=True, help="Parquet codes (encode's) or a shard set")
    q.add_argument("--model", help=".lopq model (for Parquet codes)")
    g = sub.add_parser("knn-graph", parents=[common], help="k nearest other items of each")
    g.add_argument("--model", required=True, help=".lopq model")
    g.add_argument("--codes-path", help="where the items' codes go (default: a temporary "
                   "directory; on a cluster, one every executor reads)")
    for a in (q, g):
        a.add_argument("--k", type=int, default=10)
        a.add_argument("--quota", type=int, default=None, help="candidates (default 10000)")
        a.add_argument("--scan-partitions", type=int, help="scan tasks over Parquet codes")
        a.add_argument("--output", required=True, help="Parquet directory of the results")
    args = p.parse_args(argv)

    from pyspark.sql import SparkSession

    import cypq
    import cypq.spark as cs
    builder = SparkSession.builder.appName(f"cypq {args.step}")
    if args.master:
        builder = builder.master(args.master)
    spark = builder.getOrCreate()
    try:
        if args.format == "parquet":
            data = spark.read.parquet(args.input)
        else:
            data = cs.read_lopq_text(spark.sparkContext, args.input)
        if args.partitions:
            data = data.repartition(args.partitions)
        t0 = time.perf_counter()
        if args.step == "train":
            resume = cypq.LOPQModel.load_proto(args.resume) if args.resume else None
            model = cs.train_lopq(data, V=args.V, M=args.M, subquantizer_clusters=args.S,
                                  pca=args.pca, pca_dim=args.pca_dim, metric=args.metric,
                                  sample_fraction=args.sample_fraction,
                                  seed=args.seed, kmeans_coarse_iters=args.coarse_iters,
                                  kmeans_local_iters=args.local_iters, model=resume,
                                  id_col=args.id_col, vector_col=args.vector_col, verbose=True)
            model.export_proto(args.model_out)
            print(f"trained in {time.perf_counter() - t0:.1f} s: {args.model_out}")
        elif args.step == "encode":
            model = cypq.LOPQModel.load_proto(args.model)
            cs.encode(data, model, path=args.output, id_col=args.id_col,
                      vector_col=args.vector_col, num_partitions=args.out_partitions)
            print(f"encoded in {time.perf_counter() - t0:.1f} s: {args.output}")
        else:
            model = cypq.LOPQModel.load_proto(args.model) if args.model else None
            kw = dict(k=args.k, quota=args.quota, path=args.output, id_col=args.id_col,
                      vector_col=args.vector_col, num_partitions=args.scan_partitions)
            if args.step == "search":
                cs.search(data, args.codes, model, **kw)
            else:
                cs.knn_graph(data, model, codes_path=args.codes_path, **kw)
            print(f"{args.step} in {time.perf_counter() - t0:.1f} s: {args.output}")
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
