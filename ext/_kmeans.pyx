# cython: freethreading_compatible = True
"""Kernels: the Lloyd update step and k-means++ seeding, for M subspaces trained at once.

The assignment step is the encode kernel of cypq._quantize. Sums are accumulated in float64
and in row order, one subspace per thread, so results do not depend on the thread count.
"""
from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free, malloc

from types cimport code_t


cdef enum:
    UPDATE_MIN_ROWS = 16384          # rows per partial sum, at least
    UPDATE_MAX_PARTS = 64
    UPDATE_MAX_BYTES = 256 << 20     # cap on all partial sums together


def update_centroids(const float[:, ::1] X, const code_t[:, ::1] codes, float[:, :, ::1] C,
                     int64_t[:, ::1] counts, int n_threads):
    """Set every non-empty centroid to the mean of its points; leave empty ones unchanged.

    X (n, D) float32; codes (n, M) assignments; C (M, Ks, Ds) float32, updated in place;
    counts (M, Ks) int64 output, points per centroid.

    One pass over X: rows are cut into parts whose boundaries depend only on n and the sizes,
    each part's sums are accumulated in float64 by one thread, and parts are added in order,
    so the result does not depend on the number of threads.
    """
    cdef Py_ssize_t n = X.shape[0], i, p, lo, hi, e, c
    cdef int M = C.shape[0], Ks = C.shape[1], Ds = C.shape[2], m, j
    cdef Py_ssize_t entries = <Py_ssize_t> M * Ks, width = entries * Ds
    cdef Py_ssize_t n_parts = (n + UPDATE_MIN_ROWS - 1) // UPDATE_MIN_ROWS, part_rows
    cdef double *sums
    cdef int64_t *cnt
    cdef double *ps
    cdef int64_t *pc
    cdef double acc
    cdef int64_t total
    if X.shape[1] != M * Ds or codes.shape[0] != n or codes.shape[1] != M:
        raise ValueError("update_centroids: inconsistent shapes")
    if counts.shape[0] != M or counts.shape[1] != Ks:
        raise ValueError("update_centroids: counts must be (M, Ks)")
    if n_parts > UPDATE_MAX_PARTS:
        n_parts = UPDATE_MAX_PARTS
    if n_parts > UPDATE_MAX_BYTES // (width * 8 + entries * 8):
        n_parts = UPDATE_MAX_BYTES // (width * 8 + entries * 8)
    if n_parts < 1:
        n_parts = 1
    part_rows = (n + n_parts - 1) // n_parts if n > 0 else 1
    sums = <double *> calloc(n_parts * width, sizeof(double))
    cnt = <int64_t *> calloc(n_parts * entries, sizeof(int64_t))
    if sums == NULL or cnt == NULL:
        free(sums)
        free(cnt)
        raise MemoryError()
    with nogil:
        for p in prange(n_parts, num_threads=n_threads, schedule="dynamic"):
            ps = sums + p * width
            pc = cnt + p * entries
            lo = p * part_rows
            hi = lo + part_rows if lo + part_rows < n else n
            for i in range(lo, hi):
                for m in range(M):
                    c = m * Ks + codes[i, m]
                    pc[c] += 1
                    for j in range(Ds):
                        ps[c * Ds + j] += X[i, m * Ds + j]
        for e in prange(entries, num_threads=n_threads, schedule="static"):
            total = 0
            for p in range(n_parts):
                total = total + cnt[p * entries + e]
            counts[e // Ks, e % Ks] = total
            if total > 0:
                for j in range(Ds):
                    acc = 0
                    for p in range(n_parts):
                        acc = acc + sums[p * width + e * Ds + j]
                    C[e // Ks, e % Ks, j] = <float> (acc / total)
    free(sums)
    free(cnt)


cdef enum:
    PP_CHUNK = 4096


def kmeanspp(const float[:, ::1] X, int col0, const double[::1] u, int first,
             float[:, ::1] C, int n_threads):
    """k-means++ seeding (D^2 sampling) of the columns col0 : col0 + Ds of X.

    X (n, D) float32; u (Ks,) float64 uniforms in [0, 1) drawn by the caller (they make the
    result deterministic); first: row of the first centre; C (Ks, Ds) float32 output.
    """
    cdef Py_ssize_t n = X.shape[0], i, ch, lo, hi, n_chunks = (n + PP_CHUNK - 1) // PP_CHUNK
    cdef int Ks = C.shape[0], Ds = C.shape[1], c, j, pick
    cdef double total, target, acc, t, s
    cdef float *mind
    cdef double *part
    if col0 < 0 or col0 + Ds > X.shape[1] or u.shape[0] < Ks or not (0 <= first < n):
        raise ValueError("kmeanspp: inconsistent arguments")
    mind = <float *> malloc(n * sizeof(float))
    part = <double *> calloc(n_chunks, sizeof(double))
    if mind == NULL or part == NULL:
        free(mind)
        free(part)
        raise MemoryError()
    with nogil:
        pick = first
        for c in range(Ks):
            for j in range(Ds):
                C[c, j] = X[pick, col0 + j]
            # Distance of every point to its nearest centre so far, and per-chunk sums of it.
            for ch in prange(n_chunks, num_threads=n_threads, schedule="static"):
                lo = ch * PP_CHUNK
                hi = lo + PP_CHUNK if lo + PP_CHUNK < n else n
                s = 0
                for i in range(lo, hi):
                    acc = 0
                    for j in range(Ds):
                        t = X[i, col0 + j] - C[c, j]
                        acc = acc + t * t
                    if c == 0 or acc < mind[i]:
                        mind[i] = <float> acc
                    s = s + mind[i]
                part[ch] = s
            if c + 1 == Ks:
                break
            total = 0
            for ch in range(n_chunks):
                total += part[ch]
            if total <= 0:
                # Every point coincides with a centre: take rows in order (duplicates are
                # re-seeded by the caller's empty-cluster handling).
                pick = (pick + 1) % n
                continue
            target = u[c + 1] * total
            ch = 0
            while ch < n_chunks - 1 and target >= part[ch]:
                target -= part[ch]
                ch += 1
            lo = ch * PP_CHUNK
            hi = lo + PP_CHUNK if lo + PP_CHUNK < n else n
            pick = <int> (hi - 1)
            for i in range(lo, hi):
                if target < mind[i]:
                    pick = <int> i
                    break
                target -= mind[i]
    free(mind)
    free(part)

