"""Where a sealed packet may lie on the wire, at its exact bounds, in C and through ``cryptography``
(replay/security/gcm.py).

Packets are built here with ``cryptography``'s AESGCM (``aad + ciphertext + tag``), never by the code under
test: a packet ending at the wire's last byte and one with an empty body open; one byte too short, one
byte past the wire's end or at a negative offset is refused, naming the packet; a wrong tag marks only
its own packet and the packets after it still open. (The wrong tag's plain-text slot is unspecified.)
"""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from replay.security import gcm
from replay.security.gcm import TAG_BYTES, open_many, seal_many

KEY = bytes(range(32))
A = 8


def _packet(i: int, body: bytes) -> tuple[bytes, bytes]:
    aad, nonce = bytes([i]) * A, bytes([i]) * 12
    return aad + AESGCM(KEY).encrypt(nonce, body, aad), nonce


@pytest.fixture(params=["c", "cryptography"])
def code(request, monkeypatch):
    if request.param == "cryptography":
        monkeypatch.setattr(gcm, "gcm_open", None)
        monkeypatch.setattr(gcm, "gcm_seal", None)
    return request.param


def _open(wire: bytes, at, size, nonces, out_bytes: int, offset):
    out = np.zeros(out_bytes, np.uint8)
    ok, records = open_many(KEY, np.frombuffer(wire, np.uint8).copy(), np.array(at), np.array(size),
                            np.frombuffer(b"".join(nonces), np.uint8).reshape(-1, 12), A, out, np.array(offset))
    return ok.tolist(), records, out.tobytes()


def test_packets_up_to_the_wires_last_byte_open_and_a_bad_tag_spoils_only_its_own(code):
    p0, n0 = _packet(1, b"first body")  # 8 + 10 + 16 = 34 bytes
    p1, n1 = _packet(2, b"")  # an empty body: 8 + 0 + 16 = 24 bytes, the shortest packet
    p2, n2 = _packet(3, b"xyz")
    p0_bad = p0[:-1] + bytes([p0[-1] ^ 1])
    wire = b"\xee" * 5 + p0_bad + p1 + p2  # the last packet ends at the wire's last byte
    at = [5, 5 + len(p0), 5 + len(p0) + len(p1)]
    ok, records, out = _open(wire, at, [len(p0), len(p1), len(p2)], [n0, n1, n2], 16, [0, 10, 12])
    assert ok == [False, True, True]
    # (what a packet with a wrong tag leaves in its own slot is unspecified: the caller drops it)
    assert out[10:] == bytes(2) + b"xyz" + bytes(1)
    assert records.tobytes() == (p0_bad[:A] + p0_bad[-TAG_BYTES:]) + (p1[:A] + p1[-TAG_BYTES:]) + (p2[:A] + p2[-TAG_BYTES:])


@pytest.mark.parametrize("case", ["short", "past-the-end", "negative"])
def test_a_packet_outside_the_wire_or_too_short_is_refused_by_index(code, case):
    p0, n0 = _packet(1, b"ok")
    p1, n1 = _packet(2, b"body")
    wire = p0 + p1
    at, size = [0, len(p0)], [len(p0), len(p1)]
    if case == "short":
        size[1] = A + TAG_BYTES - 1
    elif case == "past-the-end":
        size[1] += 1
    else:
        at[1] = -1
    with pytest.raises(ValueError, match=r"(open_many|gcm_open): packet 1 .*outside the wire"):
        _open(wire, at, size, [n0, n1], 16, [0, 2])


def test_seal_many_writes_packets_and_records_where_asked(code):
    # Packet 0 sealed at the wire's end, packet 1 as it is (unsealed: no tag, its record stays zero).
    aad = np.array([[1] * A, [2] * A], np.uint8)
    nonces = np.array([[7] * 12, [8] * 12], np.uint8)
    sealed0 = bytes([1] * A) + AESGCM(KEY).encrypt(bytes([7] * 12), b"abcde", bytes([1] * A))
    plain1 = bytes([2] * A) + b"QR"
    wire = np.zeros(len(plain1) + len(sealed0), np.uint8)
    records = seal_many(KEY, nonces, aad, (b"abcdeQR",), [0, 0], [0, 5], [5, 2], [1, 0], wire,
                        [len(plain1), 0])
    assert wire.tobytes() == plain1 + sealed0
    assert records.tobytes() == bytes([1] * A) + sealed0[-TAG_BYTES:] + bytes(A + TAG_BYTES)
    with pytest.raises(ValueError, match=r"packet 0 .*does not fit the wire"):
        seal_many(KEY, nonces[:1], aad[:1], (b"abcde",), [0], [0], [5], [1], np.zeros(64, np.uint8), [-1])
