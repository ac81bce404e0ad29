"""Pure NumPy/Python reference of LOPQ search: LOPQ's multi-sequence rule and ADC scoring."""
import heapq

import numpy as np


def multisequence(model, q):
    """Cells (c0, c1) in LOPQ's multi-sequence order for query q (model space)."""
    h = len(q) // 2
    d = [((q[s * h:(s + 1) * h] - model.Cs[s]) ** 2).sum(1) for s in range(2)]
    o = [np.argsort(d[s], kind="stable") for s in range(2)]
    V = model.V
    visited = set()
    heap = [(d[0][o[0][0]] + d[1][o[1][0]], 0, 0)]
    while heap:
        dist, i, j = heapq.heappop(heap)
        visited.add((i, j))
        yield int(o[0][i]), int(o[1][j]), dist
        if i + 1 < V and (j == 0 or (i + 1, j - 1) in visited):
            heapq.heappush(heap, (d[0][o[0][i + 1]] + d[1][o[1][j]], i + 1, j))
        if j + 1 < V and (i == 0 or (i - 1, j + 1) in visited):
            heapq.heappush(heap, (d[0][o[0][i]] + d[1][o[1][j + 1]], i, j + 1))


def adc(model, q, coarse, fine):
    """LOPQ's asymmetric distance of query q (model space) to one code."""
    h = len(q) // 2
    subs = list(model.subquantizers[0]) + list(model.subquantizers[1])
    ds = subs[0].shape[1]
    total = 0.0
    for s in range(2):
        c = coarse[s]
        px = model.Rs[s][c] @ (q[s * h:(s + 1) * h] - model.Cs[s][c] - model.mus[s][c])
        for m in range(model.M // 2):
            mm = s * (model.M // 2) + m
            total += ((px[m * ds:(m + 1) * ds] - subs[mm][fine[mm]]) ** 2).sum()
    return total


def search(model, entries, q, k, quota, passes=None):
    """entries: dict cell_id -> list of (id, coarse, fine). Returns (top-k dists, top-k ids,
    cells visited, candidates, {id: dist} of every candidate). ``passes(id)``: a filter;
    only entries that pass are candidates, and count towards the quota."""
    cand, n_cells = [], 0
    for c0, c1, _ in multisequence(model, q):
        n_cells += 1
        cand += [e for e in entries.get(c0 * model.V + c1, [])
                 if passes is None or passes(e[0])]
        if quota > 0 and len(cand) >= quota:
            break
    every = {i: adc(model, q, co, fi) for i, co, fi in cand}
    scored = sorted((s, i) for i, s in every.items())[:k]
    return [s for s, _ in scored], [i for _, i in scored], n_cells, len(cand), every


def entries_by_cell(model, X, ids):
    """The entries dict search() takes, for vectors X stored under ids."""
    code = model.predict(X)
    entries = {}
    for i, c, f in zip(ids, code.coarse, code.fine):
        entries.setdefault(int(c[0]) * model.V + int(c[1]), []).append((int(i), c, f))
    return entries


def assert_search_matches(index, model, X, ids, Q, k, quota):
    """index.search(Q, k, quota) over X stored under ids, against search(): the distances,
    and every id returned is a candidate at the distance returned (ids differ only on ties)."""
    D, I = index.search(Q, k=k, quota=quota)
    entries = entries_by_cell(model, X, ids)
    for qi, q in enumerate(Q):
        dists, _, _, _, every = search(model, entries, q, k, quota)
        np.testing.assert_allclose(D[qi], dists, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose([every[int(i)] for i in I[qi]], D[qi], rtol=1e-4, atol=1e-3)
