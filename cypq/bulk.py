"""Offline bulk loading: encode a large input in chunks and write a new on-disk index in key
order, resumably, with memory bounded by the chunk size.

Three passes, each restartable at the last thing committed:

1. *encode*: chunk k of the input (rows ``k * chunk .. (k + 1) * chunk``) is encoded with all
   cores, sorted by cell and written to ``<index>/bulk-runs/run-<k>.npy`` (a temporary file
   renamed when complete). Chunks whose run file exists are skipped.
2. *write*: the sorted runs are merged cell range by cell range (each range holds about one
   chunk of entries) and handed to the storage's bulk writer
   (:meth:`cypq.storage.Storage.bulk_writer`), one step per range; each step also commits
   the next cell to write, so a rerun continues from there.
3. *ids*: the bulk writer completes the storage (for LMDB: the id table, appended in id
   order from what it spilled in pass 2), resumably too.

Until the end the index carries a marker that makes :meth:`cypq.Index.open` refuse it; the
marker also names the input, so a rerun with another input is refused instead of mixed in.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from ._runs import gather, ranges, write_atomic
from .index import Index
from .lopq import LOPQModel
from .storage.base import IndexFormatError
from .stored_vectors import data_ranges
from .vector_files import VectorSource, read_ids

RUNS_DIR = "bulk-runs"
_STATE_VERSION = 1
_FINISHED = -1


class BulkLoadError(ValueError):
    """The bulk load cannot go on as asked (the message says what to do)."""


@dataclass
class BulkSummary:
    """What a bulk load did."""
    vectors: int
    non_empty_cells: int
    bytes_on_disk: int
    seconds: float
    encode_seconds: float
    write_seconds: float
    resumed: bool
    peak_rss_anon_mb: float

    def lines(self) -> list[str]:
        return [f"vectors: {self.vectors:,}",
                f"non-empty cells: {self.non_empty_cells:,}",
                f"bytes on disk: {self.bytes_on_disk:,} ({self.bytes_on_disk / 1e6:.1f} MB)",
                f"time: {self.seconds:.1f} s (encode {self.encode_seconds:.1f} s, write "
                f"{self.write_seconds:.1f} s), {self.vectors / max(self.seconds, 1e-9):,.0f} "
                "vectors/s" + (" [resumed]" if self.resumed else ""),
                f"peak anonymous memory: {self.peak_rss_anon_mb:.0f} MB"]


def rss_anon_mb() -> float:
    """This process's anonymous resident memory in MB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class _Progress:
    """tqdm when available and wanted, otherwise nothing."""

    def __init__(self, enabled: bool, total: int, desc: str, initial: int = 0):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                return
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="vec",
                            unit_scale=True, dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def encoded_chunks(source: VectorSource, model: LOPQModel, chunk: int, ids=None,
                   start: int = 0, keep=None
                   ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, object]]:
    """(first row, ids (n,) int64, cells (n,) int64, fine codes (n, M), vectors) per chunk
    of vectors.

    ``ids``: array-like (N,) (e.g. a memmap) or None for row numbers. ``keep``: how the
    vectors are kept, ``keep(X, first_row)`` (an index's :meth:`cypq.Index.stored_vectors`),
    or None (vectors is None).
    """
    for a, X in source.chunks(chunk, start):
        try:
            code = model.predict(X)
            kept = None if keep is None else keep(X, a)
        except ValueError as e:  # NaN, wrong dimension, a vector the index cannot keep
            raise BulkLoadError(f"input rows {a}..{a + len(X) - 1}: {e}") from None
        cells = model.get_cell_id_for_coarse_codes(code.coarse)
        chunk_ids = (np.arange(a, a + len(X), dtype=np.int64) if ids is None
                     else np.asarray(ids[a:a + len(X)], dtype=np.int64))
        yield a, chunk_ids, cells, code.fine, kept


def bulk_load(path: str | os.PathLike, source, model: Optional[LOPQModel] = None,
              train: Optional[Callable[[], LOPQModel]] = None, ids: Optional[str] = None,
              chunk_size: int = 200_000, n_threads: Optional[int] = None,
              block_capacity: int = 128, progress: bool = True,
              out: Callable[[str], None] = print,
              pack_codes: Optional[bool] = None, vectors: Optional[str] = None,
              tags=None, vector_ranges=None) -> BulkSummary:
    """Build a new on-disk index from a large input, or finish one that was interrupted.

    Parameters
    ----------
    path : str or os.PathLike
        Index directory: new (or empty), or an unfinished bulk load of the same input.
    source : VectorSource or code source
        The vectors (:class:`cypq.vector_files.VectorSource`), or precomputed codes (an
        object with ``identity()``, ``__len__``, ``has_tags`` and ``chunks(size, start,
        code_dtype)`` yielding ``(first row, ids, cells, fine codes, tags or None)``, e.g.
        :class:`cypq.code_files.CodeSource`; codes with tags make an index with tags).
    model : LOPQModel, optional
        Trained model. When resuming, the model inside the index is used (and must equal
        this one if given).
    train : callable, optional
        Returns a trained model; called when neither ``model`` nor an unfinished load gives
        one.
    ids : str or array_like, optional
        A .npy file of N int64 ids, or the ids (N,) themselves (then the source's
        ``identity()`` must cover them, for resuming); vector input only; default: row
        numbers.
    chunk_size : int
        Vectors per chunk: memory use is a small multiple of chunk_size * (D * 4 + 32) bytes.
    n_threads : int, optional
        Threads of the encoder (None: all cores).
    block_capacity : int
        Entries per block of the on-disk index (see :meth:`cypq.Index.create`).
    pack_codes : bool, optional
        4-bit codes two per byte (see :meth:`cypq.Index.create`); a resumed load keeps the
        layout it began with.
    vectors : {None, 'float32', 'float16', 'uint8', 'sq8'}
        Keep each entry's vector (see :meth:`cypq.Index.create`; vector input only); a
        resumed load must be given what it began with.
    vector_ranges : (lo, hi), optional
        The ranges of ``vectors='sq8'`` (default: each dimension's smallest and largest
        value in a sample of 100,000 input vectors).
    tags : str or array_like, optional
        A .npy file of N unsigned tag sets (one uint64 bit set per vector), or the array:
        the index keeps tags (see :meth:`cypq.Index.create`); vector input only.
    progress : bool
        Show tqdm progress bars (vectors/s and ETA).
    out : callable
        Where messages go.

    Returns
    -------
    BulkSummary
    """
    t_start = time.perf_counter()
    path = os.fspath(path)
    if chunk_size < 1:
        raise BulkLoadError("chunk size must be >= 1")
    N = len(source)
    if N == 0:
        raise BulkLoadError("the input holds no vectors: nothing to load")
    ids_arr = None
    if ids is not None:
        if not isinstance(source, VectorSource):
            raise BulkLoadError("an ids file goes with vector input only (codes carry ids)")
        ids_arr = read_ids(ids, N) if isinstance(ids, (str, os.PathLike)) \
            else np.asarray(ids, dtype=np.int64)
        if ids_arr.shape != (N,):
            raise BulkLoadError(f"ids must have shape ({N},), got {ids_arr.shape}")
    tags_arr = None
    if tags is not None:
        if not isinstance(source, VectorSource):
            raise BulkLoadError("a tags file goes with vector input only")
        tags_arr = read_ids(tags, N, "tags", (1 << 64) - 1) if isinstance(
            tags, (str, os.PathLike)) else np.asarray(tags)
        if tags_arr.shape != (N,) or tags_arr.dtype.kind not in "ui":
            raise BulkLoadError(f"tags must be {N} unsigned integers, got {tags_arr.dtype} "
                                f"of shape {tags_arr.shape}")
    vectors = None if vectors == "none" else vectors
    if vectors is not None and not isinstance(source, VectorSource):
        raise BulkLoadError("an index that keeps vectors is built from vector input, not "
                            "from codes")
    identity = {"version": _STATE_VERSION, "input": source.identity(), "rows": N,
                "ids": None if ids_arr is None else "source" if not isinstance(
                    ids, (str, os.PathLike)) else [os.path.abspath(ids), os.path.getsize(ids)],
                "chunk": int(chunk_size), "vectors": vectors,
                "tags": None if tags_arr is None else [os.path.abspath(tags), os.path.getsize(
                    tags)] if isinstance(tags, (str, os.PathLike)) else "source"}
    index, resumed, next_cell = _open_or_create(
        path, identity, model, train, block_capacity, out, pack_codes, vectors,
        tags_arr is not None or getattr(source, "has_tags", False),
        lambda: data_ranges(source.sample(100_000)) if vector_ranges is None else vector_ranges)
    storage = index.storage
    if next_cell == _FINISHED:  # killed after the last commit: only the clean-up was left
        shutil.rmtree(os.path.join(path, RUNS_DIR), ignore_errors=True)
        try:
            st = index.stats()
            return BulkSummary(st["vectors"], st["non_empty_cells"], st["bytes_on_disk"],
                               time.perf_counter() - t_start, 0.0, 0.0, True, rss_anon_mb())
        finally:
            index.close()
    bars = []  # closed however the load ends: no half-drawn bar line after Ctrl-C

    def progress_bar(*args, **kwargs) -> _Progress:
        bars.append(_Progress(progress, *args, **kwargs))
        return bars[-1]
    try:
        model = index.model
        if n_threads is not None:
            model.n_threads = n_threads
        runs_dir = os.path.join(path, RUNS_DIR)
        os.makedirs(runs_dir, exist_ok=True)
        writer = storage.bulk_writer(runs_dir, step=chunk_size)
        n_runs = -(-N // chunk_size)
        run_files = [os.path.join(runs_dir, f"run-{k:06d}.npy") for k in range(n_runs)]
        peak = rss_anon_mb()

        # ---- pass 1: encode into sorted runs
        t0 = time.perf_counter()
        todo = [k for k in range(n_runs) if not os.path.exists(run_files[k])]
        if next_cell is None:  # the write pass has not started
            bar = progress_bar(N, "encode", initial=N - _rows_in(todo, chunk_size, N))
            dtype = _run_dtype(storage)
            for k in todo:
                a = k * chunk_size
                if isinstance(source, VectorSource):
                    _, c_ids, cells, fine, kept = next(iter(encoded_chunks(
                        source, model, chunk_size, ids_arr, a,
                        index.stored_vectors if index.vector_kind else None)))
                    c_tags = None if tags_arr is None else tags_arr[a:a + len(c_ids)]
                else:   # codes: their tags come with them
                    _, c_ids, cells, fine, c_tags = next(iter(source.chunks(
                        chunk_size, a, model.fine_code_dtype)))
                    kept = None
                _check_codes(model, cells, fine)
                order = np.argsort(cells, kind="stable")
                run = np.empty(len(cells), dtype=dtype)
                run["cell"], run["id"] = cells[order], c_ids[order]
                run["code"] = index.stored_codes(fine[order])
                if kept is not None:
                    run["vector"] = kept[order]
                if c_tags is not None:
                    run["tags"] = np.asarray(c_tags, dtype=np.uint64)[order]
                write_atomic(run_files[k], run)
                del run, cells, fine, c_ids, order
                peak = max(peak, rss_anon_mb())
                bar.update(min(chunk_size, N - a))
            bar.close()
        encode_s = time.perf_counter() - t0

        # ---- pass 2: merge the runs in cell order and append the cells' entries
        t0 = time.perf_counter()
        runs = [np.load(f, mmap_mode="r") for f in run_files]
        n_cells = storage.n_cells
        hist = np.zeros(n_cells, dtype=np.int64)
        for run in runs:
            hist += np.bincount(run["cell"], minlength=n_cells)
        ends = ranges(np.cumsum(hist), chunk_size)
        first = 0 if next_cell is None else next_cell
        bar = progress_bar(N, "write", initial=int(hist[:first].sum()))
        lo_cell = 0
        for hi_cell in ends:
            if hi_cell > first:
                batch = gather(runs, "cell", lo_cell, hi_cell, _run_dtype(storage))
                state = dict(identity, next_cell=int(hi_cell))
                writer.append(batch["cell"], batch["id"], batch["code"],
                              json.dumps(state).encode(),
                              batch["vector"] if storage.vector_width else None,
                              batch["tags"] if storage.keeps_tags else None)
                peak = max(peak, rss_anon_mb())
                bar.update(len(batch))
                del batch
            lo_cell = hi_cell
        bar.close()
        del runs

        # ---- pass 3: the storage completes itself (the id table), resumably
        bar = progress_bar(N, "ids")
        try:
            writer.finish(json.dumps(dict(identity, next_cell=n_cells)).encode(),
                          progress=bar.update)
        except KeyError as e:
            raise BulkLoadError(f"{e.args[0]}; fix the input and start again in an "
                                "empty directory") from None
        finally:
            bar.close()
        peak = max(peak, rss_anon_mb())
        shutil.rmtree(runs_dir, ignore_errors=True)
        write_s = time.perf_counter() - t0
        st = index.stats()
        summary = BulkSummary(st["vectors"], st["non_empty_cells"], st["bytes_on_disk"],
                              time.perf_counter() - t_start, encode_s, write_s, resumed, peak)
    finally:
        for bar in bars:
            bar.close()
        index.close()
    return summary


def _open_or_create(path, identity, model, train, block_capacity, out, pack_codes, vectors,
                    tags, ranges):
    """(index, resumed, next cell of the write pass or None, or _FINISHED)."""
    if Index.exists(path):
        try:
            index = Index.open(path, allow_incomplete=True)
        except IndexFormatError as e:
            raise BulkLoadError(f"{path} exists and is not an unfinished bulk load ({e}): "
                                "build into a new directory") from None
        state = index.storage.bulk_state()
        done = index.storage.bulk_state(finished=True)
        if state is None and done is not None and _same_input(json.loads(done), identity):
            _refuse_other_model(index, model, path, "was built from this input")
            out(f"{path} was already built from this input")
            return index, True, _FINISHED
        if state is None:
            index.close()
            raise BulkLoadError(f"{path} is a complete index: build into a new directory, or "
                                "add to this one with `cypq add`")
        state = json.loads(state)
        if not _same_input(state, identity):
            index.close()
            changed = [k for k in identity if state.get(k) != identity[k]]
            raise BulkLoadError(f"{path} is an unfinished bulk load of a different input or "
                                f"settings ({', '.join(changed)} changed): rerun it with the "
                                "same input and chunk size, or delete the directory")
        _refuse_other_model(index, model, path, "is an unfinished bulk load")
        out(f"resuming the unfinished bulk load in {path}")
        return index, True, state.get("next_cell")
    if os.path.exists(path) and not os.path.isdir(path):
        raise BulkLoadError(f"{path} exists and is not a directory")
    if model is None:
        if train is None:
            raise BulkLoadError("a model is needed: pass a trained model or train one")
        model = train()
    index = Index.create(path, model, block_capacity=block_capacity, pack_codes=pack_codes,
                         vectors=vectors, tags=tags, bulk_state=json.dumps(identity).encode(),
                         vector_ranges=ranges() if vectors == "sq8" else None)
    return index, False, None


def _refuse_other_model(index, model, path, what: str) -> None:
    """A BulkLoadError (index closed) if a model was given and the index holds another: a
    load that goes on, or is found done, uses the model inside (a rerun with another one was
    reported built, and its index searched with the first)."""
    if model is not None and model != index.model:
        index.close()
        raise BulkLoadError(f"{path} {what} with another model: rerun with the same model "
                            "(or none: the one inside is used), or build into a new directory")


def _same_input(state: dict, identity: dict) -> bool:
    return {k: state.get(k) for k in identity} == identity


def _run_dtype(storage) -> np.dtype:
    """A run file's records: cell, id, the code as the storage holds it, and the vector
    and tags when the storage keeps them."""
    return np.dtype([("cell", "<i8"), ("id", "<i8"),
                     ("code", storage.code_dtype, (storage.code_width,))]
                    + ([("vector", storage.vector_dtype, (storage.vector_width,))]
                       if storage.vector_width else [])
                    + ([("tags", "<u8")] if storage.keeps_tags else []))


def _rows_in(chunks: list[int], size: int, N: int) -> int:
    return sum(min(size, N - k * size) for k in chunks)


def _check_codes(model, cells, fine) -> None:
    if fine.ndim != 2 or fine.shape[1] != model.M:
        raise BulkLoadError(f"the codes have {fine.shape[-1]} fine codes per vector but the "
                            f"model has M={model.M}")
    if len(cells) and (cells.min() < 0 or cells.max() >= model.V * model.V):
        raise BulkLoadError(f"cell ids outside 0 .. {model.V ** 2 - 1}: the codes were not "
                            "made with this model")
    if fine.size and int(fine.max()) >= model.subquantizer_clusters:
        raise BulkLoadError("fine codes beyond the model's subquantizer clusters: the codes "
                            "were not made with this model")
