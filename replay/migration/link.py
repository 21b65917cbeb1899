"""The migration link: capacity, latency and scheduled failures (``[[fault]] link_down``).

A failure at ``at_ns`` lasting ``duration_ns`` (or forever) means nothing crosses in that interval. A page
or message counts as delivered only if its last byte arrives (send end + latency) at or before the moment
the link dies; what was still on the wire is lost. Before the target runs, any failure aborts the
migration and the source runs on; after it, post-copy recovers (if the link comes back) or fails.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scenario import FOREVER, LinkFault, MigrationSpec

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

    @classmethod
    def of(cls, m: MigrationSpec, faults) -> "Link":
        return cls(m.bandwidth_bytes_per_s, m.latency_ns, tuple(sorted(faults, key=lambda f: (f.at_ns, f.duration_ns))))

    def wire_ns(self, nbytes: int) -> int:
        """Time to put ``nbytes`` on the link (rounded up)."""
        return -(-nbytes * NS_PER_S // self.bandwidth_bytes_per_s)

    def down_at(self, since_ns: int) -> int | None:
        """The first moment at or after ``since_ns`` at which the link is down, or None."""
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

    def check(self, since_ns: int, until_ns: int) -> None:
        """A message using the link from ``since_ns`` must arrive by ``until_ns``: raise LinkDown if the
        link dies before (strictly) ``until_ns``."""
        down = self.down_at(since_ns)
        if down is not None and down < until_ns:
            raise LinkDown(down)
