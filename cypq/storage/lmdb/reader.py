"""The read path of the LMDB index: the committed state each process keeps (generation, cell
sizes, staged entries), snapshots for searches, the segment cache, lookups.

A process keeps the state of the newest generation it has seen and brings it forward from the
change log (cells touched per generation) instead of reloading everything.

The segment cache holds, per cell, the addresses of its blocks (zero-copy, inside LMDB's map)
and of its staged entries (inside the process's stage view). Block addresses are read under a
*pin*: a read transaction the cache keeps open, so LMDB reuses none of the pages they point
into (MVCC: pages freed after the pin's generation stay as they were). A newer generation
therefore carries the cache over and re-reads only the cells the change log says were written
since (and those whose staged entries changed): the first search after a write reads what the
write touched, not every cell again. At most ``MAX_PINS`` generations are pinned at once
(then the cache starts afresh), and a process that stops searching releases its pins after
``IDLE_RELEASE`` seconds, so that pinned pages never make a writer's file grow for long.
Filling is vectorised: block keys come from the cell sizes (a cell of n entries has
ceil(n / capacity) blocks), are fetched in one C-level loop, and every value's header and
length are checked before any address reaches the kernel.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import lmdb
import numpy as np

from ..base import IndexCorruptError, IndexFormatError, Segments, Snapshot
from . import layout as L
from .env import LOG_KEEP, SIZE_CHUNKS, Env
from .lookup import lookup, staged_vectors
from .stage import Stage, StageView

MAX_PINS = 8            # generations a segment cache may keep pinned
IDLE_RELEASE = 2.0      # seconds without a search after which pins are released


class State:
    """One committed state as a process sees it (immutable)."""

    __slots__ = ("gen", "main", "total", "stage", "_base", "_sizes")

    def __init__(self, gen: int, main: np.ndarray, total: int, stage: Stage,
                 prev: "State | None" = None):
        self.gen = gen          # generation
        self.main = main        # (n_cells,) int64 entries in blocks
        self.total = total      # main.sum()
        self.stage = stage      # staged entries, sorted by cell
        # sizes with the stage are made when first asked for (a writer checking ids needs
        # none); blocks + every tier but the last (``_base``, shared in a one-item list)
        # carries over while those stay the same
        self._base, self._sizes = [None], None
        if prev is not None and prev.main is main:
            if prev.stage is stage:
                self._base, self._sizes = prev._base, prev._sizes
            elif all(a is b for a, b in zip(stage.fixed_tiers, prev.stage.fixed_tiers)):
                self._base = prev._base

    @property
    def sizes(self) -> np.ndarray:
        """(n_cells,) int64 entries in blocks and stage."""
        if self._sizes is None:
            if self._base[0] is None:
                self._base[0] = self.stage.add_counts(self.main, self.stage.fixed_tiers)
            self._sizes = self.stage.add_counts(self._base[0], (self.stage.active.recent,))
        return self._sizes


class ReadPath:
    """State, snapshots and lookups of one opened index."""

    def __init__(self, env: Env):
        self.env = env
        self._lock = threading.Lock()      # guards the state and the cache
        self._cache = None                 # _SegmentCache of the newest state
        self._last_use = 0.0
        self._timer = None                 # releases the pins of an idle process
        self.layout_epoch = -1             # counts reloads: snapshots of an older one refuse
        env.on_change.append(self.invalidate)
        self.reload()

    def reload(self) -> None:
        """Forget the state and the cache and read the newest state afresh (at opening, and
        when the layout changed under them)."""
        self.invalidate()
        with self.env.read() as txn, self._lock:
            self.layout_epoch += 1
            zero = np.zeros(self.env.n_cells, dtype=np.int64)
            self._state = State(-1, zero, 0, Stage.empty(self.env.code_width,
                                                         self.env.code_dtype))
            self.refresh(txn)

    def invalidate(self) -> None:
        """Drop the segment cache and its pins (the map changed; the index closes)."""
        with self._lock:
            self._cache = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _idle_check(self) -> None:
        with self._lock:
            self._timer = None
            if self._cache is None:
                return
            if time.monotonic() - self._last_use >= IDLE_RELEASE:
                self._cache = None      # its pins close once no search holds them
            else:
                self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(IDLE_RELEASE, self._idle_check)
            self._timer.daemon = True
            self._timer.start()

    # ------------------------------------------------------------------ state
    def refresh(self, txn) -> State:
        """The state of txn's snapshot (call with the lock held); the shared state only
        moves forward."""
        gen = self.env.counter(txn, b"gen")
        st = self._state
        if gen == st.gen:
            return st
        if gen < st.gen:  # a snapshot older than one already seen: read it privately
            stage = self.load_stage(txn, None)
            main = self._load_sizes(txn)
            return State(gen, main, self._check_count(txn, main, None, stage), stage)
        touched = self._touched(txn, st.gen, gen) if st.gen >= 0 else None
        total = None
        if touched is None:  # first load, or too far behind the log: read every size
            main = self._load_sizes(txn)
        elif len(touched):
            main = st.main.copy()  # searches in flight keep reading the old array
            delta, low = self._update_sizes(txn, main, touched)
            total = st.total + delta if low >= 0 else -1
        else:
            main, total = st.main, st.total
        stage = self.load_stage(txn, st.stage)
        if main is not st.main or stage is not st.stage:
            total = self._check_count(txn, main, total, stage)
        else:
            total = st.total
        self._state = State(gen, main, total, stage, st)
        return self._state

    def _check_count(self, txn, main: np.ndarray, total, stage: Stage) -> int:
        """Cell sizes and staged entries must add up to the entry count: a damaged size
        would otherwise send a search after blocks that do not exist (billions of them).
        Returns main.sum() (``total``: known already, -1 for a negative size; None:
        to be summed)."""
        count = self.env.counter(txn, b"count")
        if total is None:
            total = int(main.sum())
            if len(main) and main.min() < 0:
                total = -1
        held = total + len(stage)
        if held != count or total < 0:
            raise IndexCorruptError(f"{self.env.path}: the cell sizes and the stage hold "
                                    f"{held:,} entries but the index counts {count:,}: the "
                                    "index is damaged")
        return total

    def _touched(self, txn, seen: int, gen: int):
        """Cells touched by generations seen+1 .. gen, or None where the log does not
        cover them all."""
        if gen - seen > LOG_KEEP:
            return None
        parts, log = [], self.env.db["log"]
        for g in range(seen + 1, gen + 1):
            rec = txn.get(L.u64(g), db=log)
            if rec is None:
                return None
            if len(rec) % 8:
                raise IndexCorruptError(f"log[{g}]: value of {len(rec)} bytes is not a list "
                                        "of cells")
            parts.append(np.frombuffer(rec, dtype="<i8"))
        touched = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)
        if len(touched) and (touched[0] < 0 or touched[-1] >= self.env.n_cells):
            raise IndexCorruptError("log: a cell outside the index")
        return touched

    def _format_of(self, txn, layout: bool = False) -> int:
        """The snapshot's format version, which must be the one this process opened (and,
        with ``layout``, so must the config's features: tags_column.py changes them)."""
        fmt = self.env.get_meta(txn, b"format")
        version = int.from_bytes(bytes(fmt)[-4:], "big") if fmt is not None else 0
        if version != self.env.version or (layout and self._features(txn) != self.env.features):
            raise IndexFormatError(f"{self.env.path} was upgraded (format {version}) by "
                                   "another process since it was opened here: open it again")
        return version

    def _features(self, txn) -> frozenset:
        try:
            return frozenset(json.loads(bytes(self.env.get_meta(txn, b"config"))).get(
                "features", ()))
        except (TypeError, ValueError, AttributeError):
            raise IndexCorruptError(f"{self.env.path}: meta[config] is not readable") from None

    def _load_sizes(self, txn) -> np.ndarray:
        """(n_cells,) int64 entries in blocks, from every record (one cursor pass)."""
        env = self.env
        if self._format_of(txn, layout=True) < SIZE_CHUNKS:
            return L.legacy_sizes(txn, env.db["cells"], env.n_cells)
        with txn.cursor(db=env.db["sizes"]) as cur:
            keys = b"".join(cur.iternext(keys=True, values=False))
            cur.first()
            values = b"".join(cur.iternext(keys=False, values=True))
        return L.sizes_from_chunks(keys, values, env.n_cells)

    def _update_sizes(self, txn, main: np.ndarray, touched: np.ndarray):
        """Re-read the sizes of the touched cells (their chunks) into main; returns (the
        change of main's sum, the smallest size read)."""
        env = self.env
        delta, low = 0, 0
        if self._format_of(txn) < SIZE_CHUNKS:
            for c in touched.tolist():
                old, main[c] = main[c], L.legacy_size(txn, env.db["cells"], c)
                delta, low = delta + int(main[c] - old), min(low, int(main[c]))
            return delta, low
        for chunk in L.size_chunks(touched).tolist():
            lo = chunk * L.SIZE_CHUNK
            hi = min(lo + L.SIZE_CHUNK, env.n_cells)
            v = txn.get(L.u64(chunk), db=env.db["sizes"])
            old = int(main[lo:hi].sum())
            main[lo:hi] = 0 if v is None else L.parse_sizes(v, chunk)[:hi - lo]
            delta, low = delta + int(main[lo:hi].sum()) - old, min(low, int(main[lo:hi].min()))
        return delta, low

    def read_records(self, txn, lo: int, hi: int) -> list:
        """Stage records lo .. hi-1, each (cells, ids, codes, tags (zero without tags))."""
        out, env = [], self.env
        if hi <= lo or env.db["stage"] is None:
            return out
        with txn.cursor(db=env.db["stage"]) as cur:
            ok = cur.set_range(L.u64(lo))
            while ok and L.read_u64(cur.key()) < hi:
                rec = L.decode_entries(cur.value(), env.stage_columns, env.code_width,
                                       env.code_dtype, f"stage[{L.read_u64(cur.key())}]")
                rec = (rec[0], rec[1], rec[-1], rec[2].view(np.uint64) if env.keeps_tags
                       else np.zeros(len(rec[0]), np.uint64))
                if len(rec[0]) and (rec[0].min() < 0 or rec[0].max() >= env.n_cells):
                    raise IndexCorruptError(f"stage[{L.read_u64(cur.key())}]: a cell outside "
                                            "the index")
                out.append(rec)
                ok = cur.next()
        return out

    def load_stage(self, txn, prev: Stage | None) -> Stage:
        """The stage of txn's state, reading only the records ``prev`` lacks."""
        env = self.env
        st = env.stage_meta(txn)
        empty = lambda key: StageView.empty(key, env.code_width, env.code_dtype)  # noqa: E731
        fkey, akey = (st.epoch, st.lo), (st.epoch, st.mid)
        old_f = old_a = None
        if prev is not None:
            old_f, old_a = prev.frozen, prev.active
        # the frozen part: the active part that was frozen, or unchanged, or read afresh
        if not st.frozen:
            frozen = old_f if old_f is not None and old_f.key == fkey else empty(fkey)
        else:
            base = old_a if old_a is not None and old_a.key == fkey else \
                old_f if old_f is not None and old_f.key == fkey else empty(fkey)
            if base.next_seq != st.mid:
                base = base.extended(st.mid, self.read_records(txn, base.next_seq, st.mid))
            frozen = base.folded(st.below)
        base = old_a if old_a is not None and old_a.key == akey else empty(akey)
        active = base if base.next_seq == st.nxt else \
            base.extended(st.nxt, self.read_records(txn, base.next_seq, st.nxt))
        if prev is not None and frozen is old_f and active is old_a:
            return prev
        if len(frozen) != st.n_frozen or len(active) != st.n_active:
            raise IndexCorruptError(f"{env.path}: the stage records hold {len(frozen):,} + "
                                    f"{len(active):,} staged entries but meta[stage] says "
                                    f"{st.n_frozen:,} + {st.n_active:,}: the index is damaged")
        return Stage(frozen, active)

    # ------------------------------------------------------------------ searching
    def cell_sizes(self) -> np.ndarray:
        with self.env.read() as txn, self._lock:
            return self.refresh(txn).sizes

    @contextmanager
    def snapshot(self):
        with self.env.read() as txn:
            with self._lock:
                state = self.refresh(txn)
            yield _LMDBSnapshot(self, txn, state)

    def segments(self, txn, state: State, cells: np.ndarray):
        """(cache, Segments) of ascending distinct cells in txn's state; the caller keeps
        the cache (and with it the pins) referenced while it reads the addresses."""
        with self._lock:
            cache = self._cache
            self._last_use = time.monotonic()
            if cache is None or cache.state is not state:
                if state is self._state:  # the newest state: carry the cache over
                    cache = self._cache = self._next_cache(cache, state)
                    self._arm_timer()
                else:  # an older snapshot keeps a cache of its own, read under its txn
                    cache = _SegmentCache(self.env.n_cells, state, None)
            missing = cells[~cache.has(cells)]
            if len(missing):
                self._fill(cache.pin.txn if cache.pin is not None else txn, cache, missing)
            return cache, cache.segments(cells)

    def _next_cache(self, old, state: State) -> "_SegmentCache":
        """A cache for the newest state: the old one's segments of the cells unchanged
        since, where the log tells which changed and the pins allow; else an empty one."""
        env = self.env
        try:
            pin = _Pin(env.lmdb.begin(buffers=True, db=env.db["blocks"]))
        except lmdb.MapResizedError:  # the snapshot's own transaction will do
            return _SegmentCache(env.n_cells, state, None)
        if env.counter(pin.txn, b"gen") != state.gen:   # a write came in between
            return _SegmentCache(env.n_cells, state, None)
        new = _SegmentCache(env.n_cells, state, pin)
        if old is None or old.pin is None or len(old.pins) >= MAX_PINS or \
                old.state.gen > state.gen or old.garbage() > 0.5:
            return new
        changed = self._touched(pin.txn, old.state.gen, state.gen)
        if changed is None:
            return new
        parts = [changed]
        for t_old, t_new in zip(old.state.stage.tiers, state.stage.tiers):
            if t_old is not t_new:  # staged segments of these cells moved
                parts += [t_old.ucells, t_new.ucells]
        new.carry(old, np.concatenate(parts))
        return new

    def _fill(self, txn, cache: "_SegmentCache", cells: np.ndarray) -> None:
        """Read the blocks of cells (ascending, zero-copy) into the cache; a cell's staged
        entries are one more segment per stage tier after its blocks."""
        env, state = self.env, cache.state
        B = env.block_capacity
        counts = state.main[cells]
        nb = L.blocks_for(counts, B)
        n_blocks = int(nb.sum())
        first = np.zeros(len(cells) + 1, dtype=np.int64)
        np.cumsum(nb, out=first[1:])
        owner = np.repeat(cells, nb)
        block = np.arange(n_blocks) - np.repeat(first[:-1], nb)
        bufs = list(map(txn.get, L.block_keys(owner, block)))  # txn's default db: blocks
        # each block present, and its checksum checked once, as it enters the cache (searches
        # then read it in place as often as they like): a damaged code, id or vector is refused
        addr, length, n = L.block_headers(bufs, lambda j: f"blocks[cell {owner[j]}, block "
                                          f"{block[j]}]")
        last = np.repeat(counts - (nb - 1) * B, nb)
        expect = np.where(block == np.repeat(nb - 1, nb), last, B)
        blk_ids, blk_tags, blk_codes, blk_vecs, bad = L.block_addresses(
            addr, length, n, expect, env.code_bytes, env.vector_bytes, env.block_columns)
        if bad >= 0:
            raise IndexCorruptError(f"blocks[cell {owner[bad]}, block {block[bad]}]: header "
                                    f"says {n[bad]} entries in {length[bad]} bytes; expected "
                                    f"{expect[bad]} entries")
        # Segments of each cell: its blocks, then its entries in each stage tier in order.
        tiers = state.stage.tiers
        found = [t.locate(cells) for t in tiers]   # (has, start, count) per tier
        per_cell = nb + sum(f[0] for f in found)
        seg0 = np.zeros(len(cells) + 1, dtype=np.int64)
        np.cumsum(per_cell, out=seg0[1:])
        total = int(seg0[-1])
        ids_at = np.empty(total, dtype=np.uintp)
        codes_at = np.empty(total, dtype=np.uintp)
        vecs_at = np.zeros(total, dtype=np.uintp)   # staged entries: 0, read by id
        tags_at = np.empty(total, dtype=np.uintp)
        seg_len = np.empty(total, dtype=np.int64)
        at = np.repeat(seg0[:-1], nb) + block
        ids_at[at], codes_at[at], seg_len[at], tags_at[at] = blk_ids, blk_codes, n, blk_tags
        if env.vectors:
            vecs_at[at] = blk_vecs
        after = seg0[:-1] + nb
        for tier, (has, start, cnt) in zip(tiers, found):
            if has.any():
                at, first_entry = after[has], start[has].astype(np.uintp)
                ids_at[at] = tier.ids.ctypes.data + np.uintp(8) * first_entry
                tags_at[at] = tier.tags.ctypes.data + np.uintp(8) * first_entry
                codes_at[at] = tier.codes.ctypes.data + first_entry * np.uintp(
                    tier.codes.strides[0])
                seg_len[at] = cnt[has]
                after = after + has
        cache.add(cells, per_cell, ids_at, codes_at, seg_len, vecs_at, tags_at)

    # ------------------------------------------------------------------ lookups
    def lookup(self, ids: np.ndarray, with_vectors: bool = False, txn=None, state=None):
        """(found (n,) bool, cells (n,) int64, codes (n, M), vectors (n, w) or None, tags
        (n,) uint64) of ids (n,) int64: from the id table, else from the stage; a frozen entry already merged
        (its row not written yet) is looked for in its cell's blocks. Vectors (with
        ``with_vectors``) come from the blocks, a staged entry's from the ``vectors`` table.
        Read in ``txn`` of ``state`` when given, else in a new read transaction."""
        if txn is None:
            with self.env.read() as txn:
                with self._lock:
                    state = self.refresh(txn)
                return lookup(self.env, txn, state, ids, with_vectors)
        return lookup(self.env, txn, state, ids, with_vectors)


class _LMDBSnapshot(Snapshot):
    def __init__(self, reader: ReadPath, txn, state: State):
        self._r, self._txn, self._state = reader, txn, state  # state holds the stage arrays
        self.generation = state.gen   # every write transaction bumps it (env.bump)
        self._caches = []
        self._epoch = reader.layout_epoch

    def cell_sizes(self):
        return self._state.sizes

    def segments(self, cells):
        if self._epoch != self._r.layout_epoch:   # (a block's length check would refuse too)
            raise IndexFormatError(f"{self._r.env.path}: the index started keeping tags "
                                   "during this search: search again")
        cache, seg = self._r.segments(self._txn, self._state,
                                      np.asarray(cells, dtype=np.int64))
        self._caches.append(cache)  # its pins stay open while this snapshot is
        if not self._r.env.vectors:
            seg.vectors = None
        if not self._r.env.keeps_tags:
            seg.tags = None
        return seg

    def lookup(self, ids):
        found, cells, codes, _, tags = self._r.lookup(np.asarray(ids, dtype=np.int64), False,
                                                      self._txn, self._state)
        return found, cells, codes, tags

    def vectors(self, ids):
        if not self._r.env.vectors:
            return super().vectors(ids)
        found, _, _, vecs, _ = self._r.lookup(np.asarray(ids, dtype=np.int64), True,
                                              self._txn, self._state)
        return found, vecs

    def entries(self, lo, hi, vectors=False, tags=False):
        env = self._r.env
        parts = []
        with self._txn.cursor(db=env.db["blocks"]) as cur:
            ok = cur.set_range(L.block_key(lo, 0))
            while ok:
                c, b = L.parse_block_key(cur.key())
                if c >= hi:
                    break
                out = L.decode_entries(cur.value(), env.block_columns, env.code_width,
                                       env.code_dtype, f"blocks[cell {c}, block {b}]",
                                       env.vectors)
                ids, codes = out[0], out[env.block_columns]
                parts.append((np.full(len(ids), c, np.int64), ids, codes)
                             + ((out[-1],) if env.vectors else ())
                             + ((out[1].view(np.uint64),) if env.keeps_tags else ()))
                ok = cur.next()
        for tier in self._state.stage.tiers:  # after the blocks: a stable sort keeps that
            a, b = np.searchsorted(tier.cells, [lo, hi])
            parts.append((tier.cells[a:b], tier.ids[a:b], tier.codes[a:b])
                         + ((staged_vectors(env, self._txn, tier.ids[a:b]),) if env.vectors
                            else ()) + ((tier.tags[a:b],) if env.keeps_tags else ()))
        cols = [np.concatenate(p) for p in zip(*parts)]
        order = np.argsort(cols[0], kind="stable")
        out = tuple(c[order] for c in cols)
        want = (True,) * 3 + ((vectors,) if env.vectors else ()) + \
            ((tags,) if env.keeps_tags else ())
        return tuple(c for c, w in zip(out, want) if w)


class _Pin:
    """An open read transaction that keeps the pages of its generation from being reused;
    aborted when the last cache holding it goes."""

    __slots__ = ("txn",)

    def __init__(self, txn):
        self.txn = txn

    def __del__(self):
        try:
            self.txn.abort()
        except Exception:  # the environment is already closed
            pass


class _SegmentCache:
    """cell -> its segments' (codes, ids, length) addresses in one state. Block addresses
    were read under one of ``pins``; ``pin`` (None for a private cache, read under its
    snapshot's transaction) is where new ones are read."""

    def __init__(self, n_cells: int, state: State, pin):
        self.state, self.pin = state, pin
        self.pins = [] if pin is None else [pin]
        self.first = np.full(n_cells, -1, dtype=np.int64)   # first segment of the cell
        self.count = np.zeros(n_cells, dtype=np.int64)
        self.codes = np.empty(0, dtype=np.uintp)
        self.ids = np.empty(0, dtype=np.uintp)
        self.vectors = np.empty(0, dtype=np.uintp)
        self.tags = np.empty(0, dtype=np.uintp)
        self.length = np.empty(0, dtype=np.int64)

    def carry(self, old: "_SegmentCache", changed: np.ndarray) -> None:
        """Take over old's segments but those of the changed cells, and its pins."""
        self.first, self.count = old.first.copy(), old.count.copy()
        self.first[changed] = -1
        self.count[changed] = 0
        self.codes, self.ids, self.length = old.codes, old.ids, old.length
        self.vectors, self.tags = old.vectors, old.tags
        self.pins = old.pins + self.pins

    def garbage(self) -> float:
        """Share of the segment arrays no cell refers to any more."""
        return 1.0 - int(self.count.sum()) / max(1, len(self.codes))

    def has(self, cells):
        return self.first[cells] >= 0

    def add(self, cells, per_cell, ids_addr, codes_addr, n, vecs_addr, tags_addr):
        """Segments of ascending cells, per_cell[j] of them for cells[j], consecutive."""
        base = len(self.codes)
        self.codes = np.concatenate([self.codes, codes_addr])
        self.ids = np.concatenate([self.ids, ids_addr])
        self.vectors = np.concatenate([self.vectors, vecs_addr])
        self.tags = np.concatenate([self.tags, tags_addr])
        self.length = np.concatenate([self.length, n])
        starts = np.zeros(len(cells), dtype=np.int64)
        np.cumsum(per_cell[:-1], out=starts[1:])
        self.first[cells] = base + starts
        self.count[cells] = per_cell

    def segments(self, cells) -> Segments:
        counts = self.count[cells]
        start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        seg = np.repeat(self.first[cells], counts) + (
            np.arange(start[-1]) - np.repeat(start[:-1], counts))
        return Segments(cells, start, self.codes[seg], self.ids[seg], self.length[seg],
                        self.vectors[seg], self.tags[seg])
