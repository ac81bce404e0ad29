"""The ``cypq`` command: train, build, add, search, info, export, bench, verify, backup,
compact, demo.

Every subcommand has ``--help``. A user error (bad file, wrong shape, missing index, ...) ends
with a one-line message on stderr and exit status 2 (set CYPQ_DEBUG=1 for the traceback);
Ctrl-C with status 130.
"""
from __future__ import annotations

import argparse
import errno
import functools
import os
import pickle
import sys
import time
import warnings
from typing import Optional, Sequence

import numpy as np

EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An error the user can fix; printed as one line, no traceback."""


def _count(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _quota(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


# ---------------------------------------------------------------------------- inputs
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
    if args.V is None or args.M is None:
        raise UserError("training needs --V and --M")
    X = source.sample(args.sample, seed=args.seed)
    out(f"training LOPQ (V={args.V}, M={args.M}, S={args.S}, pca={args.pca}) on "
        f"{len(X):,} vectors of {len(source):,}")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tiny local clusters: identity
        model = LOPQModel(V=args.V, M=args.M, subquantizer_clusters=args.S, pca=args.pca,
                          n_threads=args.threads).fit(
            X, kmeans_coarse_iters=args.coarse_iters, kmeans_local_iters=args.local_iters,
            random_state=args.seed, verbose=args.verbose)
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


# ---------------------------------------------------------------------------- commands
def cmd_train(args, out) -> int:
    from .vector_files import VectorSource
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
    summary = bulk_load(args.index, source, model=model,
                        train=(lambda: _train_from(source, args, out)) if args.train else None,
                        ids=args.ids, chunk_size=args.chunk, n_threads=args.threads,
                        progress=not args.quiet, out=out)
    out(f"built {args.index}")
    for line in summary.lines():
        out("  " + line)
    return 0


def cmd_add(args, out) -> int:
    from .index import Index
    from .vector_files import VectorSource, read_ids
    source = VectorSource.open(args.input)
    ids = read_ids(args.ids, len(source)) if args.ids else None
    t0 = time.perf_counter()
    with Index.open(args.index, n_threads=args.threads) as index:
        if source.dim != index.model.D:
            raise UserError(f"the vectors have dimension {source.dim} but the index's model "
                            f"expects {index.model.D}")
        first = last = None
        for a, X in source.chunks(args.batch):
            got = index.add(X, None if ids is None else np.asarray(ids[a:a + len(X)]),
                            replace=args.replace)
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
    Q = read_queries(args.queries)
    with Index.open(args.index, readonly=True, n_threads=args.threads) as index:
        if Q.shape[1] != index.model.D:
            raise UserError(f"the queries have dimension {Q.shape[1]} but the index's model "
                            f"expects {index.model.D}")
        D, I = index.search(Q, k=args.k, quota=args.quota, w=args.w)
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
                st = index.stats()
        except ValueError as e:
            out(f"index: {e}")
            return 0
        out(f"index: {st['vectors']:,} vectors in {st['non_empty_cells']:,} non-empty cells, "
            f"largest cell {st['largest_cell']:,}, {st['bytes_on_disk'] / 1e6:.1f} MB on disk")
        if st.get("staged") or st.get("merge_pending"):
            pending = "; a merge was cut short, the next write finishes it" \
                if st["merge_pending"] else ""
            out(f"  {st['staged']:,} of them staged by recent adds (moved into their cells' "
                f"blocks when the stage fills, or by Index.merge){pending}")
    return 0


def cmd_export(args, out) -> int:
    model = load_model(args.path)
    _save_model(model, args.output)
    out(f"wrote {args.output}")
    return 0


def cmd_bench(args, out) -> int:
    from .index import Index
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
        out(f"{len(Q)} queries, k={k}, {index.n_threads or 'all'} threads")
        out("| quota | recall@1 | recall@10 | recall@100 | ms/query |")
        out("|---|---|---|---|---|")
        for quota in args.quotas:
            index.search(Q[:10], k=k, quota=quota)  # warm up
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                _, I = index.search(Q, k=k, quota=quota)
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
        else:
            index.backup(args.output)
    before = os.path.getsize(os.path.join(args.index, "data.mdb"))
    after = os.path.getsize(os.path.join(args.output, "data.mdb"))
    out(f"wrote {args.output} in {time.perf_counter() - t0:.1f} s: {after / 1e6:.1f} MB "
        f"({before / 1e6:.1f} MB before)")
    return 0


def cmd_demo(args, out) -> int:
    from .demo import run, write_sample
    if args.write_sample:
        write_sample(args.write_sample, out=out)
        return 0
    run(args.dir, out=out)
    return 0


# ---------------------------------------------------------------------------- parser
def _train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--V", type=_count, help="coarse centroids per half (V^2 cells)")
    g.add_argument("--M", type=_count, help="fine subquantizers (bytes per code with S=256)")
    g.add_argument("--S", type=_count, default=256, help="codewords per subquantizer")
    g.add_argument("--sample", type=_count, default=100_000,
                   help="training vectors drawn from the input")
    g.add_argument("--pca", action="store_true", help="PCA + balanced halves before training")
    g.add_argument("--seed", type=int, default=0, help="random seed (same seed, same model)")
    g.add_argument("--coarse-iters", type=_count, default=10,
                   help="k-means iterations of the coarse quantizers")
    g.add_argument("--local-iters", type=_count, default=20,
                   help="k-means iterations of the fine subquantizers")
    g.add_argument("--verbose", action="store_true", help="print training progress")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, except where there is none to show."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or \
                "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(
        prog="cypq", description="LOPQ models and on-disk inverted multi-indexes.",
        epilog="Vector files: .npy (N, D), .fvecs, .bvecs, .ivecs, or a directory / glob of "
               "them (read in name order). Run `cypq demo` for a one-minute tour.")
    p.add_argument("--version", action="version", version=f"cypq {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=_Help)
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=_count, default=None,
                         help="threads of the kernels (default: all cores)")

    s = sub.add_parser("train", parents=[threads], help="train an LOPQ model on vectors",
                       description="Train an LOPQ model on a sample of the input.")
    s.add_argument("input", help="vector file, directory or glob")
    s.add_argument("-o", "--output", required=True, help="model file (.lopq, or .pkl)")
    _train_options(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("build", parents=[threads], help="bulk-load a new on-disk index",
                       description="Bulk-load a new on-disk index from vectors or Spark codes: "
                       "streams the input in chunks, encodes with all cores, writes LMDB in key "
                       "order. Interrupted, the same command continues where it stopped.")
    s.add_argument("index", help="index directory (new, or an unfinished build to resume)")
    s.add_argument("input", help="vector file / directory / glob, or Parquet codes from "
                   "cypq.spark.encode")
    s.add_argument("--model", help="trained model (.lopq, .pkl, or an index directory)")
    s.add_argument("--train", action="store_true", help="train a model on a sample of the input")
    s.add_argument("--ids", help=".npy of int64 ids, one per vector (default: row numbers)")
    s.add_argument("--chunk", type=_count, default=200_000,
                   help="vectors per chunk; memory is bounded by this")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _train_options(s)
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("add", parents=[threads], help="add vectors to an existing index",
                       description="Encode vectors and add them to an index, one transaction "
                       "per batch.")
    s.add_argument("index")
    s.add_argument("input", help="vector file, directory or glob")
    s.add_argument("--ids", help=".npy of int64 ids (default: continue after the largest id)")
    s.add_argument("--batch", type=_count, default=10_000, help="vectors per transaction")
    s.add_argument("--replace", action="store_true", help="overwrite ids already present")
    s.set_defaults(func=cmd_add)

    s = sub.add_parser("search", parents=[threads], help="search an index",
                       description="Search an index. Prints one line per query: its number, "
                       "then id:distance pairs, nearest first; or writes .npy files.")
    s.add_argument("index")
    s.add_argument("queries", help="vector file, or - for text on stdin (one vector per line)")
    s.add_argument("-k", type=_count, default=10, help="results per query")
    s.add_argument("--quota", type=_quota, default=None,
                   help="candidates per query (default: 10000; 0: every cell)")
    s.add_argument("--w", type=_count, default=None, help="cap on cells visited")
    s.add_argument("--out", help="write the ids (nq, k) int64 to this .npy instead of printing")
    s.add_argument("--distances-out", help="with --out: write the distances here too")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("info", help="describe a model file or an index",
                       description="Print a model's shape, and an index's statistics.")
    s.add_argument("path", help="index directory or model file")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("export", help="write a model as an LOPQ protobuf file",
                       description="Write the model of an index or of a model file to .lopq "
                       "(LOPQ's protobuf) or .pkl.")
    s.add_argument("path", help="index directory or model file")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("bench", parents=[threads], help="recall and speed against ground truth",
                       description="Search with several quotas, print recall@1/10/100 and "
                       "ms/query, optionally plot recall vs ms/query (needs matplotlib).")
    s.add_argument("index")
    s.add_argument("queries", help="vector file")
    s.add_argument("groundtruth", help=".npy or .ivecs: true neighbour ids, one row per query")
    s.add_argument("--quotas", type=_quota, nargs="+", default=[1000, 2000, 5000, 10000],
                   help="candidate quotas to search with")
    s.add_argument("-k", type=_count, default=100, help="results per query")
    s.add_argument("--repeat", type=_count, default=3,
                   help="timed runs per quota (the best is kept)")
    s.add_argument("--plot", help="write a recall-vs-ms/query PNG here")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("verify", help="check an index for damage",
                       description="Check every stored value of an index against its layout "
                       "and against the others. Prints one line per problem and exits 1, or "
                       "says the index is sound and exits 0.")
    s.add_argument("index")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("backup", help="copy an index consistently while it is in use",
                       description="Copy one committed state of an index into a new "
                       "directory (LMDB's copy), while writers go on.")
    s.add_argument("index")
    s.add_argument("output", help="new (or empty) directory")
    s.set_defaults(func=cmd_backup)

    s = sub.add_parser("compact", help="write an index anew, compactly",
                       description="Write an index anew into a new directory: entries in "
                       "cell order with full pages, staged entries merged, the id table in id "
                       "order (an incrementally built index shrinks to about the size of a "
                       "bulk-built one). Writers may go on meanwhile; the copy is of one "
                       "committed state.")
    s.add_argument("index")
    s.add_argument("output", help="new (or empty) directory")
    s.set_defaults(func=cmd_backup)

    s = sub.add_parser("demo", help="train, build, search a packaged real sample",
                       description="Train LOPQ on a SIFT sample shipped with cypq, build an "
                       "on-disk index, search it, print recall and ms/query.")
    s.add_argument("--dir", help="build the index here (default: a temporary directory)")
    s.add_argument("--write-sample", metavar="DIR", help="only write the sample as TEXMEX "
                   "files (learn/base/query .bvecs, groundtruth .ivecs) into DIR")
    s.set_defaults(func=cmd_demo)
    return p


def _user_errors() -> tuple:
    import lmdb
    from .bulk import BulkLoadError
    from .model_io import ModelFileError
    from .pq import NotFittedError
    return (UserError, BulkLoadError, ModelFileError, NotFittedError, ValueError, TypeError,
            KeyError, OSError, PermissionError, lmdb.Error)


def main(argv: Optional[Sequence[str]] = None, parser=None) -> int:
    """Run the ``cypq`` command; returns the exit status."""
    args = (parser or build_parser()).parse_args(argv)

    def out(line: str) -> None:
        print(line, flush=True)
    try:
        return args.func(args, out)
    except BrokenPipeError:  # `cypq search ... | head`: the reader left, not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("cypq: interrupted (a `cypq build` continues where it stopped when run again)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as e:
        if os.environ.get("CYPQ_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and "disk" not in msg:
            msg = (f"the disk is full ({e}): nothing that was acknowledged is lost; free some "
                   "space and run the same command again (`cypq build` continues where it "
                   "stopped)")
        print(f"cypq {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


def bulk_load_main(argv: Optional[Sequence[str]] = None) -> int:
    """``cypq-bulk-load``: the same as ``cypq build``."""
    parser = build_parser()
    build = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    build.choices["build"].prog = "cypq-bulk-load"
    return main(["build", *(sys.argv[1:] if argv is None else argv)], parser)


if __name__ == "__main__":
    raise SystemExit(main())
