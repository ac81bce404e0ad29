# Types shared by the kernels.
from libc.stdint cimport uint8_t, uint16_t, uint32_t

# PQ codes: uint8 for Ks <= 256, uint16 for Ks <= 65536, uint32 beyond (nanopq's code_dtype).
ctypedef fused code_t:
    uint8_t
    uint16_t
    uint32_t
