"""The options of `replay record --vm` (whole-VM recording under QEMU, replay.traces.vm) and its run."""

from __future__ import annotations

import sys

from ..core.units import format_bytes


def configure(p) -> None:
    g = p.add_argument_group("whole-VM recording (--vm): boot a guest under QEMU TCG and run CMD in it")
    g.add_argument("--vm", action="store_true", help="record every guest-physical store of a whole VM running CMD")
    g.add_argument("--memory", default="256MiB", metavar="SIZE", help="guest memory (64MiB..3GiB; default 256MiB)")
    g.add_argument("--vcpus", type=int, default=1, metavar="N",
                   help="guest vCPUs (default 1; more than 1 cannot use deterministic time on QEMU 7.2: "
                        "such recordings are not reproducible)")
    g.add_argument("--kernel", metavar="FILE", help="guest kernel (default: the newest /boot/vmlinuz-*)")
    g.add_argument("--initrd", metavar="FILE", help="your initramfs; the recorder's files are appended to it")
    g.add_argument("--append", default="", metavar="ARGS", help="extra kernel command-line arguments")
    g.add_argument("--add", action="append", default=[], metavar="FILE",
                   help="put FILE (a static binary or a script) into the guest's PATH (repeatable)")
    g.add_argument("--disk", metavar="IMG", help="a raw disk image (read-only: writes go to a snapshot); "
                                                  "CMD runs chrooted into its first partition or whole disk")
    g.add_argument("--start", choices=("command", "marker", "boot"), default="command",
                   help="when recording starts: command (default: right before CMD), marker (when the workload "
                        "runs `replay-mark start`), boot (from the first instruction)")
    g.add_argument("--max-stores", type=int, metavar="N", help="stop after N trace rows")
    g.add_argument("--max-time", metavar="DURATION", help="stop after this much guest time (e.g. 200ms)")
    g.add_argument("--epoch", default="0", metavar="DURATION",
                   help="keep only the first write of each page per epoch of this length (e.g. 1ms; default 0: all)")
    g.add_argument("--icount-shift", type=int, default=0, metavar="N",
                   help="guest time per instruction is 2^N ns (default 0)")
    g.add_argument("--shared", action="append", default=[], metavar="FIRST-LAST",
                   help="guest-physical byte range (hex or decimal, inclusive) classed shared (repeatable)")
    g.add_argument("--shared-swiotlb", action="store_true",
                   help="force the guest's swiotlb bounce buffer (swiotlb=force) and class its pages shared")
    g.add_argument("--qemu", default="qemu-system-x86_64", metavar="PATH", help="QEMU executable")
    g.add_argument("--console", metavar="FILE", help="save the guest's serial console to FILE")
    g.add_argument("--timeout", type=int, default=3600, metavar="SECONDS",
                   help="wall-clock limit for the whole run (a safety net; never shapes the trace)")


def run(args, cmd: list[str]) -> int:
    from ..api import record_vm

    res = record_vm(args.out, cmd, memory=args.memory, vcpus=args.vcpus, kernel=args.kernel, initrd=args.initrd,
                    append=args.append, add=args.add, disk=args.disk, start=args.start, max_stores=args.max_stores,
                    max_time=args.max_time, epoch=args.epoch, icount_shift=args.icount_shift, shared=args.shared,
                    shared_swiotlb=args.shared_swiotlb, qemu=args.qemu, console=args.console,
                    timeout_s=args.timeout, progress=not args.no_progress)
    c = res.counts
    print(
        f"recorded {res.meta.path}: {res.meta.events} writes over {c.ram_bytes} bytes, "
        f"guest {format_bytes(res.meta.guest_bytes)}, {res.meta.vcpus} vcpu(s), stopped: {res.stop}; not RAM: {c.io} MMIO, "
        f"{c.vga} VGA, {c.rom} ROM, {c.beyond_ram} above RAM stores; {c.dropped_epoch} dropped by --epoch; "
        f"digest {res.meta.digest}",
        file=sys.stderr,
    )
    if res.meta.vcpus > 1:  # no deterministic time (icount) with several vCPUs on QEMU 7.2
        print("replay record: warning: several vCPUs run without deterministic time on QEMU 7.2; "
              "a second recording will differ", file=sys.stderr)
    elif args.disk:
        print("replay record: warning: the disk's I/O completes at host-dependent times; "
              "a second recording may differ", file=sys.stderr)
    return 0
