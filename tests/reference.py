"""Plain NumPy references of every kernel, written for clarity, not speed."""
import numpy as np


def encode(X, C):
    M, Ks, Ds = C.shape
    codes = np.empty((len(X), M), dtype=np.int64)
    err = np.zeros(len(X))
    for m in range(M):
        sub = X[:, m * Ds:(m + 1) * Ds].astype(np.float64)
        d = ((sub[:, None, :] - C[m][None, :, :].astype(np.float64)) ** 2).sum(-1)
        codes[:, m] = d.argmin(1)
        err += d.min(1)
    return codes, err


def decode(codes, C):
    M = C.shape[0]
    return np.concatenate([C[m][codes[:, m]] for m in range(M)], axis=1)


def tables(Q, C, ip=False):
    M, Ks, Ds = C.shape
    out = np.empty((len(Q), M, Ks))
    for m in range(M):
        sub = Q[:, m * Ds:(m + 1) * Ds].astype(np.float64)
        if ip:
            out[:, m] = sub @ C[m].T.astype(np.float64)
        else:
            out[:, m] = ((sub[:, None, :] - C[m][None].astype(np.float64)) ** 2).sum(-1)
    return out


def adc(T, codes):
    M = T.shape[0]
    return T[np.arange(M)[None, :], codes].sum(1)


def topk(dist, k):
    """dist (nq, n): the k smallest per row, ascending, padded with inf / -1."""
    nq, n = dist.shape
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    D = np.take_along_axis(dist, order, 1)
    if n < k:
        D = np.concatenate([D, np.full((nq, k - n), np.inf)], 1)
        order = np.concatenate([order, np.full((nq, k - n), -1)], 1)
    return D, order


def update(X, codes, C_old):
    M, Ks, Ds = C_old.shape
    C = C_old.astype(np.float64).copy()
    counts = np.zeros((M, Ks), dtype=np.int64)
    for m in range(M):
        sub = X[:, m * Ds:(m + 1) * Ds].astype(np.float64)
        counts[m] = np.bincount(codes[:, m], minlength=Ks)
        for k in range(Ks):
            if counts[m, k]:
                C[m, k] = sub[codes[:, m] == k].mean(0)
    return C, counts


def kmeanspp(X, col0, Ds, u, first, Ks):
    sub = X[:, col0:col0 + Ds].astype(np.float64)
    picks = [first]
    mind = ((sub - sub[first]) ** 2).sum(1)
    for c in range(1, Ks):
        cum = np.cumsum(mind)
        pick = int(np.searchsorted(cum, u[c] * cum[-1], side="right"))
        picks.append(min(pick, len(X) - 1))
        mind = np.minimum(mind, ((sub - sub[picks[-1]]) ** 2).sum(1))
    return sub[picks]


def exact_scores(Q, X, metric):
    """Scores (nq, n) of every vector X (n, D) for every query Q (nq, D), smaller first:
    squared L2, minus the inner product, or minus the cosine (the queries of unit norm)."""
    Qd, Xd = Q.astype(np.float64), X.astype(np.float64)
    if metric == "l2":
        return ((Qd[:, None, :] - Xd[None, :, :]) ** 2).sum(-1)
    dots = Qd @ Xd.T
    if metric == "ip":
        return -dots
    return -dots / np.linalg.norm(Xd, axis=1)[None, :]
