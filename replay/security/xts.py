"""AES-128-XTS of whole 4 KiB pages with the page's system physical address as tweak.

SNP encrypts guest memory in the memory controller with AES-128 and an address-based tweak. We model it
as IEEE 1619 XTS with one data unit per 4 KiB page: the 32-byte key is two AES-128 keys (the VM's key on
that host), and the 16-byte tweak is the page's system physical byte address ``spa_page * 4096`` in
little-endian. The same plaintext at another SPA, or under another host's key, is therefore different
ciphertext.

``encrypt_pages`` / ``decrypt_pages`` work on many pages per call in C (``replay.security._xts``: one OpenSSL EVP
context, only the tweak reset per page, GIL released). ``reference_pages`` does the same with the
``cryptography`` package, one cipher context per page: slower, and the tests check both agree.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..model.snp import PAGE_SHIFT, PAGE_SIZE

try:
    from replay.security._xts import xts_pages
except ImportError:  # built without OpenSSL's headers: the `cryptography` package, page by page
    xts_pages = None


def tweaks(spa_pages: np.ndarray) -> np.ndarray:
    """The XTS tweak (as a 64-bit integer) of each system physical page: its byte address."""
    return np.ascontiguousarray(spa_pages, dtype=np.uint64) << np.uint64(PAGE_SHIFT)


def _pages(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8 or a.ndim != 2 or a.shape[1] != PAGE_SIZE:
        raise ValueError(f"pages must be an (n, {PAGE_SIZE}) uint8 array, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def encrypt_pages(key: bytes, pages: np.ndarray, spa_pages: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Ciphertext of each page of ``pages`` at system physical page ``spa_pages[i]`` (``out`` may be ``pages``)."""
    return _xts(key, pages, spa_pages, out, True)


def decrypt_pages(key: bytes, pages: np.ndarray, spa_pages: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Plaintext of each ciphertext page at system physical page ``spa_pages[i]`` (``out`` may be ``pages``)."""
    return _xts(key, pages, spa_pages, out, False)


def _xts(key: bytes, pages: np.ndarray, spa_pages: np.ndarray, out: np.ndarray | None, encrypt: bool) -> np.ndarray:
    src = _pages(pages)
    dst = np.empty_like(src) if out is None else out
    if xts_pages is None:
        dst[...] = reference_pages(key, src, spa_pages, encrypt)
    else:
        xts_pages(key, src, tweaks(spa_pages), dst, encrypt)
    return dst


def reference_pages(key: bytes, pages: np.ndarray, spa_pages: np.ndarray, encrypt: bool) -> np.ndarray:
    """The same transform through ``cryptography`` (one context per page): the tests' reference."""
    src = _pages(pages)
    out = np.empty_like(src)
    aes = algorithms.AES(key)
    for i, t in enumerate(tweaks(spa_pages).tolist()):
        c = Cipher(aes, modes.XTS(t.to_bytes(16, "little")))
        ctx = c.encryptor() if encrypt else c.decryptor()
        out[i] = np.frombuffer(ctx.update(src[i].tobytes()) + ctx.finalize(), np.uint8)
    return out
