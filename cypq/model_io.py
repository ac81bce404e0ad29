"""The LOPQ protobuf model file: read and write it byte-compatibly with the LOPQ code.

Writing follows LOPQ's ``export_proto``: header fields D, V, M, num_subquantizers, then the
parts that exist, row-major float32, Rs / mus / subs of half 0 before those of half 1. Reading
takes every size from the arrays' shapes (files in the wild carry wrong header fields) and
accepts partial models. cypq's PCA goes in fields 100 and 101, which LOPQ readers skip: they
then see the model in the PCA'd space and must apply ``(x - pca_mean) @ pca_matrix`` to
vectors themselves (as the LOPQ Spark pipeline does with its separate PCA parameters).
"""
from __future__ import annotations

import io
import os
from typing import BinaryIO, Union

import numpy as np
from google.protobuf.message import DecodeError

from .proto import lopq_model_pb2 as pb

PathOrFile = Union[str, os.PathLike, BinaryIO]


class ModelFileError(ValueError):
    """A model file that cannot be read: truncated, corrupt, or inconsistent."""


def model_to_proto(model) -> pb.LOPQModelParams:
    """The LOPQModelParams message of a model (see module docstring for the layout)."""
    params = pb.LOPQModelParams()
    if model.model_dim is not None:
        params.D = model.model_dim
    params.V = model.V
    params.M = model.M
    params.num_subquantizers = model.subquantizer_clusters
    if model.Cs is not None:
        for C in model.Cs:
            _put_matrix(params.Cs.add(), C)
    if model.Rs is not None:
        for R in model.Rs:
            for r in R:
                _put_matrix(params.Rs.add(), r)
    if model.mus is not None:
        for mu in model.mus:
            for m in mu:
                params.mus.add().values.extend(np.asarray(m, np.float32).ravel().tolist())
    if model.subquantizers is not None:
        for half in model.subquantizers:
            for s in half:
                _put_matrix(params.subs.add(), s)
    if model.pca_matrix is not None:
        params.pca_mean.values.extend(model.pca_mean.ravel().tolist())
        _put_matrix(params.pca_matrix, model.pca_matrix)
    return params


def export_proto(model, path_or_file: PathOrFile) -> None:
    """Write a model as an LOPQ protobuf file.

    Parameters
    ----------
    model : cypq.LOPQModel
    path_or_file : str, os.PathLike or binary file object
        A path is written atomically (temporary file, then rename).
    """
    data = model_to_proto(model).SerializeToString()
    if isinstance(path_or_file, (str, os.PathLike)):
        tmp = f"{os.fspath(path_or_file)}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path_or_file)
    else:
        path_or_file.write(data)


def load_proto(path_or_file: PathOrFile):
    """Read an LOPQ protobuf model file (written by LOPQ's Python/Spark code or by cypq).

    Parameters
    ----------
    path_or_file : str, os.PathLike, binary file object, or the file's bytes

    Returns
    -------
    cypq.LOPQModel
        Possibly partly trained (e.g. only Cs), as the file holds.

    Raises
    ------
    ModelFileError
        Truncated or corrupt file, or arrays whose sizes do not fit together.
    """
    if isinstance(path_or_file, (bytes, bytearray, memoryview)):
        data, name = bytes(path_or_file), "model bytes"
    elif isinstance(path_or_file, (str, os.PathLike)):
        name = os.fspath(path_or_file)
        with open(name, "rb") as f:
            data = f.read()
    else:
        data, name = path_or_file.read(), getattr(path_or_file, "name", "model file")
    return proto_to_model(data, name)


def proto_to_model(data: bytes, name: str = "model bytes"):
    """cypq.LOPQModel from serialized LOPQModelParams (see load_proto)."""
    from .lopq import LOPQModel
    params = pb.LOPQModelParams()
    try:
        params.ParseFromString(data)
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
        model = LOPQModel(parameters=(
            Cs, None if Rs is None else tuple(np.stack(h) for h in Rs),
            None if mus is None else tuple(np.stack(h) for h in mus), subs),
            V=params.V or 8, M=params.M or 4,
            subquantizer_clusters=params.num_subquantizers or 256, pca=False)
        if params.HasField("pca_matrix"):
            P = _get_matrix(params.pca_matrix, 2)
            mean = np.asarray(params.pca_mean.values, dtype=np.float32)
            if mean.shape != (P.shape[0],):
                raise ModelFileError("the PCA mean and matrix disagree in dimension")
            model.pca, model.pca_mean, model.pca_matrix = True, mean, P
            model._check_consistent()
    except ModelFileError as e:
        raise ModelFileError(f"{name}: {e}") from None
    except ValueError as e:  # shapes that do not fit together
        raise ModelFileError(f"{name} is inconsistent: {e}") from None
    return model


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
