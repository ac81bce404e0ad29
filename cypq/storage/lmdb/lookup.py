"""Entries read by id in the LMDB index: where an id is (the id table, else the stage), its
code and its vector (in its block, or, staged, in the ``vectors`` table)."""
from __future__ import annotations

import numpy as np

from ..base import IndexCorruptError
from . import layout as L
from .env import Env


def lookup(env: Env, txn, state, ids: np.ndarray, with_vectors: bool):
    """See :meth:`ReadPath.lookup`: (found, cells, codes, vectors or None) of ids in txn's
    ``state``."""
    found = np.zeros(len(ids), dtype=bool)
    cells = np.full(len(ids), -1, dtype=np.int64)
    codes = np.zeros((len(ids), env.code_width), dtype=env.code_dtype)
    vecs = np.zeros((len(ids), env.vector_width), env.vector_dtype) if with_vectors \
        else None
    rest = []
    for j, i in enumerate(ids.tolist()):
        loc = txn.get(L.u64(i), db=env.db["ids"])
        if loc is None:
            rest.append(j)
            continue
        c, b = L.id_location(loc, i)
        if b & L.STAGED:  # a format 3 row of a staged entry
            rest.append(j)
            continue
        found[j], cells[j] = True, c
        _find_in_blocks(env, txn, i, c, b, b, codes, vecs, j)
    if not rest:
        return found, cells, codes, vecs
    rest = np.asarray(rest, dtype=np.int64)
    part, s_cells, s_codes = state.stage.find(ids[rest])
    below = state.stage.frozen.merged_below
    staged = []
    for j, p, c, code in zip(rest.tolist(), part.tolist(), s_cells.tolist(), s_codes):
        if not p:
            continue
        found[j], cells[j] = True, c
        if p == 1 and c < below:  # merged into the cell's blocks
            nb = L.blocks_for(int(state.main[c]), env.block_capacity)
            _find_in_blocks(env, txn, int(ids[j]), c, 0, nb - 1, codes, vecs, j)
        else:
            codes[j] = code
            staged.append(j)
    if staged and with_vectors:
        vecs[staged] = staged_vectors(env, txn, ids[staged])
    return found, cells, codes, vecs


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
                    j: int) -> None:
    """codes[j] (and vecs[j], unless vecs is None) = those of id i, looked for in blocks
    first .. last of its cell."""
    for b in range(last, first - 1, -1):  # a merged entry sits near the cell's end
        blk_ids, blk_codes, blk_vecs = read_block(env, txn, cell, b)
        pos = np.flatnonzero(blk_ids == i)
        if len(pos):
            codes[j] = blk_codes[pos[0]]
            if vecs is not None:
                vecs[j] = blk_vecs[pos[0]]
            return
    where = f"block ({cell}, {first})" if first == last else \
        f"blocks {first}..{last} of cell {cell}"
    raise IndexCorruptError(f"id {i}: {where} does not hold it, though the index says so")


def read_block(env: Env, txn, cell: int, block: int):
    """Copies of (ids (n,) int64, codes (n, M), vectors (n, w) or None) of one block."""
    v = txn.get(L.block_key(cell, block), db=env.db["blocks"])
    if v is None:
        raise IndexCorruptError(f"blocks[cell {cell}, block {block}] is missing")
    out = L.decode_entries(v, 1, env.code_width, env.code_dtype,
                           f"blocks[cell {cell}, block {block}]", env.vectors)
    return out if env.vectors else (*out, None)
