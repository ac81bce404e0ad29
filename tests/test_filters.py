"""Filtered search (tags per entry, id lists) against the pure-Python LOPQ reference, both
plans, memory and LMDB; tags stored, changed and carried by every write path; bad input."""
import warnings

import numpy as np
import pytest

from cypq import Index, IndexCorruptError, IndexFormatError, LOPQModel
from cypq.bulk import bulk_load
from cypq.cli import main as cli_main
from cypq.vector_files import VectorSource

import lopq_reference as ref
from conftest import clustered

N = 1500


@pytest.fixture(scope="module", params=[16, 256], ids=["4bit", "8bit"])
def setup(request):
    X = clustered(N, 16, n_clusters=12, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = LOPQModel(V=6, M=4, subquantizer_clusters=request.param).fit(X, random_state=3)
    Q = clustered(9, 16, n_clusters=12, seed=12)
    rng = np.random.default_rng(4)
    # bit 0 on about half the entries, bit 1 on a tenth, bit 2 on a fiftieth, bit 63 on some
    tags = ((rng.random(N) < 0.5) * 1 + (rng.random(N) < 0.1) * 2
            + (rng.random(N) < 0.02) * 4).astype(np.uint64)
    tags[rng.random(N) < 0.3] |= np.uint64(1 << 63)
    return model, X, Q, tags


def _index(kind, model, tmp_path, **kw):
    if kind == "memory":
        return Index.in_memory(model, **kw)
    # a small stage: some entries merged into blocks, the last ones staged
    return Index.create(tmp_path / "ix", model, stage_capacity=400, **kw)


def _filled(kind, model, X, tags, tmp_path, n_threads=None):
    ids = np.arange(N, dtype=np.int64) * 2 + 5
    index = _index(kind, model, tmp_path, tags=["a", "b", "c"], n_threads=n_threads)
    for a in range(0, N, 300):   # several adds: blocks, a merge, staged records
        index.add(X[a:a + 300], ids[a:a + 300], tags=tags[a:a + 300])
    return index, ids


FILTERS = {
    "any": (dict(tags_any=2 | 4), lambda t, i: (t & 6) != 0),
    "all-names": (dict(tags_all=["a", "b"]), lambda t, i: (t & 3) == 3),
    "none-top-bit": (dict(tags_none=np.uint64(1 << 63)), lambda t, i: (t >> 63) == 0),
    "ids": (dict(ids=np.arange(5, 2 * N, 14)), lambda t, i: (i - 5) % 14 == 0 and i < 2 * N),
    "exclude-ids": (dict(exclude_ids=np.arange(5, 2 * N, 4)),
                    lambda t, i: (i - 5) % 4 != 0 or i >= 2 * N),
    "tags-and-ids": (dict(tags_any=1, ids=np.arange(5, 2 * N, 6), exclude_ids=[5, 17]),
                     lambda t, i: (t & 1) != 0 and (i - 5) % 6 == 0 and i < 2 * N
                     and i not in (5, 17)),
}


def _check(D, I, expect):
    """Results equal the reference's (dists, ids): same distances, the same ids but for
    ties, -1 / inf padding."""
    dists, rids = expect
    n = len(rids)
    np.testing.assert_allclose(D[:n], dists, rtol=1e-4, atol=1e-3)
    assert (I[n:] == -1).all() and np.isinf(D[n:]).all()
    if n:
        cut = D[n - 1] - 1e-3 * max(1.0, abs(D[n - 1]))
        assert set(I[:n][D[:n] < cut].tolist()) == {i for s, i in zip(dists, rids) if s < cut}


@pytest.mark.parametrize("kind", ["memory", "lmdb"])
@pytest.mark.parametrize("name", list(FILTERS))
def test_filtered_search_equals_reference(setup, kind, name, tmp_path, n_threads):
    """Every filter kind, both plans: with no quota, the exact top k of the passing entries
    by LOPQ's ADC; the walk with a quota visits cells in multi-sequence order until they
    hold that many passing entries (the reference's rule), and returns only passing ids."""
    model, X, Q, tags = setup
    index, ids = _filled(kind, model, X, tags, tmp_path, n_threads)
    kw, passes = FILTERS[name]
    tag_of = dict(zip(ids.tolist(), tags.tolist()))
    ok = lambda i: bool(passes(np.uint64(tag_of[i]), i))  # noqa: E731
    entries = ref.entries_by_cell(model, X, ids)
    k = 12
    for plan in ("scan", "direct"):
        D, I = index.search(Q, k=k, quota=0, plan=plan, **kw)
        for qi, q in enumerate(Q):
            dists, rids, *_ = ref.search(model, entries, q, k, 0, ok)
            _check(D[qi], I[qi], (dists, rids))
    import cypq.search
    n_pass = sum(ok(int(i)) for i in ids)
    for quota in (40, 200):
        # tables over the cells; reconstructions of the cells a walk over the passing
        # entries lists (scoring them all made dear: that way whenever the quota is below
        # their number); every passing entry reconstructed (the walk made dear)
        for plan, dear in (("scan", None), ("direct", "SCORE_NS"), ("direct", "CELL_NS")):
            with pytest.MonkeyPatch.context() as mp:
                if dear:
                    mp.setattr(cypq.search, dear, 1e9)
                D, I, st = index.search(Q, k=k, quota=quota, plan=plan, return_stats=True,
                                        **kw)
            assert (st.direct == (plan == "direct")).all()
            walked = dear == "SCORE_NS" and quota < n_pass
            for qi, q in enumerate(Q):
                dists, rids, n_cells, n_cand, _ = ref.search(model, entries, q, k,
                                                             quota if plan == "scan" or walked
                                                             else 0, ok)
                _check(D[qi], I[qi], (dists, rids))
                assert all(ok(int(i)) for i in I[qi] if i >= 0)
                if plan == "direct":   # the same candidates as the reference
                    assert st.scanned[qi] == n_cand
                    assert st.visited[qi] == (n_cells if walked else 0)
    index.close()


def test_per_query_masks_and_the_planner(setup, tmp_path):
    """An array of masks filters each query by its own; 'auto' scores a short id list (or
    a rare tag, found by the first walk) directly (no cells scanned), a common one by the
    walk, with the same results as the plan forced."""
    model, X, Q, tags = setup
    index, ids = _filled("lmdb", model, X, tags, tmp_path)
    masks = np.array([1, 2, 4] * 3, dtype=np.uint64)
    D, I = index.search(Q, k=8, quota=0, tags_any=masks)
    for qi in range(len(Q)):
        D1, I1 = index.search(Q[qi:qi + 1], k=8, quota=0, tags_any=int(masks[qi]))
        np.testing.assert_array_equal(I[qi], I1[0])
    few = ids[::50]
    D_auto, I_auto, st = index.search(Q, k=5, quota=100, ids=few, return_stats=True)
    assert st.direct.all() and (st.scanned == len(few)).all()
    D, I = index.search(Q, k=5, quota=0, ids=few, plan="scan")
    for qi in range(len(Q)):
        _check(D_auto[qi], I_auto[qi], (D[qi], I[qi].tolist()))
    _, _, st = index.search(Q, k=5, quota=100, tags_any=4, return_stats=True)   # ~2%: rare
    assert st.direct.all()
    _, _, st = index.search(Q[:1], k=5, quota=10, tags_none=4, return_stats=True)   # ~98%
    assert not st.direct.any() and (st.cells > 0).all()
    index.close()


@pytest.mark.parametrize("kind", ["memory", "lmdb"])
def test_tags_stored_changed_and_carried(setup, kind, tmp_path):
    """Tags read back with lookup; set_tags changes staged and merged entries in one
    write; remove / replace keep tags in step; compact, reopening and the bulk loader
    carry them."""
    model, X, Q, tags = setup
    index, ids = _filled(kind, model, X, tags, tmp_path)
    found, cells, codes, got = index.lookup(ids, with_tags=True)
    assert found.all()
    np.testing.assert_array_equal(got, tags)
    assert index.tag_names == ["a", "b", "c"]
    change = ids[::7]   # across blocks and the stage
    new = np.arange(len(change), dtype=np.uint64) | np.uint64(1 << 62)
    assert index.set_tags(np.r_[change, 10 ** 9], np.r_[new, np.uint64(1)]) == len(change)
    expect = tags.copy()
    expect[::7] = new
    np.testing.assert_array_equal(index.lookup(ids, with_tags=True)[3], expect)
    index.remove(ids[:10])
    index.add(X[10:12], ids[10:12], replace=True, tags=[7, 7])
    expect[10:12] = 7
    np.testing.assert_array_equal(index.lookup(ids[10:], with_tags=True)[3], expect[10:])
    D, I = index.search(Q, k=5, quota=0, tags_all=np.uint64(1 << 62))
    assert set(I[I >= 0].tolist()) <= set(change.tolist())
    # the per-bit counts the planner reads follow every change
    np.testing.assert_array_equal(index.storage.tag_counts(), _bits(expect[10:]))
    if kind == "lmdb":
        assert index.verify() == []
        copy = index.compact(tmp_path / "compact")
        np.testing.assert_array_equal(copy.lookup(ids[10:], with_tags=True)[3], expect[10:])
        assert copy.tag_names == ["a", "b", "c"]
        copy.close()
        index.close()
        with Index.open(tmp_path / "ix", readonly=True) as again:
            np.testing.assert_array_equal(again.lookup(ids[10:], with_tags=True)[3],
                                          expect[10:])
            D, I = again.search(Q, k=5, quota=0, tags_any=6)    # the walk, every cell
            D2, I2 = again.search(Q, k=5, quota=0, tags_any=6, plan="direct")
            for qi in range(len(Q)):   # equal up to float rounding (ties may swap)
                _check(D[qi], I[qi], (D2[qi], I2[qi].tolist()))
        np.save(tmp_path / "X.npy", X)
        np.save(tmp_path / "tags.npy", tags)
        bulk_load(tmp_path / "bulk", VectorSource.open(str(tmp_path / "X.npy")), model=model,
                  tags=str(tmp_path / "tags.npy"), chunk_size=400, progress=False,
                  out=lambda s: None)
        inc = Index.in_memory(model, tags=True)
        inc.add(X, tags=tags)
        with Index.open(tmp_path / "bulk") as bulk:
            np.testing.assert_array_equal(bulk.lookup(np.arange(N), with_tags=True)[3], tags)
            np.testing.assert_array_equal(bulk.storage.tag_counts(), _bits(tags))
            assert bulk.verify() == []
            for kw in ({"tags_any": 6}, {"tags_none": 1}):
                np.testing.assert_array_equal(bulk.search(Q, k=6, quota=300, **kw)[1],
                                              inc.search(Q, k=6, quota=300, **kw)[1])
    else:
        index.close()


@pytest.mark.parametrize("kind", ["memory", "lmdb"])
def test_index_without_tags_gets_them_in_place(setup, kind, tmp_path):
    """An index made without tags reads as all-zero tags and keeps them, in place, once
    tags are written (blocks, a merge and staged records, kept vectors, 4- and 8-bit
    codes): afterwards it answers every filter as an index made with tags from the start,
    and another handle opened before the change is told to open it again."""
    model, X, Q, tags = setup
    ids = np.arange(N, dtype=np.int64) * 2 + 5
    plain = _index(kind, model, tmp_path, vectors="float32")
    want = _index(kind, model, tmp_path / "w", vectors="float32", tags=True)
    for a in range(0, N, 300):
        plain.add(X[a:a + 300], ids[a:a + 300])
        want.add(X[a:a + 300], ids[a:a + 300])
    before = plain.search(Q, k=8, quota=200)
    other = Index.open(tmp_path / "ix", readonly=True) if kind == "lmdb" else None
    np.testing.assert_array_equal(plain.lookup(ids, with_tags=True)[3], 0)
    held = plain.storage.snapshot() if kind == "lmdb" else None
    old_snap = held.__enter__() if held else None   # a search under way in this process
    assert plain.set_tags(ids, tags) == N     # the index gets its tags here
    if held:
        with pytest.raises(IndexFormatError, match="search again"):
            old_snap.segments(np.arange(4))
        held.__exit__(None, None, None)
    want.set_tags(ids, tags)
    assert plain.storage.keeps_tags and plain.tag_names == []
    np.testing.assert_array_equal(plain.lookup(ids, with_tags=True)[3], tags)
    np.testing.assert_array_equal(plain.storage.tag_counts(), _bits(tags))
    for got, exp in zip(plain.search(Q, k=8, quota=200), before):
        np.testing.assert_array_equal(got, exp)
    np.testing.assert_array_equal(plain.vectors(ids[::5]), X[::5])
    for name, (kw, _) in FILTERS.items():
        for plan in ("scan", "direct") if name != "all-names" else ():   # bits unnamed
            for got, exp in zip(plain.search(Q, k=8, quota=200, plan=plan, **kw),
                                want.search(Q, k=8, quota=200, plan=plan, **kw)):
                np.testing.assert_array_equal(got, exp)
    if kind == "lmdb":
        assert plain.verify() == []
        with pytest.raises(IndexFormatError, match="open it again"):
            other.search(Q, k=3)
        other.close()
        plain.add(X[:5], ids[:5], replace=True, tags=[1] * 5)
        plain.close()
        with Index.open(tmp_path / "ix", readonly=True) as again:
            assert again.verify() == []
            np.testing.assert_array_equal(again.lookup(ids[:6], with_tags=True)[3],
                                          [1] * 5 + [tags[5]])
    # an explicit keep_tags names the bits
    named = _index("memory", model, tmp_path)
    named.add(X[:20])
    named.keep_tags(["x", "y"])
    named.set_tags([4], [2])
    assert named.tag_names == ["x", "y"]
    assert named.search(Q[:1], k=3, quota=0, tags_any="y")[1][0].tolist() == [4, -1, -1]


def test_tags_upgrade_refuses_a_damaged_block_and_changes_nothing(setup, tmp_path):
    import lmdb
    model, X, Q, tags = setup
    with Index.create(tmp_path / "ix", model, stage_capacity=0) as ix:
        ix.add(X[:200])
    env = lmdb.open(str(tmp_path / "ix"), max_dbs=16)
    with env.begin(write=True) as txn:
        blocks = env.open_db(b"blocks", txn=txn, create=False)
        key, value = next(iter(txn.cursor(db=blocks)))
        value = bytearray(value)
        value[-1] ^= 0x40     # a code byte: the layout stays valid, the checksum does not
        txn.put(key, bytes(value), db=blocks)
    env.close()
    with Index.open(tmp_path / "ix") as ix:
        with pytest.raises(IndexCorruptError, match="checksum"):
            ix.set_tags([1], [1])
        assert not ix.storage.keeps_tags and len(ix) == 200
    with Index.open(tmp_path / "ix", readonly=True) as ix:
        assert not ix.storage.keeps_tags and "checksum" in ix.verify()[0]


@pytest.mark.parametrize("plan", ["scan", "direct"])
def test_filtered_search_with_reranking(setup, tmp_path, plan):
    """A filter and re-ranking together: the exact top k of the passing entries' stored
    vectors among the passing ADC candidates (every entry here: quota 0, R = N)."""
    model, X, Q, tags = setup
    with Index.create(tmp_path / "rr", model, tags=True, vectors="float32") as index:
        index.add(X[:800], tags=tags[:800])
        index.add(X[800:], np.arange(800, N), tags=tags[800:])   # the last add staged
        D, I = index.search(Q, k=6, quota=0, rerank=N, tags_any=6, plan=plan)
    ok = (tags & 6) != 0
    exact = ((Q[:, None, :] - X[None]) ** 2).sum(-1)
    exact[:, ~ok] = np.inf
    want = np.sort(exact, axis=1)[:, :6]
    np.testing.assert_allclose(D, want, rtol=1e-4)
    assert ok[I].all()


@pytest.mark.parametrize("kind", ["memory", "lmdb"])
def test_direct_plan_reuses_reconstructions_until_a_write(setup, kind, tmp_path, monkeypatch):
    """The direct plan keeps the passing entries' reconstructions between calls of one
    index, and every write (add, set_tags, remove) makes it find them again."""
    import cypq.search
    model, X, Q, tags = setup
    index, ids = _filled(kind, model, X, tags, tmp_path)
    found = []
    real = cypq.search.passing_entries
    monkeypatch.setattr(cypq.search, "passing_entries",
                        lambda *a: found.append(1) or real(*a))
    search = lambda: index.search(Q, k=5, quota=0, tags_any=2, plan="direct")  # noqa: E731
    D1, I1 = search()
    D2, I2 = search()
    assert len(found) == 1 and np.array_equal(I1, I2) and np.array_equal(D1, D2)
    best = int(I1[0, 0])
    index.set_tags([best], [0])                 # the best one no longer passes
    assert best not in search()[1][0] and len(found) == 2
    index.add(Q[:1], [10 ** 6], tags=[2])       # the query itself now passes
    assert 10 ** 6 in search()[1][0] and len(found) == 3
    index.remove([10 ** 6])
    assert 10 ** 6 not in search()[1] and len(found) == 4
    index.set_tags([best], [2])
    assert search()[1][0, 0] == best and len(found) == 5
    index.close()


def _bits(tags) -> np.ndarray:
    """Reference per-bit counts of tag sets, bit by bit in Python."""
    return np.array([sum((int(t) >> j) & 1 for t in tags) for j in range(64)])


def test_damaged_tag_counts_are_named_by_verify(setup, tmp_path):
    import lmdb
    model, X, Q, tags = setup
    with Index.create(tmp_path / "d", model, tags=True) as index:
        index.add(X[:200], tags=tags[:200])
        index.merge()
        assert index.verify() == []
    env = lmdb.open(str(tmp_path / "d"), max_dbs=16)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        counts = np.frombuffer(txn.get(b"tag_counts", db=meta), "<u8").copy()
        counts[63] += 1
        txn.put(b"tag_counts", counts.tobytes(), db=meta)
    env.close()
    with Index.open(tmp_path / "d") as index:
        assert any("bit 63" in p for p in index.verify())


def test_bad_input_is_refused_and_nothing_is_lost(setup, tmp_path):
    model, X, Q, tags = setup
    index = Index.create(tmp_path / "t", model, tags=["x", "y"])
    index.add(X[:100], tags=tags[:100])
    for bad, err in ((np.ones(100, np.float32), ValueError), (-np.ones(100, np.int64),
                                                               ValueError),
                     (tags[:99], ValueError), (np.ones((100, 2), np.uint64), ValueError)):
        with pytest.raises(err, match="tags"):
            index.add(X[100:200], tags=bad)
    assert len(index) == 100
    with pytest.raises(KeyError, match="'z'.*x, y"):
        index.search(Q, tags_any="z")
    with pytest.raises(ValueError, match="passes nothing|pass nothing"):
        index.search(Q, tags_any=0)
    with pytest.raises(ValueError, match="masks for"):
        index.search(Q, tags_all=np.ones(3, np.uint64))
    with pytest.raises(ValueError, match="plan"):
        index.search(Q, tags_all=1, plan="fast")
    with pytest.raises(ValueError, match="1-d"):
        index.search(Q, ids=[[1, 2]])
    for name, bad, found in (("ids", [-5], "-5"),
                             ("exclude_ids", np.array([2**63], np.uint64), str(2**63))):
        with pytest.raises(ValueError, match=rf"{name} must be in \[0, 2\*\*63-1\], found {found}"):
            index.search(Q, **{name: bad})   # (-5: struct.error from the id table before)
    with pytest.raises(ValueError, match="tags must be"):
        index.set_tags([1, 2], [1.5, 2.5])
    with pytest.raises(ValueError, match="tag names"):
        Index.in_memory(model, tags=["dup", "dup"])
    np.testing.assert_array_equal(index.lookup(np.arange(100), with_tags=True)[3], tags[:100])
    index.close()
    with Index.create(tmp_path / "plain", model) as old:   # no tags: a rewrite adds them
        old.add(X[:50])
        with old.compact(tmp_path / "tagged", tags=["x"]) as new:
            assert new.tag_names == ["x"] and new.verify() == []
            np.testing.assert_array_equal(new.lookup(np.arange(50), with_tags=True)[3], 0)
            new.set_tags([3], [1])
            assert new.search(Q, k=2, quota=0, tags_any="x")[1][:, 0].tolist() == [3] * len(Q)
    plain = Index.in_memory(model)
    plain.add(X[:50])
    with pytest.raises(ValueError, match="keeps no tags"):
        plain.search(Q, tags_any=1)
    with pytest.raises(ValueError, match="tags must be"):   # checked before it gets tags
        plain.set_tags([0], [-1])
    assert len(plain) == 50 and not plain.storage.keeps_tags
    # an id filter needs no tags
    _, I = plain.search(Q, k=3, quota=0, ids=[3, 4, 5])
    assert set(I[I >= 0].tolist()) <= {3, 4, 5}


def test_cli_build_tags_and_filtered_search(setup, tmp_path, capsys):
    model, X, Q, tags = setup
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "Q.npy", Q)
    np.save(tmp_path / "tags.npy", tags)
    np.save(tmp_path / "ids.npy", np.arange(0, N, 3))
    model.export_proto(str(tmp_path / "m.lopq"))
    assert cli_main(["build", str(tmp_path / "ix"), str(tmp_path / "X.npy"), "--model",
                     str(tmp_path / "m.lopq"), "--tags", str(tmp_path / "tags.npy"), "-q"]) == 0
    capsys.readouterr()
    assert cli_main(["search", str(tmp_path / "ix"), str(tmp_path / "Q.npy"), "-k", "4",
                     "--tags-any", "0x6", "--ids-file", str(tmp_path / "ids.npy"),
                     "--quota", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    got = [int(p.split(":")[0]) for line in lines for p in line.split("\t")[1].split()]
    assert got and all(i % 3 == 0 and tags[i] & 6 for i in got)
    assert cli_main(["search", str(tmp_path / "ix"), str(tmp_path / "Q.npy"),
                     "--tags-any", "red"]) == 2
    assert "no tag named 'red'" in capsys.readouterr().err
    # `cypq add --tags` gives an index built without tags its first tags
    assert cli_main(["build", str(tmp_path / "plain"), str(tmp_path / "X.npy"), "--model",
                     str(tmp_path / "m.lopq"), "-q"]) == 0
    np.save(tmp_path / "one.npy", X[:2])
    np.save(tmp_path / "one_tags.npy", np.array([0, 1 << 40], np.uint64))
    assert cli_main(["add", str(tmp_path / "plain"), str(tmp_path / "one.npy"), "--tags",
                     str(tmp_path / "one_tags.npy")]) == 0
    capsys.readouterr()
    assert cli_main(["search", str(tmp_path / "plain"), str(tmp_path / "Q.npy"), "-k", "2",
                     "--tags-any", str(1 << 40), "--quota", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert {p.split(":")[0] for line in lines for p in line.split("\t")[1].split()} == {str(N + 1)}
