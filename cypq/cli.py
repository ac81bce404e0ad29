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
import sys
from typing import Optional, Sequence

from .commands import (UserError, cmd_add, cmd_backup, cmd_bench, cmd_build, cmd_demo,
                       cmd_export, cmd_info, cmd_rebuild, cmd_search, cmd_train,
                       cmd_verify)
from .stored_vectors import VECTOR_KINDS

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _whole(minimum: int):
    """argparse type: a whole number of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


_count, _quota = _whole(1), _whole(0)


# ---------------------------------------------------------------------------- parser
def _train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--V", type=_count, help="coarse centroids per half (V^2 cells; default: "
                   "the largest power of two <= training vectors / (64 f) (/ (512 sqrt(f)) "
                   "with --S 16), f = max(1, dimension / 128), within 8..1024)")
    g.add_argument("--M", type=_count, help="fine subquantizers (bytes per code: M with S=256, "
                   "M/2 with S=16)")
    g.add_argument("--S", type=_count, default=256, help="codewords per subquantizer (16: "
                   "4-bit codes, stored two per byte and scanned fastest)")
    g.add_argument("--sample", type=_count, default=100_000,
                   help="training vectors drawn from the input")
    g.add_argument("--pca", action=argparse.BooleanOptionalAction, default=None,
                   help="PCA + balanced halves before training (default: to about D/3 from 256 "
                   "dimensions on, else none)")
    g.add_argument("--metric", choices=("l2", "cosine", "ip"), default="l2",
                   help="how vectors are compared (cosine: scaled to unit norm first; ip: "
                   "inner product, largest first)")
    g.add_argument("--pca-dim", type=_count, default=None,
                   help="keep this many leading PCA directions (implies --pca)")
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
    filters = argparse.ArgumentParser(add_help=False)
    for name, what in (("any", "any of"), ("all", "all of"), ("none", "none of")):
        filters.add_argument(f"--tags-{name}", metavar="BITS", default=None,
                             help=f"only entries whose tags have {what} these bits: a mask "
                             "(e.g. 5 or 0x5) or tag names, comma-separated")
    filters.add_argument("--ids-file", help="only entries whose ids are in this .npy")
    filters.add_argument("--exclude-ids-file", help="only entries whose ids are not in this .npy")
    filters.add_argument("--plan", choices=("auto", "scan", "direct"), default="auto",
                         help="how a filtered search finds entries: walk the cells, score the "
                         "passing entries directly, or choose by their number")

    s = sub.add_parser("train", parents=[threads], help="train an LOPQ model on vectors",
                       description="Train an LOPQ model on a sample of the input.")
    s.add_argument("input", help="vector file, directory or glob")
    s.add_argument("-o", "--output", required=True, help="model file (.lopq, or .pkl)")
    s.add_argument("-q", "--quiet", action="store_true", help="no line per training phase")
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
    s.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="4-bit codes two per byte (default: whenever the model's are 4-bit and "
                   "M a multiple of 4; --no-pack: a byte per code, readable by cypq 0.2)")
    s.add_argument("--vectors", choices=("none",) + VECTOR_KINDS, default="none",
                   help="keep each vector too, for exact re-ranking (search --rerank): uint8 "
                   "for byte inputs like SIFT (whole numbers 0..255), float16, float32")
    s.add_argument("--tags", metavar="FILE", help=".npy of one unsigned tag bit set per "
                   "vector: the index keeps tags, for filtered search (search --tags-any ...)")
    s.add_argument("--shards", type=_count, default=None, metavar="N",
                   help="write a shard set: N indexes INDEX/shard-*, each owning a range of "
                   "cells (balanced by entries), opened and searched as one index; needs "
                   "twice the disk space while it splits")
    _train_options(s)
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("rebuild", parents=[threads], help="rebuild an index under a new model",
                       description="Write a new index of the same ids and vectors from the "
                       "vectors an index keeps (built with --vectors), under a model trained "
                       "on a sample of them (or --model). Interrupted, the same command "
                       "continues; the old index stays usable.")
    s.add_argument("index", help="the index to rebuild (it keeps vectors)")
    s.add_argument("new_index", help="directory of the new index")
    s.add_argument("--model", help="use this trained model instead of training one")
    s.add_argument("--sample", type=_count, default=100_000,
                   help="stored vectors to train the new model on")
    s.add_argument("--chunk", type=_count, default=200_000, help="vectors per chunk")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_rebuild)

    s = sub.add_parser("add", parents=[threads], help="add vectors to an existing index",
                       description="Encode vectors and add them to an index, one transaction "
                       "per batch.")
    s.add_argument("index")
    s.add_argument("input", help="vector file, directory or glob")
    s.add_argument("--ids", help=".npy of int64 ids (default: continue after the largest id)")
    s.add_argument("--batch", type=_count, default=10_000, help="vectors per transaction")
    s.add_argument("--replace", action="store_true", help="overwrite ids already present")
    s.add_argument("--tags", metavar="FILE", help=".npy of one unsigned tag bit set per vector "
                   "(an index made without tags keeps them from then on, all zero before)")
    s.set_defaults(func=cmd_add)

    s = sub.add_parser("search", parents=[threads, filters], help="search an index",
                       description="Search an index. Prints one line per query: its number, "
                       "then id:distance pairs, nearest first; or writes .npy files.")
    s.add_argument("index")
    s.add_argument("queries", help="vector file, or - for text on stdin (one vector per line)")
    s.add_argument("-k", type=_count, default=10, help="results per query")
    s.add_argument("--quota", type=_quota, default=None,
                   help="candidates per query (default: 10000; 0: every cell)")
    s.add_argument("--w", type=_count, default=None, help="cap on cells visited")
    s.add_argument("--rerank", type=_count, default=None,
                   help="re-rank this many best candidates (>= k) exactly with the vectors "
                   "the index keeps (built with --vectors)")
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

    s = sub.add_parser("bench", parents=[threads, filters],
                       help="recall and speed against ground truth",
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
    s.add_argument("--rerank", type=_count, default=None,
                   help="re-rank this many best candidates (>= k) exactly with the stored "
                   "vectors")
    s.add_argument("--plot", help="write a recall-vs-ms/query PNG here")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("verify", help="check an index for damage",
                       description="Check every stored value of an index against its layout "
                       "and against the others. Prints one line per problem and exits 1, or "
                       "says the index is sound and exits 0.")
    s.add_argument("index")
    s.set_defaults(func=cmd_verify)

    copies = {"backup": ("copy an index consistently while it is in use",
                         "Copy one committed state of an index into a new directory (LMDB's "
                         "copy), while writers go on."),
              "compact": ("write an index anew, compactly",
                          "Write an index anew into a new directory: entries in cell order "
                          "with full pages, staged entries merged, the id table in id order "
                          "(an incrementally built index shrinks to about the size of a "
                          "bulk-built one). Writers may go on meanwhile; the copy is of one "
                          "committed state."),
              "split": ("write an index as a shard set",
                        "Write an index as N indexes OUTPUT/shard-*, each owning a range of "
                        "cells (balanced by entries), from one committed state; Index.open / "
                        "cypq search of OUTPUT reads them as one index, cypq.spark.search "
                        "scans each where it is.")}
    for name, (summary, description) in copies.items():
        s = sub.add_parser(name, help=summary, description=description)
        s.add_argument("index")
        s.add_argument("output", help="new (or empty) directory; missing parents are made")
        if name == "split":
            s.add_argument("--shards", type=_count, required=True, metavar="N")
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
