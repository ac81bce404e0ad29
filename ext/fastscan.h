/*
 * ADC of 4-bit LOPQ codes packed two per byte (codes 2j and 2j + 1 in byte j, low nibble
 * first): n codes of W bytes, row-major, the first W/2 bytes holding half 0's M/2 = W codes;
 * T0, T1 (W, 16) float the tables of the two halves (subquantizer m of a half: T + m * 16).
 *
 * Three paths, the same results:
 * - cypq_adc4: every code summed from the float tables (the portable path, auto-vectorised
 *   per target clone);
 * - AVX-512 VBMI: a lower bound of every code from uint8 tables held in registers, and the
 *   float sum, exactly as cypq_adc4 makes it, only for the codes whose bound is within the
 *   threshold; cells of 5 codes or more in blocks of 16 (cypq_adc4_vbmi16: the block
 *   transposed with vpermt2b, 4 subquantizers' 16-entry tables per vpshufb), smaller ones
 *   1-4 codes per step (cypq_adc4_vbmi: vpermi2b looks up 64 nibbles, one per subquantizer
 *   of up to 64 / L codes, in 128-byte tables of 8 subquantizers);
 * - cypq_adc4_avx2 (AVX2, where there is no VBMI): the same bounds from the same uint8
 *   tables, 32 codes at a time: the block is transposed in registers (byte j of 32 codes in
 *   one vector), each byte's two nibbles looked up with vpshufb in their subquantizers'
 *   16-entry tables, and the sums kept in 16-bit lanes; cypq_adc4_avx2_bounds writes every
 *   code's bound instead, for the index's two-phase scan (_search.pyx), and
 *   cypq_rows_within / cypq_bound_quantile / cypq_adc4_avx2_rows serve its sweeps; codes that
 *   several queries scan can be put in blocks of 32 once (cypq_adc4_blocks: byte j of the
 *   32 codes together), whose bounds then need no transposes (cypq_adc4_avx2_block_bounds);
 *   the last 1 .. 16 codes of two segments share a block (cypq_adc4_avx2_tails). Where the
 *   CPU has AVX-512, the sweeps sum 16 listed rows at a time (cypq_adc4_avx512_rows), the
 *   transposing bounds loops run as built for AVX-512VL's 32 registers
 *   (cypq_adc4_avx512_bounds / _tails), and with VBMI the bounds of codes not in blocks come
 *   in VBMI's blocks of 16 up to 24 bytes (cypq_adc4_vbmi_bounds; cypq_adc4_bounds,
 *   cypq_adc4_tails and cypq_adc4_listed pick).
 * A code within the threshold always has its bound within it (see cypq_quantize4), so every
 * path returns the same codes with the same distances; the bounds only spare the float sums
 * of codes that cannot enter the top k. The path is picked once per search (cypq_adc4_plan).
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

/* BODY(WW) with WW a constant for the common widths (so its loops over bytes unroll). */
#define CYPQ_ADC4_BY_WIDTH(BODY, W)                                                         \
    switch (W) {                                                                            \
        case 8: { BODY(8) }                                                                 \
        case 16: { BODY(16) }                                                               \
        case 24: { BODY(24) }                                                               \
        case 32: { BODY(32) }                                                               \
        default: { BODY(W) }                                                                \
    }

CYPQ_CLONES
static int64_t cypq_adc4(const float *T0, const float *T1, int W, const uint8_t *codes,
                         int64_t n, float thresh, float *out, int32_t *idx) {
    CYPQ_ADC4_BY_WIDTH(CYPQ_ADC4_BODY, W)
}

/* Lane constants of the VBMI path for one code width, made once per search (cypq_adc4_plan). */
enum { CYPQ_ADC4_PORTABLE = 0, CYPQ_ADC4_AVX2 = 1, CYPQ_ADC4_VBMI = 2 };

typedef struct {
    int W;                   /* bytes per code */
    int path;                /* CYPQ_ADC4_*: see cypq_adc4_plan_init */
    int rows16;              /* two-phase sweeps sum 16 rows at a time (AVX-512F) */
    int bounds16;            /* two-phase bounds in VBMI's blocks of 16 (W % 4 == 0, W <= 24:
                                at 32 bytes its transposes take as many steps as AVX2's) */
    uint8_t dup[64];         /* lane -> byte of the loaded codes holding its nibble */
    uint8_t off[64];         /* lane -> 16 * its subquantizer's place in its group of 8 */
    uint64_t group[8];       /* lanes of each group of 8 subquantizers (no others) */
    /* blocks of 16 codes (cypq_adc4_vbmi16): lane 16 l + i of column group c (bytes 4c ..
     * 4c + 3) is byte 4c + l of code i, byte tix[c][r][lane] of the block's 128 bytes r
     * (r = 0 .. (W + 7) / 8 - 1) for the lanes in tmask[c][r] */
    uint8_t tix[8][4][64];
    uint64_t tmask[8][4];
    uint8_t widen[4][64];    /* byte 4i of widen[l]: lane 16 l + i (the column's code i) */
} cypq_adc4_plan;

/* The tables of one cell for the VBMI path: Q0, Q1 (W, 16) uint8 of its two centroids,
 * base = bias0 + bias1, and the query's delta and slack (cypq_quantize4). */
typedef struct {
    const cypq_adc4_plan *plan;
    const uint8_t *Q0, *Q1;
    float base, delta, slack;
} cypq_adc4_cell;

/* The last 1 .. 16 codes of a segment, whose bounds the two-phase scan looks up together with
 * another segment's (cypq_adc4_avx2_tails): its cell's tables, the codes, where the bounds go. */
typedef struct {
    cypq_adc4_cell cell;     /* (a copy: the scan's cell moves on) */
    const uint8_t *codes;
    int64_t n;
    float *lb;
} cypq_adc4_tail;

/* The best path the CPU has (0), or at most the AVX2 one (1), or the portable one only (2):
 * tests compare the paths. */
static int cypq_fastscan_limit = 0;

/* Widest code (bytes) of the AVX2 path: its 16-bit sums hold 258 subquantizers' bounds; this
 * sizes its padded block (MANMINILM's 48-byte codes, M = 96, take it). */
#define CYPQ_ADC4_AVX2_MAX_W 64

/* From this many codes a cell takes the VBMI path's blocks of 16 (cypq_adc4_vbmi16); below,
 * its steps of 1-4 codes (cypq_adc4_vbmi), which cost less than one block's transposes
 * there (a kernel micro-benchmark: equal at 3-4 codes, 1.3-3x at 1-2 for M >= 48). */
#define CYPQ_ADC4_BLOCK_FROM 5
/* From this many passing codes a block of 16 gets its exact sums in SIMD (vpermps), where
 * fewer are summed one at a time after the loop. */
#define CYPQ_ADC4_EXACT_FROM 2

/* The path of codes of W bytes: AVX2 (up to M = 128) where the scan is to be two-phase
 * (two_phase: unfiltered, its first sweep on), else VBMI where the CPU has it, M % 8 == 0
 * and M <= 64, else AVX2. The two-phase scan is built on AVX2's; on a CPU with both (AMD
 * Zen 4) it took 0.53-0.59x VBMI's one-pass time on MANMINILM (cells of ~600 codes) and
 * 0.81-0.98x on REALSIFT1M (~15), while one pass of VBMI's blocks of 16 beats one pass of
 * AVX2's. Within the two-phase scan, AVX-512 sums the sweeps' rows (rows16) and VBMI makes
 * the bounds of codes not in blocks (bounds16) where the CPU has them. */
static void cypq_adc4_plan_init(cypq_adc4_plan *p, int W, int two_phase) {
    const int M = 2 * W, L = M <= 16 ? 16 : (M <= 32 ? 32 : 64);   /* lanes per code */
    memset(p, 0, sizeof *p);
    p->W = W;
#if CYPQ_WIDE
    const int avx2 = cypq_fastscan_limit <= 1 && M <= 2 * CYPQ_ADC4_AVX2_MAX_W
        && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && two_phase)
        p->path = CYPQ_ADC4_AVX2;
    else if (cypq_fastscan_limit == 0 && M % 8 == 0 && M <= 64 && cypq_wide()
             && __builtin_cpu_supports("avx512vbmi"))
        p->path = CYPQ_ADC4_VBMI;
    else if (avx2)
        p->path = CYPQ_ADC4_AVX2;
    p->rows16 = two_phase && p->path == CYPQ_ADC4_AVX2 && cypq_fastscan_limit == 0
                && cypq_wide();
    p->bounds16 = p->rows16 && W % 4 == 0 && W <= 24 && __builtin_cpu_supports("avx512vbmi");
#endif
    for (int l = 0; l < 4; l++)
        for (int i = 0; i < 16; i++) p->widen[l][4 * i] = (uint8_t)(16 * l + i);
    if (W % 4 == 0 && W <= 32)
        for (int g = 0; g < W / 4; g++)
            for (int lane = 0; lane < 64; lane++) {
                const int byte = (lane % 16) * W + 4 * g + lane / 16;
                p->tix[g][byte / 128][lane] = (uint8_t)(byte % 128);
                p->tmask[g][byte / 128] |= 1ULL << lane;
            }
    for (int lane = 0; lane < 64; lane++) {
        const int c = lane / L, s = lane % L;
        p->dup[lane] = (uint8_t)(s < M ? c * W + s / 2 : 0);
        p->off[lane] = (uint8_t)((s % 8) * 16);
        if (s < M) p->group[s / 8] |= 1ULL << lane;
    }
}

/* Rows i .. i + p - 1 whose bit (c * stride for row i + c) is set in pass appended to
 * idx[m ..], without branching (20-30% pass: branches were mispredicted); returns the new m. */
CYPQ_INLINE int64_t cypq_note_passing(int32_t *idx, int64_t m, int64_t i, int p, uint32_t pass,
                                      int stride) {
    for (int c = 0; c < p; c++) {
        idx[m] = (int32_t)(i + c);
        m += (pass >> (c * stride)) & 1;
    }
    return m;
}

/* The float sums of the m codes (row numbers rows[0 .. m)) whose bound passed, as cypq_adc4
 * makes them; those at most thresh go to out / idx, which may hold rows itself as long as
 * idx + cnt never passes rows + j (in place). Returns cnt. */
CYPQ_INLINE int64_t cypq_adc4_rescore(const float *T0, const float *T1, const int W,
                                      const uint8_t *codes, const int32_t *rows, int64_t m,
                                      float thresh, float *out, int32_t *idx) {
    int64_t cnt = 0;
    for (int64_t j = 0; j < m; j++) {
        const int32_t row = rows[j];
        const float s = cypq_adc4_one(T0, T1, W, codes + (int64_t)row * W);
        if (s <= thresh) {
            out[cnt] = s;
            idx[cnt++] = row;
        }
    }
    return cnt;
}

/* cypq_adc4_rescore with the common widths unrolled. */
#define CYPQ_ADC4_ROWS_BODY(WW)                                                             \
    return cypq_adc4_rescore(T0, T1, (WW), codes, rows, m, thresh, out, idx);
static int64_t cypq_adc4_rows(const float *T0, const float *T1, int W, const uint8_t *codes,
                              const int32_t *rows, int64_t m, float thresh, float *out,
                              int32_t *idx) {
    CYPQ_ADC4_BY_WIDTH(CYPQ_ADC4_ROWS_BODY, W)
}

/* Lane numbers of the set bits of each 8-bit mask, in order (cypq_fastscan_init). */
static uint8_t cypq_set_lanes[256][8];

/* Once, before cypq_rows_within or cypq_adc4_avx2_rows run: each module that calls them
 * fills its own copy of the table at its import (_search.pyx). */
static void cypq_fastscan_init(void) {
    for (int bits = 0; bits < 256; bits++) {
        int m = 0;
        for (int lane = 0; lane < 8; lane++)
            if (bits >> lane & 1) cypq_set_lanes[bits][m++] = (uint8_t)lane;
    }
}

#if CYPQ_WIDE
#define CYPQ_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")))
#define CYPQ_AVX2 __attribute__((target("avx2,fma")))
/* AVX-512 without VBMI (x86-64-v4: Skylake-X and later, AMD Zen 4) */
#define CYPQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

/* Minimum and maximum of 16 floats. */
CYPQ_AVX2 CYPQ_INLINE void cypq_range16(const float *t, __m256 *lo, __m256 *hi) {
    const __m256 a = _mm256_loadu_ps(t), b = _mm256_loadu_ps(t + 8);
    __m256 mn = _mm256_min_ps(a, b), mx = _mm256_max_ps(a, b);
    mn = _mm256_min_ps(mn, _mm256_permute2f128_ps(mn, mn, 1));
    mx = _mm256_max_ps(mx, _mm256_permute2f128_ps(mx, mx, 1));
    mn = _mm256_min_ps(mn, _mm256_shuffle_ps(mn, mn, 0x4E));
    mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0x4E));
    *lo = _mm256_min_ps(mn, _mm256_shuffle_ps(mn, mn, 0xB1));   /* in every lane */
    *hi = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0xB1));
}

/*
 * uint8 tables for the bounds: rows tables T (rows, m, 16) -> Q (rows, m, 16) with
 * Q = min(255, floor((T - lo) / delta * (1 - 2^-20))), lo the minimum of the subquantizer's
 * table and delta shared by every row: half the widest table's range / 255, so that the top
 * half of the widest ranges saturates at 255 (a saturated entry is below its value, so a
 * bound stays a bound: it only lets more far codes through, which are far above a top k's
 * threshold anyway), and every bound's floors lose half as much (at most delta per
 * subquantizer: REALSIFT1M's 32-byte codes at quota 8000 then sum 187 codes per query in
 * float instead of 242, MANMINILM's 24-byte at 4000 160 instead of 165); bias[r] = the sum of
 * row r's minima. For any code, bias0 + bias1 + delta * (sum of its Q) is then at most its
 * exact sum, up to float rounding on both sides, which *slack covers (1e-5 of the largest
 * magnitude a sum can have: far above the rounding of M additions). Returns delta.
 */
CYPQ_AVX2
static float cypq_quantize4(const float *T, int64_t rows, int m, uint8_t *Q, float *bias,
                            float *slack) {
    float width = 0.f, mag = 0.f;
    __m256 lo, hi;
    for (int64_t r = 0; r < rows; r++) {
        float b = 0.f, a = 0.f;
        for (int s = 0; s < m; s++) {
            cypq_range16(T + (r * m + s) * 16, &lo, &hi);
            const float l = _mm256_cvtss_f32(lo), h = _mm256_cvtss_f32(hi);
            width = h - l > width ? h - l : width;
            b += l;
            a += fabsf(l);
            memcpy(Q + (r * m + s) * 16, &l, sizeof l);   /* kept in its table's slot */
        }
        bias[r] = b;
        mag = a > mag ? a : mag;
    }
    const float delta = width > 0.f ? width / 510.f : 1.f;
    const __m256 scale = _mm256_set1_ps((1.f - 1.f / (1 << 20)) / delta);
    const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.f);
    for (int64_t t = 0; t < rows * m; t++) {
        float l;
        memcpy(&l, Q + t * 16, sizeof l);
        lo = _mm256_set1_ps(l);
        __m256i q[2];
        for (int h = 0; h < 2; h++) {
            const __m256 f = _mm256_floor_ps(_mm256_mul_ps(
                _mm256_sub_ps(_mm256_loadu_ps(T + t * 16 + 8 * h), lo), scale));
            q[h] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(f, zero), top));
        }
        /* 16 int32 in 0..255 -> 16 bytes, in order (packs work per 128-bit lane) */
        const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(q[0], q[1]), 0xD8);
        _mm_storeu_si128((__m128i *)(Q + t * 16),
                         _mm_packus_epi16(_mm256_castsi256_si128(w),
                                          _mm256_extracti128_si256(w, 1)));
    }
    *slack = 1e-5f * (2.f * mag + 2 * m * width);   /* (a sum's entries: up to width above lo) */
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
        m = cypq_note_passing(idx, m, i, p, _mm256_cmp_ps_mask(lb, th, _CMP_LE_OQ), Q8);    \
    }                                                                                       \
    return cypq_adc4_rescore(T0, T1, W, codes, idx, m, thresh, out, idx);

/* The lanes of v selected by k, packed, to dst[0 .. popcount(k)): a compress in registers and
 * a masked store, as vpcompressd to memory is microcoded on some CPUs (AMD Zen 4 above all;
 * on this project's Sapphire Rapids the two measure the same). */
CYPQ_AVX512 CYPQ_INLINE void cypq_store_selected_epi32(int32_t *dst, __mmask16 k, __m512i v) {
    _mm512_mask_storeu_epi32(dst, (__mmask16)((1u << __builtin_popcount(k)) - 1),
                             _mm512_maskz_compress_epi32(k, v));
}

CYPQ_AVX512 CYPQ_INLINE void cypq_store_selected_ps(float *dst, __mmask16 k, __m512 v) {
    _mm512_mask_storeu_ps(dst, (__mmask16)((1u << __builtin_popcount(k)) - 1),
                          _mm512_maskz_compress_ps(k, v));
}

/* The VBMI path's blocks of 16 codes of WW bytes (WW % 4 == 0, WW <= 32): the block
 * transposed with vpermt2b into column groups (lane l of group c holds byte 4c + l of the
 * 16 codes), each lane's two nibbles looked up with vpshufb in its own subquantizers'
 * tables, sums in 16-bit lanes (as the AVX2 loop keeps them), the lanes' partial sums added.
 * SETUP loads the cell's tables; BLOCK makes the bounds bnd of block i (left: its bytes)
 * and keeps its columns in xs. */
#define CYPQ_ADC4_VBMI16_SETUP(WW)                                                          \
    const int W = (WW), C = W / 4, R = (W + 7) / 8;                                         \
    __m512i tl[8], th[8];   /* lane l of tl[c] (th[c]): subquantizer 8c + 2l (+ 1) */       \
    for (int c = 0; c < C; c++) {                                                           \
        const int s0 = 8 * c, s1 = 8 * c + 4;   /* groups of 4 never straddle the halves */ \
        const __m512i a = _mm512_loadu_si512(s0 < W ? cell->Q0 + 16 * s0                    \
                                                    : cell->Q1 + 16 * (s0 - W));           \
        const __m512i b = _mm512_loadu_si512(s1 < W ? cell->Q0 + 16 * s1                    \
                                                    : cell->Q1 + 16 * (s1 - W));           \
        tl[c] = _mm512_shuffle_i64x2(a, b, 0x88);                                           \
        th[c] = _mm512_shuffle_i64x2(a, b, 0xDD);                                           \
    }                                                                                       \
    const __m512i low = _mm512_set1_epi8(15);                                               \
    const __m512 base = _mm512_set1_ps(cell->base - cell->slack);                           \
    const __m512 delta = _mm512_set1_ps(cell->delta);

#define CYPQ_ADC4_VBMI16_BLOCK                                                              \
        const int64_t left = (n - i < 16 ? n - i : 16) * W;   /* bytes in the block */     \
        __m512i z[8];                                                                       \
        for (int r = 0; r < 2 * R; r++) {                                                   \
            const int64_t b = left - 64 * r;                                                \
            z[r] = _mm512_maskz_loadu_epi8(b >= 64 ? ~0ULL : (b <= 0 ? 0 : (1ULL << b) - 1), \
                                           codes + i * W + 64 * r);                         \
        }                                                                                   \
        __m512i acc = _mm512_setzero_si512(), odd = _mm512_setzero_si512(), xs[8];         \
        for (int c = 0; c < C; c++) {                                                       \
            __m512i x = _mm512_maskz_permutex2var_epi8(                                     \
                pl->tmask[c][0], z[0], _mm512_loadu_si512(pl->tix[c][0]), z[1]);            \
            for (int r = 1; r < R && 128 * r < left; r++)   /* pairs holding codes */    \
                x = _mm512_or_si512(x, _mm512_maskz_permutex2var_epi8(                      \
                    pl->tmask[c][r], z[2 * r], _mm512_loadu_si512(pl->tix[c][r]),           \
                    z[2 * r + 1]));                                                         \
            const __m512i vl = _mm512_shuffle_epi8(tl[c], _mm512_and_si512(x, low));        \
            const __m512i vh = _mm512_shuffle_epi8(                                         \
                th[c], _mm512_and_si512(_mm512_srli_epi16(x, 4), low));                     \
            acc = _mm512_add_epi16(acc, _mm512_add_epi16(vl, vh));                          \
            odd = _mm512_add_epi16(odd, _mm512_add_epi16(_mm512_srli_epi16(vl, 8),          \
                                                         _mm512_srli_epi16(vh, 8)));        \
            xs[c] = x;                                                                      \
        }                                                                                   \
        /* the four lanes' sums (each over its own subquantizers) added in every lane */    \
        acc = _mm512_add_epi16(acc, _mm512_shuffle_i64x2(acc, acc, 0x4E));                  \
        odd = _mm512_add_epi16(odd, _mm512_shuffle_i64x2(odd, odd, 0x4E));                  \
        acc = _mm512_add_epi16(acc, _mm512_shuffle_i64x2(acc, acc, 0xB1));                  \
        odd = _mm512_add_epi16(odd, _mm512_shuffle_i64x2(odd, odd, 0xB1));                  \
        const __m128i o = _mm512_castsi512_si128(odd);                                      \
        const __m128i e = _mm_sub_epi16(_mm512_castsi512_si128(acc), _mm_slli_epi16(o, 8)); \
        const __m256i sums = _mm256_inserti128_si256(_mm256_castsi128_si256(               \
            _mm_unpacklo_epi16(e, o)), _mm_unpackhi_epi16(e, o), 1);   /* rows in order */  \
        const __m512 bnd = _mm512_fmadd_ps(                                                 \
            _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(sums)), delta, base);

/* The VBMI loop over blocks of 16 codes (CYPQ_ADC4_VBMI16_SETUP), the 16 bounds compared at
 * once. A block with CYPQ_ADC4_EXACT_FROM or more passing codes gets its 16 float sums at
 * once, each subquantizer's 16 floats looked up with vpermps and added per lane in
 * cypq_adc4_one's order (so bit-identical), its results stored at the front of out / idx;
 * the rows of the other blocks' passing codes go to the back of idx, to be summed one by
 * one after the loop (out and idx hold n entries). */
#define CYPQ_ADC4_VBMI16_BODY(WW)                                                           \
    CYPQ_ADC4_VBMI16_SETUP(WW)                                                              \
    const __m512i rows = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,   \
                                           14, 15);                                         \
    const __m512 th16 = _mm512_set1_ps(thresh);                                             \
    int64_t m = 0, ne = 0;   /* rows noted at the back of idx, results at the front */     \
    for (int64_t i = 0; i < n; i += 16) {                                                   \
        CYPQ_ADC4_VBMI16_BLOCK;                                                             \
        const __mmask16 pass = _mm512_cmp_ps_mask(bnd, th16, _CMP_LE_OQ)                    \
                               & (__mmask16)((1u << (left / W)) - 1);                       \
        const __m512i at = _mm512_add_epi32(rows, _mm512_set1_epi32((int)i));               \
        if (__builtin_popcount(pass) < CYPQ_ADC4_EXACT_FROM) {                              \
            if (pass) {                                                                     \
                m += __builtin_popcount(pass);                                              \
                cypq_store_selected_epi32(idx + n - m, pass, at);                           \
            }                                                                               \
            continue;                                                                       \
        }                                                                                   \
        __m512 e0 = _mm512_setzero_ps(), o0 = e0, e1 = e0, o1 = e0;                         \
        for (int b = 0; b < W; b++) {   /* byte b: subquantizers 2b, 2b + 1 */              \
            const __m512i v = _mm512_maskz_permutexvar_epi8(                                \
                0x1111111111111111ULL, _mm512_loadu_si512(pl->widen[b % 4]), xs[b / 4]);   \
            const float *t = b < W / 2 ? T0 + 32 * b : T1 + 32 * (b - W / 2);               \
            const __m512 lo = _mm512_permutexvar_ps(v, _mm512_loadu_ps(t));                 \
            const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4),                \
                                                    _mm512_loadu_ps(t + 16));               \
            if (b < W / 2) {                                                                \
                e0 = _mm512_add_ps(e0, lo);                                                 \
                o0 = _mm512_add_ps(o0, hi);                                                 \
            } else {                                                                        \
                e1 = _mm512_add_ps(e1, lo);                                                 \
                o1 = _mm512_add_ps(o1, hi);                                                 \
            }                                                                               \
        }                                                                                   \
        const __m512 s = _mm512_add_ps(_mm512_add_ps(e0, o0), _mm512_add_ps(e1, o1));       \
        const __mmask16 keep = _mm512_mask_cmp_ps_mask(pass, s, th16, _CMP_LE_OQ);          \
        cypq_store_selected_ps(out + ne, keep, s);                                          \
        cypq_store_selected_epi32(idx + ne, keep, at);                                      \
        ne += __builtin_popcount(keep);                                                     \
    }                                                                                       \
    /* (ne + m <= n: idx + ne + j' never passes idx + n - m + j for j' <= j) */             \
    return ne + cypq_adc4_rescore(T0, T1, W, codes, idx + n - m, m, thresh, out + ne,      \
                                  idx + ne);

/* A SIMD path's entry point (compiled for TARGET): its loop BODY over the cell's codes, with
 * the code width a constant for the common widths. */
#define CYPQ_ADC4_ENTRY(TARGET, NAME, BODY)                                                 \
    TARGET static int64_t NAME(const float *T0, const float *T1, const cypq_adc4_cell *cell, \
                               const uint8_t *codes, int64_t n, float thresh, float *out,   \
                               int32_t *idx) {                                             \
        const cypq_adc4_plan *pl = cell->plan;                                              \
        (void)pl;                                                                           \
        CYPQ_ADC4_BY_WIDTH(BODY, pl->W)                                                     \
    }

CYPQ_ADC4_ENTRY(CYPQ_VBMI, cypq_adc4_vbmi16, CYPQ_ADC4_VBMI16_BODY)
CYPQ_ADC4_ENTRY(CYPQ_VBMI, cypq_adc4_vbmi, CYPQ_ADC4_VBMI_BODY)

/* Every code's lower bound, as the VBMI loop compares it, to lb[0 .. n): the two-phase scan's
 * first phase where the plan has bounds16. Blocks of 16 loaded with masks need no padded
 * copies, and a cell of ~15 codes (REALSIFT1M at V = 256) fills one (AVX2's blocks of 32 took
 * a copy and half a block of padding, or a tail shared with another cell). */
#define CYPQ_ADC4_VBMI16_BOUNDS_BODY(WW)                                                    \
    CYPQ_ADC4_VBMI16_SETUP(WW)                                                              \
    for (int64_t i = 0; i < n; i += 16) {                                                   \
        CYPQ_ADC4_VBMI16_BLOCK;                                                             \
        _mm512_mask_storeu_ps(lb + i, (__mmask16)((1u << (left / W)) - 1), bnd);            \
        (void)xs;   /* (the one-pass loop's exact sums read them) */                        \
    }                                                                                       \
    return n;

CYPQ_VBMI static int64_t cypq_adc4_vbmi_bounds(const cypq_adc4_cell *cell, const uint8_t *codes,
                                               int64_t n, float *lb) {
    const cypq_adc4_plan *pl = cell->plan;
    CYPQ_ADC4_BY_WIDTH(CYPQ_ADC4_VBMI16_BOUNDS_BODY, pl->W)
}

/* Columns of a block of 32 codes: a[r] holds 16 bytes of row r (low lane) and of row r + 16
 * (high lane); afterwards a[c] holds byte c of rows 0..15 (low lane) and 16..31 (high lane).
 * Four rounds of unpacks, each pairing registers whose rows are 1, 2, 4, 8 apart. */
CYPQ_AVX2 CYPQ_INLINE void cypq_transpose32x16(__m256i a[16]) {
    __m256i b[16], c[16], d[16];
    for (int k = 0; k < 8; k++) {            /* b[h*8 + k]: rows 2k, 2k+1 of columns h*8 + 0..7 */
        b[k] = _mm256_unpacklo_epi8(a[2 * k], a[2 * k + 1]);
        b[k + 8] = _mm256_unpackhi_epi8(a[2 * k], a[2 * k + 1]);
    }
    for (int h = 0; h < 2; h++)              /* c[4g + m]: rows 4m..4m+3 of columns 4g + 0..3 */
        for (int m = 0; m < 4; m++) {
            c[h * 8 + m] = _mm256_unpacklo_epi16(b[h * 8 + 2 * m], b[h * 8 + 2 * m + 1]);
            c[h * 8 + 4 + m] = _mm256_unpackhi_epi16(b[h * 8 + 2 * m], b[h * 8 + 2 * m + 1]);
        }
    for (int g = 0; g < 4; g++)              /* d[2f + m]: rows 8m..8m+7 of columns 2f, 2f+1 */
        for (int m = 0; m < 2; m++) {
            d[g * 4 + m] = _mm256_unpacklo_epi32(c[g * 4 + 2 * m], c[g * 4 + 2 * m + 1]);
            d[g * 4 + 2 + m] = _mm256_unpackhi_epi32(c[g * 4 + 2 * m], c[g * 4 + 2 * m + 1]);
        }
    for (int f = 0; f < 8; f++) {
        a[2 * f] = _mm256_unpacklo_epi64(d[2 * f], d[2 * f + 1]);
        a[2 * f + 1] = _mm256_unpackhi_epi64(d[2 * f], d[2 * f + 1]);
    }
}

/* Bits 0..15 of x to the even bits 0..30. */
CYPQ_INLINE uint32_t cypq_spread16(uint32_t x) {
    x = (x | (x << 8)) & 0x00FF00FFu;
    x = (x | (x << 4)) & 0x0F0F0F0Fu;
    x = (x | (x << 2)) & 0x33333333u;
    return (x | (x << 1)) & 0x55555555u;
}

/* Row r < 16 of the lower bounds E (rows 0, 2, .., 30 in 16-bit lanes) within th: bit r/2. */
CYPQ_AVX2 CYPQ_INLINE uint32_t cypq_pass16(__m256i E, __m256 delta, __m256 base, __m256 th) {
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(E)));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(E, 1)));
    const uint32_t a = (uint32_t)_mm256_movemask_ps(
        _mm256_cmp_ps(_mm256_fmadd_ps(lo, delta, base), th, _CMP_LE_OQ));
    const uint32_t b = (uint32_t)_mm256_movemask_ps(
        _mm256_cmp_ps(_mm256_fmadd_ps(hi, delta, base), th, _CMP_LE_OQ));
    return a | (b << 8);
}

/* Row i's block of 32 codes (W bytes each, n in all) as the AVX2 sums read it: in place where
 * 16 bytes past each row's chunk stay inside the codes, else a zero-padded copy in pad
 * (32 W + 16 bytes). */
CYPQ_INLINE const uint8_t *cypq_adc4_avx2_block(const uint8_t *codes, int64_t i, int64_t n,
                                               const int W, uint8_t *pad) {
    const int chunks = (W + 15) / 16, p = n - i < 32 ? (int)(n - i) : 32;
    const uint8_t *blk = codes + i * W;
    if (p < 32 || (i + 31) * W + 16 * chunks > n * W) {
        memcpy(pad, blk, (size_t)p * W);  /* zeros after, as far as the loads reach */
        memset(pad + p * W, 0, (size_t)(31 * W + 16 * chunks - p * W));
        blk = pad;
    }
    return blk;
}

/* Chunk ch (bytes 16 ch .. 16 ch + 15) of up to 16 codes at lo (nlo of them, 1 .. 16) and
 * up to 16 at hi (nhi), W bytes each, into a[c]: byte 16 ch + c of lo's rows (low lane) and
 * hi's (high lane); rows past a count repeat its last. */
CYPQ_AVX2 CYPQ_INLINE void cypq_adc4_avx2_chunk2(const uint8_t *lo, int nlo, const uint8_t *hi,
                                                 int nhi, const int W, int ch, __m256i a[16]) {
    for (int r = 0; r < 16; r++)
        a[r] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(
            (const __m128i *)(lo + (r < nlo ? r : nlo - 1) * W + 16 * ch))), _mm_loadu_si128(
            (const __m128i *)(hi + (r < nhi ? r : nhi - 1) * W + 16 * ch)), 1);
    cypq_transpose32x16(a);
}

/* Chunk ch of the block of 32 codes at blk: rows 0..15 in the low lanes, 16..31 high. */
CYPQ_AVX2 CYPQ_INLINE void cypq_adc4_avx2_chunk(const uint8_t *blk, const int W, int ch,
                                                __m256i a[16]) {
    cypq_adc4_avx2_chunk2(blk, 16, blk + 16 * W, 16, W, ch, a);
}

/* Byte column col (one byte of 32 codes, as cypq_adc4_avx2_chunk gives it) looked up in
 * the uint8 tables tl (its low nibbles') and th (its high nibbles'), 16 entries per 128-bit
 * lane, and added to the sums: acc gathers v[2e] + 256 v[2e + 1] (mod 2^16) in 16-bit lane
 * e, od v[2e + 1], so row 2e's sum is acc - 256 od (every sum < 2^16: at most 128 x 255). */
CYPQ_AVX2 CYPQ_INLINE void cypq_adc4_avx2_lookup(__m256i tl, __m256i th, __m256i col,
                                                 __m256i *acc, __m256i *od) {
    const __m256i low = _mm256_set1_epi8(15);
    const __m256i vl = _mm256_shuffle_epi8(tl, _mm256_and_si256(col, low));
    const __m256i vh = _mm256_shuffle_epi8(th, _mm256_and_si256(_mm256_srli_epi16(col, 4), low));
    *acc = _mm256_add_epi16(*acc, _mm256_add_epi16(vl, vh));
    *od = _mm256_add_epi16(*od, _mm256_add_epi16(_mm256_srli_epi16(vl, 8),
                                                 _mm256_srli_epi16(vh, 8)));
}

/* Row 2e's sum from the lookups' acc and od (see cypq_adc4_avx2_lookup); row 2e + 1's is od. */
CYPQ_AVX2 CYPQ_INLINE __m256i cypq_even_sums(__m256i acc, __m256i od) {
    return _mm256_sub_epi16(acc, _mm256_slli_epi16(od, 8));
}

/* cypq_adc4_avx2_lookup of one cell's column: q its two subquantizers' uint8 tables (32
 * bytes: the low nibble's 16, the high one's) in both lanes. */
CYPQ_AVX2 CYPQ_INLINE void cypq_adc4_avx2_column(const uint8_t *q, __m256i col, __m256i *acc,
                                                 __m256i *od) {
    cypq_adc4_avx2_lookup(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q)),
                          _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(q + 16))),
                          col, acc, od);
}

/* The uint8 bound sums of the block of 32 codes at blk (W <= CYPQ_ADC4_AVX2_MAX_W bytes each),
 * 16-bit lane e of *even holding row 2e's and of *odd row 2e + 1's (low lane rows 0..15,
 * high lane 16..31). */
CYPQ_AVX2 CYPQ_INLINE void cypq_adc4_avx2_sums(const cypq_adc4_cell *cell, const uint8_t *blk,
                                               const int W, __m256i *even, __m256i *odd) {
    const int H = W / 2, chunks = (W + 15) / 16;
    __m256i acc = _mm256_setzero_si256(), od = _mm256_setzero_si256();
    for (int ch = 0; ch < chunks; ch++) {
        __m256i a[16];
        cypq_adc4_avx2_chunk(blk, W, ch, a);
        const int cols = W - 16 * ch < 16 ? W - 16 * ch : 16;
        for (int c = 0; c < cols; c++) {
            const int j = 16 * ch + c;   /* byte j: subquantizers 2j, 2j + 1 of a half */
            cypq_adc4_avx2_column(j < H ? cell->Q0 + 32 * j : cell->Q1 + 32 * (j - H), a[c],
                                  &acc, &od);
        }
    }
    *even = cypq_even_sums(acc, od);
    *odd = od;
}

/* The AVX2 loop for codes of WW bytes (W <= CYPQ_ADC4_AVX2_MAX_W): blocks of 32 codes, their
 * bounds compared with the threshold, the float sums only for those within it. */
#define CYPQ_ADC4_AVX2_BODY(WW)                                                             \
    const int W = (WW);                                                                     \
    uint8_t pad[32 * CYPQ_ADC4_AVX2_MAX_W + 16];                                            \
    const __m256 base = _mm256_set1_ps(cell->base - cell->slack);                           \
    const __m256 delta = _mm256_set1_ps(cell->delta), th = _mm256_set1_ps(thresh);          \
    int64_t m = 0;                                                                          \
    for (int64_t i = 0; i < n; i += 32) {                                                   \
        const int p = n - i < 32 ? (int)(n - i) : 32;                                       \
        __m256i even, odd;                                                                  \
        cypq_adc4_avx2_sums(cell, cypq_adc4_avx2_block(codes, i, n, W, pad), W, &even, &odd); \
        const uint32_t pass = cypq_spread16(cypq_pass16(even, delta, base, th))             \
                              | (cypq_spread16(cypq_pass16(odd, delta, base, th)) << 1);    \
        m = cypq_note_passing(idx, m, i, p, pass, 1);                                       \
    }                                                                                       \
    return cypq_adc4_rescore(T0, T1, W, codes, idx, m, thresh, out, idx);

CYPQ_ADC4_ENTRY(CYPQ_AVX2, cypq_adc4_avx2, CYPQ_ADC4_AVX2_BODY)

/* 8 uint16 sums (the low 128 bits of s) -> 8 bounds base + delta * sum. */
CYPQ_AVX2 CYPQ_INLINE __m256 cypq_bounds8(__m128i s, __m256 delta, __m256 base) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(s)), delta, base);
}

/* cypq_bounds8 to out. */
CYPQ_AVX2 CYPQ_INLINE void cypq_store_bounds8(__m128i s, __m256 delta, __m256 base, float *out) {
    _mm256_storeu_ps(out, cypq_bounds8(s, delta, base));
}

/* cypq_store_bounds8 of only the first count (0 .. 8) of the 8. */
CYPQ_AVX2 CYPQ_INLINE void cypq_store_bounds8n(__m128i s, __m256 delta, __m256 base, float *out,
                                               int count) {
    const __m256 v = cypq_bounds8(s, delta, base);
    if (count >= 8)
        _mm256_storeu_ps(out, v);
    else if (count > 0)
        _mm256_maskstore_ps(out, _mm256_cmpgt_epi32(_mm256_set1_epi32(count),
                                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), v);
}

/* The bounds of 32 codes from their sums (cypq_even_sums): the low lanes' 16 rows with base0
 * to lb0 (the first n0 of them), the high lanes' with base1 to lb1 (the first n1). */
CYPQ_AVX2 CYPQ_INLINE void cypq_store_bounds2x16(__m256i even, __m256i odd, __m256 delta,
                                                 __m256 base0, float *lb0, int n0,
                                                 __m256 base1, float *lb1, int n1) {
    /* rows 0-7 and 16-23 (lo), 8-15 and 24-31 (hi), in order */
    const __m256i lo = _mm256_unpacklo_epi16(even, odd);
    const __m256i hi = _mm256_unpackhi_epi16(even, odd);
    cypq_store_bounds8n(_mm256_castsi256_si128(lo), delta, base0, lb0, n0);
    cypq_store_bounds8n(_mm256_castsi256_si128(hi), delta, base0, lb0 + 8, n0 - 8);
    cypq_store_bounds8n(_mm256_extracti128_si256(lo, 1), delta, base1, lb1, n1);
    cypq_store_bounds8n(_mm256_extracti128_si256(hi, 1), delta, base1, lb1 + 8, n1 - 8);
}

/* The bounds of a block of 32 codes from their sums (cypq_even_sums) to lb[0 .. 32). */
CYPQ_AVX2 CYPQ_INLINE void cypq_store_bounds32(__m256i even, __m256i odd, __m256 delta,
                                               __m256 base, float *lb) {
    cypq_store_bounds2x16(even, odd, delta, base, lb, 16, base, lb + 16, 16);
}

/* Every code's lower bound, as the AVX2 loop compares it, to lb (n rounded up to 32 entries,
 * those past n undefined): the two-phase scan's first phase (see _search.pyx). */
#define CYPQ_ADC4_AVX2_BOUNDS_BODY(WW)                                                      \
    const int W = (WW);                                                                     \
    uint8_t pad[32 * CYPQ_ADC4_AVX2_MAX_W + 16];                                            \
    const __m256 base = _mm256_set1_ps(cell->base - cell->slack);                           \
    const __m256 delta = _mm256_set1_ps(cell->delta);                                       \
    for (int64_t i = 0; i < n; i += 32) {                                                   \
        __m256i even, odd;                                                                  \
        cypq_adc4_avx2_sums(cell, cypq_adc4_avx2_block(codes, i, n, W, pad), W, &even, &odd); \
        cypq_store_bounds32(even, odd, delta, base, lb + i);                                \
    }                                                                                       \
    return n;

CYPQ_AVX2 static int64_t cypq_adc4_avx2_bounds(const cypq_adc4_cell *cell, const uint8_t *codes,
                                               int64_t n, float *lb) {
    CYPQ_ADC4_BY_WIDTH(CYPQ_ADC4_AVX2_BOUNDS_BODY, cell->plan->W)
}

/* The same loop built for AVX-512VL: its 32 vector registers hold a chunk's 16 transposed
 * columns and the lookups' operands, which AVX2's 16 spilled to the stack. Bit-identical. */
CYPQ_AVX512 static int64_t cypq_adc4_avx512_bounds(const cypq_adc4_cell *cell,
                                                   const uint8_t *codes, int64_t n, float *lb) {
    CYPQ_ADC4_BY_WIDTH(CYPQ_ADC4_AVX2_BOUNDS_BODY, cell->plan->W)
}

/* cypq_adc4_avx2_bounds of codes already in blocks (cypq_adc4_blocks): no transposes, so
 * a cell that several queries of a batch scan is transposed once. The same bounds. */
#define CYPQ_ADC4_AVX2_BLOCK_BOUNDS_BODY(WW)                                                \
    const int W = (WW), H = W / 2;                                                          \
    const __m256 base = _mm256_set1_ps(cell->base - cell->slack);                           \
    const __m256 delta = _mm256_set1_ps(cell->delta);                                       \
    for (int64_t i = 0; i < n; i += 32, blocks += 32 * W) {                                 \
        __m256i acc = _mm256_setzero_si256(), od = _mm256_setzero_si256();                  \
        /* (unrolled whole, GCC hoisted every lookup and spilled them: 1.3x the time) */    \
        _Pragma("GCC unroll 2")                                                             \
        for (int j = 0; j < H; j++)                                                         \
            cypq_adc4_avx2_column(cell->Q0 + 32 * j, _mm256_loadu_si256(                    \
                (const __m256i *)(blocks + 32 * j)), &acc, &od);                            \
        _Pragma("GCC unroll 2")                                                             \
        for (int j = 0; j < H; j++)                                                         \
            cypq_adc4_avx2_column(cell->Q1 + 32 * j, _mm256_loadu_si256(                    \
                (const __m256i *)(blocks + 32 * (H + j))), &acc, &od);                      \
        cypq_store_bounds32(cypq_even_sums(acc, od), od, delta, base, lb + i);              \
    }                                                                                       \
    return n;

CYPQ_AVX2 static int64_t cypq_adc4_avx2_block_bounds(const cypq_adc4_cell *cell,
                                                     const uint8_t *blocks, int64_t n,
                                                     float *lb) {
    CYPQ_ADC4_BY_WIDTH(CYPQ_ADC4_AVX2_BLOCK_BOUNDS_BODY, cell->plan->W)
}

/* The bounds of two tails of at most 16 codes (cypq_adc4_tail) in one block of 32: a's rows
 * in the low 128-bit lanes, b's in the high ones, each lane looking up its own cell's tables
 * (b NULL: a alone). REALSIFT1M's cells at V = 256 hold ~15 codes (a query at quota 10000
 * lists ~220 of ~45): in blocks of their own its bounds took 1.41 lanes per code, with the
 * tails shared 1.19. Only the tails' own bounds are written (the scan has already written
 * the bounds of the codes after a). */
#define CYPQ_ADC4_AVX2_TAILS_BODY(WW)                                                       \
    const int W = (WW), H = W / 2, chunks = (W + 15) / 16;                                  \
    const cypq_adc4_tail *t[2] = {a, b != NULL ? b : a};                                    \
    uint8_t pad[2][16 * CYPQ_ADC4_AVX2_MAX_W + 16];                                         \
    const uint8_t *src[2];                                                                  \
    for (int s = 0; s < 2; s++) {   /* a row's last load would pass the codes' end */        \
        src[s] = t[s]->codes;                                                               \
        if (W % 16) {                                                                       \
            memcpy(pad[s], src[s], (size_t)(t[s]->n * W));                                  \
            memset(pad[s] + t[s]->n * W, 0, 16);                                            \
            src[s] = pad[s];                                                                \
        }                                                                                   \
    }                                                                                       \
    const int na = (int)t[0]->n, nb = (int)t[1]->n;                                         \
    __m256i acc = _mm256_setzero_si256(), od = _mm256_setzero_si256();                      \
    for (int ch = 0; ch < chunks; ch++) {                                                   \
        __m256i x[16];                                                                      \
        cypq_adc4_avx2_chunk2(src[0], na, src[1], nb, W, ch, x);                            \
        const int cols = W - 16 * ch < 16 ? W - 16 * ch : 16;                              \
        for (int c = 0; c < cols; c++) {                                                    \
            const int j = 16 * ch + c;                                                      \
            const uint8_t *qa = j < H ? t[0]->cell.Q0 + 32 * j : t[0]->cell.Q1 + 32 * (j - H); \
            const uint8_t *qb = j < H ? t[1]->cell.Q0 + 32 * j : t[1]->cell.Q1 + 32 * (j - H); \
            cypq_adc4_avx2_lookup(                                                          \
                _mm256_loadu2_m128i((const __m128i *)qb, (const __m128i *)qa),              \
                _mm256_loadu2_m128i((const __m128i *)(qb + 16), (const __m128i *)(qa + 16)), \
                x[c], &acc, &od);                                                           \
        }                                                                                   \
    }                                                                                       \
    cypq_store_bounds2x16(cypq_even_sums(acc, od), od, _mm256_set1_ps(a->cell.delta),       \
                          _mm256_set1_ps(a->cell.base - a->cell.slack), a->lb, na,          \
                          _mm256_set1_ps(t[1]->cell.base - t[1]->cell.slack), t[1]->lb,     \
                          b != NULL ? nb : 0);                                              \
    return 0;

CYPQ_AVX2 static int cypq_adc4_avx2_tails(const cypq_adc4_tail *a, const cypq_adc4_tail *b) {
    CYPQ_ADC4_BY_WIDTH(CYPQ_ADC4_AVX2_TAILS_BODY, a->cell.plan->W)
}

/* cypq_adc4_avx2_tails built for AVX-512VL (see cypq_adc4_avx512_bounds). */
CYPQ_AVX512 static int cypq_adc4_avx512_tails(const cypq_adc4_tail *a, const cypq_adc4_tail *b) {
    CYPQ_ADC4_BY_WIDTH(CYPQ_ADC4_AVX2_TAILS_BODY, a->cell.plan->W)
}

/* n codes of W bytes (W <= CYPQ_ADC4_AVX2_MAX_W) in blocks of 32 (cypq_adc4_blocks). */
CYPQ_AVX2 static void cypq_adc4_avx2_to_blocks(const uint8_t *codes, int64_t n, int W,
                                               uint8_t *out) {
    uint8_t pad[32 * CYPQ_ADC4_AVX2_MAX_W + 16];
    for (int64_t i = 0; i < n; i += 32, out += 32 * W) {
        const uint8_t *blk = cypq_adc4_avx2_block(codes, i, n, W, pad);
        for (int ch = 0; ch < (W + 15) / 16; ch++) {
            __m256i a[16];
            cypq_adc4_avx2_chunk(blk, W, ch, a);
            for (int c = 0; c < 16 && 16 * ch + c < W; c++)
                _mm256_storeu_si256((__m256i *)(out + 32 * (16 * ch + c)), a[c]);
        }
    }
}

/* The lane numbers of the set bits of an 8-bit mask, in order, then zeros: a permute by them
 * packs the selected lanes first. */
CYPQ_AVX2 CYPQ_INLINE __m256i cypq_lanes_of(unsigned bits) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)cypq_set_lanes[bits]));
}

/* Rows i < n with lo < lb[i] <= hi to idx (room for 8 more than them), ascending; returns
 * how many. Each 8 rows' passing ones are packed with one permute (a tenth pass, in no
 * order a branch predicts; one store per row cost 8% of a MANMINILM 24-byte search). */
CYPQ_AVX2 static int64_t cypq_rows_within(const float *lb, int64_t n, float lo, float hi,
                                          int32_t *idx) {
    const __m256 l = _mm256_set1_ps(lo), h = _mm256_set1_ps(hi);
    int64_t m = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(lb + i);
        const unsigned bits = (unsigned)_mm256_movemask_ps(_mm256_and_ps(
            _mm256_cmp_ps(x, l, _CMP_GT_OQ), _mm256_cmp_ps(x, h, _CMP_LE_OQ)));
        _mm256_storeu_si256((__m256i *)(idx + m), _mm256_add_epi32(
            cypq_lanes_of(bits), _mm256_set1_epi32((int32_t)i)));
        m += __builtin_popcount(bits);
    }
    for (; i < n; i++)
        if (lb[i] > lo && lb[i] <= hi) idx[m++] = (int32_t)i;
    return m;
}

/* Entries idx (8 int32 in 0..15) of the 16 floats at t. */
CYPQ_AVX2 CYPQ_INLINE __m256 cypq_lookup16(const float *t, __m256i idx) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(t), idx),
                            _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 8), idx),
                            _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* cypq_adc4_rows of the n codes at codes, 8 rows at a time where W % 8 == 0 and
 * the n codes' bytes stay below 2^31: each lane sums its code's entries in cypq_adc4_one's
 * order (the same four chains, so the same bits); a code's bytes 4g .. 4g + 3 of both
 * halves come in one gather, each nibble's entry by two permutes. The float sums were a
 * scalar chain of loads per code (a fifth of a MANMINILM 24-byte search). */
CYPQ_AVX2 static int64_t cypq_adc4_avx2_rows(const float *T0, const float *T1, const int W,
                                             const uint8_t *codes, int64_t n,
                                             const int32_t *rows, int64_t m, float thresh,
                                             float *out, int32_t *idx) {
    const int H = W / 2;
    int64_t cnt = 0, j = 0;
    if (W % 8 == 0 && n * W < INT32_MAX) {
        const __m256i width = _mm256_set1_epi32(W), nib = _mm256_set1_epi32(15);
        const __m256 th = _mm256_set1_ps(thresh);
        for (; j + 8 <= m; j += 8) {
            const __m256i rv = _mm256_loadu_si256((const __m256i *)(rows + j));
            const __m256i at = _mm256_mullo_epi32(rv, width);
            __m256 e0 = _mm256_setzero_ps(), o0 = e0, e1 = e0, o1 = e0;
            for (int g = 0; g < H; g += 4) {
                const __m256i x4 = _mm256_i32gather_epi32(
                    (const int *)codes, _mm256_add_epi32(at, _mm256_set1_epi32(g)), 1);
                const __m256i y4 = _mm256_i32gather_epi32(
                    (const int *)codes, _mm256_add_epi32(at, _mm256_set1_epi32(H + g)), 1);
                for (int b = 0; b < 4; b++) {
                    const __m256i x = _mm256_srli_epi32(x4, 8 * b);
                    const __m256i y = _mm256_srli_epi32(y4, 8 * b);
                    const float *t0 = T0 + (g + b) * 32, *t1 = T1 + (g + b) * 32;
                    e0 = _mm256_add_ps(e0, cypq_lookup16(t0, _mm256_and_si256(x, nib)));
                    o0 = _mm256_add_ps(o0, cypq_lookup16(t0 + 16, _mm256_and_si256(
                        _mm256_srli_epi32(x, 4), nib)));
                    e1 = _mm256_add_ps(e1, cypq_lookup16(t1, _mm256_and_si256(y, nib)));
                    o1 = _mm256_add_ps(o1, cypq_lookup16(t1 + 16, _mm256_and_si256(
                        _mm256_srli_epi32(y, 4), nib)));
                }
            }
            const __m256 sum = _mm256_add_ps(_mm256_add_ps(e0, o0), _mm256_add_ps(e1, o1));
            const unsigned pass = (unsigned)_mm256_movemask_ps(
                _mm256_cmp_ps(sum, th, _CMP_LE_OQ));
            const __m256i lanes = cypq_lanes_of(pass);
            /* (rows j .. j + 7 are read: idx + cnt + 7 <= rows + j + 7 may overwrite them) */
            _mm256_storeu_ps(out + cnt, _mm256_permutevar8x32_ps(sum, lanes));
            _mm256_storeu_si256((__m256i *)(idx + cnt), _mm256_permutevar8x32_epi32(rv, lanes));
            cnt += __builtin_popcount(pass);
        }
    }
    return cnt + cypq_adc4_rows(T0, T1, W, codes, rows + j, m - j, thresh, out + cnt,
                                idx + cnt);
}

/* cypq_adc4_avx2_rows 16 rows at a time (AVX-512F, where W % 8 == 0 and the n codes' bytes
 * stay below 2^31): a nibble's entry is one vpermps of its subquantizer's 16 floats, where
 * AVX2 takes two and a blend for 8 rows; the sums in the same order, so the same bits. The
 * last 4 .. 15 rows take masked lanes (a sweep lists a few rows per segment), fewer are
 * summed one by one. */
CYPQ_AVX512 static int64_t cypq_adc4_avx512_rows(const float *T0, const float *T1, const int W,
                                                 const uint8_t *codes, int64_t n,
                                                 const int32_t *rows, int64_t m, float thresh,
                                                 float *out, int32_t *idx) {
    const int H = W / 2;
    int64_t cnt = 0, j = 0;
    if (W % 8 == 0 && n * W < INT32_MAX) {
        const __m512i width = _mm512_set1_epi32(W);
        const __m512 th = _mm512_set1_ps(thresh);
        for (; j + 4 <= m; j += 16) {
            const __mmask16 live = m - j >= 16 ? 0xFFFF : (__mmask16)((1u << (m - j)) - 1);
            const __m512i rv = _mm512_maskz_loadu_epi32(live, rows + j);   /* (others: row 0) */
            const __m512i at = _mm512_mullo_epi32(rv, width);
            __m512 e0 = _mm512_setzero_ps(), o0 = e0, e1 = e0, o1 = e0;
            for (int g = 0; g < H; g += 4) {
                const __m512i x4 = _mm512_i32gather_epi32(
                    _mm512_add_epi32(at, _mm512_set1_epi32(g)), codes, 1);
                const __m512i y4 = _mm512_i32gather_epi32(
                    _mm512_add_epi32(at, _mm512_set1_epi32(H + g)), codes, 1);
                for (int b = 0; b < 4; b++) {   /* (vpermps reads an index's low 4 bits) */
                    const __m512i x = _mm512_srli_epi32(x4, 8 * b);
                    const __m512i y = _mm512_srli_epi32(y4, 8 * b);
                    const float *t0 = T0 + (g + b) * 32, *t1 = T1 + (g + b) * 32;
                    e0 = _mm512_add_ps(e0, _mm512_permutexvar_ps(x, _mm512_loadu_ps(t0)));
                    o0 = _mm512_add_ps(o0, _mm512_permutexvar_ps(_mm512_srli_epi32(x, 4),
                                                                 _mm512_loadu_ps(t0 + 16)));
                    e1 = _mm512_add_ps(e1, _mm512_permutexvar_ps(y, _mm512_loadu_ps(t1)));
                    o1 = _mm512_add_ps(o1, _mm512_permutexvar_ps(_mm512_srli_epi32(y, 4),
                                                                 _mm512_loadu_ps(t1 + 16)));
                }
            }
            const __m512 sum = _mm512_add_ps(_mm512_add_ps(e0, o0), _mm512_add_ps(e1, o1));
            const __mmask16 keep = _mm512_mask_cmp_ps_mask(live, sum, th, _CMP_LE_OQ);
            /* (rows j .. j + 15 are read: idx + cnt <= rows + j may overwrite them) */
            cypq_store_selected_ps(out + cnt, keep, sum);
            cypq_store_selected_epi32(idx + cnt, keep, rv);
            cnt += __builtin_popcount(keep);
        }
        if (j > m) j = m;
    }
    return cnt + cypq_adc4_rows(T0, T1, W, codes, rows + j, m - j, thresh, out + cnt,
                                idx + cnt);
}

/* A value with about `want` (0 < want < n) of the n floats lb at most it: the upper edge of
 * the bucket, of 256 between their minimum and maximum, that holds the want-th smallest
 * (of a sample, when n is large); hist: 256 ints of scratch. (The two-phase scan is exact
 * whatever this returns; a close guess only spares it work.) */
CYPQ_AVX2 static float cypq_bound_quantile(const float *lb, int64_t n, int64_t want,
                                           int32_t *hist) {
    __m256 mn = _mm256_set1_ps(INFINITY), mx = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(lb + i);
        mn = _mm256_min_ps(mn, x);
        mx = _mm256_max_ps(mx, x);
    }
    float lo[8], hi[8], a = INFINITY, b = -INFINITY;
    _mm256_storeu_ps(lo, mn);
    _mm256_storeu_ps(hi, mx);
    for (int j = 0; j < 8; j++) {
        a = lo[j] < a ? lo[j] : a;
        b = hi[j] > b ? hi[j] : b;
    }
    for (; i < n; i++) {
        a = lb[i] < a ? lb[i] : a;
        b = lb[i] > b ? lb[i] : b;
    }
    if (!(b > a) || !isfinite(b - a)) return b;
    /* a sample of 4 want of them (every step-th), and of 256 at least, tells it closely
     * enough: 4 want alone, for want = 1 (k = 1), was 4 bounds, whose smallest let a quarter
     * of the codes through (a query summed 147-1468 codes in float where 3-35 do now, at
     * k = 10 26-181 where 14-45 do) */
    const int64_t samples = 4 * want > 256 ? 4 * want : 256;
    const int64_t step = n / samples > 1 ? n / samples : 1;
    const float scale = 256.f / (b - a);
    memset(hist, 0, 256 * sizeof *hist);
    for (i = 0; i < n; i += step) {
        const int at = (int)((lb[i] - a) * scale);   /* (a NaN's: INT_MIN, bucket 0) */
        hist[at < 0 ? 0 : (at > 255 ? 255 : at)]++;
    }
    want = (want + step - 1) / step;
    int64_t seen = 0;
    for (int j = 0; j < 255; j++) {
        seen += hist[j];
        if (seen >= want) return a + (float)(j + 1) / scale;
    }
    return b;
}
#else
/* No bounds here: plans say so, and nothing quantises or takes the two-phase scan. */
static int64_t cypq_adc4_avx2_bounds(const cypq_adc4_cell *cell, const uint8_t *codes,
                                     int64_t n, float *lb) {
    (void)cell; (void)codes; (void)lb;
    return n;
}
static int64_t cypq_rows_within(const float *lb, int64_t n, float lo, float hi, int32_t *idx) {
    (void)lb; (void)n; (void)lo; (void)hi; (void)idx;
    return 0;
}
static float cypq_bound_quantile(const float *lb, int64_t n, int64_t want, int32_t *hist) {
    (void)lb; (void)n; (void)want; (void)hist;
    return INFINITY;
}
static int64_t cypq_adc4_avx2_block_bounds(const cypq_adc4_cell *cell, const uint8_t *blocks,
                                           int64_t n, float *lb) {
    (void)cell; (void)blocks; (void)lb;
    return n;
}
static int cypq_adc4_avx2_tails(const cypq_adc4_tail *a, const cypq_adc4_tail *b) {
    (void)a; (void)b;
    return 0;
}
static int64_t cypq_adc4_avx2_rows(const float *T0, const float *T1, const int W,
                                   const uint8_t *codes, int64_t n, const int32_t *rows,
                                   int64_t m, float thresh, float *out, int32_t *idx) {
    (void)n;
    return cypq_adc4_rows(T0, T1, W, codes, rows, m, thresh, out, idx);
}
static float cypq_quantize4(const float *T, int64_t rows, int m, uint8_t *Q, float *bias,
                            float *slack) {
    (void)T; (void)rows; (void)m; (void)Q; (void)bias;
    *slack = 0.f;
    return 1.f;
}
#endif

/* n codes of W bytes in blocks of 32 for cypq_adc4_avx2_block_bounds: block b (32 W bytes
 * at out + 32 W b) holds byte c of its row r at 32 c + r (rows past n: zero). The same
 * bytes from the AVX2 path and the portable one. */
static void cypq_adc4_blocks(const uint8_t *codes, int64_t n, int W, uint8_t *out) {
#if CYPQ_WIDE
    if (W <= CYPQ_ADC4_AVX2_MAX_W && __builtin_cpu_supports("avx2") && cypq_fastscan_limit < 2) {
        cypq_adc4_avx2_to_blocks(codes, n, W, out);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i += 32, out += 32 * W)
        for (int c = 0; c < W; c++)
            for (int r = 0; r < 32; r++)
                out[32 * c + r] = i + r < n ? codes[(i + r) * W + c] : 0;
}

/* The two-phase sweeps' float sums of listed rows (cypq_adc4_avx2_rows), 16 at a time where
 * the plan allows. */
static inline int64_t cypq_adc4_listed(const cypq_adc4_plan *p, const float *T0, const float *T1,
                                       const uint8_t *codes, int64_t n, const int32_t *rows,
                                       int64_t m, float thresh, float *out, int32_t *idx) {
#if CYPQ_WIDE
    if (p->rows16)
        return cypq_adc4_avx512_rows(T0, T1, p->W, codes, n, rows, m, thresh, out, idx);
#endif
    return cypq_adc4_avx2_rows(T0, T1, p->W, codes, n, rows, m, thresh, out, idx);
}

/* The two-phase scan's bounds of n codes (not in blocks) to lb: VBMI's blocks of 16 where the
 * plan has bounds16 (lb[0 .. n) written), else AVX2's of 32 (n rounded up to 32 written). */
static inline void cypq_adc4_bounds(const cypq_adc4_cell *cell, const uint8_t *codes, int64_t n,
                                    float *lb) {
#if CYPQ_WIDE
    if (cell->plan->bounds16) {
        cypq_adc4_vbmi_bounds(cell, codes, n, lb);
        return;
    }
    if (cell->plan->rows16) {   /* (AVX-512 F, BW, VL, DQ) */
        cypq_adc4_avx512_bounds(cell, codes, n, lb);
        return;
    }
#endif
    cypq_adc4_avx2_bounds(cell, codes, n, lb);
}

/* The two-phase scan's bounds of two tails in one block (cypq_adc4_avx2_tails). */
static inline int cypq_adc4_tails(const cypq_adc4_tail *a, const cypq_adc4_tail *b) {
#if CYPQ_WIDE
    if (a->cell.plan->rows16)
        return cypq_adc4_avx512_tails(a, b);
#endif
    return cypq_adc4_avx2_tails(a, b);
}

/* cypq_adc4 through the cell's bounds where the plan allows (cell NULL: no bounds). */
static inline int64_t cypq_adc4_cells(const float *T0, const float *T1, int W,
                                      const cypq_adc4_cell *cell, const uint8_t *codes,
                                      int64_t n, float thresh, float *out, int32_t *idx) {
#if CYPQ_WIDE
    if (cell != NULL) {   /* (an infinite threshold: every bound passes; VBMI sums in SIMD) */
        if (cell->plan->path == CYPQ_ADC4_VBMI)
            return n >= CYPQ_ADC4_BLOCK_FROM
                       ? cypq_adc4_vbmi16(T0, T1, cell, codes, n, thresh, out, idx)
                       : cypq_adc4_vbmi(T0, T1, cell, codes, n, thresh, out, idx);
        if (cell->plan->path == CYPQ_ADC4_AVX2 && thresh < INFINITY)
            return cypq_adc4_avx2(T0, T1, cell, codes, n, thresh, out, idx);
    }
#endif
    return cypq_adc4(T0, T1, W, codes, n, thresh, out, idx);
}

#endif
