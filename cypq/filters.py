"""Which entries a filtered search may return: tag masks and id lists, checked and turned
into what the scan kernel reads (:class:`Filter`).

An entry's tags are a uint64 bit set (64 boolean labels). A search may ask for entries whose
tags have any of (``tags_any``), all of (``tags_all``) or none of (``tags_none``) some bits,
and whose ids are in (``ids``) or not in (``exclude_ids``) a list. Bits are given as an
integer mask, a bit name or a list of names (an index made with named tags), or, per query,
an array of masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .storage.base import check_id_range

PLANS = ("auto", "scan", "direct")
MAX_TAG_NAMES = 64


@dataclass
class Filter:
    """A checked filter for nq queries.

    Attributes
    ----------
    masks : numpy.ndarray uint64 (nq, 3) or None
        Per query: any-of (0: no condition), all-of, none-of bits; None: no tag condition.
    id_set : numpy.ndarray int64 or None
        Ascending, distinct.
    id_mode : int
        1: ids must be in id_set; -1: must not be; 0: no id condition.
    plan : str
        'auto' (the planner chooses), 'scan' (walk the cells) or 'direct' (score the passing
        entries only); see cypq.search.
    """
    masks: Optional[np.ndarray]
    id_set: Optional[np.ndarray]
    id_mode: int
    plan: str = "auto"


def pass_rates(filt: Filter, counts: Optional[np.ndarray], total: int) -> np.ndarray:
    """(nq,) expected share of the entries that pass, per query: from the per-bit tag counts
    (64,) of ``total`` entries, taking bits as independent, times the id list's share."""
    nq = 1 if filt.masks is None else len(filt.masks)
    rate = np.ones(nq)
    if filt.masks is not None and counts is not None and total > 0:
        p = np.clip(np.asarray(counts, dtype=np.float64) / total, 0.0, 1.0)
        bits = np.unpackbits(filt.masks.astype("<u8").view(np.uint8).reshape(nq, 3, 8),
                             axis=2, bitorder="little").astype(bool)     # (nq, 3, 64)
        any_ = np.where(bits[:, 0].any(1), 1 - np.prod(np.where(bits[:, 0], 1 - p, 1), 1), 1)
        rate = any_ * np.prod(np.where(bits[:, 1], p, 1), 1) * \
            np.prod(np.where(bits[:, 2], 1 - p, 1), 1)
    if filt.id_mode and total > 0:
        share = min(1.0, len(filt.id_set) / total)
        rate = rate * (share if filt.id_mode == 1 else 1 - share)
    return rate


def check_tag_names(names: Sequence[str]) -> list[str]:
    """Bit names of an index (bit j is names[j]): at most 64 distinct non-empty strings."""
    names = [str(n) for n in names]
    if len(names) > MAX_TAG_NAMES or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"tag names must be at most {MAX_TAG_NAMES} distinct non-empty "
                         f"strings (bit j is the j-th), got {names!r}")
    return names


def tag_mask(spec, names: Sequence[str], what: str, nq: int) -> np.ndarray:
    """(nq,) uint64 masks of a tag argument: an int mask, a bit name, a list of names (all
    for every query), or an array of nq masks (one per query).

    Raises
    ------
    KeyError
        A name the index does not have (naming it and the names it has).
    ValueError
        A mask that is not a whole number in [0, 2**64), or an array of another length.
    """
    if isinstance(spec, str) or (isinstance(spec, (list, tuple)) and spec and
                                 all(isinstance(s, str) for s in spec)):
        mask = 0
        for name in [spec] if isinstance(spec, str) else spec:
            if name not in names:
                have = ", ".join(names) if names else "none (its tags are unnamed: use masks)"
                raise KeyError(f"{what}: the index has no tag named {name!r}; its names: "
                               f"{have}")
            mask |= 1 << list(names).index(name)
        return np.full(nq, mask, dtype=np.uint64)
    arr = np.asarray(spec)
    if arr.dtype.kind not in "ui" or arr.ndim > 1 or (arr.size and arr.dtype.kind == "i"
                                                      and arr.min() < 0):
        raise ValueError(f"{what} must be a uint64 bit mask, a tag name, a list of names or "
                         f"an array of one mask per query, got {spec!r}")
    if arr.ndim == 1 and len(arr) != nq:
        raise ValueError(f"{what}: {len(arr)} masks for {nq} queries")
    if arr.ndim == 0 and int(arr) >= 1 << 64:
        raise ValueError(f"{what}: {int(arr)} does not fit in 64 bits")
    return np.broadcast_to(arr.astype(np.uint64), (nq,)).copy()


def id_list(ids, what: str) -> np.ndarray:
    """Distinct ascending int64 of a list of ids (1-d, whole numbers)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "ui"):
        raise ValueError(f"{what} must be a 1-d array of int64 ids, got "
                         f"{arr.dtype} of shape {arr.shape}")
    check_id_range(arr, what)
    return np.unique(arr.astype(np.int64))


def make_filter(nq: int, keeps_tags: bool, names: Sequence[str], tags_any=None, tags_all=None,
                tags_none=None, ids=None, exclude_ids=None, plan: str = "auto"
                ) -> Optional[Filter]:
    """The Filter of a search's arguments (None: no filter asked for).

    Raises
    ------
    ValueError
        A tag filter on an index without tags; tags_any of no bits; a bad plan.
    """
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    tag_args = (tags_any, tags_all, tags_none)
    masks = None
    if any(a is not None for a in tag_args):
        if not keeps_tags:
            raise ValueError("this index keeps no tags (all zero) to filter by: give some "
                             "(index.set_tags, add(..., tags=)) or call index.keep_tags(); "
                             "it keeps them from then on")
        masks = np.zeros((nq, 3), dtype=np.uint64)
        for j, (arg, what) in enumerate(zip(tag_args, ("tags_any", "tags_all", "tags_none"))):
            if arg is not None:
                masks[:, j] = tag_mask(arg, names, what, nq)
        if tags_any is not None and not masks[:, 0].all():
            raise ValueError("tags_any names no bit for some query: it would pass nothing "
                             "(leave it None for no condition)")
    id_set, id_mode = None, 0
    if ids is not None:
        id_set, id_mode = id_list(ids, "ids"), 1
        if exclude_ids is not None:
            id_set = np.setdiff1d(id_set, id_list(exclude_ids, "exclude_ids"))
    elif exclude_ids is not None:
        id_set, id_mode = id_list(exclude_ids, "exclude_ids"), -1
    if masks is None and not id_mode:
        return None
    return Filter(masks, id_set, id_mode, plan)
