"""LOPQ search (multi-sequence + ADC) against the pure-Python reference and LOPQ's facts."""
import mmap
import warnings
from pathlib import Path

import numpy as np
import pytest

import cypq
from cypq import Index, LOPQModel

import lopq_reference as ref
from conftest import clustered

LOPQ_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lopq"
needs_lopq_data = pytest.mark.skipif(not (LOPQ_DATA / "searcher_data.npy").exists(),
                                     reason="LOPQ reference fixtures not present")


@pytest.fixture(scope="module")
def setup():
    X = clustered(3000, 16, n_clusters=12, seed=41)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = LOPQModel(V=6, M=4, subquantizer_clusters=16).fit(X, random_state=2)
    Q = clustered(25, 16, n_clusters=12, seed=42)
    return model, X, Q


@pytest.mark.parametrize("distinct", ["table", "unique"])
@pytest.mark.parametrize("quota,k", [(50, 10), (300, 25), (5000, 40), (1, 5)])
def test_search_equals_reference(setup, quota, k, n_threads, distinct, monkeypatch):
    """Both ways of finding a batch's distinct cells: a bitmap over all cells (up to 16M
    cells) and np.unique (beyond)."""
    if distinct == "unique":
        import cypq.search
        monkeypatch.setattr(cypq.search, "_DENSE_CELLS", 0)
    model, X, Q = setup
    ids = np.arange(len(X)) * 3 + 7
    index = Index.in_memory(model, n_threads=n_threads)
    index.add(X, ids)
    D, I, st = index.search(Q, k=k, quota=quota, return_stats=True)
    entries = ref.entries_by_cell(model, X, ids)
    for qi, q in enumerate(Q):
        dists, rids, n_cells, n_cand, every = ref.search(model, entries, q, k, quota)
        assert st.visited[qi] == n_cells
        assert st.scanned[qi] == n_cand
        n = len(rids)
        np.testing.assert_allclose(D[qi, :n], dists, rtol=1e-4, atol=1e-3)
        assert (I[qi, n:] == -1).all() and np.isinf(D[qi, n:]).all()
        # every id returned is a candidate at the distance returned (ids differ only on ties)
        got = [every[int(i)] for i in I[qi, :n]]
        np.testing.assert_allclose(got, D[qi, :n], rtol=1e-4, atol=1e-3)
        assert len(set(I[qi, :n].tolist())) == n
        # ids strictly closer than the k-th distance are the same set (ties may swap)
        if n:
            cut = D[qi, n - 1] - 1e-3 * max(1.0, abs(D[qi, n - 1]))
            assert set(I[qi, :n][D[qi, :n] < cut].tolist()) == \
                {i for s, i in zip(dists, rids) if s < cut}


def _fit_search_vs_reference(dim, V, M, S, n_clusters, seed, k, quota, n_threads):
    """Fit a model on clustered data, search it, check every query against the reference."""
    X = clustered(250 * n_clusters // 2 + 1000, dim, n_clusters=n_clusters, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = LOPQModel(V=V, M=M, subquantizer_clusters=S).fit(X, random_state=seed)
    Q = clustered(7, dim, n_clusters=n_clusters, seed=seed + 1)
    index = Index.in_memory(model, n_threads=n_threads)
    index.add(X)
    ref.assert_search_matches(index, model, X, np.arange(len(X)), Q, k, quota)


def test_many_tables_per_query(n_threads):
    """Queries that visit every cell: tables for all 2 x 40 centroids, built four rows at a
    time with a tail."""
    _fit_search_vs_reference(16, V=40, M=4, S=16, n_clusters=40, seed=43, k=30, quota=0,
                             n_threads=n_threads)


@pytest.mark.parametrize("D,M,S", [(12, 4, 20), (32, 2, 256), (48, 4, 56), (96, 4, 56),
                                   (24, 8, 16), (32, 8, 16), (64, 8, 16)])
def test_table_shapes_equal_reference(D, M, S, n_threads):
    """Subquantizers of 3 dimensions (no fixed-size copy in the table kernel) and of 16, 12
    and 24 (unrolled widths); S not a multiple of the SIMD width (20), the full 256, and 56
    (on AVX-512: a pair of 16-wide blocks, one alone, then a scalar tail); 16 codewords (a
    table per vector, cypq_tables16) at 3, 4 and 8 dimensions."""
    _fit_search_vs_reference(D, V=5, M=M, S=S, n_clusters=10, seed=45, k=15, quota=400,
                             n_threads=n_threads)


def test_multisequence_order(setup):
    """Cells come in non-decreasing d0 + d1 and match LOPQ's rule."""
    model, _, Q = setup
    seq = list(ref.multisequence(model, Q[0]))
    assert len(seq) == model.V ** 2 and len({(a, b) for a, b, _ in seq}) == model.V ** 2
    d = [s for _, _, s in seq]
    assert all(d[i] <= d[i + 1] + 1e-4 for i in range(len(d) - 1))
    # the kernel visits the same cells (it returns the non-empty ones, sorted by id)
    from cypq import _search
    sizes = np.ones(model.V ** 2, dtype=np.int64)
    cells = np.empty((1, 20), np.int64)
    nc, nv, ncand = (np.empty(1, np.int64) for _ in range(3))
    _search.cell_order(np.ascontiguousarray(Q[:1]), model.Cs[0], model.Cs[1], sizes, 20, 0,
                       cells, nc, nv, ncand, 1)
    assert nv[0] == 20
    assert sorted(cells[0]) == sorted(a * model.V + b for a, b, _ in seq[:20])
    # with empty cells, up to every cell: the non-empty ones, ascending, each once
    sizes = np.random.default_rng(5).integers(0, 3, model.V ** 2)
    cells = np.empty((1, model.V ** 2), np.int64)
    for visits in (7, 17, 30, model.V ** 2):
        _search.cell_order(np.ascontiguousarray(Q[:1]), model.Cs[0], model.Cs[1], sizes, 0,
                           visits, cells, nc, nv, ncand, 1)
        want = sorted(c for c in (a * model.V + b for a, b, _ in seq[:visits]) if sizes[c])
        assert nv[0] == visits and cells[0, :nc[0]].tolist() == want
        assert ncand[0] == sizes[want].sum()


def _cell_order_reference(d0, d1, sizes, quota, w, cap, ordered=False):
    """Every cell in order of (d0 + d1 in float32, rank in half 0, rank in half 1), ranks by
    (distance, index); cut where the first limit is reached. Returns (cells, visited, cand):
    the non-empty visited cells ascending (``ordered``: in that order)."""
    V = len(d0)
    o0, o1 = np.argsort(d0, kind="stable"), np.argsort(d1, kind="stable")
    r0, r1 = np.meshgrid(np.arange(V), np.arange(V), indexing="ij")
    r0, r1 = r0.ravel(), r1.ravel()
    sums = (d0[o0][r0] + d1[o1][r1]).astype(np.float32)
    order = np.lexsort((r1, r0, sums))
    cell = o0[r0[order]] * V + o1[r1[order]]
    cum = np.cumsum(sizes[cell])
    full = np.cumsum(sizes[cell] > 0)
    stop = np.zeros(len(cell), bool)
    if quota > 0:
        stop |= cum >= quota
    if w > 0:
        stop |= np.arange(1, len(cell) + 1) >= w
    stop |= full >= cap
    n = int(np.argmax(stop)) + 1 if stop.any() else len(cell)
    visited = cell[:n]
    listed = visited[sizes[visited] > 0]
    return (listed if ordered else np.sort(listed)), n, int(cum[n - 1])


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("V, Dh", [(90, 3), (100, 20)])
@pytest.mark.parametrize("kind", ["integer", "tied"])
def test_cell_order_equals_reference(kind, V, Dh, ordered):
    """Against a full sort of all cells (more than a band holds, 4096): integer coordinates
    give exact distances and many equal sums; identical centroids make every sum equal (one
    band of a single value, taken 4096 cells at a time). V = 90 sorts the halves whole, by
    counting; V = 100 in two parts, the second only when the walk reaches it; Dh = 20 takes
    the centroid distances' blocks of 64 and 32 codewords and the rest. ``ordered``: the
    cells in multi-sequence order, every band sorted."""
    from cypq import _search
    rng = np.random.default_rng(7)
    if kind == "integer":
        C0, C1 = (rng.integers(0, 6, (V, Dh)).astype(np.float32) for _ in range(2))
    else:
        C0 = C1 = np.ones((V, Dh), np.float32)
    Q = rng.integers(0, 6, (5, 2 * Dh)).astype(np.float32)
    sizes = rng.integers(0, 3, V * V) * rng.integers(0, 2, V * V)
    for quota, w in [(1, 0), (40, 0), (3000, 0), (int(sizes.sum()), 0), (0, 5000), (0, 0),
                     (2000, 700), (10 ** 9, 0)]:
        cap = min(V * V, quota if quota > 0 else V * V, w if w > 0 else V * V)
        cells = np.empty((len(Q), cap), np.int64)
        nc, nv, ncand = (np.empty(len(Q), np.int64) for _ in range(3))
        _search.cell_order(Q, C0, C1, sizes, quota, w, cells, nc, nv, ncand, 2,
                           ordered=ordered)
        for qi, q in enumerate(Q):
            d0 = ((q[:Dh] - C0) ** 2).sum(1).astype(np.float32)
            d1 = ((q[Dh:] - C1) ** 2).sum(1).astype(np.float32)
            want, visited, cand = _cell_order_reference(d0, d1, sizes, quota, w, cap,
                                                        ordered)
            assert (nv[qi], ncand[qi]) == (visited, cand), (quota, w, qi)
            assert cells[qi, :nc[qi]].tolist() == want.tolist()


def test_w_caps_visited_cells(setup):
    model, X, Q = setup
    index = Index.in_memory(model)
    index.add(X)
    _, _, st = index.search(Q, k=5, quota=10**9, w=3, return_stats=True)
    assert (st.visited <= 3).all()
    _, _, st = index.search(Q, k=5, quota=0, return_stats=True)  # every cell
    assert (st.scanned == len(X)).all()


def test_data_and_codes_give_same_results(setup):
    model, X, Q = setup
    a, b = Index.in_memory(model), Index.in_memory(model)
    ids = a.add(X)
    b.add_codes(model.predict(X), ids)
    Da, Ia = a.search(Q, k=10, quota=200)
    Db, Ib = b.search(Q, k=10, quota=200)
    np.testing.assert_array_equal(Ia, Ib)
    np.testing.assert_array_equal(Da, Db)


def test_remove_and_replace_keep_search_consistent(setup):
    model, X, Q = setup
    index = Index.in_memory(model)
    ids = index.add(X)
    assert len(index) == len(X) and index.contains(ids[:3]).all()
    gone = ids[::2]
    assert index.remove(gone) == len(gone)
    assert index.remove(gone) == 0
    assert len(index) == len(X) - len(gone) and not index.contains(gone).any()
    D, I = index.search(Q, k=20, quota=0)
    assert not np.isin(I, gone).any()
    # same as an index built from the kept vectors only
    fresh = Index.in_memory(model)
    fresh.add(X[1::2], ids[1::2])
    D2, I2 = fresh.search(Q, k=20, quota=0)
    np.testing.assert_allclose(D, D2, rtol=1e-6)
    # replace: id 1 now holds the vector of row 0
    with pytest.raises(KeyError, match="replace=True"):
        index.add(X[:1], [ids[1]])
    index.add(X[:1], [ids[1]], replace=True)
    found, cells, codes = index.lookup([ids[1]])
    code = model.predict(X[0])
    assert found[0] and cells[0] == model.get_cell_id_for_coarse_codes(code.coarse)
    assert tuple(codes[0]) == code.fine


def test_generated_ids_continue(setup):
    model, X, _ = setup
    index = Index.in_memory(model)
    a = index.add(X[:5])
    b = index.add(X[5:9])
    np.testing.assert_array_equal(np.concatenate([a, b]), np.arange(9))


def test_search_errors(setup):
    model, X, Q = setup
    index = Index.in_memory(model)
    index.add(X[:100])
    with pytest.raises(ValueError, match="dimension"):
        index.search(Q[:, :8])
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(Q, k=0)
    with pytest.raises(ValueError, match="quota must be >= 0, got -1"):
        index.search(Q, quota=-1)
    for quota in (2.5, "100"):   # (int() took 2.5 as 2, and said "invalid literal" of "a")
        with pytest.raises(TypeError, match="quota must be an integer"):
            index.search(Q, quota=quota)
    with pytest.raises(ValueError, match="unique"):
        index.add(X[:2], [5, 5])
    with pytest.raises(ValueError, match="non-negative"):
        index.add(X[:1], [-3])
    with pytest.raises(TypeError, match="LOPQModel"):
        Index.in_memory("model")
    with pytest.raises(cypq.NotFittedError):
        Index.in_memory(LOPQModel(V=4, M=4))
    D, I = Index.in_memory(model).search(Q[:2], k=3)  # empty index
    assert (I == -1).all() and np.isinf(D).all()
    index.close()
    with pytest.raises(ValueError, match="closed"):
        index.search(Q)


@needs_lopq_data
@pytest.mark.parametrize("as_codes", [False, True])
def test_lopq_searcher_facts(as_codes):
    model = LOPQModel.load_proto(str(LOPQ_DATA / "random_test_model.lopq"))
    data = np.load(LOPQ_DATA / "searcher_data.npy")
    index = Index.in_memory(model)
    if as_codes:
        index.add_codes(model.predict(data), np.arange(len(data)))
    else:
        index.add(data)
    q = np.ones(8)
    for quota, limit, n_results, n_items, n_cells in [(10, None, 10, 12, 3),
                                                     (20, None, 20, 28, 5),
                                                     (20, 10, 10, 28, 5)]:
        D, I, st = index.search(q, k=limit or quota, quota=quota, return_stats=True)
        assert st.scanned[0] == n_items and st.visited[0] == n_cells
        assert (I[0] >= 0).sum() == n_results


def _metric_index(metric, norms, q_scale, tmp_path, where, n_threads):
    """(model, index, ids, X, Q): a model of ``metric`` trained on clustered vectors scaled
    by norms drawn from ``norms``, all of them added, in memory or on disk."""
    from conftest import clustered
    rng = np.random.default_rng(8)
    X = (clustered(3000, 16, n_clusters=10, seed=81) * rng.uniform(*norms, (3000, 1))
         ).astype(np.float32)
    Q = (clustered(20, 16, n_clusters=10, seed=82) * q_scale).astype(np.float32)
    model = LOPQModel(V=5, M=4, subquantizer_clusters=16, metric=metric).fit(
        X, random_state=1)
    ix = (Index.in_memory(model, n_threads=n_threads) if where == "memory" else
          Index.create(tmp_path / "ix", model, n_threads=n_threads))
    return model, ix, ix.add(X), X, Q


@pytest.mark.parametrize("where", ["memory", "lmdb"])
def test_inner_product_metric_against_brute_force(tmp_path, where, n_threads):
    """metric='ip': search returns inner products with the reconstructions, largest first,
    equal to a NumPy computation over every stored entry (quota 0); cells are visited by
    the inner product of the query halves with the coarse centroids (checked with one
    visited cell: the best of each half); vectors keep their norms (nothing scaled); the
    metric travels in the model file and the index."""
    model, ix, ids, X, Q = _metric_index("ip", (0.2, 5), 3, tmp_path, where, n_threads)
    code = model.predict(X)
    Xhat = model.reconstruct(code).astype(np.float64)
    ip = Q.astype(np.float64) @ Xhat.T
    order = np.argsort(-ip, axis=1, kind="stable")[:, :10]
    D, I = ix.search(Q, k=10, quota=0)
    np.testing.assert_allclose(D, np.take_along_axis(ip, order, 1), rtol=1e-4, atol=1e-4)
    assert (np.diff(D, axis=1) <= 1e-5).all()
    assert (I == ids[order]).mean() > 0.97               # ties aside
    # four visited cells: those whose centroids have the largest inner products (summed
    # over the halves)
    score = (Q[:, :8] @ model.Cs[0].T)[:, :, None] + (Q[:, 8:] @ model.Cs[1].T)[:, None, :]
    best = np.argsort(-score.reshape(len(Q), -1), axis=1)[:, :4]
    _, I4 = ix.search(Q, k=200, w=4)
    cell_of = dict(zip(ids.tolist(), model.get_cell_id_for_coarse_codes(code.coarse).tolist()))
    for q in range(len(Q)):
        assert {cell_of[i] for i in I4[q] if i >= 0} <= set(best[q].tolist()), q
    assert (I4 >= 0).sum() >= 100     # not all empty
    # the metric survives a file round trip; an l2 file stays LOPQ's bytes
    again = LOPQModel.from_proto_bytes(model.to_proto_bytes())
    assert again.metric == "ip" and again == model
    if where == "lmdb":
        ix.close()
        with Index.open(tmp_path / "ix", readonly=True) as ro:
            assert ro.model.metric == "ip"
            np.testing.assert_array_equal(ro.search(Q, k=10, quota=0)[1], I)


@pytest.mark.parametrize("where", ["memory", "lmdb"])
def test_cosine_metric_against_brute_force(tmp_path, where, n_threads):
    """metric='cosine': vectors of any norm are scaled to unit norm at every edge (training,
    add, search); search returns cosine similarities to the reconstructions, largest first,
    equal to a NumPy computation over every stored entry (quota 0: all cells); the metric
    travels in the model file and the index; a zero vector is refused."""
    model, ix, ids, X, Q = _metric_index("cosine", (0.1, 50), 7, tmp_path, where, n_threads)
    D, I = ix.search(Q, k=10, quota=0)
    # reference: unit query against every entry's reconstruction (unit-norm model space)
    found, _, fine = ix.lookup(ids)
    code = model.predict(X)
    np.testing.assert_array_equal(fine, code.fine)      # stored codes are of the unit vectors
    Xhat = model.reconstruct(code).astype(np.float64)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    sim = 1 - ((Qn[:, None, :] - Xhat[None, :, :]) ** 2).sum(-1) / 2
    order = np.argsort(-sim, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(D, np.take_along_axis(sim, order, 1), rtol=1e-4, atol=1e-5)
    assert (np.diff(D, axis=1) <= 1e-6).all()
    assert (I == ids[order]).mean() > 0.97               # ties aside
    # the same answer for queries of another scale; the metric survives a file round trip
    np.testing.assert_array_equal(ix.search(Q * 3, k=10, quota=0)[1], I)
    again = LOPQModel.from_proto_bytes(model.to_proto_bytes())
    assert again.metric == "cosine" and again == model
    l2 = LOPQModel(V=5, M=4, subquantizer_clusters=16, parameters=(
        model.Cs, model.Rs, model.mus, model.subquantizers))
    assert l2.metric == "l2" and b"cosine" not in l2.to_proto_bytes()
    with pytest.raises(ValueError, match="zero vector"):
        ix.add(np.zeros((2, 16), np.float32))
    with pytest.raises(ValueError, match="zero vector"):
        ix.search(np.zeros(16, np.float32))
    if where == "lmdb":
        ix.close()
        with Index.open(tmp_path / "ix", readonly=True) as ro:
            assert ro.model.metric == "cosine"
            np.testing.assert_array_equal(ro.search(Q, k=10, quota=0)[1], I)


def test_flatten_lists_and_list_buffer():
    """cell_lists' two pieces: the room for the lists (a mapping of its own when large) and
    the kernel that joins each row's first n_cells entries, against NumPy."""
    from cypq import _search
    from cypq.direct_scan import HUGE_FROM, list_buffer
    rng = np.random.default_rng(2)
    for nb, cap in [(3, 7), (5, HUGE_FROM // 8)]:      # np.empty, then a mapping
        cells = list_buffer(nb, cap)
        assert cells.shape == (nb, cap) and cells.dtype == np.int64 and cells.flags.writeable
        n = rng.integers(0, min(cap, 50) + 1, nb)
        n[0] = 0
        for q in range(nb):
            cells[q, :n[q]] = rng.integers(0, 10 ** 9, n[q])
        flat = np.empty(int(n.sum()), np.int64)
        _search.flatten_lists(cells, n, flat)
        np.testing.assert_array_equal(flat, np.concatenate([cells[q, :n[q]] for q in range(nb)]))
    with pytest.raises(ValueError, match="counts do not fit"):
        _search.flatten_lists(cells, np.full(nb, cap + 1), np.empty(nb * (cap + 1), np.int64))
    with pytest.raises(ValueError, match="exactly"):
        _search.flatten_lists(cells, n, np.empty(int(n.sum()) + 1, np.int64))
    # a search's batches take their lists from its room: one buffer, mapped when large
    from cypq.search import _Room

    def mapped(x):
        while isinstance(x, np.ndarray):
            x = x.base
        return isinstance(x.obj if isinstance(x, memoryview) else x, mmap.mmap)

    room = _Room()
    for nb, cap in [(3, 7), (5, HUGE_FROM // 8)]:
        a = list_buffer(nb, cap, room)
        assert mapped(a) == (cap > 7) == mapped(list_buffer(nb, cap))
        b = list_buffer(nb - 1, cap, room)                      # the last batch: fewer
        assert b.shape == (nb - 1, cap) and np.shares_memory(a, b)
        assert b.__array_interface__["data"][0] == a.__array_interface__["data"][0]
    c = list_buffer(5, HUGE_FROM // 8 + 1, room)                # more: a new buffer
    assert c.shape == (5, HUGE_FROM // 8 + 1) and not np.shares_memory(a, c)
    assert not np.shares_memory(list_buffer(3, 7, room), c)     # small ones apart from it


def test_distinct_cells_and_frame_rows():
    """scan_lists' bookkeeping kernels against NumPy: a batch's distinct cells with each
    listed cell's slot, and each query's distinct centroids of a half with each cell's row."""
    from cypq import _search
    rng = np.random.default_rng(5)
    V = 37
    n_cells = rng.integers(0, 40, 9)
    n_cells[3] = 0
    flat = rng.integers(0, V * V, int(n_cells.sum()))
    flat[:5] = V * V - 1          # the last cell, repeated
    for size in (V * V, V * V + 61):
        distinct, slot = np.empty(len(flat), np.int64), np.empty(len(flat), np.int64)
        nd = _search.distinct_cells(flat, size, distinct, slot)
        np.testing.assert_array_equal(distinct[:nd], np.unique(flat))
        np.testing.assert_array_equal(distinct[slot], flat)
    query_of = np.repeat(np.arange(len(n_cells)), n_cells)
    for h, centroid in ((0, flat // V), (1, flat % V)):
        cent, key_query = np.empty(len(flat), np.int32), np.empty(len(flat), np.int64)
        start, tab = np.empty(len(n_cells) + 1, np.int64), np.empty(len(flat), np.int32)
        m = _search.frame_rows(flat, n_cells, V, h, cent, key_query, start, tab)
        assert m == len({(q, c) for q, c in zip(query_of, centroid)})
        np.testing.assert_array_equal(start, np.searchsorted(key_query[:m], np.arange(10)))
        for q in range(len(n_cells)):
            rows = cent[start[q]:start[q + 1]]
            sel = query_of == q
            assert sorted(rows) == sorted(set(centroid[sel]))      # each centroid once
            np.testing.assert_array_equal(rows[tab[sel]], centroid[sel])
        np.testing.assert_array_equal(key_query[:m], np.repeat(np.arange(9), np.diff(start)))
    bad = flat.copy()
    bad[-1] = V * V
    with pytest.raises(ValueError, match="outside"):
        _search.distinct_cells(bad, V * V, np.empty(len(bad), np.int64),
                               np.empty(len(bad), np.int64))
    with pytest.raises(ValueError, match="outside"):
        _search.frame_rows(bad, n_cells, V, 0, np.empty(len(bad), np.int32),
                           np.empty(len(bad), np.int64), np.empty(10, np.int64),
                           np.empty(len(bad), np.int32))
    with pytest.raises(ValueError, match="add up"):
        _search.frame_rows(flat, n_cells + 1, V, 0, np.empty(len(flat), np.int32),
                           np.empty(len(flat), np.int64), np.empty(10, np.int64),
                           np.empty(len(flat), np.int32))


def test_bench_fastscan_phases_runs(setup):
    """tools/bench_fastscan's breakdown of a search's time swaps the kernel module for timed
    wrappers: every kernel the search calls must still be reachable through them (a kernel
    added to the search once broke it), and the search's results must not change."""
    import sys
    tools = str(Path(__file__).resolve().parent.parent / "tools")
    pytest.importorskip("faiss")
    sys.path.insert(0, tools)
    try:
        from bench_fastscan import phases
    finally:
        sys.path.remove(tools)
    model, X, Q = setup
    index = Index.in_memory(model)
    index.add(X, np.arange(len(X)))
    D, I = index.search(Q, k=100, quota=300)
    line = phases(index, Q, 300)
    for part in ("cell order", "local frames", "tables + scan", "the rest"):
        assert part in line
    D2, I2 = index.search(Q, k=100, quota=300)       # the kernels are back in place
    np.testing.assert_array_equal(I, I2)
    assert cypq.search._search.__name__ == "cypq._search"


def test_bench_retime_takes_turns_and_keeps_the_least_time(monkeypatch):
    """tools/bench_lopq's retime: each point timed again once per round, cypq's and the
    peer's points alternating, and each point's row and (system, setting, ms, recalls)
    keeping its least time (the clock scripted: no timing here)."""
    import argparse
    import sys
    tools = str(Path(__file__).resolve().parent.parent / "tools")
    sys.path.insert(0, tools)
    try:
        import bench_lopq
    finally:
        sys.path.remove(tools)
    gt = np.zeros((4, 1), np.int64)
    calls, clock = [], iter([0.008, 0.004, 0.012, 0.02,             # first timings (s)
                             0.006, 0.008, 0.004, 0.016,            # round 1
                             0.010, 0.002, 0.008, 0.012])           # round 2
    monkeypatch.setattr(bench_lopq, "best_of", lambda fn, repeat: (next(clock), fn()))

    def search(name):
        return lambda: (calls.append(name), (None, np.zeros((4, 100), np.int64)))[1]
    rows, mine, theirs, later = [], [], [], []
    args = argparse.Namespace(repeat=2)
    for name, points in (("cypq a", mine), ("cypq b", mine), ("faiss c", theirs),
                         ("faiss d", theirs)):
        bench_lopq.time_point(search(name), name, "s", 0.0, 0.0, args, gt, rows, points,
                              later)
    bench_lopq.retime(later, 2)
    assert calls[4:] == ["cypq a", "faiss c", "cypq b", "faiss d"] * 2
    # ms/query = s / 4 queries * 1000
    assert [p[2] for p in mine] == [1.5, 1.0] and [p[2] for p in theirs] == [0.5, 3.0]
    assert [float(r.split("|")[5]) for r in rows] == [1.5, 1.0, 0.5, 3.0]
    assert all(p[3][10] == 1.0 for p in mine + theirs)


def test_cell_reach_walks_as_the_index(setup):
    """tools/cell_reach.py's reach of a quota, computed from the cells' distances alone,
    against the index's own walk: a search whose k exceeds the base returns exactly the
    entries of the cells it visited."""
    import sys
    tools = str(Path(__file__).resolve().parent.parent / "tools")
    sys.path.insert(0, tools)
    try:
        from cell_reach import lopq_rows
    finally:
        sys.path.remove(tools)
    model, X, Q = setup
    nn = ((Q[:, None, :] - X[None]) ** 2).sum(-1).argmin(1)
    index = Index.in_memory(model)
    index.add(X, np.arange(len(X)))
    quotas = [1, 50, 300, 1200]
    rows = list(lopq_rows(model, X, Q, nn, quotas))
    assert [r[1] for r in rows] == [f"quota={q}" for q in quotas]
    assert list(lopq_rows(model, X, Q, nn, quotas, step=7)) == rows   # in chunks of queries
    for q, (_, _, (held, share)) in zip(quotas, rows):
        _, I = index.search(Q, k=len(X) + 1, quota=q)
        assert held == pytest.approx((I >= 0).sum(1).mean())
        assert share == pytest.approx(np.mean([n in row for n, row in zip(nn, I)]))
    assert 0 < rows[0][2][1] < rows[-1][2][1]    # the reach grows with the quota
