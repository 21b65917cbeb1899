"""Packets of the migration channel (SPEC section 5): what the agents send and how the target checks it.

A packet is a fixed 32-byte header followed by a payload::

    gfn u64 | sequence u64 | version u64 | stream u16 | flags u16 | payload_len u32     (little-endian)

``flags`` (``Flag``) say what the payload is. ``version`` is the page's write version when it was taken
(the page engine's version), so the target can refuse an older copy of a page than one it holds.

- **Private page** (``PRIVATE``): the source agent decrypts it (its host's XTS key and SPA), compresses
  it with zstd if the channel has a level and that makes it smaller (``COMPRESSED``), and seals it with
  AES-256-GCM under the key of its direction and stream, the header as associated data. The nonce is the
  stream and the sequence number (``nonce``), and a stream's sequence only grows, so a nonce is never
  used twice with one key. A private page that is all zeros (``ZERO``) has an empty sealed payload: just
  the 16-byte tag, which still authenticates the header.
- **VMSA** (``VMSA``): sealed like a private page; ``gfn`` holds ``vcpu * 4 + vmpl``.
- **Shared page** (``SHARED``): sent by the host in plain text with no tag, as in reality; a shared zero
  page is the header alone. Nothing protects it: tampering goes unnoticed.
- **Token** (``TOKEN``): the end-of-migration token (``replay.security.token``), sealed.

The ``Receiver`` checks, in order: the header parses (``MALFORMED``), the tag (``BAD_TAG``), the sequence
is the next one of its stream (``BAD_SEQUENCE``), the page's version is not older than the one it holds
(``STALE_VERSION``), the payload decodes to a page (``BAD_PAYLOAD``); then it installs the page into the
target's memory, encrypted under the target's key and SPA. A rejected packet changes nothing, except a
stale one: it is authentic and in sequence (a page overtaken by a newer copy on another stream), so its
sequence number is consumed and it counts in the token, but its contents are dropped.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

import numpy as np
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..snp import PAGE_SIZE, VMPLS
from .attestation import Direction, SessionKeys
from .memory import HostMemory
from .token import Token, TokenHasher, TokenOutcome, compare

HEADER = struct.Struct("<QQQHHI")
HEADER_BYTES = HEADER.size
TAG_BYTES = 16
MAX_SEQUENCE = (1 << 64) - 1


class Flag(enum.IntFlag):
    PRIVATE = 1
    SHARED = 2
    ZERO = 4
    COMPRESSED = 8
    VMSA = 16
    TOKEN = 32


_KIND = Flag.PRIVATE | Flag.SHARED | Flag.VMSA | Flag.TOKEN
_SEALED = Flag.PRIVATE | Flag.VMSA | Flag.TOKEN


class Outcome(enum.Enum):
    """What the receiver did with a packet."""

    ACCEPTED = "accepted"
    MALFORMED = "malformed"  # short packet, bad length or impossible flags
    BAD_TAG = "bad_tag"  # GCM authentication failed: tampered or forged
    BAD_SEQUENCE = "bad_sequence"  # not the next sequence number of its stream: dropped, replayed or reordered
    STALE_VERSION = "stale_version"  # an older copy of a page than the target holds (dropped, in sequence)
    BAD_PAYLOAD = "bad_payload"  # authentic, but does not decode to a page (a sender bug)


@dataclass(frozen=True)
class Header:
    gfn: int
    sequence: int
    version: int
    stream: int
    flags: Flag
    payload_len: int

    def pack(self) -> bytes:
        return HEADER.pack(self.gfn, self.sequence, self.version, self.stream, self.flags, self.payload_len)


def parse_header(packet: bytes) -> Header | None:
    """The header of ``packet``, or None if the packet cannot be one (length, flags)."""
    if len(packet) < HEADER_BYTES:
        return None
    gfn, seq, version, stream, flags, plen = HEADER.unpack_from(packet)
    if plen != len(packet) - HEADER_BYTES or flags & ~int(Flag.PRIVATE | Flag.SHARED | Flag.ZERO | Flag.COMPRESSED | Flag.VMSA | Flag.TOKEN):
        return None
    f = Flag(flags)
    if bin(int(f & _KIND)).count("1") != 1:
        return None
    if f & _SEALED and plen < TAG_BYTES:
        return None
    return Header(gfn, seq, version, stream, f, plen)


def nonce(stream: int, sequence: int) -> bytes:
    """The 96-bit GCM nonce of a packet: stream (32 bits) then sequence (64 bits), big-endian."""
    return struct.pack(">IQ", stream, sequence)


def vmsa_id(vcpu: int, vmpl: int) -> int:
    """The ``gfn`` field of a VMSA packet."""
    if not 0 <= vmpl < VMPLS:
        raise ValueError(f"vmpl must be in 0..{VMPLS - 1}")
    return vcpu * VMPLS + vmpl


@dataclass
class ChannelStats:
    """Counters one side of the channel keeps (integers only: they go into run records)."""

    private_pages: int = 0
    shared_pages: int = 0
    zero_pages: int = 0
    vmsas: int = 0
    compressed_pages: int = 0
    payload_bytes: int = 0  # page and VMSA bytes before compression (zero pages: 0)
    compressed_bytes: int = 0  # the same after compression (uncompressed payloads counted as is)
    wire_bytes: int = 0  # headers + payloads + tags
    outcomes: dict[str, int] = field(default_factory=dict)
    sequences: dict[int, int] = field(default_factory=dict)  # per stream: next sequence number

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("outcomes", "sequences")}
        d["outcomes"] = dict(sorted(self.outcomes.items()))
        d["sequences"] = {str(k): v for k, v in sorted(self.sequences.items())}
        return d


class _Keys:
    """AES-GCM contexts per stream for one direction (made on first use)."""

    def __init__(self, keys: SessionKeys, direction: Direction):
        self._keys, self._direction, self._aead = keys, direction, {}

    def __call__(self, stream: int) -> AESGCM:
        a = self._aead.get(stream)
        if a is None:
            a = self._aead[stream] = AESGCM(self._keys.key(self._direction, stream))
        return a


class Sender:
    """The source side: packages pages of ``memory`` (the source host's) into packets.

    ``compress_level``: zstd level, or None for no compression. The sender owns the sequence numbers of
    its streams and the token of what it sealed."""

    def __init__(self, keys: SessionKeys, memory: HostMemory, *, compress_level: int | None = None,
                 direction: Direction = Direction.SOURCE_TO_TARGET):
        self.memory = memory
        self._aead = _Keys(keys, direction)
        self._zstd = zstandard.ZstdCompressor(level=compress_level) if compress_level is not None else None
        self.stats = ChannelStats()
        self.token_hasher = TokenHasher()

    def _next(self, stream: int) -> int:
        if not 0 <= stream < 1 << 16:
            raise ValueError(f"stream must be in 0..65535, got {stream}")
        seq = self.stats.sequences.get(stream, 0)
        if seq == MAX_SEQUENCE:  # the next nonce would repeat: refuse rather than reuse
            raise OverflowError(f"stream {stream}: sequence numbers exhausted")
        self.stats.sequences[stream] = seq + 1
        return seq

    def _body(self, data: bytes) -> tuple[bytes, Flag]:
        st = self.stats
        st.payload_bytes += len(data)
        if self._zstd is not None:
            c = self._zstd.compress(data)
            if len(c) < len(data):
                st.compressed_pages += 1
                st.compressed_bytes += len(c)
                return c, Flag.COMPRESSED
        st.compressed_bytes += len(data)
        return data, Flag(0)

    def _seal(self, gfn: int, version: int, stream: int, flags: Flag, body: bytes) -> bytes:
        seq = self._next(stream)
        header = HEADER.pack(gfn, seq, version, stream, flags, len(body) + TAG_BYTES)
        sealed = self._aead(stream).encrypt(nonce(stream, seq), body, header)
        self.token_hasher.absorb(stream, header, sealed[-TAG_BYTES:], vmsa=bool(flags & Flag.VMSA))
        self.stats.wire_bytes += HEADER_BYTES + len(sealed)
        return header + sealed

    def _plain(self, gfn: int, version: int, stream: int, flags: Flag, body: bytes) -> bytes:
        seq = self._next(stream)
        header = HEADER.pack(gfn, seq, version, stream, flags, len(body))
        self.stats.wire_bytes += HEADER_BYTES + len(body)
        return header + body

    def send_pages(self, gfns, versions, stream: int) -> list[bytes]:
        """Packets for the pages ``gfns`` (their contents now, tagged with ``versions``) on ``stream``,
        in order. The source memory is decrypted in one batch."""
        g = np.asarray(gfns, dtype=np.int64)
        v = np.broadcast_to(np.asarray(versions, dtype=np.uint64), g.shape)
        plain = self.memory.read_plain_many(g)
        private = self.memory.private_mask(g)
        nonzero = plain.any(axis=1)
        st = self.stats
        out = []
        for i, (gfn, ver, priv, nz) in enumerate(zip(g.tolist(), v.tolist(), private.tolist(), nonzero.tolist())):
            if priv:
                st.private_pages += 1
                if nz:
                    body, extra = self._body(plain[i].tobytes())
                    out.append(self._seal(gfn, ver, stream, Flag.PRIVATE | extra, body))
                else:
                    st.zero_pages += 1
                    out.append(self._seal(gfn, ver, stream, Flag.PRIVATE | Flag.ZERO, b""))
            else:
                st.shared_pages += 1
                if nz:
                    body, extra = self._body(plain[i].tobytes())
                    out.append(self._plain(gfn, ver, stream, Flag.SHARED | extra, body))
                else:
                    st.zero_pages += 1
                    out.append(self._plain(gfn, ver, stream, Flag.SHARED | Flag.ZERO, b""))
        return out

    def send_page(self, gfn: int, version: int, stream: int) -> bytes:
        return self.send_pages([gfn], [version], stream)[0]

    def send_vmsa(self, vcpu: int, vmpl: int, vmsa: bytes, stream: int) -> bytes:
        """A sealed VMSA (the vCPU's register state at ``vmpl``)."""
        if len(vmsa) != PAGE_SIZE:
            raise ValueError(f"a VMSA is one {PAGE_SIZE}-byte page, got {len(vmsa)}")
        self.stats.vmsas += 1
        body, extra = self._body(vmsa)
        return self._seal(vmsa_id(vcpu, vmpl), 0, stream, Flag.VMSA | extra, body)

    def token(self) -> Token:
        return self.token_hasher.token()

    def send_token(self, stream: int) -> bytes:
        """The sealed end-of-migration token (itself not counted in the token)."""
        seq = self._next(stream)
        body = self.token().to_bytes()
        header = HEADER.pack(0, seq, 0, stream, Flag.TOKEN, len(body) + TAG_BYTES)
        self.stats.wire_bytes += HEADER_BYTES + len(body) + TAG_BYTES
        return header + self._aead(stream).encrypt(nonce(stream, seq), body, header)


class Receiver:
    """The target side: checks packets and installs pages into ``memory`` (the target host's)."""

    def __init__(self, keys: SessionKeys, memory: HostMemory, *, direction: Direction = Direction.SOURCE_TO_TARGET):
        self.memory = memory
        self._aead = _Keys(keys, direction)
        self._unzstd = zstandard.ZstdDecompressor()
        self.stats = ChannelStats()
        self.token_hasher = TokenHasher()
        self._held = np.full(memory.npages, -1, dtype=np.int64)  # version held per gfn, -1: none
        self.vmsas: dict[tuple[int, int], bytes] = {}

    def held_version(self, gfn: int) -> int | None:
        v = int(self._held[gfn])
        return None if v < 0 else v

    def _count(self, o: Outcome) -> Outcome:
        self.stats.outcomes[o.value] = self.stats.outcomes.get(o.value, 0) + 1
        return o

    def _open(self, packet: bytes) -> tuple[Outcome, Header | None, bytes]:
        """Parse, authenticate and sequence-check ``packet``; on success consume its sequence number."""
        h = parse_header(packet)
        if h is None:
            return Outcome.MALFORMED, None, b""
        header, body = packet[:HEADER_BYTES], packet[HEADER_BYTES:]
        if h.flags & _SEALED:
            try:
                body = self._aead(h.stream).decrypt(nonce(h.stream, h.sequence), body, header)
            except InvalidTag:
                return Outcome.BAD_TAG, h, b""
        if h.sequence != self.stats.sequences.get(h.stream, 0):
            return Outcome.BAD_SEQUENCE, h, b""
        self.stats.sequences[h.stream] = h.sequence + 1
        if h.flags & (Flag.PRIVATE | Flag.VMSA):
            self.token_hasher.absorb(h.stream, header, packet[-TAG_BYTES:], vmsa=bool(h.flags & Flag.VMSA))
        self.stats.wire_bytes += len(packet)
        return Outcome.ACCEPTED, h, body

    def _page(self, h: Header, body: bytes) -> bytes | None:
        if h.flags & Flag.ZERO:
            return bytes(PAGE_SIZE) if not body else None
        if h.flags & Flag.COMPRESSED:
            try:
                body = self._unzstd.decompress(body, max_output_size=PAGE_SIZE)
            except zstandard.ZstdError:
                return None
        return body if len(body) == PAGE_SIZE else None

    def receive_many(self, packets) -> list[Outcome]:
        """Check and apply ``packets`` in order; the accepted pages are installed in one batch."""
        outcomes, pending = [], {}
        for p in packets:
            o, h, body = self._open(p)
            if o is Outcome.ACCEPTED:
                if h.flags & Flag.TOKEN:
                    o = Outcome.MALFORMED  # a token belongs to check_token, not to the page stream
                else:
                    page = self._page(h, body)
                    if page is None:
                        o = Outcome.BAD_PAYLOAD
                    elif h.flags & Flag.VMSA:
                        self.vmsas[divmod(h.gfn, VMPLS)] = page
                        self.stats.vmsas += 1
                        self._count_payload(h, body)
                    elif h.gfn >= self.memory.npages:
                        o = Outcome.MALFORMED
                    elif h.version < self._held[h.gfn]:
                        o = Outcome.STALE_VERSION
                    else:
                        self._held[h.gfn] = h.version
                        pending[h.gfn] = (page, bool(h.flags & Flag.PRIVATE))
                        self._count_page(h, body)
            outcomes.append(self._count(o))
        if pending:
            gfns = np.fromiter(pending, dtype=np.int64, count=len(pending))
            pages = np.frombuffer(b"".join(p for p, _ in pending.values()), np.uint8).reshape(-1, PAGE_SIZE)
            self.memory.install_plain(gfns, pages, np.fromiter((pr for _, pr in pending.values()), bool, len(pending)))
        return outcomes

    def _count_page(self, h: Header, body: bytes) -> None:
        st = self.stats
        if h.flags & Flag.PRIVATE:
            st.private_pages += 1
        else:
            st.shared_pages += 1
        if h.flags & Flag.ZERO:
            st.zero_pages += 1
        else:
            self._count_payload(h, body)

    def _count_payload(self, h: Header, body: bytes) -> None:
        """Payload bytes as the sender counts them: a page before and after compression."""
        st = self.stats
        st.payload_bytes += PAGE_SIZE
        st.compressed_bytes += len(body)
        st.compressed_pages += bool(h.flags & Flag.COMPRESSED)

    def receive(self, packet: bytes) -> Outcome:
        return self.receive_many([packet])[0]

    def token(self) -> Token:
        return self.token_hasher.token()

    def check_token(self, packet: bytes) -> TokenOutcome:
        """Open the source's sealed token and compare it with this side's own."""
        o, h, body = self._open(packet)
        if o is not Outcome.ACCEPTED or not h.flags & Flag.TOKEN or len(body) != len(Token(0, 0, bytes(48)).to_bytes()):
            self._count(o if o is not Outcome.ACCEPTED else Outcome.MALFORMED)
            return TokenOutcome.TOKEN_REJECTED
        self._count(o)
        return compare(Token.from_bytes(body), self.token())
