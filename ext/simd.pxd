# Declarations of the target-cloned SIMD loops in simd.h (see that file for why they are C).
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t

cdef extern from "simd.h" nogil:
    int32_t cypq_nearest_l2(const float *x, const float *CT, int d, int K, float *best) noexcept
    void cypq_nearest_l2_x4(const float *x0, const float *x1, const float *x2, const float *x3,
                            const float *CT, int d, int K, int32_t *idx, float *best) noexcept
    int32_t cypq_argmin_shifted(const float *g, const float *cnorm, int K, float *best) noexcept
    void cypq_l2sqr_ny(const float *x, const float *CT, int d, int K, float *out) noexcept
    void cypq_ip_ny(const float *x, const float *CT, int d, int K, float *out) noexcept
    void cypq_adc_u8(const float *T, int M, int Ks, const uint8_t *codes, int64_t n, float *out) noexcept
    void cypq_adc_u16(const float *T, int M, int Ks, const uint16_t *codes, int64_t n, float *out) noexcept
    void cypq_adc_u32(const float *T, int M, int Ks, const uint32_t *codes, int64_t n, float *out) noexcept
