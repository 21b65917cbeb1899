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

import dataclasses
import enum
import struct
import weakref
from dataclasses import dataclass, field

import numpy as np
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..model.snp import PAGE_SIZE, VMPLS
from . import parallel
from .attestation import Direction, SessionKeys
from .gcm import TAG_BYTES, open_many, seal_many
from .memory import HostMemory, all_distinct, nonzero_pages
from .token import Token, TokenHasher, TokenOutcome, compare

HEADER = struct.Struct("<QQQHHI")
HEADER_BYTES = HEADER.size
# The same header as a numpy record (a batch of headers packed or parsed at once), and the GCM nonce.
HEADER_DTYPE = np.dtype([("gfn", "<u8"), ("sequence", "<u8"), ("version", "<u8"), ("stream", "<u2"),
                         ("flags", "<u2"), ("payload_len", "<u4")])
NONCE_DTYPE = np.dtype([("stream", ">u4"), ("sequence", ">u8")])
MAX_SEQUENCE = (1 << 64) - 1


class Flag(enum.IntFlag):
    """What a packet carries: exactly one of PRIVATE, SHARED, VMSA, TOKEN, plus ZERO / COMPRESSED."""

    PRIVATE = 1
    SHARED = 2
    ZERO = 4
    COMPRESSED = 8
    VMSA = 16
    TOKEN = 32


# Plain-int copies of the flags for the per-packet paths (enum.IntFlag arithmetic costs ~0.5 us an operation).
_PRIVATE, _SHARED, _ZERO, _COMPRESSED, _VMSA, _TOKEN = (int(f) for f in (Flag.PRIVATE, Flag.SHARED, Flag.ZERO,
                                                                        Flag.COMPRESSED, Flag.VMSA, Flag.TOKEN))
_ALL = _PRIVATE | _SHARED | _ZERO | _COMPRESSED | _VMSA | _TOKEN
#: The kinds sealed with AES-GCM (private pages, VMSAs, the token); shared pages travel plain. Public: the
#: adversary (replay.migration.adversary) picks the packets it tampers with by it.
SEALED = _PRIVATE | _VMSA | _TOKEN
# Kind bits (exactly one must be set) -> valid.
_ONE_KIND = {_PRIVATE, _SHARED, _VMSA, _TOKEN}


class Outcome(enum.Enum):
    """What the receiver did with a packet."""

    ACCEPTED = "accepted"
    MALFORMED = "malformed"  # short packet, bad length, impossible flags, a gfn or version (>= 2^63) out of range
    BAD_TAG = "bad_tag"  # GCM authentication failed: tampered or forged
    BAD_SEQUENCE = "bad_sequence"  # not the next sequence number of its stream: dropped, replayed or reordered
    STALE_VERSION = "stale_version"  # an older copy of a page than the target holds (dropped, in sequence)
    BAD_PAYLOAD = "bad_payload"  # authentic, but does not decode to a page (a sender bug)


@dataclass(frozen=True)
class Header:
    """A packet header, decoded (``pack`` gives the 32 wire bytes)."""

    gfn: int
    sequence: int
    version: int
    stream: int
    flags: Flag
    payload_len: int

    def pack(self) -> bytes:
        return HEADER.pack(self.gfn, self.sequence, self.version, self.stream, self.flags, self.payload_len)


def _parse(packet: bytes) -> tuple[int, int, int, int, int, int] | None:
    """The header fields of ``packet`` as ints, or None if the packet cannot be one (length, flags)."""
    if len(packet) < HEADER_BYTES:
        return None
    fields = HEADER.unpack_from(packet)
    flags, plen = fields[4], fields[5]
    if plen != len(packet) - HEADER_BYTES or flags & ~_ALL or flags & (_PRIVATE | _SHARED | _VMSA | _TOKEN) not in _ONE_KIND:
        return None
    if flags & SEALED and plen < TAG_BYTES:
        return None
    if flags & _ZERO and (plen != (TAG_BYTES if flags & SEALED else 0) or not flags & (_PRIVATE | _SHARED)):
        return None
    return fields


def parse_header(packet: bytes) -> Header | None:
    """The header of ``packet``, or None if the packet cannot be one (length, flags)."""
    f = _parse(packet)
    return None if f is None else Header(f[0], f[1], f[2], f[3], Flag(f[4]), f[5])


def nonce(stream: int, sequence: int) -> bytes:
    """The 96-bit GCM nonce of a packet: stream (32 bits) then sequence (64 bits), big-endian."""
    return struct.pack(">IQ", stream, sequence)


def nonces(stream: int, sequences: np.ndarray) -> np.ndarray:
    """``nonce(stream, s)`` for each of ``sequences``, as an ``(n, 12)`` uint8 array."""
    out = np.empty(len(sequences), NONCE_DTYPE)
    out["stream"] = stream
    out["sequence"] = sequences
    return out.view(np.uint8).reshape(-1, 12)


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
    outcomes: dict[Outcome, int] = field(default_factory=dict)  # receiver: packets per outcome
    sequences: dict[int, int] = field(default_factory=dict)  # per stream: next sequence number

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("outcomes", "sequences")}
        d["outcomes"] = {o.value: n for o, n in sorted(self.outcomes.items(), key=lambda kv: kv[0].value)}
        d["sequences"] = {str(k): v for k, v in sorted(self.sequences.items())}
        return d


@dataclass(frozen=True, eq=False)
class Wire:
    """A batch of packets back to back in one buffer, as they cross a link: packet ``i`` is
    ``buffer[offsets[i] : offsets[i] + lengths[i]]``. ``Sender.seal_pages`` writes one into a buffer it
    reuses once the previous batch is gone; ``packets`` gives them as bytes (what an adversary rewrites)."""

    buffer: np.ndarray  # uint8
    offsets: np.ndarray  # int64
    lengths: np.ndarray  # int64

    @classmethod
    def of(cls, packets: list[bytes]) -> "Wire":
        lengths = np.fromiter(map(len, packets), np.int64, len(packets))
        offsets = np.cumsum(lengths) - lengths
        return cls(np.frombuffer(b"".join(packets), np.uint8), offsets, lengths)

    def __len__(self) -> int:
        return self.offsets.size

    def packets(self) -> list[bytes]:
        b = self.buffer
        return [b[o : o + n].tobytes() for o, n in zip(self.offsets.tolist(), self.lengths.tolist())]


@dataclass(frozen=True)
class PageRefs:
    """Where the plain text of each page of a batch lies, to be sealed in place: page ``i`` is row
    ``row[i]`` of ``sources[which[i]]`` (C-contiguous ``(m, 4096)`` uint8 arrays: a host's memory, a buffer
    of pages captured earlier), or a zero page if ``row[i] < 0``; ``private[i]`` is its attribute."""

    sources: tuple
    which: np.ndarray  # int8
    row: np.ndarray  # int64
    private: np.ndarray  # bool

    @classmethod
    def of(cls, plain: np.ndarray, private) -> "PageRefs":
        """The pages of ``plain``, in order."""
        n = plain.shape[0]
        return cls((plain,), np.zeros(n, np.int8), np.arange(n, dtype=np.int64), np.asarray(private, dtype=bool))

    def __len__(self) -> int:
        return self.row.size

    def part(self, a: int, b: int) -> "PageRefs":
        return PageRefs(self.sources, self.which[a:b], self.row[a:b], self.private[a:b])

    def page(self, i: int) -> np.ndarray:
        return self.sources[self.which[i]][self.row[i]]

    def nonzero(self) -> np.ndarray:
        nz = np.zeros(self.row.size, dtype=bool)
        for k, src in enumerate(self.sources):
            sel = np.flatnonzero((self.which == k) & (self.row >= 0))
            if sel.size:
                nz[sel] = nonzero_pages(src, self.row[sel])
        return nz


class _Keys:
    """AES-GCM contexts per stream for one direction (made on first use)."""

    def __init__(self, keys: SessionKeys, direction: Direction):
        self._keys, self._direction, self._aead, self._raw = keys, direction, {}, {}

    def __call__(self, stream: int) -> AESGCM:
        a = self._aead.get(stream)
        if a is None:
            a = self._aead[stream] = AESGCM(self.key(stream))
        return a

    def key(self, stream: int) -> bytes:
        k = self._raw.get(stream)
        if k is None:
            k = self._raw[stream] = self._keys.key(self._direction, stream)
        return k


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
        self._work = np.empty((0, PAGE_SIZE), np.uint8)  # the pages of a batch, reused from batch to batch
        self._wire = np.empty(0, np.uint8)  # the packets of a batch, reused once the last batch is gone
        self._last = lambda: None  # (a weak reference to) the last batch handed out

    @staticmethod
    def _check_stream(stream: int) -> None:
        if not 0 <= stream < 1 << 16:
            raise ValueError(f"stream must be in 0..65535, got {stream}")

    def _next(self, stream: int) -> int:
        self._check_stream(stream)
        seq = self.stats.sequences.get(stream, 0)
        if seq == MAX_SEQUENCE:  # the next nonce would repeat: refuse rather than reuse
            raise OverflowError(f"stream {stream}: sequence numbers exhausted")
        self.stats.sequences[stream] = seq + 1
        return seq

    def _compress_all(self, datas: list[bytes]) -> list[bytes | None]:
        """zstd frames of ``datas`` in one call (in C; a big batch on two threads: each page is its own frame,
        the same bytes either way), or Nones without compression."""
        if self._zstd is None or not datas:
            return [None] * len(datas)
        threads = parallel.THREADS if parallel.THREADS > 1 and len(datas) >= parallel.SPLIT_MIN else 0  # 0: this one
        return [seg.tobytes() for seg in self._zstd.multi_compress_to_buffer(datas, threads=threads)]

    def _body(self, data: bytes) -> tuple[bytes, int]:
        st = self.stats
        st.payload_bytes += len(data)
        if self._zstd is not None:
            c = self._zstd.compress(data)
            if len(c) < len(data):
                st.compressed_pages += 1
                st.compressed_bytes += len(c)
                return c, _COMPRESSED
        st.compressed_bytes += len(data)
        return data, 0

    def _seal(self, gfn: int, version: int, stream: int, flags: int, body: bytes) -> bytes:
        """One sealed packet; its header + tag go into the token unless it is the token itself."""
        seq = self._next(stream)
        header = HEADER.pack(gfn, seq, version, stream, flags, len(body) + TAG_BYTES)
        sealed = self._aead(stream).encrypt(nonce(stream, seq), body, header)
        if not flags & _TOKEN:
            self.token_hasher.absorb(stream, header, sealed[-TAG_BYTES:], vmsa=bool(flags & _VMSA))
        self.stats.wire_bytes += HEADER_BYTES + len(sealed)
        return header + sealed

    def capture(self, gfns, out=None) -> tuple[np.ndarray, np.ndarray]:
        """The contents (into ``out`` if given) and attributes of ``gfns`` now, for a later
        ``send_pages(..., contents=...)``."""
        g = np.atleast_1d(np.asarray(gfns, dtype=np.int64))
        return self.memory.read_plain_many(g, out=out), self.memory.private_mask(g)

    def checkpoint(self):
        """Everything sending changes (counters, sequences, token), to ``restore`` after a batch the
        receiver could not take whole."""
        st = self.stats
        return (dataclasses.replace(st, outcomes=dict(st.outcomes), sequences=dict(st.sequences)),
                self.token_hasher.checkpoint())

    def restore(self, state) -> None:
        stats, token = state
        self.stats = dataclasses.replace(stats, outcomes=dict(stats.outcomes), sequences=dict(stats.sequences))
        self.token_hasher.restore(token)

    def send_pages(self, gfns, versions, stream: int, contents=None) -> list[bytes]:
        """``seal_pages``, as a list of packets (bytes)."""
        return self.seal_pages(gfns, versions, stream, contents).packets()

    def _wire_buffer(self, size: int) -> np.ndarray:
        """A buffer of at least ``size`` bytes for the next batch: the last one again unless its batch is
        still held somewhere (fresh memory costs page faults on every batch)."""
        if self._last() is not None or self._wire.size < size:  # in use (a buffer of its own), or too small
            size = size if self._last() is not None else max(size, 2 * self._wire.size)
            self._wire = np.empty(size, np.uint8)
        return self._wire

    def seal_pages(self, gfns, versions, stream: int, contents=None) -> Wire:
        """Packets for the pages ``gfns`` (their contents now; or ``contents``: (plain pages, private flags)
        taken earlier by ``capture``, or a ``PageRefs`` to them) tagged with ``versions``, on ``stream``, in
        order, on one ``Wire``. The whole batch is handled at once: the source memory read (decrypted) in
        one call, headers and nonces packed as arrays, the packets written in one call (``gcm.seal_many``,
        the private pages sealed) straight from where the plain text lies."""
        self._check_stream(stream)  # before anything is counted
        g = np.atleast_1d(np.asarray(gfns, dtype=np.int64))
        v = np.broadcast_to(np.asarray(versions, dtype=np.uint64), g.shape)
        n = g.size
        if n == 0:
            return Wire(np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64))
        st = self.stats
        seq0 = st.sequences.get(stream, 0)
        if seq0 + n > MAX_SEQUENCE:  # a nonce would repeat: refuse rather than reuse
            raise OverflowError(f"stream {stream}: sequence numbers exhausted")
        if contents is not None:
            refs = contents if isinstance(contents, PageRefs) else PageRefs.of(*contents)
            if len(refs) != n:
                raise ValueError(f"send_pages: {n} gfns but contents for {len(refs)} pages")
            self.memory.check_gfns(g)  # the gfns must be in the guest all the same
        else:
            if self._work.shape[0] < n:
                self._work = np.empty((max(n, 2 * self._work.shape[0]), PAGE_SIZE), np.uint8)
            refs = PageRefs.of(self.memory.read_plain_many(g, out=self._work), self.memory.private_mask(g))
        private = refs.private
        nonzero = refs.nonzero()
        length = np.where(nonzero, PAGE_SIZE, 0)
        bodies, which = tuple(src.reshape(-1) for src in refs.sources), refs.which
        offset = np.maximum(refs.row, 0) * PAGE_SIZE
        compressed = np.zeros(n, dtype=bool)
        if self._zstd is not None and nonzero.any():
            nz = np.flatnonzero(nonzero)
            datas = [refs.page(i).tobytes() for i in nz.tolist()]
            parts = [c if len(c) < len(d) else d for d, c in zip(datas, self._compress_all(datas))]
            lens = np.fromiter(map(len, parts), np.int64, len(parts))
            bodies, which = (np.frombuffer(b"".join(parts), np.uint8),), np.zeros(n, np.int8)
            compressed[nz] = lens < PAGE_SIZE
            length[nz] = lens
            offset[:] = 0
            offset[nz] = np.cumsum(lens) - lens
        flags = (np.where(private, _PRIVATE, _SHARED) | np.where(nonzero, 0, _ZERO)
                 | np.where(compressed, _COMPRESSED, 0))
        hdr = np.empty(n, HEADER_DTYPE)
        hdr["gfn"], hdr["version"], hdr["stream"], hdr["flags"] = g, v, stream, flags
        hdr["sequence"] = np.arange(seq0, seq0 + n, dtype=np.uint64)
        hdr["payload_len"] = length + TAG_BYTES * private
        head = hdr.view(np.uint8).reshape(n, HEADER_BYTES)
        sizes = hdr["payload_len"].astype(np.int64) + HEADER_BYTES
        at = np.cumsum(sizes) - sizes
        st.sequences[stream] = seq0 + n
        n_private = int(np.count_nonzero(private))
        st.private_pages += n_private
        st.shared_pages += n - n_private
        st.zero_pages += n - int(np.count_nonzero(nonzero))
        st.payload_bytes += PAGE_SIZE * int(np.count_nonzero(nonzero))
        st.compressed_pages += int(np.count_nonzero(compressed))
        st.compressed_bytes += int(length.sum())
        st.wire_bytes += int(sizes.sum())
        buf = self._wire_buffer(int(sizes.sum()))
        records = seal_many(self._aead.key(stream), nonces(stream, hdr["sequence"]), head, bodies, which, offset, length,
                            private, buf, at)
        self.token_hasher.absorb_block(stream, (records if n_private == n else records[private]).tobytes(), n_private)
        wire = Wire(buf, at, sizes)
        self._last = weakref.ref(wire)
        return wire

    def send_page(self, gfn: int, version: int, stream: int) -> bytes:
        return self.send_pages([gfn], [version], stream)[0]

    def send_vmsa(self, vcpu: int, vmpl: int, vmsa: bytes, stream: int) -> bytes:
        """A sealed VMSA (the vCPU's register state at ``vmpl``)."""
        if len(vmsa) != PAGE_SIZE:
            raise ValueError(f"a VMSA is one {PAGE_SIZE}-byte page, got {len(vmsa)}")
        self._check_stream(stream)
        vid = vmsa_id(vcpu, vmpl)
        self.stats.vmsas += 1
        body, extra = self._body(vmsa)
        return self._seal(vid, 0, stream, _VMSA | extra, body)

    def token(self) -> Token:
        return self.token_hasher.token()

    def send_token(self, stream: int) -> bytes:
        """The sealed end-of-migration token (itself not counted in the token)."""
        return self._seal(0, 0, stream, _TOKEN, self.token().to_bytes())


_TOKEN_BYTES = len(Token(0, 0, bytes(48)).to_bytes())


class Receiver:
    """The target side: checks packets and installs pages into ``memory`` (the target host's)."""

    def __init__(self, keys: SessionKeys, memory: HostMemory, *, direction: Direction = Direction.SOURCE_TO_TARGET):
        self.memory = memory
        self._aead = _Keys(keys, direction)
        self._unzstd = zstandard.ZstdDecompressor()
        self.stats = ChannelStats()
        self.token_hasher = TokenHasher()
        self._held = np.full(memory.npages, -1, dtype=np.int64)  # version held per gfn, -1: none
        self._opened = np.empty(0, np.uint8)  # the opened payloads of a batch
        self.vmsas: dict[tuple[int, int], bytes] = {}

    def held_version(self, gfn: int) -> int | None:
        v = int(self._held[gfn])
        return None if v < 0 else v

    def _count(self, o: Outcome) -> Outcome:
        self.stats.outcomes[o] = self.stats.outcomes.get(o, 0) + 1
        return o

    def _open(self, packet: bytes, token: dict[int, list] | None = None):
        """Parse, authenticate and sequence-check ``packet``; on success consume its sequence number and
        note its header + tag for the token (in ``token`` per stream, absorbed by the caller, or at once).
        Returns (outcome, header fields or None, payload)."""
        h = _parse(packet)
        if h is None:
            return Outcome.MALFORMED, None, b""
        stream, seq, flags = h[3], h[1], h[4]
        if flags & SEALED:
            try:  # a memoryview: the 4 KiB payload is not copied before decryption
                body = self._aead(stream).decrypt(nonce(stream, seq), memoryview(packet)[HEADER_BYTES:], packet[:HEADER_BYTES])
            except InvalidTag:
                return Outcome.BAD_TAG, h, b""
        else:
            body = packet[HEADER_BYTES:]
        seqs = self.stats.sequences
        if seq != seqs.get(stream, 0):
            return Outcome.BAD_SEQUENCE, h, b""
        seqs[stream] = seq + 1
        if flags & (_PRIVATE | _VMSA):
            if token is None:
                self.token_hasher.absorb(stream, packet[:HEADER_BYTES], packet[-TAG_BYTES:], vmsa=bool(flags & _VMSA))
            else:
                records = token.get(stream)
                if records is None:
                    records = token[stream] = [[], 0]
                records[0].append(packet[:HEADER_BYTES] + packet[-TAG_BYTES:])
                records[1] += bool(flags & _VMSA)
        self.stats.wire_bytes += len(packet)
        return Outcome.ACCEPTED, h, body

    def _page(self, flags: int, body: bytes) -> bytes | None:
        if flags & _ZERO:
            return b""  # _parse checked that the payload is empty; the page is installed as zero
        if flags & _COMPRESSED:
            try:
                body = self._unzstd.decompress(body, max_output_size=PAGE_SIZE)
            except zstandard.ZstdError:
                return None
        return body if len(body) == PAGE_SIZE else None

    def receive_many(self, packets) -> list[Outcome]:
        """Check and apply ``packets`` in order; the accepted pages are installed in one batch.

        A batch as the sender makes it (one stream, in sequence, distinct pages, every tag right) is
        checked and applied as a whole (``_receive_batch``); any other batch packet by packet, with the
        same result (``_receive_each``)."""
        if not isinstance(packets, Wire):
            packets = packets if isinstance(packets, list) else list(packets)
        outcomes = self._receive_batch(packets)
        if outcomes is not None:
            return outcomes
        return self._receive_each(packets.packets() if isinstance(packets, Wire) else packets)

    def receive_all_or_nothing(self, packets) -> bool:
        """Take ``packets`` whole if every one of them is accepted (True); otherwise change nothing (False)."""
        if not isinstance(packets, Wire):
            packets = packets if isinstance(packets, list) else list(packets)
        return self._receive_batch(packets, all_or_nothing=True) is not None

    def _receive_batch(self, packets, all_or_nothing: bool = False) -> list[Outcome] | None:
        """The whole-batch path (a ``Wire``, or a list of packets laid on one): None (and nothing changed)
        unless every packet is a page of one stream, in sequence, in the guest, distinct from the others,
        with a right tag and a payload that decodes to a page. Its outcomes are then ACCEPTED, or
        STALE_VERSION for an older copy than the target's."""
        if not isinstance(packets, Wire):
            if not all(type(p) is bytes for p in packets):
                return None
            packets = Wire.of(packets)
        n = len(packets)
        if n == 0:
            return []
        buf, at, lens = packets.buffer, packets.offsets, packets.lengths
        if lens.min() < HEADER_BYTES:
            return None
        h = buf[at[:, None] + np.arange(HEADER_BYTES)].view(HEADER_DTYPE).reshape(n)
        stream, seq0, npages = int(h["stream"][0]), self.stats.sequences.get(int(h["stream"][0]), 0), self.memory.npages
        flags = h["flags"].astype(np.int64)
        plen = h["payload_len"].astype(np.int64)
        kind = flags & (_PRIVATE | _SHARED)
        private, zero, comp = kind == _PRIVATE, (flags & _ZERO) != 0, (flags & _COMPRESSED) != 0
        body_len = plen - TAG_BYTES * private
        if ((h["stream"] != stream).any() or seq0 + n > MAX_SEQUENCE
                or (h["sequence"] != np.arange(seq0, seq0 + n, dtype=np.uint64)).any()
                or (flags & ~(_PRIVATE | _SHARED | _ZERO | _COMPRESSED)).any() or ((kind != _PRIVATE) & (kind != _SHARED)).any()
                or (plen != lens - HEADER_BYTES).any() or (body_len < 0).any() or (zero & (body_len != 0)).any()
                or (~zero & ~comp & (body_len != PAGE_SIZE)).any()
                or (h["gfn"] >= npages).any() or (h["version"] >= 1 << 63).any()
                or not all_distinct(h["gfn"])):
            return None
        sel = np.flatnonzero(private)
        sealed_off = np.cumsum(body_len[sel]) - body_len[sel]
        size = int(body_len[sel].sum())
        if self._opened.size < size:  # reused from batch to batch: fresh memory costs page faults each time
            self._opened = np.empty(max(size, 2 * self._opened.size), np.uint8)
        opened = self._opened[:size]
        ok, records = open_many(self._aead.key(stream), buf, at[sel], lens[sel], nonces(stream, h["sequence"][sel]),
                                HEADER_BYTES, opened, sealed_off)
        if not ok.all():
            return None
        data = ~zero
        if not comp.any() and private[data].all():  # the sealed bodies, back to back, are the data pages
            pages = opened.reshape(-1, PAGE_SIZE)
        else:
            where = np.zeros(n, np.int64)
            where[sel] = sealed_off
            bodies = []
            for i in np.flatnonzero(data).tolist():
                b = (opened[where[i] : where[i] + body_len[i]] if private[i]
                     else buf[at[i] + HEADER_BYTES : at[i] + lens[i]]).tobytes()
                if comp[i]:
                    b = self._page(_COMPRESSED, b)
                    if b is None:
                        return None
                bodies.append(b)
            pages = np.frombuffer(bytearray().join(bodies), np.uint8).reshape(-1, PAGE_SIZE)
        gfn, version = h["gfn"].astype(np.int64), h["version"].astype(np.int64)
        stale = version < self._held[gfn]
        if all_or_nothing and stale.any():
            return None
        acc = ~stale
        # Every packet passed the checks before the version's: its sequence number and token record count.
        st = self.stats
        st.sequences[stream] = seq0 + n
        self.token_hasher.absorb_block(stream, records.tobytes(), len(records))
        st.wire_bytes += int(lens.sum())
        n_stale = int(np.count_nonzero(stale))
        if n - n_stale:
            st.outcomes[Outcome.ACCEPTED] = st.outcomes.get(Outcome.ACCEPTED, 0) + n - n_stale
        if n_stale:
            st.outcomes[Outcome.STALE_VERSION] = st.outcomes.get(Outcome.STALE_VERSION, 0) + n_stale
        self._held[gfn[acc]] = version[acc]
        n_private = int(np.count_nonzero(acc & private))
        st.private_pages += n_private
        st.shared_pages += int(np.count_nonzero(acc)) - n_private
        st.zero_pages += int(np.count_nonzero(acc & zero))
        st.payload_bytes += PAGE_SIZE * int(np.count_nonzero(acc & data))
        st.compressed_bytes += int(body_len[acc & data].sum())
        st.compressed_pages += int(np.count_nonzero(acc & data & comp))
        z = acc & zero
        if z.any():  # never allocates memory for a zero page (a guest's untouched memory stays sparse)
            self.memory.install_zero(gfn[z], private[z])
        if (acc & data).any():
            keep = acc[data]
            self.memory.install_plain(gfn[data][keep], pages if keep.all() else pages[keep], private[data][keep])
        if not n_stale:
            return [Outcome.ACCEPTED] * n
        return [Outcome.STALE_VERSION if s else Outcome.ACCEPTED for s in stale.tolist()]

    def _receive_each(self, packets: list) -> list[Outcome]:
        """Packet by packet: any batch, in order (the reference of ``_receive_batch``)."""
        outcomes, pending, token = [], {}, {}
        held, npages, st = self._held, self.memory.npages, self.stats
        for p in packets:
            o, h, body = self._open(p, token)
            if o is Outcome.ACCEPTED:
                gfn, version, flags = h[0], h[2], h[4]
                if flags & _TOKEN:
                    o = Outcome.MALFORMED  # a token belongs to check_token, not to the page stream
                elif (page := self._page(flags, body)) is None:
                    o = Outcome.BAD_PAYLOAD
                elif flags & _VMSA:
                    self.vmsas[divmod(gfn, VMPLS)] = page
                    st.vmsas += 1
                    self._count_payload(flags, body)
                elif gfn >= npages or version >= 1 << 63:  # a gfn or version the target cannot hold
                    o = Outcome.MALFORMED
                elif version < held[gfn]:
                    o = Outcome.STALE_VERSION
                else:
                    held[gfn] = version
                    pending[gfn] = (None if flags & _ZERO else page, bool(flags & _PRIVATE))
                    if flags & _PRIVATE:
                        st.private_pages += 1
                    else:
                        st.shared_pages += 1
                    if flags & _ZERO:
                        st.zero_pages += 1
                    else:
                        self._count_payload(flags, body)
            outcomes.append(self._count(o))
        self._absorb(token)
        zero = {g: pr for g, (page, pr) in pending.items() if page is None}
        data = {g: v for g, v in pending.items() if v[0] is not None}
        if zero:  # never allocates memory for a zero page (a guest's untouched memory stays sparse)
            self.memory.install_zero(np.fromiter(zero, np.int64, len(zero)), np.fromiter(zero.values(), bool, len(zero)))
        if data:
            gfns = np.fromiter(data, dtype=np.int64, count=len(data))
            pages = np.frombuffer(b"".join(p for p, _ in data.values()), np.uint8).reshape(-1, PAGE_SIZE)
            private = np.fromiter((pr for _, pr in data.values()), bool, len(data))
            self.memory.install_plain(gfns, pages, private)
        return outcomes

    def _absorb(self, token: dict[int, list]) -> None:
        """Feed the header + tag records noted per stream (``[records, vmsas]``) into the token."""
        for stream, (records, vmsas) in token.items():
            self.token_hasher.absorb_many(stream, records, vmsas=vmsas)

    def _count_payload(self, flags: int, body: bytes) -> None:
        """Payload bytes as the sender counts them: a page before and after compression."""
        st = self.stats
        st.payload_bytes += PAGE_SIZE
        st.compressed_bytes += len(body)
        st.compressed_pages += bool(flags & _COMPRESSED)

    def receive(self, packet: bytes) -> Outcome:
        return self.receive_many([packet])[0]

    def token(self) -> Token:
        return self.token_hasher.token()

    def check_token(self, packet: bytes) -> TokenOutcome:
        """Open the source's sealed token and compare it with this side's own."""
        o, h, body = self._open(packet)
        if o is Outcome.ACCEPTED and (not h[4] & _TOKEN or len(body) != _TOKEN_BYTES):
            o = Outcome.MALFORMED
        self._count(o)
        if o is not Outcome.ACCEPTED:
            return TokenOutcome.TOKEN_REJECTED
        return compare(Token.from_bytes(body), self.token())
