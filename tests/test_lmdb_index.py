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


def _stage(stage):
    """Index.create options for a stage_capacity parameter (None: the default)."""
    return {} if stage is None else {"stage_capacity": stage}


@pytest.fixture(scope="module")
def setup():
    X = clustered(4000, 16, n_clusters=12, seed=51)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = LOPQModel(V=6, M=4, subquantizer_clusters=16).fit(X, random_state=5)
    return model, X, clustered(30, 16, n_clusters=12, seed=52)


# stage_capacity: 0 = adds write blocks; 1300 = merges every 2 adds and a partial stage at
# the end; default (1M) = everything staged
@pytest.mark.parametrize("stage", [0, 1300, None])
def test_lmdb_equals_memory_and_persists(setup, tmp_path, n_threads, stage, monkeypatch):
    model, X, Q = setup
    import cypq.storage.lmdb.writer as W
    monkeypatch.setattr(W, "MERGE_STEP", 97)  # merges of several steps
    mem = Index.in_memory(model, n_threads=n_threads)
    ids = np.random.default_rng(0).permutation(10 * len(X))[:len(X)]
    mem.add(X, ids)
    path = tmp_path / "ix"
    with Index.create(path, model, block_capacity=16, n_threads=n_threads, **_stage(stage)) as disk:
        for s in range(0, len(X), 700):  # several transactions, blocks filling up
            disk.add(X[s:s + 700], ids[s:s + 700])
        assert len(disk) == len(X)
        assert disk.stats()["staged"] == {0: 0, 1300: 1200, None: len(X)}[stage]
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


@pytest.mark.parametrize("stage", [0, None])
def test_remove_replace_on_disk(setup, tmp_path, stage):
    model, X, Q = setup
    mem = Index.in_memory(model)
    with Index.create(tmp_path / "ix", model, block_capacity=4, **_stage(stage)) as disk:
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
    import sys, numpy as np, cypq, cypq.storage.lmdb.writer
    cypq.storage.lmdb.writer.MERGE_STEP = 16   # merges of many steps, for kills to land in
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
        st = ix.stats()
        assert st["vectors"] == n
        # every entry findable, exactly where a fresh in-memory index has it
        mem = Index.in_memory(ix.model)
        if n:
            mem.add(X[ids % len(X)], ids)
        for quota in (0, 200):
            np.testing.assert_array_equal(ix.search(X[:20], k=10, quota=quota)[1],
                                          mem.search(X[:20], k=10, quota=quota)[1])
        found, cells, codes = ix.lookup(ids)
        np.testing.assert_array_equal(codes, mem.lookup(ids)[2])
        np.testing.assert_array_equal(cells, mem.lookup(ids)[1])
    return batches


# stage 120 with batches of 50: a merge (of many transactions) every third add
@pytest.mark.parametrize("stage", [0, 120])
def test_kill9_during_adds_leaves_consistent_index(setup, tmp_path, stage):
    model, X, _ = setup
    path = tmp_path / "ix"
    Index.create(path, model, block_capacity=8, stage_capacity=stage).close()
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


@pytest.mark.parametrize("stage", [250, None])
def test_reader_process_while_writer_adds(setup, tmp_path, stage):
    model, X, Q = setup
    path = tmp_path / "ix"
    np.save(tmp_path / "q.npy", Q)
    with Index.create(path, model, **_stage(stage)) as ix:
        ix.add(X[:100])
        reader = subprocess.Popen([sys.executable, "-c", READER, str(path),
                                   str(tmp_path / "q.npy")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=HERE)
        for s in range(100, 4000, 100):
            ix.add(X[s:s + 100])
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0, err
        assert out.startswith("ok")


@pytest.mark.parametrize("stage", [0, 500, None])
def test_threads_search_while_a_thread_adds(setup, tmp_path, stage):
    """Searches in one process see consistent snapshots while another thread writes."""
    model, X, Q = setup
    with Index.create(tmp_path / "ix", model, block_capacity=8, **_stage(stage)) as ix:
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


def test_merge_cut_short_goes_on_with_the_next_writes(setup, tmp_path, monkeypatch):
    """A merge interrupted between its steps (here: a full disk) leaves an index that reads
    exactly as before; later adds go on with it a bounded step at a time (staging meanwhile
    into a new active stage), and merge() finishes it."""
    import cypq.storage.lmdb.writer as W
    model, X, Q = setup
    monkeypatch.setattr(W, "MERGE_STEP", 200)
    mem = Index.in_memory(model)
    mem.add(X[:2500])
    path = tmp_path / "ix"
    real = W.WritePath._step
    done = []

    def fail_fourth(self, txn, everything):
        if len(done) == 3:  # a freeze, then two steps of the blocks phase
            raise OSError(28, "No space left on device")
        done.append(1)
        return real(self, txn, everything)
    with Index.create(path, model, block_capacity=8) as ix:
        for s in range(0, 2500, 500):
            ix.add(X[s:s + 500])
        assert ix.stats()["staged"] == 2500
        monkeypatch.setattr(W.WritePath, "_step", fail_fourth)
        with pytest.raises(OSError, match="No space"):
            ix.merge()
    monkeypatch.setattr(W.WritePath, "_step", real)

    def same(ix):
        assert len(ix) == len(mem)
        for quota in (0, 100, 400):
            np.testing.assert_array_equal(ix.search(Q, k=10, quota=quota)[1],
                                          mem.search(Q, k=10, quota=quota)[1])
        ids = np.arange(2700)  # absent ones included
        for got, want in zip(ix.lookup(ids), mem.lookup(ids)):
            np.testing.assert_array_equal(got, want)
        cells = mem.lookup(ids)[1]
        sizes = np.bincount(cells[cells >= 0], minlength=model.V ** 2)
        assert ix.stats()["largest_cell"] == sizes.max()
    with Index.open(path, readonly=True) as ro:
        st = ro.stats()
        # steps end where a cell ends: at least 200 entries each
        assert st["merge_pending"] and 0 < st["staged"] <= 2500 - 2 * 200
        same(ro)
        before = st["staged"]
    with Index.open(path) as ix:
        ix.add(X[2500:2600])      # 3 x 100 entries of merge work: one more step
        mem.add(X[2500:2600])
        st = ix.stats()
        assert st["merge_pending"] and st["staged"] <= before - 200 + 100
        same(ix)
        assert ix.merge() == st["staged"] and ix.stats()["staged"] == 0
        assert not ix.stats()["merge_pending"]
        same(ix)
        assert ix.remove(np.arange(0, 2600, 3)) == mem.remove(np.arange(0, 2600, 3))
        same(ix)


def legacy_twin(path, n_ids: int, tags=None) -> Index:
    """An in-memory index of a legacy fixture's own model and codes (ids 0 .. n_ids - 1, with
    ``tags``): what it holds, whatever this build and CPU make of the setup's data (the last
    bit of a projection differs between an AVX2 and an AVX-512 build, so a model trained here
    may differ from the one the fixture was written with)."""
    with Index.open(path, readonly=True) as ro:
        model = ro.model
        found, cells, fine = ro.lookup(np.arange(n_ids))
    assert found.all()
    mem = Index.in_memory(model, tags=tags is not None)
    mem.add_codes((model.get_coarse_codes_for_cell_id(cells), fine), np.arange(n_ids),
                  tags=tags)
    return mem


@pytest.mark.parametrize("fixture,n_ids", [("legacy-v1", 1000), ("legacy-v2", 1300),
                                           ("legacy-v3", 1300)])
def test_legacy_index_reads_as_is_and_is_upgraded_when_written(setup, tmp_path, fixture,
                                                               n_ids):
    """Indexes written by earlier cypq (format 1: no stage; format 2: per-cell size records
    and 300 staged entries; format 3: id-table rows for staged entries, a merge cut short;
    tests/data/make_legacy_indexes.py) read as they are read-only and are upgraded to
    format 4 in one transaction when opened for writing."""
    import shutil
    import lmdb
    model, X, Q = setup
    path = tmp_path / "ix"
    shutil.copytree(os.path.join(HERE, "data", fixture), path)
    mem = legacy_twin(path, n_ids)
    want = mem.search(Q, k=10, quota=200)
    with Index.open(path, readonly=True) as ro:
        assert len(ro) == n_ids   # the setup's model, up to the last bit (legacy_twin)
        for h in range(2):
            np.testing.assert_array_equal(ro.model.Cs[h], model.Cs[h])
            np.testing.assert_allclose(np.stack(ro.model.subquantizers[h]),
                                       np.stack(model.subquantizers[h]), rtol=1e-4, atol=1e-5)
        got = ro.search(Q, k=10, quota=200)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        assert ro.stats()["staged"] == {"legacy-v2": 300, "legacy-v3": 135}.get(fixture, 0)
        assert ro.stats()["largest_cell"] == mem.stats()["largest_cell"]
        for got, want in zip(ro.lookup(np.arange(n_ids + 5)), mem.lookup(np.arange(n_ids + 5))):
            np.testing.assert_array_equal(got, want)
        if fixture == "legacy-v3":
            assert ro.verify() == []
    with Index.open(path) as ix:
        ix.add(X[n_ids:n_ids + 100])
        mem.add(X[n_ids:n_ids + 100])
        assert len(ix) == n_ids + 100 and ix.contains(np.arange(n_ids + 100)).all()
        assert ix.verify() == []
        for got, want in zip(ix.lookup(np.arange(n_ids + 105)),
                             mem.lookup(np.arange(n_ids + 105))):
            np.testing.assert_array_equal(got, want)
        assert ix.remove(np.arange(0, n_ids, 7)) == mem.remove(np.arange(0, n_ids, 7))
        assert ix.verify() == []
        np.testing.assert_array_equal(ix.search(Q, k=10, quota=200)[1],
                                      mem.search(Q, k=10, quota=200)[1])
    env = lmdb.open(str(path), max_dbs=8, readonly=True)
    with env.begin() as txn:
        meta = env.open_db(b"meta", txn=txn, create=False)
        assert txn.get(b"format", db=meta) == b"cypq-index" + (4).to_bytes(4, "big")
    env.close()
    with Index.open(path, readonly=True) as ro:
        np.testing.assert_array_equal(ro.search(Q, k=10, quota=200)[1],
                                      mem.search(Q, k=10, quota=200)[1])


@pytest.mark.parametrize("fixture,n_ids", [("legacy-v1", 1000), ("legacy-v2", 1300),
                                           ("legacy-v3", 1300)])
def test_legacy_index_gets_tags_in_place(setup, tmp_path, fixture, n_ids):
    """An index of an earlier cypq (values without checksums, staged records of format 2,
    a format 3 merge cut short) reads as all-zero tags and keeps them once tags are given:
    then it answers filters as an in-memory index given the same tags."""
    import shutil
    model, X, Q = setup
    path = tmp_path / "ix"
    shutil.copytree(os.path.join(HERE, "data", fixture), path)
    tags = (np.arange(n_ids) % 3 == 0).astype(np.uint64) | np.uint64(1 << 40)
    mem = legacy_twin(path, n_ids, tags)
    with Index.open(path) as ix:
        np.testing.assert_array_equal(ix.lookup(np.arange(n_ids), with_tags=True)[3], 0)
        ix.set_tags(np.arange(n_ids), tags)
        assert ix.verify() == []
        for kw in ({"tags_any": 1}, {"tags_none": 1}, {"tags_all": np.uint64(1 << 40)}):
            for got, want in zip(ix.search(Q, k=10, quota=200, **kw),
                                 mem.search(Q, k=10, quota=200, **kw)):
                np.testing.assert_array_equal(got, want)
    with Index.open(path, readonly=True) as ro:
        np.testing.assert_array_equal(ro.lookup(np.arange(n_ids), with_tags=True)[3], tags)


def test_search_after_every_add_equals_memory(setup, tmp_path, monkeypatch):
    """A process that searches between adds takes the stage in step by step (both tiers of
    its copy, folds, merges) and always answers as the in-memory index does."""
    from cypq.storage.lmdb import stage as S
    monkeypatch.setattr(S.StageView, "FOLD_MIN", 100)
    model, X, Q = setup
    mem = Index.in_memory(model)
    path = tmp_path / "ix"
    with Index.create(path, model, block_capacity=8, stage_capacity=1500) as ix, \
            Index.open(path, readonly=True) as reader:
        for s in range(0, 2900, 130):
            ix.add(X[s:s + 130])
            mem.add(X[s:s + 130])
            for who in (ix, reader):
                np.testing.assert_array_equal(who.search(Q, k=10, quota=150)[1],
                                              mem.search(Q, k=10, quota=150)[1])
            assert reader.stats()["largest_cell"] == mem.stats()["largest_cell"]
        assert 0 < ix.stats()["staged"] < 1500


@pytest.mark.parametrize("stage", [0, 700])
def test_segment_cache_carried_over_writes_equals_memory(setup, tmp_path, monkeypatch, stage):
    """A searching process carries its segment cache across generations (re-reading only
    the cells the log says were written, under pinned read transactions): after adds that
    split blocks, removes that move entries between blocks, replaces, merges and a map
    growth, every search still equals the in-memory index's; pins stay bounded and an idle
    process releases them."""
    import cypq.storage.lmdb.reader as R
    monkeypatch.setattr(R, "MAX_PINS", 4)
    model, X, Q = setup
    mem = Index.in_memory(model)
    path = tmp_path / "ix"
    rng = np.random.default_rng(3)
    with Index.create(path, model, block_capacity=4, stage_capacity=stage,
                      map_size=1 << 16) as ix, Index.open(path, readonly=True) as reader:
        pins = []
        for step in range(14):
            if step % 4 == 3:
                gone = rng.choice(len(mem) + 1, 60, replace=False)
                assert ix.remove(gone) == mem.remove(gone)
            elif step % 4 == 2:
                ids = rng.choice(len(mem), 40, replace=False)
                ix.add(X[3000 + step * 40:3040 + step * 40], ids, replace=True)
                mem.add(X[3000 + step * 40:3040 + step * 40], ids, replace=True)
            else:
                got = ix.add(X[step * 200:(step + 1) * 200])
                mem.add(X[step * 200:(step + 1) * 200], got)
            want = mem.search(Q, k=10, quota=120)
            for who in (ix, reader):
                got = who.search(Q, k=10, quota=120)
                np.testing.assert_array_equal(got[1], want[1])
                np.testing.assert_array_equal(got[0], want[0])
            pins.append(len(reader.storage._reader._cache.pins))
        # carried over (several pins), never more than MAX_PINS, and started afresh
        assert 3 <= max(pins) <= 4 and 1 in pins[1:], pins
        assert ix.stats()["map_size"] > 1 << 16        # the map grew on the way
        monkeypatch.setattr(R, "IDLE_RELEASE", 0.2)
        reader.storage._reader.invalidate()
        reader.search(Q[:2], k=5, quota=50)
        cache = reader.storage._reader._cache
        for _ in range(6):  # a process that keeps searching keeps its cache
            time.sleep(0.1)
            reader.search(Q[:2], k=5, quota=50)
            assert reader.storage._reader._cache is cache
        time.sleep(1.0)
        assert reader.storage._reader._cache is None    # an idle process holds no pins
        np.testing.assert_array_equal(reader.search(Q, k=10, quota=120)[1],
                                      mem.search(Q, k=10, quota=120)[1])


def test_random_id_adds_through_merge_steps_equal_memory(setup, tmp_path, monkeypatch):
    """Adds of random ids while merges go on a step at a time: after every add (states in
    both phases of a merge, a frozen and an active stage at once) searches, lookups and
    verify agree with the in-memory index; a taken id is refused wherever it lives (id
    table, frozen stage merged or not, active stage); a replace goes through a full merge."""
    import cypq.storage.lmdb.writer as W
    monkeypatch.setattr(W, "MERGE_STEP", 60)
    model, X, Q = setup
    ids = np.random.default_rng(3).choice(2 ** 62, len(X), replace=False).astype(np.int64)
    mem = Index.in_memory(model)
    phases = set()
    with Index.create(tmp_path / "ix", model, block_capacity=8, stage_capacity=400) as ix, \
            Index.open(tmp_path / "ix", readonly=True) as reader:
        for s in range(0, 3000, 50):
            ix.add(X[s:s + 50], ids[s:s + 50])
            mem.add(X[s:s + 50], ids[s:s + 50])
            with ix.storage._env.read() as txn:
                st = ix.storage._env.stage_meta(txn)
            phase = ("blocks" if st.below < model.V ** 2 else "ids") if st.frozen else "none"
            phases.add((phase, st.n_active > 0))
            if s % 150 == 0 or phase == "ids":
                assert ix.verify() == [], (s, st)
                some = np.r_[ids[:s + 50:7], [1, 2 ** 62 + 5]]
                for got, want in zip(reader.lookup(some), mem.lookup(some)):
                    np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(reader.search(Q, k=10, quota=150)[1],
                                              mem.search(Q, k=10, quota=150)[1])
                taken = np.unique(ids[[0, s // 2, s + 49]])
                with pytest.raises(KeyError, match="already"):
                    ix.add(X[:len(taken)], taken)
        assert {("blocks", True), ("ids", True), ("none", True)} <= phases
        # a replace (some of the ids frozen or staged) merges everything first
        again = np.r_[ids[:10], ids[2980:3000]]   # in the blocks, and staged
        ix.add(X[:30], again, replace=True)
        mem.add(X[:30], again, replace=True)
        assert ix.stats()["staged"] == 30 and ix.verify() == [] and len(ix) == 3000
        np.testing.assert_array_equal(ix.search(Q, k=10, quota=300)[1],
                                      mem.search(Q, k=10, quota=300)[1])
        assert ix.remove(ids[::5]) == mem.remove(ids[::5])
        assert ix.verify() == [] and len(ix) == len(mem)
        for got, want in zip(ix.lookup(ids[:3000]), mem.lookup(ids[:3000])):
            np.testing.assert_array_equal(got, want)


TWO_WRITERS = textwrap.dedent("""
    import sys, numpy as np, cypq, cypq.storage.lmdb.writer as W
    W.MERGE_STEP = 40                       # many merge steps, interleaved with the other writer
    ix = cypq.Index.open(sys.argv[1])
    X = np.load(sys.argv[2])
    ids = np.load(sys.argv[3])
    for s in range(0, len(ids), 50):
        ix.add(X[ids[s:s + 50] % len(X)], ids[s:s + 50])
        if s % 500 == 0:
            ix.search(X[:5], k=5, quota=100)   # its stage copy moves with the other's writes
""")


def test_two_writer_processes_with_random_ids(setup, tmp_path):
    """Two processes add random ids at once (freezes, merge steps and stage records of both
    interleave): the result verifies, and equals the in-memory index of every add."""
    model, X, Q = setup
    path = tmp_path / "ix"
    Index.create(path, model, block_capacity=8, stage_capacity=300).close()
    np.save(tmp_path / "x.npy", X)
    ids = np.random.default_rng(12).choice(2 ** 60, 2 * 4000, replace=False).astype(np.int64)
    for j in range(2):
        np.save(tmp_path / f"ids{j}.npy", ids[j::2])
    procs = [subprocess.Popen([sys.executable, "-c", TWO_WRITERS, str(path),
                               str(tmp_path / "x.npy"), str(tmp_path / f"ids{j}.npy")],
                              cwd=HERE, stderr=subprocess.PIPE, text=True) for j in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    mem = Index.in_memory(model)
    mem.add(X[ids % len(X)], ids)
    with Index.open(path) as ix:
        assert ix.verify() == [] and len(ix) == len(ids)
        for got, want in zip(ix.lookup(ids), mem.lookup(ids)):
            np.testing.assert_array_equal(got, want)
        assert ix.merge() >= 0 and ix.verify() == []
        for quota in (0, 300):
            np.testing.assert_array_equal(ix.search(Q, k=10, quota=quota)[0],
                                          mem.search(Q, k=10, quota=quota)[0])
