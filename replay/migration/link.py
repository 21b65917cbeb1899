"""The migration link: capacity, latency and scheduled failures (``[[fault]] link_down``).

A failure at ``at_ns`` lasting ``duration_ns`` (or forever) means nothing crosses in that interval. A page
or message counts as delivered only if its last byte arrives (send end + latency) at or before the moment
the link dies; what was still on the wire is lost. Before the target runs, any failure from the start of
the migration on aborts it (the migration stream is broken even if nothing was in flight) and the source
runs on; after the target runs, post-copy recovers (if the link comes back) or fails.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scenario.spec import FOREVER, LinkFault, MigrationSpec

NS_PER_S = 1_000_000_000


class LinkDown(Exception):
    """The link died at ``at_ns`` before the target resumed (internal control flow: the run aborts)."""

    def __init__(self, at_ns: int):
        self.at_ns = at_ns


@dataclass(frozen=True)
class Link:
    bandwidth_bytes_per_s: int
    latency_ns: int
    faults: tuple[LinkFault, ...]
    armed_ns: int  # the migration's start: failures before it do not concern it

    @classmethod
    def of(cls, m: MigrationSpec, faults, armed_ns: int) -> "Link":
        return cls(m.bandwidth_bytes_per_s, m.latency_ns, tuple(sorted(faults, key=lambda f: (f.at_ns, f.duration_ns))),
                   armed_ns)

    def wire_ns(self, nbytes: int) -> int:
        """Time to put ``nbytes`` on the link (rounded up)."""
        return -(-nbytes * NS_PER_S // self.bandwidth_bytes_per_s)

    def down_at(self, since_ns: int | None = None) -> int | None:
        """The first moment at or after ``since_ns`` (default: the migration's start) at which the link is
        down, or None."""
        since_ns = self.armed_ns if since_ns is None else since_ns
        for f in self.faults:
            if f.duration_ns == FOREVER or f.at_ns + f.duration_ns > since_ns:
                return max(f.at_ns, since_ns)
        return None

    def outage(self, at_ns: int) -> LinkFault | None:
        """The failure whose outage covers ``at_ns`` (the first one, if several)."""
        for f in self.faults:
            if f.at_ns <= at_ns and (f.duration_ns == FOREVER or at_ns < f.at_ns + f.duration_ns):
                return f
        return None

    def deadline(self, down_ns: int | None) -> int | None:
        """Latest send end whose last byte still arrives before the link dies at ``down_ns``."""
        return None if down_ns is None else max(0, down_ns - self.latency_ns)

    def check(self, until_ns: int) -> None:
        """Before the target runs: raise LinkDown if the link was down at any moment from the migration's
        start until (strictly before) ``until_ns``."""
        down = self.down_at()
        if down is not None and down < until_ns:
            raise LinkDown(down)
