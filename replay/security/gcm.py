"""AES-256-GCM of many packets per call: the sealing and opening behind the migration channel.

A packet here is ``aad + ciphertext + tag`` (the header in clear as associated data, the 16-byte tag last).
``seal_many`` and ``open_many`` work on a whole batch of pages in C (``replay._gcm``: one OpenSSL EVP
context per call, only the nonce reset per packet, GIL released). Without OpenSSL's headers at build time
they fall back to ``cryptography``'s ``AESGCM`` packet by packet, which gives the same bytes (the tests
check both).

Both also return each packet's *record*, its associated data followed by its tag: what the validation
token hashes (``replay.security.token``).
"""

from __future__ import annotations

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

try:
    from replay._gcm import gcm_open, gcm_seal
except ImportError:  # built without OpenSSL's headers: `cryptography`, packet by packet
    gcm_open = gcm_seal = None

TAG_BYTES = 16


def seal_many(key: bytes, nonces: np.ndarray, aad: np.ndarray, body, offset: np.ndarray,
              length: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """Packet ``i`` = ``aad[i]`` + AES-256-GCM(``body[offset[i] : offset[i] + length[i]]``, nonce
    ``nonces[i]``, associated data ``aad[i]``) + tag; and the ``(n, A + 16)`` records (aad + tag).
    ``nonces``: ``(n, 12)`` uint8; ``aad``: ``(n, A)`` uint8; ``body``: one contiguous byte buffer."""
    n, a = aad.shape
    buf = np.frombuffer(body, np.uint8) if not isinstance(body, np.ndarray) else body.reshape(-1)
    offset = np.ascontiguousarray(offset, np.int64)
    length = np.ascontiguousarray(length, np.int64)
    records = np.empty((n, a + TAG_BYTES), np.uint8)
    if gcm_seal is not None:
        return gcm_seal(key, nonces, aad, buf, offset, length, records), records
    gcm, out = AESGCM(key), []
    for i, (o, ln) in enumerate(zip(offset.tolist(), length.tolist())):
        head = aad[i].tobytes()
        sealed = gcm.encrypt(nonces[i].tobytes(), buf[o : o + ln].tobytes(), head)
        out.append(head + sealed)
        records[i, :a] = aad[i]
        records[i, a:] = np.frombuffer(sealed[-TAG_BYTES:], np.uint8)
    return out, records


def open_many(key: bytes, packets: list[bytes], index: np.ndarray, nonces: np.ndarray, a: int,
              out: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Open ``packets[index[j]]`` (``a`` bytes of associated data first) under ``nonces[j]``, the plain
    text into ``out[offset[j]:]``; returns (tag right, per packet; the ``(m, a + 16)`` records)."""
    m = index.size
    index = np.ascontiguousarray(index, np.int64)
    offset = np.ascontiguousarray(offset, np.int64)
    ok = np.zeros(m, np.uint8)
    records = np.empty((m, a + TAG_BYTES), np.uint8)
    if gcm_open is not None:
        gcm_open(key, packets, index, nonces, a, out, offset, ok, records)
        return ok.view(bool), records
    gcm = AESGCM(key)
    for j, (i, o) in enumerate(zip(index.tolist(), offset.tolist())):
        p = packets[i]
        records[j] = np.frombuffer(p[:a] + p[len(p) - TAG_BYTES :], np.uint8)
        try:
            plain = gcm.decrypt(nonces[j].tobytes(), p[a:], p[:a])
        except InvalidTag:
            continue
        out[o : o + len(plain)] = np.frombuffer(plain, np.uint8)
        ok[j] = 1
    return ok.view(bool), records
