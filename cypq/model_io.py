"""The LOPQ protobuf model file: bytes <-> the model's arrays, byte-compatible with LOPQ.

This module knows the file, not the model class: it reads a model's public attributes and
makes one through the class it is given, so the import runs one way, lopq -> model_io
(``LOPQModel.to_proto_bytes`` / ``from_proto_bytes`` / ``export_proto`` / ``load_proto``).

Writing follows LOPQ's ``export_proto``: header fields D, V, M, num_subquantizers, then the
parts that exist, row-major float32, Rs / mus / subs of half 0 before those of half 1. Reading
takes every size from the arrays' shapes (files in the wild carry wrong header fields) and
accepts partial models. cypq's PCA goes in fields 100 and 101, which LOPQ readers skip: they
then see the model in the PCA'd space and must apply ``(x - pca_mean) @ pca_matrix`` to
vectors themselves (as the LOPQ Spark pipeline does with its separate PCA parameters).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO, Optional, Union

import numpy as np
from google.protobuf.message import DecodeError

from ._heap import release_free_memory
from .proto import lopq_model_pb2 as pb

PathOrFile = Union[str, os.PathLike, BinaryIO]


class ModelFileError(ValueError):
    """A model file that cannot be read: truncated, corrupt, or inconsistent."""


@dataclass
class ModelParts:
    """What a model file holds; any array part may be None (a partly trained model).

    Header fields D, V, M, S (num_subquantizers) are 0 where unknown. Cs: two (V, D/2);
    Rs: two (V, D/2, D/2); mus: two (V, D/2); subs: two sequences of M/2 (S, D/M) arrays;
    pca_mean (D_in,), pca_matrix (D_in, D). All float32. metric: "l2", "cosine" or "ip" (field 102,
    written only when not "l2", so l2 files are LOPQ's bytes exactly).
    """
    D: int = 0
    V: int = 0
    M: int = 0
    S: int = 0
    Cs: Optional[tuple] = None
    Rs: Optional[tuple] = None
    mus: Optional[tuple] = None
    subs: Optional[tuple] = None
    pca_mean: Optional[np.ndarray] = None
    pca_matrix: Optional[np.ndarray] = None
    metric: str = "l2"


def parts_to_bytes(parts: ModelParts) -> bytes:
    """Serialized LOPQModelParams of a model's parts (see the module docstring)."""
    params = pb.LOPQModelParams()
    if parts.D:
        params.D = parts.D
    params.V, params.M, params.num_subquantizers = parts.V, parts.M, parts.S
    for C in parts.Cs or ():
        _put_matrix(params.Cs.add(), C)
    for R in parts.Rs or ():
        for r in R:
            _put_matrix(params.Rs.add(), r)
    for mu in parts.mus or ():
        for m in mu:
            params.mus.add().values.extend(np.asarray(m, np.float32).ravel().tolist())
    for half in parts.subs or ():
        for s in half:
            _put_matrix(params.subs.add(), s)
    if parts.pca_matrix is not None:
        params.pca_mean.values.extend(np.asarray(parts.pca_mean, np.float32).ravel().tolist())
        _put_matrix(params.pca_matrix, parts.pca_matrix)
    if parts.metric != "l2":
        params.metric = parts.metric
    return params.SerializeToString()


def bytes_to_parts(data: bytes, name: str = "model bytes") -> ModelParts:
    """The parts held by serialized LOPQModelParams.

    Raises
    ------
    ModelFileError
        Truncated or corrupt bytes, no parameters, or arrays whose sizes do not fit the
        layout; ``name`` says where the bytes came from.
    """
    params = pb.LOPQModelParams()
    try:
        params.ParseFromString(bytes(data))
    except DecodeError as e:
        raise ModelFileError(f"{name} is not a readable LOPQ model file (truncated or corrupt: "
                             f"{e})") from None
    if not (params.Cs or params.Rs or params.mus or params.subs):
        raise ModelFileError(f"{name} holds no LOPQ model parameters (empty or not a model "
                             "file)")
    try:
        Cs = [_get_matrix(m, 2) for m in params.Cs] or None
        if Cs is not None and len(Cs) != 2:
            raise ModelFileError(f"expected 2 coarse quantizers (Cs), found {len(Cs)}")
        Rs = _halves([_get_matrix(m, 2) for m in params.Rs], "Rs")
        mus = _halves([np.asarray(v.values, dtype=np.float32) for v in params.mus], "mus")
        subs = _halves([_get_matrix(m, 2) for m in params.subs], "subs")
        parts = ModelParts(
            D=params.D, V=params.V, M=params.M, S=params.num_subquantizers,
            Cs=None if Cs is None else tuple(Cs),
            Rs=None if Rs is None else tuple(np.stack(h) for h in Rs),
            mus=None if mus is None else tuple(np.stack(h) for h in mus),
            subs=None if subs is None else tuple(subs))
        if params.HasField("pca_matrix"):
            parts.pca_matrix = _get_matrix(params.pca_matrix, 2)
            parts.pca_mean = np.asarray(params.pca_mean.values, dtype=np.float32)
        if params.HasField("metric"):
            parts.metric = params.metric
    except ModelFileError as e:
        raise ModelFileError(f"{name}: {e}") from None
    return parts


def model_to_bytes(model) -> bytes:
    """Serialized LOPQModelParams of an LOPQ model (anything with LOPQModel's attributes)."""
    return parts_to_bytes(ModelParts(
        D=model.model_dim or 0, V=model.V, M=model.M, S=model.subquantizer_clusters,
        Cs=model.Cs, Rs=model.Rs, mus=model.mus,
        subs=None if model.subquantizers is None else tuple(model.subquantizers),
        pca_mean=model.pca_mean, pca_matrix=model.pca_matrix, metric=model.metric))


def model_from_bytes(cls, data: bytes, name: str = "model bytes"):
    """A model of class ``cls`` (cypq.LOPQModel) from serialized LOPQModelParams.

    Raises
    ------
    ModelFileError
        Corrupt bytes, or parts that do not fit together.
    """
    parts = bytes_to_parts(data, name)
    try:
        model = cls(parameters=(parts.Cs, parts.Rs, parts.mus, parts.subs), V=parts.V or 8,
                    M=parts.M or 4, subquantizer_clusters=parts.S or 256, pca=False,
                    metric=parts.metric)
        if parts.pca_matrix is not None:
            model.set_pca(parts.pca_mean, parts.pca_matrix)
    except ValueError as e:  # shapes that do not fit together
        raise ModelFileError(f"{name} is inconsistent: {e}") from None
    # the bytes' copy, the parsed message and the per-matrix arrays: about three times the bytes
    release_free_memory(3 * len(data))
    return model


def write_bytes(data: bytes, path_or_file: PathOrFile) -> None:
    """Write model bytes to a path (atomically: temporary file, fsync, rename) or a binary
    file object."""
    if isinstance(path_or_file, (str, os.PathLike)):
        tmp = f"{os.fspath(path_or_file)}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path_or_file)
    else:
        path_or_file.write(data)


def read_bytes(path_or_file) -> tuple[bytes, str]:
    """(bytes, a name for messages) of a path, a binary file object, or bytes."""
    if isinstance(path_or_file, (bytes, bytearray, memoryview)):
        return bytes(path_or_file), "model bytes"
    if isinstance(path_or_file, (str, os.PathLike)):
        name = os.fspath(path_or_file)
        with open(name, "rb") as f:
            return f.read(), name
    return path_or_file.read(), getattr(path_or_file, "name", "model file")


def _put_matrix(m, a) -> None:
    a = np.asarray(a, dtype=np.float32)
    m.values.extend(a.ravel().tolist())
    m.shape.extend(a.shape)


def _get_matrix(m, ndim: int) -> np.ndarray:
    shape = tuple(int(s) for s in m.shape)
    values = np.asarray(m.values, dtype=np.float32)
    if len(shape) != ndim or int(np.prod(shape)) != values.size:
        raise ModelFileError(f"a matrix has {values.size} values but shape {shape}")
    return values.reshape(shape)


def _halves(items, name):
    if not items:
        return None
    if len(items) % 2:
        raise ModelFileError(f"{name} has an odd number ({len(items)}) of entries: expected "
                             "the same number for both halves")
    h = len(items) // 2
    shapes = {a.shape for a in items}
    if len(shapes) != 1:
        raise ModelFileError(f"{name} entries differ in shape: {sorted(shapes)}")
    return [items[:h], items[h:]]
