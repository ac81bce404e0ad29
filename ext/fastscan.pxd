# Declarations of the 4-bit ADC paths in fastscan.h (see that file).
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t

cdef extern from "fastscan.h" nogil:
    enum: CYPQ_ADC4_AVX2

    ctypedef struct cypq_adc4_plan:
        int W
        int path
        int bounds16

    ctypedef struct cypq_adc4_cell:
        const cypq_adc4_plan *plan
        const uint8_t *Q0
        const uint8_t *Q1
        float base
        float delta
        float slack

    ctypedef struct cypq_adc4_tail:
        cypq_adc4_cell cell
        const uint8_t *codes
        int64_t n
        float *lb

    int cypq_fastscan_limit
    void cypq_adc4_plan_init(cypq_adc4_plan *p, int W, int two_phase) noexcept
    float cypq_quantize4(const float *T, int64_t rows, int m, uint8_t *Q, float *bias,
                         float *slack) noexcept
    int64_t cypq_adc4_cells(const float *T0, const float *T1, int W,
                            const cypq_adc4_cell *cell, const uint8_t *codes, int64_t n,
                            float thresh, float *out, int32_t *idx) noexcept
    void cypq_adc4_bounds(const cypq_adc4_cell *cell, const uint8_t *codes, int64_t n,
                          float *lb) noexcept
    int64_t cypq_adc4_avx2_block_bounds(const cypq_adc4_cell *cell, const uint8_t *blocks,
                                        int64_t n, float *lb) noexcept
    int cypq_adc4_tails(const cypq_adc4_tail *a, const cypq_adc4_tail *b) noexcept
    int64_t cypq_adc4_listed(const cypq_adc4_plan *p, const float *T0, const float *T1,
                             const uint8_t *codes, int64_t n, const int32_t *rows, int64_t m,
                             float thresh, float *out, int32_t *idx) noexcept
    void cypq_adc4_blocks(const uint8_t *codes, int64_t n, int W, uint8_t *out) noexcept
    void cypq_fastscan_init() noexcept
    int64_t cypq_rows_within(const float *lb, int64_t n, float lo, float hi,
                             int32_t *idx) noexcept
    float cypq_bound_quantile(const float *lb, int64_t n, int64_t want,
                              int32_t *hist) noexcept
