/*
 * The innermost, SIMD-bound loops of cypq's kernels.
 *
 * Shipped builds target baseline x86-64 (no -march=native), where the compiler may only use
 * SSE2. Each function here is compiled several times through target_clones (AVX-512, AVX2+FMA,
 * baseline) and the loader picks the best one for the CPU at import time. Everything else
 * (threads, chunking, scratch, heaps) lives in the Cython kernels that call these.
 *
 * Codebooks are passed transposed, CT[j * K + k] = codeword k, dimension j, so that the loops
 * over codewords are contiguous and vectorise over k.
 */
#ifndef CYPQ_SIMD_H
#define CYPQ_SIMD_H

#include <float.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(CYPQ_NO_CLONES)
#define CYPQ_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CYPQ_CLONES
#endif

/* Loops over vectors are built per vector width (simd_lanes.h), the AVX-512 one picked at run
 * time by cypq_wide(). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(CYPQ_NO_CLONES)
#define CYPQ_WIDE 1
static inline int cypq_wide(void) {
    static int wide = -1;   /* set once; threads racing here all store the same value */
    if (wide < 0) wide = __builtin_cpu_supports("x86-64-v4") != 0;
    return wide;
}
#else
#define CYPQ_WIDE 0
#endif

/* The line holding p fetched toward the cache. Not __builtin_prefetch alone: GCC finds a
 * function whose only effects are such prefetches "pure" and deletes its calls as dead (it did
 * so to every prefetch of the scans' _prefetch_ahead and to calls of cypq_prefetch_span); an
 * asm volatile stays where it is written. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define cypq_prefetch_line(p) __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)(p)))
#define cypq_prefetch_line_l2(p) __asm__ volatile("prefetcht1 %0" : : "m"(*(const char *)(p)))
#else
#define cypq_prefetch_line(p) __builtin_prefetch(p)
#define cypq_prefetch_line_l2(p) __builtin_prefetch(p, 0, 2)
#endif

/* Every 64-byte line of p[0 .. bytes) fetched toward the cache (l2: into L2 only, prefetcht1),
 * for a loop to read it later (a cell's codes, a cluster's rotation) without waiting on each
 * miss in turn. */
static inline void cypq_prefetch_span(const void *p, int64_t bytes, int l2) {
    const char *a = (const char *)((uintptr_t)p & ~(uintptr_t)63), *end = (const char *)p + bytes;
    for (; a < end; a += 64) {
        if (l2) cypq_prefetch_line_l2(a);
        else cypq_prefetch_line(a);
    }
}

/* Helpers that take or return vectors must be inlined into each clone: called across clones,
 * a 64-byte vector argument would be passed under different ABIs (GCC's -Wpsabi warning). */
#define CYPQ_INLINE static inline __attribute__((always_inline))

/* out[k] = sum_j term(x[j], CT[j, k]) for all K codewords. From d = 16 (the coarse centroids
 * of a search's cell order), blocks of 64, then 32, then 8 codewords keep their sums in
 * registers (vectors of 8: as float arrays, GCC split the blocks of 8 and 16 into scalar
 * lanes) through all d dimensions (d = 96, K = 64: 2.5x; K = 256: 1.5x; MANMINILM's 4-bit
 * K = 16 took the plain loop, 5% of a short search), where the plain loop stores them every
 * dimension; each sum is made in the same order either way. */
typedef float cypq_vf8 __attribute__((vector_size(32)));
typedef int32_t cypq_vi8 __attribute__((vector_size(32)));
#define CYPQ_NY_BLOCKS(TERM, B)                                                             \
    for (; d >= 16 && k0 + (B) <= K; k0 += (B)) {                                           \
        cypq_vf8 acc[(B) / 8] = {{0}};                                                      \
        for (int j = 0; j < d; j++) {                                                       \
            const float *row = CT + (int64_t)j * K + k0;                                    \
            for (int v = 0; v < (B) / 8; v++) {                                             \
                cypq_vf8 r;                                                                 \
                memcpy(&r, row + 8 * v, sizeof r);                                          \
                acc[v] += TERM(x[j], r);   /* (the scalar in every lane) */                 \
            }                                                                               \
        }                                                                                   \
        memcpy(out + k0, acc, sizeof acc);                                                  \
    }

#define CYPQ_NY_BODY(TERM)                                                                  \
    int k0 = 0;                                                                             \
    CYPQ_NY_BLOCKS(TERM, 64)                                                                \
    CYPQ_NY_BLOCKS(TERM, 32)                                                                \
    CYPQ_NY_BLOCKS(TERM, 8)                                                                 \
    for (int k = k0; k < K; k++) out[k] = 0.f;                                              \
    for (int j = 0; k0 < K && j < d; j++) {                                                 \
        const float xj = x[j];                                                              \
        const float *row = CT + (int64_t)j * K;                                             \
        for (int k = k0; k < K; k++) out[k] += TERM(xj, row[k]);                            \
    }

/* (Macros: they serve floats and cypq_vf8 alike.) */
#define cypq_sq_diff(a, b) (((a) - (b)) * ((a) - (b)))
#define cypq_mul(a, b) ((a) * (b))

/* out[k] = sum_j (x[j] - CT[j, k])^2 for all K codewords. */
CYPQ_CLONES
static void cypq_l2sqr_ny(const float *x, const float *CT, int d, int K, float *out) {
    CYPQ_NY_BODY(cypq_sq_diff)
}

/* pos[i] = the place of key[i] in a stable ascending sort of key[0:n]: the keys before it
 * (smaller, or equal and earlier), counted over all n (n^2 compares, 8 per AVX2 step). Below
 * ~100 keys this costs less than a radix sort's histograms (n = 64: 0.8 against 1.7 us). */
CYPQ_CLONES
static void cypq_sort_places(const uint32_t *key, int32_t n, int32_t *pos) {
    for (int32_t i = 0; i < n; i++) {
        const int32_t ki = (int32_t)(key[i] ^ 0x80000000u);   /* unsigned order as signed */
        int32_t r = 0;
        for (int32_t j = 0; j < n; j++) {
            const int32_t kj = (int32_t)(key[j] ^ 0x80000000u);
            r += (kj < ki) | ((kj == ki) & (j < i));
        }
        pos[i] = r;
    }
}

/* out[k] = xnorm + cnorm[k] + sum_j x[j] * CTm2[j, k]: squared distances by the norm expansion
 * (CTm2 = -2 * CT, cnorm = ||c||^2), one FMA per codeword and dimension. */
CYPQ_CLONES
static void cypq_l2sqr_ny_norm(const float *x, float xnorm, const float *CTm2,
                               const float *cnorm, int d, int K, float *out) {
    for (int k = 0; k < K; k++) out[k] = xnorm + cnorm[k];
    for (int j = 0; j < d; j++) {
        const float xj = x[j];
        const float *row = CTm2 + (int64_t)j * K;
        for (int k = 0; k < K; k++) out[k] += xj * row[k];
    }
}

/*
 * The loops over vectors of codewords or columns (simd_lanes.h), once per vector width:
 * 64-byte vectors for AVX-512, 32-byte for AVX2 and the baseline. GCC splits a 64-byte vector
 * into two AVX2 registers, and with these loops' eight to sixteen accumulators it spilled them
 * to the stack: on an AMD EPYC (Zen 3, AVX2) the 64-byte build of the local projection ran at
 * 1.8 GFLOP/s, the 32-byte one at 64.
 */
#define CYPQ_L(name) name##_w8
#define CYPQ_VW 8
#define CYPQ_REGS 16
#if CYPQ_WIDE
#define CYPQ_LANES_TARGET __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CYPQ_LANES_TARGET
#endif
#include "simd_lanes.h"
#undef CYPQ_L
#undef CYPQ_VW
#undef CYPQ_REGS
#undef CYPQ_LANES_TARGET

#if CYPQ_WIDE
#define CYPQ_L(name) name##_w16
#define CYPQ_VW 16
#define CYPQ_REGS 32
#define CYPQ_LANES_TARGET __attribute__((target("arch=x86-64-v4")))
#include "simd_lanes.h"
#undef CYPQ_L
#undef CYPQ_VW
#undef CYPQ_REGS
#undef CYPQ_LANES_TARGET
#define CYPQ_BY_WIDTH(name, ...) \
    (cypq_wide() ? name##_w16(__VA_ARGS__) : name##_w8(__VA_ARGS__))
#else
#define CYPQ_BY_WIDTH(name, ...) name##_w8(__VA_ARGS__)
#endif

/* Nearest codeword of 4 vectors at once (see simd_lanes.h). */
static void cypq_nearest_x4(const float *x0, const float *x1, const float *x2, const float *x3,
                            const float *CTm2, const float *cnorm, int d, int K, int32_t *idx,
                            float *best) {
    CYPQ_BY_WIDTH(cypq_nearest_x4, x0, x1, x2, x3, CTm2, cnorm, d, K, idx, best);
}

static int32_t cypq_argmin_shifted(const float *g, const float *cnorm, int K, float *best) {
    return CYPQ_BY_WIDTH(cypq_argmin_shifted, g, cnorm, K, best);
}

static void cypq_l2sqr_ny_norm_x4(const float *const *x, const float *xnorm, const float *CTm2,
                                  const float *cnorm, int d, int K, float *const *out) {
    CYPQ_BY_WIDTH(cypq_l2sqr_ny_norm_x4, x, xnorm, CTm2, cnorm, d, K, out);
}

static void cypq_tables16(const float *P, int64_t n, int m, int d, const float *CTm2,
                          const float *cnorm, const float *offset, float *out) {
    CYPQ_BY_WIDTH(cypq_tables16, P, n, m, d, CTm2, cnorm, offset, out);
}

static void cypq_matmul_t(const float *AT, const float *Z, int64_t n, int d, float *Y) {
    CYPQ_BY_WIDTH(cypq_matmul_t, AT, Z, n, d, Y);
}

/* AT = A^T of a d x d matrix (row-major): 8 x 8 tiles transposed in registers (three rounds of
 * two-vector shuffles), the edges of a d that is not a multiple of 8 one float at a time. A
 * copy: every path gives the same bits. */
CYPQ_CLONES
static void cypq_transpose(const float *restrict A, int d, float *restrict AT) {
    int a0 = 0;
    for (; a0 + 8 <= d; a0 += 8) {
        int b0 = 0;
        for (; b0 + 8 <= d; b0 += 8) {
            cypq_vf8 r[8], t[8], u[8];
            for (int i = 0; i < 8; i++) memcpy(&r[i], A + (int64_t)(a0 + i) * d + b0, 32);
            for (int i = 0; i < 4; i++) {   /* pairs of rows interleaved */
                t[2 * i] = __builtin_shuffle(r[2 * i], r[2 * i + 1],
                                             (cypq_vi8){0, 8, 1, 9, 4, 12, 5, 13});
                t[2 * i + 1] = __builtin_shuffle(r[2 * i], r[2 * i + 1],
                                                 (cypq_vi8){2, 10, 3, 11, 6, 14, 7, 15});
            }
            for (int i = 0; i < 2; i++)     /* then pairs of pairs */
                for (int j = 0; j < 2; j++) {
                    u[4 * i + 2 * j] = __builtin_shuffle(t[4 * i + j], t[4 * i + 2 + j],
                                                         (cypq_vi8){0, 1, 8, 9, 4, 5, 12, 13});
                    u[4 * i + 2 * j + 1] = __builtin_shuffle(
                        t[4 * i + j], t[4 * i + 2 + j], (cypq_vi8){2, 3, 10, 11, 6, 7, 14, 15});
                }
            for (int i = 0; i < 4; i++) {   /* then the two 128-bit halves */
                cypq_vf8 lo = __builtin_shuffle(u[i], u[4 + i],
                                                (cypq_vi8){0, 1, 2, 3, 8, 9, 10, 11});
                cypq_vf8 hi = __builtin_shuffle(u[i], u[4 + i],
                                                (cypq_vi8){4, 5, 6, 7, 12, 13, 14, 15});
                memcpy(AT + (int64_t)(b0 + i) * d + a0, &lo, 32);
                memcpy(AT + (int64_t)(b0 + 4 + i) * d + a0, &hi, 32);
            }
        }
        for (; b0 < d; b0++)
            for (int i = 0; i < 8; i++)
                AT[(int64_t)b0 * d + a0 + i] = A[(int64_t)(a0 + i) * d + b0];
    }
    for (; a0 < d; a0++)
        for (int b = 0; b < d; b++) AT[(int64_t)b * d + a0] = A[(int64_t)a0 * d + b];
}

/* z = (x + s a) + s b over d floats, s = 1 or -1 (exact: the same as x - a - b for -1): a
 * local projection's residual, x - C[c] - mu[c], and its inverse's shift, y + mu[c] + C[c]. */
CYPQ_CLONES
static void cypq_shift2(const float *restrict x, const float *restrict a,
                        const float *restrict b, float s, int d, float *restrict z) {
    for (int i = 0; i < d; i++) z[i] = (x[i] + s * a[i]) + s * b[i];
}

/* out[k] = sum_j x[j] * CT[j, k] for all K codewords. */
CYPQ_CLONES
static void cypq_ip_ny(const float *x, const float *CT, int d, int K, float *out) {
    CYPQ_NY_BODY(cypq_mul)
}

/*
 * Asymmetric distances of n codes (n x M, row-major), d_i = sum_m T_m[codes[i, m]], where the
 * table of subspace m is T0 + m * Ks for m < M/2 and T1 + (m - M/2) * Ks after (one table:
 * T1 = T0 + (M/2) * Ks; LOPQ: the tables of the cell's two halves, each from its own cache).
 * Only distances at most thresh are kept: they go to out[0 .. cnt) with their row numbers in
 * idx, and cnt is returned (thresh = INFINITY keeps all).
 */
#define CYPQ_ADC(NAME, CODE_T)                                                              \
    CYPQ_CLONES                                                                             \
    static int64_t NAME(const float *T0, const float *T1, int M, int Ks,                    \
                        const CODE_T *codes, int64_t n, float thresh, float *out,           \
                        int32_t *idx) {                                                     \
        const int Mh = M / 2;                                                               \
        int64_t cnt = 0;                                                                    \
        for (int64_t i = 0; i < n; i++) {                                                   \
            const CODE_T *c = codes + i * (int64_t)M;                                       \
            float s0 = 0.f, s1 = 0.f;                                                       \
            for (int m = 0; m < Mh; m++) s0 += T0[(int64_t)m * Ks + c[m]];                  \
            for (int m = Mh; m < M; m++) s1 += T1[(int64_t)(m - Mh) * Ks + c[m]];           \
            float s = s0 + s1;                                                              \
            if (s <= thresh) {                                                               \
                out[cnt] = s;                                                               \
                idx[cnt++] = (int32_t)i;                                                    \
            }                                                                               \
        }                                                                                   \
        return cnt;                                                                         \
    }

/* The w (8 or 4) bytes at p, little-endian: one load. */
static inline uint64_t cypq_load_bytes(const uint8_t *p, int w) {
    if (w == 8) {
        uint64_t x;
        memcpy(&x, p, 8);
        return x;
    }
    uint32_t x;
    memcpy(&x, p, 4);
    return x;
}

/* uint8 codes with Ks = 256 and M = 8, 16, 24, 32, 48 or 64 (the common shapes; packed 4-bit
 * codes of 8 to 32 bytes are scanned through pair tables in this shape too): with M and Ks
 * known at compile time the loops unroll whole and every table offset folds into the load's
 * address; a code's bytes come 8 (or 4) per load and are taken apart by shifts, where a load
 * per byte made two loads per lookup (1.5x the time: a kernel micro-benchmark, M = 32, Zen 4);
 * two codes per step, one add chain per half each, keep four short chains in flight (eight
 * measured the same). */
#define CYPQ_ADC_FIXED(NAME, MM)                                                            \
    CYPQ_CLONES                                                                             \
    static int64_t NAME(const float *T0, const float *T1, const uint8_t *codes, int64_t n,  \
                        float thresh, float *out, int32_t *idx) {                           \
        enum { H = MM / 2 };                                                                \
        int64_t cnt = 0, i = 0;                                                             \
        for (; i + 2 <= n; i += 2) {                                                        \
            const uint8_t *c = codes + i * MM, *e = c + MM;                                 \
            float a0 = 0.f, a1 = 0.f, b0 = 0.f, b1 = 0.f;                                   \
            _Pragma("GCC unroll 8")                                                         \
            for (int g = 0; g < H; g += 8) {                                                \
                const int w = H - g < 8 ? H - g : 8;   /* (H % 8: the last step takes 4) */ \
                const uint64_t x = cypq_load_bytes(c + g, w), y = cypq_load_bytes(c + H + g, w); \
                const uint64_t u = cypq_load_bytes(e + g, w), v = cypq_load_bytes(e + H + g, w); \
                _Pragma("GCC unroll 8")                                                     \
                for (int b = 0; b < w; b++) {                                               \
                    const float *t0 = T0 + (g + b) * 256, *t1 = T1 + (g + b) * 256;         \
                    a0 += t0[(x >> (8 * b)) & 255];                                         \
                    a1 += t1[(y >> (8 * b)) & 255];                                         \
                    b0 += t0[(u >> (8 * b)) & 255];                                         \
                    b1 += t1[(v >> (8 * b)) & 255];                                         \
                }                                                                           \
            }                                                                               \
            float sa = a0 + a1, sb = b0 + b1;                                               \
            if (sa <= thresh) {                                                              \
                out[cnt] = sa;                                                              \
                idx[cnt++] = (int32_t)i;                                                    \
            }                                                                               \
            if (sb <= thresh) {                                                              \
                out[cnt] = sb;                                                              \
                idx[cnt++] = (int32_t)(i + 1);                                              \
            }                                                                               \
        }                                                                                   \
        for (; i < n; i++) {                                                                \
            const uint8_t *c = codes + i * MM;                                              \
            float a0 = 0.f, a1 = 0.f;                                                       \
            for (int m = 0; m < H; m++) {                                                   \
                a0 += T0[m * 256 + c[m]];                                                   \
                a1 += T1[m * 256 + c[H + m]];                                               \
            }                                                                               \
            float s = a0 + a1;                                                              \
            if (s <= thresh) {                                                               \
                out[cnt] = s;                                                               \
                idx[cnt++] = (int32_t)i;                                                    \
            }                                                                               \
        }                                                                                   \
        return cnt;                                                                         \
    }
CYPQ_ADC_FIXED(cypq_adc_u8_m8k256, 8)
CYPQ_ADC_FIXED(cypq_adc_u8_m16k256, 16)
CYPQ_ADC_FIXED(cypq_adc_u8_m24k256, 24)
CYPQ_ADC_FIXED(cypq_adc_u8_m32k256, 32)
CYPQ_ADC_FIXED(cypq_adc_u8_m48k256, 48)
CYPQ_ADC_FIXED(cypq_adc_u8_m64k256, 64)
CYPQ_ADC(cypq_adc_u8_any, uint8_t)
CYPQ_ADC(cypq_adc_u16, uint16_t)
CYPQ_ADC(cypq_adc_u32, uint32_t)

static inline int64_t cypq_adc_u8(const float *T0, const float *T1, int M, int Ks,
                                  const uint8_t *codes, int64_t n, float thresh, float *out,
                                  int32_t *idx) {
    if (Ks == 256 && M == 16) return cypq_adc_u8_m16k256(T0, T1, codes, n, thresh, out, idx);
    if (Ks == 256 && M == 8) return cypq_adc_u8_m8k256(T0, T1, codes, n, thresh, out, idx);
    if (Ks == 256 && M == 24) return cypq_adc_u8_m24k256(T0, T1, codes, n, thresh, out, idx);
    if (Ks == 256 && M == 32) return cypq_adc_u8_m32k256(T0, T1, codes, n, thresh, out, idx);
    if (Ks == 256 && M == 48) return cypq_adc_u8_m48k256(T0, T1, codes, n, thresh, out, idx);
    if (Ks == 256 && M == 64) return cypq_adc_u8_m64k256(T0, T1, codes, n, thresh, out, idx);
    return cypq_adc_u8_any(T0, T1, M, Ks, codes, n, thresh, out, idx);
}

#endif
