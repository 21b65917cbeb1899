"""Data mode and the attested, sealed migration channel (SPEC sections 3 and 5).

Modules, each usable alone:

- ``keys``: every secret, derived from the scenario seed with HKDF-SHA384;
- ``xts``: AES-128-XTS of many pages per call, tweak = system physical address (C, via OpenSSL EVP);
- ``memory``: ``HostMemory``, one host's sparse guest memory with real contents (private pages
  encrypted, behind a write-back cache of pages in clear), and ``replay_plaintext_digest`` (a trace replayed straight into data-mode memory);
- ``attestation``: the emulated AMD key hierarchy, attestation reports, verification and the handshake;
- ``gcm``: AES-256-GCM of many packets per call (C, via OpenSSL EVP), into and out of one wire buffer;
- ``parallel``: a big batch of independent pages cut in two halves done at once on two cores;
- ``channel``: packets (a batch of them on a ``Wire``), the source's ``Sender`` and the target's ``Receiver``;
- ``token``: the end-of-migration validation token;
- ``session``: ``DataPlane``, one call per migration phase for the driver (and ``establish``,
  ``endpoints`` underneath).
"""
