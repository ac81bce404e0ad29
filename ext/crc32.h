/*
 * CRC-32 as zlib computes it (IEEE 802.3: reflected polynomial 0xEDB88320, initial and final
 * XOR 0xFFFFFFFF), for the checksums of the LMDB index's values. Here rather than zlib's so
 * that the storage layer checks a block's bytes where it finds them, without the GIL or a
 * Python object per value, and so that building cypq needs no zlib headers.
 *
 * Eight bytes per step through eight tables ("slicing by 8", ~2 GB/s): the tables are filled
 * once by cypq_crc32_init, which each module that computes checksums calls at its import.
 */
#ifndef CYPQ_CRC32_H
#define CYPQ_CRC32_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static uint32_t cypq_crc32_tab[8][256];

static void cypq_crc32_init(void) {
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        cypq_crc32_tab[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; b++)   /* table t: byte b followed by t zero bytes */
        for (int t = 1; t < 8; t++)
            cypq_crc32_tab[t][b] = (cypq_crc32_tab[t - 1][b] >> 8)
                                   ^ cypq_crc32_tab[0][cypq_crc32_tab[t - 1][b] & 255];
}

/* The CRC-32 of p[0 .. n) continuing crc (0 to start), as zlib.crc32(bytes, crc). */
static uint32_t cypq_crc32(uint32_t crc, const uint8_t *p, size_t n) {
    uint32_t c = ~crc;
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    for (; n >= 8; n -= 8, p += 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);   /* (little-endian: the first byte is the low one) */
        memcpy(&hi, p + 4, 4);
        lo ^= c;
        c = cypq_crc32_tab[7][lo & 255] ^ cypq_crc32_tab[6][(lo >> 8) & 255]
            ^ cypq_crc32_tab[5][(lo >> 16) & 255] ^ cypq_crc32_tab[4][lo >> 24]
            ^ cypq_crc32_tab[3][hi & 255] ^ cypq_crc32_tab[2][(hi >> 8) & 255]
            ^ cypq_crc32_tab[1][(hi >> 16) & 255] ^ cypq_crc32_tab[0][hi >> 24];
    }
#endif
    for (; n; n--, p++) c = cypq_crc32_tab[0][(c ^ *p) & 255] ^ (c >> 8);
    return ~c;
}

#endif
