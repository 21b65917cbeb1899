# cython: language_level=3
"""AES-128-XTS over many 4 KiB pages in one call, through OpenSSL's EVP interface (libcrypto).

SNP's memory controller encrypts each page with the VM's key and a tweak made from the page's system
physical address. ``cryptography`` needs a new cipher context per tweak, which costs ~3-5 us a page in
Python; here one EVP context is keyed once and only its IV (the XTS tweak) is reset per page, with the
GIL released, which brings a page to well under a microsecond. ``replay.security.xts`` is the Python
face of this module and checks it against ``cryptography``'s XTS in the tests.
"""

from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memset

from _evp cimport *

DEF PAGE = 4096


def xts_pages(bytes key not None, const uint8_t[:, ::1] src, const uint64_t[::1] tweaks,
              uint8_t[:, ::1] dst, bint encrypt):
    """Encrypt (``encrypt``) or decrypt page ``i`` of ``src`` into ``dst[i]`` with tweak ``tweaks[i]``.

    ``key`` is the 32-byte XTS key (two AES-128 keys); the tweak is the 16-byte little-endian form of
    the 64-bit ``tweaks[i]``. ``src`` and ``dst`` are (n, 4096) C-contiguous uint8 arrays and may be the
    same array (in place)."""
    cdef Py_ssize_t n = src.shape[0], i
    cdef int outl = 0, ok = 1, k
    cdef unsigned char iv[16]
    cdef uint64_t t
    cdef const unsigned char *kp = key
    if len(key) != 32:
        raise ValueError(f"XTS key must be 32 bytes, got {len(key)}")
    if src.shape[1] != PAGE or dst.shape[1] != PAGE or dst.shape[0] != n or tweaks.shape[0] != n:
        raise ValueError("xts_pages: src, dst must be (n, 4096) and tweaks (n,)")
    if n == 0:
        return
    cdef EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new()
    if ctx == NULL:
        raise MemoryError("EVP_CIPHER_CTX_new failed")
    try:
        with nogil:
            if EVP_CipherInit_ex(ctx, EVP_aes_128_xts(), NULL, kp, NULL, 1 if encrypt else 0) != 1:
                ok = 0
            i = 0
            while ok and i < n:
                memset(iv, 0, 16)
                t = tweaks[i]
                for k in range(8):
                    iv[k] = <unsigned char>((t >> (8 * k)) & 0xFF)
                # Keep cipher and key, change only the tweak (one data unit = one page per update).
                if EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1) != 1:
                    ok = 0
                elif EVP_CipherUpdate(ctx, &dst[i, 0], &outl, &src[i, 0], PAGE) != 1 or outl != PAGE:
                    ok = 0
                i += 1
    finally:
        EVP_CIPHER_CTX_free(ctx)
    if not ok:
        # OpenSSL refuses an XTS key whose two halves are equal (IEEE 1619 / FIPS rule).
        raise ValueError("OpenSSL refused the AES-128-XTS operation (are the two key halves equal?)")
