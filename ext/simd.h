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

/* Loops whose best blocking differs between AVX-512 (32 registers of 64 bytes) and AVX2 (16
 * of 32) have a second version for x86-64-v4, picked at run time by cypq_wide(). */
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

/* Helpers that take or return vectors must be inlined into each clone: called across clones,
 * a 64-byte vector argument would be passed under different ABIs (GCC's -Wpsabi warning). */
#define CYPQ_INLINE static inline __attribute__((always_inline))

#define CYPQ_VW 16
typedef float cypq_vf __attribute__((vector_size(64)));
typedef int32_t cypq_vi __attribute__((vector_size(64)));

CYPQ_INLINE cypq_vf cypq_vload(const float *p) {
    cypq_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Reduce per-lane (best value, best index) to the overall minimum, ties to the lowest index:
 * a tree of lane swaps (4 steps) instead of a scalar loop over 16 lanes. */
CYPQ_INLINE int32_t cypq_reduce_best(cypq_vf bv, cypq_vi bi, float *best) {
    cypq_vi lane;
    for (int l = 0; l < CYPQ_VW; l++) lane[l] = l;
    cypq_vf m = bv;
    for (int s = CYPQ_VW / 2; s >= 1; s /= 2) {
        cypq_vf t = __builtin_shuffle(m, lane ^ s);
        cypq_vi lt = t < m;
        m = (cypq_vf)(((cypq_vi)t & lt) | ((cypq_vi)m & ~lt));
    }
    /* Among the lanes holding the minimum, the smallest index (-1 lanes never hold it unless
     * every lane is empty, and then -1 is the right answer). */
    cypq_vi sel = bv == m;
    cypq_vi c = (bi & sel) | (((cypq_vi){0} + INT32_MAX) & ~sel);
    for (int s = CYPQ_VW / 2; s >= 1; s /= 2) {
        cypq_vi t = __builtin_shuffle(c, lane ^ s);
        cypq_vi lt = t < c;
        c = (t & lt) | (c & ~lt);
    }
    *best = m[0];
    return c[0];
}

/* Per-lane running minimum of a block of 16 values and its index. */
#define CYPQ_TRACK(ACC, BV, BI, IDS)                                                       \
    do {                                                                                    \
        cypq_vi m_ = (ACC) < (BV);                                                          \
        BV = (cypq_vf)((((cypq_vi)(ACC)) & m_) | (((cypq_vi)(BV)) & ~m_));                  \
        BI = ((IDS) & m_) | ((BI) & ~m_);                                                   \
    } while (0)

/*
 * Nearest codeword of 4 vectors at once (x0..x3, d dims each) by the expansion
 * ||x - c||^2 = ||x||^2 + ||c||^2 - 2 <x, c>: one FMA per codeword and dimension, with
 * CTm2 = -2 * CT (transposed, d x K) and cnorm[k] = ||c_k||^2 precomputed. faiss encodes with
 * the same expansion once its centroids are transposed. One pass over the codebook serves four
 * independent accumulation chains, hiding FMA latency and quartering codebook loads.
 * idx[p] gets the index (first on ties); best[p] gets ||c||^2 - 2 <x_p, c> (add ||x_p||^2).
 */
CYPQ_INLINE void cypq_nearest_x4_body(
    const float *x0, const float *x1, const float *x2, const float *x3, const float *CTm2,
    const float *cnorm, const int d, int K, int32_t *idx, float *best) {
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
        cypq_vf a0 = cypq_vload(cnorm + k0), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < d; j++) {
            cypq_vf c = cypq_vload(CTm2 + (int64_t)j * K + k0);
            a0 += x0[j] * c;
            a1 += x1[j] * c;
            a2 += x2[j] * c;
            a3 += x3[j] * c;
        }
        cypq_vi ids = lane + k0;
        CYPQ_TRACK(a0, bv[0], bi[0], ids);
        CYPQ_TRACK(a1, bv[1], bi[1], ids);
        CYPQ_TRACK(a2, bv[2], bi[2], ids);
        CYPQ_TRACK(a3, bv[3], bi[3], ids);
    }
    for (int p = 0; p < 4; p++) {
        float b;
        int32_t id = cypq_reduce_best(bv[p], bi[p], &b);
        for (int k = k0; k < K; k++) {
            float acc = cnorm[k];
            for (int j = 0; j < d; j++) acc += xs[p][j] * CTm2[(int64_t)j * K + k];
            if (acc < b || id < 0) {
                b = acc;
                id = k;
            }
        }
        idx[p] = id;
        best[p] = b;
    }
}

/* The common sub-dimensions get their own copy with d fixed, so the loop over d unrolls. */
CYPQ_CLONES
static void cypq_nearest_x4(const float *x0, const float *x1, const float *x2, const float *x3,
                            const float *CTm2, const float *cnorm, int d, int K, int32_t *idx,
                            float *best) {
    switch (d) {
        case 4: cypq_nearest_x4_body(x0, x1, x2, x3, CTm2, cnorm, 4, K, idx, best); break;
        case 8: cypq_nearest_x4_body(x0, x1, x2, x3, CTm2, cnorm, 8, K, idx, best); break;
        case 16: cypq_nearest_x4_body(x0, x1, x2, x3, CTm2, cnorm, 16, K, idx, best); break;
        default: cypq_nearest_x4_body(x0, x1, x2, x3, CTm2, cnorm, d, K, idx, best);
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
        CYPQ_TRACK(v, bv, bi, lane + k0);
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

/* Four rows of cypq_l2sqr_ny_norm at once: out_p[k] = xnorm[p] + cnorm[k] + <x_p, CTm2[:, k]>.
 * One pass over the codebook serves four accumulation chains (as cypq_nearest_x4): the LOPQ
 * search makes a query's tables for many centroids against the same fine codebooks. With
 * `pairs`, two column blocks at a time first: eight chains, which AVX-512 needs to keep both
 * FMA units busy (a 64-byte vector is one register there, two under AVX2, where four blocks'
 * chains already suffice and eight would not fit the registers). Every out_p[k] is the same
 * sum in the same order either way. */
CYPQ_INLINE void cypq_l2sqr_ny_norm_x4_body(const float *const *x, const float *xnorm,
                                            const float *CTm2, const float *cnorm, const int d,
                                            int K, float *const *out, const int pairs) {
    int k0 = 0;
    for (; pairs && k0 + 2 * CYPQ_VW <= K; k0 += 2 * CYPQ_VW) {
        cypq_vf c0 = cypq_vload(cnorm + k0), c1 = cypq_vload(cnorm + k0 + CYPQ_VW);
        cypq_vf a0 = c0 + xnorm[0], a1 = c0 + xnorm[1], a2 = c0 + xnorm[2], a3 = c0 + xnorm[3];
        cypq_vf b0 = c1 + xnorm[0], b1 = c1 + xnorm[1], b2 = c1 + xnorm[2], b3 = c1 + xnorm[3];
        for (int j = 0; j < d; j++) {
            cypq_vf c = cypq_vload(CTm2 + (int64_t)j * K + k0);
            cypq_vf e = cypq_vload(CTm2 + (int64_t)j * K + k0 + CYPQ_VW);
            const float x0 = x[0][j], x1 = x[1][j], x2 = x[2][j], x3 = x[3][j];
            a0 += x0 * c; a1 += x1 * c; a2 += x2 * c; a3 += x3 * c;
            b0 += x0 * e; b1 += x1 * e; b2 += x2 * e; b3 += x3 * e;
        }
        memcpy(out[0] + k0, &a0, sizeof a0);
        memcpy(out[1] + k0, &a1, sizeof a1);
        memcpy(out[2] + k0, &a2, sizeof a2);
        memcpy(out[3] + k0, &a3, sizeof a3);
        memcpy(out[0] + k0 + CYPQ_VW, &b0, sizeof b0);
        memcpy(out[1] + k0 + CYPQ_VW, &b1, sizeof b1);
        memcpy(out[2] + k0 + CYPQ_VW, &b2, sizeof b2);
        memcpy(out[3] + k0 + CYPQ_VW, &b3, sizeof b3);
    }
    for (; k0 + CYPQ_VW <= K; k0 += CYPQ_VW) {
        cypq_vf c0 = cypq_vload(cnorm + k0);
        cypq_vf a0 = c0 + xnorm[0], a1 = c0 + xnorm[1], a2 = c0 + xnorm[2], a3 = c0 + xnorm[3];
        for (int j = 0; j < d; j++) {
            cypq_vf c = cypq_vload(CTm2 + (int64_t)j * K + k0);
            a0 += x[0][j] * c;
            a1 += x[1][j] * c;
            a2 += x[2][j] * c;
            a3 += x[3][j] * c;
        }
        memcpy(out[0] + k0, &a0, sizeof a0);
        memcpy(out[1] + k0, &a1, sizeof a1);
        memcpy(out[2] + k0, &a2, sizeof a2);
        memcpy(out[3] + k0, &a3, sizeof a3);
    }
    for (int p = 0; p < 4; p++)
        for (int k = k0; k < K; k++) {
            float acc = xnorm[p] + cnorm[k];
            for (int j = 0; j < d; j++) acc += x[p][j] * CTm2[(int64_t)j * K + k];
            out[p][k] = acc;
        }
}

/* The body with the subspace widths of common models unrolled. */
#define CYPQ_NORM_X4_SWITCH(PAIRS)                                                          \
    switch (d) {                                                                            \
        case 4: cypq_l2sqr_ny_norm_x4_body(x, xnorm, CTm2, cnorm, 4, K, out, PAIRS); break;   \
        case 8: cypq_l2sqr_ny_norm_x4_body(x, xnorm, CTm2, cnorm, 8, K, out, PAIRS); break;   \
        case 12: cypq_l2sqr_ny_norm_x4_body(x, xnorm, CTm2, cnorm, 12, K, out, PAIRS); break; \
        case 16: cypq_l2sqr_ny_norm_x4_body(x, xnorm, CTm2, cnorm, 16, K, out, PAIRS); break; \
        case 24: cypq_l2sqr_ny_norm_x4_body(x, xnorm, CTm2, cnorm, 24, K, out, PAIRS); break; \
        default: cypq_l2sqr_ny_norm_x4_body(x, xnorm, CTm2, cnorm, d, K, out, PAIRS);         \
    }

CYPQ_CLONES
static void cypq_l2sqr_ny_norm_x4_any(const float *const *x, const float *xnorm,
                                      const float *CTm2, const float *cnorm, int d, int K,
                                      float *const *out) {
    CYPQ_NORM_X4_SWITCH(0)
}

#if CYPQ_WIDE
__attribute__((target("arch=x86-64-v4")))
static void cypq_l2sqr_ny_norm_x4_v4(const float *const *x, const float *xnorm,
                                     const float *CTm2, const float *cnorm, int d, int K,
                                     float *const *out) {
    CYPQ_NORM_X4_SWITCH(1)
}
#endif

static void cypq_l2sqr_ny_norm_x4(const float *const *x, const float *xnorm, const float *CTm2,
                                  const float *cnorm, int d, int K, float *const *out) {
#if CYPQ_WIDE
    if (cypq_wide()) {
        cypq_l2sqr_ny_norm_x4_v4(x, xnorm, CTm2, cnorm, d, K, out);
        return;
    }
#endif
    cypq_l2sqr_ny_norm_x4_any(x, xnorm, CTm2, cnorm, d, K, out);
}

/* Tables of 16 codewords (4-bit codes), out (n, m, 16): out[r, s, k] = |x_rs|^2 + cnorm[s, k]
 * + <x_rs, CTm2[s][:, k]> for the n rows x_r of P (n, m * d), x_rs their d dimensions of
 * subquantizer s, CTm2 m blocks of -2 C^T (d, 16), cnorm (m, 16): a table is one 64-byte
 * vector, so a row's m tables are made in one pass, where cypq_l2sqr_ny_norm_x4 is one call
 * per subquantizer and four rows (at 16 codewords its calls cost more than their sums). With
 * ``offset`` (n,): no |x|^2 (inner products), and offset[r] added to row r's first table.
 * Each entry's sum in cypq_l2sqr_ny_norm_x4's order; |x_rs|^2 is made here, in the clone's
 * arithmetic (FMA where it has it), so its last bit may differ from the generic path's. */
CYPQ_INLINE void cypq_tables16_body(const float *P, int64_t n, int m, const int d,
                                    const float *CTm2, const float *cnorm, const float *offset,
                                    float *out) {
    for (int64_t r = 0; r < n; r++) {
        const float *x = P + r * (int64_t)m * d;
        for (int s = 0; s < m; s++) {
            const float *xs = x + s * d, *C = CTm2 + (int64_t)s * d * 16;
            float xn = 0.f;
            if (offset == NULL)
                for (int a = 0; a < d; a++) xn += xs[a] * xs[a];
            cypq_vf acc = cypq_vload(cnorm + s * 16) + xn;
            for (int j = 0; j < d; j++) acc += xs[j] * cypq_vload(C + j * 16);
            if (offset != NULL && s == 0) acc += offset[r];
            memcpy(out + (r * m + s) * 16, &acc, sizeof acc);
        }
    }
}

/* (d a constant for the common subspace widths: the loops unroll, and the subquantizers'
 * chains, independent, overlap) */
CYPQ_CLONES
static void cypq_tables16(const float *P, int64_t n, int m, int d, const float *CTm2,
                          const float *cnorm, const float *offset, float *out) {
    switch (d) {
        case 2: cypq_tables16_body(P, n, m, 2, CTm2, cnorm, offset, out); break;
        case 4: cypq_tables16_body(P, n, m, 4, CTm2, cnorm, offset, out); break;
        case 8: cypq_tables16_body(P, n, m, 8, CTm2, cnorm, offset, out); break;
        case 16: cypq_tables16_body(P, n, m, 16, CTm2, cnorm, offset, out); break;
        default: cypq_tables16_body(P, n, m, d, CTm2, cnorm, offset, out);
    }
}

/*
 * Y[i] = A @ Z[i] for the n rows of Z (n x d), A (d x d) given as AT (its transpose,
 * row-major): each row is a sum of AT's rows weighted by its entries, in order. Four rows share
 * each pass over AT (LOPQ projects every row of a coarse cluster by that cluster's rotation).
 * A row's arithmetic is the same whichever rows it is batched with, so a vector's projection
 * does not depend on the batch it came in (BLAS would change blocking with n).
 */
CYPQ_INLINE void cypq_matvec_t_block(const float *AT, const float *const *z, float *const *y,
                                     const int rows, const int d, const int quads) {
    int a0 = 0;
    /* With `quads`, four column blocks at once: sixteen chains, for AVX-512's 32 registers
     * (under AVX2 a 64-byte vector takes two, and two blocks' eight chains already fill them). */
    for (; quads && a0 + 4 * CYPQ_VW <= d; a0 += 4 * CYPQ_VW) {
        cypq_vf s[4][4] = {{{0}}};
        for (int b = 0; b < d; b++) {
            const float *row = AT + (int64_t)b * d + a0;
            cypq_vf r0 = cypq_vload(row), r1 = cypq_vload(row + CYPQ_VW);
            cypq_vf r2 = cypq_vload(row + 2 * CYPQ_VW), r3 = cypq_vload(row + 3 * CYPQ_VW);
            for (int p = 0; p < rows; p++) {
                const float zb = z[p][b];
                s[p][0] += zb * r0;
                s[p][1] += zb * r1;
                s[p][2] += zb * r2;
                s[p][3] += zb * r3;
            }
        }
        for (int p = 0; p < rows; p++)
            for (int c = 0; c < 4; c++) memcpy(y[p] + a0 + c * CYPQ_VW, &s[p][c], sizeof s[p][c]);
    }
    /* Two column blocks at once: eight independent FMA chains keep both FMA units busy. */
    for (; a0 + 2 * CYPQ_VW <= d; a0 += 2 * CYPQ_VW) {
        cypq_vf s[4] = {{0}, {0}, {0}, {0}}, t[4] = {{0}, {0}, {0}, {0}};
        for (int b = 0; b < d; b++) {
            cypq_vf r = cypq_vload(AT + (int64_t)b * d + a0);
            cypq_vf u = cypq_vload(AT + (int64_t)b * d + a0 + CYPQ_VW);
            for (int p = 0; p < rows; p++) {
                s[p] += z[p][b] * r;
                t[p] += z[p][b] * u;
            }
        }
        for (int p = 0; p < rows; p++) {
            memcpy(y[p] + a0, &s[p], sizeof s[p]);
            memcpy(y[p] + a0 + CYPQ_VW, &t[p], sizeof t[p]);
        }
    }
    for (; a0 + CYPQ_VW <= d; a0 += CYPQ_VW) {
        cypq_vf s[4] = {{0}, {0}, {0}, {0}};
        for (int b = 0; b < d; b++) {
            cypq_vf r = cypq_vload(AT + (int64_t)b * d + a0);
            for (int p = 0; p < rows; p++) s[p] += z[p][b] * r;
        }
        for (int p = 0; p < rows; p++) memcpy(y[p] + a0, &s[p], sizeof s[p]);
    }
    for (int p = 0; p < rows; p++)
        for (int a = a0; a < d; a++) {
            float acc = 0.f;
            for (int b = 0; b < d; b++) acc += z[p][b] * AT[(int64_t)b * d + a];
            y[p][a] = acc;
        }
}

#define CYPQ_MATMUL_T_BODY(QUADS)                                                           \
    int64_t i = 0;                                                                          \
    for (; i + 4 <= n; i += 4) {                                                            \
        const float *z[4] = {Z + i * d, Z + (i + 1) * d, Z + (i + 2) * d, Z + (i + 3) * d}; \
        float *y[4] = {Y + i * d, Y + (i + 1) * d, Y + (i + 2) * d, Y + (i + 3) * d};       \
        cypq_matvec_t_block(AT, z, y, 4, d, QUADS);                                         \
    }                                                                                       \
    for (; i < n; i++) {                                                                    \
        const float *z[1] = {Z + i * d};                                                    \
        float *y[1] = {Y + i * d};                                                          \
        cypq_matvec_t_block(AT, z, y, 1, d, QUADS);                                         \
    }

CYPQ_CLONES
static void cypq_matmul_t_any(const float *AT, const float *Z, int64_t n, int d, float *Y) {
    CYPQ_MATMUL_T_BODY(0)
}

#if CYPQ_WIDE
__attribute__((target("arch=x86-64-v4")))
static void cypq_matmul_t_v4(const float *AT, const float *Z, int64_t n, int d, float *Y) {
    CYPQ_MATMUL_T_BODY(1)
}
#endif

static void cypq_matmul_t(const float *AT, const float *Z, int64_t n, int d, float *Y) {
#if CYPQ_WIDE
    if (cypq_wide()) {
        cypq_matmul_t_v4(AT, Z, n, d, Y);
        return;
    }
#endif
    cypq_matmul_t_any(AT, Z, n, d, Y);
}

/* AT = A^T of a d x d matrix (row-major): 8 x 8 tiles transposed in registers (three rounds of
 * two-vector shuffles), the edges of a d that is not a multiple of 8 one float at a time. A
 * copy: every path gives the same bits. */
typedef float cypq_vf8 __attribute__((vector_size(32)));
typedef int32_t cypq_vi8 __attribute__((vector_size(32)));

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
    for (int k = 0; k < K; k++) out[k] = 0.f;
    for (int j = 0; j < d; j++) {
        const float xj = x[j];
        const float *row = CT + (int64_t)j * K;
        for (int k = 0; k < K; k++) out[k] += xj * row[k];
    }
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

/* uint8 codes with Ks = 256 and M = 8, 16, 24 or 32 (the common shapes; packed 4-bit codes
 * of 8 to 32 bytes are scanned through pair tables in this shape too): with M and Ks known at compile
 * time every table offset folds into the load's address, one load per lookup; two codes per
 * step, one add chain per half each, keep four short chains in flight. */
#define CYPQ_ADC_FIXED(NAME, MM)                                                            \
    CYPQ_CLONES                                                                             \
    static int64_t NAME(const float *T0, const float *T1, const uint8_t *codes, int64_t n,  \
                        float thresh, float *out, int32_t *idx) {                           \
        enum { H = MM / 2 };                                                                \
        int64_t cnt = 0, i = 0;                                                             \
        for (; i + 2 <= n; i += 2) {                                                        \
            const uint8_t *c = codes + i * MM, *e = c + MM;                                 \
            float a0 = 0.f, a1 = 0.f, b0 = 0.f, b1 = 0.f;                                   \
            for (int m = 0; m < H; m++) {                                                   \
                a0 += T0[m * 256 + c[m]];                                                   \
                a1 += T1[m * 256 + c[H + m]];                                               \
                b0 += T0[m * 256 + e[m]];                                                   \
                b1 += T1[m * 256 + e[H + m]];                                               \
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
    return cypq_adc_u8_any(T0, T1, M, Ks, codes, n, thresh, out, idx);
}

#endif
