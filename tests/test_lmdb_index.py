"""The on-disk index: same results as in memory, persistence, growth, errors, crash safety,
readers beside a writer."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

import cypq
from cypq import Index, LOPQModel
from cypq.storage.lmdb import IndexFormatError

from conftest import clustered

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def setup():
    X = clustered(4000, 16, n_clusters=12, seed=51)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = LOPQModel(V=6, M=4, subquantizer_clusters=16).fit(X, random_state=5)
    return model, X, clustered(30, 16, n_clusters=12, seed=52)


def test_lmdb_equals_memory_and_persists(setup, tmp_path, n_threads):
    model, X, Q = setup
    mem = Index.in_memory(model, n_threads=n_threads)
    ids = np.random.default_rng(0).permutation(10 * len(X))[:len(X)]
    mem.add(X, ids)
    path = tmp_path / "ix"
    with Index.create(path, model, block_capacity=16, n_threads=n_threads) as disk:
        for s in range(0, len(X), 700):  # several transactions, blocks filling up
            disk.add(X[s:s + 700], ids[s:s + 700])
        assert len(disk) == len(X)
        for quota in (0, 50, 400):
            Dm, Im = mem.search(Q, k=15, quota=quota)
            Dd, Id = disk.search(Q, k=15, quota=quota)
            np.testing.assert_array_equal(Id, Im)
            np.testing.assert_array_equal(Dd, Dm)
        st = disk.stats()
        assert st["vectors"] == len(X) and st["bytes_on_disk"] > 0
        assert st["non_empty_cells"] == mem.stats()["non_empty_cells"]
        assert st["largest_cell"] == mem.stats()["largest_cell"]
    with Index.open(path, readonly=True) as again:
        assert again.model == model and len(again) == len(X)
        np.testing.assert_array_equal(again.search(Q, k=15, quota=0)[1],
                                      mem.search(Q, k=15, quota=0)[1])
        found, cells, codes = again.lookup(ids[:5])
        assert found.all()
        code = model.predict(X[:5])
        np.testing.assert_array_equal(codes, code.fine)
        np.testing.assert_array_equal(cells, model.get_cell_id_for_coarse_codes(code.coarse))


def test_remove_replace_on_disk(setup, tmp_path):
    model, X, Q = setup
    mem = Index.in_memory(model)
    with Index.create(tmp_path / "ix", model, block_capacity=4) as disk:
        ids = disk.add(X)
        mem.add(X, ids)
        rng = np.random.default_rng(1)
        for _ in range(3):
            gone = rng.choice(ids, 500, replace=False)
            assert disk.remove(gone) == mem.remove(gone)
            back = rng.choice(gone, 100, replace=False)
            rows = rng.choice(len(X), 100)
            disk.add(X[rows], back, replace=True)
            mem.add(X[rows], back, replace=True)
            assert len(disk) == len(mem)
            np.testing.assert_array_equal(disk.contains(ids), mem.contains(ids))
            for quota in (0, 300):
                Dd, Id = disk.search(Q, k=20, quota=quota)
                Dm, Im = mem.search(Q, k=20, quota=quota)
                np.testing.assert_array_equal(Id, Im)
        with pytest.raises(KeyError, match="replace=True"):
            disk.add(X[:2], ids[-2:] if disk.contains(ids[-2:]).all() else ids[:2])
        n = len(disk)
        with pytest.raises(KeyError):
            disk.add(X[:3], [10**9, 10**9 + 1, int(ids[np.flatnonzero(disk.contains(ids))[0]])])
        assert len(disk) == n and not disk.contains([10**9]).any()  # all or nothing


def test_generated_ids_persist(setup, tmp_path):
    model, X, _ = setup
    with Index.create(tmp_path / "ix", model) as ix:
        a = ix.add(X[:10])
        ix.add(X[10:20], np.arange(100, 110))
    with Index.open(tmp_path / "ix") as ix:
        b = ix.add(X[20:25])
    np.testing.assert_array_equal(a, np.arange(10))
    np.testing.assert_array_equal(b, np.arange(110, 115))


def test_map_grows_by_itself(setup, tmp_path):
    model, X, Q = setup
    with Index.create(tmp_path / "ix", model, map_size=64 * 1024) as ix:
        for s in range(0, 4000, 500):
            ix.add(X[s:s + 500])
        assert len(ix) == 4000
        assert ix.stats()["map_size"] > 64 * 1024
        assert (ix.search(Q, k=5)[1] >= 0).all()


def test_errors(setup, tmp_path):
    model, X, Q = setup
    with pytest.raises(IndexFormatError, match="not a cypq index"):
        Index.open(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        Index.create(tmp_path / "full", model)
    with pytest.raises(cypq.NotFittedError):
        Index.create(tmp_path / "u", LOPQModel(V=4, M=4))
    path = tmp_path / "ix"
    Index.create(path, model).close()
    with Index.open(path, readonly=True) as ro:
        with pytest.raises(PermissionError, match="read-only"):
            ro.add(X[:1])
        with pytest.raises(PermissionError):
            ro.remove([0])
    with Index.open(path) as ix:
        with pytest.raises(ValueError, match="dimension"):
            ix.add(X[:2, :8])
    # a newer format is refused with a clear message, and nothing is changed
    import lmdb
    env = lmdb.open(str(path), max_dbs=8)
    meta = env.open_db(b"meta")
    with env.begin(write=True, db=meta) as txn:
        txn.put(b"format", b"cypq-index" + (99).to_bytes(4, "big"))
    env.close()
    with pytest.raises(IndexFormatError, match="newer cypq"):
        Index.open(path)


def test_same_index_opened_twice_in_one_process(setup, tmp_path):
    model, X, Q = setup
    path = tmp_path / "ix"
    a = Index.create(path, model)
    b = Index.open(path)
    a.add(X[:100])
    assert len(b) == 100                          # one environment, shared
    np.testing.assert_array_equal(a.search(Q, k=5)[1], b.search(Q, k=5)[1])
    a.close()
    b.add(X[100:200])                             # still usable after the other closed
    assert len(b) == 200
    b.close()
    with Index.open(path) as c:
        assert len(c) == 200


def test_threads_search_at_once(setup, tmp_path):
    model, X, Q = setup
    with Index.create(tmp_path / "ix", model) as ix:
        ix.add(X)
        want = ix.search(Q, k=10, quota=300)[1]
        errors, results = [], []

        def worker():
            try:
                for _ in range(10):
                    results.append(ix.search(Q, k=10, quota=300)[1])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert all(np.array_equal(r, want) for r in results)


WRITER = textwrap.dedent("""
    import sys, numpy as np, cypq
    path = sys.argv[1]
    ix = cypq.Index.open(path)
    X = np.load(sys.argv[2])
    b = 0
    while True:
        ids = np.arange(b * 50, b * 50 + 50)
        ix.add(X[ids % len(X)], ids)
        print(b, flush=True)   # batch b returned: it must survive
        b += 1
""")


def _consistent(path, X, returned):
    with Index.open(path, readonly=True) as ix:
        n = len(ix)
        assert n % 50 == 0, "a partly written batch is visible"
        batches = n // 50
        assert batches >= returned, "a batch whose add returned is missing"
        assert batches <= returned + 1
        ids = np.arange(batches * 50)
        assert ix.contains(ids).all() and not ix.contains([batches * 50]).any()
        D, I = ix.search(X[:3], k=5, quota=0)
        assert (I[:, 0] >= 0).all() if n else True
        st = ix.stats()
        assert st["vectors"] == n
    return batches


def test_kill9_during_adds_leaves_consistent_index(setup, tmp_path):
    model, X, _ = setup
    path = tmp_path / "ix"
    Index.create(path, model, block_capacity=8).close()
    np.save(tmp_path / "x.npy", X)
    rng = np.random.default_rng(7)
    total = 0
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(tmp_path / "x.npy")],
                                stdout=subprocess.PIPE, text=True, cwd=HERE)
        # let it run a random while (import + some batches), then SIGKILL at once
        lines = []
        deadline = time.time() + 60
        wanted = int(rng.integers(1, 8))
        while len(lines) < wanted and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        time.sleep(float(rng.uniform(0, 0.05)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rest = proc.stdout.read()
        returned = len(lines) + len(rest.split())
        assert returned >= 1, "the writer never got going"
        batches = _consistent(path, X, returned)
        total = batches
        # the next writer continues on top of what survived: clear ids for a fresh stream
        with Index.open(path) as ix:
            ix.remove(np.arange(batches * 50))
            assert len(ix) == 0
    assert total >= 1


READER = textwrap.dedent("""
    import sys, numpy as np, cypq
    ix = cypq.Index.open(sys.argv[1], readonly=True)
    Q = np.load(sys.argv[2])
    last = -1
    for _ in range(400):
        n = len(ix)
        D, I = ix.search(Q, k=5, quota=0)
        assert n >= last, (n, last)           # readers never see the index shrink here
        if n:
            assert (I[:, 0] >= 0).all()
        last = n
    print("ok", last, flush=True)
""")


def test_reader_process_while_writer_adds(setup, tmp_path):
    model, X, Q = setup
    path = tmp_path / "ix"
    np.save(tmp_path / "q.npy", Q)
    with Index.create(path, model) as ix:
        ix.add(X[:100])
        reader = subprocess.Popen([sys.executable, "-c", READER, str(path), str(tmp_path / "q.npy")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=HERE)
        for s in range(100, 4000, 100):
            ix.add(X[s:s + 100])
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0, err
        assert out.startswith("ok")


def test_threads_search_while_a_thread_adds(setup, tmp_path):
    """Searches in one process see consistent snapshots while another thread writes."""
    model, X, Q = setup
    with Index.create(tmp_path / "ix", model, block_capacity=8) as ix:
        ix.add(X[:200])
        errors = []
        done = threading.Event()

        def searcher():
            try:
                while not done.is_set():
                    D, I = ix.search(Q, k=10, quota=300)
                    valid = I[I >= 0]
                    assert (valid < len(X)).all() and np.isfinite(D[I >= 0]).all()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=searcher) for _ in range(3)]
        for t in threads:
            t.start()
        for s in range(200, len(X), 200):
            ix.add(X[s:s + 200])
        done.set()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        mem = Index.in_memory(model)
        mem.add(X)
        for quota in (0, 300):
            np.testing.assert_array_equal(ix.search(Q, k=10, quota=quota)[1],
                                          mem.search(Q, k=10, quota=quota)[1])
