# cython: freethreading_compatible = True
"""Addresses of Python buffers (the zero-copy values LMDB returns), for the storage layer."""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uint8_t, uint32_t, uintptr_t
from libc.string cimport memcpy


cdef extern from "crc32.h":
    void cypq_crc32_init() noexcept nogil
    uint32_t cypq_crc32(uint32_t crc, const uint8_t *p, size_t n) noexcept nogil


cypq_crc32_init()


def crc32(data, uint32_t value=0):
    """zlib.crc32(data, value) of a bytes-like object, by the C loop ``headers`` checks the
    blocks' checksums with (writers use zlib's; tests compare the two)."""
    cdef Py_buffer view
    cdef uint32_t r
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    with nogil:
        r = cypq_crc32(value, <const uint8_t *> view.buf, <size_t> view.len)
    PyBuffer_Release(&view)
    return r


def addresses(list buffers, uintptr_t[::1] addr, int64_t[::1] length):
    """addr[i], length[i] = start address and size in bytes of buffers[i].

    The addresses stay valid only while the objects' memory does (for LMDB: while the read
    transaction that returned them is open and the snapshot unchanged).
    """
    cdef Py_ssize_t i, n = len(buffers)
    cdef Py_buffer view
    if addr.shape[0] < n or length.shape[0] < n:
        raise ValueError("addresses: outputs too short")
    for i in range(n):
        PyObject_GetBuffer(buffers[i], &view, PyBUF_SIMPLE)
        addr[i] = <uintptr_t> view.buf
        length[i] = view.len
        PyBuffer_Release(&view)


def headers(list buffers, uintptr_t[::1] addr, int64_t[::1] length, int64_t[::1] count,
            uint8_t[::1] ok):
    """addresses() plus count[i] = the little-endian u32 at the start of buffers[i] (-1 for
    a buffer shorter than 4 bytes): the entry count of an LMDB block value, read without a
    Python object per value; and ok[i] = whether the u32 after it is 0 (no checksum: cypq
    0.1) or the CRC-32 of the bytes past those 8 (0 taken as 1; a buffer shorter than 8
    bytes: 1, its layout is wrong anyway)."""
    cdef Py_ssize_t i, n = len(buffers)
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef uint32_t stored, crc
    if addr.shape[0] < n or length.shape[0] < n or count.shape[0] < n or ok.shape[0] < n:
        raise ValueError("headers: outputs too short")
    for i in range(n):
        PyObject_GetBuffer(buffers[i], &view, PyBUF_SIMPLE)
        addr[i] = <uintptr_t> view.buf
        length[i] = view.len
        if view.len >= 4:
            p = <const unsigned char*> view.buf
            count[i] = <int64_t> p[0] | (<int64_t> p[1] << 8) | (<int64_t> p[2] << 16) | \
                (<int64_t> p[3] << 24)
        else:
            count[i] = -1
        PyBuffer_Release(&view)
    with nogil:   # (the buffers stay valid: their objects are in the caller's list)
        for i in range(n):
            ok[i] = 1
            if length[i] >= 8:
                p = <const unsigned char*> addr[i]
                stored = <uint32_t> p[4] | (<uint32_t> p[5] << 8) | (<uint32_t> p[6] << 16) | \
                    (<uint32_t> p[7] << 24)
                if stored != 0:
                    crc = cypq_crc32(0, p + 8, <size_t> (length[i] - 8))
                    ok[i] = stored == (crc if crc != 0 else 1)


def scatter(const uintptr_t[::1] src, const int64_t[::1] dst, Py_ssize_t nbytes,
            unsigned char[::1] out):
    """out[dst[e] : dst[e] + nbytes] = the nbytes at address src[e], for every e.

    The caller keeps the memory at the source addresses alive and at least nbytes long
    (addresses of checked values, or of rows of arrays); destinations are checked.
    """
    cdef Py_ssize_t e, n = src.shape[0], size = out.shape[0]
    if dst.shape[0] != n:
        raise ValueError("scatter: src and dst differ in length")
    for e in range(n):
        if dst[e] < 0 or dst[e] + nbytes > size:
            raise ValueError("scatter: a destination outside the output")
    with nogil:
        for e in range(n):
            memcpy(&out[0] + dst[e], <const void*> src[e], nbytes)
