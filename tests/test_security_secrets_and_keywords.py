"""What the security records show and how they are called (replay/security/attestation.py, session.py):
a session's shared secret never appears in a ``repr`` (of the keys or of the handshake holding them: a
repr ends up in logs, tracebacks and assertion messages), and the options of ``establish``, ``endpoints``
and ``DataPlane`` are keyword-only, so a positional argument is refused rather than bound to the wrong
one (a host number taken for a session, a zstd level for a memory)."""

from __future__ import annotations

import pytest

from replay.security.attestation import SessionKeys
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
