# ADC scan of a run of codes into a top-k heap: shared by exhaustive PQ search and the index's
# per-cell scans, so both rank candidates by the same arithmetic.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t

from heap cimport heap_replace_top
from simd cimport cypq_adc_u8, cypq_adc_u16, cypq_adc_u32
from types cimport code_t

# Codes are scored in blocks of this many, so the distance buffer stays in L1.
cdef enum:
    SCAN_BLOCK = 1024


cdef inline void adc_block(const float *T, int M, int Ks, const code_t *codes, int64_t n,
                           float *out) noexcept nogil:
    if code_t is uint8_t:
        cypq_adc_u8(T, M, Ks, codes, n, out)
    elif code_t is uint16_t:
        cypq_adc_u16(T, M, Ks, codes, n, out)
    else:
        cypq_adc_u32(T, M, Ks, codes, n, out)


cdef inline void scan_topk(const float *T, int M, int Ks, const code_t *codes, int64_t n,
                           const int64_t *ids, int64_t id_offset,
                           float *heap_d, int64_t *heap_i, int k, float *buf) noexcept nogil:
    """Push the n codes into the top-k heap (heap_d, heap_i).

    A code's id is ids[i] when ids is not NULL, else id_offset + i. buf holds SCAN_BLOCK floats.
    """
    cdef int64_t b0 = 0, i, nb
    cdef float d
    while b0 < n:
        nb = n - b0
        if nb > SCAN_BLOCK:
            nb = SCAN_BLOCK
        adc_block(T, M, Ks, codes + b0 * M, nb, buf)
        for i in range(nb):
            d = buf[i]
            if d < heap_d[0]:
                heap_replace_top(heap_d, heap_i, k, d,
                                 ids[b0 + i] if ids != NULL else id_offset + b0 + i)
        b0 += nb
