"""Keys and values of the LMDB index: the one place that writes and parses each layout.

NumPy and struct (and the C copy loops of ``_buffers``); nothing here opens a transaction. Integers in keys are big-endian, so
LMDB's byte order is numeric order; integers inside values are little-endian.

- entries (a block of ``blocks``, a record of ``stage``): u32 n, u32 checksum, then
  ``n_columns`` int64 columns of n (blocks: ids; stage records: cells, ids; in an index
  that keeps tags (feature ``tags``), then the entries' uint64 tag sets), then n codes
  (n, M) of the code dtype; in an index that keeps vectors, a block then holds its
  entries' vectors (n, vector_width), little-endian, so a search finds a candidate's vector
  where it found its code. See :func:`encode_entries` / :func:`decode_entries`. The
  checksum is the CRC-32 of everything after the header (1 where that is 0); 0 means none
  (values written by cypq 0.1, whose header had a zero pad there).
- block key: cell (u64) + block number (u32). A cell's blocks are 0 .. nb-1, all but the last
  full, so ``nb = ceil(entries / block_capacity)`` (:func:`blocks_for`).
- id table (``ids``): key id (u64); value cell (u64) + block (u32) of an entry in the blocks.
  Staged entries have no row (format 4): searches and writers find them in the stage, so a
  batch of random ids costs no random id-table pages; a merge writes their rows in id order.
  Rows ``STAGED | record`` were written for staged entries by format 3 and may remain from
  an upgrade until the merge overwrites them: they read as "look in the stage".
- stage state (``meta[stage]``, format 4, :data:`STAGE_STATE`): records ``lo .. mid-1`` are
  the *frozen* stage, being merged (its entries of cells below ``below`` are in the blocks;
  once ``below`` is the number of cells, the id rows of its ids below ``ids_below`` are
  written; :data:`IDS_DONE` when all are), records ``mid .. nxt-1`` the *active* stage that
  adds go to; then the frozen entries still staged and the active entries. Record numbers
  only grow.
- cell sizes (``sizes``, format 3): key chunk number (u64); value ``SIZE_CHUNK`` u32
  entry counts of cells ``chunk * SIZE_CHUNK ...``; an all-zero chunk is absent. One small
  value per 256 cells, so opening reads a few thousand values, not one per cell.
- ``log``: key generation (u64); value the cells that write touched, int64.
- ``vectors`` (feature ``vectors``): the vectors of staged entries (a stage record holds
  none), key id (u64); value an entries value of that one entry holding only its vector
  (header, then ``vector_width`` little-endian values). A merge moves them into the blocks.
"""
from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

import numpy as np

from ... import _buffers
from ..base import IndexCorruptError, row_addresses  # noqa: F401 (layout's callers use it)

U64 = struct.Struct(">Q")
CELL_BLOCK = struct.Struct(">QI")
STAGE_META_V3 = struct.Struct(">QQQQ")  # format 3: epoch, next record, merged below, staged
STAGE_STATE = struct.Struct(">7Q")     # lo, mid, nxt, below, ids_below, n_frozen, n_active
STAGED = 1 << 31                      # format 3 id-table block field of a staged entry
IDS_DONE = 1 << 63                    # ids_below once every frozen id has its row
SIZE_CHUNK = 256                      # cells per value of the sizes database
HEADER = 8                            # u32 n, u32 checksum


def u64(i: int) -> bytes:
    return U64.pack(i)


def read_u64(v) -> int:
    """The u64 of an 8-byte key or value (IndexCorruptError for any other: a damaged
    page can hand LMDB's reader a key of another size)."""
    if v is None or len(v) != 8:
        raise IndexCorruptError("an LMDB key or value that must be 8 bytes is "
                                + ("missing" if v is None else f"{len(v)} bytes") + " (damaged)")
    return U64.unpack(bytes(v))[0]


def block_key(cell: int, block: int) -> bytes:
    return CELL_BLOCK.pack(cell, block)


def parse_block_key(key) -> tuple[int, int]:
    """(cell, block) of a block key."""
    return CELL_BLOCK.unpack(bytes(key))


def block_keys(cells: np.ndarray, blocks: np.ndarray) -> list:
    """Block keys (list of bytes) of parallel int64 arrays, vectorised."""
    keys = np.empty(len(cells), dtype=[("cell", ">u8"), ("block", ">u4")])
    keys["cell"], keys["block"] = cells, blocks
    raw, k = keys.tobytes(), CELL_BLOCK.size
    return [raw[k * j:k * j + k] for j in range(len(cells))]


def blocks_for(counts, capacity: int):
    """Blocks of cells holding ``counts`` entries (all but the last full)."""
    return -(-counts // capacity)


class StageState(NamedTuple):
    """The stage state (see above): ``epoch`` is a format 3 index's merge count (0 in
    format 4, where record numbers only grow)."""
    epoch: int
    lo: int
    mid: int
    nxt: int
    below: int
    ids_below: int
    n_frozen: int
    n_active: int

    @property
    def frozen(self) -> bool:
        return self.lo < self.mid

    @property
    def staged(self) -> int:
        return self.n_frozen + self.n_active


EMPTY_STAGE = StageState(0, 0, 0, 0, 0, 0, 0, 0)


def stage_of_v3(value) -> StageState:
    """A format 2/3 stage record (epoch, next record, merged below, staged) as a state whose
    records 0 .. next-1 are the frozen stage (record numbers restart with each epoch there,
    so the epoch stays part of the state)."""
    if len(value) != STAGE_META_V3.size:
        raise IndexCorruptError("meta[stage]: not a stage record")
    epoch, nxt, below, staged = STAGE_META_V3.unpack(bytes(value))
    return StageState(epoch, 0, nxt, nxt, below, 0, staged, 0)


# ---------------------------------------------------------------------------- entries
def entries_size(n: int, n_columns: int, code_bytes: int, vec_bytes: int = 0) -> int:
    """Bytes of an entries value of n entries (code_bytes = M * itemsize; vec_bytes: of
    each entry's vector, 0 where none)."""
    return HEADER + n * (8 * n_columns + code_bytes + vec_bytes)


def entry_count(value, where: str, n_columns: int, code_bytes: int, vec_bytes: int = 0) -> int:
    """The header count of an entries value, checked against the value's length.

    Raises
    ------
    IndexCorruptError
        The value is shorter than its header or its length disagrees with the count.
    """
    if len(value) < HEADER:
        raise IndexCorruptError(f"{where}: value of {len(value)} bytes is shorter than its "
                                "header")
    n = int.from_bytes(bytes(value[:4]), "little")
    if len(value) != entries_size(n, n_columns, code_bytes, vec_bytes):
        raise IndexCorruptError(f"{where}: header says {n} entries but the value has "
                                f"{len(value)} bytes")
    return n


def checksum(body) -> int:
    """The header's checksum of a value's body (never 0: 0 marks a value without one)."""
    return zlib.crc32(body) or 1


def checksum_ok(value) -> bool:
    """Whether a value's body matches its header's checksum (or it carries none)."""
    stored = int.from_bytes(bytes(value[4:8]), "little")
    return stored == 0 or stored == checksum(value[HEADER:])


def _with_header(n: int, body: bytes) -> bytes:
    return n.to_bytes(4, "little") + checksum(body).to_bytes(4, "little") + body


def with_zero_column(value, n_columns: int, code_bytes: int, vec_bytes: int,
                     where: str) -> bytes:
    """An entries value with a zero int64 column inserted after its first ``n_columns``
    (an index starting to keep tags), its checksum made anew (a value without one stays
    without). IndexCorruptError for a value whose length or checksum is wrong."""
    n = entry_count(value, where, n_columns, code_bytes, vec_bytes)
    if not checksum_ok(value):
        raise IndexCorruptError(f"{where}: its checksum does not match its bytes: the index "
                                "is damaged (nothing was changed; see `cypq verify`)")
    cut = HEADER + 8 * n * n_columns
    body = bytes(value[HEADER:cut]) + bytes(8 * n) + bytes(value[cut:])
    if int.from_bytes(bytes(value[4:8]), "little") == 0:
        return n.to_bytes(4, "little") + bytes(4) + body
    return _with_header(n, body)


def encode_entries(columns, codes: np.ndarray, code_dtype, vectors=None) -> bytes:
    """u32 n, u32 checksum, each int64 column (n,) little-endian, then the codes (n, M),
    then the vectors (n, w) when given."""
    tail = b"" if vectors is None else little(vectors).tobytes()
    return _with_header(len(codes), b"".join(np.asarray(c).astype("<i8").tobytes()
                                             for c in columns)
                        + np.ascontiguousarray(codes, dtype=code_dtype).tobytes() + tail)


def decode_entries(value, n_columns: int, width: int, code_dtype, where: str = "a value",
                   vectors=None):
    """Copies of the int64 columns (n,) and the codes (n, M) of an entries value, and of
    its vectors (n, w) when ``vectors`` is their (w, dtype)."""
    code_dtype = np.dtype(code_dtype)
    raw = bytes(value)
    cb = width * code_dtype.itemsize
    vw, vdt = vectors if vectors is not None else (0, np.dtype(np.uint8))
    n = entry_count(raw, where, n_columns, cb, vw * np.dtype(vdt).itemsize)
    if not checksum_ok(raw):
        raise IndexCorruptError(f"{where}: the checksum does not match the value (damaged)")
    columns = [np.frombuffer(raw, dtype="<i8", count=n, offset=HEADER + 8 * n * j)
               .astype(np.int64) for j in range(n_columns)]
    at = HEADER + 8 * n * n_columns
    codes = np.frombuffer(raw, dtype=code_dtype, count=n * width,
                          offset=at).reshape(n, width).copy()
    if vectors is None:
        return (*columns, codes)
    vecs = np.frombuffer(raw, dtype=np.dtype(vdt).newbyteorder("<"), count=n * vw,
                         offset=at + n * cb).reshape(n, vw).astype(vdt)
    return (*columns, codes, vecs)


def little(a: np.ndarray) -> np.ndarray:
    """a, C-contiguous, little-endian (as values store numbers)."""
    a = np.asarray(a)
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def block_addresses(addr: np.ndarray, length: np.ndarray, count: np.ndarray,
                    expect: np.ndarray, code_bytes: int, vec_bytes: int = 0,
                    n_columns: int = 1):
    """Where the ids, tags, codes and vectors of block values are, from their start
    addresses (n,) uintp, lengths (n,) int64 and header counts (n,) int64 (-1: shorter than
    a header), each checked against the count the cell sizes promise (``expect``).

    Returns
    -------
    ids_at, tags_at, codes_at, vecs_at : numpy.ndarray uintp (n,)
        (tags_at is meaningful only where the blocks hold tags, ``n_columns`` 2; vecs_at
        where they hold vectors, ``vec_bytes`` > 0.)
    bad : int
        Index of the first value that does not check out, or -1.
    """
    ok = (count == expect) & (length == HEADER + count * (8 * n_columns + code_bytes
                                                          + vec_bytes))
    bad = -1 if ok.all() else int(np.flatnonzero(~ok)[0])
    ids_at = addr + np.uintp(HEADER)
    tags_at = ids_at + np.uintp(8) * count.astype(np.uintp)
    codes_at = ids_at + np.uintp(8 * n_columns) * count.astype(np.uintp)
    return (ids_at, tags_at, codes_at, codes_at + np.uintp(code_bytes) * count.astype(np.uintp),
            bad)


def block_headers(values: list, where) -> tuple:
    """(addr (n,) uintp, length (n,) int64, count (n,) int64) of block values (a list of n
    bytes-likes, kept alive by the caller: see _buffers.headers), each value's checksum
    checked.

    Raises
    ------
    IndexCorruptError
        A value is None (a block its cell's size promises is missing) or its checksum does
        not match its bytes (``where(j)`` names the first).
    """
    j = next((j for j, v in enumerate(values) if v is None), None)
    if j is not None:
        raise IndexCorruptError(f"{where(j)} is missing (its cell's size promises it)")
    n = len(values)
    addr, length = np.empty(n, dtype=np.uintp), np.empty(n, dtype=np.int64)
    count, ok = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.uint8)
    _buffers.headers(values, addr, length, count, ok)
    if not ok.all():
        raise IndexCorruptError(f"{where(int(np.argmin(ok)))}: its checksum does not match "
                                "its bytes: the index is damaged (restore it from a backup; "
                                "`cypq verify` lists the damage)")
    return addr, length, count


def entry_addresses(values: list, expect: np.ndarray, code_bytes: int, where,
                    vec_bytes: int = 0, n_columns: int = 1):
    """Where the entries of block values (list of n bytes-likes, kept alive by the caller)
    are: (ids_at, tags_at, codes_at, vecs_at) (e,) uintp, block after block, each value's
    length checked against the count it must hold (``expect`` (n,) int64).

    Raises
    ------
    IndexCorruptError
        A value is missing, its checksum or its header or length disagrees (``where(j)``
        names it).
    """
    addr, length, count = block_headers(values, where)
    ids_at, tags_at, codes_at, vecs_at, bad = block_addresses(
        addr, length, count, expect, code_bytes, vec_bytes, n_columns)
    if bad >= 0:
        raise IndexCorruptError(f"{where(bad)}: {length[bad]} bytes, header count "
                                f"{count[bad]}; expected {expect[bad]} entries")
    rank = (np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
            ).astype(np.uintp)
    return (np.repeat(ids_at, count) + np.uintp(8) * rank,
            np.repeat(tags_at, count) + np.uintp(8) * rank,
            np.repeat(codes_at, count) + np.uintp(code_bytes) * rank,
            np.repeat(vecs_at, count) + np.uintp(vec_bytes) * rank)


def cell_runs(cells: np.ndarray) -> np.ndarray:
    """Bounds of the runs of equal cells in an ascending (n,) array: (runs + 1,) int64, the
    start of each run, then n."""
    n = len(cells)
    if not n:
        return np.zeros(1, dtype=np.int64)
    return np.append(np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]]), n).astype(np.int64)


def cell_ranks(cells: np.ndarray) -> np.ndarray:
    """Position of each entry within its cell, for ascending cells (n,) int64."""
    runs = cell_runs(cells)
    return np.arange(len(cells)) - np.repeat(runs[:-1], np.diff(runs))


def pack_blocks(cells, ids, codes, capacity, first_block=None, vectors=None, tags=None):
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
    vectors : numpy.ndarray (n, w), optional
        The entries' vectors, after the codes of each block.
    tags : numpy.ndarray uint64 (n,), optional
        The entries' tag sets, after the ids of each block.

    Returns
    -------
    items : list of (key bytes, value memoryview), in key order
    entry_block : numpy.ndarray int64 (n,)
        The block number each entry landed in.
    """
    ids = np.ascontiguousarray(ids, dtype="<i8")
    codes = np.ascontiguousarray(codes)
    vecs = None if vectors is None else little(vectors)
    tags = None if tags is None else np.ascontiguousarray(tags, dtype="<u8")
    return pack_entries(cells, row_addresses(ids), row_addresses(codes),
                        codes.shape[1] * codes.dtype.itemsize, capacity, first_block,
                        None if vecs is None else row_addresses(vecs),
                        0 if vecs is None else vecs.shape[1] * vecs.itemsize,
                        None if tags is None else row_addresses(tags))


def pack_entries(cells, ids_at, codes_at, code_bytes: int, capacity, first_block=None,
                 vecs_at=None, vec_bytes: int = 0, tags_at=None):
    """:func:`pack_blocks` of entries given by where their id (8 bytes, little-endian),
    tags (8 bytes; ``tags_at`` None: the blocks hold none), code (``code_bytes``) and
    vector (``vec_bytes``, 0: none) are (``ids_at``, ``tags_at``, ``codes_at``, ``vecs_at``
    (n,) uintp: rows of arrays, or entries of checked values, kept alive by the caller):
    bytes are copied once, in C."""
    n = len(cells)
    if not n:
        return [], np.empty(0, np.int64)
    rank = cell_ranks(cells)
    pos = rank % capacity
    bstart = np.flatnonzero(pos == 0)
    bcount = np.diff(np.append(bstart, n))
    bidx = np.repeat(np.arange(len(bstart)), bcount)          # block of each entry
    block_no = rank // capacity + (0 if first_block is None else first_block)
    cw = code_bytes
    cols = 8 if tags_at is None else 16     # column bytes per entry
    off = np.zeros(len(bstart) + 1, dtype=np.int64)
    np.cumsum(HEADER + bcount * (cols + cw + vec_bytes), out=off[1:])
    buf = np.zeros(int(off[-1]), dtype=np.uint8)
    # Header (u32 count, u32 checksum), then the ids (and tags), then the codes of each
    # block, then the vectors.
    buf[off[:-1, None] + np.arange(4)] = bcount.astype("<u4").view(np.uint8).reshape(-1, 4)
    _buffers.scatter(ids_at, off[bidx] + HEADER + 8 * pos, 8, buf)
    if tags_at is not None:
        _buffers.scatter(tags_at, off[bidx] + HEADER + 8 * bcount[bidx] + 8 * pos, 8, buf)
    _buffers.scatter(codes_at, off[bidx] + HEADER + cols * bcount[bidx] + cw * pos, cw, buf)
    if vec_bytes:
        _buffers.scatter(vecs_at, off[bidx] + HEADER + (cols + cw) * bcount[bidx]
                         + vec_bytes * pos, vec_bytes, buf)
    mv, bounds = memoryview(buf), off.tolist()
    crc = zlib.crc32
    sums = np.array([crc(mv[a + HEADER:b]) for a, b in zip(bounds[:-1], bounds[1:])],
                    dtype="<u4")
    sums[sums == 0] = 1      # as checksum(): 0 marks a value without one
    buf[off[:-1, None] + 4 + np.arange(4)] = sums.view(np.uint8).reshape(-1, 4)
    keys = block_keys(cells[bstart], block_no[bstart])
    items = [(keys[j], mv[bounds[j]:bounds[j + 1]]) for j in range(len(bstart))]
    return items, block_no


# ---------------------------------------------------------------------------- id table
def id_keys(ids) -> list:
    """id-table keys (list of bytes) of ids (n,) int64, vectorised."""
    raw = np.asarray(ids).astype(">u8").tobytes()
    return [raw[8 * j:8 * j + 8] for j in range(len(ids))]


def id_items(ids, cells, blocks) -> list:
    """ids-table items (id -> cell + block) sorted by id."""
    order = np.argsort(ids, kind="stable")
    keys = id_keys(np.asarray(ids)[order])
    vals = np.empty(len(ids), dtype=[("cell", ">u8"), ("block", ">u4")])
    vals["cell"], vals["block"] = np.asarray(cells)[order], np.asarray(blocks)[order]
    vb, k = vals.tobytes(), CELL_BLOCK.size
    return list(zip(keys, (vb[k * j:k * j + k] for j in range(len(ids)))))


def id_value(cell: int, block: int) -> bytes:
    """The id-table value of an entry in a block."""
    return CELL_BLOCK.pack(cell, block)


def id_location(value, i: int, n_cells: int) -> tuple[int, int]:
    """(cell, block field) of an id-table value, its cell one of the index's n_cells."""
    if len(value) != CELL_BLOCK.size:
        raise IndexCorruptError(f"ids[{i}]: value of {len(value)} bytes, expected "
                                f"{CELL_BLOCK.size}")
    cell, field = CELL_BLOCK.unpack(bytes(value))
    if cell >= n_cells:
        raise IndexCorruptError(f"ids[{i}]: cell {cell}, past the index's {n_cells} cells")
    return cell, field


# ---------------------------------------------------------------------------- cell sizes
def size_chunks(cells: np.ndarray) -> np.ndarray:
    """Distinct chunk numbers (ascending int64) holding these cells."""
    return np.unique(np.asarray(cells, dtype=np.int64) // SIZE_CHUNK)


def parse_sizes(value, chunk: int) -> np.ndarray:
    """The SIZE_CHUNK int64 counts of a sizes value."""
    if len(value) != 4 * SIZE_CHUNK:
        raise IndexCorruptError(f"sizes[{chunk}]: value of {len(value)} bytes, expected "
                                f"{4 * SIZE_CHUNK}")
    return np.frombuffer(value, dtype="<u4").astype(np.int64)


def sizes_value(counts: np.ndarray) -> bytes:
    """A sizes value of SIZE_CHUNK counts (int64, each < 2**32)."""
    if counts.max(initial=0) >= 1 << 32:
        raise ValueError("a cell would hold 2**32 entries or more")
    return np.asarray(counts, dtype="<u4").tobytes()


def sizes_from_chunks(keys: bytes, values: bytes, n_cells: int) -> np.ndarray:
    """(n_cells,) int64 cell sizes from the concatenated keys and values of the whole sizes
    database (as one cursor pass joins them)."""
    sizes = np.zeros(-(-n_cells // SIZE_CHUNK) * SIZE_CHUNK, dtype=np.int64)
    if len(keys) % 8:
        raise IndexCorruptError("sizes: a key that is not a u64 chunk number (damaged)")
    chunks = np.frombuffer(keys, dtype=">u8").astype(np.int64)
    if len(values) != len(chunks) * 4 * SIZE_CHUNK:
        raise IndexCorruptError("sizes: a value is not one chunk of cell counts long")
    if len(chunks) and (chunks.max() * SIZE_CHUNK >= n_cells):
        raise IndexCorruptError(f"sizes: chunk {int(chunks.max())} is past the index's "
                                f"{n_cells} cells")
    sizes.reshape(-1, SIZE_CHUNK)[chunks] = np.frombuffer(values, dtype="<u4").reshape(
        -1, SIZE_CHUNK)
    return sizes[:n_cells]


CELLINFO = struct.Struct(">QI")  # format <= 2: cells[cell] = u64 entries, u32 blocks


def legacy_sizes(txn, cells_db, n_cells: int) -> np.ndarray:
    """(n_cells,) int64 cell sizes from the per-cell records of format 1 and 2."""
    sizes = np.zeros(n_cells, dtype=np.int64)
    with txn.cursor(db=cells_db) as cur:
        for k, v in cur.iternext():
            sizes[read_u64(k)] = CELLINFO.unpack(bytes(v))[0]
    return sizes


def legacy_size(txn, cells_db, cell: int) -> int:
    v = txn.get(u64(cell), db=cells_db)
    return 0 if v is None else CELLINFO.unpack(bytes(v))[0]


# ---------------------------------------------------------------------------- tag counts
def parse_tag_counts(value) -> np.ndarray:
    """(64,) int64 of ``meta[tag_counts]`` (64 u64 little-endian; None: all zero)."""
    if value is None:
        return np.zeros(64, np.int64)
    if len(value) != 8 * 64:
        raise IndexCorruptError(f"meta[tag_counts]: {len(value)} bytes, expected {8 * 64}")
    return np.frombuffer(bytes(value), dtype="<u8").astype(np.int64)


def tag_counts_value(counts: np.ndarray) -> bytes:
    if counts.min() < 0:
        raise IndexCorruptError("meta[tag_counts] would go below zero: the index is damaged")
    return np.asarray(counts, dtype="<u8").tobytes()


# ---------------------------------------------------------------------------- vectors
def vector_items(ids, rows: np.ndarray) -> list:
    """vectors-table items of ids (n,) int64 and their vectors rows (n, w), sorted by id: each
    value an entries value of one entry with no columns and no code, only the vector."""
    order = np.argsort(ids, kind="stable")
    no_code = np.empty((1, 0), dtype=np.uint8)
    return list(zip(id_keys(np.asarray(ids)[order]),
                    (encode_entries((), no_code, np.uint8, r[None])
                     for r in np.asarray(rows)[order])))


def decode_vector(value, vectors, where: str) -> np.ndarray:
    """The vector (w,) of a vectors-table value (``vectors``: its (w, dtype)), checked as
    every entries value is."""
    vecs = decode_entries(value, 0, 0, np.uint8, where, vectors)[1]
    if len(vecs) != 1:
        raise IndexCorruptError(f"{where}: holds {len(vecs)} vectors, not one")
    return vecs[0]
