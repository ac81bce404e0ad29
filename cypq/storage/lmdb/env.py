"""The LMDB environment of an index: opening and creating it (format checks, upgrades), the
per-process registry, transactions with map growth, and the bookkeeping every write closes
with.

Databases: ``meta`` (format, config, counters, stage state, bulk markers, the caller's
metadata), ``blocks``, ``sizes``, ``ids``, ``stage``, ``log``, and ``vectors`` in an index that
keeps them (see layout.py for their keys and values).

Format versions: 1 (no stage), 2 (stage; per-cell ``cells`` records), 3 (cell sizes in
chunks, the number of cells in the config), 4 (a frozen and an active stage; no id-table rows
for staged entries; see layout.py), 5 (format 4 whose config names features every reader must
know, see Storage.features: an index with none is written as format 4, which cypq 0.2 reads
too). Versions below 4 are upgraded, in one transaction, when opened for writing; read-only
they are read as they are.
"""
from __future__ import annotations

import errno
import json
import os
import struct
import threading
from contextlib import contextmanager
from typing import Callable, Optional

import lmdb
import numpy as np

from ..base import TAGS, VECTORS, IndexCorruptError, IndexFormatError, check_features
from . import layout as L
from .data_file import check_data_file, check_free_list

FORMAT = b"cypq-index"
VERSION = 4                       # the layout this cypq writes (and upgrades to)
FEATURES_VERSION = 5              # the same layout with features (a newer reader needed)
SIZE_CHUNKS = 3                   # the first format with cell sizes in chunks
DEFAULT_MAP = 1 << 30
LOG_KEEP = 4096                   # generations of change log kept for other processes
DEFAULT_STAGE = 1 << 20
DATABASES = ("meta", "blocks", "sizes", "ids", "log", "stage")
RESERVED = {b"format", b"config", b"gen", b"count", b"next_id", b"stage", b"bulk",
            b"bulk_done", b"bulk_ids", b"tag_counts"}


def check_meta_names(meta: dict) -> None:
    """ValueError when the caller's metadata would overwrite the storage's own records."""
    bad = [k for k in meta if k.encode() in RESERVED]
    if bad:
        raise ValueError(f"metadata names {bad} are reserved by the storage")


# LMDB forbids opening one environment twice in a process; indexes opened twice share it.
_ENVS: dict[str, tuple[lmdb.Environment, int]] = {}
_ENVS_LOCK = threading.Lock()


def _acquire(path: str, readonly: bool, create: bool, map_size: int, sync: bool):
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
        if os.path.exists(os.path.join(path, "data.mdb")):
            check_data_file(os.path.join(path, "data.mdb"))
        with damage_reported(path):
            env = lmdb.open(path, map_size=map_size, max_dbs=16, subdir=True,
                            readonly=readonly, create=create, sync=sync, metasync=sync,
                            max_readers=512, lock=True, readahead=False)
        env.reader_check()  # drop reader slots left by processes that died
        _ENVS[real] = (env, 1)
        return env, real


# What LMDB raises when it meets a damaged page or file. BadTxnError too: a damaged page met
# where a cursor starts fails the transaction without a report of its own, and the first read
# then says MDB_BAD_TXN (a database's root page overwritten did so; cypq reuses no failed
# txn); and CursorFullError, a tree deeper than LMDB's cursor stack (32 levels), which only
# pages pointing back at their parents make.
DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.PanicError,
          lmdb.VersionMismatchError, lmdb.IncompatibleError, lmdb.BadValsizeError,
          lmdb.ProblemError, lmdb.BadTxnError, lmdb.CursorFullError)


@contextmanager
def damage_reported(path: str):
    """LMDB's own reports of damage, raised as IndexCorruptError naming the index."""
    try:
        yield
    except DAMAGE as e:
        raise IndexCorruptError(f"{path}: LMDB finds the file damaged ({e}); restore the "
                                "index from a backup") from None


def _release(real: str) -> None:
    with _ENVS_LOCK:
        env, refs = _ENVS[real]
        if refs > 1:
            _ENVS[real] = (env, refs - 1)
        else:
            del _ENVS[real]
            env.close()


class Env:
    """One opened index environment: its databases, its layout settings, its transactions.

    Attributes
    ----------
    path, readonly, version
    n_cells, code_width, code_dtype, block_capacity, stage_capacity, vector_width,
    vector_dtype
        The layout settings from the config record (``vectors``: (vector_width,
        vector_dtype) or None; ``code_bytes``, ``vector_bytes`` per entry).
    keeps_tags, block_columns, stage_columns
        Whether entries keep tag sets (feature ``tags``), and so how many int64 columns a
        block (ids[, tags]) and a stage record (cells, ids[, tags]) hold.
    db : dict of name -> LMDB database handle (``stage`` may be None: a read-only version 1
        index has none).
    """

    def __init__(self, env, real: str, path: str, readonly: bool, version: int, config: dict):
        self.lmdb, self.real, self.path, self.readonly = env, real, path, readonly
        self.set_layout(version, config)
        self.db = {}
        for name in DATABASES + ("cells", "vectors"):
            try:
                self.db[name] = env.open_db(name.encode(), create=False)
            except lmdb.NotFoundError:
                self.db[name] = None
        self._released = False
        self._free_list_checked = False   # by the first write (a damaged one aborts LMDB)
        # Called (under no lock of ours) when the map changes (grown here or by another
        # process): every address into it dies.
        self.on_change: list[Callable[[], None]] = []

    def set_layout(self, version: int, config: dict) -> None:
        """The format version and the layout settings of the config record (again after an
        in-place change of the layout: :mod:`.tags_column`)."""
        self.version = version
        self.n_cells = int(config["n_cells"])
        self.code_width = int(config["M"])
        self.code_dtype = np.dtype(config["code_dtype"])
        self.code_bytes = self.code_width * self.code_dtype.itemsize
        self.features = check_features(config.get("features", ()), self.path)
        self.vector_width = int(config.get("vector_width", 0))
        self.vector_dtype = np.dtype(config["vector_dtype"]) if self.vector_width else None
        self.vectors = (self.vector_width, self.vector_dtype) if self.vector_width else None
        self.vector_bytes = self.vector_width * self.vector_dtype.itemsize if self.vectors else 0
        if bool(self.vector_width) != (VECTORS in self.features):
            raise IndexCorruptError(f"{self.path}: meta[config] has vector_width "
                                    f"{self.vector_width} and features {sorted(self.features)}")
        self.keeps_tags = TAGS in self.features
        self.block_columns = 2 if self.keeps_tags else 1
        self.stage_columns = self.block_columns + 1
        self.block_capacity = int(config["block_capacity"])
        self.stage_capacity = int(config.get("stage_capacity", DEFAULT_STAGE))

    def release(self) -> None:
        if not self._released:
            self._released = True
            _release(self.real)

    # ------------------------------------------------------------------ transactions
    @contextmanager
    def read(self):
        """A read transaction (zero-copy values: ``buffers=True``) whose default database
        is ``blocks``."""
        try:
            txn = self.lmdb.begin(buffers=True, db=self.db["blocks"])
        except lmdb.MapResizedError:  # another process grew the map
            self._changed()
            self.lmdb.set_mapsize(0)
            txn = self.lmdb.begin(buffers=True, db=self.db["blocks"])
        try:
            yield txn
        finally:
            txn.abort()

    def write(self, body):
        """(body(txn), generation) of one write transaction; on a full map, the map grows
        (doubled) and body runs again in a new transaction."""
        if self.readonly:
            raise PermissionError("the index is open read-only")
        while True:
            txn = self.lmdb.begin(write=True)
            try:
                if not self._free_list_checked:   # (under the write lock: see there)
                    check_free_list(os.path.join(self.real, "data.mdb"))
                    self._free_list_checked = True
                result = body(txn)
                gen = L.read_u64(txn.get(b"gen", db=self.db["meta"]))
                txn.commit()
            except lmdb.MapFullError:
                txn.abort()
                self._changed()
                self.lmdb.set_mapsize(self.lmdb.info()["map_size"] * 2)
                continue
            except lmdb.MapResizedError:
                txn.abort()
                self._changed()
                self.lmdb.set_mapsize(0)
                continue
            except lmdb.Error as e:
                txn.abort()
                free = disk_free(self.real)
                if free is not None and free < DISK_LOW:
                    raise OSError(errno.ENOSPC, f"the disk holding {self.path} is full "
                                  f"({free:,} bytes free; LMDB: {e}): this call stored "
                                  "nothing and everything acknowledged before it is intact; "
                                  "free some space and try again") from None
                raise
            except BaseException:
                txn.abort()
                raise
            return result, gen

    def _changed(self) -> None:
        for hook in self.on_change:
            hook()

    # ------------------------------------------------------------------ records
    def get_meta(self, txn, key: bytes):
        return txn.get(key, db=self.db["meta"])

    def counter(self, txn, key: bytes) -> int:
        v = txn.get(key, db=self.db["meta"])
        if v is None or len(v) != 8:
            raise IndexCorruptError(f"meta[{key.decode()}]: missing or not a u64 counter")
        return L.read_u64(v)

    def stage_meta(self, txn) -> "L.StageState":
        """The stage state of txn's snapshot (a format 3 stage reads as a frozen one)."""
        v = txn.get(b"stage", db=self.db["meta"])
        if v is None:
            return L.EMPTY_STAGE
        if self.version < 4:
            return L.stage_of_v3(v)
        if len(v) != L.STAGE_STATE.size:
            raise IndexCorruptError("meta[stage]: not a stage record")
        st = L.StageState(0, *L.STAGE_STATE.unpack(bytes(v)))
        if not (st.lo <= st.mid <= st.nxt and st.below <= self.n_cells
                and (st.lo < st.mid or st.n_frozen == 0)):
            raise IndexCorruptError(f"meta[stage]: inconsistent stage state {st[1:]}")
        return st

    def put_stage(self, txn, st: "L.StageState") -> None:
        txn.put(b"stage", L.STAGE_STATE.pack(*st[1:]), db=self.db["meta"])

    def bump(self, txn, touched, dcount: int = 0, min_next_id: int = 0) -> None:
        """Close a write: generation + 1, its change-log record (touched cells, or None for
        "reload everything"), the entry count, the next fresh id."""
        meta, log = self.db["meta"], self.db["log"]
        gen = self.counter(txn, b"gen") + 1
        txn.put(b"gen", L.u64(gen), db=meta)
        if touched is not None:  # no record: readers reload every cell size
            txn.put(L.u64(gen), np.unique(touched).astype("<i8").tobytes(), db=log)
        if gen > LOG_KEEP:
            txn.delete(L.u64(gen - LOG_KEEP), db=log)
        txn.put(b"count", L.u64(self.counter(txn, b"count") + dcount), db=meta)
        if min_next_id > self.counter(txn, b"next_id"):
            txn.put(b"next_id", L.u64(min_next_id), db=meta)


DISK_LOW = 256 << 20   # a write that fails with less free space than this: the disk is full


def disk_free(path: str) -> Optional[int]:
    """Bytes free for unprivileged writes on the file system holding path (None: unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


# ---------------------------------------------------------------------------- making one
def holds_index(path: str) -> bool:
    """Whether ``path`` holds an index (complete, or a bulk load in progress), as opposed
    to nothing, or what an interrupted :func:`create` leaves."""
    return os.path.isdir(path) and _has_files(path)


def create(path: str, config: dict, meta: dict, bulk_state: Optional[bytes], map_size: int,
           sync: bool) -> Env:
    """A new index environment in directory ``path``, written in one transaction: a crash
    leaves either no index (an empty LMDB file that :func:`open_env` reports as unfinished
    and creating again accepts) or a complete empty one."""
    if os.path.exists(path) and (not os.path.isdir(path) or _has_files(path)):
        raise FileExistsError(f"{path} exists and is not an empty directory: cypq will "
                              "not create an index over existing files")
    check_meta_names(meta)
    os.makedirs(path, exist_ok=True)
    env, real = _acquire(path, False, True, map_size, sync)
    try:
        with env.begin(write=True) as txn:
            dbs = {name: env.open_db(name.encode(), txn=txn) for name in
                   DATABASES + (("vectors",) if config.get("vector_width") else ())}
            put = lambda k, v: txn.put(k, v, db=dbs["meta"])  # noqa: E731
            for name, value in meta.items():
                put(name.encode(), bytes(value))
            put(b"config", json.dumps(config).encode())
            for key in (b"gen", b"count", b"next_id"):
                put(key, L.u64(0))
            put(b"stage", L.STAGE_STATE.pack(*L.EMPTY_STAGE[1:]))
            if bulk_state is not None:
                put(b"bulk", bulk_state)
            version = FEATURES_VERSION if config.get("features") else VERSION
            put(b"format", FORMAT + struct.pack(">I", version))  # last: marks it complete
        return Env(env, real, path, False, version, config)
    except BaseException:
        _release(real)
        raise


def _has_files(path: str) -> bool:
    """Whether a directory holds anything but what an interrupted create leaves: an LMDB
    environment with no format record."""
    names = set(os.listdir(path))
    if not names:
        return False
    with _ENVS_LOCK:
        if os.path.realpath(path) in _ENVS:  # open in this process: not to be replaced
            return True
    if names <= {"data.mdb", "lock.mdb"}:
        try:
            check_data_file(os.path.join(path, "data.mdb"))
            env = lmdb.open(path, readonly=True, max_dbs=16, lock=False)
        except (lmdb.Error, IndexCorruptError, OSError):
            return True
        try:
            with env.begin() as txn:
                meta = env.open_db(b"meta", txn=txn, create=False)
                return txn.get(b"format", db=meta) is not None
        except lmdb.NotFoundError:
            return False
        finally:
            env.close()
    return True


def open_env(path: str, readonly: bool, map_size: int, sync: bool, allow_incomplete: bool,
             n_cells_of: Optional[Callable[[Callable[[str], Optional[bytes]]], int]]) -> Env:
    """Open an existing index environment; check its format; upgrade it when writable.

    ``n_cells_of(meta)``: for an index of format 1 or 2 (which did not record the number
    of cells), computes it from the index's metadata (``meta(name) -> bytes``).
    """
    if not os.path.isdir(path):
        raise IndexFormatError(f"{path} is not a cypq index directory")
    env, real = _acquire(path, readonly, False, map_size, sync)
    try:
        try:
            meta = env.open_db(b"meta", create=False)
        except lmdb.NotFoundError:
            raise IndexFormatError(f"{path} is an LMDB environment but not a cypq index "
                                   "(or an index whose creation was interrupted: delete it "
                                   "and create it again)") from None
        with env.begin(db=meta) as txn:
            fmt = txn.get(b"format")
            if fmt is None or not fmt.startswith(FORMAT) or len(fmt) != len(FORMAT) + 4:
                raise IndexFormatError(f"{path} is not a cypq index (no format record; an "
                                       "interrupted creation leaves this: delete it and "
                                       "create it again)")
            version = struct.unpack(">I", fmt[len(FORMAT):])[0]
            if version > FEATURES_VERSION:
                raise IndexFormatError(f"{path} was written by a newer cypq (index format "
                                       f"{version}, this cypq reads up to "
                                       f"{FEATURES_VERSION}): upgrade cypq")
            if txn.get(b"bulk") is not None and not allow_incomplete:
                raise IndexFormatError(
                    f"{path} is an unfinished bulk load: run the same `cypq build` "
                    "command again to finish it, or delete the directory")
            try:
                config = json.loads(txn.get(b"config"))
            except (TypeError, ValueError):
                raise IndexCorruptError(f"{path}: meta[config] is not readable") from None
            if "n_cells" not in config:
                if n_cells_of is None:
                    raise IndexFormatError(f"{path} (format {version}) does not record its "
                                           "number of cells: open it through cypq.Index")
                config["n_cells"] = int(n_cells_of(lambda name: txn.get(name.encode())))
        if version < VERSION and not readonly:
            _upgrade(env, real, meta, version, config)
            version = VERSION
        return Env(env, real, path, readonly, version, config)
    except BaseException:
        _release(real)
        raise


def _upgrade(env, real: str, meta, version: int, config: dict) -> None:
    """Format 1, 2 or 3 -> 4 in one transaction: an empty stage (1 -> 2), cell sizes from the
    per-cell records into chunks and the number of cells into the config (2 -> 3), the stage
    state as a frozen stage (3 -> 4: its id rows are rewritten when its merge ends). Like
    Env.write's first transaction, it checks LMDB's free-page list first."""
    with env.begin(write=True) as txn:
        check_free_list(os.path.join(real, "data.mdb"))
        if version < 2:
            env.open_db(b"stage", txn=txn)
        if version < 3:
            sizes_db = env.open_db(b"sizes", txn=txn)
            cells_db = env.open_db(b"cells", txn=txn, create=False)
            sizes = L.legacy_sizes(txn, cells_db, config["n_cells"])
            chunks = L.size_chunks(np.flatnonzero(sizes))
            padded = np.zeros(-(-len(sizes) // L.SIZE_CHUNK) * L.SIZE_CHUNK, np.int64)
            padded[:len(sizes)] = sizes
            with txn.cursor(db=sizes_db) as cur:
                cur.putmulti([(L.u64(c), L.sizes_value(padded.reshape(-1, L.SIZE_CHUNK)[c]))
                              for c in chunks.tolist()], append=True)
            txn.drop(cells_db, delete=True)
            txn.put(b"config", json.dumps(config).encode(), db=meta)
        old = txn.get(b"stage", db=meta)
        st = L.EMPTY_STAGE if old is None else L.stage_of_v3(old)
        txn.put(b"stage", L.STAGE_STATE.pack(*st[1:]), db=meta)
        gen = L.read_u64(txn.get(b"gen", db=meta)) + 1
        txn.put(b"gen", L.u64(gen), db=meta)  # no log record: readers reload every size
        txn.put(b"format", FORMAT + struct.pack(">I", VERSION), db=meta)
