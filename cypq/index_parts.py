"""Pieces of the index that are not its methods: what a new index's storage is created with,
reading the model back, argument checks."""
from __future__ import annotations

import json
import zlib
from typing import Optional

import numpy as np

from ._checks import positive_int
from ._runs import ranges
from .filters import check_tag_names
from .lopq import LOPQModel
from .pq import NotFittedError
from .stored_vectors import SQ8_META, Kept, vector_dtype
from .storage.base import SQ8, TAGS, IndexCorruptError, Storage, check_id_range

TAG_NAMES = "tag_names"
# k above this and above the number of stored entries is refused before anything is
# allocated, as is an output of more than 64 times this many results.
_MAX_RESULTS = 1 << 20


def storage_args(model: LOPQModel, features, vectors: Optional[str], tags,
                 shard: Optional[dict] = None, vector_ranges=None) -> dict:
    """The ``meta``, ``features`` and ``vectors`` a new index's storage is created with: the
    model, the code layout's features, the ``vectors`` kind (for 'sq8', over
    ``vector_ranges`` (lo, hi)), ``tags`` (None / False: none; True: unnamed; a list of up
    to 64 names, bit j named by the j-th), and ``shard`` (its place in a shard set,
    :func:`shard_of`)."""
    _require_trained(model)
    data = model.to_proto_bytes()
    meta = {"model": data, MODEL_CRC: _crc_text(data)}
    features = set(features)
    if vectors == "sq8":
        if vector_ranges is None:
            raise ValueError("vectors='sq8' rounds each dimension within a range learned from "
                             "data: pass vector_ranges=cypq.stored_vectors.data_ranges(X) of "
                             "training vectors X")
        meta[SQ8_META] = Kept.for_ranges(vector_ranges, model.D).sq.tobytes()
        features.add(SQ8)
    elif vector_ranges is not None:
        raise ValueError("vector_ranges go with vectors='sq8' only")
    if shard is not None:
        meta["shard"] = json.dumps(shard).encode()
    if tags is not None and tags is not False:
        features.add(TAGS)
        meta.update(tags_meta(tags))
    return {"meta": meta, "features": features, "vectors": _vector_spec(model, vectors)}


def tags_meta(tags) -> dict:
    """The metadata naming the tag bits (``meta[tag_names]``) of ``tags``: None or True
    (unnamed: none), or a list of up to 64 names, bit j named by the j-th."""
    if tags is None or tags is True:
        return {}
    if isinstance(tags, (str, bytes)):
        raise TypeError("tags must be True or a list of tag names, not one string")
    return {TAG_NAMES: json.dumps(check_tag_names(tags)).encode()}


def tag_names(storage: Storage) -> list[str]:
    """The bit names an index was created with ([] when its tags are unnamed or absent)."""
    raw = storage.meta(TAG_NAMES)
    if raw is None:
        return []
    try:
        return check_tag_names(json.loads(bytes(raw).decode()))
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise IndexCorruptError(f"meta[tag_names] does not parse as a list of names: {e}") \
            from None


def shard_of(storage: Storage) -> Optional[dict]:
    """The place of an index in a shard set (None: not a shard): ``set`` (its name),
    ``number`` and ``count`` (shard i of n), ``cells`` [lo, hi) (the cells it owns)."""
    raw = storage.meta("shard")
    if raw is None:
        return None
    try:
        shard = json.loads(bytes(raw).decode())
        lo, hi = (int(c) for c in shard["cells"])
        if not (0 <= lo < hi <= storage.n_cells and 0 <= shard["number"] < shard["count"]):
            raise ValueError("out of range")
        return dict(shard, cells=[lo, hi])
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
        raise IndexCorruptError(f"meta[shard] does not parse as a shard's place: {e}") \
            from None


def copy_entries(snap, src: Storage, writer, state: bytes, step: int, lo: int = 0,
                 end: Optional[int] = None) -> None:
    """The entries of cells lo .. end-1 (default: all) of ``src`` (codes, and vectors and
    tags where it keeps them), from its snapshot ``snap``, appended to a bulk ``writer``
    about ``step`` entries at a time."""
    sizes = snap.cell_sizes()
    end = len(sizes) if end is None else end
    for hi in (lo + np.asarray(ranges(np.cumsum(sizes[lo:end]), step))).tolist():
        cells, ids, codes, *rest = snap.entries(lo, hi, vectors=True, tags=True)
        vectors = rest.pop(0) if src.vector_width else None
        tags = rest.pop(0) if src.keeps_tags else None
        if len(cells):
            writer.append(cells, ids, codes, state, vectors, tags)
        lo = hi


def _vector_spec(model: LOPQModel, kind: Optional[str]):
    """The storage's vectors option for the index's ``vectors`` kind (None: none)."""
    dtype = vector_dtype(kind)
    return None if dtype is None else (model.D, dtype)


# The CRC-32 of the model's bytes, beside them (indexes of cypq before 2026-12 have none): a
# changed byte of a float would load as another model, and search with it, without a word.
MODEL_CRC = "model_crc32"


def _crc_text(data: bytes) -> bytes:
    return f"{zlib.crc32(data):08x}".encode()


def _stored_model(storage: Storage, path: str) -> LOPQModel:
    """The model inside an index, its bytes checked against their CRC-32 where the index has
    one (and against its codes by Index's constructor)."""
    data = storage.meta("model")
    if data is None:
        raise IndexCorruptError(f"{path} holds no model (meta[model] is missing)")
    crc = storage.meta(MODEL_CRC)
    if crc is not None and bytes(crc) != _crc_text(bytes(data)):
        raise IndexCorruptError(f"{path}: the model inside does not match its checksum: the "
                                "index is damaged; restore it from a backup")
    model = LOPQModel.from_proto_bytes(data, f"the model inside {path}")
    _require_trained(model)
    return model


def _legacy_n_cells(meta) -> int:
    """Cells of an index written by cypq 0.1 (format 1 or 2): V * V of its model."""
    data = meta("model")
    if data is None:
        raise IndexCorruptError("the index holds no model (meta[model] is missing)")
    return LOPQModel.from_proto_bytes(bytes(data), "the model inside the index").V ** 2


def _require_trained(model) -> None:
    if not isinstance(model, LOPQModel):
        raise TypeError(f"expected a cypq.LOPQModel, got {type(model).__name__}")
    if not model.is_trained:
        raise NotFittedError("the model is not fully trained: call model.fit() first")


def _as_ids(ids, n: Optional[int], unique: bool = True) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        raise ValueError(f"ids must have shape ({n if n is not None else 'N'},), got {arr.shape}")
    check_id_range(arr)   # (before the cast: a uint64 past 2**63-1 would wrap)
    arr = arr.astype(np.int64)
    if unique and len(np.unique(arr)) != len(arr):
        raise ValueError("ids must be unique within one call")
    return arr


def kept_vectors(storage: Storage, dim: int) -> Optional[Kept]:
    """How an index's storage keeps its vectors (None: it keeps none)."""
    if not storage.vector_width:
        return None
    if SQ8 not in storage.features:
        return Kept(storage.vector_dtype.name)
    raw = storage.meta(SQ8_META)
    sq = None if raw is None else np.frombuffer(bytes(raw), dtype="<f4")
    if sq is None or sq.shape != (2 * dim,) or not np.isfinite(sq).all() or (sq[dim:] <= 0).any():
        raise IndexCorruptError(f"meta[{SQ8_META}] is not {dim} ranges (lo, step > 0) of the "
                                "sq8 vectors")
    return Kept("sq8", sq.astype(np.float32))


def check_rerank(rerank, k: int, kept: Optional[Kept]) -> int:
    """A search's ``rerank`` checked against its k and the index's kept vectors."""
    rerank = positive_int(rerank, "rerank")
    if kept is None:
        raise ValueError("rerank needs the stored vectors, and this index keeps none: "
                         "create it with vectors='float32', 'float16' or 'uint8'")
    if rerank < k:
        raise ValueError(f"rerank={rerank} is below k={k}: re-rank at least the k "
                         "results asked for")
    return rerank


def vectors_of_codes(kept: Optional[Kept], X: Optional[np.ndarray], n: int):
    """The vectors (float32 (n, D), validated) given with ``add_codes``'s n codes as the index
    keeps them: required exactly when it keeps vectors."""
    if kept is None:
        if X is not None:
            raise ValueError("this index keeps no vectors: add the codes without them")
        return None
    if X is None:
        raise ValueError("this index keeps each entry's vector: pass vectors= (the vectors "
                         "the codes were made from)")
    if len(X) != n:
        raise ValueError(f"{len(X)} vectors for {n} codes")
    return kept.store(X)


def check_result_size(k: int, nq: int, n_stored: int) -> None:
    """ValueError when k results for each of nq queries is an output the machine cannot hold
    (see ``_MAX_RESULTS``)."""
    if k > _MAX_RESULTS and k > n_stored or nq * k > _MAX_RESULTS * 64:
        raise ValueError(f"k={k} for {nq} queries asks for {nq * k:,} results from an index "
                         f"of {n_stored:,} entries: ask for at most {max(n_stored, 1):,} "
                         "per query (results past the stored entries are -1 / inf)")
