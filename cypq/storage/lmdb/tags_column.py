"""Start keeping tags in an index made without them: every block and stage record gains a
zero uint64 tag column, in one write transaction.

An index made without tags (by an earlier cypq, or by choice) holds entries values of ids
(blocks) or cells and ids (stage records), then codes (and, in blocks, vectors); an index with
tags has a tag column after those. The rewrite inserts it value by value
(:func:`layout.with_zero_column`: each value's checksum scheme kept, a value whose length or
checksum is wrong refused, changing nothing). The config then names
the feature ``tags`` (format 5) and the change log gets no record for the commit, so every
process reloads; one that opened the index before the change finds the layout changed and is
told to open it again (reader.py), never reads a block by the old layout.
"""
from __future__ import annotations

import json
import struct

from ..base import TAGS
from . import env as E
from . import layout as L

BATCH = 4096        # values read, then rewritten, per cursor pass


def add_tags_column(env: E.Env, meta: dict) -> None:
    """Rewrite the index of ``env`` (which keeps no tags) so that it keeps them, all zero;
    ``meta`` (str -> bytes) is stored in the same transaction. ``env`` takes the new layout
    when the transaction commits."""
    if env.keeps_tags:
        return
    E.check_meta_names(meta)

    def body(txn):
        if env.get_meta(txn, b"bulk") is not None:
            raise ValueError(f"{env.path} is an unfinished bulk load: finish it first")
        config = json.loads(bytes(env.get_meta(txn, b"config")))
        if TAGS in config.get("features", ()):
            return config          # another process did it meanwhile
        _widen(txn, env.db["blocks"], env.block_columns, env.code_bytes, env.vector_bytes,
               "blocks")
        _widen(txn, env.db["stage"], env.stage_columns, env.code_bytes, 0, "stage")
        config["features"] = sorted(set(config.get("features", ())) | {TAGS})
        m = env.db["meta"]
        txn.put(b"config", json.dumps(config).encode(), db=m)
        txn.put(b"format", E.FORMAT + struct.pack(">I", E.FEATURES_VERSION), db=m)
        for name, value in meta.items():
            txn.put(name.encode(), bytes(value), db=m)
        env.bump(txn, None)     # no log record: every reader reloads
        return config

    config, _ = env.write(body)
    env.set_layout(E.FEATURES_VERSION, config)


def _widen(txn, db, n_columns: int, code_bytes: int, vec_bytes: int, name: str) -> None:
    """Insert a zero 8-byte column after the first ``n_columns`` of every entries value."""
    if db is None:
        return
    after = None
    while True:
        with txn.cursor(db=db) as cur:
            ok = cur.first() if after is None else cur.set_range(after)
            if ok and after is not None and cur.key() == after:
                ok = cur.next()
            batch = []
            while ok and len(batch) < BATCH:
                batch.append((cur.key(), cur.value()))
                ok = cur.next()
        if not batch:
            return
        for key, value in batch:
            txn.put(key, L.with_zero_column(value, n_columns, code_bytes, vec_bytes,
                                            f"{name}[{key.hex()}]"), db=db)
        after = batch[-1][0]

