# Declarations of the target-cloned SIMD loops in simd.h (see that file for why they are C).
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t

cdef extern from "simd.h" nogil:
    void cypq_nearest_x4(const float *x0, const float *x1, const float *x2, const float *x3,
                         const float *CTm2, const float *cnorm, int d, int K, int32_t *idx,
                         float *best) noexcept
    int32_t cypq_argmin_shifted(const float *g, const float *cnorm, int K, float *best) noexcept
    void cypq_l2sqr_ny(const float *x, const float *CT, int d, int K, float *out) noexcept
    void cypq_l2sqr_ny_norm(const float *x, float xnorm, const float *CTm2, const float *cnorm,
                            int d, int K, float *out) noexcept
    void cypq_l2sqr_ny_norm_x4(const float **x, const float *xnorm, const float *CTm2,
                               const float *cnorm, int d, int K, float **out) noexcept
    void cypq_transpose(const float *A, int d, float *AT) noexcept
    void cypq_prefetch_line(const void *p) noexcept   # (a macro: see simd.h)
    void cypq_prefetch_span(const void *p, int64_t bytes, int l2) noexcept
    void cypq_tables16(const float *P, int64_t n, int m, int d, const float *CTm2,
                       const float *cnorm, const float *offset, float *out) noexcept
    void cypq_matmul_t(const float *AT, const float *Z, int64_t n, int d, float *Y) noexcept
    void cypq_shift2(const float *x, const float *a, const float *b, float s, int d,
                     float *z) noexcept
    void cypq_sort_places(const uint32_t *key, int32_t n, int32_t *pos) noexcept
    void cypq_ip_ny(const float *x, const float *CT, int d, int K, float *out) noexcept
    int64_t cypq_adc_u8(const float *T0, const float *T1, int M, int Ks, const uint8_t *codes,
                         int64_t n, float thresh, float *out, int32_t *idx) noexcept
    int64_t cypq_adc_u16(const float *T0, const float *T1, int M, int Ks, const uint16_t *codes,
                         int64_t n, float thresh, float *out, int32_t *idx) noexcept
    int64_t cypq_adc_u32(const float *T0, const float *T1, int M, int Ks, const uint32_t *codes,
                         int64_t n, float thresh, float *out, int32_t *idx) noexcept
