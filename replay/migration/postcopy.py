"""Post-copy (and the post-copy half of hybrid): switch over early, then the target runs while its missing
pages come on demand and in the background.

At the switchover the target marks every page it does not hold (or, after hybrid pre-copy, holds stale)
as userfault; VMSAs and device state cross; the target resumes. A guest access to a missing page blocks
that vCPU only: exit, request over the return path, packaging by a source agent, the page on the link,
unpacking and RMPUPDATE + PVALIDATE at the target. Meanwhile the background push sends the rest in gfn
order, or around the latest fault (pre-paging). After the switchover the guest runs on the target: with
shadow vCPUs, the target agents' unpacking takes its CPU; the source agents' packaging does not (the
source VM no longer runs the guest).

Link failures: before the target resumes, the migration aborts and the source runs on. After, the push
stops at the exact moment the link dies (nothing arrives after it); a link that comes back is re-keyed
(a new attested handshake) and the push goes on; one that never does leaves pages only on the source:
status ``failed``.
"""

from __future__ import annotations

import mmap
import sys
from dataclasses import dataclass, field

import numpy as np

from ..scenario.spec import FOREVER
from ..model.snp import PAGE_SIZE, Fault
from ..scenario.strategies import HOST, SOURCE, TARGET
from . import transfer
from .context import Run
from .faultpath import FaultPath
from .stopcopy import pause_and_drain, resume_target, send_vmsas_and_devices



@dataclass
class PostcopyStats:
    requests: int = 0
    duplicates: int = 0
    bytes: int = 0
    blocked: list = field(default_factory=list)  # per vCPU: [(raised, served)] of each fault, in guest time
    faults_rows: list = field(default_factory=list)
    source_only_pages: int = 0
    failed: bool = False

    @classmethod
    def empty(cls, vcpus: int) -> "PostcopyStats":
        return cls(blocked=[[] for _ in range(vcpus)])

    def latencies(self, vcpu: int | None = None) -> list[int]:
        """Fault latencies (blocked time of each fault), of one vCPU or all."""
        ivs = self.blocked if vcpu is None else [self.blocked[vcpu]]
        return [b - a for iv in ivs for a, b in iv]


def _link_event(run: Run, down: int, f, phase: str, up: int = 0) -> None:
    """Tell the adversary (if any) the link went down at ``down`` in ``phase`` (the push's, or a fault
    reply's): a link-loss it made acted then."""
    adv = run.adversary
    if adv is not None and f is not None:
        recovered = f.duration_ns != FOREVER
        adv.link_event(down, recovered, f.at_ns, phase, up - down if recovered else 0)


@dataclass(frozen=True)
class PostcopySwitch:
    pause_ns: int
    resume_ns: int
    source_digest: str
    missing: int  # pages the target lacked at the switchover
    vmsas: int


def switch_to_postcopy(run: Run, *, hybrid: bool) -> PostcopySwitch:
    """Pause; after hybrid pre-copy, discard what the target holds stale; VMSAs and device state cross; the
    target resumes with every page it lacks marked userfault."""
    g, eng = run.guest, run.eng
    v_pause, rnd = pause_and_drain(run, final_sync=hybrid, note="guest paused (switch over to post-copy)")
    if hybrid:
        stale = eng.discard_stale(SOURCE, TARGET)
        run.log("discard", f"stale_pages={stale}")
    source_digest = eng.set_digest(SOURCE)
    if run.data is not None:
        run.data.snapshot("source_at_switchover", SOURCE)
    missing = run.npages - eng.count_present(TARGET)
    nvmsa = send_vmsas_and_devices(run, rnd)
    resume_target(run, rnd, nvmsa, token=False)
    g.host = TARGET
    run.log("resume", f"target resumed; downtime_ns={g.v - v_pause} userfault_pages={missing}")
    return PostcopySwitch(v_pause, g.v, source_digest, missing, nvmsa)


def lazy_ready(npages: int) -> np.ndarray:
    """The page-ready times, all 0: a private anonymous mapping on Linux, never committed up front
    (MAP_NORESERVE: 8 bytes a page of a 16 TiB guest is 32 GiB of address space, more than many machines
    would let ``np.zeros`` reserve) nor backed by huge pages (a stored time makes 4 KiB resident, not
    2 MiB). The engines store a time only where a row could wait for it, so most of it is never written."""
    if not sys.platform.startswith("linux") or npages == 0:
        return np.zeros(npages, dtype=np.uint64)
    m = mmap.mmap(-1, npages * 8, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000))
    try:
        m.madvise(mmap.MADV_NOHUGEPAGE)
    except (AttributeError, OSError):
        pass  # advice only: huge pages cost memory, never correctness
    return np.frombuffer(m, dtype=np.uint64)  # the array holds the mapping; writable


class _Postcopy:
    """The post-copy phase's own state: the push's transfer, requests in flight, outages."""

    def __init__(self, run: Run, sw: PostcopySwitch):
        self.run = run
        self.sw = sw
        n = run.npages
        self.stats = PostcopyStats.empty(run.vcpus)
        self.requested: set[int] = set()  # gfns requested by a fault (few: no per-page array)
        self.prepage_next: np.ndarray | None = None
        self.pushing = False
        self.outage_backlog: list[int] | None = None
        self.link_up_ns = 0
        self.link_from = sw.resume_ns  # failures before this were handled (or came before the target ran)
        self.dead_at: int | None = None
        g = run.guest
        g.delays = np.zeros(run.vcpus, dtype=np.uint64)
        g.ready = lazy_ready(n)
        g.on_userfault = self.userfault
        self.rnd = run.new_round("postcopy", g.v, sw.missing)
        self.folded: dict | None = None
        self.path = FaultPath(run)
        # What the push has to send, zero pages as headers, and the fault replies added to its totals.
        c = run.s.costs
        self.push_bytes = run.eng.missing_bytes(SOURCE, TARGET, PAGE_SIZE, c.page_header_bytes)
        self.reply_bytes = 0  # fault replies added to the current transfer's totals
        self.pushed_before = 0  # push bytes of the transfers before an outage
        self.last_served_v = 0  # the latest moment a fault's page became usable (virtual time)
        self.last_arrive_v = 0  # the latest moment a fault's reply reached the target
        self.replies: list[tuple[int, int]] = []  # (arrival, gfn) of each fault's reply: lost if the link dies first

    # -- the push
    def begin(self) -> None:
        if self.folded is not None or self.pushed_before or self.reply_bytes:
            # A new transfer after an outage: the last one's push bytes count as sent (its totals reset).
            self.pushed_before += self.run.eng.transfer_state()["bytes"] - self.reply_bytes
            self.reply_bytes = 0
        transfer.begin(self.run, TARGET, skip_present=True)
        self.folded = None
        self.pushing = True

    def fold(self) -> None:
        """Fold the push's totals so far into the tallies (idempotent over repeated calls)."""
        st = self.run.eng.transfer_state()
        transfer.account(self.run, self.rnd, st, self.folded)
        self.folded = st

    def push(self) -> bool:
        """The background push to its end; False if the link is gone for good."""
        run, eng, g, link = self.run, self.run.eng, self.run.guest, self.run.link
        if not run.s.migration.postcopy_background_push:
            # Faults alone bring pages while the guest runs its trace; the rest goes after its last event.
            # A blocked vCPU's row holds back the rows after it: run to each held row's effective time.
            while not g.cur.done:
                b, r = g.cur.batch, g.cur.row
                t = int(b.column("t_ns")[r].as_py()) + int(g.delays[int(b.column("vcpu")[r].as_py())])
                g.elapse(max(1, t + 1 - g.g))
                if self.dead_at is not None:  # a fault could not be served: the link is gone for good
                    return False
        self.begin()
        base_k = 0
        window, wk = None, 0
        while True:
            if self.prepage_next is not None:
                # Pre-paging: the pages after the latest fault go first (Hines & Gopalan's bubbling).
                window, wk, self.prepage_next = self.prepage_next, 0, None
            if window is None and base_k >= run.npages:
                break
            down = link.down_at(self.link_from)
            # The window's pages first; else the pages the target lacks, walked in gfn order in the engine
            # (no per-page list). A fault stops the call, so a new window is picked up at once.
            k, batch = transfer.step(run, window, wk if window is not None else base_k, run_host=TARGET,
                                     paused=False, stream="postcopy", until_v=transfer.split(run, None),
                                     deadline_v=link.deadline(down), delays=g.delays,
                                     ready=g.ready, walk_end=None if window is not None else run.npages)
            if window is not None:
                wk = k
                if wk >= len(window):
                    window = None
            else:
                base_k = k
            if batch is not None and eng.last_stop[0] == Fault.USERFAULT and not self.userfault():
                return False
            if eng.transfer_state()["link_dead"] and not self.outage(down):
                return False
        self.fold()
        self.pushing = False
        st = eng.transfer_state()
        if not g.adopt(st["v_ns"], st["g_ns"]):
            return False
        # Every page is on the target once the last fault's reply is in too: the migration (and the source's
        # part in it) ends then, never with a fault still being served. A reply still on the wire when the
        # link dies is lost: for good, post-copy fails; else it comes again once the link is back.
        down = link.down_at(max(self.link_from, g.v))
        if down is not None and down < self.last_arrive_v:
            f = link.outage(down)
            run.log("link_down", "migration link lost during post-copy (a fault's reply in flight)", t=down)
            if f is None or f.duration_ns == FOREVER:
                _link_event(run, down, f, "fault")
                self.dead_at = down
                return False
            c = run.s.costs
            up = f.at_ns + f.duration_ns + c.attestation_psp_ns + c.attestation_cpu_ns
            _link_event(run, down, f, "fault", up)
            run.log("link_up", "recovered; re-keyed; the lost replies come again", t=up)
            again = up + 2 * link.latency_ns + (self.last_served_v - self.last_arrive_v)
            self.last_served_v = max(self.last_served_v, again)
        # The link was needed until the last byte (push or reply) was in.
        run.log("postcopy_data_in", "the last page's bytes reached the target",
                t=max(st["v_ns"] + link.latency_ns, self.last_arrive_v))
        if self.last_served_v > g.v:
            g.elapse(self.last_served_v - g.v)
        return True

    def outage(self, down: int) -> bool:
        """The link died at ``down`` during the push: recover (stall, re-handshake) or give up."""
        run, g, link, c = self.run, self.run.guest, self.run.link, self.run.s.costs
        self.fold()
        st = run.eng.transfer_state()
        g.adopt(st["v_ns"], st["g_ns"])
        run.log("link_down", "migration link lost during post-copy", t=down)
        f = link.outage(down)
        if f is None or f.duration_ns == FOREVER:
            _link_event(run, down, f, "postcopy")
            self.dead_at = down
            return False
        while True:
            up = f.at_ns + f.duration_ns + c.attestation_psp_ns + c.attestation_cpu_ns  # re-keyed before pages move
            _link_event(run, down, f, "postcopy", up)
            self.link_up_ns = up
            self.link_from = f.at_ns + f.duration_ns
            run.log("link_up", f"recovered; re-keyed; stalled_ns={up - down}", t=up)
            # A failure starting at or before `up` (right at this outage's end, or during the re-handshake)
            # leaves no moment for anything to cross: one longer outage, and the faults raised meanwhile
            # wait for its end. (Handing the held-back replies to a transfer that dies at once would count
            # them as sent across a dead link.)
            nxt = link.down_at(self.link_from)
            if nxt is None or nxt > up:
                break
            down, f = nxt, link.outage(nxt)
            run.log("link_down", "migration link lost during post-copy", t=down)
            if f is None or f.duration_ns == FOREVER:
                _link_event(run, down, f, "postcopy")
                self.dead_at = down
                return False
        # The guest runs on through the outage; its faults wait for the link (served after `up`).
        self.pushing, self.outage_backlog = False, [0, 0]
        if up > g.v:
            g.elapse(up - g.v)
        self.begin()
        run.eng.transfer_add(*self.outage_backlog)
        self.reply_bytes += self.outage_backlog[0]
        self.outage_backlog = None
        return True

    # -- faults
    def push_bound(self, g: int) -> tuple[int, int, int]:
        """Per full page of the push: (link time, source agent time, target agent time), the agents at their
        capacity now (the guest runs on the target, at trace time ``g``)."""
        run, c = self.run, self.run.s.costs
        link = run.link.wire_ns(PAGE_SIZE + c.page_header_bytes)
        src = run.cpu.agent_work_ns(run.page_ns[0], run.agents, SOURCE, TARGET, g)
        dst = run.cpu.agent_work_ns(run.target_page_ns, run.agents, TARGET, TARGET, g)
        return link, src, dst

    def queued_ahead(self, g: int) -> int:
        """Push bytes on the channel ahead of a reply now: the whole in-flight window when the link is the
        push's bottleneck, one packet when its agents are (the link drains faster than they fill it); never
        more than the push still has to send (zero pages as headers); nothing when it is not running."""
        if not self.pushing:
            return 0
        c = self.run.s.costs
        sent = self.pushed_before + self.run.eng.transfer_state()["bytes"] - self.reply_bytes
        left = max(0, self.push_bytes - sent)
        link, src, dst = self.push_bound(g)
        window = c.postcopy_queue_bytes if link >= max(src, dst) else PAGE_SIZE + c.page_header_bytes
        return min(window, left)

    def agents_busy(self, g: int) -> tuple[int, int]:
        """What a request waits for on each side when the push keeps that side's agents busy: the page an
        agent is working on (on average half of one; here one, the worst case a request can meet)."""
        if not self.pushing:
            return 0, 0
        link, src, dst = self.push_bound(g)
        per_agent = max(1, self.run.agents)
        return (src * per_agent if src > link else 0, dst * per_agent if dst > link else 0)

    def userfault(self) -> bool:
        """Serve the userfault the engine stopped on: block that vCPU until the page is usable. False if the
        link never comes back (the guest cannot go on)."""
        run, eng, g = self.run, self.run.eng, self.run.guest
        _, gfn, vcpu, row = eng.last_stop
        cur = g.cur
        pc = self.stats
        e = int(cur.batch.column("t_ns")[row].as_py()) + int(g.delays[vcpu])
        # guest time -> virtual time, at the current rate (the push's clock while it runs)
        st = eng.transfer_state() if self.pushing else {"v_ns": g.v, "g_ns": g.g}
        voff = st["v_ns"] - st["g_ns"]
        src = eng.page(SOURCE, gfn)
        private = src.private
        v_req = e + voff
        already = gfn in self.requested
        arrive = 0
        if already:
            # In flight already: no second request; this vCPU waits for that arrival.
            served = max(e, int(g.ready[gfn]))
            pc.duplicates += 1
        else:
            if self.link_up_ns and v_req < self.link_up_ns:
                v_req = self.link_up_ns  # raised while the link was down: waits for recovery
            elif self.dead_at is not None and v_req >= self.dead_at:
                return False
            # No later fault can be raised before this row's own time: older bookings cannot matter.
            self.path.prune(int(cur.batch.column("t_ns")[row].as_py()) + voff)
            sv = self.path.serve(vcpu, gfn, v_req, private, src.version == 0, self.queued_ahead(e), e,
                                 self.agents_busy(e))
            # A page the target already holds is on its way in the push: that copy serves the fault, and the
            # reply (never counted as sent) is not waited for: its arrival neither keeps the link needed nor
            # fails the migration when the link dies.
            held = eng.page(TARGET, gfn).present
            if not self.pushing and self.outage_backlog is None and not held:
                # After the push, nobody else watches the link: a reply still on its way when the link
                # dies is lost; the request goes again once the link is back (re-keyed), or never.
                while (down := run.link.down_at(v_req)) is not None and down < sv.arrive_ns:
                    f = run.link.outage(down)
                    if f is None or f.duration_ns == FOREVER:
                        _link_event(run, down, f, "fault")
                        self.dead_at = down
                        run.log("link_down", "migration link lost during post-copy", t=down)
                        return False
                    c = run.s.costs
                    v_req = f.at_ns + f.duration_ns + c.attestation_psp_ns + c.attestation_cpu_ns
                    _link_event(run, down, f, "fault", v_req)
                    run.log("link_up", f"recovered; re-keyed; fault on gfn {gfn} requested again", t=v_req)
                    sv = self.path.serve(vcpu, gfn, v_req, private, src.version == 0, 0, e, (0, 0))
            served = sv.done_ns - voff
            arrive = 0 if held else sv.arrive_ns
            if held:
                served = min(served, int(g.ready[gfn]))  # already on its way in the push
            else:
                eng.deliver(SOURCE, TARGET, gfn)
                # The push skips a page a fault brought: it no longer has that page to send.
                self.push_bytes -= run.s.costs.page_header_bytes + (PAGE_SIZE if src.version else 0)
                if run.data is not None:
                    run.data.send([gfn], [src.version], "fault", sv.sent_ns,  # on the link then
                                  eng.transfer_state()["v_ns"] if self.pushing else None)
                if self.pushing:  # the page shares the link and the agents with the push
                    eng.transfer_add(sv.reply_bytes, sv.pack_ns, sv.unpack_ns)
                    self.reply_bytes += sv.reply_bytes
                elif self.outage_backlog is not None:  # crosses once the link is back
                    self.outage_backlog[0] += sv.reply_bytes
                    self.outage_backlog[1] += sv.pack_ns
                else:
                    run.tally.bytes["postcopy"] += sv.reply_bytes
                    run.cpu.charge(run.strategy.agent_owner, sv.pack_ns + sv.unpack_ns)
                run.cpu.charge(HOST, sv.host_ns)
                pc.bytes += sv.reply_bytes
                run.tally.pages["postcopy"] += 1
                run.tally.private_pages += private
                run.tally.shared_pages += not private
                run.tally.zero_pages += src.version == 0
            self.requested.add(gfn)
            g.ready[gfn] = served
            pc.requests += 1
            if run.s.migration.prepaging:
                self.prepage_next = np.arange(gfn + 1, min(run.npages, gfn + 1 + run.s.migration.prepage_pages),
                                              dtype=np.uint32)
        served = max(served, e)
        self.last_served_v = max(self.last_served_v, served + voff)
        if not already:
            self.last_arrive_v = max(self.last_arrive_v, arrive)
            self.replies.append((arrive, gfn))
        self.path.block(vcpu, e + voff, served + voff)
        g.delays[vcpu] += served - e
        pc.blocked[vcpu].append((e, served))
        pc.faults_rows.append((vcpu, gfn, private, e + voff, served + voff, cur.base + row))
        return True


@dataclass(frozen=True)
class PostcopyEnd:
    completed: bool
    completion_ns: int
    target_digest: str
    stats: PostcopyStats


def postcopy(run: Run, sw: PostcopySwitch) -> PostcopyEnd:
    pc = _Postcopy(run, sw)
    ok = pc.push()
    g = run.guest
    pc.rnd.end_ns, pc.rnd.guest_progress_ns = g.v, g.g - pc.rnd.guest_start_ns
    if not ok:
        pc.stats.failed = True
        # Pages still to come, and fault replies that were on the wire when the link died.
        lost = {gfn for arrive, gfn in pc.replies if pc.dead_at is not None and arrive > pc.dead_at}
        pc.stats.source_only_pages = run.npages - run.eng.count_present(TARGET) + len(lost)
        return PostcopyEnd(False, g.v, "", pc.stats)
    target_digest = run.eng.received_digest(TARGET)
    if run.data is not None:
        run.data.token()
    run.log("validation_token", f"pages={run.tally.pages['precopy'] + run.tally.pages['postcopy']} "
            f"match={target_digest == sw.source_digest}")
    run.log("postcopy_complete", f"switchover_to_complete_ns={g.v - sw.pause_ns}")
    return PostcopyEnd(True, g.v, target_digest, pc.stats)
