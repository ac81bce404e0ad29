"""How often a query's nearest neighbour lies in the cells a search visits: LOPQ's multi-index
(V x V cells, listed by the search's own multi-sequence walk until they hold a quota of
entries) against faiss's IVF lists (the nprobe nearest of nlist), over the same base, codes
aside.

    python tools/cell_reach.py [--data ../shared/data/manminilm] [--M 48] [--S 16]
                               [--V 16 32] [--nlist 256 1024] [--nq 1000]

Per setting: the entries of a query's visited cells (mean over the queries) and the share of
queries whose true nearest neighbour is among them, which bounds recall@R for every R
whatever the codes; a search that must scan more entries for the same share pays for it at
every code size. LOPQ models as LOPQModel(V, M, S) trains them (its PCA included; no --V:
the V it chooses), faiss's lists as IVF{nlist},Flat trains them. L2 only.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _data import load_set  # noqa: E402
from bench_embeddings import MINILM  # noqa: E402
from bench_lopq import faiss  # noqa: E402

import cypq  # noqa: E402
from cypq.direct_scan import list_shape  # noqa: E402
from cypq.search import cell_lists  # noqa: E402

QUOTAS = [250, 500, 1000, 2000, 4000, 8000, 16000]
NPROBE = [1, 2, 4, 8, 16, 32, 64]


def lopq_rows(model, xb, xq, nn, quotas, step=256):
    """Rows of one LOPQ model: the cells the search itself lists (cypq.search.cell_lists,
    its multi-sequence walk), ``step`` queries at a time."""
    V = model.V
    cells = model.predict_coarse(xb).astype(np.int64)
    sizes = np.bincount(cells[:, 0] * V + cells[:, 1], minlength=V * V).astype(np.int64)
    Q, view = model.to_model_space(xq), model.kernel_view()
    target = cells[nn, 0] * V + cells[nn, 1]
    for q in quotas:
        cap = list_shape(V * V, q, None)[0]
        held = reached = 0
        for q0 in range(0, len(Q), step):
            flat, n_cells, _ = cell_lists(view, np.ascontiguousarray(Q[q0:q0 + step]), sizes,
                                          q, None, cap, 1)
            owner = np.repeat(np.arange(len(n_cells)), n_cells)
            held += int(sizes[flat].sum())
            reached += len(np.unique(owner[flat == target[q0 + owner]]))
        yield f"LOPQ V={V} ({model.pca_dim or model.D}-d)", f"quota={q}", \
            (held / len(Q), reached / len(Q))


def ivf_rows(nlist, xt, xb, xq, nn):
    """Rows of faiss's IVF{nlist} lists: the nprobe nearest centroids' lists."""
    index = faiss.index_factory(xb.shape[1], f"IVF{nlist},Flat")
    index.train(xt)
    lists = index.quantizer.search(xb, 1)[1][:, 0]
    sizes = np.bincount(lists, minlength=nlist)
    order = index.quantizer.search(xq, nlist)[1]
    rank = (order == lists[nn][:, None]).argmax(1)
    held = np.cumsum(sizes[order], 1)
    for p in NPROBE:
        yield f"faiss IVF{nlist}", f"nprobe={p}", (float(held[:, p - 1].mean()),
                                                    float(np.mean(rank < p)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=MINILM)
    p.add_argument("--M", type=int, default=48)
    p.add_argument("--S", type=int, default=16)
    p.add_argument("--V", type=int, nargs="*", default=[None])
    p.add_argument("--nlist", type=int, nargs="*", default=[256, 1024])
    p.add_argument("--quotas", type=int, nargs="+", default=QUOTAS)
    p.add_argument("--nq", type=int, default=1000)
    args = p.parse_args(argv)
    xt, xb, xq, gt = load_set(args.data, args.nq)
    nn = gt[:, 0]
    print(f"{os.path.basename(os.path.normpath(args.data))}: base {xb.shape}, {len(xq)} "
          f"queries\n\n| partition | setting | entries visited / query | NN in them |\n"
          f"|---|---|---|---|")
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (training's notes on small clusters)
        for V in args.V:
            model = cypq.LOPQModel(V=V, M=args.M, subquantizer_clusters=args.S)
            rows += lopq_rows(model.fit(xt, random_state=1), xb, xq, nn, args.quotas)
    if faiss is not None:
        for nlist in args.nlist:
            rows += ivf_rows(nlist, xt, xb, xq, nn)
    for system, setting, (held, share) in rows:
        print(f"| {system} | {setting} | {held:.0f} | {share:.3f} |")


if __name__ == "__main__":
    main()
