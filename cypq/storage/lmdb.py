"""Inverted lists on disk in an LMDB environment (one directory per index).

Layout (all integers big-endian in keys, so LMDB's byte order is numeric order):

- ``meta``: ``format`` (b"cypq-index" + u32 version), ``model`` (the LOPQ protobuf, cypq's
  PCA fields included), ``config`` (JSON: block capacity, stage capacity, code width and
  dtype), ``gen`` (u64, bumped by every write transaction), ``count`` (u64, staged entries
  included), ``next_id`` (u64), ``stage`` (u64 epoch, u64 next record number, u64 cell below
  which a merge in progress has moved the staged entries, u64 staged entries).
- ``blocks``: key = cell (u64) + block number (u32); value = u32 n, u32 pad, n int64 ids
  (little-endian), n codes. A cell's blocks are numbered 0 .. nb-1 and all but the last are
  full, so adding a vector rewrites one block (the last) and a search reads a cell's blocks
  zero-copy.
- ``cells``: key = cell (u64); value = u64 entries, u32 blocks.
- ``ids``: key = id (u64); value = cell (u64) + block (u32), or ``2**31 | record number``
  for a staged entry: remove / replace / duplicate checks touch one block, never scan.
- ``stage``: key = record number (u64); value = the entries of one add: u32 n, u32 pad, n
  cells, n ids (int64 little-endian), n codes (the block layout with one more column). An add
  appends one record (a few sequential pages whatever the number of cells it touches) and
  its id-table entries; when ``stage_capacity`` entries are staged they are merged into the
  blocks, cell range by cell range, one transaction each (``merged_below`` records how far it
  got, so a merge cut short is finished by the next write and readers skip what moved).
  Searches read the staged entries from a process-local copy sorted by cell. A remove (or a
  replace of an id) merges the stage first, so removal keeps one rule: the cell's last entry
  fills the hole.
- ``log``: key = generation (u64); value = the cells that write touched (int64). Other
  processes bring their in-memory cell sizes up to date from it instead of reloading all.

Every ``add`` / ``remove`` is one write transaction (LMDB: atomic, durable at commit with
``sync=True``, the default); a merge it triggers runs in transactions of its own after it. The
map grows by itself: on MapFullError the transaction is abandoned, the map doubled and the
call retried.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import weakref
from contextlib import contextmanager

import lmdb
import numpy as np

from .. import _buffers
from .base import Segments, Snapshot, Storage
from .stage import StageView, cell_runs

FORMAT = b"cypq-index"
VERSION = 2                       # 2: the stage (version 1 indexes are upgraded when written)
_U64 = struct.Struct(">Q")
_STAGE_META = struct.Struct(">QQQQ")
_STAGED = 1 << 31                 # id-table block field of a staged entry: | record number
_MERGE_CHUNK = 1 << 17            # staged entries merged per transaction
_DEFAULT_STAGE = 1 << 20
_CELL_BLOCK = struct.Struct(">QI")
_CELLINFO = struct.Struct(">QI")
_LOG_KEEP = 4096                  # generations of change log kept for other processes
_DEFAULT_MAP = 1 << 30


class IndexFormatError(ValueError):
    """The directory is not a cypq index, or one this version cannot read."""


class _MergeFirst(Exception):
    """Raised inside a write: the stage must be merged before this write can proceed."""


class _StageMoved(Exception):
    """Another writer changed the stage while a merge was between transactions."""


# LMDB forbids opening one environment twice in a process; indexes opened twice share it.
_ENVS: dict[str, tuple[lmdb.Environment, int]] = {}
_ENVS_LOCK = threading.Lock()


def _acquire_env(path: str, readonly: bool, create: bool, map_size: int, sync: bool):
    real = os.path.realpath(path)
    with _ENVS_LOCK:
        if real in _ENVS:
            env, refs = _ENVS[real]
            if not readonly and env.flags().get("readonly"):
                raise ValueError(f"{path} is already open read-only in this process; close it "
                                 "before opening it for writing")
            _ENVS[real] = (env, refs + 1)
            return env, real
        if not create and not os.path.exists(os.path.join(path, "data.mdb")):
            raise IndexFormatError(f"{path} is not a cypq index (no LMDB data file): create "
                                   "one with cypq.Index.create")
        env = lmdb.open(path, map_size=map_size, max_dbs=8, subdir=True, readonly=readonly,
                        create=create, sync=sync, metasync=sync, max_readers=512,
                        lock=True, readahead=False)
        env.reader_check()  # drop reader slots left by processes that died
        _ENVS[real] = (env, 1)
        return env, real


def _release_env(real: str) -> None:
    with _ENVS_LOCK:
        env, refs = _ENVS[real]
        if refs > 1:
            _ENVS[real] = (env, refs - 1)
        else:
            del _ENVS[real]
            env.close()


class LMDBStorage(Storage):
    """The LMDB inverted lists. Make with :meth:`create` / :meth:`open`."""

    def __init__(self, env, real, model, config, readonly):
        self._env, self._real, self.model, self.readonly = env, real, model, readonly
        self.n_cells = model.V * model.V
        self.code_width = int(config["M"])
        self.code_dtype = np.dtype(config["code_dtype"])
        self.block_capacity = int(config["block_capacity"])
        self.stage_capacity = int(config.get("stage_capacity", _DEFAULT_STAGE))
        self._db = {name: env.open_db(name.encode(), create=False)
                    for name in ("meta", "blocks", "cells", "ids", "log")}
        try:
            self._db["stage"] = env.open_db(b"stage", create=False)
        except lmdb.NotFoundError:  # a version 1 index opened read-only: nothing staged
            self._db["stage"] = None
        self._lock = threading.Lock()      # guards the caches below
        self._main_sizes = np.zeros(self.n_cells, dtype=np.int64)   # in blocks
        self._stage = StageView.empty(-1, self.code_width, self.code_dtype)
        self._base_sizes = self._main_sizes  # blocks + the stage's base tier
        self._sizes = self._main_sizes     # blocks + stage
        self._gen = -1
        self._cache = None                 # _SegmentCache of generation self._gen
        self._closed = False
        with self._read() as txn:
            self._refresh(txn)
        self._finalizer = weakref.finalize(self, _release_env, real)

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str, model, block_capacity: int = 128, map_size: int = _DEFAULT_MAP,
               sync: bool = True, bulk_state: bytes | None = None,
               stage_capacity: int = _DEFAULT_STAGE) -> "LMDBStorage":
        """Create an empty index in directory ``path`` (created; must be empty if it exists).

        Parameters
        ----------
        path : str
        model : cypq.LOPQModel
            Stored inside the index.
        block_capacity : int
            Entries per block (a block is rewritten whole when a vector is added to it).
        map_size : int
            Initial LMDB map size in bytes; it doubles whenever full.
        sync : bool
            fsync at every commit (durable against power loss; a killed process loses
            nothing committed either way).
        stage_capacity : int
            Adds are staged (one sequential record per add) and merged into the cells'
            blocks once this many entries are staged; 0 writes every add into the blocks
            at once. Larger: faster adds (a merge costs about one pass over the blocks), more
            memory in every process that searches (about 40 bytes per staged entry).
        bulk_state : bytes, optional
            Marks the index as a bulk load in progress (see :meth:`bulk_append`): until
            :meth:`finish_bulk`, :meth:`open` refuses it unless ``allow_incomplete``.
        """
        from ..model_io import model_to_proto
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise FileExistsError(f"{path} exists and is not an empty directory: cypq will "
                                  "not create an index over existing files")
        os.makedirs(path, exist_ok=True)
        if block_capacity < 1 or block_capacity > 65535:
            raise ValueError("block_capacity must be in [1, 65535]")
        if not 0 <= stage_capacity <= 1 << 30:
            raise ValueError("stage_capacity must be in [0, 2**30]")
        env, real = _acquire_env(path, False, True, map_size, sync)
        try:
            config = {"M": model.M, "code_dtype": np.dtype(model.fine_code_dtype).name,
                      "block_capacity": int(block_capacity),
                      "stage_capacity": int(stage_capacity)}
            meta = env.open_db(b"meta")
            for name in (b"blocks", b"cells", b"ids", b"log", b"stage"):
                env.open_db(name)
            with env.begin(write=True, db=meta) as txn:
                txn.put(b"format", FORMAT + struct.pack(">I", VERSION))
                txn.put(b"model", model_to_proto(model).SerializeToString())
                txn.put(b"config", json.dumps(config).encode())
                for key in (b"gen", b"count", b"next_id"):
                    txn.put(key, _U64.pack(0))
                txn.put(b"stage", _STAGE_META.pack(0, 0, 0, 0))
                if bulk_state is not None:
                    txn.put(b"bulk", bulk_state)
        except BaseException:
            _release_env(real)
            raise
        return cls(env, real, model, config, False)

    @classmethod
    def open(cls, path: str, readonly: bool = False, map_size: int = _DEFAULT_MAP,
             sync: bool = True, allow_incomplete: bool = False) -> "LMDBStorage":
        """Open an existing index; the model is read from it.

        An unfinished bulk load is refused (IndexFormatError) unless ``allow_incomplete``.
        """
        from ..model_io import proto_to_model
        if not os.path.isdir(path):
            raise IndexFormatError(f"{path} is not a cypq index directory")
        env, real = _acquire_env(path, readonly, False, map_size, sync)
        try:
            try:
                meta = env.open_db(b"meta", create=False)
            except lmdb.NotFoundError:
                raise IndexFormatError(f"{path} is an LMDB environment but not a cypq index") \
                    from None
            with env.begin(db=meta) as txn:
                fmt = txn.get(b"format")
                if fmt is None or not fmt.startswith(FORMAT):
                    raise IndexFormatError(f"{path} is not a cypq index (no format record)")
                version = struct.unpack(">I", fmt[len(FORMAT):])[0]
                if version > VERSION:
                    raise IndexFormatError(f"{path} was written by a newer cypq (index format "
                                           f"{version}, this cypq reads {VERSION}): upgrade "
                                           "cypq")
                if txn.get(b"bulk") is not None and not allow_incomplete:
                    raise IndexFormatError(
                        f"{path} is an unfinished bulk load: run the same `cypq build` "
                        "command again to finish it, or delete the directory")
                model = proto_to_model(txn.get(b"model"), f"the model inside {path}")
                config = json.loads(txn.get(b"config"))
            if version < VERSION and not readonly:  # 1 -> 2: an empty stage
                with env.begin(write=True) as txn:
                    env.open_db(b"stage", txn=txn)
                    txn.put(b"stage", _STAGE_META.pack(0, 0, 0, 0), db=meta)
                    txn.put(b"format", FORMAT + struct.pack(">I", VERSION), db=meta)
        except BaseException:
            _release_env(real)
            raise
        return cls(env, real, model, config, readonly)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cache = None
            self._finalizer()

    # ------------------------------------------------------------------ transactions
    @contextmanager
    def _read(self):
        try:
            txn = self._env.begin(buffers=True)
        except lmdb.MapResizedError:  # another process grew the map
            self._env.set_mapsize(0)
            txn = self._env.begin(buffers=True)
        try:
            yield txn
        finally:
            txn.abort()

    def _write(self, body):
        """Run body(txn) in one write transaction; grow the map and retry when it is full."""
        if self.readonly:
            raise PermissionError("the index is open read-only")
        while True:
            txn = self._env.begin(write=True)
            try:
                result = body(txn)
                gen = _U64.unpack(txn.get(b"gen", db=self._db["meta"]))[0]
                txn.commit()
            except lmdb.MapFullError:
                txn.abort()
                with self._lock:
                    self._cache = None  # cached addresses die with the old mapping
                    self._env.set_mapsize(self._env.info()["map_size"] * 2)
                continue
            except lmdb.MapResizedError:
                txn.abort()
                with self._lock:
                    self._cache = None
                    self._env.set_mapsize(0)
                continue
            except BaseException:
                txn.abort()
                raise
            with self._lock:
                self._cache = None
            return result, gen

    def _refresh(self, txn) -> tuple[int, np.ndarray, StageView]:
        """(generation, cell sizes, staged entries) of txn's snapshot; the shared copy only
        moves forward."""
        gen = _U64.unpack(bytes(txn.get(b"gen", db=self._db["meta"])))[0]
        if gen == self._gen:
            return gen, self._sizes, self._stage
        if gen < self._gen:  # a snapshot older than one already seen: read it privately
            stage = self._load_stage(txn, None)
            return gen, stage.add_counts(self._load_sizes(txn)), stage
        touched = None
        if self._gen >= 0 and gen - self._gen <= _LOG_KEEP:
            parts = []
            for g in range(self._gen + 1, gen + 1):
                rec = txn.get(_U64.pack(g), db=self._db["log"])
                if rec is None:
                    parts = None
                    break
                parts.append(np.frombuffer(rec, dtype="<i8"))
            if parts is not None:
                touched = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)
        if touched is None:  # first load, or too far behind the log: read every cell
            main = self._load_sizes(txn)
        elif len(touched):
            main = self._main_sizes.copy()  # searches in flight keep reading the old array
            cells_db = self._db["cells"]
            for c in touched.tolist():
                v = txn.get(_U64.pack(c), db=cells_db)
                main[c] = 0 if v is None else _CELLINFO.unpack(bytes(v))[0]
        else:
            main = self._main_sizes
        stage = self._load_stage(txn, self._stage)
        if main is not self._main_sizes or stage.tiers[0] is not self._stage.tiers[0]:
            self._base_sizes = stage.tiers[0].add_counts(main)
        if main is not self._main_sizes or stage is not self._stage:
            self._sizes = stage.tiers[1].add_counts(self._base_sizes)
        self._main_sizes, self._stage, self._gen, self._cache = main, stage, gen, None
        return gen, self._sizes, stage

    def _stage_meta(self, txn) -> tuple[int, int, int, int]:
        """(epoch, next record number, merged below cell, staged entries)."""
        v = txn.get(b"stage", db=self._db["meta"])
        return (0, 0, 0, 0) if v is None else _STAGE_META.unpack(bytes(v))

    def _read_records(self, txn, lo: int, hi: int) -> list:
        """Stage records lo .. hi-1, each (cells, ids, codes)."""
        out = []
        if hi <= lo or self._db["stage"] is None:
            return out
        with txn.cursor(db=self._db["stage"]) as cur:
            ok = cur.set_range(_U64.pack(lo))
            while ok and _U64.unpack(bytes(cur.key()))[0] < hi:
                out.append(self._decode(cur.value(), 2))
                ok = cur.next()
        return out

    def _load_stage(self, txn, base: StageView | None) -> StageView:
        """The staged entries of txn's state, reading only the records base lacks."""
        epoch, nxt, below, _ = self._stage_meta(txn)
        if base is None or base.epoch != epoch:
            base = StageView.empty(epoch, self.code_width, self.code_dtype)
        if base.next_seq == nxt and base.merged_below == below:
            return base
        return base.extended(nxt, below, self._read_records(txn, base.next_seq, nxt))

    def _load_sizes(self, txn) -> np.ndarray:
        sizes = np.zeros(self.n_cells, dtype=np.int64)
        with txn.cursor(db=self._db["cells"]) as cur:
            for k, v in cur.iternext():
                sizes[_U64.unpack(bytes(k))[0]] = _CELLINFO.unpack(bytes(v))[0]
        return sizes

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        with self._read() as txn:
            return _U64.unpack(bytes(txn.get(b"count", db=self._db["meta"])))[0]

    def cell_sizes(self) -> np.ndarray:
        with self._read() as txn, self._lock:
            return self._refresh(txn)[1]

    @contextmanager
    def snapshot(self):
        with self._read() as txn:
            with self._lock:
                gen, sizes, stage = self._refresh(txn)
                snap = _LMDBSnapshot(self, txn, sizes, gen, stage)
            yield snap

    def _segments(self, txn, gen: int, stage: StageView, cells: np.ndarray) -> Segments:
        with self._lock:
            cache = self._cache
            if cache is None or cache.gen != gen:
                # Addresses are only valid within their own generation's pages: a snapshot
                # older than the latest keeps its cache to itself.
                cache = _SegmentCache(self.n_cells, gen, stage)
                if gen == self._gen:
                    self._cache = cache
            missing = cells[~cache.has(cells)]
            if len(missing):
                self._fill(txn, cache, missing)
            return cache.segments(cells)

    def _fill(self, txn, cache, cells) -> None:
        """Read the blocks of cells (zero-copy) into the cache; a cell's staged entries
        are one more segment after its blocks."""
        info_db, blocks_db = self._db["cells"], self._db["blocks"]
        tiers = cache.stage.tiers
        found = [t.locate(cells) for t in tiers]   # (has, start, count) per tier
        bufs, owner, kind = [], [], []             # kind: -1 a block, else the stage tier
        for c, in_base, in_recent in zip(cells.tolist(), found[0][0].tolist(),
                                         found[1][0].tolist()):
            v = txn.get(_U64.pack(c), db=info_db)
            nb = 0 if v is None else _CELLINFO.unpack(bytes(v))[1]
            for b in range(nb):
                bufs.append(txn.get(_CELL_BLOCK.pack(c, b), db=blocks_db))
            owner.extend([c] * (nb + in_base + in_recent))
            kind.extend([-1] * nb + [0] * in_base + [1] * in_recent)
        addr = np.empty(len(bufs), dtype=np.uintp)
        length = np.empty(len(bufs), dtype=np.int64)
        _buffers.addresses(bufs, addr, length)
        n = np.empty(len(bufs), dtype=np.int64)
        for j, buf in enumerate(bufs):
            n[j] = int.from_bytes(buf[:4], "little")
        kind = np.asarray(kind, dtype=np.int64)
        ids_at = np.empty(len(owner), dtype=np.uintp)
        codes_at = np.empty(len(owner), dtype=np.uintp)
        count = np.empty(len(owner), dtype=np.int64)
        block = kind < 0
        ids_at[block], codes_at[block], count[block] = \
            addr + 8, addr + 8 + 8 * n.astype(np.uintp), n
        for t, (tier, (has, start, cnt)) in enumerate(zip(tiers, found)):
            if has.any():
                first, at = start[has].astype(np.uintp), kind == t
                ids_at[at] = tier.ids.ctypes.data + 8 * first
                codes_at[at] = tier.codes.ctypes.data + first * np.uintp(tier.codes.strides[0])
                count[at] = cnt[has]
        cache.add(cells, np.asarray(owner, dtype=np.int64), ids_at, codes_at, count)

    def lookup(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        found = np.zeros(len(ids), dtype=bool)
        cells = np.full(len(ids), -1, dtype=np.int64)
        codes = np.zeros((len(ids), self.code_width), dtype=self.code_dtype)
        records = {}  # stage record number -> (codes, {id: row}), read once per call
        with self._read() as txn:
            for j, i in enumerate(ids.tolist()):
                loc = txn.get(_U64.pack(i), db=self._db["ids"])
                if loc is None:
                    continue
                c, b = _CELL_BLOCK.unpack(bytes(loc))
                if b & _STAGED:
                    seq = b & ~_STAGED
                    if seq not in records:
                        _, r_ids, r_codes = self._decode(
                            txn.get(_U64.pack(seq), db=self._db["stage"]), 2)
                        records[seq] = r_codes, {x: k for k, x in enumerate(r_ids.tolist())}
                    r_codes, row = records[seq]
                    found[j], cells[j], codes[j] = True, c, r_codes[row[i]]
                    continue
                blk_ids, blk_codes = self._decode(txn.get(_CELL_BLOCK.pack(c, b),
                                                          db=self._db["blocks"]))
                pos = int(np.flatnonzero(blk_ids == i)[0])
                found[j], cells[j], codes[j] = True, c, blk_codes[pos]
        return found, cells, codes

    def _decode(self, value, n_columns: int = 1):
        """Copies of the int64 columns (n,) and the codes (n, M) of a value in the layout
        of :meth:`_encode`: a block (ids, codes) or, with 2 columns, a stage record (cells,
        ids, codes)."""
        raw = bytes(value)
        n = int.from_bytes(raw[:4], "little")
        columns = [np.frombuffer(raw, dtype="<i8", count=n, offset=8 + 8 * n * j)
                   .astype(np.int64) for j in range(n_columns)]
        codes = np.frombuffer(raw, dtype=self.code_dtype, count=n * self.code_width,
                              offset=8 + 8 * n * n_columns).reshape(n, self.code_width).copy()
        return (*columns, codes)

    def _encode(self, columns, codes) -> bytes:
        """u32 n, u32 pad, each int64 column (n,) little-endian, then the codes (n, M)."""
        n = len(codes)
        return (n.to_bytes(4, "little") + b"\0\0\0\0"
                + b"".join(np.asarray(c).astype("<i8").tobytes() for c in columns)
                + np.ascontiguousarray(codes, dtype=self.code_dtype).tobytes())

    def disk_stats(self) -> dict:
        """Bytes on disk, the map size, entries staged (not yet merged into blocks) and
        whether a merge was cut short (the next write finishes it)."""
        size = os.path.getsize(os.path.join(self._real, "data.mdb"))
        with self._read() as txn:
            _, nxt, below, staged = self._stage_meta(txn)
        return {"bytes_on_disk": size, "map_size": self._env.info()["map_size"],
                "staged": staged, "merge_pending": bool(below)}

    # ------------------------------------------------------------------ writing
    def add(self, cells, ids, codes, replace=False):
        cells = np.asarray(cells, dtype=np.int64)
        codes = np.ascontiguousarray(codes, dtype=self.code_dtype)

        def body(txn):
            nonlocal ids
            if ids is None:  # fresh ids, continuing after the largest so far
                start = _U64.unpack(txn.get(b"next_id", db=self._db["meta"]))[0]
                ids = np.arange(start, start + len(cells), dtype=np.int64)
            ids = np.asarray(ids, dtype=np.int64)
            ids_db = self._db["ids"]
            present = [i for i in ids.tolist() if txn.get(_U64.pack(i), db=ids_db) is not None]
            if present and not replace:
                raise KeyError(f"{len(present)} ids are already in the index (first: "
                               f"{present[0]}); pass replace=True to overwrite them")
            epoch, seq, below, staged = self._stage_meta(txn)
            if below or (present and seq) or seq >= _STAGED - 1:
                raise _MergeFirst  # a merge cut short, or a replace: removes need no stage
            touched = [self._remove_in(txn, np.asarray(present, np.int64))] if present else []
            if self.stage_capacity and len(ids):
                txn.put(_U64.pack(seq), self._encode((cells, ids), codes), db=self._db["stage"])
                with txn.cursor(db=ids_db) as cur:
                    cur.putmulti(_pack_ids(ids, cells, np.full(len(ids), _STAGED | seq)))
                staged += len(ids)
                txn.put(b"stage", _STAGE_META.pack(epoch, seq + 1, 0, staged),
                        db=self._db["meta"])
            else:
                touched.append(self._add_in(txn, cells, ids, codes))
            self._bump(txn, np.concatenate(touched) if touched else np.empty(0, np.int64),
                       len(ids) - len(present), int(ids.max()) + 1 if len(ids) else 0)
            return ids, staged
        ids, staged = self._write_merging(body)
        if staged >= self.stage_capacity > 0:
            self.merge()
        return ids

    def _write_merging(self, body):
        """_write(body), merging the stage first when body asks for it."""
        while True:
            try:
                return self._write(body)[0]
            except _MergeFirst:
                self.merge()

    def merge(self) -> int:
        """Move every staged entry into the blocks of its cell, in transactions of about
        ``_MERGE_CHUNK`` entries over ranges of cells. Returns how many entries moved.

        Readers see the index unchanged throughout: each transaction moves entries from the
        stage to the blocks. Interrupted (a crash, a full disk), the next write resumes it.
        """
        moved = 0
        while True:
            with self._read() as txn:
                epoch, nxt, below, staged = self._stage_meta(txn)
                if not nxt:
                    return moved
                records = self._read_records(txn, 0, nxt)
            view = StageView.empty(epoch, self.code_width, self.code_dtype).extended(
                nxt, below, records)
            del records
            cells, ids, codes = view.entries()
            n = len(cells)
            bounds = [0]
            while bounds[-1] < n:  # chunks end where a cell ends
                t = min(bounds[-1] + _MERGE_CHUNK, n)
                bounds.append(n if t == n else int(np.searchsorted(cells, cells[t - 1],
                                                                   side="right")))
            if n == 0:
                bounds.append(0)
            expect = (epoch, nxt, below)
            try:
                for s, e in zip(bounds[:-1], bounds[1:]):
                    last = e == n
                    after = (epoch + 1, 0, 0) if last else (epoch, nxt, int(cells[e - 1]) + 1)
                    self._write(lambda txn, s=s, e=e, after=after, expect=expect:
                                self._merge_in(txn, cells[s:e], ids[s:e], codes[s:e],
                                               expect, after))
                    expect = after
                    moved += e - s
                return moved
            except _StageMoved:  # another writer got in between: start over from its state
                continue

    def _merge_in(self, txn, cells, ids, codes, expect, after) -> None:
        """One merge transaction: entries of a range of cells from the stage to blocks."""
        epoch, nxt, below, staged = self._stage_meta(txn)
        if (epoch, nxt, below) != expect:
            raise _StageMoved
        touched = self._add_in(txn, cells, ids, codes) if len(cells) else np.empty(0, np.int64)
        if after[1] == 0:  # the last range: the records go
            txn.drop(self._db["stage"], delete=False)
        txn.put(b"stage", _STAGE_META.pack(*after, staged - len(cells) if after[1] else 0),
                db=self._db["meta"])
        self._bump(txn, touched)

    def _add_in(self, txn, cells, ids, codes) -> np.ndarray:
        order = np.argsort(cells, kind="stable")
        cells, ids, codes = cells[order], ids[order], codes[order]
        runs = cell_runs(cells)
        starts, ends = runs[:-1].tolist(), runs[1:].tolist()
        info_db, blocks_db = self._db["cells"], self._db["blocks"]
        B = self.block_capacity
        cw = self.code_width * self.code_dtype.itemsize
        # The last, partly filled block of a cell is spliced as bytes; the rest of the
        # entries go to new blocks laid out by _pack_blocks in one NumPy pass.
        id_bytes = ids.astype("<i8").tobytes()
        code_bytes = codes.tobytes()
        cell_list = cells.tolist()
        blocks = np.empty(len(cells), dtype=np.int64)     # block of each entry
        first = np.empty(len(cells), dtype=np.int64)      # first new block of its cell
        rest = np.ones(len(cells), dtype=bool)            # entries going to new blocks
        info = []
        for s, e in zip(starts, ends):
            c = cell_list[s]
            v = txn.get(_U64.pack(c), db=info_db)
            count, nb = (0, 0) if v is None else _CELLINFO.unpack(bytes(v))
            take = 0
            if nb and count - (nb - 1) * B < B:  # fill the last block first
                key = _CELL_BLOCK.pack(c, nb - 1)
                old = bytes(txn.get(key, db=blocks_db))
                n_old = int.from_bytes(old[:4], "little")
                take = min(B - n_old, e - s)
                txn.put(key, _splice(old, n_old, id_bytes[8 * s:8 * (s + take)],
                                     code_bytes[cw * s:cw * (s + take)]), db=blocks_db)
                blocks[s:s + take] = nb - 1
                rest[s:s + take] = False
            first[s:e] = nb
            info.append((c, count + (e - s), nb + -(-(e - s - take) // B)))
        items, new_blocks = _pack_blocks(cells[rest], ids[rest], codes[rest], B, first[rest])
        blocks[rest] = new_blocks
        with txn.cursor(db=blocks_db) as cur:
            cur.putmulti(items)
        with txn.cursor(db=info_db) as cur:
            cur.putmulti([(_U64.pack(c), _CELLINFO.pack(n, nb)) for c, n, nb in info])
        with txn.cursor(db=self._db["ids"]) as cur:
            cur.putmulti(_pack_ids(ids, cells, blocks))
        return cells[starts]

    def bulk_state(self, finished: bool = False) -> bytes | None:
        """The marker of an unfinished bulk load (None when there is none); with
        ``finished``, the marker of the bulk load that built the index, if one did."""
        with self._read() as txn:
            v = txn.get(b"bulk_done" if finished else b"bulk", db=self._db["meta"])
            return None if v is None else bytes(v)

    def bulk_append(self, cells, ids, codes, state: bytes) -> None:
        """Append entries whose cells all come after every stored cell, in one transaction,
        in key order (LMDB's append mode: no searches, no page splits, no half-empty pages).
        The id table is not written: that is :meth:`bulk_append_ids`, in id order, once
        every entry is stored. ``state`` replaces the bulk marker in the same transaction,
        so it always describes exactly what is committed.

        Parameters
        ----------
        cells : numpy.ndarray int64 (n,)
            Ascending.
        ids : numpy.ndarray int64 (n,)
        codes : numpy.ndarray (n, M)
        state : bytes

        The entries' block numbers are :meth:`bulk_block_numbers` of ``cells``.
        """
        cells = np.asarray(cells, dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64)
        codes = np.ascontiguousarray(codes, dtype=self.code_dtype)
        if len(cells) and np.any(cells[1:] < cells[:-1]):
            raise ValueError("bulk_append needs cells in ascending order")

        def body(txn):
            self._check_bulk(txn)
            items, _ = _pack_blocks(cells, ids, codes, self.block_capacity)
            if len(cells):
                with txn.cursor(db=self._db["cells"]) as cur:
                    if cur.last() and _U64.unpack(bytes(cur.key()))[0] >= cells[0]:
                        raise ValueError("bulk_append cells must come after every stored cell")
                with txn.cursor(db=self._db["blocks"]) as cur:
                    cur.putmulti(items, append=True)
                runs = cell_runs(cells)
                starts, counts = runs[:-1], np.diff(runs)
                info = np.empty(len(starts), dtype=[("n", ">u8"), ("nb", ">u4")])
                info["n"], info["nb"] = counts, -(-counts // self.block_capacity)
                keys, vals, k = cells[starts].astype(">u8").tobytes(), info.tobytes(), \
                    _CELLINFO.size
                with txn.cursor(db=self._db["cells"]) as cur:
                    cur.putmulti([(keys[8 * j:8 * j + 8], vals[k * j:k * j + k])
                                  for j in range(len(starts))], append=True)
            txn.put(b"bulk", state, db=self._db["meta"])
            # Too many cells for the change log: other processes reload all sizes.
            self._bump(txn, None, len(ids))
        self._write(body)

    def bulk_block_numbers(self, cells) -> np.ndarray:
        """The block numbers :meth:`bulk_append` will give entries of these ascending cells
        (n,) int64, returned before writing anything."""
        return _cell_ranks(np.asarray(cells, dtype=np.int64)) // self.block_capacity

    def bulk_append_ids(self, ids, cells, blocks, state: bytes) -> None:
        """Append id-table records (id -> cell, block) for ids all larger than every stored
        id, in one transaction, in append mode; ``state`` as in :meth:`bulk_append`.

        Raises KeyError (nothing written) when an id repeats.
        """
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        if len(ids) > 1 and not np.all(np.diff(ids[order])):
            dup = int(ids[order][np.flatnonzero(np.diff(ids[order]) == 0)[0]])
            raise KeyError(f"id {dup} occurs more than once: ids must be unique")

        def body(txn):
            self._check_bulk(txn)
            if len(ids):
                with txn.cursor(db=self._db["ids"]) as cur:
                    if cur.last() and _U64.unpack(bytes(cur.key()))[0] >= ids[order[0]]:
                        raise ValueError("bulk_append_ids ids must come after every stored id")
                    cur.putmulti(_pack_ids(ids, np.asarray(cells, np.int64),
                                           np.asarray(blocks, np.int64)), append=True)
            txn.put(b"bulk", state, db=self._db["meta"])
            self._bump(txn, np.empty(0, np.int64), 0,
                       int(ids.max()) + 1 if len(ids) else 0)
        self._write(body)

    def _check_bulk(self, txn) -> None:
        if txn.get(b"bulk", db=self._db["meta"]) is None:
            raise ValueError("bulk appends are only for an index created for a bulk load")

    def finish_bulk(self) -> None:
        """Retire the bulk marker (kept as ``bulk_state(finished=True)``): the index opens
        normally from now on."""
        def body(txn):
            meta = self._db["meta"]
            txn.put(b"bulk_done", txn.get(b"bulk", db=meta), db=meta)
            txn.delete(b"bulk", db=meta)
            self._bump(txn, None)
        self._write(body)

    def remove(self, ids):
        ids = np.unique(np.asarray(ids, dtype=np.int64))

        def body(txn):
            ids_db = self._db["ids"]
            present = np.asarray([i for i in ids.tolist()
                                  if txn.get(_U64.pack(i), db=ids_db) is not None], np.int64)
            if len(present) and self._stage_meta(txn)[1]:
                raise _MergeFirst
            touched = self._remove_in(txn, present) if len(present) else np.empty(0, np.int64)
            self._bump(txn, touched, -len(present))
            return len(present)
        return self._write_merging(body)

    def _remove_in(self, txn, ids) -> np.ndarray:
        """Remove present ids: each hole is filled with the last entry of its cell's last
        block, so all blocks but the last stay full. Returns the touched cells."""
        info_db, blocks_db, ids_db = self._db["cells"], self._db["blocks"], self._db["ids"]
        touched = set()
        for i in ids.tolist():
            c, b = _CELL_BLOCK.unpack(bytes(txn.get(_U64.pack(i), db=ids_db)))
            ckey = _U64.pack(c)
            count, nb = _CELLINFO.unpack(bytes(txn.get(ckey, db=info_db)))
            last = nb - 1
            blk_ids, blk_codes = self._decode(txn.get(_CELL_BLOCK.pack(c, b), db=blocks_db))
            pos = int(np.flatnonzero(blk_ids == i)[0])
            if b == last:
                blk_ids = np.delete(blk_ids, pos)
                blk_codes = np.delete(blk_codes, pos, axis=0)
            else:
                t_ids, t_codes = self._decode(txn.get(_CELL_BLOCK.pack(c, last), db=blocks_db))
                moved = int(t_ids[-1])
                blk_ids[pos], blk_codes[pos] = moved, t_codes[-1]
                txn.put(_U64.pack(moved), _CELL_BLOCK.pack(c, b), db=ids_db)
                if len(t_ids) > 1:
                    txn.put(_CELL_BLOCK.pack(c, last), self._encode((t_ids[:-1],), t_codes[:-1]),
                            db=blocks_db)
                else:
                    txn.delete(_CELL_BLOCK.pack(c, last), db=blocks_db)
                    nb -= 1
            if len(blk_ids):
                txn.put(_CELL_BLOCK.pack(c, b), self._encode((blk_ids,), blk_codes), db=blocks_db)
            else:  # only the last block can empty: drop it
                txn.delete(_CELL_BLOCK.pack(c, b), db=blocks_db)
                nb -= 1
            txn.delete(_U64.pack(i), db=ids_db)
            if count - 1:
                txn.put(ckey, _CELLINFO.pack(count - 1, nb), db=info_db)
            else:
                txn.delete(ckey, db=info_db)
            touched.add(c)
        return np.fromiter(touched, dtype=np.int64, count=len(touched))

    def _bump(self, txn, touched, dcount: int = 0, min_next_id: int = 0) -> None:
        """Close a write: generation + 1, its change-log record (touched cells, or None for
        "reload everything"), counters."""
        meta, log = self._db["meta"], self._db["log"]
        gen = _U64.unpack(txn.get(b"gen", db=meta))[0] + 1
        txn.put(b"gen", _U64.pack(gen), db=meta)
        if touched is not None:  # no record: readers reload every cell size
            txn.put(_U64.pack(gen), np.unique(touched).astype("<i8").tobytes(), db=log)
        if gen > _LOG_KEEP:
            txn.delete(_U64.pack(gen - _LOG_KEEP), db=log)
        count = _U64.unpack(txn.get(b"count", db=meta))[0]
        txn.put(b"count", _U64.pack(count + dcount), db=meta)
        nxt = _U64.unpack(txn.get(b"next_id", db=meta))[0]
        if min_next_id > nxt:
            txn.put(b"next_id", _U64.pack(min_next_id), db=meta)


def _cell_ranks(cells: np.ndarray) -> np.ndarray:
    """Position of each entry within its cell, for ascending cells (n,) int64."""
    runs = cell_runs(cells)
    return np.arange(len(cells)) - np.repeat(runs[:-1], np.diff(runs))


def _pack_blocks(cells, ids, codes, capacity, first_block=None):
    """Lay entries out as new blocks, vectorised (one NumPy pass instead of one per cell).

    Parameters
    ----------
    cells : numpy.ndarray int64 (n,)
        Ascending; each cell's entries go to blocks ``first_block[cell] ...`` in this order.
    ids : numpy.ndarray int64 (n,)
    codes : numpy.ndarray (n, M)
    capacity : int
        Entries per block.
    first_block : numpy.ndarray int64 (n,), optional
        Block number of the first new block of each entry's cell (default 0).

    Returns
    -------
    items : list of (key bytes, value memoryview), in key order
    entry_block : numpy.ndarray int64 (n,)
        The block number each entry landed in.
    """
    n = len(cells)
    if not n:
        return [], np.empty(0, np.int64)
    rank = _cell_ranks(cells)
    pos = rank % capacity
    bstart = np.flatnonzero(pos == 0)
    bcount = np.diff(np.append(bstart, n))
    bidx = np.repeat(np.arange(len(bstart)), bcount)          # block of each entry
    block_no = rank // capacity + (0 if first_block is None else first_block)
    cw = codes.shape[1] * codes.dtype.itemsize
    off = np.zeros(len(bstart) + 1, dtype=np.int64)
    np.cumsum(8 + bcount * (8 + cw), out=off[1:])
    buf = np.zeros(int(off[-1]), dtype=np.uint8)
    # Header (u32 count, u32 pad), then the ids, then the codes of each block.
    buf[off[:-1, None] + np.arange(4)] = bcount.astype("<u4").view(np.uint8).reshape(-1, 4)
    at = off[bidx] + 8 + 8 * pos
    buf[at[:, None] + np.arange(8)] = ids.astype("<i8").view(np.uint8).reshape(n, 8)
    at = off[bidx] + 8 + 8 * bcount[bidx] + cw * pos
    buf[at[:, None] + np.arange(cw)] = \
        np.ascontiguousarray(codes).view(np.uint8).reshape(n, cw)
    keys = np.empty(len(bstart), dtype=[("cell", ">u8"), ("block", ">u4")])
    keys["cell"], keys["block"] = cells[bstart], block_no[bstart]
    kb, mv, k = keys.tobytes(), memoryview(buf), _CELL_BLOCK.size
    bounds = off.tolist()
    items = [(kb[k * j:k * j + k], mv[bounds[j]:bounds[j + 1]]) for j in range(len(bstart))]
    return items, block_no


def _pack_ids(ids, cells, blocks):
    """ids-table items (id -> cell + block) sorted by id."""
    order = np.argsort(ids, kind="stable")
    keys = ids[order].astype(">u8").tobytes()
    vals = np.empty(len(ids), dtype=[("cell", ">u8"), ("block", ">u4")])
    vals["cell"], vals["block"] = cells[order], blocks[order]
    vb, k = vals.tobytes(), _CELL_BLOCK.size
    return [(keys[8 * j:8 * j + 8], vb[k * j:k * j + k]) for j in range(len(ids))]


def _splice(old: bytes, n_old: int, new_ids: bytes, new_codes: bytes) -> bytes:
    """A block value with entries appended: header, old ids, new ids, old codes, new codes."""
    n = n_old + len(new_ids) // 8
    return (n.to_bytes(4, "little") + b"\0\0\0\0" + old[8:8 + 8 * n_old] + new_ids
            + old[8 + 8 * n_old:] + new_codes)


class _LMDBSnapshot(Snapshot):
    def __init__(self, storage, txn, sizes, gen, stage):
        self._s, self._txn, self._sizes, self._gen = storage, txn, sizes, gen
        self._stage = stage  # holds the staged arrays the segments point into

    def cell_sizes(self):
        return self._sizes

    def segments(self, cells):
        return self._s._segments(self._txn, self._gen, self._stage,
                                 np.asarray(cells, dtype=np.int64))


class _SegmentCache:
    """cell -> its blocks' (codes, ids, length) addresses, valid for one generation."""

    def __init__(self, n_cells: int, gen: int, stage: StageView):
        self.gen, self.stage = gen, stage
        self.first = np.full(n_cells, -1, dtype=np.int64)   # first segment of the cell
        self.count = np.zeros(n_cells, dtype=np.int64)
        self.codes = np.empty(0, dtype=np.uintp)
        self.ids = np.empty(0, dtype=np.uintp)
        self.length = np.empty(0, dtype=np.int64)

    def has(self, cells):
        return self.first[cells] >= 0

    def add(self, cells, owner, ids_addr, codes_addr, n):
        base = len(self.codes)
        self.codes = np.concatenate([self.codes, codes_addr])
        self.ids = np.concatenate([self.ids, ids_addr])
        self.length = np.concatenate([self.length, n])
        # owner lists each segment's cell in the order of cells: segments of a cell are
        # consecutive.
        counts = np.bincount(np.searchsorted(cells, owner), minlength=len(cells)) \
            if len(owner) else np.zeros(len(cells), np.int64)
        starts = base + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.first[cells] = starts
        self.count[cells] = counts

    def segments(self, cells) -> Segments:
        counts = self.count[cells]
        start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        seg = np.repeat(self.first[cells], counts) + (
            np.arange(start[-1]) - np.repeat(start[:-1], counts))
        return Segments(cells, start, self.codes[seg], self.ids[seg], self.length[seg])
