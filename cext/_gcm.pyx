# cython: language_level=3
"""AES-256-GCM over many packets in one call, through OpenSSL's EVP interface (libcrypto).

The migration channel seals every page into its own packet. ``cryptography``'s ``AESGCM`` costs a Python
call, a key check and a fresh output object per packet; here one EVP context is keyed once per call and
only the nonce is reset per packet, with the GIL released while the pages are sealed or opened.
``replay.security.gcm`` is the Python face of this module (and its ``cryptography`` fallback); the tests
check both give the same packets.

A packet here is ``aad + ciphertext + tag``: the associated data (the packet header) travels in clear in
front, the 16-byte tag behind. Packets are written to and read from one *wire* buffer, back to back, as
they cross a link: no Python object per packet, and a buffer the caller reuses from batch to batch.
"""

from cpython.bytes cimport PyBytes_AS_STRING
from libc.stdint cimport int8_t, int64_t, uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from _evp cimport *

DEF TAG = 16
DEF NONCE = 12
DEF MAX_AAD = 1 << 16  # associated data per packet (a header), at most
DEF MAX_BODY = 1 << 30  # bytes of one packet's body, at most (OpenSSL takes an int)


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


def gcm_seal(bytes key not None, const uint8_t[:, ::1] nonces, const uint8_t[:, ::1] aad, tuple bodies not None,
             const int8_t[::1] which, const int64_t[::1] offset, const int64_t[::1] length, const uint8_t[::1] sealed,
             uint8_t[::1] wire, const int64_t[::1] at, uint8_t[:, ::1] records):
    """Write packet ``i`` at ``wire[at[i]:]``: ``aad[i]``, then the bytes ``bodies[which[i]][offset[i] :
    offset[i] + length[i]]`` (each body a contiguous byte buffer), AES-256-GCM sealed under ``nonces[i]``
    with ``aad[i]`` as associated data and followed by the tag if ``sealed[i]``, as they are if not.
    ``records[i]`` receives ``aad[i]`` + the tag of a sealed packet (what the validation token hashes)."""
    cdef Py_ssize_t n = nonces.shape[0], a = aad.shape[1], i, nb = len(bodies)
    if (nonces.shape[1] != NONCE or aad.shape[0] != n or offset.shape[0] != n or length.shape[0] != n
            or which.shape[0] != n or sealed.shape[0] != n or at.shape[0] != n):
        raise ValueError("gcm_seal: nonces (n, 12), aad (n, A), which, offset, length, sealed and at (n,)")
    if records.shape[0] != n or records.shape[1] != a + TAG or a > MAX_AAD:
        raise ValueError("gcm_seal: records must be (n, A + 16), A at most 65536")
    views = [memoryview(b).cast("B") for b in bodies]  # kept alive (and the buffers with them) for the call
    cdef const uint8_t[::1] view
    cdef const uint8_t **base = <const uint8_t **>malloc((nb if nb else 1) * sizeof(uint8_t *))
    cdef Py_ssize_t *size = <Py_ssize_t *>malloc((nb if nb else 1) * sizeof(Py_ssize_t))
    try:
        if base == NULL or size == NULL:
            raise MemoryError()
        for i in range(nb):
            view = views[i]
            base[i] = &view[0] if view.shape[0] else NULL
            size[i] = view.shape[0]
        for i in range(n):
            if which[i] < 0 or which[i] >= nb:
                raise ValueError(f"gcm_seal: body {i} names buffer {which[i]} of {nb}")
            if offset[i] < 0 or length[i] < 0 or offset[i] + length[i] > size[which[i]] or length[i] > MAX_BODY:
                raise ValueError(f"gcm_seal: body {i} ({offset[i]}+{length[i]}) outside its buffer of {size[which[i]]} bytes")
            if at[i] < 0 or at[i] + a + length[i] + (TAG if sealed[i] else 0) > wire.shape[0]:
                raise ValueError(f"gcm_seal: packet {i} at {at[i]} does not fit the wire of {wire.shape[0]} bytes")
        if n:
            _seal_all(key, nonces, aad, base, which, offset, length, sealed, &wire[0], at, records)
    finally:
        free(base)
        free(size)


cdef int _seal_all(bytes key, const uint8_t[:, ::1] nonces, const uint8_t[:, ::1] aad, const uint8_t **base,
                   const int8_t[::1] which, const int64_t[::1] offset, const int64_t[::1] length,
                   const uint8_t[::1] sealed, uint8_t *wire, const int64_t[::1] at, uint8_t[:, ::1] records) except -1:
    cdef Py_ssize_t n = nonces.shape[0], a = aad.shape[1], i = 0
    cdef int outl = 0, ok = 1
    cdef unsigned char *dst
    cdef EVP_CIPHER_CTX *ctx = _context(key, 1)
    with nogil:
        while ok and i < n:
            dst = wire + at[i]
            memcpy(dst, &aad[i, 0], a)
            if not sealed[i]:
                if length[i]:
                    memcpy(dst + a, base[which[i]] + offset[i], length[i])
            elif (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, &nonces[i, 0], 1) != 1
                    or EVP_CipherUpdate(ctx, NULL, &outl, &aad[i, 0], <int>a) != 1
                    or (length[i] and EVP_CipherUpdate(ctx, dst + a, &outl, base[which[i]] + offset[i], <int>length[i]) != 1)
                    or EVP_CipherFinal_ex(ctx, dst + a + length[i], &outl) != 1
                    or EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG, dst + a + length[i]) != 1):
                ok = 0
            else:
                memcpy(&records[i, 0], dst, a)
                memcpy(&records[i, a], dst + a + length[i], TAG)
            i += 1
    EVP_CIPHER_CTX_free(ctx)
    if not ok:
        raise ValueError("OpenSSL failed to seal with AES-256-GCM")
    return 0


def gcm_open(bytes key not None, const uint8_t[::1] wire, const int64_t[::1] at, const int64_t[::1] size,
             const uint8_t[:, ::1] nonces, Py_ssize_t a, uint8_t[::1] out, const int64_t[::1] offset, uint8_t[::1] ok,
             uint8_t[:, ::1] records):
    """Open the packet ``wire[at[j] : at[j] + size[j]]`` (``a`` bytes of associated data, ciphertext, 16-byte
    tag) under ``nonces[j]``: the plain text goes to ``out[offset[j]:]``, ``ok[j]`` says whether the tag was
    right, and ``records[j]`` receives the associated data + the tag."""
    cdef Py_ssize_t m = at.shape[0], j
    if size.shape[0] != m or nonces.shape[0] != m or nonces.shape[1] != NONCE or offset.shape[0] != m or ok.shape[0] != m:
        raise ValueError("gcm_open: at, size, offset, ok (m,) and nonces (m, 12)")
    if a < 0 or a > MAX_AAD or records.shape[0] != m or records.shape[1] != a + TAG:
        raise ValueError("gcm_open: records must be (m, A + 16), A in 0..65536")
    for j in range(m):
        if at[j] < 0 or size[j] < a + TAG or size[j] - a - TAG > MAX_BODY or at[j] + size[j] > wire.shape[0]:
            raise ValueError(f"gcm_open: packet {j} ({at[j]}+{size[j]}) too short or outside the wire of {wire.shape[0]} bytes")
        if offset[j] < 0 or offset[j] + size[j] - a - TAG > out.shape[0]:
            raise ValueError(f"gcm_open: the plain text of packet {j} falls outside the output buffer")
    if m == 0:
        return
    cdef int outl = 0, good
    cdef unsigned char last[TAG]
    cdef const unsigned char *src
    cdef Py_ssize_t body
    cdef EVP_CIPHER_CTX *ctx = _context(key, 0)
    with nogil:
        for j in range(m):
            src = &wire[at[j]]
            body = size[j] - a - TAG
            good = (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, &nonces[j, 0], 0) == 1
                    and EVP_CipherUpdate(ctx, NULL, &outl, src, <int>a) == 1
                    and (body == 0 or EVP_CipherUpdate(ctx, &out[offset[j]], &outl, src + a, <int>body) == 1)
                    and EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG, <void *>(src + a + body)) == 1
                    and EVP_CipherFinal_ex(ctx, last, &outl) == 1)  # GCM writes nothing here
            ok[j] = good
            memcpy(&records[j, 0], src, a)
            memcpy(&records[j, a], src + a + body, TAG)
        EVP_CIPHER_CTX_free(ctx)
