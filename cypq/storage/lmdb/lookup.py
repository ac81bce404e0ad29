"""Entries read by id in the LMDB index: where an id is (the id table, else the stage), its
code and its vector (in its block, or, staged, in the ``vectors`` table)."""
from __future__ import annotations

import numpy as np

from ..base import IndexCorruptError
from . import layout as L
from .env import Env


def lookup(env: Env, txn, state, ids: np.ndarray, with_vectors: bool):
    """See :meth:`ReadPath.lookup`: (found, cells, codes, vectors or None, tags) of ids in
    txn's ``state``."""
    found = np.zeros(len(ids), dtype=bool)
    cells = np.full(len(ids), -1, dtype=np.int64)
    codes = np.zeros((len(ids), env.code_width), dtype=env.code_dtype)
    tags = np.zeros(len(ids), dtype=np.uint64)
    vecs = np.zeros((len(ids), env.vector_width), env.vector_dtype) if with_vectors \
        else None
    rest = []
    for j, i in enumerate(ids.tolist()):
        loc = txn.get(L.u64(i), db=env.db["ids"])
        if loc is None:
            rest.append(j)
            continue
        c, b = L.id_location(loc, i, env.n_cells)
        if b & L.STAGED:  # a format 3 row of a staged entry
            rest.append(j)
            continue
        found[j], cells[j] = True, c
        _find_in_blocks(env, txn, i, c, b, b, codes, vecs, tags, j)
    if not rest:
        return found, cells, codes, vecs, tags
    rest = np.asarray(rest, dtype=np.int64)
    part, s_cells, s_codes, s_tags = state.stage.find(ids[rest])
    below = state.stage.frozen.merged_below
    staged = []
    for j, p, c, code, t in zip(rest.tolist(), part.tolist(), s_cells.tolist(), s_codes,
                                s_tags.tolist()):
        if not p:
            continue
        found[j], cells[j] = True, c
        if p == 1 and c < below:  # merged into the cell's blocks
            nb = L.blocks_for(int(state.main[c]), env.block_capacity)
            _find_in_blocks(env, txn, int(ids[j]), c, 0, nb - 1, codes, vecs, tags, j)
        else:
            codes[j], tags[j] = code, t
            staged.append(j)
    if staged and with_vectors:
        vecs[staged] = staged_vectors(env, txn, ids[staged])
    return found, cells, codes, vecs, tags


def staged_vectors(env: Env, txn, ids: np.ndarray) -> np.ndarray:
    """The vectors (n, w) of staged entries' ids (n,) int64, from the ``vectors`` table."""
    order = np.argsort(ids)
    with txn.cursor(db=env.db["vectors"]) as cur:  # in key order: fewer pages
        got = cur.getmulti(L.id_keys(ids[order]))
    if len(got) != len(ids):
        have = {L.read_u64(k) for k, _ in got}
        i = next(int(i) for i in ids if int(i) not in have)
        raise IndexCorruptError(f"vectors[{i}] is missing: the staged entry has no vector")
    out = np.empty((len(ids), env.vector_width), dtype=env.vector_dtype)
    for j, (k, v) in zip(order.tolist(), got):
        out[j] = L.decode_vector(v, env.vectors, f"vectors[{L.read_u64(k)}]")
    return out


def _find_in_blocks(env: Env, txn, i: int, cell: int, first: int, last: int, codes, vecs,
                    tags, j: int) -> None:
    """codes[j], tags[j] (and vecs[j], unless vecs is None) = those of id i, looked for in
    blocks first .. last of its cell."""
    for b in range(last, first - 1, -1):  # a merged entry sits near the cell's end
        blk = read_block(env, txn, cell, b)
        pos = np.flatnonzero(blk.ids == i)
        if len(pos):
            codes[j], tags[j] = blk.codes[pos[0]], blk.tags[pos[0]]
            if vecs is not None:
                vecs[j] = blk.vectors[pos[0]]
            return
    where = f"block ({cell}, {first})" if first == last else \
        f"blocks {first}..{last} of cell {cell}"
    raise IndexCorruptError(f"id {i}: {where} does not hold it, though the index says so")


class Block:
    """Copies of one block's entries: ids (n,) int64, tags (n,) uint64 (zero in an index
    without tags), codes (n, M), vectors (n, w) or None."""

    __slots__ = ("ids", "tags", "codes", "vectors")

    def __init__(self, ids, tags, codes, vectors):
        self.ids, self.tags, self.codes, self.vectors = ids, tags, codes, vectors

    def __len__(self) -> int:
        return len(self.ids)

    def pick(self, rows) -> "Block":
        """The entries ``rows`` (an index array or slice), as a new Block."""
        return Block(self.ids[rows], self.tags[rows], self.codes[rows],
                     None if self.vectors is None else self.vectors[rows])

    def value(self, env: Env) -> bytes:
        """The block value of these entries."""
        cols = (self.ids, self.tags) if env.keeps_tags else (self.ids,)
        return L.encode_entries(cols, self.codes, env.code_dtype, self.vectors)


def read_block(env: Env, txn, cell: int, block: int) -> Block:
    """The entries of one block (copies)."""
    v = txn.get(L.block_key(cell, block), db=env.db["blocks"])
    if v is None:
        raise IndexCorruptError(f"blocks[cell {cell}, block {block}] is missing")
    out = L.decode_entries(v, env.block_columns, env.code_width, env.code_dtype,
                           f"blocks[cell {cell}, block {block}]", env.vectors)
    ids = out[0]
    tags = out[1].view(np.uint64) if env.keeps_tags else np.zeros(len(ids), np.uint64)
    codes = out[env.block_columns]
    return Block(ids, tags, codes, out[-1] if env.vectors else None)
