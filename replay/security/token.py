"""The end-of-migration validation token (SPEC section 5).

Both agents keep a ``TokenHasher``: for every sealed packet (private pages, zero or not, and VMSAs) it
counts the packet and feeds its header and GCM tag into a running SHA-384 of the packet's stream. The tag
authenticates the payload, so hashing header + tag binds the whole packet at a fraction of the cost of
hashing 4 KiB. Hashes are kept per stream because packets of different streams may arrive interleaved
differently from how they were sent; within a stream the order is fixed by the sequence numbers.

At the end the source seals its ``Token`` and sends it; the target compares it with its own
(``compare``): the target resumes only on ``MATCH``. A packet that was sent but never arrived, or
arrived but was never sent, makes the counts or the hash differ.

Shared pages are not in the token: the host moves them, the agents never see them (as in reality), so
tampering with a shared page is not detected.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

_TOKEN = struct.Struct("<QQ48s")  # pages, vmsas, digest


@dataclass(frozen=True)
class Token:
    """Page packets and VMSAs that went through the sealed channel, and the hash over all of them."""

    pages: int
    vmsas: int
    digest: bytes  # 48-byte SHA-384

    def to_bytes(self) -> bytes:
        return _TOKEN.pack(self.pages, self.vmsas, self.digest)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Token":
        pages, vmsas, digest = _TOKEN.unpack(data)
        return cls(pages, vmsas, digest)

    def to_json(self) -> dict:
        return {"pages": self.pages, "vmsas": self.vmsas, "digest": self.digest.hex()}


class TokenOutcome(enum.Enum):
    """The target's verdict on the source's token."""

    MATCH = "match"  # the target may resume
    COUNT_MISMATCH = "count_mismatch"  # a different number of pages or VMSAs
    HASH_MISMATCH = "hash_mismatch"  # same counts, different packets
    TOKEN_REJECTED = "token_rejected"  # the token's own packet failed its checks (tag, sequence)


class TokenHasher:
    """Running per-stream count and SHA-384 over the sealed packets one side sent or accepted."""

    def __init__(self) -> None:
        self._streams: dict[int, tuple[int, "hashlib._Hash"]] = {}
        self.pages = 0
        self.vmsas = 0

    def absorb(self, stream: int, header: bytes, tag: bytes, *, vmsa: bool) -> None:
        """One sealed packet of ``stream`` (its header and GCM tag)."""
        self.absorb_many(stream, [header + tag], vmsas=int(vmsa))

    def absorb_many(self, stream: int, records: list[bytes], *, vmsas: int = 0) -> None:
        """Several sealed packets of ``stream`` in order, each given as header + tag (one hash update:
        the same as absorbing them one by one, since the records have a fixed size)."""
        self.absorb_block(stream, b"".join(records), len(records), vmsas=vmsas)

    def absorb_block(self, stream: int, block: bytes, count: int, *, vmsas: int = 0) -> None:
        """``count`` sealed packets of ``stream`` whose records (header + tag) are ``block``, back to back."""
        if not count:
            return
        n, h = self._streams.get(stream) or (0, hashlib.sha384())
        h.update(block)
        self._streams[stream] = (n + count, h)
        self.vmsas += vmsas
        self.pages += count - vmsas

    def checkpoint(self):
        """The hasher's state, for ``restore``."""
        return {k: (n, h.copy()) for k, (n, h) in self._streams.items()}, self.pages, self.vmsas

    def restore(self, state) -> None:
        streams, self.pages, self.vmsas = state
        self._streams = {k: (n, h.copy()) for k, (n, h) in streams.items()}

    def token(self) -> Token:
        """The token so far: SHA-384 over (stream, count, stream hash) for each stream in stream order."""
        top = hashlib.sha384(b"snp-replay token v1")
        for stream in sorted(self._streams):
            count, h = self._streams[stream]
            top.update(struct.pack("<HQ", stream, count) + h.copy().digest())
        return Token(self.pages, self.vmsas, top.digest())


def compare(source: Token, target: Token) -> TokenOutcome:
    """Compare the source's token with the target's own."""
    if (source.pages, source.vmsas) != (target.pages, target.vmsas):
        return TokenOutcome.COUNT_MISMATCH
    if source.digest != target.digest:
        return TokenOutcome.HASH_MISMATCH
    return TokenOutcome.MATCH
