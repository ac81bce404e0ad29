"""The parts of an LOPQ model (coarse quantizers, rotations, means, subquantizers, PCA):
validation on the way in, consistency with each other, equality."""
from __future__ import annotations

import numpy as np


def check_parts(model) -> None:
    """Raise ValueError unless an LOPQ model's parts agree in shape with each other, with
    V, and with the PCA's output dimension."""
    dims = set()
    if model.Cs is not None:
        if model.Cs[0].shape != model.Cs[1].shape:
            raise ValueError(f"Cs halves differ in shape: {model.Cs[0].shape} vs "
                             f"{model.Cs[1].shape}")
        dims.add(model.Cs[0].shape[1])
    if model.Rs is not None:
        V, a, b = model.Rs[0].shape
        if a != b or model.Rs[1].shape != (V, a, b) or V != model.V:
            raise ValueError(f"Rs must be two (V={model.V}, D/2, D/2) arrays, got "
                             f"{model.Rs[0].shape} and {model.Rs[1].shape}")
        dims.add(a)
    if model.mus is not None:
        if model.mus[0].shape != model.mus[1].shape or model.mus[0].shape[0] != model.V:
            raise ValueError(f"mus must be two (V={model.V}, D/2) arrays, got "
                             f"{model.mus[0].shape} and {model.mus[1].shape}")
        dims.add(model.mus[0].shape[1])
    if model.subquantizers is not None:
        shapes = {s.shape for half in model.subquantizers for s in half}
        if len(shapes) != 1:
            raise ValueError(f"subquantizers differ in shape: {sorted(shapes)}")
        S, ds = shapes.pop()
        dims.add(ds * model.num_fine_splits)
    if len(dims) > 1:
        raise ValueError(f"model parts disagree on the half dimension D/2: {sorted(dims)}")
    if model.pca_matrix is not None and dims and model.pca_matrix.shape[1] != 2 * dims.pop():
        raise ValueError("the PCA's output dimension does not match the model")


def code_pair(codes) -> tuple:
    """(coarse, fine) of LOPQ codes given as an LOPQCode or a pair, as model.predict returns
    them; anything else (e.g. one array holding both side by side) is a TypeError that says
    what to pass (unpacked as a pair, an array of two rows would be read as one code per
    row)."""
    if isinstance(codes, np.ndarray) or not isinstance(codes, (tuple, list)) or len(codes) != 2:
        if isinstance(codes, np.ndarray):
            got = (f"an array of shape {codes.shape} (one of both side by side splits as "
                   "(a[:, :2], a[:, 2:]))")
        else:
            got = type(codes).__name__ + (f" of {len(codes)}" if isinstance(codes, (tuple, list))
                                          else "")
        raise TypeError("codes must be an LOPQCode or a pair (coarse (N, 2), fine (N, M)) as "
                        f"model.predict returns them, got {got}")
    return codes[0], codes[1]


def check_coarse_codes(coarse, n: int, V: int) -> np.ndarray:
    """Coarse codes validated for a model of V centroids per half.

    Parameters
    ----------
    coarse : array_like of int, shape (2,) or (n, 2)
    n : int
        Expected number of rows.
    V : int

    Returns
    -------
    numpy.ndarray int32, shape (n, 2), each in [0, V).
    """
    c = np.asarray(coarse)
    if c.ndim == 1:
        c = c[None, :]
    if c.shape != (n, 2):
        raise ValueError(f"coarse codes must have shape ({n}, 2), got {np.shape(coarse)}")
    if not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"coarse codes must be integers, got {c.dtype}")
    if c.size and (c.min() < 0 or c.max() >= V):
        raise ValueError(f"coarse codes must be in [0, {V})")
    return np.ascontiguousarray(c, dtype=np.int32)


# The defaults LOPQModel takes from the data (measured: README, LOPQ benchmarks, "Defaults").
AUTO_POINTS_PER_CENTROID = 64      # V: the largest power of two <= n / (this x D / 128) ...
AUTO_POINTS_PER_CENTROID_4BIT = 512  # ... (4-bit: n / (this x sqrt(D / 128)), larger cells) ...
AUTO_DIM_UNIT = 128                # ... (the factor D / this, at least 1) ...
AUTO_V = (8, 1024)                 # ... within these bounds
AUTO_PCA_FROM = 256                # PCA to about D/3 from this input dimension on


def auto_V(n: int, subquantizer_clusters: int = 256, dim: int = AUTO_DIM_UNIT) -> int:
    """Coarse centroids per half for n training vectors of dimension dim: the largest power
    of two at most n / (AUTO_POINTS_PER_CENTROID x f), f = dim / AUTO_DIM_UNIT (at least 1),
    within AUTO_V. Higher dimensions take fewer centroids: each one a query visits costs a
    projection of (dim / 2)^2, and on 384-d text embeddings a quarter of 128-d SIFT's V gave
    more recall per unit of time at every code size (README, "Defaults"). 4-bit codes (at
    most 16 codewords) scan for a fraction of the cost per code, so fewer, larger cells pay:
    n / (AUTO_POINTS_PER_CENTROID_4BIT x sqrt(f)) (REALSIFT1M's 100k: 128, where V=256 was
    slower at every recall up to 0.9; MANMINILM's 20k: 16, ahead of 8 and 32)."""
    f = max(1.0, dim / AUTO_DIM_UNIT)
    per = AUTO_POINTS_PER_CENTROID_4BIT * f ** 0.5 if subquantizer_clusters <= 16 else \
        AUTO_POINTS_PER_CENTROID * f
    v = 1 << max(0, int(n // per).bit_length() - 1)
    return int(min(max(v, AUTO_V[0]), AUTO_V[1]))


def half_pca_dim(dim: int, M: int) -> int:
    """dim / 2 rounded down to a multiple of 2M: the most dimensions the PCA rule keeps."""
    return (dim // 2) // (2 * M) * (2 * M)


def auto_pca_dim(dim: int, M: int):
    """The PCA dimension for vectors of dimension dim and M subquantizers, from AUTO_PCA_FROM
    dimensions on: dim / 3 rounded up to a multiple of 2M (an even number of dimensions per
    subquantizer), at most dim / 2 rounded down to one; None below, or where that leaves
    fewer than two dimensions per subquantizer. On 384-d MiniLM embeddings 128 dimensions gave
    more recall per unit of time than 192 (the rule before: dim / 2) up to the top few
    thousandths for M = 16, 32 and 64, with 4-bit and 8-bit codes alike (the PCA and each
    visited centroid's projection cost (dimension)^2); for M = 48, 192 did as well as 144
    or better (three dimensions per subquantizer) over four training seeds."""
    if dim < AUTO_PCA_FROM:
        return None
    step = 2 * M
    k = min(-(-dim // (3 * step)) * step, half_pca_dim(dim, M))
    return k if k >= 2 * M else None


def choose_auto(model, n: int, dim: int) -> None:
    """Settle what the model left to the data, for n training vectors of dimension dim:
    V (:func:`auto_V`) and the PCA (:func:`auto_pca_dim`), where parts are to be trained."""
    if model.V is None and model.Cs is None:
        model.V = auto_V(n, model.subquantizer_clusters, dim)
    if model.pca is None:
        model.pca_dim = auto_pca_dim(dim, model.M) if model.Cs is None else None
        model.pca = model.pca_dim is not None


def check_training_shape(model, n: int, dim: int) -> None:
    """Raise ValueError unless n training vectors of dimension dim can train the missing
    parts (the dimension after an untrained PCA's reduction even and divisible by M;
    n at least V and subquantizer_clusters where those are to be trained)."""
    if model.D is not None and dim != model.D:
        raise ValueError(f"the vectors have dimension {dim} but the model expects {model.D}")
    if model.pca_dim is not None and model.pca_matrix is None and not \
            2 <= model.pca_dim < dim:
        raise ValueError(f"pca_dim={model.pca_dim} must be less than the dimension {dim}")
    inner = model.pca_dim if model.pca_dim is not None and model.pca_matrix is None else \
        (model.model_dim or dim)
    if inner % 2 or inner % model.M:
        raise ValueError(f"dimension {inner} must be even and divisible by M={model.M}")
    need = max(model.V if model.Cs is None else 1,
               model.subquantizer_clusters if model.subquantizers is None else 1)
    if n < need:
        raise ValueError(f"{n} training vectors are fewer than V={model.V} or "
                         f"subquantizer_clusters={model.subquantizer_clusters}")


def subquantizer_parts(subs):
    """Fine subquantizers given per half (two equally long sequences of (S, D/M) arrays) as a
    tuple of two lists of float32 arrays; None stays None."""
    if subs is None:
        return None
    if len(subs) != 2 or len(subs[0]) != len(subs[1]) or len(subs[0]) == 0:
        raise ValueError("subquantizers must be two equally long sequences of (S, D/M) arrays")
    return tuple([f32(s, "subquantizer", 2) for s in half] for half in subs)


def pca_parts(mean, matrix) -> tuple[np.ndarray, np.ndarray]:
    """A PCA's mean (D_in,) and matrix (D_in, D) as validated float32 arrays."""
    mean, matrix = f32(mean, "pca_mean", 1), f32(matrix, "pca_matrix", 2)
    if mean.shape != (matrix.shape[0],):
        raise ValueError("the PCA mean and matrix disagree in dimension")
    return mean, matrix


def unit_rows(X: np.ndarray, name: str = "x") -> np.ndarray:
    """Rows of float32 X (N, D) scaled to unit norm; a zero row is a ValueError."""
    if not len(X):
        return X
    norms = np.linalg.norm(X, axis=1)
    zero = np.flatnonzero(norms == 0)
    if len(zero):
        raise ValueError(f"{name} holds {len(zero)} zero vector(s) (first: row {zero[0]}): "
                         "metric='cosine' needs a direction; drop them")
    return np.ascontiguousarray(X / norms[:, None], dtype=np.float32)


def f32(a, name, ndim):
    """a as a C-contiguous float32 array of ndim dimensions, all finite."""
    arr = np.ascontiguousarray(a, dtype=np.float32)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return arr


def pair(p, name, ndim):
    """A part given per half: None, or a tuple of two f32 arrays."""
    if p is None:
        return None
    if len(p) != 2:
        raise ValueError(f"{name} must hold two arrays, one per half; got {len(p)}")
    return (f32(p[0], name, ndim), f32(p[1], name, ndim))


def same(a, b) -> bool:
    """Whether two parts (arrays, nested sequences of arrays, or None) are equal."""
    if a is None or b is None:
        return a is b
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
