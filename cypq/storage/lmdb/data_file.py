"""The LMDB data file read directly, not through LMDB: its meta pages and its free-page list,
checked before LMDB maps or writes the file (on a damaged one LMDB would read past the end of
the file and die of SIGBUS, open an older commit without a word, or stop the process on an
assertion when a write commits)."""
from __future__ import annotations

import os
import struct
from typing import Optional

from ..base import IndexCorruptError

# LMDB's meta pages (pages 0 and 1, the newer by transaction id is current), 64-bit layout:
# a 16-byte page header, then magic u32, version u32, address u64, map size u64, two database
# records of 48 bytes (free pages, main; each: pad u32 (the free one's is the page size),
# flags u16, depth u16, 4 x u64 counts, root page u64), last page u64, txn id u64.
_META = struct.Struct("<IIQQI36xQ40xQQQ")
_META_AT = 16
_MAGIC = 0xBEEFC0DE
_NO_PAGE = (1 << 64) - 1          # LMDB's P_INVALID: an empty database has no root


def check_data_file(data: str) -> None:
    """Refuse an LMDB data file shorter than its newest meta page says it is, unless every
    page past its end is a free page (opening it would map pages past the end of the file,
    and reading them kills the process with SIGBUS), or one whose meta pages are damaged.

    Raises
    ------
    IndexCorruptError
    """
    newest = _newest_meta(data)
    if newest is None:
        return
    psize, free_root, last_pg, txnid, size = newest
    need = (last_pg + 1) * psize
    if size >= need:
        return
    # The last pages a commit allocated may have been freed in the same transaction and never
    # written: a sound file may end before its last page, but only with pages that are free.
    with open(data, "rb") as f:
        free = _free_pages(f, psize, free_root, size, last_pg, txnid, data)
    missing = range(size // psize, last_pg + 1)
    if not free.issuperset(missing):
        raise IndexCorruptError(f"{data} is truncated: {size:,} bytes, but its last commit "
                                f"(transaction {txnid}) uses {need:,}; the index is damaged: "
                                "restore it from a backup")


def check_free_list(data: str) -> None:
    """Refuse an LMDB data file whose newest free-page database is damaged (a record keyed
    past the newest commit, a page number past the last page, a broken node): LMDB meets it
    when a write transaction commits, and stops the process on an assertion
    (mdb_freelist_save). To be called under LMDB's write lock, so that no commit reuses
    the pages read here meanwhile.

    Raises
    ------
    IndexCorruptError
    """
    newest = _newest_meta(data)
    if newest is not None:
        psize, free_root, last_pg, txnid, size = newest
        with open(data, "rb") as f:
            _free_pages(f, psize, free_root, size, last_pg, txnid, data)


def _newest_meta(data: str) -> Optional[tuple]:
    """(page size, free-page root, last page, transaction id, file size) of the newest of
    the data file's two meta pages, checked as :func:`check_data_file` says; None for a file
    LMDB created and never wrote."""
    with open(data, "rb") as f:
        head = f.read(_META_AT + _META.size)
        metas = []
        if len(head) == _META_AT + _META.size:
            m0 = _META.unpack_from(head, _META_AT)
            if m0[0] == _MAGIC and m0[4] in (1 << k for k in range(9, 17)):
                metas.append(m0)
                f.seek(m0[4])
                page1 = f.read(_META_AT + _META.size)
                if len(page1) == len(head):
                    m1 = _META.unpack_from(page1, _META_AT)
                    if m1[0] == _MAGIC and m1[4] == m0[4]:
                        metas.append(m1)
        # The size after the meta pages: a writer in another process only makes it grow.
        size = os.fstat(f.fileno()).st_size
    if not metas:
        if size == 0:
            return None  # a file LMDB created and never wrote: it initialises it
        raise IndexCorruptError(f"{data} is not an LMDB data file (no valid meta page): the "
                                "index is damaged; restore it from a backup")
    # LMDB writes commit n's meta to page n % 2, so the two pages hold commits n and n - 1,
    # each on the page of its parity (both 0 before the first commit); anything else is a
    # damaged page (and LMDB would open at whichever commit looks newer, perhaps an older
    # one, without a word)
    if len(metas) < 2 or (metas[0][8], metas[1][8]) != (0, 0) and (
            metas[0][8] % 2 or metas[1][8] % 2 != 1 or abs(metas[0][8] - metas[1][8]) != 1):
        raise IndexCorruptError(f"{data}: one of LMDB's two meta pages is damaged, so the index "
                                "would open at an older commit; restore it from a backup")
    magic, version, address, mapsize, psize, free_root, main_root, last_pg, txnid = \
        max(metas, key=lambda m: m[8])
    if any(r != _NO_PAGE and not 2 <= r <= last_pg for r in (free_root, main_root)):
        raise IndexCorruptError(f"{data}: LMDB's newest meta page points outside the file "
                                "(damaged); restore the index from a backup")
    return psize, free_root, last_pg, txnid, size


def _free_pages(f, psize: int, root: int, size: int, last_pg: int, txnid: int,
                data: str) -> set:
    """The page numbers LMDB's free-page database lists, each record keyed by a commit up to
    txnid and every page up to last_pg (it is read from the file here, not through LMDB,
    so that a damaged one raises instead of crashing)."""
    def bad(why):
        return IndexCorruptError(f"{data}: LMDB's free-page list is damaged ({why}); restore "
                                 "the index from a backup")

    def page(pg: int, n: int = 1) -> bytes:
        if not 2 <= pg or (pg + n) * psize > size:
            raise bad(f"page {pg} is past the end of the file")
        f.seek(pg * psize)
        return f.read(n * psize)

    free, stack, seen = set(), [] if root == _NO_PAGE else [root], 0
    while stack:
        seen += 1
        if seen > last_pg:
            raise bad("a cycle")
        p = page(stack.pop())
        flags, lower = struct.unpack_from("<HH", p, 10)
        if not 16 <= lower <= psize:
            raise bad("a page header")
        for off in struct.unpack_from(f"<{(lower - 16) // 2}H", p, 16):
            if not 16 <= off <= psize - 8:
                raise bad("a node offset")
            lo, hi, nflags, ksize = struct.unpack_from("<HHHH", p, off)
            if flags & 0x01:                      # branch: the child's page number
                stack.append(lo | hi << 16 | nflags << 32)
                continue
            if not flags & 0x02:
                raise bad("a page that is neither branch nor leaf")
            if ksize != 8 or off + 16 > psize or \
                    struct.unpack_from("<Q", p, off + 8)[0] > txnid:
                raise bad("a record's commit number")
            dsize, at = lo | hi << 16, off + 8 + ksize
            if nflags & 0x01:                     # F_BIGDATA: the list is on overflow pages
                if at + 8 > psize:
                    raise bad("a node")
                ov = struct.unpack_from("<Q", p, at)[0]
                val = page(ov, -(-(dsize + 16) // psize))[16:16 + dsize]
            else:
                val = p[at:at + dsize]
            if len(val) != dsize or dsize % 8:
                raise bad("a node's size")
            ids = struct.unpack_from(f"<{dsize // 8}Q", val)
            if not ids or ids[0] > len(ids) - 1 or \
                    any(not 2 <= pg <= last_pg for pg in ids[1:1 + ids[0]]):
                raise bad("a page list")
            free.update(ids[1:1 + ids[0]])
    return free
