"""Data mode's bookkeeping by hand: the validation token's counts and hash, the seed-derived keys, and how
bulk work is cut in halves (replay/security/token.py, keys.py, parallel.py).

The token is recomputed here from its documented rule (SHA-384 over ``b"snp-replay token v1"`` and, per
stream in stream order, ``<HQ`` stream and count followed by the SHA-384 of the stream's header + tag
records); keys from HKDF-SHA384 with the documented salt and labels; the split at its exact threshold.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from replay.security import keys, parallel
from replay.security.token import Token, TokenHasher, TokenOutcome, compare

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- token


def _rec(i: int) -> bytes:
    return bytes([i]) * 40  # a header + tag stand-in: the hasher only needs fixed-size records


def _expected(streams: dict[int, list[bytes]]) -> bytes:
    top = hashlib.sha384(b"snp-replay token v1")
    for s in sorted(streams):
        top.update(struct.pack("<HQ", s, len(streams[s])) + hashlib.sha384(b"".join(streams[s])).digest())
    return top.digest()


def test_the_token_is_the_documented_hash_over_streams_in_stream_order():
    h = TokenHasher()
    h.absorb(7, _rec(1)[:24], _rec(1)[24:], vmsa=False)
    h.absorb_many(2, [_rec(2), _rec(3), _rec(4)], vmsas=1)
    h.absorb_block(7, _rec(5) + _rec(6), 2)
    h.absorb(2, _rec(7)[:24], _rec(7)[24:], vmsa=True)
    t = h.token()
    # 1 + 3 + 2 + 1 packets, of which 2 are VMSAs.
    assert (t.pages, t.vmsas) == (5, 2)
    assert t.digest == _expected({7: [_rec(1), _rec(5), _rec(6)], 2: [_rec(2), _rec(3), _rec(4), _rec(7)]})


def test_an_empty_block_changes_nothing_not_even_the_stream_list():
    h = TokenHasher()
    h.absorb_block(3, b"", 0)
    h.absorb_many(4, [])
    t = h.token()
    assert (t.pages, t.vmsas, t.digest) == (0, 0, hashlib.sha384(b"snp-replay token v1").digest())


def test_restore_returns_to_the_checkpoint_and_the_checkpoint_is_not_shared():
    h = TokenHasher()
    h.absorb_many(1, [_rec(1), _rec(2)], vmsas=0)
    state = h.checkpoint()
    h.absorb_many(1, [_rec(3)], vmsas=1)
    h.absorb_many(9, [_rec(4)])
    h.restore(state)
    h.absorb_many(1, [_rec(5)])
    assert h.token() == Token(3, 0, _expected({1: [_rec(1), _rec(2), _rec(5)]}))
    h.restore(state)  # the checkpoint itself was not advanced by the absorb after the first restore
    assert h.token() == Token(2, 0, _expected({1: [_rec(1), _rec(2)]}))


def test_vmsa_counts_are_keyword_only():
    # A bare positional count would be easy to confuse with the packet count.
    h = TokenHasher()
    for call in (lambda: h.absorb(1, b"h", b"t", True), lambda: h.absorb_many(1, [_rec(1)], 1),
                 lambda: h.absorb_block(1, _rec(1), 1, 1)):
        with pytest.raises(TypeError):
            call()
    assert h.token() == Token(0, 0, hashlib.sha384(b"snp-replay token v1").digest())


def test_token_bytes_and_json():
    t = Token(3, 1, bytes(range(48)))
    data = t.to_bytes()
    assert data == (3).to_bytes(8, "little") + (1).to_bytes(8, "little") + bytes(range(48))
    assert Token.from_bytes(data) == t
    assert t.to_json() == {"pages": 3, "vmsas": 1, "digest": bytes(range(48)).hex()}


@pytest.mark.parametrize("target, outcome", [
    (Token(3, 1, b"d" * 48), TokenOutcome.MATCH),
    (Token(4, 1, b"d" * 48), TokenOutcome.COUNT_MISMATCH),
    (Token(3, 0, b"d" * 48), TokenOutcome.COUNT_MISMATCH),
    (Token(3, 1, b"e" * 48), TokenOutcome.HASH_MISMATCH),
    (Token(2, 2, b"e" * 48), TokenOutcome.COUNT_MISMATCH),  # counts are compared first
])
def test_compare(target, outcome):
    assert compare(Token(3, 1, b"d" * 48), target) is outcome


# ---------------------------------------------------------------------------------------------- keys


def _hkdf(label: str, length: int, seed: int) -> bytes:
    return HKDF(algorithm=hashes.SHA384(), length=length, salt=b"snp-replay/keys/v1",
                info=label.encode()).derive(f"seed={seed}".encode())


def test_the_memory_key_is_the_first_hkdf_label_of_its_host():
    assert keys.vm_memory_key(7, 1) == _hkdf("vek/host=1/0", 32, 7)
    assert keys.vm_memory_key(-3, 0) == _hkdf("vek/host=0/0", 32, -3)
    assert keys.derive(1 << 70, "x", 5) == _hkdf("x", 5, 1 << 70)


# The order of the P-384 group, written out from FIPS 186-4 D.1.2.4 (not imported from the code under test).
P384_N = int("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973", 16)


def test_a_p384_scalar_is_the_hkdf_output_reduced_with_the_fips_group_order():
    assert keys.P384_ORDER == P384_N
    for seed, label in ((3, "ark"), (11, "ecdh/host=1/session=0")):
        want = int.from_bytes(_hkdf(label, 64, seed), "big") % (P384_N - 1) + 1
        assert keys.p384_private_key(seed, label).private_numbers().private_value == want


@pytest.mark.parametrize("seed", [True, "1", 1.0])
def test_a_seed_must_be_an_int_and_not_a_bool(seed):
    with pytest.raises(TypeError, match=r"^seed must be an int, got "):
        keys.derive(seed, "x", 16)


# ---------------------------------------------------------------------------------------------- parallel


def _calls(monkeypatch, n: int, threads: int = 2) -> list[tuple[int, int]]:
    monkeypatch.setattr(parallel, "THREADS", threads)
    calls, lock = [], threading.Lock()

    def work(lo, hi):
        with lock:
            calls.append((lo, hi))

    parallel.halves(n, work)
    return sorted(calls)


def test_a_batch_of_256_pages_is_split_and_255_is_not(monkeypatch):
    assert _calls(monkeypatch, 256) == [(0, 128), (128, 256)]
    assert _calls(monkeypatch, 255) == [(0, 255)]
    assert _calls(monkeypatch, 1001) == [(0, 500), (500, 1001)]
    assert _calls(monkeypatch, 1001, threads=1) == [(0, 1001)]


def _threads_in_a_fresh_process(setup: str, env_threads: str | None = None) -> int:
    code = f"import os; {setup}; from replay.security import parallel; print(parallel.THREADS)"
    env = {k: v for k, v in os.environ.items() if k != "SNP_REPLAY_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    if env_threads is not None:
        env["SNP_REPLAY_THREADS"] = env_threads
    p = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr
    return int(p.stdout)


def _cores(n: int) -> str:
    # This process's own affinity (pid 0) has n cores; any other pid's (init's) has one.
    return f"os.sched_getaffinity = lambda pid: set(range({n})) if pid == 0 else {{0}}"


def test_threads_are_the_cores_at_most_two_and_one_when_asked():
    assert _threads_in_a_fresh_process(_cores(8)) == 2
    assert _threads_in_a_fresh_process(_cores(2)) == 2
    assert _threads_in_a_fresh_process(_cores(1)) == 1
    assert _threads_in_a_fresh_process(_cores(8), "1") == 1
    assert _threads_in_a_fresh_process(_cores(8), "2") == 2


@pytest.mark.parametrize("count, threads", [(None, 1), (1, 1), (8, 2)])
def test_without_affinity_the_cpu_count_is_used_and_unknown_is_one(count, threads):
    setup = f"del os.sched_getaffinity; os.cpu_count = lambda: {count}"
    assert _threads_in_a_fresh_process(setup) == threads


# ---------------------------------------------------------------------------------------------- values


def test_the_security_records_are_frozen():
    """Reports, evidence, certificates, keys, handshakes, headers, wires and tokens are values: a verifier's
    verdict or a token must not change under it after the fact."""
    import dataclasses

    import numpy as np

    from replay.security import attestation as at
    from replay.security import channel as ch
    from replay.security.session import AttestationSetup, establish

    hs = establish(2)
    ev = at.Agent(at.AmdRoot(2), 2, 0, measurement=at.measurement_of("svsm")).evidence
    values = [at.TcbVersion(), ev.vcek_cert, ev.report, ev, at.VerifierPolicy(b"", frozenset()), hs.source_keys,
              hs.steps[0], hs, ch.Header(0, 0, 0, 0, ch.Flag.PRIVATE, 16), ch.Wire.of([b"x"]),
              ch.PageRefs.of(np.zeros((1, 4096), np.uint8), [True]), AttestationSetup(), Token(0, 0, bytes(48))]
    for v in values:
        name = dataclasses.fields(v)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(v, name, getattr(v, name))
