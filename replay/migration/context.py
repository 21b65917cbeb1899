"""What every phase of a run shares: the services (engine, guest, link, CPU, event log, tallies), and the
small explicit results phases hand each other. Phase state lives in the phase modules, not here."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..scenario.spec import Scenario
from ..scenario.strategies import Strategy
from ..traces.format import TraceMeta
from .clock import Guest
from .cpu import Cpu
from .link import Link

PHASES = ("precopy", "downtime", "postcopy")


@dataclass
class Round:
    """One row of rounds.arrow: the interval from one dirty-log sync to the next (or a downtime/post-copy
    phase)."""

    round: int
    phase: str
    sync_ns: int
    dirty_pages: int
    start_ns: int
    end_ns: int = 0
    pages_sent: int = 0
    zero_pages: int = 0
    private_pages: int = 0
    shared_pages: int = 0
    bytes_sent: int = 0
    agents: int = 0
    agent_cpu_ns: int = 0
    target_cpu_ns: int = 0
    host_cpu_ns: int = 0
    guest_progress_ns: int = 0
    guest_start_ns: int = 0  # not a column: the guest's progress at the round's start


@dataclass
class Tally:
    """Pages and bytes per phase, and the rounds."""

    pages: dict = field(default_factory=lambda: {p: 0 for p in PHASES})
    bytes: dict = field(default_factory=lambda: {p: 0 for p in PHASES})
    zero_pages: int = 0
    private_pages: int = 0
    shared_pages: int = 0
    first_touches: int = 0
    rounds: list[Round] = field(default_factory=list)


@dataclass
class Run:
    """The services of one run. ``agents`` only grows (it is also the maximum and the number created)."""

    s: Scenario
    meta: TraceMeta
    eng: object
    strategy: Strategy
    guest: Guest
    link: Link
    cpu: Cpu
    tally: Tally = field(default_factory=Tally)
    events: list = field(default_factory=list)
    agents: int = 0
    data: object = None  # data mode (replay.migration.data.DataMode), or None: metadata mode
    vmsa_live: list = field(default_factory=lambda: [0, 0])  # shadow APs' VMSA pages on each side

    @property
    def adversary(self):
        """The run's adversary (``replay.migration.adversary.Adversary``: data mode with [[adversary]]
        entries), or None. Phases call its documented hooks (``at``, ``next_due``, ``link_event``...) only
        through this, never through the data plane."""
        return getattr(self.data, "adversary", None)

    @property
    def npages(self) -> int:
        return self.meta.npages

    @property
    def page_ns(self) -> tuple[int, int]:
        """An agent's CPU for one private page (or VMSA): (packaging at the source, unpacking at the
        target). In data mode the measured data-mode costs (decrypt XTS + [zstd] + GCM seal, and the
        reverse) stand in for the metadata ones, wherever an agent handles a page."""
        c = self.s.costs
        if not self.s.migration.data:
            return c.page_pack_ns, c.page_unpack_ns
        return c.data_page_pack_ns + (c.data_zstd_page_ns if self.s.migration.data_zstd_level else 0), c.data_page_unpack_ns

    @property
    def target_page_ns(self) -> int:
        """The target agent's CPU to take one private page in: unpack, PVALIDATE, and RMPADJUST for an OS
        below VMPL0."""
        c = self.s.costs
        return self.page_ns[1] + c.pvalidate_ns + (c.rmpadjust_ns if self.s.guest.os_vmpl else 0)

    @property
    def vcpus(self) -> int:
        return self.meta.vcpus

    def new_round(self, phase: str, sync_ns: int, dirty: int, start_ns: int | None = None) -> Round:
        """The next row of rounds.arrow, starting now (or at ``start_ns``), appended to the tally."""
        g = self.guest
        rnd = Round(len(self.tally.rounds), phase, sync_ns, dirty, g.v if start_ns is None else start_ns,
                    agents=self.agents, guest_start_ns=g.g)
        self.tally.rounds.append(rnd)
        return rnd

    def log(self, kind: str, detail: str = "", gfn: int = -1, vcpu: int = -1, t: int | None = None) -> None:
        self.events.append((self.guest.v if t is None else t, kind, gfn, vcpu, detail))
