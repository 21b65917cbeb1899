"""AES-256-GCM of many packets per call: the sealing and opening behind the migration channel.

A packet here is ``aad + ciphertext + tag`` (the header in clear as associated data, the 16-byte tag last),
and a batch of packets lies back to back in one *wire* buffer, as on a link. ``seal_many`` and
``open_many`` work on a whole batch of pages in C (``replay.security._gcm``: one OpenSSL EVP context per call,
only the nonce reset per packet, GIL released). A large batch is cut in two halves sealed or opened at
once on two cores (``replay.security.parallel``): every packet is independent of the others, so the bytes
are the same whatever the split. Without OpenSSL's headers at build time they fall back to
``cryptography``'s ``AESGCM`` packet by packet, which gives the same bytes (the tests check both).

Both also return each packet's *record*, its associated data followed by its tag: what the validation
token hashes (``replay.security.token``).
"""

from __future__ import annotations

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .parallel import halves

try:
    from replay.security._gcm import gcm_open, gcm_seal
except ImportError:  # built without OpenSSL's headers: `cryptography`, packet by packet
    gcm_open = gcm_seal = None

TAG_BYTES = 16


def _int64(*arrays) -> list[np.ndarray]:
    """The index arrays as the C code takes them: contiguous int64."""
    return [np.ascontiguousarray(a, np.int64) for a in arrays]


def seal_many(key: bytes, nonces: np.ndarray, aad: np.ndarray, bodies: tuple, which: np.ndarray, offset: np.ndarray,
              length: np.ndarray, sealed: np.ndarray, wire: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Write packet ``i`` into ``wire`` (a uint8 buffer) at ``at[i]``: ``aad[i]``, then the body
    ``bodies[which[i]][offset[i] : offset[i] + length[i]]`` AES-256-GCM sealed under ``nonces[i]`` with
    ``aad[i]`` as associated data and followed by the tag if ``sealed[i]``, else as it is. Returns the
    ``(n, A + 16)`` records (aad + tag; meaningful for the sealed packets). ``bodies``: contiguous byte
    buffers (pages straight from a host's memory, a buffer of captured ones, compressed frames), so that
    pages are sealed where they lie, without gathering them first."""
    n, a = aad.shape
    bufs = tuple(np.frombuffer(b, np.uint8) if not isinstance(b, np.ndarray) else b.reshape(-1) for b in bodies)
    which, sealed = np.ascontiguousarray(which, np.int8), np.ascontiguousarray(sealed, np.uint8)
    offset, length, at = _int64(offset, length, at)
    records = np.zeros((n, a + TAG_BYTES), np.uint8)
    if gcm_seal is not None:
        halves(n, lambda lo, hi: gcm_seal(key, nonces[lo:hi], aad[lo:hi], bufs, which[lo:hi], offset[lo:hi],
                                           length[lo:hi], sealed[lo:hi], wire, at[lo:hi], records[lo:hi]))
        return records
    gcm = AESGCM(key)
    for i, (w, o, ln, sl, p) in enumerate(zip(which.tolist(), offset.tolist(), length.tolist(), sealed.tolist(),
                                              at.tolist())):
        head = aad[i].tobytes()
        body = bufs[w][o : o + ln].tobytes()
        if sl:
            body = gcm.encrypt(nonces[i].tobytes(), body, head)
            records[i, :a] = aad[i]
            records[i, a:] = np.frombuffer(body[-TAG_BYTES:], np.uint8)
        if p < 0 or p + a + len(body) > wire.size:
            raise ValueError(f"seal_many: packet {i} does not fit the wire")
        wire[p : p + a] = aad[i]
        wire[p + a : p + a + len(body)] = np.frombuffer(body, np.uint8)
    return records


def open_many(key: bytes, wire: np.ndarray, at: np.ndarray, size: np.ndarray, nonces: np.ndarray, a: int,
              out: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Open the packets ``wire[at[j] : at[j] + size[j]]`` (``a`` bytes of associated data first, the tag
    last) under ``nonces[j]``, the plain text into ``out[offset[j]:]``; returns (tag right, per packet; the
    ``(m, a + 16)`` records)."""
    m = at.size
    at, size, offset = _int64(at, size, offset)
    ok = np.zeros(m, np.uint8)
    records = np.empty((m, a + TAG_BYTES), np.uint8)
    if gcm_open is not None:
        halves(m, lambda lo, hi: gcm_open(key, wire, at[lo:hi], size[lo:hi], nonces[lo:hi], a, out, offset[lo:hi],
                                           ok[lo:hi], records[lo:hi]))
        return ok.view(bool), records
    gcm = AESGCM(key)
    for j, (p, ln, o) in enumerate(zip(at.tolist(), size.tolist(), offset.tolist())):
        if p < 0 or ln < a + TAG_BYTES or p + ln > wire.size:
            raise ValueError(f"open_many: packet {j} too short or outside the wire")
        packet = wire[p : p + ln].tobytes()
        records[j] = np.frombuffer(packet[:a] + packet[ln - TAG_BYTES :], np.uint8)
        try:
            plain = gcm.decrypt(nonces[j].tobytes(), packet[a:], packet[:a])
        except InvalidTag:
            continue
        out[o : o + len(plain)] = np.frombuffer(plain, np.uint8)
        ok[j] = 1
    return ok.view(bool), records
