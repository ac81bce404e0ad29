/*
 * ADC of 4-bit LOPQ codes packed two per byte (codes 2j and 2j + 1 in byte j, low nibble
 * first): n codes of W bytes, row-major, the first W/2 bytes holding half 0's M/2 = W codes;
 * T0, T1 (W, 16) float the tables of the two halves (subquantizer m of a half: T + m * 16).
 *
 * Two paths, the same results:
 * - cypq_adc4: every code summed from the float tables (the portable path, auto-vectorised
 *   per target clone);
 * - cypq_adc4_vbmi (AVX-512 VBMI, picked at run time): a lower bound of every code from
 *   uint8 tables held in registers (vpermi2b looks up 64 nibbles, one per subquantizer of up
 *   to 64 / L codes, in 128-byte tables of 8 subquantizers), and the float sum, exactly as
 *   cypq_adc4 makes it, only for the codes whose bound is within the threshold. A code within
 *   the threshold always has its bound within it (see cypq_quantize4), so both paths return
 *   the same codes with the same distances; the bounds only spare the float sums of codes
 *   that cannot enter the top k.
 * AVX2 has no byte lookup across more than 16 entries, so it takes the portable path.
 */
#ifndef CYPQ_FASTSCAN_H
#define CYPQ_FASTSCAN_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#if CYPQ_WIDE
#include <immintrin.h>
#endif

/* One code's sum: four add chains (even and odd subquantizers of each half), summed as
 * (e0 + o0) + (e1 + o1). Every path scores a code through this. */
CYPQ_INLINE float cypq_adc4_one(const float *T0, const float *T1, const int W,
                                const uint8_t *c) {
    const int H = W / 2;
    float e0 = 0.f, o0 = 0.f, e1 = 0.f, o1 = 0.f;
    for (int j = 0; j < H; j++) {
        const int x = c[j], y = c[H + j];
        e0 += T0[j * 32 + (x & 15)];
        o0 += T0[j * 32 + 16 + (x >> 4)];
        e1 += T1[j * 32 + (y & 15)];
        o1 += T1[j * 32 + 16 + (y >> 4)];
    }
    return (e0 + o0) + (e1 + o1);
}

/* Codes with a sum at most thresh go to out[0 .. cnt) with their row numbers in idx; returns
 * cnt. The common widths get W fixed, so the loop over bytes unrolls. */
#define CYPQ_ADC4_BODY(WW)                                                                  \
    int64_t cnt = 0;                                                                        \
    for (int64_t i = 0; i < n; i++) {                                                       \
        const float s = cypq_adc4_one(T0, T1, (WW), codes + i * (int64_t)(WW));             \
        if (s <= thresh) {                                                                  \
            out[cnt] = s;                                                                   \
            idx[cnt++] = (int32_t)i;                                                        \
        }                                                                                   \
    }                                                                                       \
    return cnt;

CYPQ_CLONES
static int64_t cypq_adc4(const float *T0, const float *T1, int W, const uint8_t *codes,
                         int64_t n, float thresh, float *out, int32_t *idx) {
    switch (W) {
        case 8: { CYPQ_ADC4_BODY(8) }
        case 16: { CYPQ_ADC4_BODY(16) }
        case 24: { CYPQ_ADC4_BODY(24) }
        case 32: { CYPQ_ADC4_BODY(32) }
        default: { CYPQ_ADC4_BODY(W) }
    }
}

/* Lane constants of the VBMI path for one code width, made once per search (cypq_adc4_plan). */
typedef struct {
    int W;                   /* bytes per code */
    int vbmi;                /* the VBMI path is usable (CPU, M % 8 == 0, M <= 64, enabled) */
    uint8_t dup[64];         /* lane -> byte of the loaded codes holding its nibble */
    uint8_t off[64];         /* lane -> 16 * its subquantizer's place in its group of 8 */
    uint64_t group[8];       /* lanes of each group of 8 subquantizers (no others) */
} cypq_adc4_plan;

/* The tables of one cell for the VBMI path: Q0, Q1 (W, 16) uint8 of its two centroids,
 * base = bias0 + bias1, and the query's delta and slack (cypq_quantize4). */
typedef struct {
    const cypq_adc4_plan *plan;
    const uint8_t *Q0, *Q1;
    float base, delta, slack;
} cypq_adc4_cell;

static int cypq_fastscan_off = 0;   /* tests switch the VBMI path off to compare the paths */

static void cypq_adc4_plan_init(cypq_adc4_plan *p, int W) {
    const int M = 2 * W, L = M <= 16 ? 16 : (M <= 32 ? 32 : 64);   /* lanes per code */
    memset(p, 0, sizeof *p);
    p->W = W;
#if CYPQ_WIDE
    p->vbmi = !cypq_fastscan_off && M % 8 == 0 && M <= 64 && cypq_wide()
              && __builtin_cpu_supports("avx512vbmi");
#endif
    for (int lane = 0; lane < 64; lane++) {
        const int c = lane / L, s = lane % L;
        p->dup[lane] = (uint8_t)(s < M ? c * W + s / 2 : 0);
        p->off[lane] = (uint8_t)((s % 8) * 16);
        if (s < M) p->group[s / 8] |= 1ULL << lane;
    }
}

#if CYPQ_WIDE
#define CYPQ_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")))

/*
 * uint8 tables for the bounds: rows tables T (rows, m, 16) -> Q (rows, m, 16) with
 * Q = floor((T - lo) / delta * (1 - 2^-20)), lo the minimum of the subquantizer's table and
 * delta shared by every row (the widest table's range / 255, so Q <= 254); bias[r] = the sum of
 * row r's minima. For any code, bias0 + bias1 + delta * (sum of its Q) is then at most its
 * exact sum, up to float rounding on both sides, which *slack covers (1e-5 of the largest
 * magnitude a sum can have: far above the rounding of M additions). Returns delta.
 */
CYPQ_VBMI
static float cypq_quantize4(const float *T, int64_t rows, int m, uint8_t *Q, float *bias,
                            float *slack) {
    float width = 0.f, mag = 0.f;
    for (int64_t r = 0; r < rows; r++) {
        float b = 0.f, a = 0.f;
        for (int s = 0; s < m; s++) {
            const __m512 t = _mm512_loadu_ps(T + (r * m + s) * 16);
            const float lo = _mm512_reduce_min_ps(t), hi = _mm512_reduce_max_ps(t);
            width = hi - lo > width ? hi - lo : width;
            b += lo;
            a += fabsf(lo);
        }
        bias[r] = b;
        mag = a > mag ? a : mag;
    }
    const float delta = width > 0.f ? width / 255.f : 1.f;
    const __m512 scale = _mm512_set1_ps((1.f - 1.f / (1 << 20)) / delta);
    for (int64_t t = 0; t < rows * m; t++) {
        const __m512 v = _mm512_loadu_ps(T + t * 16);
        const __m512 lo = _mm512_set1_ps(_mm512_reduce_min_ps(v));
        const __m512 f = _mm512_min_ps(_mm512_max_ps(_mm512_floor_ps(
            _mm512_mul_ps(_mm512_sub_ps(v, lo), scale)), _mm512_setzero_ps()),
            _mm512_set1_ps(255.f));
        _mm_storeu_si128((__m128i *)(Q + t * 16), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(f)));
    }
    *slack = 1e-5f * (2.f * mag + 255.f * 2 * m * delta);
    return delta;
}

/* The VBMI loop for codes of WW bytes (a constant for the common widths, so the float sums of
 * the codes that pass are unrolled as in cypq_adc4). */
#define CYPQ_ADC4_VBMI_BODY(WW)                                                             \
    const int W = (WW), L = 2 * W <= 16 ? 16 : (2 * W <= 32 ? 32 : 64), P = 64 / L;         \
    const int G = W / 4, Q8 = L / 8; /* groups of 8 subquantizers, qwords per code */     \
    __m512i tab[16]; /* register t: subquantizers 4t .. 4t + 3, all of one half (M % 8 == 0) */ \
    for (int t = 0; t < 2 * G; t++)                                                         \
        tab[t] = _mm512_loadu_si512(4 * t < W ? cell->Q0 + 64 * t                           \
                                              : cell->Q1 + 64 * t - 16 * W);                \
    const __m512i dup = _mm512_loadu_si512(pl->dup), off = _mm512_loadu_si512(pl->off);    \
    const __m512i low = _mm512_set1_epi8(15);                                               \
    const __m256 base = _mm256_set1_ps(cell->base - cell->slack);                           \
    const __m256 delta = _mm256_set1_ps(cell->delta), th = _mm256_set1_ps(thresh);          \
    int64_t m = 0;                                                                          \
    for (int64_t i = 0; i < n; i += P) {                                                    \
        const int p = n - i < P ? (int)(n - i) : P;                                         \
        const __mmask64 bytes = p * W >= 64 ? ~0ULL : (1ULL << (p * W)) - 1;                \
        const __m512i x = _mm512_permutexvar_epi8(                                          \
            dup, _mm512_maskz_loadu_epi8(bytes, codes + i * W));                            \
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), low);                  \
        const __m512i ix = _mm512_or_si512(                                                 \
            _mm512_mask_blend_epi8(0xAAAAAAAAAAAAAAAAULL, _mm512_and_si512(x, low), hi), off); \
        /* each group's lanes looked up on their own, then merged: no chain through groups */ \
        __m512i r = _mm512_maskz_permutex2var_epi8(pl->group[0], tab[0], ix, tab[1]);      \
        for (int g = 1; g < G; g++)                                                         \
            r = _mm512_or_si512(r, _mm512_maskz_permutex2var_epi8(pl->group[g], tab[2 * g], \
                                                                  ix, tab[2 * g + 1]));     \
        /* sums of 8 lanes, then of each code's L / 8 of them, in qword c * L / 8 */        \
        __m512i S = _mm512_sad_epu8(r, _mm512_setzero_si512());                             \
        S = _mm512_add_epi64(S, _mm512_permutex_epi64(S, 0xB1));                            \
        if (L >= 32) S = _mm512_add_epi64(S, _mm512_permutex_epi64(S, 0x4E));               \
        if (L >= 64) S = _mm512_add_epi64(S, _mm512_shuffle_i64x2(S, S, 0x4E));             \
        const __m256 lb = _mm256_fmadd_ps(_mm512_cvtepu64_ps(S), delta, base);              \
        /* the codes whose bound is within the threshold (the others' sums are above it), */ \
        /* noted without branching: idx holds them until the second pass */                 \
        const unsigned pass = _mm256_cmp_ps_mask(lb, th, _CMP_LE_OQ);                       \
        for (int c = 0; c < p; c++) {                                                       \
            idx[m] = (int32_t)(i + c);                                                      \
            m += (pass >> (c * Q8)) & 1;                                                    \
        }                                                                                   \
    }                                                                                       \
    /* the float sums of those, as cypq_adc4 makes them (cnt <= j: in place is safe) */     \
    int64_t cnt = 0;                                                                        \
    for (int64_t j = 0; j < m; j++) {                                                       \
        const int32_t row = idx[j];                                                         \
        const float s = cypq_adc4_one(T0, T1, W, codes + (int64_t)row * W);                 \
        if (s <= thresh) {                                                                  \
            out[cnt] = s;                                                                   \
            idx[cnt++] = row;                                                               \
        }                                                                                   \
    }                                                                                       \
    return cnt;

CYPQ_VBMI
static int64_t cypq_adc4_vbmi(const float *T0, const float *T1, const cypq_adc4_cell *cell,
                              const uint8_t *codes, int64_t n, float thresh, float *out,
                              int32_t *idx) {
    const cypq_adc4_plan *pl = cell->plan;
    switch (pl->W) {
        case 8: { CYPQ_ADC4_VBMI_BODY(8) }
        case 16: { CYPQ_ADC4_VBMI_BODY(16) }
        case 24: { CYPQ_ADC4_VBMI_BODY(24) }
        case 32: { CYPQ_ADC4_VBMI_BODY(32) }
        default: { CYPQ_ADC4_VBMI_BODY(pl->W) }
    }
}

#else
/* No VBMI path here: plans say so, and nothing quantises. */
static float cypq_quantize4(const float *T, int64_t rows, int m, uint8_t *Q, float *bias,
                            float *slack) {
    (void)T; (void)rows; (void)m; (void)Q; (void)bias;
    *slack = 0.f;
    return 1.f;
}
#endif

/* cypq_adc4 through the cell's bounds where the plan allows (cell NULL: no bounds). */
static inline int64_t cypq_adc4_cells(const float *T0, const float *T1, int W,
                                      const cypq_adc4_cell *cell, const uint8_t *codes,
                                      int64_t n, float thresh, float *out, int32_t *idx) {
#if CYPQ_WIDE
    if (cell != NULL && cell->plan->vbmi && thresh < INFINITY)
        return cypq_adc4_vbmi(T0, T1, cell, codes, n, thresh, out, idx);
#endif
    return cypq_adc4(T0, T1, W, codes, n, thresh, out, idx);
}

#endif
