/*
 * A bitonic sorting network for up to CYPQ_SORTNET_MAX distinct uint32 keys, in AVX-512
 * registers: for the top k's final sort (topk.pxd _sort_held), where the ~100-250 entries of a
 * short 4-bit search took 13% of its time in a radix sort (two counting passes, each with a
 * serial prefix over 256 buckets) and a network of 128 keys is ~900 instructions.
 *
 * cypq_sortnet_u32 sorts in place and returns 1, or returns 0 (nothing done) where the CPU has
 * no AVX-512 or n is above CYPQ_SORTNET_MAX: the caller then sorts another way
 * (cypq_sortnet_ready says beforehand). Keys must be
 * distinct (the caller's carry their position in their low bits), so that every way of
 * sorting them gives the same order; cypq_sortnet_u32_portable is the same network in plain C,
 * for the tests to check the AVX-512 one against.
 */
#ifndef CYPQ_SORTNET_H
#define CYPQ_SORTNET_H

#include <stdint.h>
#include <string.h>

#include "simd.h"

#if CYPQ_WIDE
#include <immintrin.h>
#endif

#define CYPQ_SORTNET_MAX 256

/* 0: cypq_sortnet_u32 always declines (for tests to take the caller's other sort; each
 * extension module has its own copy). */
static int cypq_sortnet_enabled = 1;

/* n rounded up to a power of two, at least 16 (a register of keys). */
static inline int cypq_sortnet_width(int n) {
    int p = 16;
    while (p < n) p <<= 1;
    return p;
}

/* The network over x[0 .. p), p a power of two: at stage (k, j) element e is compared with
 * e ^ j, and the pair put in ascending order where e & k == 0, descending elsewhere. */
static void cypq_sortnet_run_portable(uint32_t *x, int p) {
    for (int k = 2; k <= p; k <<= 1)
        for (int j = k >> 1; j > 0; j >>= 1)
            for (int e = 0; e < p; e++) {
                const int f = e ^ j;
                if (f <= e) continue;
                const uint32_t a = x[e], b = x[f];
                const int up = (e & k) == 0;
                if ((a > b) == up) {
                    x[e] = b;
                    x[f] = a;
                }
            }
}

/* x[0 .. n) (2 <= n <= CYPQ_SORTNET_MAX) sorted by run, a network over a power of two of
 * keys: copied into buf with padding that sorts last, and back. */
static inline void cypq_sortnet_padded(uint32_t *x, int n, uint32_t *buf,
                                       void (*run)(uint32_t *, int)) {
    const int p = cypq_sortnet_width(n);
    memcpy(buf, x, (size_t)n * sizeof *x);
    for (int e = n; e < p; e++) buf[e] = UINT32_MAX;
    run(buf, p);
    memcpy(x, buf, (size_t)n * sizeof *x);
}

/* x[0 .. n) sorted ascending by the network in plain C; returns 0 (nothing done) for n above
 * CYPQ_SORTNET_MAX. */
static int cypq_sortnet_u32_portable(uint32_t *x, int n) {
    uint32_t buf[CYPQ_SORTNET_MAX];
    if (n > CYPQ_SORTNET_MAX) return 0;
    if (n >= 2) cypq_sortnet_padded(x, n, buf, cypq_sortnet_run_portable);
    return 1;
}

#if CYPQ_WIDE
/* The same network, 16 keys per register: stages with j >= 16 compare whole registers, the
 * others each register's lanes with a permutation (lane l with lane l ^ j). */
__attribute__((target("avx512f")))
static void cypq_sortnet_run_avx512(uint32_t *x, int p) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int k = 2; k <= p; k <<= 1)
        for (int j = k >> 1; j > 0; j >>= 1) {
            if (j >= 16) {
                for (int i = 0; i < p; i += 16) {
                    if (i & j) continue;
                    const __m512i a = _mm512_loadu_si512(x + i), b = _mm512_loadu_si512(x + i + j);
                    const __m512i mn = _mm512_min_epu32(a, b), mx = _mm512_max_epu32(a, b);
                    const int up = (i & k) == 0;
                    _mm512_storeu_si512(x + i, up ? mn : mx);
                    _mm512_storeu_si512(x + i + j, up ? mx : mn);
                }
                continue;
            }
            const __m512i perm = _mm512_xor_si512(lane, _mm512_set1_epi32(j));
            /* lanes that take the pair's smaller key: the lower of the pair where ascending */
            const __mmask16 lower = _mm512_testn_epi32_mask(lane, _mm512_set1_epi32(j));
            const __mmask16 up_lanes =
                k >= 16 ? 0xFFFF : _mm512_testn_epi32_mask(lane, _mm512_set1_epi32(k));
            for (int i = 0; i < p; i += 16) {
                const __m512i v = _mm512_loadu_si512(x + i);
                const __m512i w = _mm512_permutexvar_epi32(perm, v);
                const __mmask16 up = k >= 16 ? ((i & k) ? 0 : 0xFFFF) : up_lanes;
                const __mmask16 take_min = (__mmask16)~(lower ^ up);
                _mm512_storeu_si512(x + i, _mm512_mask_blend_epi32(
                    take_min, _mm512_max_epu32(v, w), _mm512_min_epu32(v, w)));
            }
        }
}
#endif

/* Whether cypq_sortnet_u32 sorts (up to CYPQ_SORTNET_MAX keys) here and now: AVX-512, and
 * cypq_sortnet_enabled. */
static inline int cypq_sortnet_ready(void) {
#if CYPQ_WIDE
    return cypq_sortnet_enabled && cypq_wide();
#else
    (void)cypq_sortnet_enabled;
    return 0;
#endif
}

/* x[0 .. n) (distinct keys) sorted ascending in AVX-512 registers; returns 0 (nothing done)
 * where cypq_sortnet_ready says no or n is above CYPQ_SORTNET_MAX. */
static int cypq_sortnet_u32(uint32_t *x, int n) {
#if CYPQ_WIDE
    uint32_t buf[CYPQ_SORTNET_MAX] __attribute__((aligned(64)));
    if (n > CYPQ_SORTNET_MAX || !cypq_sortnet_ready()) return 0;
    if (n >= 2) cypq_sortnet_padded(x, n, buf, cypq_sortnet_run_avx512);
    return 1;
#else
    (void)x; (void)n;
    return 0;
#endif
}

#endif
