"""The write path of the LMDB index: add (staged or into blocks), remove, merge.

Every ``add`` / ``remove`` is one write transaction; a merge it triggers runs in transactions
of its own after it. Staged adds write one record (see stage.py) plus their id-table entries;
once ``stage_capacity`` entries are staged they are merged into the blocks, cell range by cell
range, one transaction each (``merged_below`` records how far it got, so a merge cut short is
finished by the next write and readers skip what moved). A remove (or a replace of an id)
merges the stage first, so removal keeps one rule: the cell's last entry fills the hole, and
all blocks but a cell's last stay full.
"""
from __future__ import annotations

import numpy as np

from ..base import IndexCorruptError, fresh_ids, refuse_present
from . import layout as L
from .env import Env
from .reader import ReadPath, read_block
from .stage import StageView

MERGE_CHUNK = 1 << 17             # staged entries merged per transaction


class _MergeFirst(Exception):
    """Raised inside a write: the stage must be merged before this write can proceed."""


class _StageMoved(Exception):
    """Another writer changed the stage while a merge was between transactions."""


class CellSizes:
    """The cell sizes of one write transaction, read and written by chunk."""

    def __init__(self, env: Env, txn):
        self.env, self.txn, self.chunks, self.dirty = env, txn, {}, set()

    def _chunk(self, chunk: int) -> np.ndarray:
        arr = self.chunks.get(chunk)
        if arr is None:
            v = self.txn.get(L.u64(chunk), db=self.env.db["sizes"])
            arr = np.zeros(L.SIZE_CHUNK, np.int64) if v is None else L.parse_sizes(v, chunk)
            self.chunks[chunk] = arr
        return arr

    def get(self, cell: int) -> int:
        return int(self._chunk(cell // L.SIZE_CHUNK)[cell % L.SIZE_CHUNK])

    def set(self, cell: int, count: int) -> None:
        chunk = cell // L.SIZE_CHUNK
        self._chunk(chunk)[cell % L.SIZE_CHUNK] = count
        self.dirty.add(chunk)

    def set_ascending(self, cells: np.ndarray, counts: np.ndarray) -> None:
        """Set the counts (n,) of ascending cells (n,), a chunk at a time."""
        chunks = cells // L.SIZE_CHUNK
        runs = L.cell_runs(chunks)
        for s, e in zip(runs[:-1].tolist(), runs[1:].tolist()):
            chunk = int(chunks[s])
            self._chunk(chunk)[cells[s:e] % L.SIZE_CHUNK] = counts[s:e]
            self.dirty.add(chunk)

    def flush(self) -> None:
        """Write the changed chunks (an all-zero chunk is deleted)."""
        db = self.env.db["sizes"]
        for chunk in sorted(self.dirty):
            arr = self.chunks[chunk]
            if arr.any():
                self.txn.put(L.u64(chunk), L.sizes_value(arr), db=db)
            else:
                self.txn.delete(L.u64(chunk), db=db)
        self.dirty.clear()


class WritePath:
    """Adds, removes and merges of one opened index."""

    def __init__(self, env: Env, reader: ReadPath):
        self.env, self.reader = env, reader

    # ------------------------------------------------------------------ add
    def add(self, cells, ids, codes, replace: bool = False) -> np.ndarray:
        env = self.env
        cells = np.asarray(cells, dtype=np.int64)
        codes = np.ascontiguousarray(codes, dtype=env.code_dtype)

        def body(txn):
            nonlocal ids
            if ids is None:  # fresh ids, continuing after the largest so far
                ids = fresh_ids(env.counter(txn, b"next_id"), len(cells))
            ids = np.asarray(ids, dtype=np.int64)
            ids_db = env.db["ids"]
            present = [i for i in ids.tolist() if txn.get(L.u64(i), db=ids_db) is not None]
            if not replace:
                refuse_present(present)
            epoch, seq, below, staged = env.stage_meta(txn)
            if below or (present and seq) or seq >= L.STAGED - 1:
                raise _MergeFirst  # a merge cut short, or a replace: removes need no stage
            touched = [self._remove_in(txn, np.asarray(present, np.int64))] if present else []
            if env.stage_capacity and len(ids):
                txn.put(L.u64(seq), L.encode_entries((cells, ids), codes, env.code_dtype),
                        db=env.db["stage"])
                with txn.cursor(db=ids_db) as cur:
                    cur.putmulti(L.id_items(ids, cells, np.full(len(ids), L.STAGED | seq)))
                staged += len(ids)
                txn.put(b"stage", L.STAGE_META.pack(epoch, seq + 1, 0, staged),
                        db=env.db["meta"])
            else:
                touched.append(self._add_in(txn, cells, ids, codes))
            env.bump(txn, np.concatenate(touched) if touched else np.empty(0, np.int64),
                     len(ids) - len(present), int(ids.max()) + 1 if len(ids) else 0)
            return ids, staged
        ids, staged = self._write_merging(body)
        if staged >= env.stage_capacity > 0:
            self.merge()
        return ids

    def _write_merging(self, body):
        """env.write(body), merging the stage first when body asks for it."""
        while True:
            try:
                return self.env.write(body)[0]
            except _MergeFirst:
                self.merge()

    def _add_in(self, txn, cells, ids, codes) -> np.ndarray:
        """Entries into their cells' blocks: the last, partly filled block of a cell is
        spliced as bytes; the rest go to new blocks laid out in one NumPy pass. Returns the
        touched cells."""
        env = self.env
        order = np.argsort(cells, kind="stable")
        cells, ids, codes = cells[order], ids[order], codes[order]
        runs = L.cell_runs(cells)
        starts, ends = runs[:-1].tolist(), runs[1:].tolist()
        blocks_db = env.db["blocks"]
        B, cw = env.block_capacity, env.code_bytes
        id_bytes = ids.astype("<i8").tobytes()
        code_bytes = codes.tobytes()
        cell_list = cells.tolist()
        blocks = np.empty(len(cells), dtype=np.int64)     # block of each entry
        first = np.empty(len(cells), dtype=np.int64)      # first new block of its cell
        rest = np.ones(len(cells), dtype=bool)            # entries going to new blocks
        sizes = CellSizes(env, txn)
        for s, e in zip(starts, ends):
            c = cell_list[s]
            count = sizes.get(c)
            nb = L.blocks_for(count, B)
            take = 0
            if nb and count - (nb - 1) * B < B:  # fill the last block first
                key = L.block_key(c, nb - 1)
                old = txn.get(key, db=blocks_db)
                if old is None:
                    raise IndexCorruptError(f"blocks[cell {c}, block {nb - 1}] is missing")
                old = bytes(old)
                n_old = L.entry_count(old, f"blocks[cell {c}, block {nb - 1}]", 1, cw)
                take = min(B - n_old, e - s)
                txn.put(key, L.splice(old, n_old, id_bytes[8 * s:8 * (s + take)],
                                      code_bytes[cw * s:cw * (s + take)]), db=blocks_db)
                blocks[s:s + take] = nb - 1
                rest[s:s + take] = False
            first[s:e] = nb
            sizes.set(c, count + (e - s))
        items, new_blocks = L.pack_blocks(cells[rest], ids[rest], codes[rest], B, first[rest])
        blocks[rest] = new_blocks
        with txn.cursor(db=blocks_db) as cur:
            cur.putmulti(items)
        sizes.flush()
        with txn.cursor(db=env.db["ids"]) as cur:
            cur.putmulti(L.id_items(ids, cells, blocks))
        return cells[starts]

    # ------------------------------------------------------------------ merge
    def merge(self) -> int:
        """Move every staged entry into the blocks of its cell, in transactions of about
        ``MERGE_CHUNK`` entries over ranges of cells. Returns how many entries moved.

        Readers see the index unchanged throughout: each transaction moves entries from the
        stage to the blocks. Interrupted (a crash, a full disk), the next write resumes it.
        """
        env, moved = self.env, 0
        if env.readonly:
            raise PermissionError("the index is open read-only")
        while True:
            with env.read() as txn:
                epoch, nxt, below, staged = env.stage_meta(txn)
                if not nxt:
                    return moved
                records = self.reader.read_records(txn, 0, nxt)
            view = StageView.empty(epoch, env.code_width, env.code_dtype).extended(
                nxt, below, records)
            del records
            cells, ids, codes = view.entries()
            n = len(cells)
            bounds = [0]
            while bounds[-1] < n:  # chunks end where a cell ends
                t = min(bounds[-1] + MERGE_CHUNK, n)
                bounds.append(n if t == n else int(np.searchsorted(cells, cells[t - 1],
                                                                   side="right")))
            if n == 0:
                bounds.append(0)
            expect = (epoch, nxt, below)
            try:
                for s, e in zip(bounds[:-1], bounds[1:]):
                    last = e == n
                    after = (epoch + 1, 0, 0) if last else (epoch, nxt, int(cells[e - 1]) + 1)
                    env.write(lambda txn, s=s, e=e, after=after, expect=expect:
                              self._merge_in(txn, cells[s:e], ids[s:e], codes[s:e],
                                             expect, after))
                    expect = after
                    moved += e - s
                return moved
            except _StageMoved:  # another writer got in between: start over from its state
                continue

    def _merge_in(self, txn, cells, ids, codes, expect, after) -> None:
        """One merge transaction: entries of a range of cells from the stage to blocks."""
        env = self.env
        epoch, nxt, below, staged = env.stage_meta(txn)
        if (epoch, nxt, below) != expect:
            raise _StageMoved
        touched = self._add_in(txn, cells, ids, codes) if len(cells) else np.empty(0, np.int64)
        if after[1] == 0:  # the last range: the records go
            txn.drop(env.db["stage"], delete=False)
        txn.put(b"stage", L.STAGE_META.pack(*after, staged - len(cells) if after[1] else 0),
                db=env.db["meta"])
        env.bump(txn, touched)

    # ------------------------------------------------------------------ remove
    def remove(self, ids) -> int:
        env = self.env
        ids = np.unique(np.asarray(ids, dtype=np.int64))

        def body(txn):
            ids_db = env.db["ids"]
            present = np.asarray([i for i in ids.tolist()
                                  if txn.get(L.u64(i), db=ids_db) is not None], np.int64)
            if len(present) and env.stage_meta(txn)[1]:
                raise _MergeFirst
            touched = self._remove_in(txn, present) if len(present) else np.empty(0, np.int64)
            env.bump(txn, touched, -len(present))
            return len(present)
        return self._write_merging(body)

    def _remove_in(self, txn, ids) -> np.ndarray:
        """Remove present ids: each hole is filled with the last entry of its cell's last
        block, so all blocks but the last stay full. Returns the touched cells."""
        env = self.env
        blocks_db, ids_db = env.db["blocks"], env.db["ids"]
        sizes = CellSizes(env, txn)
        touched = set()
        for i in ids.tolist():
            c, b = L.id_location(txn.get(L.u64(i), db=ids_db), i)
            count = sizes.get(c)
            nb = L.blocks_for(count, env.block_capacity)
            if not 0 <= b < nb:
                raise IndexCorruptError(f"ids[{i}] points at block {b} of cell {c}, which has "
                                        f"{nb} blocks")
            last = nb - 1
            blk_ids, blk_codes = read_block(env, txn, c, b)
            pos = np.flatnonzero(blk_ids == i)
            if not len(pos):
                raise IndexCorruptError(f"ids[{i}] points at block ({c}, {b}), which does not "
                                        "hold it")
            pos = int(pos[0])
            if b == last:
                blk_ids = np.delete(blk_ids, pos)
                blk_codes = np.delete(blk_codes, pos, axis=0)
            else:
                t_ids, t_codes = read_block(env, txn, c, last)
                moved = int(t_ids[-1])
                blk_ids[pos], blk_codes[pos] = moved, t_codes[-1]
                txn.put(L.u64(moved), L.id_value(c, b), db=ids_db)
                if len(t_ids) > 1:
                    txn.put(L.block_key(c, last),
                            L.encode_entries((t_ids[:-1],), t_codes[:-1], env.code_dtype),
                            db=blocks_db)
                else:
                    txn.delete(L.block_key(c, last), db=blocks_db)
            if len(blk_ids):
                txn.put(L.block_key(c, b), L.encode_entries((blk_ids,), blk_codes,
                                                            env.code_dtype), db=blocks_db)
            else:  # only the last block can empty: drop it
                txn.delete(L.block_key(c, b), db=blocks_db)
            txn.delete(L.u64(i), db=ids_db)
            sizes.set(c, count - 1)
            touched.add(c)
        sizes.flush()
        return np.fromiter(touched, dtype=np.int64, count=len(touched))
