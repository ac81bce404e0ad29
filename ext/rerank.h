/* Exact scores of one stored vector against a float32 query, for re-ranking.
 *
 * kind 0: squared L2 distance; 1: minus the inner product; 2: minus the cosine (the query
 * of unit norm; 0 for a zero vector). Stored vectors are uint8, IEEE half (as its bits,
 * little-endian), float32, or 8-bit scalar-quantised (sq8: value lo[j] + step[j] * code[j],
 * with sq = lo (d floats) then step (d floats)); sums in float32. */
#ifndef CYPQ_RERANK_H
#define CYPQ_RERANK_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float cypq_half(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    if (e == 0x1f) {
        bits = sign | 0x7f800000u | (m << 13);            /* inf, NaN */
    } else if (e) {
        bits = sign | ((e + 112) << 23) | (m << 13);      /* normal: rebias 15 -> 127 */
    } else {                                               /* zero, subnormal: m * 2^-24 */
        float f = (float)m * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* 8 running sums (lane j % 8), added up at the end: independent additions the compiler
 * turns into SIMD, in a fixed order, so every build gives the same scores. */
#define CYPQ_SCORE_BODY(LOAD)                                                    \
    float s8[8] = {0}, n8[8] = {0}, t, s = 0, n = 0;                             \
    int64_t j = 0, d8 = d & ~(int64_t)7;                                         \
    if (kind == 0) {                                                             \
        for (; j < d8; j += 8)                                                   \
            for (int l = 0; l < 8; l++) {                                        \
                t = q[j + l] - (LOAD(j + l)); s8[l] += t * t;                    \
            }                                                                    \
        for (int l = 0; l < 8; l++) s += s8[l];                                  \
        for (; j < d; j++) { t = q[j] - (LOAD(j)); s += t * t; }                 \
        return s;                                                                \
    }                                                                            \
    for (; j < d8; j += 8)                                                       \
        for (int l = 0; l < 8; l++) {                                            \
            t = LOAD(j + l); s8[l] += q[j + l] * t; n8[l] += t * t;              \
        }                                                                        \
    for (int l = 0; l < 8; l++) { s += s8[l]; n += n8[l]; }                      \
    for (; j < d; j++) { t = LOAD(j); s += q[j] * t; n += t * t; }               \
    if (kind == 1) return -s;                                                    \
    return n > 0 ? -s / sqrtf(n) : 0.0f;

#define CYPQ_U8(i) ((float)x[i])
#define CYPQ_F16(i) (cypq_half(x[i]))
#define CYPQ_F32(i) (x[i])
#define CYPQ_SQ8(i) (sq[i] + sq[d + (i)] * (float)x[i])

static inline float cypq_score_u8(const float *q, const uint8_t *x, int64_t d, int kind) {
    CYPQ_SCORE_BODY(CYPQ_U8)
}

static inline float cypq_score_f16(const float *q, const uint16_t *x, int64_t d, int kind) {
    CYPQ_SCORE_BODY(CYPQ_F16)
}

static inline float cypq_score_f32(const float *q, const float *x, int64_t d, int kind) {
    CYPQ_SCORE_BODY(CYPQ_F32)
}

static inline float cypq_score_sq8(const float *q, const uint8_t *x, const float *sq,
                                   int64_t d, int kind) {
    CYPQ_SCORE_BODY(CYPQ_SQ8)
}

/* The score of the vector at address x (vtype 0 uint8, 1 half, 2 float32, 3 sq8 with its
 * ranges sq; sq is not read for the others). */
static inline float cypq_score(const float *q, const void *x, int64_t d, int vtype, int kind,
                               const float *sq) {
    if (vtype == 0) return cypq_score_u8(q, (const uint8_t *)x, d, kind);
    if (vtype == 1) return cypq_score_f16(q, (const uint16_t *)x, d, kind);
    if (vtype == 3) return cypq_score_sq8(q, (const uint8_t *)x, sq, d, kind);
    return cypq_score_f32(q, (const float *)x, d, kind);
}

#endif
