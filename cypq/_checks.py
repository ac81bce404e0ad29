"""Input validation shared by the codecs: every public entry point funnels through here."""
from __future__ import annotations

import numpy as np

CODE_DTYPES = (np.uint8, np.uint16, np.uint32)


def code_dtype_for(Ks: int) -> type:
    """The smallest unsigned dtype that holds codes 0 .. Ks - 1 (nanopq's rule)."""
    return np.uint8 if Ks <= 2**8 else (np.uint16 if Ks <= 2**16 else np.uint32)


def as_vectors(x, name: str = "vecs", dim: int | None = None, ndim: int = 2,
               allow_empty: bool = False) -> np.ndarray:
    """Validate real-valued vectors and return them as a C-contiguous float32 array.

    Parameters
    ----------
    x : array_like, shape (N, D) (or (D,) when ndim == 1)
        Any real dtype; float64, integer and non-contiguous input is converted.
    name : str
        Argument name used in error messages.
    dim : int, optional
        Required D.
    ndim : int
        Required number of dimensions (1 or 2).
    allow_empty : bool
        Whether N == 0 is acceptable.

    Returns
    -------
    numpy.ndarray, float32, C-contiguous, same shape as ``x``.

    Raises
    ------
    TypeError
        Non-numeric, complex or boolean input.
    ValueError
        Wrong ndim or dimension, empty input, NaN or infinity.
    """
    arr = np.asarray(x)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating)
                                   or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be a real-valued numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        want = "(D,)" if ndim == 1 else "(N, D)"
        raise ValueError(f"{name} must have shape {want}, got an array of shape {arr.shape}")
    if dim is not None and arr.shape[-1] != dim:
        raise ValueError(f"{name} has dimension {arr.shape[-1]} but the model expects {dim}")
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one vector")
    with np.errstate(over="ignore"):  # out-of-range values become inf, reported below
        out = np.ascontiguousarray(arr, dtype=np.float32)
    # After the conversion, so float64 values beyond float32's range (now inf) are caught too.
    if out.size and np.issubdtype(arr.dtype, np.floating) and not check_finite(out):
        raise ValueError(f"{name} contains NaN or infinity (or values beyond float32's range); "
                         "clean or drop those rows first")
    return out


def check_finite(x: np.ndarray) -> bool:
    """True when x has no NaN or infinity: one summation pass (NaN and inf propagate), in
    x's own float32 where it is that (a float64 copy of a query batch was 1.5% of a short
    search), again in float64 only when that sum overflowed or is not finite."""
    with np.errstate(over="ignore", invalid="ignore"):   # the sums' answer is the point
        if x.dtype == np.float32 and np.isfinite(np.add.reduce(x, axis=None)):
            return True
        return bool(np.isfinite(np.add.reduce(x, axis=None, dtype=np.float64)))


def as_codes(codes, M: int, Ks: int, name: str = "codes") -> np.ndarray:
    """Validate PQ codes (N, M) and return them C-contiguous in the model's code dtype.

    Raises
    ------
    TypeError
        Non-integer codes.
    ValueError
        Wrong shape, or a code outside 0 .. Ks - 1.
    """
    arr = np.asarray(codes)
    if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be integer PQ codes, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != M:
        raise ValueError(f"{name} must have shape (N, {M}) (one code per subspace), "
                         f"got {arr.shape}")
    dtype = code_dtype_for(Ks)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= Ks:
            raise ValueError(f"{name} has values in [{lo}, {hi}] but Ks={Ks}: "
                             "they were not made by this model")
    return np.ascontiguousarray(arr, dtype=dtype)


def positive_int(value, name: str, least: int = 1) -> int:
    """value as an int >= least (1: positive), else ValueError/TypeError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be " + ("positive" if least == 1 else f">= {least}")
                         + f", got {value}")
    return int(value)
