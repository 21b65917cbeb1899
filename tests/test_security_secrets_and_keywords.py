"""What the security records show and how they are called (replay/security/attestation.py, session.py):
a session's shared secret never appears in a ``repr`` (of the keys or of the handshake holding them: a
repr ends up in logs, tracebacks and assertion messages), and the options of ``establish``, ``endpoints``
and ``DataPlane`` are keyword-only, so a positional argument is refused rather than bound to the wrong
one (a host number taken for a session, a zstd level for a memory); ``endpoints`` opens no channel on a
handshake without both verdicts accepted and both keys; a ``DataPlane``'s memories are hosts 0 and 1 of
its seed and its facts give each host's own digest."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from replay.core.errors import InvariantError
from replay.security.attestation import SessionKeys, Verdict
from replay.security.memory import HostMemory
from replay.security.session import AttestationSetup, DataPlane, endpoints, establish

SEED = 11


def test_session_keys_repr_hides_the_secret():
    keys = SessionKeys(secret=b"\xab" * 48, salt=b"\x01" * 48)
    text = repr(keys)
    assert "secret" not in text and "ab" * 8 not in text and "\\xab" not in text
    assert "salt" in text  # the rest of the record is shown


def test_handshake_repr_shows_neither_sides_keys():
    hs = establish(SEED)
    assert hs.accepted and hs.source_keys is not None and hs.target_keys is not None
    text = repr(hs)
    assert "source_keys" not in text and "target_keys" not in text and "SessionKeys" not in text
    assert "source_verdict" in text and "steps" in text


def test_establish_takes_its_options_by_keyword_only():
    with pytest.raises(TypeError):
        establish(SEED, AttestationSetup(), 0)  # source_host given by position
    assert establish(SEED, AttestationSetup(), source_host=0, target_host=1).accepted


def test_endpoints_take_the_compression_level_by_keyword_only():
    hs = establish(SEED)
    src = HostMemory.for_host(SEED, 0, npages=2, spa_base=64)
    dst = HostMemory.for_host(SEED, 1, npages=2, spa_base=128)
    with pytest.raises(TypeError):
        endpoints(hs, src, dst, 3)
    sender, _ = endpoints(hs, src, dst, compress_level=3)
    assert sender is not None


def test_dataplane_takes_its_sizes_by_keyword_only():
    with pytest.raises(TypeError):
        DataPlane(SEED, 2, (64, 128))
    dp = DataPlane(SEED, npages=2, spa_base=(64, 128))
    assert [m.npages for m in dp.memory] == [2, 2]


# -- no channel without both verdicts and both keys (session.endpoints' guard), hand-made handshakes


def test_endpoints_need_an_accepted_handshake_with_both_keys():
    hs = establish(SEED)
    src = HostMemory.for_host(SEED, 0, npages=2, spa_base=64)
    dst = HostMemory.for_host(SEED, 1, npages=2, spa_base=128)
    refused = dataclasses.replace(hs, target_verdict=Verdict.MEASUREMENT)  # keys present, one side refused
    assert not refused.accepted and refused.refusal == ("target", Verdict.MEASUREMENT)
    one_sided = dataclasses.replace(hs, source_verdict=Verdict.POLICY)
    assert not one_sided.accepted
    for bad in (refused, one_sided, dataclasses.replace(hs, source_keys=None),
                dataclasses.replace(hs, target_keys=None)):
        with pytest.raises(InvariantError, match="no channel without an accepted handshake"):
            endpoints(bad, src, dst)


# -- the data plane's two hosts


def test_dataplane_memories_are_host_0_and_host_1_of_the_seed():
    # Host h's DRAM holds the guest under vm_memory_key(seed, h) at its own SPAs: the same row on
    # HostMemory.for_host(seed, h) gives the same raw ciphertext, another host's key other bytes.
    rows = (np.array([4096], np.uint64), np.array([8], np.uint64), np.zeros(1, np.uint8), np.array([3], np.uint64))
    dp = DataPlane(SEED, npages=2, spa_base=(64, 128))
    raw = {}
    for h, base in ((0, 64), (1, 128)):
        dp.guest_rows(h, *rows)
        twin = HostMemory.for_host(SEED, h, npages=2, spa_base=base)
        twin.apply(*rows)
        raw[h] = dp.memory[h].read_raw(1)
        assert raw[h] == twin.read_raw(1) and dp.memory[h].read_plain(1) == twin.read_plain(1)
    assert raw[0] != raw[1]


def test_dataplane_facts_give_each_hosts_own_digest():
    rows = (np.array([4096], np.uint64), np.array([8], np.uint64), np.zeros(1, np.uint8), np.array([3], np.uint64))
    dp = DataPlane(SEED, npages=2, spa_base=(64, 128))
    dp.guest_rows(0, *rows)  # only the source ran the row: the two memories differ
    digests = dp.facts()["digests"]
    assert digests["source"] == dp.memory[0].plaintext_digest()
    assert digests["target"] == dp.memory[1].plaintext_digest()
    assert digests["source"] != digests["target"]
