"""cypq.spark on a local Spark (local[2]): the distributed training matches LOPQModel.fit, Spark
codes equal predict's, and an index bulk-loaded from Spark's Parquet equals one built in Python."""
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

pyspark = pytest.importorskip("pyspark")
pytest.importorskip("pyarrow")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("Spark needs Java", allow_module_level=True)

from cypq import Index, LOPQModel  # noqa: E402
from cypq.bulk import bulk_load  # noqa: E402
from cypq.code_files import CodeSource  # noqa: E402

from conftest import clustered  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession
    s = (SparkSession.builder.master("local[2]").appName("cypq-tests")
         .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "4")
         .getOrCreate())
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def data():
    X = clustered(12000, 32, n_clusters=40, seed=81)
    return X, clustered(40, 32, n_clusters=40, seed=82)


def _df(spark, X, ids=None, vector_type="array"):
    ids = np.arange(len(X)) if ids is None else ids
    if vector_type == "ml":
        from pyspark.ml.linalg import Vectors
        rows = [(int(i), Vectors.dense(x.astype(float))) for i, x in zip(ids, X)]
        return spark.createDataFrame(rows, ["id", "vector"]).repartition(3)
    rows = [(int(i), x.tolist()) for i, x in zip(ids, X)]
    return spark.createDataFrame(rows, "id long, vector array<float>").coalesce(3)


def _errors(model, X):
    """(coarse, fine) quantisation errors: mean squared distance to the coarse centroids and
    to the full reconstruction."""
    code = model.predict(X)
    Xp = X if model.pca_matrix is None else (X - model.pca_mean) @ model.pca_matrix
    C = np.concatenate([model.Cs[0][code.coarse[:, 0]], model.Cs[1][code.coarse[:, 1]]], 1)
    coarse = float(((Xp - C) ** 2).sum(1).mean())
    fine = float(((X - model.reconstruct(code)) ** 2).sum(1).mean())
    return coarse, fine


@pytest.mark.parametrize("pca", [False, True])
def test_spark_training_matches_local_fit(spark, data, pca):
    from cypq.spark import train_lopq
    X, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sm = train_lopq(_df(spark, X), V=16, M=8, subquantizer_clusters=32, pca=pca, seed=4,
                        sample_fraction=1.0, kmeans_coarse_iters=8, kmeans_local_iters=8)
        lm = LOPQModel(V=16, M=8, subquantizer_clusters=32, pca=pca).fit(
            X, kmeans_coarse_iters=8, kmeans_local_iters=8, random_state=4)
    assert sm.is_trained and (sm.pca_matrix is not None) == pca
    (sc, sf), (lc, lf) = _errors(sm, X), _errors(lm, X)
    assert abs(sc - lc) <= 0.02 * lc and abs(sf - lf) <= 0.02 * lf, ((sc, sf), (lc, lf))
    # a real model, not a lucky draw: better than the coarse quantizer alone by far
    assert sf < 0.5 * sc


def test_spark_training_chooses_the_defaults_as_fit_does(spark, data):
    """V and the PCA left to the data are chosen by the same rule as LOPQModel.fit."""
    from cypq.lopq_parts import auto_pca_dim, auto_V
    from cypq.spark import train_lopq
    X, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sm = train_lopq(_df(spark, X), V=None, M=8, subquantizer_clusters=32, seed=4,
                        sample_fraction=1.0, kmeans_coarse_iters=4, kmeans_local_iters=4)
        lm = LOPQModel(M=8, subquantizer_clusters=32).fit(X, kmeans_coarse_iters=4,
                                                          kmeans_local_iters=4)
    assert sm.is_trained and sm.V == lm.V == auto_V(len(X), 32, X.shape[1])
    assert sm.pca_dim == lm.pca_dim == auto_pca_dim(X.shape[1], 8)


def test_spark_training_resumes_from_a_partial_model(spark, data):
    from cypq.spark import train_lopq
    X, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full = LOPQModel(V=16, M=8, subquantizer_clusters=32).fit(X, random_state=1)
        partial = LOPQModel(parameters=(full.Cs, None, None, None), M=8,
                            subquantizer_clusters=32)
        # an RDD of (id, ndarray) this time: the row-by-row input path
        rdd = spark.sparkContext.parallelize([(i, X[i]) for i in range(len(X))], 3)
        sm = train_lopq(rdd, V=16, M=8, subquantizer_clusters=32, model=partial,
                        seed=1, sample_fraction=1.0)
    assert partial.Rs is None, "the given model was changed"
    assert all(np.array_equal(a, b) for a, b in zip(sm.Cs, full.Cs))
    assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(sm.mus, full.mus))
    assert abs(_errors(sm, X)[1] - _errors(full, X)[1]) <= 0.02 * _errors(full, X)[1]
    with pytest.raises(ValueError, match="dimension"):
        train_lopq(_df(spark, X[:, :16]), V=16, M=8, model=full.__class__(
            parameters=(full.Cs, None, None, None), M=8, subquantizer_clusters=32))


@pytest.fixture(scope="module")
def model(data):
    X, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return LOPQModel(V=12, M=8, subquantizer_clusters=64).fit(X, random_state=2)


@pytest.mark.parametrize("vector_type", ["array", "ml"])
def test_spark_codes_equal_predict(spark, data, model, vector_type):
    from cypq.spark import encode
    X, _ = data
    ids = np.random.default_rng(0).choice(10**9, len(X), replace=False)
    rows = encode(_df(spark, X, ids, vector_type), model).collect()
    got_ids = np.array([r.id for r in rows])
    order = np.argsort(got_ids)
    assert np.array_equal(got_ids[order], np.sort(ids))
    pos = np.argsort(ids)  # rows of X in id order
    code = model.predict(X[pos])
    fine = np.array([np.frombuffer(rows[j].fine, dtype=np.uint8) for j in order])
    assert np.array_equal(fine, code.fine)
    assert np.array_equal([rows[j].c0 for j in order], code.coarse[:, 0])
    assert np.array_equal([rows[j].c1 for j in order], code.coarse[:, 1])
    assert np.array_equal([rows[j].cell for j in order],
                          code.coarse[:, 0] * model.V + code.coarse[:, 1])
    strings = spark.createDataFrame([("a", X[0].tolist())], "id string, vector array<float>")
    with pytest.raises(TypeError, match="int64"):
        encode(strings, model)
    # an RDD of vectors alone (not (id, vector) pairs): said so, where a worker's unpacking
    # error came back ("too many values to unpack")
    bare = spark.sparkContext.parallelize([x for x in X[:20]], 2)
    with pytest.raises(Exception, match=r"expected an RDD of \(id, vector\) pairs, got a row "
                                        r"of type ndarray and length 32"):
        encode(bare, model).count()


def test_bulk_load_from_spark_parquet_equals_python_index(spark, data, model, tmp_path):
    from cypq.spark import encode
    X, Q = data
    ids = np.arange(len(X)) * 7 + 3
    encode(_df(spark, X, ids), model, path=str(tmp_path / "codes"), num_partitions=4)
    src = CodeSource.open(tmp_path / "codes")
    assert len(src) == len(X) and len(src.files) == 4
    bulk_load(tmp_path / "ix", src, model, chunk_size=2500, progress=False, out=lambda m: None)
    ref = Index.in_memory(model)
    ref.add(X, ids)
    with Index.open(tmp_path / "ix", readonly=True) as ix:
        assert len(ix) == len(X)
        f, c, k = ix.lookup(ids)
        f2, c2, k2 = ref.lookup(ids)
        assert f.all() and np.array_equal(c, c2) and np.array_equal(k, k2)
        for quota in (0, 200, 1000):
            D1, I1 = ix.search(Q, k=10, quota=quota)
            D2, I2 = ref.search(Q, k=10, quota=quota)
            assert np.array_equal(I1, I2) and np.array_equal(D1, D2)
    # codes of another model are refused by the loader
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        other = LOPQModel(V=4, M=8, subquantizer_clusters=64).fit(X, random_state=0)
    with pytest.raises(ValueError, match="not made with this model"):
        bulk_load(tmp_path / "ix2", src, other, progress=False, out=lambda m: None)


@pytest.mark.parametrize("vector_type", ["array", "ml"])
def test_spark_tags_column_reaches_the_index(spark, data, model, tmp_path, vector_type):
    """encode(tags_col=...) carries each row's tag set (the top bit too) into the codes;
    cypq build makes an index with those tags, searched with a filter as one built in
    Python."""
    from cypq.spark import encode
    X, Q = data
    ids = np.arange(len(X)) * 3 + 1
    tags = np.random.default_rng(1).integers(0, 16, len(X)).astype(np.uint64)
    tags[::5] |= np.uint64(1 << 63)
    df = _df(spark, X, ids, vector_type)
    tag_df = spark.createDataFrame([(int(i), int(t.astype(np.int64))) for i, t in
                                    zip(ids, tags.view(np.int64))], "id long, t long")
    df = df.join(tag_df, "id")
    encode(df, model, path=str(tmp_path / "codes"), num_partitions=3, tags_col="t")
    src = CodeSource.open(tmp_path / "codes")
    assert src.has_tags
    bulk_load(tmp_path / "ix", src, model, chunk_size=1500, progress=False, out=lambda m: None)
    ref = Index.in_memory(model, tags=True)
    ref.add(X, ids, tags=tags)
    with Index.open(tmp_path / "ix", readonly=True) as ix:
        np.testing.assert_array_equal(ix.lookup(ids, with_tags=True)[3], tags)
        for kw in ({"tags_any": 3}, {"tags_none": np.uint64(1 << 63)}):
            D1, I1 = ix.search(Q, k=10, quota=300, **kw)
            D2, I2 = ref.search(Q, k=10, quota=300, **kw)
            assert np.array_equal(I1, I2)
    with pytest.raises(TypeError, match="64-bit"):
        encode(df.withColumn("t", df.t.cast("string")), model, tags_col="t")


def test_lopq_text_format_round_trip(spark, data, tmp_path):
    from cypq.spark import read_lopq_text, write_lopq_text
    X, _ = data
    sc = spark.sparkContext
    write_lopq_text(sc.parallelize([(i, X[i].astype(np.float64)) for i in range(50)], 2),
                    str(tmp_path / "text"))
    line = open(next(p for p in sorted((tmp_path / "text").iterdir())
                     if p.name.startswith("part-") and p.stat().st_size)).readline()
    assert "\t" in line and line.split("\t")[0].isdigit()
    got = dict(read_lopq_text(sc, str(tmp_path / "text")).collect())
    assert sorted(got) == list(range(50))
    assert all(np.array_equal(got[i], X[i].astype(np.float64)) for i in range(50))


def test_spark_tool_end_to_end(tmp_path, data):
    """tools/spark_lopq.py train + encode (a fresh Spark), then `cypq build` from its codes."""
    X, Q = data
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"id": pa.array(np.arange(len(X)), pa.int64()),
                      "vector": pa.array(list(X), pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "vectors.parquet")
    tool = os.path.join(ROOT, "tools", "spark_lopq.py")
    common = ["--master", "local[2]", "--input", str(tmp_path / "vectors.parquet")]
    r = subprocess.run([sys.executable, tool, "train", *common, "--V", "8", "--M", "8",
                        "--S", "32", "--sample-fraction", "1", "--model-out",
                        str(tmp_path / "m.lopq")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, tool, "encode", *common, "--model",
                        str(tmp_path / "m.lopq"), "--output", str(tmp_path / "codes")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "cypq", "build", str(tmp_path / "ix"),
                        str(tmp_path / "codes"), "--model", str(tmp_path / "m.lopq"), "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    model = LOPQModel.load_proto(tmp_path / "m.lopq")
    ref = Index.in_memory(model)
    ref.add(X, np.arange(len(X)))
    with Index.open(tmp_path / "ix", readonly=True) as ix:
        D1, I1 = ix.search(Q, k=10, quota=500)
    D2, I2 = ref.search(Q, k=10, quota=500)
    assert np.array_equal(I1, I2) and np.array_equal(D1, D2)
    # search on Spark with the tool: the same results
    pq.write_table(pa.table({"id": pa.array(np.arange(len(Q)), pa.int64()),
                             "vector": pa.array(list(Q), pa.list_(pa.float32()))}),
                   tmp_path / "queries.parquet")
    r = subprocess.run([sys.executable, tool, "search", "--master", "local[2]", "--input",
                        str(tmp_path / "queries.parquet"), "--codes", str(tmp_path / "codes"),
                        "--model", str(tmp_path / "m.lopq"), "--k", "10", "--quota", "500",
                        "--output", str(tmp_path / "res")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = pq.read_table(tmp_path / "res").to_pandas().sort_values("query_id")
    assert np.array_equal(np.stack(res["ids"].to_numpy()), I2)


def _results(df, n):
    """(D, I) of a Spark search's DataFrame, rows in query-id order (ids 0..n-1)."""
    rows = sorted(df.collect(), key=lambda r: r.query_id)
    assert [r.query_id for r in rows] == list(range(n))
    return (np.array([r.distances for r in rows], np.float32),
            np.array([r.ids for r in rows], np.int64))


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_spark_search_equals_index_search(spark, data, tmp_path, metric):
    """Over Parquet codes (parts of several files, and one part), a shard set, one index and
    a vector file of queries: the results of Index.search on the same codes, ties
    included."""
    from cypq.shards import split
    from cypq.spark import encode, search
    X, Q = data
    X = np.concatenate([X, X[:30]])          # duplicates: ties inside and across parts
    ids = np.arange(len(X)) * 5 + 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = LOPQModel(V=12, M=8, subquantizer_clusters=64, metric=metric).fit(
            X, random_state=2)
    encode(_df(spark, X, ids).repartition(5), model, path=str(tmp_path / "codes"),
           num_partitions=5)
    Q = np.concatenate([Q, X[:6]])
    ref = Index.in_memory(model)
    ref.add(X, ids)
    queries = spark.createDataFrame([(i, q.tolist()) for i, q in enumerate(Q)],
                                    "id long, vector array<float>").repartition(2)
    with Index.create(tmp_path / "whole", model) as whole:
        whole.add(X, ids)
        split(whole, tmp_path / "set", 3).close()
    np.save(tmp_path / "q.npy", Q)
    for corpus, qs, tasks, quota, k in (
            (tmp_path / "codes", queries, None, 400, 10), (tmp_path / "codes", queries, 1, 0, 7),
            (tmp_path / "set", queries, None, 400, 10),
            (tmp_path / "whole", queries, None, 400, 10),
            (tmp_path / "codes", str(tmp_path / "q.npy"), 3, 400, 10)):
        D, I = _results(search(qs, str(corpus), model if "codes" in str(corpus) else None,
                               k=k, quota=quota, num_partitions=tasks), len(Q))
        want = ref.search(Q, k=k, quota=quota)
        np.testing.assert_array_equal(I, want[1], err_msg=f"{corpus} {tasks} {quota}")
        np.testing.assert_array_equal(D, want[0])
    # written as Parquet when a path is given
    search(queries, str(tmp_path / "set"), k=3, quota=400, path=str(tmp_path / "res"))
    assert spark.read.parquet(str(tmp_path / "res")).count() == len(Q)


def test_spark_knn_graph_is_each_items_search_without_itself(spark, data, model, tmp_path):
    from cypq.spark import knn_graph
    X, _ = data
    X = X[:3000]
    D, I = _results(knn_graph(_df(spark, X), model, k=6, quota=300), len(X))
    ref = Index.in_memory(model)
    ref.add(X, np.arange(len(X)))
    Dr, Ir = ref.search(X, k=7, quota=300)
    mine = Ir == np.arange(len(X))[:, None]
    assert (I != np.arange(len(X))[:, None]).all()
    keep = ~mine
    keep[~mine.any(1), -1] = False   # no self among the 7: the last one goes
    np.testing.assert_array_equal(I, Ir[keep].reshape(len(X), 6))
    np.testing.assert_array_equal(D, Dr[keep].reshape(len(X), 6))


def test_spark_search_refuses_bad_input_before_scheduling(spark, data, model, tmp_path):
    from cypq import IndexFormatError
    from cypq.shards import split
    from cypq.spark import encode, search
    X, Q = data
    encode(_df(spark, X[:2000]), model, path=str(tmp_path / "codes"), num_partitions=3)
    queries = spark.createDataFrame([(i, q.tolist()) for i, q in enumerate(Q)],
                                    "id long, vector array<float>")
    short = spark.createDataFrame([(0, Q[0, :16].tolist())], "id long, vector array<float>")
    with pytest.raises(ValueError, match="dimension 16; the model takes 32"):
        search(short, str(tmp_path / "codes"), model)
    with pytest.raises(ValueError, match="needs the model"):
        search(queries, str(tmp_path / "codes"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        search(queries, str(tmp_path / "nothing"), model)
    os.mkdir(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no .parquet files there .the corpus is"):
        search(queries, str(tmp_path / "empty"), model)
    other = LOPQModel(V=4, M=8, subquantizer_clusters=64).fit(X[:2000], random_state=0)
    with pytest.raises(ValueError, match="another model"):
        search(queries, str(tmp_path / "codes"), other)
    # two encodings' files side by side: cell ranges that overlap
    encode(_df(spark, X[2000:4000], np.arange(2000, 4000)), model, path=str(tmp_path / "c2"),
           num_partitions=2)
    for f in os.listdir(tmp_path / "c2"):
        if f.endswith(".parquet"):
            shutil.copy(tmp_path / "c2" / f, tmp_path / "codes" / ("b-" + f))
    with pytest.raises(ValueError, match="not range-partitioned"):
        search(queries, str(tmp_path / "codes"), model)
    with Index.create(tmp_path / "whole", model) as whole:
        whole.add(X[:2000], np.arange(2000))
        split(whole, tmp_path / "set", 3).close()
    with pytest.raises(ValueError, match="not the model inside"):
        search(queries, str(tmp_path / "set"), other)
    shutil.rmtree(tmp_path / "set" / "shard-0001")
    with pytest.raises(IndexFormatError, match="missing"):
        search(queries, str(tmp_path / "set"))
