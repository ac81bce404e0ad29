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

#define CYPQ_VW 16
typedef float cypq_vf __attribute__((vector_size(64)));
typedef int32_t cypq_vi __attribute__((vector_size(64)));

static inline cypq_vf cypq_vload(const float *p) {
    cypq_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Reduce per-lane (best value, best index) to the overall minimum, ties to the lowest index. */
static inline int32_t cypq_reduce_best(cypq_vf bv, cypq_vi bi, float *best) {
    float b = FLT_MAX;
    int32_t idx = -1;
    for (int l = 0; l < CYPQ_VW; l++) {
        if (bi[l] < 0) continue;
        if (bv[l] < b || (bv[l] == b && bi[l] < idx)) {
            b = bv[l];
            idx = bi[l];
        }
    }
    *best = b;
    return idx;
}

/*
 * Nearest of K codewords to x (d dims) by exact squared L2 (sum of squared differences, as
 * faiss's fvec_L2sqr_ny_nearest), first index on ties. Returns the index; *best gets the distance.
 */
CYPQ_CLONES
static int32_t cypq_nearest_l2(const float *x, const float *CT, int d, int K, float *best) {
    cypq_vf bv = {0};
    cypq_vi bi, lane;
    for (int l = 0; l < CYPQ_VW; l++) {
        bv[l] = FLT_MAX;
        bi[l] = -1;
        lane[l] = l;
    }
    int k0 = 0;
    for (; k0 + CYPQ_VW <= K; k0 += CYPQ_VW) {
        cypq_vf acc = {0};
        for (int j = 0; j < d; j++) {
            cypq_vf t = x[j] - cypq_vload(CT + (int64_t)j * K + k0);
            acc += t * t;
        }
        cypq_vi m = acc < bv;
        bv = (cypq_vf)(((cypq_vi)acc & m) | ((cypq_vi)bv & ~m));
        bi = ((lane + k0) & m) | (bi & ~m);
    }
    float b;
    int32_t idx = cypq_reduce_best(bv, bi, &b);
    for (int k = k0; k < K; k++) {
        float acc = 0.f;
        for (int j = 0; j < d; j++) {
            float t = x[j] - CT[(int64_t)j * K + k];
            acc += t * t;
        }
        if (acc < b || idx < 0) {
            b = acc;
            idx = k;
        }
    }
    *best = b;
    return idx;
}

/*
 * cypq_nearest_l2 for 4 vectors at once (x0..x3, each d dims): one pass over the codebook serves
 * four independent accumulation chains, which hides FMA latency and quarters codebook loads.
 */
CYPQ_CLONES
static void cypq_nearest_l2_x4(const float *x0, const float *x1, const float *x2,
                               const float *x3, const float *CT, int d, int K,
                               int32_t *idx, float *best) {
    const float *xs[4] = {x0, x1, x2, x3};
    cypq_vf bv[4];
    cypq_vi bi[4], lane;
    for (int l = 0; l < CYPQ_VW; l++) lane[l] = l;
    for (int p = 0; p < 4; p++)
        for (int l = 0; l < CYPQ_VW; l++) {
            bv[p][l] = FLT_MAX;
            bi[p][l] = -1;
        }
    int k0 = 0;
    for (; k0 + CYPQ_VW <= K; k0 += CYPQ_VW) {
        cypq_vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int j = 0; j < d; j++) {
            cypq_vf c = cypq_vload(CT + (int64_t)j * K + k0);
            cypq_vf t0 = x0[j] - c, t1 = x1[j] - c, t2 = x2[j] - c, t3 = x3[j] - c;
            a0 += t0 * t0;
            a1 += t1 * t1;
            a2 += t2 * t2;
            a3 += t3 * t3;
        }
        cypq_vf accs[4] = {a0, a1, a2, a3};
        cypq_vi ids = lane + k0;
        for (int p = 0; p < 4; p++) {
            cypq_vi m = accs[p] < bv[p];
            bv[p] = (cypq_vf)(((cypq_vi)accs[p] & m) | ((cypq_vi)bv[p] & ~m));
            bi[p] = (ids & m) | (bi[p] & ~m);
        }
    }
    for (int p = 0; p < 4; p++) {
        float b;
        int32_t id = cypq_reduce_best(bv[p], bi[p], &b);
        for (int k = k0; k < K; k++) {
            float acc = 0.f;
            for (int j = 0; j < d; j++) {
                float t = xs[p][j] - CT[(int64_t)j * K + k];
                acc += t * t;
            }
            if (acc < b || id < 0) {
                b = acc;
                id = k;
            }
        }
        idx[p] = id;
        best[p] = b;
    }
}

/*
 * argmin over k of cnorm[k] + g[k], where g = -2 <x, c_k> comes from sgemm. Returns the index;
 * *best gets cnorm[k] + g[k] (add ||x||^2 for the squared distance).
 */
CYPQ_CLONES
static int32_t cypq_argmin_shifted(const float *g, const float *cnorm, int K, float *best) {
    cypq_vf bv;
    cypq_vi bi, lane;
    for (int l = 0; l < CYPQ_VW; l++) {
        bv[l] = FLT_MAX;
        bi[l] = -1;
        lane[l] = l;
    }
    int k0 = 0;
    for (; k0 + CYPQ_VW <= K; k0 += CYPQ_VW) {
        cypq_vf v = cypq_vload(g + k0) + cypq_vload(cnorm + k0);
        cypq_vi m = v < bv;
        bv = (cypq_vf)(((cypq_vi)v & m) | ((cypq_vi)bv & ~m));
        bi = ((lane + k0) & m) | (bi & ~m);
    }
    float b;
    int32_t idx = cypq_reduce_best(bv, bi, &b);
    for (int k = k0; k < K; k++) {
        float v = g[k] + cnorm[k];
        if (v < b || idx < 0) {
            b = v;
            idx = k;
        }
    }
    *best = b;
    return idx;
}

/* out[k] = sum_j (x[j] - CT[j, k])^2 for all K codewords. */
CYPQ_CLONES
static void cypq_l2sqr_ny(const float *x, const float *CT, int d, int K, float *out) {
    for (int k = 0; k < K; k++) out[k] = 0.f;
    for (int j = 0; j < d; j++) {
        const float xj = x[j];
        const float *row = CT + (int64_t)j * K;
        for (int k = 0; k < K; k++) {
            float t = xj - row[k];
            out[k] += t * t;
        }
    }
}

/* out[k] = sum_j x[j] * CT[j, k] for all K codewords. */
CYPQ_CLONES
static void cypq_ip_ny(const float *x, const float *CT, int d, int K, float *out) {
    for (int k = 0; k < K; k++) out[k] = 0.f;
    for (int j = 0; j < d; j++) {
        const float xj = x[j];
        const float *row = CT + (int64_t)j * K;
        for (int k = 0; k < K; k++) out[k] += xj * row[k];
    }
}

/*
 * Asymmetric distances of n codes (n x M, row-major) for one table T (M x Ks):
 * out[i] = sum_m T[m, codes[i, m]]. Summed in subspace order, as faiss does.
 */
#define CYPQ_ADC(NAME, CODE_T)                                                              \
    CYPQ_CLONES                                                                             \
    static void NAME(const float *T, int M, int Ks, const CODE_T *codes, int64_t n,         \
                     float *out) {                                                          \
        if (M == 8) {                                                                       \
            for (int64_t i = 0; i < n; i++) {                                               \
                const CODE_T *c = codes + i * 8;                                            \
                out[i] = T[c[0]] + T[Ks + c[1]] + T[2 * Ks + c[2]] + T[3 * Ks + c[3]] +     \
                         T[4 * Ks + c[4]] + T[5 * Ks + c[5]] + T[6 * Ks + c[6]] +           \
                         T[7 * Ks + c[7]];                                                  \
            }                                                                               \
            return;                                                                         \
        }                                                                                   \
        if (M == 16) {                                                                      \
            for (int64_t i = 0; i < n; i++) {                                               \
                const CODE_T *c = codes + i * 16;                                           \
                float s = 0.f;                                                              \
                for (int m = 0; m < 16; m++) s += T[m * Ks + c[m]];                         \
                out[i] = s;                                                                 \
            }                                                                               \
            return;                                                                         \
        }                                                                                   \
        for (int64_t i = 0; i < n; i++) {                                                   \
            const CODE_T *c = codes + i * (int64_t)M;                                       \
            float s = 0.f;                                                                  \
            for (int m = 0; m < M; m++) s += T[(int64_t)m * Ks + c[m]];                     \
            out[i] = s;                                                                     \
        }                                                                                   \
    }

CYPQ_ADC(cypq_adc_u8, uint8_t)
CYPQ_ADC(cypq_adc_u16, uint16_t)
CYPQ_ADC(cypq_adc_u32, uint32_t)

#endif
