"""The bulk writer of the LMDB index: entries appended in key order, then the id table.

Each :meth:`LMDBBulkWriter.append` writes the blocks and cell sizes of a range of cells in one
transaction with LMDB's append mode (no searches, no page splits, no half-empty pages), and
spills where each id went (id, cell, block) to a run file in the scratch directory, sorted by
id, before its commit (a rerun after a kill in between rewrites the same file). Random-order
inserts into the id table would dirty the whole id tree in every transaction, so
:meth:`LMDBBulkWriter.finish` merges the id runs id range by id range and appends the id
table in key order, one transaction per range, recording how many ranges are done. The
entries' vectors and tags, in an index that keeps them, go into the blocks with their codes.

The caller's state rides in ``meta[bulk]``, committed with every step; the writer's own
progress in ``meta[bulk_ids]``.
"""
from __future__ import annotations

import glob
import os
from typing import Callable, Optional

import numpy as np

from ..._runs import gather, write_atomic
from ..base import BulkWriter, bit_counts, check_tags, check_vectors
from . import layout as L
from .env import Env
from .writer import CellSizes, count_tags

ID_RUN = np.dtype([("id", "<i8"), ("cell", "<i8"), ("block", "<i8")])


class LMDBBulkWriter(BulkWriter):
    """See the module docstring. Made by :meth:`LMDBStorage.bulk_writer`."""

    def __init__(self, env: Env, scratch_dir: str, step: int):
        self.env, self.scratch, self.step = env, scratch_dir, max(1, int(step))
        with env.read() as txn:
            if env.get_meta(txn, b"bulk") is None:
                raise ValueError("bulk writing is only for an index created for a bulk load")

    @property
    def state(self) -> Optional[bytes]:
        with self.env.read() as txn:
            v = self.env.get_meta(txn, b"bulk")
            return None if v is None else bytes(v)

    def append(self, cells, ids, codes, state: bytes, vectors=None, tags=None) -> None:
        env = self.env
        vectors = check_vectors(env, vectors, len(cells))
        tags = check_tags(env, tags, len(cells))
        if env.keeps_tags and tags is None:
            tags = np.zeros(len(cells), np.uint64)
        cells = np.asarray(cells, dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64)
        codes = np.ascontiguousarray(codes, dtype=env.code_dtype)
        if len(cells) and np.any(cells[1:] < cells[:-1]):
            raise ValueError("bulk append needs cells in ascending order")
        if len(cells) and (cells[0] < 0 or cells[-1] >= env.n_cells):
            raise ValueError(f"bulk append: cells outside 0 .. {env.n_cells - 1}")
        items, blocks = L.pack_blocks(cells, ids, codes, env.block_capacity, vectors=vectors,
                                      tags=tags)
        if len(cells):
            rec = np.empty(len(cells), dtype=ID_RUN)
            rec["id"], rec["cell"], rec["block"] = ids, cells, blocks
            write_atomic(self._id_run(int(cells[0])), rec[np.argsort(ids, kind="stable")])

        def body(txn):
            if len(cells):
                with txn.cursor(db=env.db["blocks"]) as cur:
                    if cur.last() and L.parse_block_key(cur.key())[0] >= cells[0]:
                        raise ValueError("bulk append cells must come after every stored cell")
                    cur.putmulti(items, append=True)
                runs = L.cell_runs(cells)
                sizes = CellSizes(env, txn)  # a chunk may straddle two appends: read it first
                sizes.set_ascending(cells[runs[:-1]], np.diff(runs))
                sizes.flush()
                if env.keeps_tags:
                    count_tags(env, txn, bit_counts(tags))
            txn.put(b"bulk", state, db=env.db["meta"])
            # Too many cells for the change log: other processes reload all sizes.
            env.bump(txn, None, len(ids))
        env.write(body)

    def finish(self, state: bytes, progress: Optional[Callable[[int], None]] = None) -> None:
        env = self.env
        with env.read() as txn:
            v = env.get_meta(txn, b"bulk_ids")
            done = 0 if v is None else L.read_u64(v)
            with txn.cursor(db=env.db["blocks"]) as cur:
                last_cell = L.parse_block_key(cur.key())[0] if cur.last() else -1
        # Runs of appends that committed (a later one may have been written before a kill).
        runs = [np.load(f, mmap_mode="r") for f in sorted(glob.glob(
            os.path.join(self.scratch, "ids-*.npy"))) if _first_cell(f) <= last_cell]
        bounds = _id_ranges(runs, self.step)
        lo = np.iinfo(np.int64).min
        for r, hi in enumerate(bounds):
            if r >= done:
                part = gather(runs, "id", lo, hi, ID_RUN)
                self._append_ids(part, state, r + 1)
                if progress is not None:
                    progress(len(part))
            lo = hi
        del runs

        def body(txn):
            meta = env.db["meta"]
            txn.put(b"bulk_done", txn.get(b"bulk", db=meta), db=meta)
            txn.delete(b"bulk", db=meta)
            txn.delete(b"bulk_ids", db=meta)
            env.bump(txn, None)
        env.write(body)

    def _append_ids(self, part: np.ndarray, state: bytes, ranges_done: int) -> None:
        """Id-table records of ids all larger than every stored id, in one transaction, in
        append mode. Raises KeyError (nothing written) when an id repeats."""
        env = self.env
        ids = part["id"]
        if len(ids) > 1 and not np.all(np.diff(ids)):
            dup = int(ids[np.flatnonzero(np.diff(ids) == 0)[0]])
            raise KeyError(f"id {dup} occurs more than once: ids must be unique")

        def body(txn):
            if len(ids):
                with txn.cursor(db=env.db["ids"]) as cur:
                    if cur.last() and L.read_u64(cur.key()) >= ids[0]:
                        raise ValueError("bulk id ranges must come after every stored id")
                    cur.putmulti(L.id_items(ids, part["cell"], part["block"]), append=True)
            meta = env.db["meta"]
            txn.put(b"bulk", state, db=meta)
            txn.put(b"bulk_ids", L.u64(ranges_done), db=meta)
            env.bump(txn, np.empty(0, np.int64), 0, int(ids[-1]) + 1 if len(ids) else 0)
        env.write(body)

    def _id_run(self, first_cell: int) -> str:
        return os.path.join(self.scratch, f"ids-{first_cell:012d}.npy")


def _first_cell(path: str) -> int:
    return int(os.path.basename(path)[4:-4])


def _id_ranges(runs, per_range: int) -> list:
    """Exclusive upper ids of consecutive id ranges of about per_range ids each, from a
    strided sample of the sorted id runs (memory: N / stride ids)."""
    stride = max(1, per_range // 64)
    sample = np.sort(np.concatenate([np.asarray(r["id"][::stride]) for r in runs]
                                    + [np.empty(0, np.int64)]))
    step = max(1, per_range // stride)
    bounds = [int(b) for b in np.unique(sample[step::step])]
    return bounds + [None]  # the last range has no upper bound: 2**63-1 is an id too
