"""Shard sets: an index split by cell range into LMDB indexes that open as one; searches equal
the whole index's (ties included) for every kind of search; writes go to the owning shard
and keep ids unique; sets that are not whole or not one are refused; cypq build --shards."""
import os
import shutil
import warnings

import numpy as np
import pytest

from cypq import Index, IndexFormatError, LOPQModel
from cypq.cli import main as cli_main
from cypq.shards import create, shard_bounds, split

from conftest import clustered

N = 3000


@pytest.fixture(scope="module", params=["l2", "ip", "4bit"])
def setup(request):
    X = clustered(N, 16, n_clusters=12, seed=21)
    X[N - 40:] = X[:40]   # exact duplicates: ties across cells and shards
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = LOPQModel(V=8, M=4, metric="ip" if request.param == "ip" else "l2",
                          subquantizer_clusters=16 if request.param == "4bit" else 256
                          ).fit(X[:2000], random_state=5)
    Q = np.concatenate([clustered(20, 16, n_clusters=12, seed=22), X[:5]])
    tags = np.random.default_rng(6).integers(0, 8, N).astype(np.uint64)
    return model, X, Q, tags


def _whole(model, X, tags, path):
    ix = Index.create(path, model, vectors="float32", tags=["a", "b", "c"],
                      stage_capacity=500)
    for a in range(0, N, 700):   # blocks, merges and staged entries
        ix.add(X[a:a + 700], np.arange(a, min(a + 700, N)) * 3 + 1, tags=tags[a:a + 700])
    return ix


SEARCHES = [dict(quota=300), dict(quota=0), dict(quota=1000, w=7), dict(quota=300, rerank=20),
            dict(quota=300, tags_any="b"), dict(quota=200, tags_all=["a", "c"], plan="scan"),
            dict(quota=300, tags_none=1, plan="direct"), dict(quota=300, ids=np.arange(1, 900, 3)),
            dict(quota=300, exclude_ids=np.arange(1, 3000, 3))]


@pytest.mark.parametrize("n_shards", [1, 3, 7])
def test_a_split_index_searches_as_the_whole(setup, tmp_path, n_shards):
    model, X, Q, tags = setup
    with _whole(model, X, tags, tmp_path / "whole") as whole:
        with split(whole, tmp_path / "set", n_shards, step=400, block_capacity=16) as sset:
            assert len(sset) == len(whole) and sset.stats()["shards"] == n_shards
            assert sset.verify() == [] and sset.tag_names == ["a", "b", "c"]
            for kw in SEARCHES:
                for threads in (1, 2):
                    whole.n_threads = sset.n_threads = threads
                    want, got = whole.search(Q, k=15, **kw), sset.search(Q, k=15, **kw)
                    np.testing.assert_array_equal(got[1], want[1], err_msg=str(kw))
                    np.testing.assert_array_equal(got[0], want[0], err_msg=str(kw))
            ids = np.array([1, 4, 10**6])
            for a, b in zip(sset.lookup(ids, with_tags=True), whole.lookup(ids, with_tags=True)):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(sset.vectors(ids[:2]), whole.vectors(ids[:2]))
    # each shard owns its range, in order, and together they hold every entry once
    dirs = sorted(os.listdir(tmp_path / "set"))
    assert dirs == [f"shard-{j:04d}" for j in range(n_shards)]
    seen, last = 0, 0
    for d in dirs:
        with Index.open(tmp_path / "set" / d, readonly=True) as one:
            lo, hi = one.shard["cells"]
            assert lo == last and one.shard["count"] == n_shards
            sizes = one.stats()
            seen += sizes["vectors"]
            last = hi
    assert seen == N and last == model.V ** 2


def test_writes_go_to_the_owning_shard_and_match_the_whole(setup, tmp_path):
    model, X, Q, tags = setup
    ref = Index.in_memory(model, tags=["a", "b", "c"], vectors="float32")
    sset = create(tmp_path / "set", model, 4, tags=["a", "b", "c"], vectors="float32",
                  stage_capacity=300)
    for ix in (ref, sset):
        ix.add(X[:1000], tags=tags[:1000])                # fresh ids 0..999
        ix.add(X[1000:1500], tags=tags[1000:1500])        # 1000..1499: unique across shards
        with pytest.raises(KeyError, match="already in the index"):
            ix.add(X[1500:1502], ids=[5, 2000])
        # replaced by vectors of other cells: moved to other shards
        ix.add(X[2000:2300], ids=np.arange(0, 300), replace=True, tags=tags[2000:2300])
        assert ix.remove(np.arange(400, 600)) == 200
        assert ix.set_tags(np.arange(600, 700), np.full(100, 7, np.uint64)) == 100
        ix.merge()
    assert len(sset) == len(ref) == 1300 and sset.verify() == []
    # a set backs up as a set, and compacts into one index; both search as it does
    want = sset.search(Q, k=10, quota=300)
    sset.backup(tmp_path / "bk")
    with Index.open(tmp_path / "bk", readonly=True) as bk, sset.compact(tmp_path / "one") as one:
        assert bk.stats()["shards"] == 4 and one.shard is None and "shards" not in one.stats()
        for other in (bk, one):
            np.testing.assert_array_equal(other.search(Q, k=10, quota=300)[1], want[1])
    assert len(np.unique(np.concatenate([
        Index.open(tmp_path / "set" / d, readonly=True).lookup(np.arange(1500))[0].nonzero()[0]
        for d in sorted(os.listdir(tmp_path / "set"))]))) == 1300
    for kw in SEARCHES[:2] + SEARCHES[4:6]:
        want, got = ref.search(Q, k=10, **kw), sset.search(Q, k=10, **kw)
        np.testing.assert_array_equal(got[1], want[1], err_msg=str(kw))
        np.testing.assert_array_equal(got[0], want[0], err_msg=str(kw))
    sset.close()
    # a shard alone refuses entries of cells it does not own; its own are fine
    first = sorted(os.listdir(tmp_path / "set"))[0]
    with Index.open(tmp_path / "set" / first) as one:
        lo, hi = one.shard["cells"]
        cells = model.get_cell_id_for_coarse_codes(model.predict(X).coarse)
        inside, outside = np.flatnonzero((cells >= lo) & (cells < hi)), np.flatnonzero(cells >= hi)
        with pytest.raises(ValueError, match="does not own"):
            one.add(X[outside[:3]], ids=[10**6, 10**6 + 1, 10**6 + 2])
        one.add(X[inside[:2]], ids=[10**6, 10**6 + 1])


def test_sets_that_are_not_whole_or_not_one_are_refused(setup, tmp_path):
    model, X, Q, tags = setup
    with _whole(model, X, tags, tmp_path / "whole") as whole:
        split(whole, tmp_path / "a", 3).close()
        split(whole, tmp_path / "b", 3).close()
        with pytest.raises(FileExistsError, match="holds an index or shards"):
            split(whole, tmp_path / "a", 2)
    a = [str(tmp_path / "a" / f"shard-{j:04d}") for j in range(3)]
    b = [str(tmp_path / "b" / f"shard-{j:04d}") for j in range(3)]
    with Index.open(a[::-1], readonly=True) as anyorder:   # a list, in any order
        assert len(anyorder) == N
    with pytest.raises(IndexFormatError, match=r"shard \[1\] missing"):
        Index.open([a[0], a[2]])
    with pytest.raises(IndexFormatError,   # the same shard twice: named, with where
                       match=rf"shard \[2\] missing; shard 0 in {a[0]} and {a[0]} among"):
        Index.open([a[0], a[1], a[0]])
    with pytest.raises(IndexFormatError, match="different sets"):
        Index.open([a[0], b[1], a[2]])
    with pytest.raises(IndexFormatError, match="not a shard"):
        Index.open([a[0], str(tmp_path / "whole")])
    # one set's shards holding different models, and ranges that overlap
    other = LOPQModel(V=8, M=4, subquantizer_clusters=model.subquantizer_clusters,
                      metric=model.metric).fit(X[1000:], random_state=9)
    for name, models, cells in (("model", (model, other), ([0, 32], [32, 64])),
                                ("overlap", (model, model), ([0, 40], [30, 64]))):
        for j in range(2):
            Index.create(tmp_path / name / f"shard-{j:04d}", models[j], shard={
                "set": name, "number": j, "count": 2, "cells": cells[j]}).close()
    with pytest.raises(IndexFormatError, match="another model"):
        Index.open(tmp_path / "model")
    with pytest.raises(IndexFormatError, match="overlap or leave a gap"):
        Index.open(tmp_path / "overlap")
    shutil.rmtree(a[1])
    with pytest.raises(IndexFormatError, match="missing"):
        Index.open(tmp_path / "a")
    # a shard whose record of its place is damaged: an error, for the set and for itself
    import lmdb

    from cypq.storage import IndexCorruptError
    for junk in (b"{not json", b'{"set": "x", "number": 5, "count": 2, "cells": [0, 9]}',
                 b'{"set": "x", "number": 0, "count": 1, "cells": [9, 3]}'):
        env = lmdb.open(b[2], max_dbs=8)
        with env.begin(write=True) as txn:
            txn.put(b"shard", junk, db=env.open_db(b"meta", txn=txn))
        env.close()
        for target in (tmp_path / "b", b[2]):
            with pytest.raises(IndexCorruptError, match="meta.shard."):
                Index.open(target)


def test_a_set_without_tags_gets_them_in_place(setup, tmp_path):
    """keep_tags goes shard by shard; a set where it stopped half way is refused read-only
    and finished when next opened for writing; then it searches as a set made with tags."""
    model, X, Q, tags = setup
    ids = np.arange(N) * 3 + 1
    plain = Index.create(tmp_path / "plain", model, vectors="float32", stage_capacity=500)
    for a in range(0, N, 700):
        plain.add(X[a:a + 700], ids[a:a + 700])
    with plain, split(plain, tmp_path / "set", 3, step=400) as sset:
        assert not sset.storage.keeps_tags
    with Index.open(tmp_path / "set" / "shard-0001") as one:   # as if stopped after one
        one.keep_tags(["a", "b", "c"])
    with pytest.raises(IndexFormatError, match="interrupted"):
        Index.open(tmp_path / "set", readonly=True)
    with Index.open(tmp_path / "set") as sset, _whole(model, X, tags, tmp_path / "w") as whole:
        assert sset.storage.keeps_tags and sset.tag_names == ["a", "b", "c"]
        np.testing.assert_array_equal(sset.lookup(ids, with_tags=True)[3], 0)
        sset.set_tags(ids, tags)
        assert sset.verify() == []
        for kw in SEARCHES[4:7]:
            for got, want in zip(sset.search(Q, k=15, **kw), whole.search(Q, k=15, **kw)):
                np.testing.assert_array_equal(got, want, err_msg=str(kw))


def test_shard_bounds_balance_entries():
    rng = np.random.default_rng(3)
    sizes = rng.integers(0, 50, 400)
    sizes[100] = 5000                    # one huge cell: its shard holds it alone
    for n in (1, 2, 5, 17, 400):
        b = shard_bounds(sizes, n)
        assert b[0] == 0 and b[-1] == 400 and len(b) == n + 1 and np.all(np.diff(b) >= 1)
        per = np.add.reduceat(sizes, b[:-1])
        # a range ends at the first cell where the running sum reaches its share
        share = sizes.sum() / n
        assert per.max() <= max(share + sizes.max(), 1) and per.sum() == sizes.sum()
    np.testing.assert_array_equal(shard_bounds(np.zeros(12, np.int64), 4), [0, 3, 6, 9, 12])
    with pytest.raises(ValueError, match="shards must be in"):
        shard_bounds(sizes, 401)


def test_cli_build_shards_searches_as_the_whole(setup, tmp_path, capsys):
    model, X, Q, _ = setup
    np.save(tmp_path / "base.npy", X)
    np.save(tmp_path / "q.npy", Q)
    model.export_proto(tmp_path / "m.lopq")
    for name, extra in (("whole", []), ("set", ["--shards", "3"])):
        assert cli_main(["build", str(tmp_path / name), str(tmp_path / "base.npy"), "--model",
                         str(tmp_path / "m.lopq"), "-q", "--chunk", "700"] + extra) == 0
    assert "split into 3 shards" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "set")) == [f"shard-{j:04d}" for j in range(3)]
    outs = []
    for name in ("whole", "set"):
        assert cli_main(["search", str(tmp_path / name), str(tmp_path / "q.npy"), "-k", "5",
                         "--quota", "300"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == len(Q)
    assert cli_main(["info", str(tmp_path / "set")]) == 0
    assert "a shard set of 3 shards" in capsys.readouterr().out
    # an existing index split from the shell; a set backed up and compacted into one index
    for argv in (["split", tmp_path / "whole", tmp_path / "split", "--shards", "2"],
                 ["backup", tmp_path / "set", tmp_path / "bk"],
                 ["compact", tmp_path / "set", tmp_path / "one"]):
        assert cli_main([str(a) for a in argv]) == 0 and "wrote" in capsys.readouterr().out
    for name in ("split", "bk", "one"):
        assert cli_main(["search", str(tmp_path / name), str(tmp_path / "q.npy"), "-k", "5",
                         "--quota", "300"]) == 0
        assert capsys.readouterr().out == outs[0], name
    assert cli_main(["build", str(tmp_path / "set"), str(tmp_path / "base.npy"), "--model",
                     str(tmp_path / "m.lopq"), "-q", "--shards", "2"]) != 0
    assert "already holds a shard set" in capsys.readouterr().err
