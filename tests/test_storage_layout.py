"""The LMDB value layouts on their own (pure NumPy), damaged values met by the read path, the
storage interface's rules, and the layering the design asks for."""
import ast
import os
import pathlib
import shutil
import zlib

import lmdb
import numpy as np
import pytest

from cypq import Index, IndexFormatError, LOPQModel, _buffers
from cypq.storage import IndexCorruptError
from cypq.storage.lmdb import layout as L

from conftest import clustered

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _entries(rng, n, M=4, dtype=np.uint8):
    return (np.sort(rng.integers(0, 50, n)), rng.integers(0, 1 << 62, n),
            rng.integers(0, 256, (n, M)).astype(dtype))


def test_searches_refuse_a_block_whose_checksum_fails(tmp_path):
    """A flipped code bit keeps a block's layout valid: the scan read it in place and scored
    the damaged code, silently; its checksum is now checked as the block enters the reader's
    cache, so searches (and an add that rewrites the block) refuse it."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((600, 16)).astype(np.float32)
    model = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X, random_state=0)
    path = tmp_path / "ix"
    with Index.create(path, model, stage_capacity=0) as ix:
        ix.add(X)
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        blocks = env.open_db(b"blocks", txn=txn)
        key, value = list(txn.cursor(db=blocks))[-1]
        txn.put(key, value[:-1] + bytes([value[-1] ^ 1]), db=blocks)
    env.close()
    cell, block = int.from_bytes(key[:8], "big"), int.from_bytes(key[8:], "big")
    same = X[model.get_cell_id_for_coarse_codes(model.predict(X).coarse) == cell][:1]
    with Index.open(path) as ix:   # (an add to that cell appends to its damaged last block)
        for call in (lambda: ix.search(X[:5], k=10, quota=0),
                     lambda: ix.add(same, [10**6])):
            with pytest.raises(IndexCorruptError,
                               match=rf"blocks\[cell {cell}, block {block}\]: its checksum"):
                call()
        assert len(ix) == len(X)
        assert any(f"blocks[cell {cell}" in line for line in ix.verify())


def test_keys_of_the_wrong_size_are_damage(tmp_path):
    """A damaged page can hand LMDB's reader keys of any size. Of the u64-keyed tables, the
    sizes and the stage are read when an index opens: refused there (NumPy's ValueError and
    struct.error before); the log, read later, verify reports (it raised struct.error)."""
    rng = np.random.default_rng(6)
    X = rng.standard_normal((300, 16)).astype(np.float32)
    model = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X, random_state=0)
    with Index.create(tmp_path / "ix", model) as ix:
        ix.add(X)
    for name, refused in ((b"log", None), (b"sizes", "sizes: a key that is not a u64"),
                          (b"stage", "must be 8 bytes is 12 bytes")):
        work = tmp_path / name.decode()
        shutil.copytree(tmp_path / "ix", work)
        env = lmdb.open(str(work), max_dbs=8)
        with env.begin(write=True) as txn:
            txn.put(b"\xff" * 12, bytes(16), db=env.open_db(name, txn=txn))
        env.close()
        if refused:
            with pytest.raises(IndexCorruptError, match=refused):
                Index.open(work, readonly=True)
        else:
            with Index.open(work, readonly=True) as ix:
                assert "log: a key of 12 bytes" in ix.verify()
                assert len(ix.search(X[:3], k=5)[1]) == 3


def test_block_checksums_in_c_match_zlib():
    """_buffers.crc32 (the loop _buffers.headers checks blocks with) is zlib's CRC-32, for
    every length and alignment; headers flags exactly the values whose checksum fails."""
    rng = np.random.default_rng(0)
    for n in list(range(40)) + [255, 4096, 100003]:
        raw = rng.integers(0, 256, n + 3, dtype=np.uint8).tobytes()
        for off in range(3):
            for start in (0, 0xDEADBEEF):
                view = memoryview(raw)[off:off + n]
                assert _buffers.crc32(view, start) == zlib.crc32(view, start)
    values = [L.encode_entries((np.arange(k),), np.zeros((k, 4), np.uint8), np.uint8)
              for k in (1, 5, 64)]
    values.append(values[1][:-1] + b"\x01")                   # a byte changed: fails
    values.append(values[2][:4] + b"\0\0\0\0" + values[2][8:])   # no checksum (cypq 0.1)
    n = len(values)
    addr, length = np.empty(n, np.uintp), np.empty(n, np.int64)
    count, ok = np.empty(n, np.int64), np.empty(n, np.uint8)
    _buffers.headers(values, addr, length, count, ok)
    assert ok.tolist() == [1, 1, 1, 0, 1] and count.tolist() == [1, 5, 64, 5, 64]
    with pytest.raises(IndexCorruptError, match="value 3: its checksum"):
        L.block_headers(values, lambda j: f"value {j}")


# ---------------------------------------------------------------------------- layout
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_entries_round_trip_and_checked_length(dtype):
    rng = np.random.default_rng(0)
    cells, ids, codes = _entries(rng, 37, 6, dtype)
    value = L.encode_entries((cells, ids), codes, dtype)
    assert len(value) == L.entries_size(37, 2, 6 * np.dtype(dtype).itemsize)
    c2, i2, k2 = L.decode_entries(value, 2, 6, dtype)
    np.testing.assert_array_equal(c2, cells)
    np.testing.assert_array_equal(i2, ids)
    np.testing.assert_array_equal(k2, codes)
    body_flip = value[:-3] + bytes([value[-3] ^ 0x10]) + value[-2:]
    with pytest.raises(IndexCorruptError, match="checksum"):   # layout intact, data not
        L.decode_entries(body_flip, 2, 6, dtype, "stage[3]")
    legacy = value[:4] + b"\0\0\0\0" + value[8:]              # cypq 0.1: no checksum
    assert L.checksum_ok(legacy) and L.decode_entries(legacy, 2, 6, dtype)[0].tolist() == \
        cells.tolist()
    for bad in (value[:-1], value[:5], value + b"\0",
                (38).to_bytes(4, "little") + value[4:],
                (0xFFFFFFFF).to_bytes(4, "little") + value[4:]):
        with pytest.raises(IndexCorruptError, match="stage"):
            L.decode_entries(bad, 2, 6, dtype, "stage[3]")


@pytest.mark.parametrize("vec,tagged", [(None, False), ((3, np.float16), False),
                                        ((3, np.float16), True), (None, True)],
                         ids=["codes", "with-vectors", "vectors-and-tags", "with-tags"])
def test_pack_and_unpack_blocks_against_a_per_cell_reference(vec, tagged):
    rng = np.random.default_rng(1)
    cells, ids, codes = _entries(rng, 300)
    vectors = None if vec is None else rng.normal(0, 9, (300, 3)).astype(np.float16)
    tags = rng.integers(0, 1 << 63, 300, dtype=np.uint64) * np.uint64(2) + np.uint64(1) \
        if tagged else None   # the top bit too: tags are bits, not numbers
    vb = 0 if vec is None else 6
    nc = 2 if tagged else 1
    first = rng.integers(0, 3, 50)[cells]  # each cell's first new block
    items, block_no = L.pack_blocks(cells, ids, codes, 8, first, vectors, tags)
    got = {}
    for key, value in items:
        c, b = L.CELL_BLOCK.unpack(key)
        assert L.checksum_ok(value) and bytes(value[4:8]) != b"\0\0\0\0"
        out = L.decode_entries(value, nc, 4, np.uint8, "b", vec)
        got[c, b] = (out[0], out[nc]) + tuple(out[nc + 1:]) + (out[1:nc],)
    assert [k for k, _ in items] == sorted(k for k, _ in items)   # key order: append mode
    for c in np.unique(cells):
        sel = np.flatnonzero(cells == c)
        for j, e in enumerate(sel):   # reference: the j-th entry of a cell goes to block j // 8
            b = first[e] + j // 8
            assert block_no[e] == b
            pos = j % 8
            assert got[c, b][0][pos] == ids[e]
            np.testing.assert_array_equal(got[c, b][1][pos], codes[e])
            if vec is not None:
                np.testing.assert_array_equal(got[c, b][2][pos], vectors[e])
            if tagged:
                assert got[c, b][-1][0].view(np.uint64)[pos] == tags[e]
    # the entries of many values, found at once and copied out, equal decoding each; a
    # short or miscounted value is named
    from cypq import _buffers
    values = [bytes(v) for _, v in items]
    counts = np.array([L.entry_count(v, "b", nc, 4, vb) for v in values])
    ids_at, tags_at, codes_at, vecs_at = L.entry_addresses(
        values, counts, 4, lambda j: f"value {j}", vb, nc)
    got_ids, got_codes = np.zeros(len(ids_at), "<i8"), np.zeros((len(ids_at), 4), np.uint8)
    _buffers.scatter(ids_at, 8 * np.arange(len(ids_at)), 8, got_ids.view(np.uint8))
    _buffers.scatter(codes_at, 4 * np.arange(len(ids_at)), 4, got_codes.reshape(-1))
    each = [L.decode_entries(v, nc, 4, np.uint8, "b", vec) for v in values]
    np.testing.assert_array_equal(got_ids, np.concatenate([e[0] for e in each]))
    np.testing.assert_array_equal(got_codes, np.concatenate([e[nc] for e in each]))
    if vec is not None:
        got_vecs = np.zeros((len(ids_at), 3), np.float16)
        _buffers.scatter(vecs_at, 6 * np.arange(len(ids_at)), 6, got_vecs.view(np.uint8).ravel())
        np.testing.assert_array_equal(got_vecs, np.concatenate([e[nc + 1] for e in each]))
    if tagged:
        got_tags = np.zeros(len(ids_at), "<u8")
        _buffers.scatter(tags_at, 8 * np.arange(len(ids_at)), 8, got_tags.view(np.uint8))
        np.testing.assert_array_equal(got_tags, np.concatenate([e[1] for e in each])
                                      .view(np.uint64))
    for bad, expect in ((values[:3] + [values[3][:-4]], counts[:4]),
                        (values[:4], counts[:4] + np.r_[0, 0, 0, 1]),
                        (values[:3] + [None], counts[:4])):
        with pytest.raises(IndexCorruptError, match="value 3"):
            L.entry_addresses(bad, expect, 4, lambda j: f"value {j}", vb, nc)
    with pytest.raises(ValueError, match="outside"):
        _buffers.scatter(ids_at[:2], np.array([0, len(ids_at) * 8 - 4]), 8,
                         got_ids.view(np.uint8))


def test_cell_runs_ranks_and_size_chunks():
    cells = np.array([2, 2, 5, 7, 7, 7], np.int64)
    np.testing.assert_array_equal(L.cell_runs(cells), [0, 2, 3, 6])
    np.testing.assert_array_equal(L.cell_ranks(cells), [0, 1, 0, 0, 1, 2])
    np.testing.assert_array_equal(L.cell_runs(cells[:0]), [0])
    n_cells = 3 * L.SIZE_CHUNK + 5
    sizes = np.zeros(n_cells, np.int64)
    sizes[[0, 300, n_cells - 1]] = [4, 2**32 - 1, 9]
    chunks = L.size_chunks(np.flatnonzero(sizes))
    padded = np.zeros(4 * L.SIZE_CHUNK, np.int64)
    padded[:n_cells] = sizes
    keys = b"".join(L.u64(c) for c in chunks.tolist())
    values = b"".join(L.sizes_value(padded.reshape(-1, L.SIZE_CHUNK)[c]) for c in chunks)
    np.testing.assert_array_equal(L.sizes_from_chunks(keys, values, n_cells), sizes)
    with pytest.raises(IndexCorruptError):
        L.sizes_from_chunks(keys, values[:-1], n_cells)
    with pytest.raises(IndexCorruptError, match="past"):
        L.sizes_from_chunks(keys, values, 2 * L.SIZE_CHUNK)
    with pytest.raises(ValueError):
        L.sizes_value(np.full(L.SIZE_CHUNK, 2**32))


# ---------------------------------------------------------------------------- damage
@pytest.fixture(scope="module")
def small():
    X = clustered(3000, 16, n_clusters=12, seed=61)
    model = LOPQModel(V=6, M=4, subquantizer_clusters=16).fit(X, random_state=2)
    return model, X


def _poke(path, db_name, change):
    """Rewrite every value of one database with change(key, value) (None: leave it)."""
    env = lmdb.open(str(path), max_dbs=8)
    db = env.open_db(db_name)
    with env.begin(write=True, db=db) as txn:
        for k, v in list(txn.cursor()):
            new = change(k, v)
            if new is not None:
                txn.put(k, new)
    env.close()


@pytest.mark.parametrize("damage", ["count_huge", "count_one_bit", "cut_short", "missing"])
def test_damaged_block_is_an_error_not_a_crash(small, tmp_path, damage):
    """A block whose header or length is wrong never reaches the kernel: the search raises
    IndexCorruptError naming the block (before: segfault or a read past the value)."""
    model, X = small
    path = tmp_path / "ix"
    with Index.create(path, model, block_capacity=16, stage_capacity=0) as ix:
        ix.add(X)
    hit = []

    def change(k, v):
        if hit:
            return None
        hit.append(k)
        if damage == "count_huge":
            return (0xFFFFFFFF).to_bytes(4, "little") + v[4:]
        if damage == "count_one_bit":
            n = int.from_bytes(v[:4], "little") | (1 << 16)
            return n.to_bytes(4, "little") + v[4:]
        return v[:len(v) // 2]
    if damage == "missing":
        env = lmdb.open(str(path), max_dbs=8)
        with env.begin(write=True, db=env.open_db(b"blocks")) as txn:
            txn.delete(next(iter(txn.cursor()))[0])
        env.close()
    else:
        _poke(path, b"blocks", change)
    with Index.open(path, readonly=True) as ix:
        with pytest.raises(IndexCorruptError, match=r"blocks\[cell"):
            ix.search(X[:20], k=10, quota=0)


def test_failed_open_leaks_nothing_and_create_is_one_transaction(small, tmp_path):
    """An open that raised leaves no environment behind in the process (a new index at the
    same path is then a real one); a directory left by a create interrupted before its
    transaction committed is reported as such and accepted by create."""
    model, X = small
    path = tmp_path / "ix"
    with Index.create(path, model) as ix:
        ix.add(X[:100])
    _poke(path, b"meta", lambda k, v: b"not json" if k == b"config" else None)
    with pytest.raises(IndexCorruptError, match="config"):
        Index.open(path)
    shutil.rmtree(path)
    with Index.create(path, model) as ix:
        ix.add(X[:50])
    with Index.open(path, readonly=True) as ix:
        assert len(ix) == 50
    # what a create killed before its commit leaves: an LMDB file without a format record
    half = tmp_path / "half"
    lmdb.open(str(half), max_dbs=8).close()
    assert not Index.exists(half)
    with pytest.raises(IndexFormatError, match="interrupted"):
        Index.open(half)
    with Index.create(half, model) as ix:
        ix.add(X[:10])
        assert len(ix) == 10
    assert Index.exists(half)
    with pytest.raises(FileExistsError):
        Index.create(half, model)


def test_index_refuses_a_model_that_does_not_fit_its_codes(small, tmp_path):
    model, X = small
    path = tmp_path / "ix"
    with Index.create(path, model) as ix:
        ix.add(X[:100])
    other = LOPQModel(V=5, M=4, subquantizer_clusters=16).fit(X, random_state=2).to_proto_bytes()
    # another model put in whole, its checksum with it (a damaged one is refused before)
    _poke(path, b"meta", lambda k, v: other if k == b"model" else
          f"{zlib.crc32(other):08x}".encode() if k == b"model_crc32" else None)
    with pytest.raises(IndexFormatError, match="does not fit its codes"):
        Index.open(path)


def test_storage_metadata_and_reserved_names(small, tmp_path):
    from cypq.storage.lmdb import LMDBStorage
    model, _ = small
    s = LMDBStorage.create(str(tmp_path / "s"), 36, 4, np.uint8, meta={"note": b"hello"})
    try:
        assert s.meta("note") == b"hello" and s.meta("absent") is None
        assert s.stats()["staged"] == 0 and len(s) == 0
    finally:
        s.close()
    with pytest.raises(ValueError, match="reserved"):
        LMDBStorage.create(str(tmp_path / "t"), 36, 4, np.uint8, meta={"gen": b"x"})


# ---------------------------------------------------------------------------- the model's face
def test_kernel_view_is_built_once_and_follows_new_parts(small):
    model, X = small
    v = model.kernel_view()
    assert model.kernel_view() is v
    assert not v.fine.flags.writeable
    np.testing.assert_array_equal(v.fine, np.stack(list(model.subquantizers[0])
                                                   + list(model.subquantizers[1])))
    assert v.Rs[1] is model.Rs[1]        # the model's own rotations, not a copy
    code = model.predict(X[:50])
    m2 = LOPQModel(V=6, M=4, subquantizer_clusters=16,
                   parameters=(model.Cs, model.Rs, model.mus, None))
    first = m2.kernel_view()
    m2.subquantizers = model.subquantizers        # a part replaced: a new view
    assert m2.kernel_view() is not first
    np.testing.assert_array_equal(m2.predict(X[:50]).fine, code.fine)
    assert "_kernel_view" not in model.__getstate__()


def test_kernel_view_keeps_small_rotations_transposed(small, monkeypatch):
    """Within the budget the view keeps R^T (read-only) and projections read it; past it
    they transpose each visited rotation: the same codes and search results either way."""
    from cypq import lopq_view
    model, X = small
    v = model.kernel_view()
    for h in range(2):
        np.testing.assert_array_equal(v.RT[h], model.Rs[h].transpose(0, 2, 1))
        assert v.RT[h].flags.c_contiguous and not v.RT[h].flags.writeable
    index = Index.in_memory(model)
    index.add(X, np.arange(len(X)))
    got = (model.predict(X).fine, *index.search(X[:300], k=20, quota=200))
    monkeypatch.setattr(lopq_view, "ROTATIONS_T_BYTES", 0)
    bare = LOPQModel(V=6, M=4, subquantizer_clusters=16,
                     parameters=(model.Cs, model.Rs, model.mus, model.subquantizers))
    assert bare.kernel_view().RT is None
    index = Index.in_memory(bare)
    index.add(X, np.arange(len(X)))
    for a, b in zip(got, (bare.predict(X).fine, *index.search(X[:300], k=20, quota=200))):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- layering
def _imports(path: pathlib.Path) -> set[str]:
    """Modules a cypq source file imports, as absolute names."""
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if node.module:  # "from . import x" depends on x, not on the package's face
                out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_layering_storage_imports_no_codec_and_no_circles():
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "cypq").rglob("*.py") if "proto" not in p.parts}
    graph = {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}
    codec = {"cypq.model_io", "cypq.lopq", "cypq.pq", "cypq.opq", "cypq.index"}
    for m, deps in graph.items():
        if m.startswith("cypq.storage"):
            assert not deps & codec, f"{m} imports {deps & codec}"
    # no circle: every module reaches itself through no chain of imports (the package
    # face cypq/__init__ excluded, since every submodule import passes through it)
    graph = {m: d - {"cypq"} for m, d in graph.items() if m != "cypq"}

    def reach(m, seen):
        for d in graph.get(m, ()):
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen
    for m in graph:
        assert m not in reach(m, set()), f"import circle through {m}"
    assert not {"cypq.demo", "cypq.cli", "cypq.spark", "cypq.bulk"} & _imports(
        ROOT / "cypq" / "__init__.py")
    for name in ("cli.py", "bulk.py"):
        src = (ROOT / "cypq" / name).read_text()
        assert "LMDBStorage" not in src and "storage.lmdb" not in src, name
    assert all(len(p.read_text().splitlines()) <= 550 for p in files.values())


def test_verify_backup_compact(small, tmp_path, capsys):
    """verify finds nothing in a sound index and names each kind of damage; backup and
    compact give indexes that search the same (compact: smaller, staged entries merged)."""
    from cypq.cli import main
    model, X = small
    path = tmp_path / "ix"
    rng = np.random.default_rng(4)
    ids = rng.permutation(10**6)[:3000].astype(np.int64)
    with Index.create(path, model, block_capacity=8, stage_capacity=1000) as ix:
        for s in range(0, 2400, 300):
            ix.add(X[s:s + 300], ids[s:s + 300])   # merges
        ix.remove(ids[:400:3])
        ix.add(X[2400:2700], ids[2400:2700])      # staged
        assert ix.verify() == [] and ix.stats()["staged"] > 0
        want = ix.search(X[:40], k=10, quota=200)
        ix.backup(tmp_path / "bk")
        with ix.compact(tmp_path / "cp", step=500) as cp:
            assert cp.verify() == [] and cp.stats()["staged"] == 0 and len(cp) == len(ix)
            got = cp.search(X[:40], k=10, quota=200)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])
    assert (os.path.getsize(tmp_path / "cp" / "data.mdb")
            < 0.8 * os.path.getsize(path / "data.mdb"))
    with Index.open(tmp_path / "bk", readonly=True) as bk:
        np.testing.assert_array_equal(bk.search(X[:40], k=10, quota=200)[1], want[1])
    assert main(["verify", str(path)]) == 0 and "sound" in capsys.readouterr().out
    # damage: a stray id-table row, a size that disagrees, a block cut short
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(L.u64(7), L.id_value(3, 0), db=env.open_db(b"ids", txn=txn))
        sizes = env.open_db(b"sizes", txn=txn)
        k, v = next(iter(txn.cursor(db=sizes)))
        counts = L.parse_sizes(v, 0).copy()
        c = int(np.flatnonzero(counts)[0])
        counts[c] += 1
        txn.put(k, L.sizes_value(counts), db=sizes)
    env.close()
    assert main(["verify", str(path)]) == 2   # the count check refuses to open it
    assert "hold" in capsys.readouterr().err
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        sizes = env.open_db(b"sizes", txn=txn)
        counts[c] -= 1
        txn.put(k, L.sizes_value(counts), db=sizes)
        blocks = env.open_db(b"blocks", txn=txn)
        cur = txn.cursor(db=blocks)
        (bk, bv), (fk, fv) = next(iter(cur)), list(cur)[-1]
        txn.put(bk, bv[:-3], db=blocks)
        txn.put(fk, fv[:-1] + bytes([fv[-1] ^ 1]), db=blocks)   # one code bit: layout intact
    env.close()
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("ids[7] names an entry that is not stored") for line in out)
    assert any("blocks[cell" in line and "bytes" in line for line in out)
    assert any("blocks[cell" in line and "checksum" in line for line in out)
