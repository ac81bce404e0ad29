"""``verify``: every stored value checked against its layout and against the others.

Reads one committed state: the data file against LMDB's meta pages; every cell-size chunk,
block, stage record, id-table row and change-log record against its layout; each cell's blocks
(numbered 0 .. nb-1, all but the last full, entries adding up to the cell's size); the id
table against where each id is stored, both ways (an entry in the blocks has its row, but a
frozen one whose row the merge has not written yet; a staged entry has none, or a format 3
row saying "staged"); the entry count and the stage's counters; in an index that keeps
vectors (in the blocks, checked with them), one well-formed vector (length, checksum) in
the ``vectors`` table for every staged entry and none for any other id; in an index that
keeps tags, the per-bit tag counts against the stored tags. Problems are returned, one
line each (at most ``LIMIT`` of a kind, then a count).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ..base import IndexCorruptError, bit_counts
from . import layout as L
from .data_file import check_data_file
from .env import Env

LIMIT = 20


class _Problems(list):
    def __init__(self):
        super().__init__()
        self._kinds = {}

    def add(self, kind: str, line: str) -> None:
        n = self._kinds[kind] = self._kinds.get(kind, 0) + 1
        if n <= LIMIT:
            self.append(line)

    def close(self) -> list:
        for kind, n in self._kinds.items():
            if n > LIMIT:
                self.append(f"... and {n - LIMIT} more problems of the kind '{kind}'")
        return list(self)


def verify(env: Env) -> list:
    out = _Problems()
    try:
        check_data_file(os.path.join(env.real, "data.mdb"))
    except IndexCorruptError as e:
        return [str(e)]
    B, width, dtype = env.block_capacity, env.code_width, env.code_dtype
    with env.read() as txn:
        count = env.counter(txn, b"count")
        st = env.stage_meta(txn)
        sizes = _sizes(env, txn, out)
        # blocks: the entries of each cell, in order
        ids_b, cells_b, blocks_b = [], [], []
        held = np.zeros(env.n_cells, dtype=np.int64)
        tag_bits = np.zeros(64, np.int64)    # the stored tags' bit counts
        last_cell, expect_block = -1, 0
        with txn.cursor(db=env.db["blocks"]) as cur:
            for key, value in cur:
                if len(key) != L.CELL_BLOCK.size:
                    out.add("block key", f"blocks: a key of {len(key)} bytes")
                    continue
                c, b = L.parse_block_key(key)
                where = f"blocks[cell {c}, block {b}]"
                if c >= env.n_cells:
                    out.add("block cell", f"{where}: the cell is outside the index")
                    continue
                if c != last_cell:
                    last_cell, expect_block = c, 0
                if b != expect_block:
                    out.add("block numbering", f"{where}: expected block {expect_block}")
                expect_block = b + 1
                try:
                    cols = L.decode_entries(value, env.block_columns, width, dtype, where,
                                            env.vectors)
                    ids = cols[0]
                    if env.keeps_tags:
                        tag_bits += bit_counts(cols[1])
                except IndexCorruptError as e:
                    out.add("block value", str(e))
                    continue
                if b < L.blocks_for(sizes[c], B) - 1 and len(ids) != B:
                    out.add("block fill", f"{where}: {len(ids)} entries in a block that is "
                            f"not the cell's last (expected {B})")
                held[c] += len(ids)
                ids_b.append(ids)
                cells_b.append(np.full(len(ids), c, np.int64))
                blocks_b.append(np.full(len(ids), b, np.int64))
        for c in np.flatnonzero(held != sizes)[:LIMIT + 1].tolist():
            out.add("cell size", f"cell {c}: its blocks hold {held[c]} entries, its size "
                    f"says {sizes[c]}")
        # the stage: frozen records lo .. mid-1 (entries of cells below `below` merged),
        # active records mid .. nxt-1
        frozen_ids, staged_ids, staged_cells = [], [], []
        n_frozen = n_active = 0
        if env.db["stage"] is not None:
            seq_expect = st.lo
            with txn.cursor(db=env.db["stage"]) as cur:
                for key, value in cur:
                    seq = _key(key, "stage", out)
                    if seq is None:
                        continue
                    if seq != seq_expect:
                        out.add("stage numbering", f"stage[{seq}]: expected record "
                                f"{seq_expect}")
                    seq_expect = seq + 1
                    try:
                        cols = L.decode_entries(value, env.stage_columns, width, dtype,
                                                f"stage[{seq}]")
                        cells, ids = cols[:2]
                    except IndexCorruptError as e:
                        out.add("stage value", str(e))
                        continue
                    keep = cells >= st.below if seq < st.mid else np.ones(len(ids), bool)
                    if env.keeps_tags:
                        tag_bits += bit_counts(cols[2][keep])
                    if seq < st.mid:
                        frozen_ids.append(ids)
                        n_frozen += int(keep.sum())
                    else:
                        n_active += len(ids)
                    staged_ids.append(ids[keep])
                    staged_cells.append(cells[keep])
            if seq_expect != st.nxt:
                out.add("stage count", f"stage: records up to {seq_expect - 1}, the stage "
                        f"state says up to {st.nxt - 1}")
        if (n_frozen, n_active) != (st.n_frozen, st.n_active):
            out.add("stage count", f"stage: {n_frozen} + {n_active} entries staged (frozen + "
                    f"active), the stage state says {st.n_frozen} + {st.n_active}")
        n_staged = n_frozen + n_active
        if int(sizes.sum()) + n_staged != count:
            out.add("count", f"meta[count] is {count:,}, but blocks and stage hold "
                    f"{int(sizes.sum()) + n_staged:,}")
        # frozen ids whose rows are still to be written (any format 3 row of theirs says
        # "staged")
        unwritten = np.concatenate(frozen_ids + [np.empty(0, np.int64)])
        unwritten = unwritten[unwritten >= st.ids_below] if st.ids_below < L.IDS_DONE \
            else unwritten[:0]
        _id_table(env, txn, out, (ids_b, cells_b, blocks_b),
                  (staged_ids, staged_cells), unwritten)
        if env.vectors:
            _vectors(env, txn, out, np.concatenate(staged_ids + [np.empty(0, np.int64)]))
        if env.keeps_tags:
            try:
                kept = L.parse_tag_counts(env.get_meta(txn, b"tag_counts"))
            except IndexCorruptError as e:
                out.add("tag counts", str(e))
            else:
                for j in np.flatnonzero(kept != tag_bits).tolist():
                    out.add("tag counts", f"meta[tag_counts]: bit {j} is counted on "
                            f"{kept[j]:,} entries, {tag_bits[j]:,} have it")
        with txn.cursor(db=env.db["log"]) as cur:
            for key, value in cur:
                gen = _key(key, "log", out)
                if gen is not None and len(value) % 8:
                    out.add("log", f"log[{gen}]: not a list of cells")
    return out.close()


def _key(key, db: str, out: _Problems) -> Optional[int]:
    """The u64 of a key of ``db``, or None for one not of 8 bytes (reported)."""
    if len(key) != 8:
        out.add(f"{db} key", f"{db}: a key of {len(key)} bytes")
        return None
    return L.read_u64(key)


def _sizes(env: Env, txn, out: _Problems) -> np.ndarray:
    sizes = np.zeros(-(-env.n_cells // L.SIZE_CHUNK) * L.SIZE_CHUNK, dtype=np.int64)
    with txn.cursor(db=env.db["sizes"]) as cur:
        for key, value in cur:
            chunk = _key(key, "sizes", out)
            if chunk is None:
                continue
            try:
                if chunk * L.SIZE_CHUNK >= env.n_cells:
                    raise IndexCorruptError(f"sizes[{chunk}]: past the index's cells")
                sizes[chunk * L.SIZE_CHUNK:(chunk + 1) * L.SIZE_CHUNK] = \
                    L.parse_sizes(value, chunk)
            except IndexCorruptError as e:
                out.add("sizes", str(e))
    return sizes[:env.n_cells]


def _id_table(env: Env, txn, out: _Problems, blocks, stage, unwritten) -> None:
    """The id table against where each id is stored: every id in one place; an entry in
    the blocks has its row (but the ``unwritten`` ones may have none, or a stale one), a
    staged entry none but a format 3 row "staged"."""
    b_ids = np.concatenate(blocks[0] + [np.empty(0, np.int64)])
    b_cell = np.concatenate(blocks[1] + [np.empty(0, np.int64)])
    b_loc = np.concatenate(blocks[2] + [np.empty(0, np.int64)])
    s_ids = np.concatenate(stage[0] + [np.empty(0, np.int64)])
    every = np.sort(np.concatenate([b_ids, s_ids]))
    dup = every[1:][every[1:] == every[:-1]]
    for i in np.unique(dup)[:LIMIT + 1].tolist():
        out.add("duplicate id", f"id {i} is stored more than once")
    with txn.cursor(db=env.db["ids"]) as cur:
        keys = b"".join(cur.iternext(keys=True, values=False))
        cur.first()
        values = b"".join(cur.iternext(keys=False, values=True))
    n = len(keys) // 8
    if len(keys) % 8 or len(values) != n * L.CELL_BLOCK.size:
        out.add("id table", "ids: keys or values of the wrong size")
        return
    table_ids = np.frombuffer(keys, dtype=">u8").astype(np.int64)
    rows = np.frombuffer(values, dtype=[("cell", ">u8"), ("block", ">u4")])
    table_cell, table_loc = rows["cell"].astype(np.int64), rows["block"].astype(np.int64)
    if n and not np.all(table_ids[1:] > table_ids[:-1]):
        # LMDB yields a database's keys once each, ascending: a damaged page can break that
        # (the rows of a repeated key are compared as its first's below)
        out.add("id table", "ids: keys out of order or repeated (a damaged page)")
        table_ids, first = np.unique(table_ids, return_index=True)
        table_cell, table_loc = table_cell[first], table_loc[first]
    legacy = (table_loc & L.STAGED) != 0      # format 3 rows of staged entries
    loose = np.union1d(s_ids, unwritten)      # ids that need no (right) row
    need = ~np.isin(b_ids, unwritten)         # entries in blocks whose row must be right
    missing = np.setdiff1d(b_ids[need], table_ids)
    stray = np.setdiff1d(table_ids, every)
    for i in missing[:LIMIT + 1].tolist():
        out.add("id missing", f"id {i} is stored but not in the id table")
    for i in stray[:LIMIT + 1].tolist():
        out.add("id stray", f"ids[{i}] names an entry that is not stored")
    for i in table_ids[legacy & ~np.isin(table_ids, loose)][:LIMIT + 1].tolist():
        out.add("id location", f"ids[{i}] says the entry is staged; it is in the blocks")
    for i in table_ids[~legacy & np.isin(table_ids, s_ids)][:LIMIT + 1].tolist():
        out.add("id location", f"ids[{i}] names a block; the entry is staged")
    order = np.argsort(b_ids[need], kind="stable")
    f_ids, f_cell, f_loc = b_ids[need][order], b_cell[need][order], b_loc[need][order]
    both, a, b = np.intersect1d(f_ids, table_ids, assume_unique=len(dup) == 0,
                                return_indices=True)   # (both unique then: see above)
    wrong = (f_cell[a] != table_cell[b]) | (f_loc[a] != table_loc[b])
    for j in np.flatnonzero(wrong)[:LIMIT + 1].tolist():
        out.add("id location", f"ids[{both[j]}] says cell {table_cell[b[j]]}, block field "
                f"{table_loc[b[j]]}; it is stored in cell {f_cell[a[j]]}, block "
                f"{f_loc[a[j]]}")


def _vectors(env: Env, txn, out: _Problems, stored: np.ndarray) -> None:
    """The vectors table: one vector, intact, per staged id (``stored``) and none for any
    other id."""
    keys, bad = [], []
    with txn.cursor(db=env.db["vectors"]) as cur:
        for key, value in cur:
            i = L.read_u64(key) if len(key) == 8 else -1
            keys.append(i)
            try:
                L.decode_vector(value, env.vectors, f"vectors[{i}]")
            except IndexCorruptError as e:
                bad.append(str(e))
    for line in bad:
        out.add("vector value", line)
    keys = np.asarray(keys, dtype=np.int64)
    for i in np.setdiff1d(stored, keys)[:LIMIT + 1].tolist():
        out.add("vector missing", f"id {i} is staged but has no vector")
    for i in np.setdiff1d(keys, stored)[:LIMIT + 1].tolist():
        out.add("vector stray", f"vectors[{i}] belongs to no staged entry")
