"""4-bit LOPQ codes stored two per byte: layout, search against the reference, storage, errors."""
import warnings

import lmdb
import numpy as np
import pytest

from cypq import Index, LOPQModel
from cypq.code_layout import PACKED4, CodeLayout
from cypq.storage.lmdb import IndexFormatError

import lopq_reference as ref
from conftest import clustered


def _fit(dim, V, M, S=16, n=3000, seed=61):
    X = clustered(n, dim, n_clusters=12, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = LOPQModel(V=V, M=M, subquantizer_clusters=S).fit(X, random_state=seed)
    return model, X, clustered(12, dim, n_clusters=12, seed=seed + 1)


@pytest.fixture(scope="module")
def small():
    return _fit(16, V=5, M=8)


def test_pack_unpack_against_bit_arithmetic():
    rng = np.random.default_rng(0)
    fine = rng.integers(0, 16, (50, 12)).astype(np.uint8)
    layout = CodeLayout(12, True, 6, np.dtype(np.uint8))
    packed = layout.pack(fine)
    want = np.array([[int(r[2 * j]) + 16 * int(r[2 * j + 1]) for j in range(6)] for r in fine])
    np.testing.assert_array_equal(packed, want)
    np.testing.assert_array_equal(layout.unpack(packed), fine)


def test_layout_choice(small):
    model, X, _ = small
    assert Index.in_memory(model).packed
    assert not Index.in_memory(model, pack_codes=False).packed
    m6 = _fit(12, V=4, M=6)[0]   # a half of 3 codes would not fill whole bytes
    assert not Index.in_memory(m6).packed
    with pytest.raises(ValueError, match="M a multiple of 4"):
        Index.in_memory(m6, pack_codes=True)
    m8bit = _fit(16, V=4, M=4, S=20)[0]
    with pytest.raises(ValueError, match="4-bit codes"):
        Index.in_memory(m8bit, pack_codes=True)


@pytest.mark.parametrize("dim,M", [(16, 8), (48, 12), (64, 16), (64, 32), (96, 48), (128, 64)])
def test_packed_search_equals_reference(dim, M, n_threads):
    """Code widths of 4, 6 (generic loop), 8, 16, 24 and 32 bytes (unrolled): distances and ids
    as LOPQ's reference scoring of the same codes."""
    model, X, Q = _fit(dim, V=4, M=M, n=1500, seed=dim + M)
    index = Index.in_memory(model, n_threads=n_threads)
    assert index.packed
    index.add(X)
    ref.assert_search_matches(index, model, X, np.arange(len(X)), Q, 12, 300)


def test_packed_and_unpacked_indexes_agree(small):
    model, X, Q = small
    a, b = Index.in_memory(model, pack_codes=True), Index.in_memory(model, pack_codes=False)
    ids = np.arange(len(X)) * 5
    a.add(X, ids)
    b.add(X, ids)
    assert a.storage.code_width == model.M // 2 and b.storage.code_width == model.M
    Da, Ia = a.search(Q, k=20, quota=500)
    Db, Ib = b.search(Q, k=20, quota=500)
    np.testing.assert_allclose(Da, Db, rtol=1e-5, atol=1e-4)
    assert (Ia == Ib).mean() > 0.95     # only near-ties may swap
    for got, want in zip(a.lookup(ids[:40]), b.lookup(ids[:40])):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(a.lookup(ids[:40])[2], model.predict(X[:40]).fine)


def test_lmdb_packed_equals_memory_and_records_its_kind(small, tmp_path, n_threads):
    model, X, Q = small
    mem = Index.in_memory(model, n_threads=n_threads)
    mem.add(X)
    path = tmp_path / "ix"
    with Index.create(path, model, n_threads=n_threads, stage_capacity=1000,
                      block_capacity=8) as disk:
        for s in range(0, len(X), 600):
            disk.add(X[s:s + 600])
        for quota in (0, 100, 700):
            for got, want in zip(disk.search(Q, k=10, quota=quota),
                                 mem.search(Q, k=10, quota=quota)):
                np.testing.assert_array_equal(got, want)
        assert disk.verify() == []
    with Index.open(path, readonly=True) as ro:
        assert ro.packed and PACKED4 in ro.storage.features
        np.testing.assert_array_equal(ro.lookup(np.arange(30))[2], model.predict(X[:30]).fine)
        copy = ro.compact(tmp_path / "compact")
        assert copy.packed and copy.storage.code_width == model.M // 2
        np.testing.assert_array_equal(copy.search(Q, k=10)[1], mem.search(Q, k=10)[1])
        copy.close()
    assert _format_version(path) == 5
    # an unpacked index stays format 4, which cypq 0.2 reads
    with Index.create(tmp_path / "plain", model, pack_codes=False) as plain:
        plain.add(X[:10])
    assert _format_version(tmp_path / "plain") == 4


def _format_version(path) -> int:
    """The format version an index's meta[format] record names."""
    env = lmdb.open(str(path), max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            fmt = txn.get(b"format", db=env.open_db(b"meta", txn=txn, create=False))
    finally:
        env.close()
    assert fmt[:-4] == b"cypq-index"
    return int.from_bytes(fmt[-4:], "big")


def test_older_cypq_refuses_a_packed_index(small, tmp_path, monkeypatch):
    """cypq 0.2 reads formats up to 4: a packed index (format 5) is refused with a message
    saying to upgrade; a reader that does not know a feature refuses it the same way."""
    import cypq.storage.base as B
    import cypq.storage.lmdb.env as E
    model, X, _ = small
    with Index.create(tmp_path / "ix", model) as ix:
        ix.add(X[:100])
    monkeypatch.setattr(E, "FEATURES_VERSION", 4)
    with pytest.raises(IndexFormatError, match="newer cypq.*upgrade cypq"):
        Index.open(tmp_path / "ix")
    monkeypatch.undo()
    monkeypatch.setattr(B, "KNOWN_FEATURES", frozenset())
    with pytest.raises(IndexFormatError, match="codes4.*upgrade cypq"):
        Index.open(tmp_path / "ix", readonly=True)
    monkeypatch.undo()
    with Index.open(tmp_path / "ix") as ix:
        assert len(ix) == 100


def test_wide_codes_refused_nothing_stored(small, tmp_path):
    model, X, _ = small
    with Index.create(tmp_path / "ix", model) as ix:
        ix.add(X[:50])
        code = model.predict(X[50:60])
        bad = code.fine.astype(np.int64)
        bad[3, 2] = 16
        with pytest.raises(ValueError, match=r"values in \[0, 16\] but Ks=16"):
            ix.add_codes((code.coarse, bad), np.arange(1000, 1010))
        assert len(ix) == 50 and not ix.contains(np.arange(1000, 1010)).any()
        with pytest.raises(ValueError, match="shape"):
            ix.add_codes((code.coarse, code.fine[:, :4]), np.arange(1000, 1010))
        assert ix.verify() == [] and len(ix) == 50


@pytest.fixture
def scan_path():
    """Limit the 4-bit scan to a path ("best", "avx2", "portable"; returns the one a 16-byte
    code then takes), back to the best after the test."""
    from cypq import _search
    yield _search.fast_scan
    _search.fast_scan("best")


@pytest.fixture
def first_sweep():
    """Set the two-phase scan's first sweep (per cent of k; 0: off), back to the default after."""
    from cypq import _search
    yield _search.two_phase
    _search.two_phase()   # (its default)


@pytest.mark.parametrize("V", [3, 16])
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dim,M", [(32, 16), (48, 24), (64, 32), (96, 48), (128, 64), (48, 12),
                                   (40, 20), (80, 40), (16, 8), (192, 96), (256, 128)])
def test_fast_scan_bounds_change_nothing(dim, M, metric, V, n_threads, scan_path, first_sweep):
    """The in-register bounds (uint8 tables, fastscan.h) only skip codes whose exact sum
    cannot enter the top k: the VBMI and the AVX2 paths return the same ids and bit-identical
    distances as the portable float path, at a small k (a tight threshold, most codes
    rejected by their bound) and a large one, with cells of hundreds of codes (V=3: several
    of the AVX2 path's 32-code blocks and VBMI's 16-code ones, and their tails) and of a few
    (V=16: ~16 on average, many below VBMI's 5 where it steps 1-4 codes at a time). "best"
    takes the two-phase scan where it runs (first sweep on; with AVX-512, its sweeps sum 16
    rows at a time and its transposing bounds loops are AVX-512VL builds, and with VBMI its
    bounds come in blocks of 16 for M % 8 == 0 up to 48) and, with it off, VBMI where the
    CPU has it for M % 8 == 0 up to 64; AVX2 for the others up to 128 (M = 96: MANMINILM's
    48-byte codes). M = 40 and 96 take the loops' generic width (the common widths have their
    own unrolled copies)."""
    X = clustered(4000, dim, n_clusters=16, seed=dim + M)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = LOPQModel(V=V, M=M, subquantizer_clusters=16, metric=metric).fit(
            X, random_state=M)
    index = Index.in_memory(model, n_threads=n_threads)
    index.add(X)
    Q = clustered(20, dim, n_clusters=16, seed=dim + M + 1)
    taken = {limit: scan_path(limit) for limit in ("portable", "avx2", "best")}
    assert taken["portable"] == "portable"
    for k, quota in ((3, 2000), (40, 0), (1, 50)):
        scan_path("portable")
        D0, I0 = index.search(Q, k=k, quota=quota)
        for limit in ("avx2", "best"):
            scan_path(limit)
            for first in TWO_PHASE:
                first_sweep(first)
                D1, I1 = index.search(Q, k=k, quota=quota)
                np.testing.assert_array_equal(I1, I0)
                np.testing.assert_array_equal(D1, D0)


# The AVX2 path's two-phase scan (_search.pyx): its first sweep by default (120 per cent of
# k), one code and 30% more each time until the top k fills, or off (cell by cell, as a
# filtered scan).
TWO_PHASE = (120, 1, 0)


@pytest.mark.parametrize("k", [1, 7, 100])
def test_two_phase_scan_equals_reference(k, n_threads, scan_path, first_sweep):
    """The two-phase scan against LOPQ's reference scoring and, bit for bit, against the
    portable path, with every first sweep: one that leaves the top k short, k above the codes
    scanned, ties (repeated vectors: equal bounds and distances, ranked by id). (Several
    segments per cell: the LMDB storage test above, whose staged blocks hold 8 codes.)"""
    model, X, Q = _fit(64, V=3, M=16, n=1200, seed=k)
    X = np.concatenate([X, X[:300]])
    index = Index.in_memory(model, n_threads=n_threads)
    index.add(X)
    for quota in (0, 30, 400):
        scan_path("portable")
        D0, I0 = index.search(Q, k=k, quota=quota)
        scan_path("best")
        for first in TWO_PHASE:
            first_sweep(first)
            D1, I1 = index.search(Q, k=k, quota=quota)
            ref.assert_search_matches(index, model, X, np.arange(len(X)), Q, k, quota)
            np.testing.assert_array_equal(I1, I0)
            np.testing.assert_array_equal(D1, D0)


@pytest.mark.parametrize("k", [7, 100, 200])
def test_top_k_sort_ways_agree(k, n_threads):
    """The top k's final sort in AVX-512 registers (sortnet.h, up to 256 entries held: k = 7
    and 100, whose two-phase first sweeps hold ~1.2 k) and by radix (sort_network(False); and
    k = 200's 240 or more), over repeated vectors (equal distances ranked by id): the same
    ids and distances, and LOPQ's reference ranking."""
    from cypq import _search
    model, X, Q = _fit(64, V=3, M=16, n=1200, seed=k)
    X = np.concatenate([X, X[:300], X[:300]])
    index = Index.in_memory(model, n_threads=n_threads)
    index.add(X)
    try:
        out = {}
        for network in (True, False):
            _search.sort_network(network)
            out[network] = index.search(Q, k=k, quota=600)
    finally:
        _search.sort_network(True)
    np.testing.assert_array_equal(out[True][1], out[False][1])
    np.testing.assert_array_equal(out[True][0], out[False][0])
    ref.assert_search_matches(index, model, X, np.arange(len(X)), Q, k, 600)


def _blocks_reference(codes: np.ndarray) -> np.ndarray:
    """codes (n, W) uint8 in blocks of 32: block b's byte 32 c + r is byte c of row 32 b + r,
    rows past n zero (fastscan.h cypq_adc4_blocks)."""
    n, W = codes.shape
    padded = np.zeros((-(-n // 32) * 32, W), np.uint8)
    padded[:n] = codes
    return padded.reshape(-1, 32, W).transpose(0, 2, 1).ravel()


@pytest.mark.parametrize("W", [2, 4, 8, 12, 16, 20, 24, 32, 48, 64, 72])
def test_code_blocks_against_numpy(W, scan_path):
    """The blocks the two-phase scan reads (AVX2 in-register transposes, up to 64 bytes, and
    the portable loop) against a NumPy transpose; segments of 1, 31, 32, 33, 100 codes and
    an empty one, those without an address left alone."""
    from cypq import _search
    rng = np.random.default_rng(W)
    segs = [rng.integers(0, 256, (n, W), dtype=np.uint8) for n in (1, 31, 32, 33, 100, 0)]
    for limit in ("best", "portable"):
        scan_path(limit)
        outs = [np.full(-(-len(s) // 32) * 32 * W + 7, 0xAB, np.uint8) for s in segs]
        addresses = np.array([o.ctypes.data if i != 2 else 0 for i, o in enumerate(outs)],
                             np.uintp)
        _search.code_blocks(np.array([s.ctypes.data for s in segs], np.uintp),
                            np.array([len(s) for s in segs], np.int64), addresses, W, 2)
        for i, (s, o) in enumerate(zip(segs, outs)):
            want = _blocks_reference(s) if i != 2 else np.full(len(o) - 7, 0xAB, np.uint8)
            np.testing.assert_array_equal(o[:-7], want)
            assert (o[-7:] == 0xAB).all()   # nothing written past the blocks
    with pytest.raises(ValueError, match="one length and block address per segment"):
        _search.code_blocks(addresses, np.zeros(2, np.int64), addresses, W, 1)


@pytest.mark.parametrize("M", [8, 16, 48, 96])
def test_blocks_change_nothing(M, n_threads, scan_path, monkeypatch):
    """A batch's often-listed cells in blocks of 32 (cypq.scan_blocks: their bounds read
    without transposes, their float sums from the blocks) return the same ids and bit-identical
    distances as the same scan without blocks and as the portable path; with ties (repeated
    vectors) and cells of hundreds of codes and of a few."""
    import cypq.scan_blocks as SB
    import cypq.search as S
    from cypq import _search
    model, X, Q = _fit(2 * M if M < 96 else 192, V=3, M=M, n=2000, seed=M)
    X = np.concatenate([X, X[:200]])
    index = Index.in_memory(model, n_threads=n_threads)
    index.add(X)
    made = []   # each batch's block addresses (None: no blocks)

    def spy(*args, **kw):
        out = SB.code_blocks(*args, **kw)
        made.append(out[0])
        return out

    monkeypatch.setattr(S, "code_blocks", spy)
    for quota in (0, 300):
        scan_path("portable")
        D0, I0 = index.search(Q, k=50, quota=quota)
        scan_path("best")
        for visits, codes in ((1, 1), (10 ** 9, 1)):   # every cell in blocks, then none
            monkeypatch.setattr(SB, "MIN_VISITS", visits)
            monkeypatch.setattr(SB, "MIN_CODES", codes)
            made.clear()
            D1, I1 = index.search(Q, k=50, quota=quota)
            np.testing.assert_array_equal(I1, I0)
            np.testing.assert_array_equal(D1, D0)
            if _search.scans_blocks(M // 2):
                assert any(m is not None for m in made) == (visits == 1)
