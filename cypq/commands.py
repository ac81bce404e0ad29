"""What each ``cypq`` subcommand does (cli.py parses the command line and calls these): reading
inputs, training, bulk loading, adding, searching, describing, benchmarking and operating an
index. Every function takes the parsed arguments and a line printer and returns the exit
status."""
from __future__ import annotations

import os
import pickle
import shutil
import sys
import time

import numpy as np

EXIT_PROBLEMS = 1


class UserError(Exception):
    """An error the user can fix; printed as one line, no traceback."""


# ---------------------------------------------------------------------------- inputs
def search_filter(args) -> dict:
    """Index.search's filter arguments from --tags-any/--tags-all/--tags-none (a mask, e.g.
    5 or 0x5, or comma-separated names), --ids-file, --exclude-ids-file and --plan."""
    out = {"plan": args.plan}
    for name in ("any", "all", "none"):
        text = getattr(args, f"tags_{name}")
        if text is not None:
            try:
                out[f"tags_{name}"] = np.uint64(int(text, 0))
            except ValueError:
                out[f"tags_{name}"] = [t.strip() for t in text.split(",") if t.strip()]
    for key, path in (("ids", args.ids_file), ("exclude_ids", args.exclude_ids_file)):
        if path:
            if not os.path.exists(path):
                raise UserError(f"no such ids file: {path}")
            out[key] = np.load(path)
    return out



def load_model(path: str):
    """A model from a .lopq protobuf file, a pickle, or an index directory."""
    from .index import Index
    from .lopq import LOPQModel
    if os.path.isdir(path):
        with Index.open(path, readonly=True, allow_incomplete=True) as index:
            return index.model
    if not os.path.exists(path):
        raise UserError(f"no such model file: {path}")
    if path.endswith((".pkl", ".pickle")):
        with open(path, "rb") as f:
            try:
                model = pickle.load(f)
            except Exception as e:
                raise UserError(f"{path}: not a readable pickle ({e})") from None
        if not isinstance(model, LOPQModel):
            raise UserError(f"{path} holds a {type(model).__name__}, not a cypq.LOPQModel")
        return model
    return LOPQModel.load_proto(path)


def read_queries(spec: str) -> np.ndarray:
    """Queries (nq, D) float32 from a vector file, or '-' for text on stdin (one vector per
    line, numbers separated by spaces or commas)."""
    from .vector_files import open_vector_file
    if spec == "-":
        rows = []
        for lineno, line in enumerate(sys.stdin, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append([float(t) for t in line.replace(",", " ").split()])
            except ValueError:
                raise UserError(f"stdin line {lineno}: not a list of numbers") from None
        if not rows:
            raise UserError("no queries on stdin")
        if len({len(r) for r in rows}) > 1:
            raise UserError("stdin queries have different lengths")
        return np.asarray(rows, dtype=np.float32)
    return np.asarray(open_vector_file(spec), dtype=np.float32)


def _is_code_input(spec: str) -> bool:
    if spec.endswith(".parquet"):
        return True
    return os.path.isdir(spec) and any(f.endswith(".parquet") for f in os.listdir(spec))


def open_input(spec: str):
    """A VectorSource, or a CodeSource for Parquet codes written by ``cypq.spark.encode``."""
    if _is_code_input(spec):
        from .code_files import CodeSource
        return CodeSource.open(spec)
    from .vector_files import VectorSource
    return VectorSource.open(spec)


def _train_from(source, args, out):
    """A model trained on a sample of a VectorSource with the train options of args."""
    from .lopq import LOPQModel
    from .lopq_parts import choose_auto
    if args.M is None:
        raise UserError("training needs --M (the code size: M bytes per vector with S=256)")
    X = source.sample(args.sample, seed=args.seed)
    model = LOPQModel(V=args.V, M=args.M, subquantizer_clusters=args.S, pca=args.pca,
                      pca_dim=args.pca_dim, metric=args.metric, n_threads=args.threads)
    choose_auto(model, *X.shape)   # to say what was chosen before the long part
    out(f"training LOPQ (V={model.V}, M={args.M}, S={args.S}, metric={args.metric}, "
        f"pca={'to ' + str(model.pca_dim) if model.pca_dim else bool(model.pca)}) on "
        f"{len(X):,} vectors of {len(source):,}")
    t0 = time.perf_counter()
    model.fit(
        X, kmeans_coarse_iters=args.coarse_iters, kmeans_local_iters=args.local_iters,
        random_state=args.seed, verbose=args.verbose,
        progress=None if args.verbose or getattr(args, "quiet", False) else
        (lambda line: out("  " + line)))
    out(f"trained in {time.perf_counter() - t0:.1f} s")
    return model


def _save_model(model, path: str) -> None:
    if path.endswith((".pkl", ".pickle")):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(model, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    else:
        model.export_proto(path)


def _check_output(path: str, option: str) -> None:
    """Refuse an output file that could not be written, before the work that would fill it."""
    if os.path.isdir(path):
        raise UserError(f"{option} {path} is a directory: give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{option} {path}: no such directory {folder}")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{option} {path}: the directory {folder} is not writable")


# ---------------------------------------------------------------------------- commands
def cmd_train(args, out) -> int:
    from .vector_files import VectorSource
    _check_output(args.output, "-o")
    source = VectorSource.open(args.input)
    model = _train_from(source, args, out)
    _save_model(model, args.output)
    out(f"wrote {args.output}")
    return 0


def cmd_build(args, out) -> int:
    from .bulk import bulk_load
    source = open_input(args.input)
    model = load_model(args.model) if args.model else None
    if model is None and not args.train and not os.path.isdir(args.index):
        raise UserError("give --model FILE, or --train with --V and --M")
    if model is None and args.train and not hasattr(source, "sample"):
        raise UserError("--train needs vectors as input, not codes")
    target = args.index
    if args.shards:   # the whole index first (resumable), then split, then the whole removed
        from .shard_set import shard_dirs
        target = os.path.join(args.index, ".whole")
        if shard_dirs(args.index) and not os.path.isdir(target):
            raise UserError(f"{args.index} already holds a shard set: build into a new "
                            "directory")
    summary = bulk_load(target, source, model=model,
                        train=(lambda: _train_from(source, args, out)) if args.train else None,
                        ids=args.ids, chunk_size=args.chunk, n_threads=args.threads,
                        progress=not args.quiet, out=out, pack_codes=args.pack,
                        vectors=args.vectors, tags=args.tags)
    if args.shards:
        from .index import Index
        from .shards import split
        for d in shard_dirs(args.index):   # an interrupted split's: made again
            shutil.rmtree(d)
        with Index.open(target, readonly=True) as whole:
            split(whole, args.index, args.shards, step=args.chunk).close()
        shutil.rmtree(target)
        out(f"split into {args.shards} shards (Index.open / cypq search of {args.index} "
            "reads them as one index)")
    out(f"built {args.index}")
    for line in summary.lines():
        out("  " + line)
    return 0


def cmd_rebuild(args, out) -> int:
    from .index import Index
    from .rebuild import rebuild
    model = load_model(args.model) if args.model else None
    with Index.open(args.index, readonly=True, n_threads=args.threads) as index:
        summary = rebuild(index, args.new_index, model, args.sample, chunk_size=args.chunk,
                          n_threads=args.threads, progress=not args.quiet, out=out)
    for text in summary.lines():
        out(text)
    return 0


def cmd_add(args, out) -> int:
    from .index import Index
    from .vector_files import VectorSource, read_ids
    source = VectorSource.open(args.input)
    ids = read_ids(args.ids, len(source)) if args.ids else None
    tags = read_ids(args.tags, len(source), "tags", (1 << 64) - 1) if args.tags else None
    t0 = time.perf_counter()
    with Index.open(args.index, n_threads=args.threads) as index:
        if source.dim != index.model.D:
            raise UserError(f"the vectors have dimension {source.dim} but the index's model "
                            f"expects {index.model.D}")
        first = last = None
        for a, X in source.chunks(args.batch):
            got = index.add(X, None if ids is None else np.asarray(ids[a:a + len(X)]),
                            replace=args.replace, tags=None if tags is None else np.asarray(
                                tags[a:a + len(X)], dtype=np.uint64))
            if len(got):
                first = got[0] if first is None else first
                last = got[-1]
        total = len(index)
    el = time.perf_counter() - t0
    out(f"added {len(source):,} vectors to {args.index} in {el:.1f} s "
        f"({len(source) / max(el, 1e-9):,.0f} vectors/s); it now holds {total:,}"
        + (f"; ids {first} .. {last}" if ids is None and first is not None else ""))
    return 0


def cmd_search(args, out) -> int:
    from .index import Index
    if args.distances_out and not args.out:
        raise UserError("--distances-out needs --out (the ids); without it the results "
                        "are printed")
    for path, option in ((args.out, "--out"), (args.distances_out, "--distances-out")):
        if path:
            _check_output(path, option)
    Q = read_queries(args.queries)
    with Index.open(args.index, readonly=True, n_threads=args.threads) as index:
        if Q.shape[1] != index.model.D:
            raise UserError(f"the queries have dimension {Q.shape[1]} but the index's model "
                            f"expects {index.model.D}")
        D, I = index.search(Q, k=args.k, quota=args.quota, w=args.w, rerank=args.rerank,
                            **search_filter(args))
    if args.out:
        np.save(args.out, I)
        if args.distances_out:
            np.save(args.distances_out, D)
        out(f"wrote ids {I.shape} to {args.out}"
            + (f" and distances to {args.distances_out}" if args.distances_out else ""))
        return 0
    for q in range(len(I)):
        keep = I[q] >= 0
        out(f"{q}\t" + " ".join(f"{i}:{d:.6g}" for i, d in zip(I[q][keep], D[q][keep])))
    return 0


def cmd_info(args, out) -> int:
    model = load_model(args.path)
    out(f"model: {model!r}")
    out(f"  dimension {model.D}, V={model.V} ({model.V ** 2:,} cells), M={model.M}, "
        f"{model.subquantizer_clusters} codewords per subquantizer, PCA "
        f"{'on' if model.pca_matrix is not None else 'off'}, trained: {model.is_trained}")
    if os.path.isdir(args.path):
        from .index import Index
        try:
            with Index.open(args.path, readonly=True) as index:
                st, packed, width = index.stats(), index.packed, index.storage.code_width
                kept = index.vector_kind
                tags = index.storage.keeps_tags and (index.tag_names or "unnamed bits")
                shard = index.shard
        except ValueError as e:
            out(f"index: {e}")
            return 0
        out(f"index: {st['vectors']:,} vectors in {st['non_empty_cells']:,} non-empty cells, "
            f"largest cell {st['largest_cell']:,}, {st['bytes_on_disk'] / 1e6:.1f} MB on disk")
        out("  codes: " + (f"4-bit, two per byte ({width} bytes per vector)" if packed
                           else f"{width} x {np.dtype(model.fine_code_dtype).name}"))
        out(f"  vectors: {'kept as ' + kept if kept is not None else 'not kept'}")
        out(f"  tags: {', '.join(tags) if isinstance(tags, list) else tags or 'not kept'}")
        if st.get("shards"):
            out(f"  a shard set of {st['shards']} shards, searched as one index")
        if shard is not None:
            out(f"  shard {shard['number']} of {shard['count']} of a set, owning cells "
                f"{shard['cells'][0]}..{shard['cells'][1] - 1}")
        if st.get("staged") or st.get("merge_pending"):
            pending = "; a merge is under way (adds go on with it; `Index.merge()` finishes it)" \
                if st["merge_pending"] else ""
            out(f"  {st['staged']:,} of them staged by recent adds (moved into their cells' "
                f"blocks when the stage fills, or by Index.merge){pending}")
    return 0


def cmd_export(args, out) -> int:
    _check_output(args.output, "-o")
    model = load_model(args.path)
    _save_model(model, args.output)
    out(f"wrote {args.output}")
    return 0


def cmd_bench(args, out) -> int:
    from .index import Index
    if args.plot:
        _check_output(args.plot, "--plot")
    Q = read_queries(args.queries)
    gt = np.asarray(read_queries(args.groundtruth) if not args.groundtruth.endswith(".npy")
                    else np.load(args.groundtruth), dtype=np.int64)
    if gt.ndim != 2 or len(gt) != len(Q):
        raise UserError(f"groundtruth must have one row per query ({len(Q)}), got shape "
                        f"{gt.shape}")
    rows = []
    with Index.open(args.index, readonly=True, n_threads=args.threads) as index:
        if Q.shape[1] != index.model.D:
            raise UserError(f"the queries have dimension {Q.shape[1]} but the index's model "
                            f"expects {index.model.D}")
        k = max(args.k, 1)
        filt = search_filter(args)
        out(f"{len(Q)} queries, k={k}, {index.n_threads or 'all'} threads"
            + (f", re-ranking {args.rerank}" if args.rerank else ""))
        out("| quota | recall@1 | recall@10 | recall@100 | ms/query |")
        out("|---|---|---|---|---|")
        for quota in args.quotas:
            index.search(Q[:10], k=k, quota=quota, rerank=args.rerank, **filt)  # warm up
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                _, I = index.search(Q, k=k, quota=quota, rerank=args.rerank, **filt)
                best = min(best, time.perf_counter() - t0)
            rec = [float(np.mean((I[:, :R] == gt[:, :1]).any(axis=1))) if R <= k else
                   float("nan") for R in (1, 10, 100)]
            ms = best / len(Q) * 1e3
            rows.append((quota, *rec, ms))
            out(f"| {quota} | " + " | ".join(f"{r:.3f}" for r in rec) + f" | {ms:.3f} |")
    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            out("matplotlib is not installed: no plot written (pip install matplotlib)")
            return 0
        fig, ax = plt.subplots(figsize=(6, 4))
        ms = [r[4] for r in rows]
        for j, R in enumerate((1, 10, 100)):
            if R <= args.k:
                ax.plot(ms, [r[1 + j] for r in rows], marker="o", label=f"recall@{R}")
        for r in rows:
            ax.annotate(str(r[0]), (r[4], r[2]), fontsize=7)
        ax.set_xlabel("ms / query")
        ax.set_ylabel("recall")
        ax.set_title(f"cypq {os.path.basename(os.path.normpath(args.index))}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        out(f"wrote {args.plot}")
    return 0


def cmd_verify(args, out) -> int:
    from .index import Index
    with Index.open(args.index, readonly=True) as index:
        problems = index.verify()
        n = len(index) if not problems else None
    for line in problems:
        out(line)
    if problems:
        return EXIT_PROBLEMS
    out(f"{args.index}: sound ({n:,} vectors)")
    return 0


def cmd_backup(args, out) -> int:
    from .index import Index
    t0 = time.perf_counter()
    with Index.open(args.index, readonly=True) as index:
        if args.command == "compact":
            index.compact(args.output).close()
        elif args.command == "split":
            from .shards import split
            split(index, args.output, args.shards).close()
        else:
            index.backup(args.output)
    before, after = _disk_bytes(args.index), _disk_bytes(args.output)
    out(f"wrote {args.output} in {time.perf_counter() - t0:.1f} s: {after / 1e6:.1f} MB "
        f"({before / 1e6:.1f} MB before)")
    return 0


def _disk_bytes(path: str) -> int:
    """Bytes of the files of an index or of a shard set's shards."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def cmd_demo(args, out) -> int:
    from .demo import run, write_sample
    if args.write_sample:
        write_sample(args.write_sample, out=out)
        return 0
    run(args.dir, out=out)
    return 0
