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
    Xp = model._apply_pca(X)
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
    assert sm.is_trained and sm.V == lm.V == auto_V(len(X))
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
