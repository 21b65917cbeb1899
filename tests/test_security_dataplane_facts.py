"""The data plane's record and its small pieces, by hand (replay/security/session.py, xts.py).

What ``DataPlane.facts`` says before a handshake, after a clean transfer (counts of shared pages left
unprotected, VMSAs per vCPU and VMPL, the zstd level) and after a token lost on the wire; the emulated
VMSA as its documented HKDF output; XTS tweaks as byte addresses and the page-array shape it refuses.
"""

from __future__ import annotations

import blake3
import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from replay.core.errors import InvariantError
from replay.security import xts
from replay.security.channel import Outcome
from replay.security.session import DataPlane, emulated_vmsa
from replay.security.token import TokenOutcome

PAGE = 4096
SEED = 4


def plane(level=None):
    return DataPlane(SEED, npages=8, spa_base=(1024, 2048), shared_ranges=[(6, 7)], compress_level=level)


def write(dp, gfn, value):
    dp.guest_rows(0, np.array([gfn * PAGE], np.uint64), np.array([8], np.uint64), np.zeros(1, np.uint8),
                  np.array([value], np.uint64))


EMPTY_DIGEST = blake3.blake3(blake3.blake3(b"").digest() + blake3.blake3(b"").digest()).hexdigest()


def test_before_the_handshake_the_facts_are_empty_and_nothing_can_be_sent():
    dp = plane()
    assert dp.facts() == {"handshake": [], "handshake_refused_by": "", "handshake_verdict": "", "compress": False,
                          "zstd_level": 0, "source": {}, "target": {}, "token": "", "shared_pages_unprotected": 0,
                          "digests": {"source": EMPTY_DIGEST, "target": EMPTY_DIGEST}}
    for call in (lambda: dp.send([1], 1, 1), lambda: dp.send_vmsas(1, [0], 0), lambda: dp.finish(),
                 lambda: dp.capture([1])):
        with pytest.raises(InvariantError, match=r"^data plane: nothing may be sent before an accepted handshake"):
            call()


def test_a_clean_transfer_counts_shared_pages_and_vmsas_by_hand():
    dp = plane(level=5)
    assert dp.attest().accepted
    write(dp, 1, 3)
    write(dp, 6, 4)  # shared
    assert dp.send([1, 2, 6, 7], 1, stream=1) == [Outcome.ACCEPTED] * 4
    assert dp.send_vmsas(2, [0, 2], stream=0) == [Outcome.ACCEPTED] * 4
    assert set(dp.receiver.vmsas) == {(0, 0), (0, 2), (1, 0), (1, 2)}
    assert dp.receiver.vmsas[(1, 2)] == emulated_vmsa(SEED, 1, 2)
    assert dp.finish() is TokenOutcome.MATCH
    f = dp.facts()
    assert (f["compress"], f["zstd_level"], f["token"], f["shared_pages_unprotected"]) == (True, 5, "match", 2)
    assert (f["source"]["vmsas"], f["target"]["vmsas"], f["source"]["private_pages"]) == (4, 4, 2)
    assert f["handshake_verdict"] == "accepted" and f["digests"]["source"] == f["digests"]["target"] != EMPTY_DIGEST


def test_a_token_lost_on_the_wire_is_rejected():
    dp = plane()
    dp.attest()
    assert dp.finish(tamper=lambda packets: []) is TokenOutcome.TOKEN_REJECTED
    assert dp.facts()["token"] == "token_rejected"


def test_the_emulated_vmsa_is_256_hkdf_bytes_then_zeros():
    head = HKDF(algorithm=hashes.SHA384(), length=256, salt=b"snp-replay/keys/v1",
                info=b"vmsa/vcpu=3/vmpl=1").derive(f"seed={SEED}".encode())
    assert emulated_vmsa(SEED, 3, 1) == head + bytes(PAGE - 256)


def test_xts_tweaks_are_byte_addresses():
    assert xts.tweaks(np.array([0, 1, 1 << 40])).tolist() == [0, 4096, 1 << 52]


@pytest.mark.parametrize("pages", [np.zeros((2, PAGE), np.int16), np.zeros(PAGE, np.uint8),
                                   np.zeros((2, PAGE - 1), np.uint8), np.zeros((1, 2, PAGE), np.uint8)])
def test_xts_takes_only_n_by_4096_bytes(pages):
    key = bytes(range(32))
    with pytest.raises(ValueError, match=r"^pages must be an \(n, 4096\) uint8 array, got "):
        xts.encrypt_pages(key, pages, np.zeros(len(pages), np.uint64))
    with pytest.raises(ValueError, match=r"^pages must be an \(n, 4096\) uint8 array, got "):
        xts.reference_pages(key, pages, np.zeros(len(pages), np.uint64), False)
