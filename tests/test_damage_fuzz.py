"""Damaged copies of a small index never crash or hang a process: truncations of the data
file, flipped bytes in LMDB's meta pages and in its other pages, flipped bytes in stored values
of every database, values cut short. Each case runs in a subprocess (a crash would kill the
test runner)."""
import os
import random
import shutil
import subprocess
import sys
import textwrap

import lmdb
import numpy as np
import pytest

from cypq import Index, LOPQModel
from cypq.storage import IndexFormatError

from conftest import clustered

HERE = os.path.dirname(os.path.abspath(__file__))

# Everything a user does with an index; a damaged index may refuse with the documented errors
# and nothing else (no other exception, no signal, no hang).
USE = textwrap.dedent("""
    import sys, numpy as np, cypq
    from cypq.storage import IndexFormatError
    from cypq.model_io import ModelFileError
    Q = np.load(sys.argv[2])
    try:
        with cypq.Index.open(sys.argv[1], readonly=True) as ix:
            n = len(ix)
            ix.stats()
            for quota in (0, 300):
                D, I = ix.search(Q, k=10, quota=quota)
            ix.lookup(np.arange(0, 2500, 7))
            ix.contains(np.arange(3000))
            ix.verify()
        with cypq.Index.open(sys.argv[1]) as ix:   # and a writer: upgrade, add, remove
            ix.add(Q[:5])
            ix.remove(np.arange(0, 40, 3))
            ix.verify()
        print("ok")
    except (IndexFormatError, ModelFileError) as e:
        print("refused", type(e).__name__, str(e)[:200].replace("\\n", " "))
""")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    X = clustered(3000, 16, n_clusters=12, seed=71)
    model = LOPQModel(V=6, M=4, subquantizer_clusters=16).fit(X, random_state=3)
    root = tmp_path_factory.mktemp("pristine")
    path = root / "ix"
    with Index.create(path, model, block_capacity=16, stage_capacity=1200) as ix:
        for s in range(0, 2500, 500):
            ix.add(X[s:s + 500])          # merges once, leaves 500 staged
    np.save(root / "q.npy", X[2500:2520])
    return path, root / "q.npy"


def _values(path):
    """(database, key, value length) of every stored value."""
    env = lmdb.open(str(path), max_dbs=8, readonly=True, lock=False)
    out = []
    with env.begin() as txn:
        for name in (b"meta", b"blocks", b"sizes", b"ids", b"stage", b"log"):
            db = env.open_db(name, txn=txn, create=False)
            out += [(name, bytes(k), len(v)) for k, v in txn.cursor(db=db)]
    env.close()
    return out


def _rewrite(path, name, key, change):
    env = lmdb.open(str(path), max_dbs=8)
    db = env.open_db(name)
    with env.begin(write=True, db=db) as txn:
        txn.put(key, change(bytes(txn.get(key))))
    env.close()


def _cases(path, n_each=12, seed=5):
    rng = random.Random(seed)
    size = os.path.getsize(path / "data.mdb")
    cases = [("truncate", f) for f in (0.02, 0.25, 0.5, 0.75, 0.9, 0.97)]
    cases += [("meta", rng.randrange(16, 16 + 152) + rng.choice((0, 4096))) for _ in range(n_each)]
    # bytes of LMDB's own pages (branch, leaf, overflow and free-list pages alike)
    cases += [("page", tuple((pg * 4096 + rng.randrange(4096), rng.randrange(256))
                             for _ in range(rng.choice((1, 2, 8)))))
              for pg in rng.sample(range(2, size // 4096), min(2 * n_each, size // 4096 - 2))]
    values = _values(path)
    for kind in ("flip", "cut"):
        for name in (b"blocks", b"sizes", b"ids", b"stage", b"meta", b"log"):
            picks = [v for v in values if v[0] == name and v[2]]
            for db, key, n in rng.sample(picks, min(3, len(picks))):
                cases.append((kind, (db, key, rng.randrange(n))))
    return cases, size


def _damage(path, case, size):
    kind, arg = case
    data = path / "data.mdb"
    if kind == "truncate":
        os.truncate(data, int(size * arg))
    elif kind == "meta":
        with open(data, "r+b") as f:
            f.seek(arg)
            b = f.read(1)
            f.seek(arg)
            f.write(bytes([b[0] ^ 0x5A]))
    elif kind == "page":
        with open(data, "r+b") as f:
            for at, value in arg:
                f.seek(at)
                f.write(bytes([value]))
    else:
        db, key, at = arg
        if kind == "flip":
            _rewrite(path, db, key, lambda v: v[:at] + bytes([v[at] ^ 0xFF]) + v[at + 1:])
        else:
            _rewrite(path, db, key, lambda v: v[:at])


def test_damaged_copies_never_crash_or_hang(pristine, tmp_path):
    path, queries = pristine
    cases, size = _cases(path)
    outcomes = {}
    for j, case in enumerate(cases):
        work = tmp_path / f"c{j}"
        shutil.copytree(path, work, ignore=shutil.ignore_patterns("lock.mdb"))
        _damage(work, case, size)
        try:
            res = subprocess.run([sys.executable, "-c", USE, str(work), str(queries)],
                                 capture_output=True, text=True, timeout=60, cwd=HERE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{case}: the process hung")
        assert res.returncode >= 0, f"{case}: killed by signal {-res.returncode}"
        assert res.returncode == 0, f"{case}: {res.stderr[-1500:]}"
        outcomes[case[0]] = outcomes.get(case[0], []) + [res.stdout.split()[0]]
        shutil.rmtree(work)
    # the damage that can be seen is seen: truncations that cut used pages (a cut of the last
    # 3% may take only free pages, which loses nothing), and damaged values of the tables
    # whose layout is checked, are refused
    assert outcomes["truncate"][:5] == ["refused"] * 5, outcomes["truncate"]
    assert "refused" in outcomes["cut"] and "refused" in outcomes["flip"], outcomes


def test_a_flipped_commit_number_never_opens_an_older_commit_silently(pristine, tmp_path):
    """LMDB opens at whichever meta page has the larger transaction id: a bit flipped in
    the newest one's id would bring back the commit before it, without a word. The two ids
    must be consecutive, each on the page of its parity; every flip that breaks that is
    refused (the rest leave an id LMDB also accepts as consecutive, listed and checked)."""
    from cypq.storage.lmdb import data_file as E
    path, _ = pristine
    with Index.open(path, readonly=True) as ix:
        n = len(ix)
    with open(path / "data.mdb", "rb") as f:
        head = f.read(4096 * 2)
    ids = [E._META.unpack_from(head, E._META_AT + page * 4096)[8] for page in (0, 1)]
    newest = int(np.argmax(ids))
    at = newest * 4096 + E._META_AT + E._META.size - 8      # the txn id: the last u64
    refused = 0
    for bit in range(64):
        work = tmp_path / f"b{bit}"
        shutil.copytree(path, work, ignore=shutil.ignore_patterns("lock.mdb"))
        with open(work / "data.mdb", "r+b") as f:
            f.seek(at + bit // 8)
            b = f.read(1)
            f.seek(at + bit // 8)
            f.write(bytes([b[0] ^ (1 << bit % 8)]))
        flipped = ids[newest] ^ (1 << bit)
        still_consecutive = flipped % 2 == newest and abs(flipped - ids[1 - newest]) == 1
        try:
            with Index.open(work, readonly=True) as ix:
                opened = len(ix)
        except IndexFormatError:
            refused += 1
            continue
        assert still_consecutive, f"bit {bit}: opened (with {opened} of {n} entries)"
    assert refused >= 62


def test_a_damaged_free_page_list_is_refused_before_a_write_commits(pristine, tmp_path):
    """LMDB reads its free-page list only when a write commits, and stops the process on an
    assertion (mdb_freelist_save) where a record's key is past the newest commit: the first
    write refuses such a file (readers, which never read that list, go on)."""
    import struct
    from cypq.storage.lmdb import data_file as E
    path, queries = pristine
    work = tmp_path / "ix"
    shutil.copytree(path, work, ignore=shutil.ignore_patterns("lock.mdb"))
    psize, free_root, _, txnid, _ = E._newest_meta(str(work / "data.mdb"))
    assert free_root != E._NO_PAGE   # (the fixture's adds freed pages)
    with open(work / "data.mdb", "r+b") as f:
        f.seek(free_root * psize)
        page = f.read(psize)
        flags, lower = struct.unpack_from("<HH", page, 10)
        assert flags & 0x02 and lower > 16   # a leaf with records: the first one's key
        off = struct.unpack_from("<H", page, 16)[0]
        f.seek(free_root * psize + off + 8)
        f.write(struct.pack("<Q", txnid + 10**12))
    code = textwrap.dedent("""
        import sys, numpy as np, cypq
        Q = np.load(sys.argv[2])
        with cypq.Index.open(sys.argv[1], readonly=True) as ix:
            ix.search(Q, k=5)
        try:
            with cypq.Index.open(sys.argv[1]) as ix:
                ix.add(Q[:5])
        except cypq.storage.IndexFormatError as e:
            print("refused", e)
    """)
    res = subprocess.run([sys.executable, "-c", code, str(work), str(queries)],
                         capture_output=True, text=True, timeout=60, cwd=HERE)
    assert res.returncode == 0, res.stderr[-1500:]   # (-6 before: LMDB's assertion)
    assert res.stdout.startswith("refused") and "free-page list is damaged" in res.stdout


def test_a_changed_byte_of_the_stored_model_is_refused(pristine, tmp_path):
    """The model inside an index is protobuf floats: a changed byte loaded as another model
    and searched with it. Its CRC-32 sits beside it (meta[model_crc32]); an index without
    one (cypq before 2026-12) opens as before."""
    path, queries = pristine
    for case in ("flip", "no checksum"):
        work = tmp_path / case.replace(" ", "_")
        shutil.copytree(path, work, ignore=shutil.ignore_patterns("lock.mdb"))
        env = lmdb.open(str(work), max_dbs=8)
        with env.begin(write=True) as txn:
            meta = env.open_db(b"meta", txn=txn)
            model = txn.get(b"model", db=meta)
            if case == "flip":
                at = len(model) // 2
                txn.put(b"model", model[:at] + bytes([model[at] ^ 0x40]) + model[at + 1:],
                        db=meta)
            else:
                assert txn.delete(b"model_crc32", db=meta)
        env.close()
        if case == "flip":
            with pytest.raises(IndexFormatError, match="model inside does not match its checksum"):
                Index.open(work, readonly=True)
        else:
            with Index.open(work, readonly=True) as ix, Index.open(path, readonly=True) as ref:
                assert ix.model == ref.model and len(ix) == len(ref)
