"""Vectors kept beside the codes: storage (memory, LMDB, bulk), exact re-ranking against a
NumPy reference, and the errors of every bad input."""
import warnings

import numpy as np
import pytest

from cypq import Index, LOPQModel
from cypq.bulk import BulkLoadError, bulk_load
from cypq.cli import main as cli_main
from cypq.rebuild import rebuild
from cypq.storage.base import IndexCorruptError
from cypq.vector_files import VectorSource

import reference as ref
from conftest import clustered

N = 2000


def _data(metric="l2", dim=16, seed=5):
    X = clustered(N, dim, n_clusters=15, seed=seed)
    if metric == "l2":  # byte-valued, like SIFT: uint8 keeps them exactly
        X = np.clip(np.round(X * 4 + 128), 0, 255).astype(np.float32)
    Q = X[:12] + np.random.default_rng(seed).normal(0, 0.5, (12, dim)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = LOPQModel(V=4, M=4, metric=metric).fit(X, random_state=seed)
    return model, X, Q


@pytest.fixture(scope="module", params=["l2", "ip", "cosine"])
def data(request):
    return _data(request.param)


def _index(kind, model, tmp_path, vectors, **options):
    if kind == "memory":
        return Index.in_memory(model, vectors=vectors, **options)
    return Index.create(tmp_path / "ix", model, vectors=vectors, **options)


def _sq8(X, lo, hi):
    """The values vectors='sq8' keeps of X over ranges (lo, hi), by NumPy: 256 levels per
    dimension, from lo in steps of (hi - lo) / 255, values outside at the nearest end."""
    step = ((hi - lo) / 255).astype(np.float32)
    codes = np.clip(np.rint((X - lo) / step), 0, 255)
    return (lo + step * codes.astype(np.float32)).astype(np.float32)


def _expected(model, X, stored_ids, Q, candidates, k):
    """The exact top k of each query among its candidates (ids), by the NumPy reference."""
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True) if model.metric == "cosine" else Q
    pos = {int(i): j for j, i in enumerate(stored_ids)}
    out = []
    for q, cand in zip(Qn, candidates):
        cand = [int(i) for i in cand if i >= 0]
        s = ref.exact_scores(q[None], X[[pos[i] for i in cand]], model.metric)[0]
        out.append([cand[j] for j in np.argsort(s, kind="stable")[:k]])
    return out


@pytest.mark.parametrize("kind", ["memory", "lmdb"])
@pytest.mark.parametrize("vectors", ["float32", "float16", "uint8", "sq8"])
def test_rerank_equals_exact_reference(data, kind, vectors, tmp_path, n_threads):
    """Every entry re-ranked (quota 0, rerank = N): the exact top k of the whole index; a
    partial re-rank: the exact top k of the ADC top R. Distances are the metric's exact
    values of the stored vectors (sq8: of the values it keeps, some outside its ranges)."""
    model, X, Q = data
    if vectors == "uint8" and model.metric != "l2":
        pytest.skip("uint8 keeps byte-valued vectors (the l2 data)")
    ids = np.arange(N, dtype=np.int64) * 3 + 7
    opts = dict(stage_capacity=700) if kind == "lmdb" else {}
    if vectors == "sq8":   # ranges of part of the data: the rest may fall outside
        opts["vector_ranges"] = (X[:300].min(0), X[:300].max(0))
    with _index(kind, model, tmp_path, vectors, **opts) as ix:
        ix.n_threads = n_threads
        ix.add(X[:1200], ids[:1200])
        ix.add(X[1200:], ids[1200:])     # part staged, part merged on disk
        kept = _sq8(X, *opts["vector_ranges"]) if vectors == "sq8" else X.astype(vectors)
        if vectors == "sq8":
            assert ix.vector_kind == "sq8" and ix.vector_dtype == np.uint8
            assert (kept != X).any() and ((X > opts["vector_ranges"][1]).any())
        np.testing.assert_allclose(ix.vectors(ids[[5, 1500]]), kept[[5, 1500]], rtol=1e-6,
                                   atol=1e-5)
        k = 7
        D, I = ix.search(Q, k=k, quota=0, rerank=N)
        want = _expected(model, kept, ids, Q, np.tile(ids, (len(Q), 1)), k)
        assert I.tolist() == want
        Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True) if model.metric == "cosine" else Q
        s = ref.exact_scores(Qn, kept[(I - 7) // 3].reshape(-1, X.shape[1]), model.metric)
        s = s[np.arange(len(Q))[:, None], np.arange(len(Q) * k).reshape(len(Q), k)]
        sign = 1 if model.metric == "l2" else -1
        np.testing.assert_allclose(D, sign * s, rtol=1e-4, atol=1e-3)
        # partial: the exact best of the ADC's best R
        _, cand = ix.search(Q, k=40, quota=500)
        _, I2 = ix.search(Q, k=k, quota=500, rerank=40)
        assert I2.tolist() == _expected(model, kept, ids, Q, cand, k)


def test_rerank_fewer_candidates_than_k(tmp_path):
    model, X, Q = _data()
    with Index.in_memory(model, vectors="uint8") as ix:
        ix.add(X[:5])
        D, I = ix.search(Q[:2], k=8, quota=0, rerank=10)
        assert (I[:, :5] >= 0).all() and (I[:, 5:] == -1).all() and np.isinf(D[:, 5:]).all()


def test_remove_and_replace_keep_vectors_in_step(tmp_path):
    model, X, _ = _data()
    with Index.create(tmp_path / "ix", model, vectors="float32", stage_capacity=300) as ix:
        ix.add(X[:1000])
        ix.remove(np.arange(0, 1000, 2))
        ix.add(X[1000:1100], ids=np.arange(1, 200, 2), replace=True)  # replaces staged + merged
        assert ix.verify() == []
        np.testing.assert_array_equal(ix.vectors([1, 199, 201]), X[[1000, 1099, 201]])
        with pytest.raises(KeyError, match="not in the index.*first: 0"):
            ix.vectors([0, 1])
        c = ix.compact(tmp_path / "c")
        with c:
            assert c.verify() == [] and len(c) == len(ix)
            np.testing.assert_array_equal(c.vectors([1, 201, 999]), ix.vectors([1, 201, 999]))


def test_bad_input_refused_nothing_stored(tmp_path):
    model, X, Q = _data()
    with Index.create(tmp_path / "plain", model) as plain:
        plain.add(X[:50])
        with pytest.raises(ValueError, match="keeps none"):
            plain.search(Q, k=5, rerank=10)
        with pytest.raises(ValueError, match="keeps no vectors"):
            plain.vectors([1])
        with pytest.raises(ValueError, match="keeps no vectors"):
            plain.add_codes(model.predict(X[50:60]), np.arange(50, 60), vectors=X[50:60])
    with pytest.raises(ValueError, match="vectors must be one of"):
        Index.in_memory(model, vectors="int4")
    with Index.create(tmp_path / "ix", model, vectors="uint8") as ix:
        ix.add(X[:50])
        with pytest.raises(ValueError, match="rerank=5 is below k=10"):
            ix.search(Q, k=10, rerank=5)
        bad = X[50:60].copy()
        bad[3, 0] = 300
        with pytest.raises(ValueError, match="vector 3 is not whole numbers in \\[0, 255\\]"):
            ix.add(bad)
        bad[3, 0] = 1.5
        with pytest.raises(ValueError, match="vector 3"):
            ix.add(bad)
        with pytest.raises(ValueError, match="pass vectors="):
            ix.add_codes(model.predict(X[50:60]), np.arange(50, 60))
        with pytest.raises(ValueError, match="dimension"):
            ix.add_codes(model.predict(X[50:60]), np.arange(50, 60), vectors=X[50:60, :8])
        assert len(ix) == 50 and ix.verify() == []
    with Index.in_memory(model, vectors="float16") as ix:
        with pytest.raises(ValueError, match="beyond float16's range"):
            ix.add(X[:10] * 1e4)
        assert len(ix) == 0
    with pytest.raises(ValueError, match="pass vector_ranges="):
        Index.in_memory(model, vectors="sq8")
    with pytest.raises(ValueError, match=r"shape \(16,\) each"):
        Index.in_memory(model, vectors="sq8", vector_ranges=(X.min(0)[:8], X.max(0)[:8]))
    with pytest.raises(ValueError, match="lo <= hi"):
        Index.in_memory(model, vectors="sq8", vector_ranges=(X.max(0), X.min(0)))
    with pytest.raises(ValueError, match="with vectors='sq8' only"):
        Index.in_memory(model, vectors="uint8", vector_ranges=(X.min(0), X.max(0)))
    with Index.in_memory(model, vectors="sq8", vector_ranges=(X.min(0), X.max(0))) as ix:
        bad = X[:10].copy()
        bad[4, 2] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            ix.add(bad)
        assert len(ix) == 0


def _damage(path, db_name, key, at):
    """Flip a byte of one LMDB value."""
    import lmdb
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        db = env.open_db(db_name, txn=txn, create=False)
        v = bytearray(txn.get(key, db=db))
        v[at] ^= 0xFF
        txn.put(key, bytes(v), db=db)
    env.close()


def test_damaged_vector_is_reported(tmp_path):
    """A staged vector (the vectors table) and a merged one (inside its block) that no
    longer match their checksums: verify names them, reading them raises."""
    model, X, Q = _data()
    with Index.create(tmp_path / "ix", model, vectors="uint8", stage_capacity=100) as ix:
        ix.add(X[:150])   # the first 100 are merged (the stage filled), the rest staged
        ix.merge()
        ix.add(X[150:200])
        found, cell, _ = ix.lookup([3])
    _damage(tmp_path / "ix", b"vectors", (170).to_bytes(8, "big"), 8 + 3)  # a vector byte
    with Index.open(tmp_path / "ix") as ix:
        with pytest.raises(IndexCorruptError, match="vectors\\[170\\]"):
            ix.search(X[170], k=1, quota=0, rerank=200)
    _damage(tmp_path / "ix", b"blocks", int(cell[0]).to_bytes(8, "big") + bytes(4), -5)
    with Index.open(tmp_path / "ix") as ix:
        problems = ix.verify()
        assert any("vectors[170]" in line and "checksum" in line for line in problems)
        assert any(f"blocks[cell {cell[0]}, block 0]" in line and "checksum" in line
                   for line in problems)
        with pytest.raises(IndexCorruptError, match="vectors\\[170\\].*checksum"):
            ix.vectors([170])
        with pytest.raises(IndexCorruptError, match=f"blocks\\[cell {cell[0]}, block 0\\]"):
            ix.vectors([3])
        # now a search that visits every cell meets the damaged block first (its checksum is
        # checked as it enters the reader's cache: the scan never scores its bytes)
        with pytest.raises(IndexCorruptError,
                           match=f"blocks\\[cell {cell[0]}, block 0\\]: its checksum"):
            ix.search(X[170], k=1, quota=0, rerank=200)


def test_bulk_load_keeps_vectors(tmp_path):
    model, X, Q = _data()
    np.save(tmp_path / "x.npy", X.astype(np.uint8))
    src = VectorSource.open(str(tmp_path / "x.npy"))
    bulk_load(tmp_path / "b", src, model, chunk_size=700, progress=False, out=lambda m: None,
              vectors="uint8")
    with Index.open(tmp_path / "b") as b, Index.in_memory(model, vectors="uint8") as m:
        m.add(X)
        assert b.verify() == [] and b.vector_dtype == np.uint8
        np.testing.assert_array_equal(b.vectors(np.arange(N)), X.astype(np.uint8))
        for ix in (b, m):
            ix.n_threads = 1
        np.testing.assert_array_equal(b.search(Q, k=5, quota=300, rerank=50)[1],
                                      m.search(Q, k=5, quota=300, rerank=50)[1])
    with pytest.raises(BulkLoadError, match="vectors changed"):
        _interrupted_then_other_vectors(tmp_path, src, model)
    np.save(tmp_path / "f.npy", X * 1000)
    with pytest.raises(BulkLoadError, match="rows 0..699.*not whole numbers"):
        bulk_load(tmp_path / "b3", VectorSource.open(str(tmp_path / "f.npy")), model,
                  chunk_size=700, progress=False, out=lambda m: None, vectors="uint8")


def _interrupted_then_other_vectors(tmp_path, src, model):
    """An unfinished load resumed with another vectors option is refused."""
    import cypq.bulk as B
    real = B.encoded_chunks

    def stop_after_one(*a, **kw):
        if a[4] > 0:
            raise KeyboardInterrupt
        return real(*a, **kw)
    B.encoded_chunks = stop_after_one
    try:
        with pytest.raises(KeyboardInterrupt):
            bulk_load(tmp_path / "b2", src, model, chunk_size=700, progress=False,
                      out=lambda m: None, vectors="uint8")
    finally:
        B.encoded_chunks = real
    bulk_load(tmp_path / "b2", src, model, chunk_size=700, progress=False,
              out=lambda m: None, vectors="float32")


def test_cli_build_vectors_and_search_rerank(tmp_path, capsys):
    model, X, Q = _data()
    np.save(tmp_path / "x.npy", X.astype(np.uint8))
    np.save(tmp_path / "q.npy", Q)
    model.export_proto(str(tmp_path / "m.lopq"))
    assert cli_main(["build", str(tmp_path / "ix"), str(tmp_path / "x.npy"), "--model",
                     str(tmp_path / "m.lopq"), "--vectors", "uint8", "-q"]) == 0
    assert cli_main(["search", str(tmp_path / "ix"), str(tmp_path / "q.npy"), "-k", "3",
                     "--quota", "0", "--rerank", str(N), "--out",
                     str(tmp_path / "i.npy")]) == 0
    with Index.in_memory(LOPQModel.load_proto(str(tmp_path / "m.lopq")),
                         vectors="uint8") as m:
        m.add(X)
        np.testing.assert_array_equal(np.load(tmp_path / "i.npy"),
                                      m.search(Q, k=3, quota=0, rerank=N)[1])
    capsys.readouterr()
    cli_main(["info", str(tmp_path / "ix")])
    assert "vectors: kept as uint8" in capsys.readouterr().out
    assert cli_main(["search", str(tmp_path / "ix"), str(tmp_path / "q.npy"), "-k", "30",
                     "--rerank", "5"]) != 0
    assert "rerank=5 is below k=30" in capsys.readouterr().err


def test_sq8_through_bulk_load_compact_rebuild_and_cli(tmp_path, capsys):
    """sq8 ranges learned from the input by the bulk loader (or given), kept by compact,
    split and rebuild; the values kept within half a step of the vectors; an index whose
    ranges are damaged is refused."""
    from cypq.stored_vectors import data_ranges
    model, X, Q = _data("ip")
    np.save(tmp_path / "x.npy", X)
    src = VectorSource.open(str(tmp_path / "x.npy"))
    bulk_load(tmp_path / "b", src, model, chunk_size=700, progress=False, out=lambda m: None,
              vectors="sq8")
    lo, hi = data_ranges(X)      # the whole input is the sample here
    with Index.open(tmp_path / "b") as b:
        assert b.vector_kind == "sq8" and b.verify() == []
        got = b.vectors(np.arange(N))
        np.testing.assert_allclose(got, _sq8(X, lo, hi), rtol=1e-6, atol=1e-5)
        assert np.abs(got - X).max() <= ((hi - lo) / 255).max() / 2 * 1.001
        want = b.search(Q, k=5, quota=300, rerank=50)
        with b.compact(tmp_path / "c") as c:
            assert c.vector_kind == "sq8"
            np.testing.assert_array_equal(c.search(Q, k=5, quota=300, rerank=50)[1], want[1])
        s = rebuild(b, tmp_path / "r", sample=1500, progress=False, out=lambda m: None)
        assert s.vectors == N
    with Index.open(tmp_path / "r") as r:
        assert r.vector_kind == "sq8"
        np.testing.assert_allclose(r.vectors(np.arange(N)), got, rtol=1e-6, atol=1e-5)
    model.export_proto(tmp_path / "m.lopq")
    assert cli_main(["build", str(tmp_path / "cli"), str(tmp_path / "x.npy"), "--model",
                     str(tmp_path / "m.lopq"), "-q", "--vectors", "sq8"]) == 0
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "cli")]) == 0
    assert "kept as sq8" in capsys.readouterr().out
    import lmdb
    env = lmdb.open(str(tmp_path / "c"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"sq8", b"\x00" * 12, db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(IndexCorruptError, match="sq8"):
        Index.open(tmp_path / "c")


def test_rebuild_under_a_new_model(tmp_path):
    """The same ids and vectors under a model trained on the stored vectors: equal to an
    index built afresh with that model; the old index stays usable; bad requests refused."""
    model, X, Q = _data()
    ids = np.arange(N, dtype=np.int64) * 5 + 3
    with Index.create(tmp_path / "old", model, vectors="uint8", stage_capacity=500) as old:
        old.add(X[:1500], ids[:1500])
        old.add(X[1500:], ids[1500:])                 # the last ones staged
        s = rebuild(old, tmp_path / "new", sample=1500, progress=False, out=lambda m: None)
        assert s.vectors == N
        old.add(X[:3], ids=[1, 2, 4])                 # still writable
        with pytest.raises(BulkLoadError, match="complete index"):
            rebuild(old, tmp_path / "new", progress=False, out=lambda m: None)
        with pytest.raises(ValueError, match="takes 8-d vectors"):
            rebuild(old, tmp_path / "x", _data(dim=8)[0], progress=False, out=lambda m: None)
    with Index.open(tmp_path / "new") as new:
        fresh = Index.in_memory(new.model, vectors="uint8")
        assert new.model != model and (new.model.V, new.model.M) == (model.V, model.M)
        fresh.add(X, ids)
        assert len(new) == N and new.verify() == []
        np.testing.assert_array_equal(new.vectors(ids), X.astype(np.uint8))
        for ix in (new, fresh):
            ix.n_threads = 1
        np.testing.assert_array_equal(new.search(Q, k=5, quota=300, rerank=50)[1],
                                      fresh.search(Q, k=5, quota=300, rerank=50)[1])
    with Index.create(tmp_path / "plain", model) as plain:
        plain.add(X[:10])
        with pytest.raises(ValueError, match="keeps no vectors"):
            rebuild(plain, tmp_path / "p2", progress=False, out=lambda m: None)


def test_cli_rebuild(tmp_path, capsys):
    model, X, Q = _data()
    with Index.create(tmp_path / "old", model, vectors="float16") as old:
        old.add(X)
    model.export_proto(str(tmp_path / "m.lopq"))
    assert cli_main(["rebuild", str(tmp_path / "old"), str(tmp_path / "new"), "--model",
                     str(tmp_path / "m.lopq"), "-q"]) == 0
    assert f"vectors: {N:,}" in capsys.readouterr().out
    with Index.open(tmp_path / "new") as new, Index.open(tmp_path / "old") as old:
        assert new.vector_dtype == np.float16 and new.verify() == []
        np.testing.assert_array_equal(new.vectors(np.arange(N)), old.vectors(np.arange(N)))
