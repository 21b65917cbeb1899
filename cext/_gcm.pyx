# cython: language_level=3
"""AES-256-GCM over many packets in one call, through OpenSSL's EVP interface (libcrypto).

The migration channel seals every page into its own packet. ``cryptography``'s ``AESGCM`` costs a Python
call, a key check and a fresh output object per packet; here one EVP context is keyed once per call and
only the nonce is reset per packet, with the GIL released while the pages are sealed or opened.
``replay.security.gcm`` is the Python face of this module (and its ``cryptography`` fallback); the tests
check both give the same packets.

A packet here is ``aad + ciphertext + tag``: the associated data (the packet header) travels in clear in
front, the 16-byte tag behind.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE, PyBytes_Check
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from _evp cimport *

DEF TAG = 16
DEF NONCE = 12


cdef EVP_CIPHER_CTX *_context(bytes key, int enc) except NULL:
    if len(key) != 32:
        raise ValueError(f"AES-256-GCM key must be 32 bytes, got {len(key)}")
    cdef EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new()
    if ctx == NULL:
        raise MemoryError("EVP_CIPHER_CTX_new failed")
    if EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, <const unsigned char *>PyBytes_AS_STRING(key), NULL, enc) != 1:
        EVP_CIPHER_CTX_free(ctx)
        raise ValueError("OpenSSL refused the AES-256-GCM key")
    return ctx


def gcm_seal(bytes key not None, const uint8_t[:, ::1] nonces, const uint8_t[:, ::1] aad,
             const uint8_t[::1] body, const int64_t[::1] offset, const int64_t[::1] length,
             uint8_t[:, ::1] records):
    """Packet ``i`` = ``aad[i]`` + AES-256-GCM of ``body[offset[i] : offset[i] + length[i]]`` under
    ``nonces[i]`` with ``aad[i]`` as associated data + the tag, as a list of bytes. ``records[i]``
    receives ``aad[i]`` + the tag (what the validation token hashes)."""
    cdef Py_ssize_t n = nonces.shape[0], a = aad.shape[1], i
    if nonces.shape[1] != NONCE or aad.shape[0] != n or offset.shape[0] != n or length.shape[0] != n:
        raise ValueError("gcm_seal: nonces (n, 12), aad (n, A), offset and length (n,)")
    if records.shape[0] != n or records.shape[1] != a + TAG:
        raise ValueError("gcm_seal: records must be (n, A + 16)")
    for i in range(n):
        if offset[i] < 0 or length[i] < 0 or offset[i] + length[i] > body.shape[0] or length[i] > 1 << 30:
            raise ValueError(f"gcm_seal: body {i} ({offset[i]}+{length[i]}) outside the buffer of {body.shape[0]} bytes")
    out = [PyBytes_FromStringAndSize(NULL, a + length[i] + TAG) for i in range(n)]
    if n == 0:
        return out
    cdef unsigned char **dst = <unsigned char **>malloc(n * sizeof(unsigned char *))
    if dst == NULL:
        raise MemoryError()
    for i in range(n):
        dst[i] = <unsigned char *>PyBytes_AS_STRING(out[i])
    cdef const uint8_t *src = &body[0] if body.shape[0] else NULL
    cdef int outl = 0, ok = 1
    cdef EVP_CIPHER_CTX *ctx
    try:
        ctx = _context(key, 1)
        with nogil:
            i = 0
            while ok and i < n:
                memcpy(dst[i], &aad[i, 0], a)
                if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, &nonces[i, 0], 1) != 1
                        or EVP_CipherUpdate(ctx, NULL, &outl, &aad[i, 0], <int>a) != 1
                        or (length[i] and EVP_CipherUpdate(ctx, dst[i] + a, &outl, src + offset[i], <int>length[i]) != 1)
                        or EVP_CipherFinal_ex(ctx, dst[i] + a + length[i], &outl) != 1
                        or EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG, dst[i] + a + length[i]) != 1):
                    ok = 0
                else:
                    memcpy(&records[i, 0], dst[i], a)
                    memcpy(&records[i, a], dst[i] + a + length[i], TAG)
                i += 1
        EVP_CIPHER_CTX_free(ctx)
    finally:
        free(dst)
    if not ok:
        raise ValueError("OpenSSL failed to seal with AES-256-GCM")
    return out


def gcm_open(bytes key not None, list packets not None, const int64_t[::1] index, const uint8_t[:, ::1] nonces,
             Py_ssize_t a, uint8_t[::1] out, const int64_t[::1] offset, uint8_t[::1] ok, uint8_t[:, ::1] records):
    """Open ``packets[index[j]]`` (bytes: ``a`` bytes of associated data, ciphertext, 16-byte tag) under
    ``nonces[j]``: the plain text goes to ``out[offset[j]:]``, ``ok[j]`` says whether the tag was right,
    and ``records[j]`` receives the associated data + the tag."""
    cdef Py_ssize_t m = index.shape[0], j, size
    if nonces.shape[0] != m or nonces.shape[1] != NONCE or offset.shape[0] != m or ok.shape[0] != m:
        raise ValueError("gcm_open: index, offset, ok (m,) and nonces (m, 12)")
    if records.shape[0] != m or records.shape[1] != a + TAG:
        raise ValueError("gcm_open: records must be (m, A + 16)")
    if m == 0:
        return
    cdef const unsigned char **src = <const unsigned char **>malloc(m * sizeof(unsigned char *))
    cdef Py_ssize_t *sizes = <Py_ssize_t *>malloc(m * sizeof(Py_ssize_t))
    if src == NULL or sizes == NULL:
        free(src)
        free(sizes)
        raise MemoryError()
    cdef int outl = 0, good
    cdef unsigned char last[TAG]
    cdef EVP_CIPHER_CTX *ctx = NULL
    try:
        for j in range(m):
            p = packets[index[j]]
            if not PyBytes_Check(p):
                raise TypeError(f"gcm_open: packet {index[j]} is not bytes")
            size = PyBytes_GET_SIZE(p)
            if size < a + TAG or offset[j] < 0 or offset[j] + size - a - TAG > out.shape[0]:
                raise ValueError(f"gcm_open: packet {index[j]} too short or its output outside the buffer")
            src[j] = <const unsigned char *>PyBytes_AS_STRING(p)
            sizes[j] = size - a - TAG
        ctx = _context(key, 0)
        with nogil:
            for j in range(m):
                good = (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, &nonces[j, 0], 0) == 1
                        and EVP_CipherUpdate(ctx, NULL, &outl, src[j], <int>a) == 1
                        and (sizes[j] == 0 or EVP_CipherUpdate(ctx, &out[offset[j]], &outl, src[j] + a, <int>sizes[j]) == 1)
                        and EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG, <void *>(src[j] + a + sizes[j])) == 1
                        and EVP_CipherFinal_ex(ctx, last, &outl) == 1)  # GCM writes nothing here
                ok[j] = good
                memcpy(&records[j, 0], src[j], a)
                memcpy(&records[j, a], src[j] + a + sizes[j], TAG)
    finally:
        if ctx != NULL:
            EVP_CIPHER_CTX_free(ctx)
        free(src)
        free(sizes)
