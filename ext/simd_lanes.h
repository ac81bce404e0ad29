/*
 * The loops of simd.h written over vectors of CYPQ_VW floats, included by simd.h once per
 * vector width: 64-byte vectors for AVX-512 (x86-64-v4), 32-byte vectors for AVX2 and the
 * baseline. Each function is named CYPQ_L(name) (name_w16 / name_w8), compiled for the
 * targets CYPQ_LANES_TARGET names; CYPQ_REGS is how many such vectors the target's registers
 * hold (32 / 16), for the blockings that need that many accumulators. Every output is the
 * same sum in the same order at either width; its last bit can still differ where one width
 * leaves a column to the scalar tail (d not a multiple of its lanes) and the other does not:
 * GCC fuses the vector multiply-adds, not the tail's.
 */
#define cypq_vf CYPQ_L(cypq_vf)
#define cypq_vi CYPQ_L(cypq_vi)
#define cypq_vload CYPQ_L(cypq_vload)
#define cypq_reduce_best CYPQ_L(cypq_reduce_best)
#define cypq_nearest_x4_body CYPQ_L(cypq_nearest_x4_body)
#define cypq_l2sqr_ny_norm_x4_body CYPQ_L(cypq_l2sqr_ny_norm_x4_body)
#define cypq_tables16_body CYPQ_L(cypq_tables16_body)
#define cypq_matvec_t_block CYPQ_L(cypq_matvec_t_block)
typedef float cypq_vf __attribute__((vector_size(CYPQ_VW * 4)));
typedef int32_t cypq_vi __attribute__((vector_size(CYPQ_VW * 4)));

CYPQ_INLINE cypq_vf cypq_vload(const float *p) {
    cypq_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Reduce per-lane (best value, best index) to the overall minimum, ties to the lowest index:
 * a tree of lane swaps (log2 CYPQ_VW steps) instead of a scalar loop over the lanes. */
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

/* Per-lane running minimum of a block of CYPQ_VW values and its index. */
#ifndef CYPQ_TRACK
#define CYPQ_TRACK(ACC, BV, BI, IDS)                                                       \
    do {                                                                                    \
        cypq_vi m_ = (ACC) < (BV);                                                          \
        BV = (cypq_vf)((((cypq_vi)(ACC)) & m_) | (((cypq_vi)(BV)) & ~m_));                  \
        BI = ((IDS) & m_) | ((BI) & ~m_);                                                   \
    } while (0)
#endif

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
CYPQ_LANES_TARGET
static void CYPQ_L(cypq_nearest_x4)(const float *x0, const float *x1, const float *x2,
                                    const float *x3, const float *CTm2, const float *cnorm,
                                    int d, int K, int32_t *idx, float *best) {
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
CYPQ_LANES_TARGET
static int32_t CYPQ_L(cypq_argmin_shifted)(const float *g, const float *cnorm, int K, float *best) {
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

/* Four rows of cypq_l2sqr_ny_norm at once: out_p[k] = xnorm[p] + cnorm[k] + <x_p, CTm2[:, k]>.
 * One pass over the codebook serves four accumulation chains (as cypq_nearest_x4): the LOPQ
 * search makes a query's tables for many centroids against the same fine codebooks. Two
 * column blocks at a time first: eight chains, to keep both FMA units busy (ten vectors
 * live: they fit AVX2's 16 registers at 32 bytes a vector). Every out_p[k] is the same sum in
 * the same order in either loop. */
CYPQ_INLINE void cypq_l2sqr_ny_norm_x4_body(const float *const *x, const float *xnorm,
                                            const float *CTm2, const float *cnorm, const int d,
                                            int K, float *const *out) {
    int k0 = 0;
    for (; k0 + 2 * CYPQ_VW <= K; k0 += 2 * CYPQ_VW) {
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

/* (the subspace widths of common models unrolled) */
CYPQ_LANES_TARGET
static void CYPQ_L(cypq_l2sqr_ny_norm_x4)(const float *const *x, const float *xnorm,
                                          const float *CTm2, const float *cnorm, int d, int K,
                                          float *const *out) {
    switch (d) {
        case 4: cypq_l2sqr_ny_norm_x4_body(x, xnorm, CTm2, cnorm, 4, K, out); break;
        case 8: cypq_l2sqr_ny_norm_x4_body(x, xnorm, CTm2, cnorm, 8, K, out); break;
        case 12: cypq_l2sqr_ny_norm_x4_body(x, xnorm, CTm2, cnorm, 12, K, out); break;
        case 16: cypq_l2sqr_ny_norm_x4_body(x, xnorm, CTm2, cnorm, 16, K, out); break;
        case 24: cypq_l2sqr_ny_norm_x4_body(x, xnorm, CTm2, cnorm, 24, K, out); break;
        default: cypq_l2sqr_ny_norm_x4_body(x, xnorm, CTm2, cnorm, d, K, out);
    }
}

/* Tables of 16 codewords (4-bit codes), out (n, m, 16): out[r, s, k] = |x_rs|^2 + cnorm[s, k]
 * + <x_rs, CTm2[s][:, k]> for the n rows x_r of P (n, m * d), x_rs their d dimensions of
 * subquantizer s, CTm2 m blocks of -2 C^T (d, 16), cnorm (m, 16): a table is 64 bytes, one or
 * two vectors, so a row's m tables are made in one pass, where cypq_l2sqr_ny_norm_x4 is one call
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
            cypq_vf acc[16 / CYPQ_VW];   /* a table: one or two vectors */
            for (int h = 0; h < 16 / CYPQ_VW; h++)
                acc[h] = cypq_vload(cnorm + s * 16 + h * CYPQ_VW) + xn;
            for (int j = 0; j < d; j++)
                for (int h = 0; h < 16 / CYPQ_VW; h++)
                    acc[h] += xs[j] * cypq_vload(C + j * 16 + h * CYPQ_VW);
            for (int h = 0; h < 16 / CYPQ_VW; h++) {
                if (offset != NULL && s == 0) acc[h] += offset[r];
                memcpy(out + (r * m + s) * 16 + h * CYPQ_VW, &acc[h], sizeof acc[h]);
            }
        }
    }
}

/* (d a constant for the common subspace widths: the loops unroll, and the subquantizers'
 * chains, independent, overlap) */
CYPQ_LANES_TARGET
static void CYPQ_L(cypq_tables16)(const float *P, int64_t n, int m, int d, const float *CTm2,
                                  const float *cnorm, const float *offset, float *out) {
    switch (d) {
        case 2: cypq_tables16_body(P, n, m, 2, CTm2, cnorm, offset, out); break;
        case 3: cypq_tables16_body(P, n, m, 3, CTm2, cnorm, offset, out); break;
        case 4: cypq_tables16_body(P, n, m, 4, CTm2, cnorm, offset, out); break;
        case 6: cypq_tables16_body(P, n, m, 6, CTm2, cnorm, offset, out); break;
        case 8: cypq_tables16_body(P, n, m, 8, CTm2, cnorm, offset, out); break;
        case 12: cypq_tables16_body(P, n, m, 12, CTm2, cnorm, offset, out); break;
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
     * (AVX2's 16 hold two blocks' eight chains and their two rows of AT, not more). */
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

CYPQ_LANES_TARGET
static void CYPQ_L(cypq_matmul_t)(const float *AT, const float *Z, int64_t n, int d, float *Y) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float *z[4] = {Z + i * d, Z + (i + 1) * d, Z + (i + 2) * d, Z + (i + 3) * d};
        float *y[4] = {Y + i * d, Y + (i + 1) * d, Y + (i + 2) * d, Y + (i + 3) * d};
        cypq_matvec_t_block(AT, z, y, 4, d, CYPQ_REGS >= 32);
    }
    for (; i < n; i++) {
        const float *z[1] = {Z + i * d};
        float *y[1] = {Y + i * d};
        cypq_matvec_t_block(AT, z, y, 1, d, CYPQ_REGS >= 32);
    }
}

#undef cypq_vf
#undef cypq_vi
#undef cypq_vload
#undef cypq_reduce_best
#undef cypq_nearest_x4_body
#undef cypq_l2sqr_ny_norm_x4_body
#undef cypq_tables16_body
#undef cypq_matvec_t_block
