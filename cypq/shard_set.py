"""Finding and opening the storage of an on-disk index: one LMDB directory, or a shard set.

A shard set is N on-disk indexes, each owning a contiguous range of cells and holding the
same model; each records its place (``meta[shard]``: the set's name, its number, the count,
its cell range, :func:`cypq.index_parts.shard_of`). It is given as a directory holding
``shard-0000`` .. ``shard-NNNN`` (what :func:`cypq.shards.split` and ``cypq build --shards``
make) or as a list of the shards' directories (shards on several disks). Opened, it is one
:class:`cypq.storage.sharded.ShardedStorage`, so an :class:`cypq.Index` over it has the
whole API of one index.
"""
from __future__ import annotations

import glob
import os
from typing import Sequence, Union

from .index_parts import TAG_NAMES, shard_of
from .storage.base import IndexFormatError
from .storage.lmdb import LMDBStorage
from .storage.sharded import ShardedStorage

SHARD_DIR = "shard-{:04d}"
PathSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def is_one_index(path) -> bool:
    """Whether directory ``path`` is itself an on-disk index (not a set, not other files)."""
    return LMDBStorage.is_environment(os.fspath(path))


def shard_dirs(path: PathSpec) -> list[str]:
    """The shard directories of a shard set (a directory of ``shard-*`` or a list of
    paths); [] when ``path`` is one index or nothing."""
    if not isinstance(path, (str, os.PathLike)):
        return [os.fspath(p) for p in path]
    path = os.fspath(path)
    if is_one_index(path):
        return []
    return sorted(d for d in glob.glob(os.path.join(path, "shard-*")) if os.path.isdir(d))


def open_storage(path: PathSpec, readonly: bool, n_cells_of, **options):
    """(storage, name) of the index at ``path``: an LMDB storage, or a shard set's
    :class:`ShardedStorage` after checking that its shards are one set, all there, each
    owning its own cells and holding the same model.

    Raises
    ------
    cypq.IndexFormatError
        Not an index; shards of different sets, or with different models; a shard
        missing or given twice; cell ranges that overlap or leave cells unowned.
    """
    dirs = shard_dirs(path)
    if not dirs:
        if not isinstance(path, (str, os.PathLike)):
            raise IndexFormatError("an empty list of shards")
        return LMDBStorage.open(os.fspath(path), readonly=readonly, n_cells_of=n_cells_of,
                                **options), os.fspath(path)
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ", ".join(dirs)
    parts = []
    try:
        for d in dirs:
            parts.append(LMDBStorage.open(d, readonly=readonly, n_cells_of=n_cells_of,
                                          **options))
        places = [shard_of(p) for p in parts]
        _check_set(dirs, parts, places)
        _finish_tags(dirs, parts, readonly)
        order = sorted(range(len(parts)), key=lambda j: places[j]["number"])
        bounds = [places[j]["cells"][0] for j in order] + [parts[0].n_cells]
        for j, nxt in zip(order, order[1:] + [None]):
            end = places[j]["cells"][1]
            if end != (bounds[-1] if nxt is None else places[nxt]["cells"][0]):
                raise IndexFormatError(f"{dirs[j]} owns cells {places[j]['cells']}, which "
                                       f"overlap or leave a gap before the next shard's: "
                                       "not one shard set")
        return ShardedStorage([parts[j] for j in order], bounds,
                              [dirs[j] for j in order]), name
    except BaseException:
        for p in parts:
            p.close()
        raise


def _check_set(dirs, parts, places) -> None:
    """IndexFormatError unless the parts are all the shards of one set with one model."""
    for d, place in zip(dirs, places):
        if place is None:
            raise IndexFormatError(f"{d} is an index but not a shard: open it alone, not "
                                   "as part of a shard set")
    first = places[0]
    for d, place in zip(dirs, places):
        if (place["set"], place["count"]) != (first["set"], first["count"]):
            raise IndexFormatError(f"{d} belongs to shard set {place['set']}, {dirs[0]} to "
                                   f"{first['set']}: shards of different sets")
    numbers = sorted(p["number"] for p in places)
    count = first["count"]
    if numbers != list(range(count)):
        missing = sorted(set(range(count)) - set(numbers))
        twice = [f"shard {k} in " + " and ".join(d for d, p in zip(dirs, places)
                                                  if p["number"] == k)
                 for k in sorted(set(numbers)) if numbers.count(k) > 1]
        raise IndexFormatError(
            f"the shard set {first['set']} has {count} shards; "
            + "; ".join(([f"shard {missing} missing"] if missing else []) + twice)
            + f" among {', '.join(dirs)}: give every shard once")
    model = parts[0].meta("model")
    for d, p in zip(dirs, parts):
        if p.meta("model") != model:
            raise IndexFormatError(f"{d} holds another model than {dirs[0]}: the shards of "
                                   "one set share one model")


def _finish_tags(dirs, parts, readonly: bool) -> None:
    """Finish an ``Index.keep_tags`` of the set that stopped after some of its shards."""
    tagged = [p for p in parts if p.keeps_tags]
    if not tagged or len(tagged) == len(parts):
        return
    if readonly:
        raise IndexFormatError(f"some shards of {dirs[0]}'s set keep tags and others not (a "
                               "keep_tags that was interrupted): open the set for writing "
                               "once to finish it")
    names = tagged[0].meta(TAG_NAMES)
    for p in parts:
        p.keep_tags({TAG_NAMES: names} if names is not None else {})
