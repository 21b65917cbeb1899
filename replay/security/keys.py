"""Every secret of data mode, derived from the scenario's seed (so that runs are reproducible).

A real SEV-SNP platform makes its keys in the AMD Secure Processor from fused and random secrets; the
testbench has no such source and must give byte-identical runs, so each secret is an HKDF-SHA384 output
over the scenario seed with a label naming what the key is for (``vek/host=1``, ``vcek/host=0/tcb=...``).
Distinct labels give independent keys; nothing here reads a clock or the OS's random source.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SALT = b"snp-replay/keys/v1"
# Order of the P-384 group (FIPS 186-4, D.1.2.4): private scalars are taken in [1, n - 1].
P384_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973


def derive(seed: int, label: str, length: int) -> bytes:
    """``length`` bytes of key material for ``label`` under scenario ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    ikm = f"seed={seed}".encode()  # any int, including negative and > 64 bits, has one encoding
    return HKDF(algorithm=hashes.SHA384(), length=length, salt=SALT, info=label.encode()).derive(ikm)


def vm_memory_key(seed: int, host: int) -> bytes:
    """The 32-byte AES-128-XTS key (two AES-128 keys) of the guest's memory on ``host``.

    Models the per-VM encryption key the AMD-SP makes for the guest's ASID on each machine: the source and
    the target never share it, which is why ciphertext cannot simply be copied between them."""
    n = 0
    while True:
        key = derive(seed, f"vek/host={host}/{n}", 32)
        if key[:16] != key[16:]:  # XTS forbids equal halves; never happens in practice, but be total
            return key
        n += 1


def p384_private_key(seed: int, label: str) -> ec.EllipticCurvePrivateKey:
    """A deterministic ECDSA/ECDH P-384 private key: an HKDF output reduced into [1, n - 1]."""
    # 64 bytes (512 bits) reduced mod n-1 leaves a bias below 2**-128: irrelevant for an emulation.
    scalar = int.from_bytes(derive(seed, label, 64), "big") % (P384_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP384R1())
