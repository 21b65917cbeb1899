"""Whole-VM recording (`replay record --vm`, replay.traces.vm): a guest program whose writes are known,
reproducibility, the errors, and the pieces (initramfs archive, epoch filter, idle intervals).

The recordings boot a real guest under QEMU TCG (5-15 s each on 2 cores): they need qemu-system-x86,
busybox-static, a kernel in /boot and gcc with static glibc, which .ci/run installs.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from replay.cli import main
from replay.core.errors import RecordError, UsageError
from replay.traces.format import compute_digest, open_trace, read_meta
from replay.traces.vm import Cpio, EpochFilter, VmOptions, _merge, _Stream, build_initrd, find_busybox

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


def columns(path):
    cols = {k: [] for k in ("t_ns", "vcpu", "gpa", "len", "op", "value")}
    with open_trace(path) as r:
        for _, b in r:
            for k in cols:
                cols[k].append(b.column(k).to_numpy())
    return {k: np.concatenate(v) for k, v in cols.items()}


@pytest.fixture(scope="module")
def vm_writer(tmp_path_factory):
    """tests/data/vm_writer.c, built static (it runs in a guest with no libc)."""
    out = tmp_path_factory.mktemp("vmw") / "vm_writer"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(out), str(DATA / "vm_writer.c")], check=True)
    return out


@pytest.fixture(scope="module")
def writer_trace(vm_writer, tmp_path_factory):
    d = tmp_path_factory.mktemp("vmrec")
    out, con = d / "w.arrow", d / "console.txt"
    # --shared-swiotlb with a small (8 MiB) bounce buffer: its pages are classed shared.
    rc = main(["record", "--vm", "--out", str(out), "--no-progress", "--start", "marker", "--memory", "128MiB",
               "--shared-swiotlb", "--append", "swiotlb=4096", "--add", str(vm_writer), "--console", str(con), "--", "vm_writer", "24", "500000"])
    assert rc == 0
    return out, con.read_text(errors="replace")


# ------------------------------------------------------------------------------------------------
# Real recordings


@pytest.mark.slow
def test_known_buffer_pages_at_known_times(writer_trace):
    """vm_writer fills page i of its buffer at guest time i x 0.5 ms after its start marker; it printed the
    frames of its pages from /proc/self/pagemap: each of those pages is first written at that time."""
    out, console = writer_trace
    pfns = [int(p) for p in re.findall(r"vm_writer: page \d+ pfn (\d+)", console)]
    assert len(pfns) == 24 and len(set(pfns)) == 24 and "vm_writer: done" in console
    c = columns(out)
    page = c["gpa"] >> 12
    assert (c["op"] == 0).all() and (c["vcpu"] == 0).all()
    for i, pfn in enumerate(pfns):
        assert not any(a <= pfn <= b for a, b in read_meta(out).shared_ranges)  # the buffer is private
        on = page == pfn
        t = c["t_ns"][on]
        assert on.any(), f"page {i} (pfn {pfn}) never written"
        expected = i * 500_000
        # The busy-wait reads the guest clock: the fill starts within a few us of its time.
        assert expected <= int(t[0]) < expected + 20_000, (i, int(t[0]))
        assert int(c["len"][on].sum()) >= 4096  # the whole page, in one or a few coalesced rows
        assert int(t[-1]) < expected + 20_000  # and nothing writes it later
    meta = read_meta(out)
    assert meta.source["start"] == "marker" and meta.source["stop"] == "command exited"
    assert int(c["t_ns"][-1]) < 24 * 500_000 + 50_000  # the stop marker ends the recording


@pytest.mark.slow
def test_vm_trace_passes_verify(writer_trace, capsys):
    out, _ = writer_trace
    assert main(["verify", str(out)]) == 0
    meta = read_meta(out)
    assert meta.version == 3 and meta.vcpus == 1 and meta.guest_bytes == 128 << 20
    assert meta.source["recorder"] == "qemu-tcg" and meta.source["deterministic"] is True
    pages = meta.source["pages"]
    assert pages["default"] == "private" and pages["shared_from"] == "swiotlb"
    assert len(meta.shared_ranges) == 1
    first, last = meta.shared_ranges[0]
    assert last - first + 1 == (8 << 20) // 4096 and pages["shared_ranges"] == [[first, last]]


@pytest.mark.slow
def test_same_command_same_digest_and_idle(tmp_path):
    """Two recordings of one command are identical; its sleep shows as idle time (HLT to wake-up)."""
    digests = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.arrow"
        assert main(["record", "--vm", "--out", str(out), "--no-progress", "--memory", "96MiB", "--epoch", "100us",
                     "--", "sh", "-c", "sleep 0.03; echo hello > /tmp/x; cat /tmp/x"]) == 0
        digests.append(read_meta(out).digest)
        assert compute_digest(out) == digests[-1]
    assert digests[0] == digests[1]
    meta = read_meta(tmp_path / "a.arrow")
    idle = meta.vcpu_idle[0]
    total = sum(idle[i + 1] - idle[i] for i in range(0, len(idle), 2))
    assert 25_000_000 < total < 40_000_000, total  # the 30 ms sleep, in ticks
    assert meta.source["epoch_ns"] == 100_000 and meta.source["counts"]["dropped_epoch"] > 0
    # --epoch: no page twice within one 100 us epoch
    c = columns(tmp_path / "a.arrow")
    key = (c["t_ns"] // 100_000) * (1 << 40) + (c["gpa"] >> 12)
    assert len(np.unique(key)) == len(key)


@pytest.mark.slow
def test_command_failing_in_guest(tmp_path, capsys):
    out = tmp_path / "f.arrow"
    assert main(["record", "--vm", "--out", str(out), "--no-progress", "--memory", "96MiB",
                 "--", "sh", "-c", "echo oops-in-guest; exit 3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "failed in the guest with exit status 3" in err and "oops-in-guest" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_guest_that_does_not_boot(tmp_path, capsys):
    out = tmp_path / "n.arrow"
    # A later rdinit= wins: the kernel finds no init and panics (then reboots, which ends QEMU).
    assert main(["record", "--vm", "--out", str(out), "--no-progress", "--memory", "96MiB",
                 "--append", "rdinit=/nonexistent", "--", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "did not boot" in err and "panic" in err.lower() and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_store_limit_and_ctrl_c(tmp_path):
    """--max-stores ends a recording early with exactly that many rows; SIGINT leaves nothing behind."""
    out = tmp_path / "l.arrow"
    assert main(["record", "--vm", "--out", str(out), "--no-progress", "--memory", "96MiB", "--max-stores", "5000",
                 "--", "sh", "-c", "while true; do echo x > /tmp/y; done"]) == 0
    meta = read_meta(out)
    assert meta.events == 5000 and meta.source["stop"] == "store limit"
    out.unlink()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "replay.cli", "record", "--vm", "--out", str(out), "--no-progress",
                          "--memory", "96MiB", "--", "sh", "-c", "while true; do echo x > /tmp/y; done"],
                         env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(".l.arrow." in f.name and "pass1" in f.name for f in tmp_path.iterdir()):
        time.sleep(0.2)  # wait until rows are being written
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=60) == 130
    time.sleep(0.5)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Errors that need no guest


def test_missing_qemu_is_one_line(tmp_path, capsys):
    out = tmp_path / "q.arrow"
    assert main(["record", "--vm", "--out", str(out), "--qemu", "/nonexistent/qemu", "--", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not found" in err and "apt-get install qemu-system-x86" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_missing_kernel_and_files(tmp_path, capsys):
    out = tmp_path / "k.arrow"
    assert main(["record", "--vm", "--out", str(out), "--kernel", str(tmp_path / "nope"), "--", "true"]) == 2
    assert "kernel" in capsys.readouterr().err
    assert main(["record", "--vm", "--out", str(out), "--add", str(tmp_path / "nope"), "--", "true"]) == 2
    assert "--add" in capsys.readouterr().err
    assert main(["record", "--vm", "--out", str(out), "--memory", "1MiB", "--", "true"]) == 2
    assert "--memory" in capsys.readouterr().err
    assert main(["record", "--vm", "--out", str(out), "--shared", "5-1", "--", "true"]) == 2
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# The pieces


def test_initramfs_is_byte_identical_and_well_formed(tmp_path):
    opts = VmOptions(argv=("echo", "a b"))
    mark = tmp_path / "mark"
    mark.write_bytes(b"\x7fELF-not-really")
    a, meta = build_initrd(opts, find_busybox(None), mark)
    b, _ = build_initrd(opts, find_busybox(None), mark)
    assert a == b and meta["sha256"]
    raw = gzip.decompress(a)
    assert raw.startswith(b"070701") and b"TRAILER!!!" in raw and len(raw) % 512 == 0
    assert b"snp-replay/init" in raw and b"echo 'a b'\n" in raw
    if shutil.which("cpio"):
        listing = subprocess.run(["cpio", "-t"], input=raw, capture_output=True, check=True).stdout.decode().split()
        assert "snp-replay/bin/busybox" in listing and "snp-replay/cmd" in listing


def test_cpio_entry_layout():
    c = Cpio()
    c.file("a/b", b"xyz", 0o644)
    raw = c.finish()
    assert raw[:6] == b"070701" and b"a\0" in raw and b"a/b\0" in raw and b"xyz" in raw


def test_epoch_filter_keeps_first_write_per_page_per_epoch():
    f = EpochFilter(100, 16)
    t = np.array([0, 10, 20, 99, 100, 150, 250, 260], dtype=np.uint64)
    p = np.array([1, 1, 2, 1, 1, 1, 2, 2], dtype=np.uint64)
    assert f.keep(t, p).tolist() == [True, False, True, False, True, False, True, False]
    # the state carries over between blocks of the same epoch
    assert f.keep(np.array([270, 301], dtype=np.uint64), np.array([2, 2], dtype=np.uint64)).tolist() == [False, True]


def test_idle_intervals_merge_and_clip():
    assert _merge([0, 5, 5, 9, 12, 12, 20, 30]) == [0, 9, 20, 30]
    s = _Stream(VmOptions(argv=("true",), vcpus=2), 1024, "/nonexistent")
    s.start_t, s.last_t = 1000, 500
    s.idle_iv = {0: [0, 100, 100, 200, 400, 900]}
    s.halted_at = {1: 1300}
    assert s.idle() == [[0, 200, 400, 501], [300, 501]]


def test_bad_options():
    with pytest.raises(UsageError):
        VmOptions(argv=())
    with pytest.raises(UsageError):
        VmOptions(argv=("x",), start="boot", shared_swiotlb=True)
    with pytest.raises(UsageError):
        VmOptions(argv=("x",), shared=((0, 1 << 40),))
    with pytest.raises(RecordError):
        find_busybox("/bin/sh")  # dynamically linked


# ------------------------------------------------------------------------------------------------
# The shipped whole-VM trace and its scenario


def test_shipped_vm_trace_and_scenario(tmp_path, capsys):
    """traces/vm-busybox.arrow: a deterministic 1-vCPU recording with idle intervals; scenarios/vm-busybox
    replays it under both strategies, and the migration (from 100 ms) ends before the guest's work does."""
    import json

    meta = read_meta(ROOT / "traces" / "vm-busybox.arrow")
    assert meta.source["recorder"] == "qemu-tcg" and meta.source["deterministic"] is True
    assert meta.version == 2 and meta.source["epoch_ns"] == 1_000_000
    assert main(["compare", str(ROOT / "scenarios" / "vm-busybox.toml"), "--out", str(tmp_path / "cmp"),
                 "--no-progress"]) == 0
    with open_trace(ROOT / "traces" / "vm-busybox.arrow") as r:
        from replay.traces.format import last_t_ns

        end = last_t_ns(r)
    for strategy in ("mirror-vm", "shadow-vcpu"):
        summary = json.loads((tmp_path / "cmp" / strategy / "summary.json").read_text())
        assert summary["status"] == "completed", (strategy, summary["status_reason"])
        assert 100_000_000 + summary["metrics"]["total_ns"] < end  # the guest keeps working after the migration
    assert "completed" in capsys.readouterr().out


@pytest.mark.slow
def test_disk_image_is_the_commands_root(tmp_path):
    """--disk: the command runs chrooted into the user's disk image (read-only: a snapshot takes writes)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "data.txt").write_text("hello from the disk\n")
    img = tmp_path / "disk.img"
    subprocess.run(["mke2fs", "-q", "-t", "ext2", "-d", str(root), str(img), "8M"], check=True,
                   env=dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"))
    before = img.read_bytes()
    out, con = tmp_path / "d.arrow", tmp_path / "console.txt"
    assert main(["record", "--vm", "--out", str(out), "--no-progress", "--memory", "96MiB", "--disk", str(img),
                 "--console", str(con), "--", "sh", "-c", "cat /data.txt; echo changed > /data.txt"]) == 0
    assert "hello from the disk" in con.read_text(errors="replace")
    assert img.read_bytes() == before
    source = read_meta(out).source
    assert source["disk"] == "disk.img" and source["deterministic"] is False


def test_no_compiler_says_what_to_install(tmp_path, monkeypatch):
    """Without a prebuilt plugin and without a C compiler, one line says what to install."""
    import replay.traces.qemu_plugin as qp
    import replay.traces.vm as vr

    monkeypatch.setenv("SNP_REPLAY_CACHE", str(tmp_path))
    monkeypatch.setattr(qp, "tag", lambda name: "0" * 16)  # matches no prebuilt stamp, no cached build
    monkeypatch.setattr(qp, "compiler", lambda: None)
    with pytest.raises(RecordError, match=r"no C compiler; install a C compiler with `apt-get install gcc`"):
        vr.build_plugin()
