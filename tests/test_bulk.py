"""Vector files, and the bulk loader: same index as incremental adds, resumable after an
interruption in either pass (exception, full disk, SIGKILL), refusing mixed inputs."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

from cypq import Index, LOPQModel
from cypq import bulk as bulk_mod
from cypq.bulk import BulkLoadError, bulk_load
from cypq.storage.lmdb import IndexFormatError
from cypq.storage.lmdb.bulk import LMDBBulkWriter
from cypq.vector_files import (VectorFileError, VectorSource, open_vector_file,
                               write_vector_file)

from conftest import clustered

HERE = os.path.dirname(os.path.abspath(__file__))


def write_texmex(path, X, dtype):
    """Independent TEXMEX writer: per record an int32 dimension, then the components."""
    X = np.asarray(X, dtype=dtype)
    with open(path, "wb") as f:
        for row in X:
            f.write(np.int32(len(row)).tobytes())
            f.write(row.tobytes())


# ---------------------------------------------------------------------------- vector files
@pytest.mark.parametrize("suffix,dtype", [(".fvecs", "<f4"), (".bvecs", "u1"), (".ivecs", "<i4")])
def test_texmex_files_read_back(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 200, (37, 12)).astype(dtype)
    write_texmex(tmp_path / f"x{suffix}", X, dtype)
    got = open_vector_file(tmp_path / f"x{suffix}")
    assert got.shape == (37, 12) and np.array_equal(got, X)
    write_vector_file(tmp_path / f"w{suffix}", X)     # cypq's writer: the same bytes
    assert (tmp_path / f"w{suffix}").read_bytes() == (tmp_path / f"x{suffix}").read_bytes()
    # truncated file, or a record with another dimension: a clear error
    raw = (tmp_path / f"x{suffix}").read_bytes()
    (tmp_path / f"t{suffix}").write_bytes(raw[:-3])
    with pytest.raises(VectorFileError, match="not a"):
        open_vector_file(tmp_path / f"t{suffix}")
    bad = bytearray(raw)
    rec = 4 + 12 * np.dtype(dtype).itemsize
    bad[5 * rec:5 * rec + 4] = np.int32(13).tobytes()
    (tmp_path / f"b{suffix}").write_bytes(bytes(bad))
    with pytest.raises(VectorFileError, match="record 5"):
        open_vector_file(tmp_path / f"b{suffix}")


def test_npy_files_that_are_not(tmp_path):
    # a text or pickle file named .npy: said so (numpy's own message spoke of pickled data)
    (tmp_path / "text.npy").write_bytes(b"1 2 3\n4 5 6\n")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    for name in ("text.npy", "obj.npy"):
        with pytest.raises(VectorFileError, match="not a readable .npy file"):
            open_vector_file(tmp_path / name)
    with pytest.raises(VectorFileError, match="no .npy header: write it with numpy.save"):
        open_vector_file(tmp_path / "text.npy")
    np.save(tmp_path / "x.npy", np.ones((10, 4), np.float32))
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:-8])
    with pytest.raises(VectorFileError, match="not a readable .npy file"):
        open_vector_file(tmp_path / "cut.npy")
    assert open_vector_file(tmp_path / "x.npy").shape == (10, 4)


def test_sources_span_shards_in_name_order(tmp_path):
    X = clustered(1000, 8, seed=3)
    np.save(tmp_path / "a.npy", X[:300])
    write_texmex(tmp_path / "b.fvecs", X[300:750], "<f4")
    np.save(tmp_path / "c.npy", X[750:].astype(np.float64))
    (tmp_path / "notes.txt").write_text("ignored")
    for spec in (tmp_path, str(tmp_path / "*")):
        src = VectorSource.open(spec)
        assert len(src) == 1000 and src.dim == 8
        assert np.array_equal(src.rows(250, 800), X[250:800])
        got = np.concatenate([c for _, c in src.chunks(333)])
        assert np.array_equal(got, X)
        idx = np.sort(np.random.default_rng(0).choice(1000, 100, replace=False))
        assert np.array_equal(src.sample(100, seed=0), X[idx])
    np.save(tmp_path / "d.npy", X[:5, :4])
    with pytest.raises(VectorFileError, match="different dimensions"):
        VectorSource.open(tmp_path)
    with pytest.raises(FileNotFoundError):
        VectorSource.open(tmp_path / "nothing*.npy")


# ---------------------------------------------------------------------------- bulk loading
@pytest.fixture(scope="module")
def data():
    X = clustered(5000, 16, n_clusters=15, seed=61)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = LOPQModel(V=6, M=4, subquantizer_clusters=16).fit(X[:3000], random_state=2)
    return model, X, clustered(25, 16, n_clusters=15, seed=62)


def _shards(tmp_path, X):
    d = tmp_path / "input"
    d.mkdir()
    np.save(d / "part0.npy", X[:1700])
    write_texmex(d / "part1.fvecs", X[1700:3900], "<f4")
    np.save(d / "part2.npy", X[3900:])
    return VectorSource.open(d)


def _same_index(path, reference, ids, Q):
    """The index at path holds what the reference index holds, cell by cell, in order."""
    with Index.open(path, readonly=True) as ix:
        assert len(ix) == len(reference)
        f1, c1, k1 = ix.lookup(ids)
        f2, c2, k2 = reference.lookup(ids)
        assert f1.all() and np.array_equal(c1, c2) and np.array_equal(k1, k2)
        s1, s2 = ix.stats(), reference.stats()
        for key in ("vectors", "non_empty_cells", "largest_cell"):
            assert s1[key] == s2[key]
        for quota in (0, 40, 300):
            D1, I1 = ix.search(Q, k=20, quota=quota)
            D2, I2 = reference.search(Q, k=20, quota=quota)
            assert np.array_equal(I1, I2) and np.array_equal(D1, D2)


@pytest.fixture(scope="module")
def reference(data):
    """The same vectors added incrementally (row numbers as ids), in memory."""
    model, X, _ = data
    ref = Index.in_memory(model)
    for a in range(0, len(X), 900):
        ref.add(X[a:a + 900], np.arange(a, min(a + 900, len(X))))
    return ref


def test_bulk_equals_incremental(data, reference, tmp_path):
    model, X, Q = data
    src = _shards(tmp_path, X)
    s = bulk_load(tmp_path / "ix", src, model, chunk_size=700, block_capacity=4,
                  progress=False, out=lambda m: None)
    assert s.vectors == len(X) and not s.resumed
    assert not (tmp_path / "ix" / bulk_mod.RUNS_DIR).exists()
    _same_index(tmp_path / "ix", reference, np.arange(len(X)), Q)
    # the same command again (e.g. after a kill during the clean-up) is a no-op
    msgs = []
    again = bulk_load(tmp_path / "ix", src, model, chunk_size=700, progress=False,
                      out=msgs.append)
    assert again.resumed and again.vectors == len(X) and "already built" in msgs[0]
    # ... but not with another model: the index holds the first one's codes
    other = LOPQModel(parameters=(model.Cs, (model.Rs[0][::-1].copy(), model.Rs[1]), model.mus,
                                  model.subquantizers))
    with pytest.raises(BulkLoadError, match="was built from this input with another model"):
        bulk_load(tmp_path / "ix", src, other, chunk_size=700, progress=False,
                  out=lambda m: None)
    with Index.open(tmp_path / "ix") as ix:
        assert ix.model == model and len(ix) == len(X)
    # the bulk-built index takes incremental changes like any other
    with Index.open(tmp_path / "ix") as ix:
        new = ix.add(X[:10])
        assert new.tolist() == list(range(len(X), len(X) + 10))
        assert ix.remove(np.arange(5)) == 5 and len(ix) == len(X) + 5


def test_ids_file_and_duplicates(data, tmp_path):
    model, X, Q = data
    np.save(tmp_path / "x.npy", X[:1000])
    ids = np.random.default_rng(3).permutation(10**6)[:1000].astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    src = VectorSource.open(tmp_path / "x.npy")
    bulk_load(tmp_path / "ix", src, model, ids=str(tmp_path / "ids.npy"), chunk_size=300,
              progress=False, out=lambda m: None)
    ref = Index.in_memory(model)
    ref.add(X[:1000], ids)
    _same_index(tmp_path / "ix", ref, ids, Q)
    ids[500] = ids[10]
    np.save(tmp_path / "dup.npy", ids)
    with pytest.raises(BulkLoadError, match="unique"):
        bulk_load(tmp_path / "ix2", src, model, ids=str(tmp_path / "dup.npy"),
                  chunk_size=300, progress=False, out=lambda m: None)
    np.save(tmp_path / "short.npy", ids[:10])
    with pytest.raises(VectorFileError, match="shape"):
        bulk_load(tmp_path / "ix3", src, model, ids=str(tmp_path / "short.npy"),
                  progress=False, out=lambda m: None)


def test_bad_inputs_are_refused(data, tmp_path):
    model, X, _ = data
    bad = X[:500].copy()
    bad[321, 5] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(BulkLoadError, match="input rows 300..399: .*NaN"):
        bulk_load(tmp_path / "ixn", VectorSource.open(tmp_path / "nan.npy"), model,
                  chunk_size=100, progress=False, out=lambda m: None)
    np.save(tmp_path / "empty.npy", X[:0])
    with pytest.raises(BulkLoadError, match="no vectors"):
        bulk_load(tmp_path / "ixe", VectorSource.open(tmp_path / "empty.npy"), model,
                  progress=False, out=lambda m: None)
    np.save(tmp_path / "x.npy", X[:100, :8])
    with pytest.raises(ValueError, match="dimension 8"):
        bulk_load(tmp_path / "ix", VectorSource.open(tmp_path / "x.npy"), model,
                  progress=False, out=lambda m: None)
    Index.create(tmp_path / "full", model).close()
    np.save(tmp_path / "y.npy", X[:100])
    with pytest.raises(BulkLoadError, match="complete index"):
        bulk_load(tmp_path / "full", VectorSource.open(tmp_path / "y.npy"), model,
                  progress=False, out=lambda m: None)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f").write_text("x")
    with pytest.raises(BulkLoadError, match="not an unfinished bulk load"):
        bulk_load(tmp_path / "other", VectorSource.open(tmp_path / "y.npy"), model,
                  progress=False, out=lambda m: None)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("where,after", [("encode", 3), ("write", 2)])
def test_resume_after_interruption(data, reference, tmp_path, monkeypatch, where, after):
    """Interrupted in the encode pass (full disk while writing a run) or in the write pass
    (an exception inside the LMDB transaction), the rerun finishes the same index."""
    model, X, Q = data
    src = _shards(tmp_path, X)
    calls = {"n": 0}
    if where == "encode":
        real = bulk_mod.write_atomic

        def failing(path, arr):
            calls["n"] += 1
            if calls["n"] > after:
                with open(path + ".tmp", "wb") as f:   # a partial file, as a full disk leaves
                    f.write(b"\x93NUMPY partial")
                raise OSError(28, "No space left on device")
            real(path, arr)
        monkeypatch.setattr(bulk_mod, "write_atomic", failing)
        err = OSError
    else:
        real = LMDBBulkWriter.append

        def failing(self, *a, **k):
            calls["n"] += 1
            if calls["n"] > after:
                raise _Stop()
            real(self, *a, **k)
        monkeypatch.setattr(LMDBBulkWriter, "append", failing)
        err = _Stop
    path = tmp_path / "ix"
    with pytest.raises(err):
        bulk_load(path, src, model, chunk_size=700, block_capacity=4, progress=False,
                  out=lambda m: None)
    with pytest.raises(IndexFormatError, match="unfinished bulk load"):
        Index.open(path)
    # another input or chunk size is refused, not mixed in
    with pytest.raises(BulkLoadError, match="different input"):
        bulk_load(path, src, model, chunk_size=500, progress=False, out=lambda m: None)
    monkeypatch.undo()
    msgs = []
    s = bulk_load(path, src, chunk_size=700, block_capacity=4, progress=False,
                  out=msgs.append)
    assert s.resumed and "resuming" in msgs[0]
    _same_index(path, reference, np.arange(len(X)), Q)


LOADER = textwrap.dedent("""
    import sys
    from cypq import LOPQModel
    from cypq.bulk import bulk_load
    from cypq.vector_files import VectorSource
    import cypq.bulk as b
    from cypq.storage.lmdb.bulk import LMDBBulkWriter as W
    import time
    # Announce each committed step and pause a little, so the test can kill at a random
    # moment in a random step.
    w, a, i = b.write_atomic, W.append, W._append_ids
    b.write_atomic = lambda *x: (time.sleep(0.01), w(*x), print("run", flush=True))
    W.append = lambda *x: (time.sleep(0.01), a(*x), print("batch", flush=True))
    W._append_ids = lambda *x: (time.sleep(0.01), i(*x), print("ids", flush=True))
    model = LOPQModel.load_proto(sys.argv[3])
    bulk_load(sys.argv[1], VectorSource.open(sys.argv[2]), model, chunk_size=int(sys.argv[4]),
              block_capacity=4, progress=False, out=lambda m: print(m, flush=True))
    print("done", flush=True)
""")


def test_resume_after_kill9_at_random_moments(data, tmp_path):
    model, X, Q = data
    big = np.concatenate([X] * 8)                     # 40000 rows, ids = row numbers
    np.save(tmp_path / "big.npy", big)
    model.export_proto(tmp_path / "m.lopq")
    path = tmp_path / "ix"
    rng = np.random.default_rng(11)
    kills, seen = 0, set()
    for attempt in range(40):
        proc = subprocess.Popen([sys.executable, "-c", LOADER, str(path),
                                 str(tmp_path / "big.npy"), str(tmp_path / "m.lopq"), "2000"],
                                stdout=subprocess.PIPE, text=True, cwd=HERE)
        # 20 runs, ~20 cell ranges (+ their id runs), ~20 id ranges: kill after a random
        # number of steps, a random moment later
        wanted, got = int(rng.integers(1, 20)), 0
        while got < wanted:
            line = proc.stdout.readline()
            if not line or line.startswith("done"):
                break
            got += line.strip() in ("run", "batch", "ids")
        time.sleep(float(rng.uniform(0, 0.02)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        out = proc.communicate()[0]
        if "done" in out or (line and line.startswith("done")):
            out = "done"
            break
        runs = path / bulk_mod.RUNS_DIR
        state = Index.open(path, allow_incomplete=True) if Index.exists(path) else None
        if state is not None:
            st = state.storage.bulk_state()
            st = json.loads(st) if st else {}
            seen.add("ids" if state.storage.meta("bulk_ids") else "write"
                     if "next_cell" in st else "encode")
            state.close()
        if runs.exists():
            assert not any(f.endswith(".npy") and os.path.getsize(runs / f) < 128
                           for f in os.listdir(runs)), "a partial run file was kept"
    assert "done" in out, "the load never finished"
    assert kills >= 3 and seen == {"encode", "write", "ids"}, (kills, seen)
    ref = Index.in_memory(model)
    for a in range(0, len(big), 5000):
        ref.add(big[a:a + 5000], np.arange(a, a + 5000))
    _same_index(path, ref, np.arange(len(big)), Q)


def test_interrupt_closes_the_progress_bars(data, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a pass closes the progress bar it was drawing before the
    interrupt reaches the caller (whose traceback keeps the load's frames, and with them an
    unclosed bar, alive while it prints its message: a half-drawn bar line), and the same call
    later continues the load."""
    model, X, Q = data
    src = _shards(tmp_path, X)
    real, calls = bulk_mod.write_atomic, {"n": 0}

    def interrupted(path, arr):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(path, arr)
    closed = []
    close = bulk_mod._Progress.close
    monkeypatch.setattr(bulk_mod, "write_atomic", interrupted)
    monkeypatch.setattr(bulk_mod._Progress, "close",
                        lambda self: (closed.append(self.bar is not None), close(self)))
    try:
        bulk_load(tmp_path / "ix", src, model, chunk_size=700, progress=True,
                  out=lambda m: None)
    except KeyboardInterrupt:
        assert closed and closed[0], "the encode bar was left open"
    else:
        pytest.fail("the interrupt did not reach the caller")
    monkeypatch.undo()
    s = bulk_load(tmp_path / "ix", src, chunk_size=700, progress=False, out=lambda m: None)
    assert s.resumed and s.vectors == len(X)
