"""How the legacy index fixtures were made (run once per format, with the cypq that wrote it
on the path; the current cypq writes format 4 and cannot make them).

    PYTHONPATH=<cypq 0.1.0 checkout, commit 8eadbd8> python tests/data/make_legacy_indexes.py tests/data
    PYTHONPATH=<cypq checkout at commit 95a4798> python tests/data/make_legacy_indexes.py tests/data

- ``legacy-v2/``: format 2 (per-cell size records, a stage): 1300 vectors of the model of
  ``test_lmdb_index.py``'s ``setup`` fixture, ids 0..1299; 1000 in blocks, the last 300 staged.
- ``legacy-v1/``: format 1 (no stage): 1000 vectors, ids 0..999, all in blocks.
- ``legacy-v3/`` (commit 95a4798): format 3 (id-table rows for staged entries): 1300
  vectors, ids 0..1299; 1000 in blocks, the last 300 staged and their merge cut short after
  two of its transactions (some of them in blocks, the rest staged).
"""
import os
import sys
import warnings

import lmdb
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from conftest import clustered  # noqa: E402

from cypq import Index, LOPQModel  # noqa: E402

out = sys.argv[1]
import cypq.storage.lmdb  # noqa: E402
X = clustered(4000, 16, n_clusters=12, seed=51)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    model = LOPQModel(V=6, M=4, subquantizer_clusters=16).fit(X, random_state=5)
if cypq.storage.lmdb.env.VERSION == 3:
    import cypq.storage.lmdb.writer as W
    W.MERGE_CHUNK = 40
    path = os.path.join(out, "legacy-v3")
    with Index.create(path, model, block_capacity=8, stage_capacity=600,
                      map_size=1 << 20) as ix:
        ix.add(X[:500])
        ix.add(X[500:1000])        # reaches the stage capacity: merged into blocks
        ix.add(X[1000:1300])       # staged
        real, done = W.WritePath._merge_in, []

        def two_then_stop(self, *args):
            if len(done) == 2:
                raise KeyboardInterrupt
            done.append(1)
            return real(self, *args)
        W.WritePath._merge_in = two_then_stop
        try:
            ix.merge()
        except KeyboardInterrupt:
            pass
        st = ix.stats()
        assert st["merge_pending"] and 0 < st["staged"] < 300, st
    os.remove(os.path.join(path, "lock.mdb"))
    sys.exit()
assert cypq.storage.lmdb.VERSION == 2, "needs cypq 0.1.0 (or the format 3 commit) on the path"
with Index.create(os.path.join(out, "legacy-v2"), model, block_capacity=8,
                  stage_capacity=600, map_size=1 << 20) as ix:
    ix.add(X[:500])
    ix.add(X[500:1000])        # reaches the stage capacity: merged into blocks
    ix.add(X[1000:1300])       # staged
    assert ix.stats()["staged"] == 300
v1 = os.path.join(out, "legacy-v1")
with Index.create(v1, model, block_capacity=8, stage_capacity=0, map_size=1 << 20) as ix:
    ix.add(X[:1000])
env = lmdb.open(v1, max_dbs=8)
meta = env.open_db(b"meta")
with env.begin(write=True) as txn:   # format 1 had no stage
    txn.drop(env.open_db(b"stage", txn=txn), delete=True)
    txn.delete(b"stage", db=meta)
    txn.put(b"format", b"cypq-index" + (1).to_bytes(4, "big"), db=meta)
os.makedirs(v1 + ".compact")
env.copy(v1 + ".compact", compact=True)
env.close()
for name in ("data.mdb", "lock.mdb"):
    os.remove(os.path.join(v1, name))
os.rename(os.path.join(v1 + ".compact", "data.mdb"), os.path.join(v1, "data.mdb"))
os.rmdir(v1 + ".compact")
os.remove(os.path.join(out, "legacy-v2", "lock.mdb"))
