"""Paths of data mode's key, GCM and thread helpers that ordinary runs never take
(replay/security/keys.py, gcm.py, parallel.py).

- ``vm_memory_key``: an HKDF output whose two AES-128 halves are equal is not a valid XTS key; the next
  label (``.../1``) is taken, not one further. (Never happens with the real HKDF; a stand-in forces it.)
- ``open_many`` without the C extension returns the same bytes as with it, the per-packet flags
  included: 1 for a right tag, 0 for a wrong one (a flag byte of 2 would read True yet differ).
- ``halves`` keeps one helper thread: a second caller's half waits for it rather than adding a thread,
  so a process never does more than two halves at once.
"""

from __future__ import annotations

import threading

import numpy as np

from replay.security import gcm, keys, parallel
from test_security_bookkeeping import _hkdf
from test_security_wire_bounds import A, KEY, _packet


def test_a_key_with_equal_halves_is_skipped_for_the_next_label(monkeypatch):
    real, asked = keys.derive, []

    def derive(seed, label, length):
        asked.append(label)
        return bytes(32) if label.endswith("/0") else real(seed, label, length)

    monkeypatch.setattr(keys, "derive", derive)
    assert keys.vm_memory_key(7, 1) == _hkdf("vek/host=1/1", 32, 7)
    assert asked == ["vek/host=1/0", "vek/host=1/1"]


def _open_both(monkeypatch):
    p0, n0 = _packet(1, b"good body")
    p1, n1 = _packet(2, b"bad")
    p1 = p1[:-1] + bytes([p1[-1] ^ 1])
    wire = np.frombuffer(p0 + p1, np.uint8).copy()
    args = (np.array([0, len(p0)]), np.array([len(p0), len(p1)]), np.frombuffer(n0 + n1, np.uint8).reshape(2, 12), A)
    got = []
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(gcm, "gcm_open", None)
        out = np.zeros(12, np.uint8)
        ok, records = gcm.open_many(KEY, wire, *args, out, np.array([0, 9]))
        got.append((ok.tobytes(), records.tobytes(), out[:9].tobytes()))
    return got, p0, p1


def test_opening_without_the_extension_gives_the_same_bytes_flags_included(monkeypatch):
    (c, py), p0, p1 = _open_both(monkeypatch)
    assert c[0] == py[0] == b"\x01\x00"
    assert c[1] == py[1] == p0[:A] + p0[-16:] + p1[:A] + p1[-16:]
    assert c[2] == py[2] == b"good body"


def test_a_second_caller_waits_for_the_one_helper_thread(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 2)
    monkeypatch.setattr(parallel, "_pool", None)
    first_upper_started, second_submitted = threading.Event(), threading.Event()
    upper = {}

    def first(lo, hi):
        if hi - lo == parallel.SPLIT_MIN:  # not split at all (256 is worth splitting): fail at once
            first_upper_started.set()
        elif lo:  # the upper half, on the helper thread: busy until the second caller has handed its half over
            upper["first"] = threading.get_ident()
            first_upper_started.set()
            second_submitted.wait(5)

    def second(lo, hi):
        if lo:
            upper["second"] = threading.get_ident()
        else:  # runs on the caller once its upper half is handed over
            second_submitted.set()

    t = threading.Thread(target=parallel.halves, args=(parallel.SPLIT_MIN, first))
    t.start()
    assert first_upper_started.wait(5)
    parallel.halves(parallel.SPLIT_MIN, second)
    t.join(5)
    pool = parallel._pool
    pool.shutdown()
    assert upper["first"] == upper["second"]  # the same helper thread did both upper halves
