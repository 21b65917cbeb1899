"""Record a whole virtual machine into a trace: ``replay record --vm`` (QEMU TCG and a plugin of ours).

How a recording is made (docs/recording.md is the user's version of this):

1. The guest: a distribution kernel (default: the newest ``/boot/vmlinuz-*``) and an initramfs built here
   as a newc cpio archive (byte-identical every time): busybox-static, the ``replay-mark`` helper, the
   ``--add`` files and an ``/snp-replay/init`` script that mounts /proc, /sys and /dev, runs the command,
   prints its exit status on the serial console and reboots. A user's ``--initrd`` gets the same files
   appended as a second archive (the kernel unpacks both).
2. QEMU runs it under TCG with the plugin ``replay/traces/qemu_plugin/snp_record.c`` (built with the C compiler
   on first use, or at install), which streams every store's guest-physical address, guest time, HLTs and
   the guest's start/stop markers through a pipe as 24-byte records.
3. This module reads that stream while QEMU runs, keeps the stores to RAM (MMIO, VGA and ROM stores are
   counted, not kept), applies ``--epoch`` and the limits, and writes rows through
   :class:`replay.traces.format.TraceWriter`; idle intervals (HLT to the next executed block) go to ``vcpu_idle``.
   Memory stays bounded: QEMU blocks on a full pipe, and guest time does not advance while it waits.

Determinism: with one vCPU, ``-icount shift=N,sleep=off`` and a fixed RTC, guest time is instructions
<< N plus the time skipped while halted, and QEMU executes the same instructions every run, so the same
command gives the same trace (the content seed of a WRITE is its row index). Several vCPUs need QEMU's
multi-vCPU mode without icount (QEMU 7.2 livelocks otherwise), so such recordings are not reproducible;
the metadata says so.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import RecordError, UsageError
from ..model.snp import Op

PAGE = 4096
QEMU_HINT = "install it with `apt-get install qemu-system-x86` (Debian/Ubuntu)"
KERNEL_HINT = "install a kernel with `apt-get install linux-image-cloud-amd64` or give --kernel"
BUSYBOX_HINT = "install it with `apt-get install busybox-static`"
CC_HINT = "install a C compiler with `apt-get install gcc`"

# Plugin records (see snp_record.c).
REC = np.dtype([("t", "<u8"), ("addr", "<u8"), ("info", "<u4"), ("vcpu", "<u4")])
K_STORE, K_HALT, K_RESUME, K_START, K_STOP, K_IO, K_NOADDR = range(7)

# The guest's physical layout on QEMU's `pc` machine with up to 3 GiB of RAM: RAM from 0, except the
# legacy hole, which holds VGA memory (0xa0000-0xbffff) and option/BIOS ROMs (0xc0000-0xfffff).
VGA = (0xA0000, 0xC0000)
ROM = (0xC0000, 0x100000)
MAX_MEMORY = 3 << 30

# QEMU 7.2's `timers_state` (softmmu/timers-state.h): int16 icount_time_shift at 26, int64
# qemu_icount_bias at 40. Used only for the QEMU versions listed here (checked at run time too).
BIAS_LAYOUT = {(7, 2): (40, 26)}

EPOCH_DEFAULT = 0
START_MODES = ("command", "marker", "boot")
STATUS_RE = re.compile(rb"snp-replay: exit (\d+)")
BOOTED = b"snp-replay: booted"
SWIOTLB_RE = re.compile(rb"snp-replay: swiotlb .*?mapped \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\]")
# Kernel arguments: serial console; reboot on panic (QEMU then exits through -no-reboot); the HPET as
# clocksource because TSC calibration under TCG is unreliable; our init.
BASE_APPEND = "console=ttyS0 panic=-1 tsc=unstable clocksource=hpet quiet rdinit=/snp-replay/init"


@dataclass(frozen=True)
class VmOptions:
    """What to boot, what to run in it and what to keep."""

    argv: tuple[str, ...]
    memory: int = 256 << 20
    vcpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    add: tuple[str, ...] = ()
    disk: str | None = None
    start: str = "command"
    max_stores: int | None = None
    max_time_ns: int | None = None
    epoch_ns: int = EPOCH_DEFAULT
    shift: int = 0
    shared: tuple[tuple[int, int], ...] = ()  # byte ranges [first, end)
    shared_swiotlb: bool = False
    qemu: str = "qemu-system-x86_64"
    busybox: str | None = None
    timeout_s: int = 3600
    progress: bool | None = None
    console: str | None = None  # a file to copy the guest's console to

    def __post_init__(self) -> None:
        if not self.argv:
            raise UsageError("record --vm: no command given (usage: replay record --vm --out FILE -- CMD [ARGS...])")
        if self.memory < 64 << 20 or self.memory > MAX_MEMORY or self.memory % (2 << 20):
            raise UsageError(f"record --vm: --memory must be a multiple of 2 MiB between 64 MiB and 3 GiB, not {self.memory}")
        if not 1 <= self.vcpus <= 64:
            raise UsageError(f"record --vm: --vcpus must be 1..64, not {self.vcpus}")
        if self.start not in START_MODES:
            raise UsageError(f"record --vm: --start must be one of {', '.join(START_MODES)}")
        if not 0 <= self.shift <= 10:
            raise UsageError(f"record --vm: --icount-shift must be 0..10, not {self.shift}")
        if self.max_stores is not None and self.max_stores < 1:
            raise UsageError("record --vm: --max-stores must be at least 1")
        if self.max_time_ns is not None and self.max_time_ns < 1:
            raise UsageError("record --vm: --max-time must be positive")
        if self.epoch_ns < 0:
            raise UsageError("record --vm: --epoch must not be negative")
        if self.shared_swiotlb and self.start == "boot":
            raise UsageError("record --vm: --shared-swiotlb needs --start command or marker (the range is known only after boot)")
        for a, b in self.shared:
            if not 0 <= a < b <= self.memory:
                raise UsageError(f"record --vm: --shared range {a:#x}-{b - 1:#x} is outside the guest's {self.memory} bytes")

    @property
    def icount(self) -> bool:
        """Deterministic time (icount): one vCPU only on QEMU 7.2."""
        return self.vcpus == 1

    @property
    def deterministic(self) -> bool:
        """Whether recording again gives the same trace: icount, and no disk (its I/O completes on host
        threads, at host-dependent guest times: two recordings with --disk were seen to differ)."""
        return self.icount and self.disk is None


# --------------------------------------------------------------------------------------------------
# Tools: QEMU, kernel, busybox, the plugin and the marker helper
# --------------------------------------------------------------------------------------------------


def qemu_version(qemu: str) -> tuple[str, tuple[int, int]]:
    exe = shutil.which(qemu)
    if exe is None:
        raise RecordError(f"record --vm: {qemu} not found on PATH; {QEMU_HINT}")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    except OSError as exc:
        raise RecordError(f"record --vm: cannot run {exe}: {exc.strerror or exc}; {QEMU_HINT}") from None
    m = re.search(r"version (\d+)\.(\d+)(\.\d+)?", out)
    if not m:
        raise RecordError(f"record --vm: {exe} --version printed no version; {QEMU_HINT}")
    return m.group(0).split()[1], (int(m.group(1)), int(m.group(2)))


def default_kernel() -> str:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"), key=_version_key)
    if not kernels:
        raise RecordError(f"record --vm: no kernel in /boot; {KERNEL_HINT}")
    return kernels[-1]


def _version_key(path: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", os.path.basename(path))]


def _is_static_elf(path: str) -> bool:
    """An ELF executable without an interpreter (PT_INTERP): it runs in a guest without libc."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                return False
            phoff = int.from_bytes(head[32:40], "little")
            phentsize = int.from_bytes(head[54:56], "little")
            phnum = int.from_bytes(head[56:58], "little")
            f.seek(phoff)
            ph = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(int.from_bytes(ph[i * phentsize:i * phentsize + 4], "little") != 3 for i in range(phnum))


def find_busybox(busybox: str | None) -> str:
    for cand in ([busybox] if busybox else ["/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""]):
        if cand and os.path.isfile(cand) and _is_static_elf(cand):
            return cand
    if busybox:
        raise RecordError(f"record --vm: --busybox {busybox} is not a statically linked x86-64 executable")
    raise RecordError(f"record --vm: no statically linked busybox found; {BUSYBOX_HINT}")


def _cache_dir() -> Path:
    """Where builds made on first use go: the project's cache (as replay.migration.traces uses it)."""
    return Path(os.environ.get("SNP_REPLAY_CACHE", Path.home() / ".cache" / "snp-replay")) / "vm"


def _build(name: str) -> Path:
    """The compiled target ``name`` (see replay.traces.qemu_plugin): beside the source if the install built it,
    else in the cache under a name carrying the source's hash, compiled now if missing."""
    from .qemu_plugin import HERE, compile_one, compiler, tag

    want = tag(name)
    stamp = HERE / f"{name}.sha"
    if (HERE / name).is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        return HERE / name
    out = _cache_dir() / f"{name}-{want}"
    if out.is_file():
        return out
    if compiler() is None:
        raise RecordError(f"record --vm: cannot build the QEMU plugin ({name}): no C compiler; {CC_HINT}")
    out.parent.mkdir(parents=True, exist_ok=True)
    problem = compile_one(name, out)
    if problem is not None:
        raise RecordError(f"record --vm: building {name} failed: {problem}")
    return out


def build_plugin() -> Path:
    return _build("snp_record.so")


def build_mark() -> Path:
    return _build("replay-mark")


# --------------------------------------------------------------------------------------------------
# The initramfs
# --------------------------------------------------------------------------------------------------


class Cpio:
    """A newc cpio archive with fixed metadata (inode numbers in order, mtime 0, root), so the same
    files always give the same bytes."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        nb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(hdr + nb)
        self.buf.write(b"\0" * (-(len(hdr) + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, 0o040755, b"")

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self._entry(name, 0o100000 | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def init_script(opts: VmOptions) -> str:
    """The guest's /snp-replay/init: set up, mark, run the command, report its status, reboot."""
    lines = [
        "#!/snp-replay/bin/busybox sh",
        "B=/snp-replay/bin/busybox",
        "$B mkdir -p /proc /sys /dev /tmp /root",
        "$B mount -t proc proc /proc; $B mount -t sysfs sys /sys; $B mount -t devtmpfs dev /dev 2>/dev/null",
        "$B --install -s /snp-replay/bin",
        "export PATH=/snp-replay/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C TZ=UTC",
    ]
    root = ""
    if opts.disk:
        # The distribution kernel has virtio-blk as modules: load the ones the initramfs carries.
        lines += [
            "for m in $(cat /snp-replay/modules 2>/dev/null); do insmod /snp-replay/$m 2>/dev/null; done",
            "mkdir -p /snp-replay/root",
            "for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.1; done",
            "mount /dev/vda1 /snp-replay/root 2>/dev/null || mount /dev/vda /snp-replay/root || "
            "{ echo 'snp-replay: cannot mount the --disk image'; reboot -f; }",
            "for d in proc sys dev; do mkdir -p /snp-replay/root/$d; mount --bind /$d /snp-replay/root/$d; done",
            "mkdir -p /snp-replay/root/snp-replay; mount --bind /snp-replay /snp-replay/root/snp-replay",
        ]
        root = "chroot /snp-replay/root "
    if opts.shared_swiotlb:
        lines.append("dmesg | grep 'software IO TLB: mapped' | sed 's/^/snp-replay: swiotlb /'")
    lines.append("echo 'snp-replay: booted'")
    lines.append("cd /root")
    run = f"{root}/snp-replay/bin/busybox sh /snp-replay/cmd"
    if opts.start == "command":
        lines += ["replay-mark start", run, "s=$?"]
    else:
        lines += [run, "s=$?"]
    lines += ["replay-mark stop", "echo \"snp-replay: exit $s\"", "sync", "reboot -f", ""]
    return "\n".join(lines)


def build_initrd(opts: VmOptions, busybox: str, mark: Path) -> tuple[bytes, dict]:
    """The initramfs overlay (gzip of a newc cpio, byte-identical for the same inputs) and its metadata."""
    c = Cpio()
    c.file("snp-replay/bin/busybox", Path(busybox).read_bytes())
    c.file("snp-replay/bin/replay-mark", mark.read_bytes())
    added = []
    for f in opts.add:
        data = Path(f).read_bytes()
        name = os.path.basename(f)
        c.file(f"snp-replay/bin/{name}", data, 0o755)
        added.append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    c.file("snp-replay/cmd", (shlex.join(opts.argv) + "\n").encode(), 0o644)
    modules = []
    if opts.disk:
        modules = _disk_modules(opts)
        for rel, data in modules:
            c.file(f"snp-replay/{rel}", data, 0o644)
        c.file("snp-replay/modules", "".join(f"{rel}\n" for rel, _ in modules).encode(), 0o644)
    c.file("snp-replay/init", init_script(opts).encode())
    for d in ("proc", "sys", "dev", "tmp", "root"):
        c.dir(d)
    raw = c.finish()
    gz = gzip.compress(raw, compresslevel=6, mtime=0)
    return gz, {"added": added, "modules": [rel for rel, _ in modules], "sha256": hashlib.sha256(gz).hexdigest()}


def _disk_modules(opts: VmOptions) -> list[tuple[str, bytes]]:
    """virtio-blk and what it needs, from the kernel's /lib/modules (in load order), when they are modules."""
    kernel = opts.kernel or default_kernel()
    release = os.path.basename(kernel).removeprefix("vmlinuz-")
    moddir = Path("/lib/modules") / release
    dep = moddir / "modules.dep"
    if not dep.is_file():
        return []
    deps: dict[str, list[str]] = {}
    for line in dep.read_text().splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            deps[k] = v.split()
    order: list[str] = []

    def add(m: str) -> None:
        for d in reversed(deps.get(m, [])):
            add(d)
        if m not in order:
            order.append(m)

    for want in ("virtio_pci.ko", "virtio_blk.ko"):
        for m in deps:
            if m.endswith("/" + want):
                add(m)
    out = []
    for m in order:
        if m.endswith((".xz", ".zst", ".gz")):
            raise RecordError(f"record --vm: --disk: module {m} is compressed; busybox insmod cannot load it")
        out.append((m.replace("/", "_"), (moddir / m).read_bytes()))
    return out


# --------------------------------------------------------------------------------------------------
# The recording
# --------------------------------------------------------------------------------------------------


@dataclass
class Counts:
    records: int = 0
    ram_stores: int = 0
    ram_bytes: int = 0
    io: int = 0
    vga: int = 0
    rom: int = 0
    beyond_ram: int = 0
    noaddr: int = 0
    dropped_epoch: int = 0
    halts: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class VmResult:
    meta: object
    counts: Counts
    source: dict
    boot_ns: int
    stop: str
    console: str = ""


class EpochFilter:
    """Keep only the first write of each page in each epoch of ``epoch_ns`` (bounded: one bit per page)."""

    def __init__(self, epoch_ns: int, pages: int) -> None:
        self.epoch_ns = epoch_ns
        self.seen = np.zeros(pages, dtype=bool)
        self.epoch = -1

    def keep(self, t: np.ndarray, page: np.ndarray) -> np.ndarray:
        keep = np.zeros(len(t), dtype=bool)
        ep = (t // np.uint64(self.epoch_ns)).astype(np.int64)
        cuts = np.flatnonzero(np.diff(ep)) + 1
        for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(t)]])):
            if hi <= lo:
                continue
            e = int(ep[lo])
            if e != self.epoch:
                self.seen[:] = False
                self.epoch = e
            pg = page[lo:hi]
            uniq, first = np.unique(pg, return_index=True)
            new = ~self.seen[uniq]
            keep[lo + first[new]] = True
            self.seen[uniq] = True
        return keep


def _merge(iv: list[int]) -> list[int]:
    out: list[int] = []
    for i in range(0, len(iv), 2):
        a, b = iv[i], iv[i + 1]
        if b <= a:
            continue
        if out and a <= out[-1]:
            out[-1] = max(out[-1], b)
        else:
            out += [a, b]
    return out


def _tail(text: str, n: int = 5) -> str:
    """The console's last lines on one line; a kernel panic's reason first (a backtrace follows it)."""
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", ln).strip() for ln in text.replace("\r", "\n").splitlines()]
    lines = [ln for ln in lines if ln]
    panic = [ln for ln in lines if "Kernel panic" in ln][:1]
    tail = lines[-n:]
    return " | ".join(panic + ["..."] + tail if panic and panic[0] not in tail else tail) or "(empty)"


def _progress(enabled: bool | None):
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False,
                bar_format="{desc} [{elapsed}]")


def kernel_args(opts: VmOptions) -> str:
    """The guest kernel's command line. --shared-swiotlb: a guest below 4 GiB sets up no swiotlb unless
    told to (iommu=soft), and swiotlb=force bounces all DMA through it, as an SNP guest does."""
    return (BASE_APPEND + (" iommu=soft swiotlb=force" if opts.shared_swiotlb else "")
            + (f" {opts.append}" if opts.append else ""))


def qemu_argv(opts: VmOptions, qemu: str, kernel: str, initrd: str, plugin: Path, fd: int, console: str,
              bias: tuple[int, int] | None) -> list[str]:
    plug = f"{plugin},fd={fd},shift={opts.shift}"
    plug += f",bias={bias[0]},shiftoff={bias[1]}" if bias else ",bias=-1"
    if opts.start == "boot":
        plug += ",start=boot"
    append = kernel_args(opts)
    argv = [qemu, "-machine", "pc", "-cpu", "qemu64", "-m", f"{opts.memory >> 20}M", "-smp", str(opts.vcpus),
            "-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot",
            "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
            "-rtc", "base=2020-01-01T00:00:00,clock=vm",
            "-kernel", kernel, "-initrd", initrd, "-append", append, "-plugin", plug]
    if opts.icount:
        argv += ["-accel", "tcg", "-icount", f"shift={opts.shift},sleep=off"]
    else:
        # icount livelocks with several vCPUs on QEMU 7.2; one TCG thread keeps the plugin's single
        # instruction counter exact (the vCPUs take turns), but the turns follow host timing.
        argv += ["-accel", "tcg,thread=single"]
    if opts.disk:
        argv += ["-drive", f"file={opts.disk},format=raw,if=virtio,snapshot=on"]
    return argv


def record_vm(out: str | os.PathLike, opts: VmOptions) -> VmResult:
    """Boot the guest, run ``opts.argv`` in it and write the trace ``out`` (nothing left on failure)."""
    from ..core.records import canonical_json
    from .format import TraceWriter

    out = Path(out)
    if not out.parent.is_dir():
        raise RecordError(f"record --vm: {out}: directory {out.parent} does not exist")
    version, vtuple = qemu_version(opts.qemu)
    kernel = opts.kernel or default_kernel()
    if not os.path.isfile(kernel) or not os.access(kernel, os.R_OK):
        raise RecordError(f"record --vm: kernel {kernel} is not a readable file; {KERNEL_HINT}")
    for what, f in [("--initrd", opts.initrd), ("--disk", opts.disk)] + [("--add", a) for a in opts.add]:
        if f is not None and not os.path.isfile(f):
            raise RecordError(f"record --vm: {what} {f}: no such file")
    busybox = find_busybox(opts.busybox)
    plugin = build_plugin()
    mark = build_mark()
    bias = BIAS_LAYOUT.get(vtuple) if opts.icount else None
    overlay, initrd_meta = build_initrd(opts, busybox, mark)
    pages = opts.memory // PAGE

    with tempfile.TemporaryDirectory(prefix=f".{out.name}.vm.", dir=str(out.parent)) as tmp:
        initrd = os.path.join(tmp, "initrd")
        with open(initrd, "wb") as f:
            if opts.initrd:
                user = Path(opts.initrd).read_bytes()
                f.write(user + b"\0" * (-len(user) % 4))
            f.write(overlay)
        console = os.path.join(tmp, "console")
        r, w = os.pipe()
        with contextlib.suppress(OSError, AttributeError):
            import fcntl

            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
        argv = qemu_argv(opts, shutil.which(opts.qemu) or opts.qemu, kernel, initrd, plugin, w, console, bias)
        errf = open(os.path.join(tmp, "qemu.err"), "w+b")
        try:
            proc = subprocess.Popen(argv, pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                                    start_new_session=True)  # Ctrl-C reaches us, not QEMU: we stop it
        except OSError as exc:
            os.close(r)
            os.close(w)
            raise RecordError(f"record --vm: cannot start {opts.qemu}: {exc.strerror or exc}") from None
        os.close(w)
        killed = threading.Event()

        def watchdog() -> None:
            if not killed.wait(opts.timeout_s):
                killed.set()
                with contextlib.suppress(OSError):
                    proc.kill()

        threading.Thread(target=watchdog, name="vm-timeout", daemon=True).start()
        state = _Stream(opts, pages, console)
        writer = None
        bar = _progress(opts.progress)
        try:
            with os.fdopen(r, "rb", buffering=0) as pipe:
                rest = b""
                while state.stop is None:
                    data = pipe.read(1 << 20)
                    if not data:
                        break
                    data = rest + data
                    n = len(data) // REC.itemsize * REC.itemsize
                    rest = data[n:]
                    recs = np.frombuffer(data[:n], dtype=REC)
                    rows = state.feed(recs)
                    if rows is not None and len(rows[0]):
                        if writer is None:
                            writer = TraceWriter(out, guest_bytes=opts.memory, vcpus=opts.vcpus,
                                                 shared_ranges=state.shared_gfns(), source={})
                        writer.write(*rows, np.arange(state.rows - len(rows[0]), state.rows, dtype=np.uint64))
                    bar.set_description_str(
                        f"guest {state.guest_ns / 1e6:,.1f} ms, {state.rows:,} stores kept, "
                        f"{state.counts.records * REC.itemsize / 1e6:,.0f} MB from QEMU")
            if state.stop is not None:  # a limit: the rest of the run is not needed
                killed.set()
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
            status = proc.wait()
            timed_out = killed.is_set() and state.stop is None
            killed.set()
            text = Path(console).read_bytes() if os.path.exists(console) else b""
            if opts.console:
                Path(opts.console).write_bytes(text)
            ctext = text.decode("utf-8", "replace")
            if state.stop is None:
                errf.seek(0)
                qerr = errf.read().decode("utf-8", "replace")
                if timed_out:
                    raise RecordError(f"record --vm: the guest did not finish within {opts.timeout_s} s; console: {_tail(ctext)}")
                if BOOTED not in text:
                    if status != 0 and qerr.strip():
                        raise RecordError(f"record --vm: {opts.qemu} failed (exit status {status}): {_tail(qerr, 2)}")
                    raise RecordError(f"record --vm: the guest did not boot; console: {_tail(ctext)}")
                # The init's line comes last (the command may print anything before it).
                m = ([None] + list(STATUS_RE.finditer(text)))[-1]
                if m is None:
                    raise RecordError(f"record --vm: the guest stopped before the command finished; console: {_tail(ctext)}")
                if int(m.group(1)) != 0:
                    raise RecordError(f"record --vm: {shlex.join(opts.argv)} failed in the guest with exit status "
                                      f"{int(m.group(1))}; console: {_tail(ctext)}")
                state.stop = "command exited" if state.stopped_by_marker else "guest stopped"
            if state.start_t is None:
                raise RecordError("record --vm: the guest never executed the start marker (with --start marker the "
                                  "workload must run `replay-mark start`)")
            if writer is None:
                raise RecordError("record --vm: no stores to RAM were recorded")
            idle = state.idle()
            source = state.source(version, kernel, initrd_meta, argv)
            canonical_json(source)  # the writer's own check, done at its construction when source was not known
            writer.source = source  # known only now (counts, stop reason); the writer reads it at close
            writer.set_vcpu_idle(idle)
            meta = writer.close()
            return VmResult(meta, state.counts, source, state.start_t, state.stop, ctext)
        except BaseException:
            killed.set()
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if writer is not None:
                writer.abort()
            raise
        finally:
            bar.close()
            errf.close()


@dataclass
class _Stream:
    """The recorder's state while records arrive: markers, idle intervals, filters, limits."""

    opts: VmOptions
    pages: int
    console: str
    counts: Counts = field(default_factory=Counts)
    start_t: int | None = None
    end_t: int | None = None
    stop: str | None = None
    stopped_by_marker: bool = False
    rows: int = 0
    last_t: int = 0
    guest_ns: int = 0
    shared: list[tuple[int, int]] | None = None
    shared_from: str = "none"
    halted_at: dict[int, int] = field(default_factory=dict)
    idle_iv: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.epoch = EpochFilter(self.opts.epoch_ns, self.pages) if self.opts.epoch_ns else None
        if self.opts.start == "boot":
            self.start_t = 0

    def shared_gfns(self) -> list[list[int]]:
        if self.shared is None:
            ranges = [(a, b) for a, b in self.opts.shared]
            self.shared_from = "--shared" if ranges else "none"
            if self.opts.shared_swiotlb:
                text = Path(self.console).read_bytes() if os.path.exists(self.console) else b""
                m = SWIOTLB_RE.search(text)
                if m is None:
                    raise RecordError("record --vm: --shared-swiotlb: the guest reported no swiotlb region "
                                      f"(console: {_tail(text.decode('utf-8', 'replace'))})")
                lo, hi = int(m.group(1), 16), int(m.group(2), 16)  # the kernel prints [start, start + size]
                ranges.append((lo, min(hi, self.opts.memory)))
                self.shared_from = "swiotlb" + (" and --shared" if self.opts.shared else "")
            gfns = sorted((a // PAGE, (b - 1) // PAGE) for a, b in ranges)
            merged: list[list[int]] = []
            for a, b in gfns:
                if merged and a <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            self.shared = [tuple(x) for x in merged]
        return [list(x) for x in self.shared]

    def feed(self, recs: np.ndarray):
        """Take a block of plugin records; return the trace rows to write (t, vcpu, gpa, len, op) or None."""
        self.counts.records += len(recs)
        if not len(recs):
            return None
        kind = recs["info"] & 0xFF
        self.guest_ns = int(recs["t"][-1]) - (self.start_t or 0)
        ctl = np.flatnonzero((kind != K_STORE) & (kind != K_IO) & (kind != K_NOADDR))
        # Control records split the block: stores before a START are not part of the trace.
        out = []
        lo = 0
        for i in list(ctl) + [len(recs)]:
            if self.start_t is not None and self.stop is None and self.end_t is None:
                part = self._stores(recs[lo:i], kind[lo:i])
                if part is not None:
                    out.append(part)
            if i == len(recs) or self.stop is not None:
                break
            self._control(recs[i], int(kind[i]))
            lo = i + 1
        if not out:
            return None
        return tuple(np.concatenate([p[j] for p in out]) for j in range(5))

    def _control(self, rec, kind: int) -> None:
        t, v = int(rec["t"]), int(rec["vcpu"])
        if kind == K_START and self.start_t is None:
            self.start_t = t
        elif kind == K_STOP and self.start_t is not None and self.end_t is None:
            self.end_t = t
            self.stopped_by_marker = True
        elif kind == K_HALT:
            self.counts.halts += 1
            self.halted_at[v] = t
        elif kind == K_RESUME and v in self.halted_at:
            a = self.halted_at.pop(v)
            if self.start_t is not None:
                self.idle_iv.setdefault(v, []).extend([max(a, self.start_t) - self.start_t, t - self.start_t])

    def _stores(self, recs: np.ndarray, kind: np.ndarray):
        if not len(recs):
            return None
        self.counts.io += int((kind == K_IO).sum())
        self.counts.noaddr += int((kind == K_NOADDR).sum())
        st = recs[kind == K_STORE]
        if not len(st):
            return None
        addr = st["addr"]
        ln = (st["info"] >> 8).astype(np.uint64)
        end = addr + ln
        vga = (addr < VGA[1]) & (end > VGA[0])
        rom = (addr < ROM[1]) & (end > ROM[0]) & ~vga
        beyond = end > np.uint64(self.opts.memory)
        ram = ~(vga | rom | beyond)
        self.counts.vga += int(vga.sum())
        self.counts.rom += int(rom.sum())
        self.counts.beyond_ram += int(beyond.sum())
        st, ln = st[ram], ln[ram]
        t = st["t"] - np.uint64(self.start_t)
        if self.opts.max_time_ns is not None and len(t) and int(t[-1]) >= self.opts.max_time_ns:
            cut = int(np.searchsorted(t, np.uint64(self.opts.max_time_ns)))
            st, ln, t = st[:cut], ln[:cut], t[:cut]
            self.stop = "time limit"
        if self.epoch is not None and len(t):
            keep = self.epoch.keep(t, (st["addr"] >> np.uint64(12)))
            self.counts.dropped_epoch += int(len(t) - keep.sum())
            st, ln, t = st[keep], ln[keep], t[keep]
        if self.opts.max_stores is not None and self.rows + len(t) >= self.opts.max_stores:
            cut = self.opts.max_stores - self.rows
            st, ln, t = st[:cut], ln[:cut], t[:cut]
            self.stop = "store limit"
        if not len(t):
            return None
        self.rows += len(t)
        self.last_t = int(t[-1])
        self.counts.ram_stores += len(t)
        self.counts.ram_bytes += int(ln.sum())
        return (t, st["vcpu"].astype(np.uint16), st["addr"], ln.astype(np.uint32),
                np.full(len(t), Op.WRITE, dtype=np.uint8))

    def idle(self) -> list[list[int]]:
        """Per-vCPU idle intervals, clipped to the trace's time span, merged."""
        end = self.last_t + 1
        out = []
        for v in range(self.opts.vcpus):
            iv = self.idle_iv.get(v, [])
            if v in self.halted_at and self.start_t is not None:  # still halted when the recording ended
                iv = iv + [max(self.halted_at[v], self.start_t) - self.start_t, end]
            clipped = []
            for i in range(0, len(iv), 2):
                a, b = iv[i], min(iv[i + 1], end)
                if a < b:
                    clipped += [a, b]
            out.append(_merge(clipped))
        return out

    def source(self, version: str, kernel: str, initrd_meta: dict, argv: list[str]) -> dict:
        o = self.opts
        idle_ns = sum(sum(iv[i + 1] - iv[i] for i in range(0, len(iv), 2)) for iv in self.idle())
        return {
            "recorder": "qemu-tcg",
            "qemu": version,
            "argv": list(o.argv),
            "kernel": os.path.basename(kernel),
            "kernel_sha256": hashlib.sha256(Path(kernel).read_bytes()).hexdigest(),
            "append": kernel_args(o),
            "initrd": {"user": os.path.basename(o.initrd) if o.initrd else None, **initrd_meta},
            "disk": os.path.basename(o.disk) if o.disk else None,
            "memory_bytes": o.memory,
            "vcpus": o.vcpus,
            "deterministic": o.deterministic,
            "time": (f"guest ns: instructions << {o.shift} + icount bias (time skipped while halted)"
                     if o.icount and "bias=-1" not in " ".join(argv) else
                     f"instructions << {o.shift} (all vCPUs, one TCG thread; idle time not counted)"),
            "icount_shift": o.shift,
            "start": o.start,
            "start_guest_ns": self.start_t,
            "stop": self.stop,
            "epoch_ns": o.epoch_ns,
            "epoch": ("first write of each page per epoch kept" if o.epoch_ns else "every store kept"),
            "max_stores": o.max_stores,
            "max_time_ns": o.max_time_ns,
            "coalesced": "consecutive stores of one vCPU within 1024 ns extending or repeating one page's bytes",
            "counts": self.counts.to_json(),
            "idle_ns": idle_ns,
            "pages": {"default": "private", "shared_from": self.shared_from,
                      "shared_ranges": [list(x) for x in (self.shared or [])]},
            "value": "row index (WRITE)",
        }
