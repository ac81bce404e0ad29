"""The write path of the LMDB index: add (staged or into blocks), remove, merge.

Every ``add`` / ``remove`` is one write transaction. Staged adds write one record (see
stage.py) and no id-table rows: whether an id is taken is asked of the id table and of the
process's copy of the stage. Once ``stage_capacity`` entries are staged, the active stage is
frozen and merged in bounded steps, one transaction each, while adds go on into a new active
stage: every add does merge work in proportion to what it added (``MERGE_PACE``), so no add
waits for a whole merge. A merge has two phases: the frozen entries into their cells'
blocks, a range of cells per step (``below`` records how far: readers skip what moved), then
their id-table rows, a range of ids per step, in id order, so a step writes a run of
neighbouring id-table pages however random the ids. A crash between steps leaves a state the
next write goes on from. A remove (or a replace of an id) merges the whole stage first, so
removal keeps one rule: the cell's last entry fills the hole, and all blocks but a cell's
last stay full.
"""
from __future__ import annotations

from functools import partial

import numpy as np

from ..base import IndexCorruptError, bit_counts, fresh_ids, refuse_present
from . import layout as L
from .env import Env
from .layout import StageState
from .lookup import read_block, staged_vectors
from .reader import ReadPath

MERGE_STEP = 1 << 13    # frozen entries (cells' blocks) or ids (id rows) per merge step
MERGE_PACE = 3          # merge work per add: entries or ids merged per entry added (a merge
                        # is 2 x the frozen entries of work, done before the next stage
                        # fills); done a step at a time inside the adds' own commits


def count_tags(env: Env, txn, delta: np.ndarray) -> None:
    """Add delta (64,) int64 to the index's per-bit tag counts, in txn."""
    old = L.parse_tag_counts(env.get_meta(txn, b"tag_counts"))
    txn.put(b"tag_counts", L.tag_counts_value(old + delta), db=env.db["meta"])


class _MergeFirst(Exception):
    """Raised inside a write: the stage must be merged before this write can proceed."""


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

    def get_ascending(self, cells: np.ndarray) -> np.ndarray:
        """The counts (n,) int64 of ascending cells (n,), a chunk at a time."""
        out = np.empty(len(cells), dtype=np.int64)
        chunks = cells // L.SIZE_CHUNK
        runs = L.cell_runs(chunks)
        for s, e in zip(runs[:-1].tolist(), runs[1:].tolist()):
            out[s:e] = self._chunk(int(chunks[s]))[cells[s:e] % L.SIZE_CHUNK]
        return out

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
        self._credit = 0    # merge work this process's adds have earned and not yet done

    # ------------------------------------------------------------------ add
    def add(self, cells, ids, codes, replace: bool = False, vectors=None,
            tags=None) -> np.ndarray:
        env = self.env
        cells = np.asarray(cells, dtype=np.int64)
        codes = np.ascontiguousarray(codes, dtype=env.code_dtype)
        if env.keeps_tags and tags is None:
            tags = np.zeros(len(cells), np.uint64)

        def body(txn):
            nonlocal ids
            if ids is None:  # fresh ids, continuing after the largest so far
                ids = fresh_ids(env.counter(txn, b"next_id"), len(cells))
            ids = np.asarray(ids, dtype=np.int64)
            st = env.stage_meta(txn)
            staged = st.frozen or st.nxt > st.mid
            present = ids[self._present(txn, ids)]
            if not replace:
                refuse_present(present.tolist())
            if staged and (len(present) or not env.stage_capacity):
                raise _MergeFirst  # a replace (removes need no stage), or staging turned off
            step = None
            if st.frozen and self._credit + MERGE_PACE * len(ids) >= self._step_size():
                step = self._step(txn, False)  # a merge step, in the same commit
                st = env.stage_meta(txn)
            touched = [self._remove_in(txn, present)] if len(present) else []
            if env.stage_capacity and len(ids):
                cols = (cells, ids, tags) if env.keeps_tags else (cells, ids)
                txn.put(L.u64(st.nxt), L.encode_entries(cols, codes, env.code_dtype),
                        db=env.db["stage"])
                if vectors is not None:  # staged vectors by id, until the merge
                    with txn.cursor(db=env.db["vectors"]) as cur:
                        cur.putmulti(L.vector_items(ids, vectors))
                st = st._replace(nxt=st.nxt + 1, n_active=st.n_active + len(ids))
                if not st.frozen and st.n_active >= env.stage_capacity:
                    st = _frozen(st)
                env.put_stage(txn, st)
            else:
                touched.append(self._add_in(txn, cells, ids, codes, True, vectors, tags))
            if env.keeps_tags and len(ids):
                count_tags(env, txn, bit_counts(tags))
            env.bump(txn, np.concatenate(touched) if touched else np.empty(0, np.int64),
                     len(ids) - len(present), int(ids.max()) + 1 if len(ids) else 0)
            return ids, st, step
        ids, st, step = self._write_merging(body)
        self._credit = 0 if not st.frozen else \
            self._credit + MERGE_PACE * len(ids) - (max(step[1], 1) if step else 0)
        while self._credit >= self._step_size():  # a large add: more steps, each its own commit
            step = self._frozen_step()
            self._credit = 0 if step is None else self._credit - max(step[1], 1)
        if st.frozen and st.n_active >= env.stage_capacity:
            self._finish_frozen()  # adds outran the merge: no third stage
        return ids

    def _present(self, txn, ids: np.ndarray) -> np.ndarray:
        """(n,) bool: which ids (n,) int64 the index holds, in the id table or staged."""
        order = np.argsort(ids)  # in key order, with one cursor: LMDB looks on the
        present = np.empty(len(ids), dtype=bool)  # cursor's page before descending again
        with txn.cursor(db=self.env.db["ids"]) as cur:
            present[order] = np.fromiter(map(cur.set_key, L.id_keys(ids[order])),
                                         dtype=bool, count=len(ids))
        with self.reader._lock:
            stage = self.reader.refresh(txn).stage
        present[order] |= stage.holds(ids[order])
        return present

    def _write_merging(self, body):
        """env.write(body), merging the stage first when body asks for it."""
        while True:
            try:
                return self.env.write(body)[0]
            except _MergeFirst:
                self.merge()

    def _add_in(self, txn, cells, ids, codes, id_rows: bool, vectors=None,
                tags=None) -> np.ndarray:
        """Entries into their cells' blocks, in one NumPy pass: each cell's last, partly
        filled block is read and laid out again with the new entries after its own, the
        rest go to new blocks; with ``id_rows``, their id-table rows. ``vectors``,
        ``tags``: the entries' (in an index that keeps them). Returns the touched cells."""
        env = self.env
        B = env.block_capacity
        order = np.argsort(cells, kind="stable")
        cells, ids, codes = cells[order], ids[order], codes[order]
        vectors = L.little(vectors[order]) if env.vectors else None
        tags = np.ascontiguousarray(tags[order], dtype="<u8") if env.keeps_tags else None
        runs = L.cell_runs(cells)
        ucells, added = cells[runs[:-1]], np.diff(runs)
        sizes = CellSizes(env, txn)
        old = sizes.get_ascending(ucells)
        nb = L.blocks_for(old, B)
        part = (old % B) != 0                    # cells whose last block has room
        p_cells, p_block = ucells[part], nb[part] - 1
        values = list(map(partial(txn.get, db=env.db["blocks"]),
                          L.block_keys(p_cells, p_block)))
        o_ids, o_tags, o_codes, o_vecs = L.entry_addresses(
            values, old[part] - p_block * B, env.code_bytes,
            lambda j: f"blocks[cell {p_cells[j]}, block {p_block[j]}]", env.vector_bytes,
            env.block_columns)
        n_old = len(o_ids)
        # a cell's old entries first (the concatenation is stably sorted by cell)
        all_cells = np.concatenate([np.repeat(p_cells, old[part] - p_block * B), cells])
        keep = np.argsort(all_cells, kind="stable")
        all_cells = all_cells[keep]
        first = np.repeat(nb - part, np.diff(L.cell_runs(all_cells)))
        ids = np.ascontiguousarray(ids, dtype="<i8")
        items, blocks = L.pack_entries(
            all_cells, np.concatenate([o_ids, L.row_addresses(ids)])[keep],
            np.concatenate([o_codes, L.row_addresses(codes)])[keep], env.code_bytes, B,
            first, np.concatenate([o_vecs, L.row_addresses(vectors)])[keep]
            if env.vectors else None, env.vector_bytes,
            np.concatenate([o_tags, L.row_addresses(tags)])[keep] if env.keeps_tags else None)
        with txn.cursor(db=env.db["blocks"]) as cur:
            cur.putmulti(items)
        del values  # the old values' bytes were copied by pack_entries
        sizes.set_ascending(ucells, old + added)
        sizes.flush()
        if id_rows:
            new = keep >= n_old
            with txn.cursor(db=env.db["ids"]) as cur:
                cur.putmulti(L.id_items(ids[keep[new] - n_old], all_cells[new], blocks[new]))
        return ucells

    # ------------------------------------------------------------------ merge
    def merge(self) -> int:
        """Merge every staged entry into the blocks of its cell (the active stage is
        frozen first), step by step. Returns how many entries moved into the blocks.

        Readers see the index unchanged throughout. Interrupted (a crash, a full disk), the
        next write goes on from where it stopped.
        """
        if self.env.readonly:
            raise PermissionError("the index is open read-only")
        moved = 0
        while True:
            step = self.env.write(lambda txn: self._step(txn, True))[0]
            if step is None:
                return moved
            moved += step[0]

    def _step_size(self) -> int:
        """Entries (or ids) per merge step: an eighth of a small stage."""
        return max(1, min(MERGE_STEP, self.env.stage_capacity // 8 or MERGE_STEP))

    def _frozen_step(self):
        """One step of the merge under way, in a commit of its own (None: there is none)."""
        return self.env.write(lambda txn: self._step(txn, False, True))[0]

    def _finish_frozen(self) -> None:
        """Merge steps until no merge is under way."""
        while self._frozen_step() is not None:
            pass

    def _step(self, txn, everything: bool, frozen_only: bool = False):
        """One merge step: freeze the active stage (when it is full, or ``everything``;
        never with ``frozen_only``), or move a range of cells' frozen entries into the
        blocks, or write a range of frozen ids' rows (the last also drops the frozen
        records). Returns None when there is nothing to do, else (entries moved into
        blocks, work done)."""
        env = self.env
        st = env.stage_meta(txn)
        if not st.frozen:
            if frozen_only:
                return None
            if not st.n_active or not (everything or st.n_active >= env.stage_capacity):
                return None
            env.put_stage(txn, _frozen(st))
            env.bump(txn, np.empty(0, np.int64))
            return 0, 0
        with self.reader._lock:
            state = self.reader.refresh(txn)
        frozen = state.stage.frozen.all_tiers[0]  # folded: every frozen entry, by cell
        if st.below < env.n_cells:  # phase 1: a range of cells into their blocks
            a = int(np.searchsorted(frozen.cells, st.below))
            b = min(a + self._step_size(), len(frozen))
            if b < len(frozen):  # end where a cell ends
                b = int(np.searchsorted(frozen.cells, frozen.cells[b - 1], side="right"))
            below = env.n_cells if b == len(frozen) else int(frozen.cells[b - 1]) + 1
            touched = self._add_in(txn, frozen.cells[a:b], frozen.ids[a:b],
                                   frozen.codes[a:b], False,
                                   self._take_vectors(txn, frozen.ids[a:b]),
                                   frozen.tags[a:b]) if b > a else np.empty(0, np.int64)
            env.put_stage(txn, st._replace(below=below, n_frozen=st.n_frozen - (b - a)))
            env.bump(txn, touched)
            return b - a, b - a
        # phase 2: the id rows of a range of ids, in id order
        sids, size = frozen.sorted_ids(), self._step_size()
        lo = int(np.searchsorted(sids, st.ids_below))
        end = int(sids[lo + size]) if lo + size < len(sids) else L.IDS_DONE
        sel = np.flatnonzero((frozen.ids >= st.ids_below) & (frozen.ids < end))
        run = np.searchsorted(frozen.ustart, sel, side="right") - 1
        run_len = frozen.ustart[run + 1] - frozen.ustart[run]
        cells = frozen.cells[sel]
        # the frozen entries are the last of their cells, in stage order
        pos = state.main[cells] - run_len + (sel - frozen.ustart[run])
        if len(pos) and pos.min() < 0:
            raise IndexCorruptError(f"{env.path}: a cell holds fewer entries than were merged "
                                    "into it: the index is damaged")
        with txn.cursor(db=env.db["ids"]) as cur:
            cur.putmulti(L.id_items(frozen.ids[sel], cells, pos // env.block_capacity))
        if end == L.IDS_DONE:  # the merge is complete: its records go
            self._drop_records(txn, st.lo, st.mid)
            st = st._replace(lo=st.mid, below=0, ids_below=0, n_frozen=0)
        else:
            st = st._replace(ids_below=end)
        env.put_stage(txn, st)
        env.bump(txn, np.empty(0, np.int64))
        return 0, len(sel)

    def _take_vectors(self, txn, ids: np.ndarray):
        """The staged vectors of ids (moving into the blocks): read, then deleted from the
        ``vectors`` table (None where the index keeps no vectors)."""
        if not self.env.vectors:
            return None
        vecs = staged_vectors(self.env, txn, ids)
        db = self.env.db["vectors"]
        for key in L.id_keys(ids):
            txn.delete(key, db=db)
        return vecs

    def _drop_records(self, txn, lo: int, hi: int) -> None:
        """Delete stage records lo .. hi-1."""
        db = self.env.db["stage"]
        with txn.cursor(db=db) as cur:
            ok = cur.set_range(L.u64(lo))
            while ok and L.read_u64(cur.key()) < hi:
                cur.delete()  # moves to the next record, if any
                ok = len(cur.key()) == 8

    # ------------------------------------------------------------------ remove
    def remove(self, ids) -> int:
        env = self.env
        ids = np.unique(np.asarray(ids, dtype=np.int64))

        def body(txn):
            present = ids[self._present(txn, ids)]
            st = env.stage_meta(txn)
            if len(present) and (st.frozen or st.nxt > st.mid):
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
        gone = []    # the removed entries' tags
        for i in ids.tolist():
            c, b = L.id_location(txn.get(L.u64(i), db=ids_db), i, env.n_cells)
            count = sizes.get(c)
            nb = L.blocks_for(count, env.block_capacity)
            if not 0 <= b < nb:
                raise IndexCorruptError(f"ids[{i}] points at block {b} of cell {c}, which has "
                                        f"{nb} blocks")
            last = nb - 1
            blk = read_block(env, txn, c, b)
            pos = np.flatnonzero(blk.ids == i)
            if not len(pos):
                raise IndexCorruptError(f"ids[{i}] points at block ({c}, {b}), which does not "
                                        "hold it")
            pos = int(pos[0])
            gone.append(blk.tags[pos])
            if b == last:
                blk = blk.pick(np.arange(len(blk)) != pos)
            else:
                tail = read_block(env, txn, c, last)
                moved = int(tail.ids[-1])
                blk.ids[pos], blk.tags[pos], blk.codes[pos] = moved, tail.tags[-1], \
                    tail.codes[-1]
                if blk.vectors is not None:
                    blk.vectors[pos] = tail.vectors[-1]
                txn.put(L.u64(moved), L.id_value(c, b), db=ids_db)
                if len(tail) > 1:
                    txn.put(L.block_key(c, last), tail.pick(slice(0, -1)).value(env),
                            db=blocks_db)
                else:
                    txn.delete(L.block_key(c, last), db=blocks_db)
            if len(blk):
                txn.put(L.block_key(c, b), blk.value(env), db=blocks_db)
            else:  # only the last block can empty: drop it
                txn.delete(L.block_key(c, b), db=blocks_db)
            txn.delete(L.u64(i), db=ids_db)
            sizes.set(c, count - 1)
            touched.add(c)
        sizes.flush()
        if env.keeps_tags and gone:
            count_tags(env, txn, -bit_counts(gone))
        return np.fromiter(touched, dtype=np.int64, count=len(touched))

    # ------------------------------------------------------------------ tags
    def set_tags(self, ids: np.ndarray, tags: np.ndarray) -> int:
        """Replace the tag sets of the present ids (one transaction; the stage is merged
        first when any is staged: its records are never rewritten). Returns how many."""
        env = self.env
        ids, first = np.unique(np.asarray(ids, dtype=np.int64), return_index=True)
        tags = np.asarray(tags, dtype=np.uint64)[first]

        def body(txn):
            present = self._present(txn, ids)
            with self.reader._lock:
                stage = self.reader.refresh(txn).stage
            if stage.holds(ids[present]).any():
                raise _MergeFirst
            ids_db, blocks_db = env.db["ids"], env.db["blocks"]
            where = {}   # (cell, block) -> [(id, tags)]
            for i, t in zip(ids[present].tolist(), tags[present].tolist()):
                loc = L.id_location(txn.get(L.u64(i), db=ids_db), i, env.n_cells)
                where.setdefault(loc, []).append((i, t))
            delta = np.zeros(64, np.int64)
            for (c, b), changes in sorted(where.items()):
                blk = read_block(env, txn, c, b)
                for i, t in changes:
                    pos = np.flatnonzero(blk.ids == i)
                    if not len(pos):
                        raise IndexCorruptError(f"ids[{i}] points at block ({c}, {b}), "
                                                "which does not hold it")
                    delta += bit_counts([t]) - bit_counts(blk.tags[pos[0]:pos[0] + 1])
                    blk.tags[pos[0]] = t
                txn.put(L.block_key(c, b), blk.value(env), db=blocks_db)
            count_tags(env, txn, delta)
            touched = np.fromiter((c for c, _ in where), dtype=np.int64, count=len(where))
            env.bump(txn, np.unique(touched))
            return int(present.sum())
        return self._write_merging(body)


def _frozen(st: StageState) -> StageState:
    """The stage state with its active part frozen (no merge must be under way)."""
    return st._replace(lo=st.mid, mid=st.nxt, below=0, ids_below=0, n_frozen=st.n_active,
                       n_active=0)
