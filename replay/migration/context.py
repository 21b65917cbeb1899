"""What every phase of a run shares: the services (engine, guest, link, CPU, event log, tallies), and the
small explicit results phases hand each other. Phase state lives in the phase modules, not here."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..scenario import Scenario
from ..snp import PAGE_SIZE
from ..strategies import Strategy
from ..trace import TraceMeta
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
    trace_last_ns: int = 0  # guest time of the trace's last event
    data: object = None  # data mode (replay.migration.data.DataMode), or None: metadata mode
    vmsa_live: list = field(default_factory=lambda: [0, 0])  # shadow APs' VMSA pages on each side

    @property
    def npages(self) -> int:
        return self.meta.guest_bytes // PAGE_SIZE

    @property
    def vcpus(self) -> int:
        return self.meta.vcpus

    def log(self, kind: str, detail: str = "", gfn: int = -1, vcpu: int = -1, t: int | None = None) -> None:
        self.events.append((self.guest.v if t is None else t, kind, gfn, vcpu, detail))
