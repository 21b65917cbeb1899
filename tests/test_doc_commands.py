"""Docs are tests: every command line the documentation shows runs, and exits as the docs say.

The commands are extracted from README.md, docs/*.md (shell code blocks, and inline code that names a
`replay` subcommand or a `tools/` script with arguments) and the comments of the shipped scenarios
(scenarios/**/*.toml). ``SESSIONS`` says, per document, how each one runs and the exit status expected;
a command in the docs without an entry here (or an entry no longer in the docs) fails
``test_every_doc_command_has_an_entry``, so the two cannot drift apart.

Each document is one session, its commands run in order by bash in a fresh directory holding copies of
the shipped inputs (scenarios/, traces/, the CSV the import example reads, files for gzip to compress),
with `replay` and `tools/` of this checkout and a private trace cache: a later command uses what an
earlier one wrote, as a reader following the page would. How each entry runs:

- ``RUN``: exactly as shown.
- ``RUN_AS(argv, why)``: with a change the entry explains (an installation step left out, a placeholder
  such as SCHEDULER filled in, a campaign shortened).
- ``SYNOPSIS``: argument syntax with placeholders (``replay report DIR``); checked against the command's
  --help (the command exists, and so does every option the synopsis names).
- ``NOT_RUN(why)``: only the test suite's own command (running it here would run this test again).

The long-running entries (valgrind recordings, the benchmarks, the cluster sweep) are in sessions marked
slow; they run in CI.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STARTS = ("replay ", "tools/", "pip ", "python ", "dask ")
SUBCOMMANDS = ("gen", "inspect", "record", "import", "run", "compare", "sweep", "diff", "report",
               "adversary-matrix", "verify")


# ------------------------------------------------------------------------------------------ extraction

def _strip_comment(line: str) -> str:
    m = re.search(r"\s+#\s", line)  # a shell comment (the docs quote no '#' inside a command)
    return line[:m.start()] if m else line


def _inline(text: str) -> bool:
    """Inline code that is a command line: `replay SUB ARG...` or `tools/X ARG...` (not a bare name)."""
    words = text.split()
    if words[0] == "replay":
        return len(words) >= 3 and words[1] in SUBCOMMANDS
    return words[0].startswith("tools/") and len(words) >= 2


def extract() -> list[tuple[str, int, str]]:
    """(document, line, command) for every command line the docs show, in document order."""
    out: list[tuple[str, int, str]] = []
    for f in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        lines = f.read_text().splitlines()
        fence = None
        i = 0
        while i < len(lines):
            s = lines[i].strip()
            if s.startswith("```"):
                fence = None if fence is not None else s[3:].strip()
            elif fence is not None:
                # A plain fence may hold a diagram ("replay run / compare (replay/migration/ driver...)"):
                # there, only lines that read as a command line count.
                plain = fence not in ("sh", "bash", "shell", "console")
                if s.startswith(STARTS) and not (plain and (not _inline(s) or "(" in s)):
                    cmd, first = _strip_comment(s), i
                    while cmd.endswith("\\"):
                        i += 1
                        cmd = cmd[:-1].rstrip() + " " + _strip_comment(lines[i].strip())
                    out.append((f.relative_to(REPO).as_posix(), first + 1, " ".join(cmd.split())))
            else:
                out += [(f.relative_to(REPO).as_posix(), i + 1, " ".join(m.group(1).split()))
                        for m in re.finditer(r"`((?:replay|tools/)[^`]*)`", lines[i]) if _inline(m.group(1))]
            i += 1
    for f in sorted((REPO / "scenarios").rglob("*.toml")):
        lines = f.read_text().splitlines()
        i = 0
        while i < len(lines):
            s = lines[i].strip()
            body = s[1:].strip() if s.startswith("#") else ""
            if body.startswith(STARTS):
                cmd, first = _strip_comment(body), i
                while cmd.endswith("\\"):
                    i += 1
                    cmd = cmd[:-1].rstrip() + " " + _strip_comment(lines[i].strip().lstrip("#").strip())
                out.append((f.relative_to(REPO).as_posix(), first + 1, " ".join(cmd.split())))
            else:
                out += [(f.relative_to(REPO).as_posix(), i + 1, " ".join(m.group(1).split()))
                        for m in re.finditer(r"`((?:replay|tools/)[^`]*)`", lines[i]) if _inline(m.group(1))]
            i += 1
    return out


# ------------------------------------------------------------------------------------------ the table

@dataclass(frozen=True)
class How:
    kind: str  # "run", "run-as", "synopsis", "not-run", "background"
    rc: int | None = 0  # the exit status the docs promise (None: a background service, stopped at the end)
    argv: str = ""  # run-as / background: the command line actually run
    why: str = ""


def RUN(rc: int = 0) -> How:
    return How("run", rc)


def RUN_AS(argv: str, why: str, rc: int = 0) -> How:
    return How("run-as", rc, argv, why)


def BACKGROUND(argv: str, why: str) -> How:
    return How("background", None, argv, why)


SYNOPSIS = How("synopsis")


def NOT_RUN(why: str) -> How:
    return How("not-run", None, "", why)


FUZZ_WHY = ("50,000 cases take ~20 min on 2 cores; 200 cases run the same campaign code, and --save writes "
            "only failing cases (the corpus file is compared before and after: none may appear)")
CLUSTER_WHY = ("a free port instead of 8786 (parallel test runs), and the CI sweep instead of the 960 runs "
               "of 16 GiB guests (~3 core-hours); the cluster sweep file itself passes every up-front check "
               "in test_the_cluster_sweep_file_is_valid")

# document -> [(command as the docs show it, how it runs)], in document order.
SESSIONS: dict[str, list[tuple[str, How]]] = {
    "README.md": [
        ("pip install . && replay compare scenarios/quickstart.toml --out runs/quickstart",
         RUN_AS("replay compare scenarios/quickstart.toml --out runs/quickstart",
                "installing is CI's first step (.ci/run); the checkout under test is already importable")),
        ("pip install -e '.[test]' && python -m pytest",
         NOT_RUN("the test suite itself (this test is part of it); CI runs exactly this line")),
        ("replay gen hotcold --out t.arrow --guest-size 4GiB --vcpus 4 --events 10000000 --seed 1 --fill", RUN()),
        ("replay inspect t.arrow", RUN()),
        ("replay record --out prog.arrow -- gzip -c somefile", RUN()),
        ("replay record --vm --out vm.arrow --epoch 1ms -- sh -c 'gzip -9 -c /snp-replay/bin/busybox | md5sum'", RUN()),
        ("replay compare scenarios/vm-busybox.toml --out runs/vm", RUN()),
        ("replay import csv accesses.csv --out t.arrow --columns t_ns=ts,gpa=addr", RUN()),
        ("replay run scenarios/webserver-16g.toml --out runs/web --strategy shadow-vcpu --set migration.mode=postcopy",
         RUN()),
        ("replay compare scenarios/database-8g.toml --out runs/db", RUN()),
        ("replay compare scenarios/quickstart.toml --out runs/qd --data", RUN()),
        ("tools/diff runs/db/mirror-vm runs/db/shadow-vcpu", RUN(0)),  # same end state, the table says 0
        ("replay report runs/db/mirror-vm runs/db/shadow-vcpu --out db.html", RUN()),
        ("replay sweep scenarios/sweeps/mirror-vs-shadow-ci.toml --out runs/sweep", RUN()),
        ("replay report runs/sweep --out sweep.html", RUN()),
        ("replay verify t.arrow runs/db/mirror-vm", RUN(0)),
        ("tools/bench", RUN()),
        ("tools/bench --data", RUN()),
        ("tools/bench --big-only", RUN_AS("tools/bench --big-only --big-sizes 1GiB,4GiB,16GiB --touch 64MiB",
                                           "the same runs 1,024 times smaller (1, 4 and 16 GiB guests, 64 MiB "
                                           "touched): the full sizes take about 15 min of CPU")),
        ("tools/bench --against main", RUN_AS("tools/bench --against HEAD --events 200000 --against-runs 1 "
                                              "--against-rss-guest 1GiB --rss-events 20000",
                                              "the same comparison, smaller: against HEAD (any checkout has it), a "
                                              "200,000-event trace, one run a side, a 1 GiB guest's RSS")),
        ("tools/fuzz -n 50000 --seed 7 --save", RUN_AS("tools/fuzz -n 200 --seed 7 --save", FUZZ_WHY)),
        ("replay record --vm", SYNOPSIS),
    ],
    "docs/how-it-works.md": [
        ("replay gen hotcold --out t.arrow --guest-size 4GiB --vcpus 4 --events 10000000 --seed 1", RUN()),
        ("replay record --out t.arrow -- gzip -c file", RUN()),
        ("replay record --vm --out t.arrow --epoch 1ms -- sh -c 'seq 1 100000 > /tmp/n; sort -r /tmp/n > /tmp/s'", RUN()),
        ("replay import csv accesses.csv --out t.arrow --columns t_ns=ts,gpa=addr", RUN()),
        ("replay inspect t.arrow", RUN()),
        ("replay run scenarios/quickstart.toml --out runs/q1 --strategy shadow-vcpu", RUN()),
        ("replay compare scenarios/quickstart.toml --out runs/q", RUN()),
        ("tools/diff runs/q/mirror-vm runs/q/shadow-vcpu", RUN(0)),
        ("replay report runs/q/mirror-vm runs/q/shadow-vcpu --out q.html", RUN()),
        ("replay sweep scenarios/sweeps/mirror-vs-shadow-ci.toml --out runs/sweep", RUN()),
        ("replay compare scenarios/quickstart.toml --out runs/qd --data", RUN()),
        ("replay adversary-matrix scenarios/adversary/base.toml --out runs/mx", RUN(0)),  # 0: no corrupted run
        ("replay verify t.arrow runs/q/mirror-vm", RUN(0)),
        ("replay report runs/sweep --out sweep.html", RUN()),
        ("replay compare scenarios/quickstart.toml --out runs/qd --data", RUN()),  # again: replaces its own output
        ("tools/bench --data", RUN()),
        ("replay run scenarios/quickstart.toml --out runs/qd1 --data", RUN()),
        ("replay run --adversary KIND@WHEN", SYNOPSIS),
        ("tools/diff A B", SYNOPSIS),
        ("replay report DIR", SYNOPSIS),
    ],
    "docs/recording.md": [
        ("replay record --vm", SYNOPSIS),
        ("replay record --out t.arrow [--no-reads] [--vcpus-from threads|single] [--rate-ns-per-instr N]", SYNOPSIS),
        ("replay record --out t.arrow -- gzip -c f > f.gz", RUN()),
        ("replay record --vm", SYNOPSIS),
        ("replay record --vm --out t.arrow [--memory 256MiB] [--vcpus 1] [--kernel FILE] [--initrd FILE]", SYNOPSIS),
        ("replay import csv|parquet IN --out t.arrow [--columns t_ns=ts,gpa=addr,...] [--guest-size SIZE]", SYNOPSIS),
        ("replay import dirtylog IN --out t.arrow [--columns ...] [--interval-ns 100ms] [--sort]", SYNOPSIS),
    ],
    "docs/threat-model.md": [
        ("replay run --adversary KIND@WHEN", SYNOPSIS),
        ("replay adversary-matrix scenarios/adversary/base.toml --out DIR",
         RUN_AS("replay adversary-matrix scenarios/adversary/base.toml --out runs/mx", "DIR is a placeholder")),
    ],
    "docs/costs.md": [
        ("tools/bench --data", RUN_AS("tools/bench --data --pages 1024",
                                      "the same measurement on fewer pages; the README's session runs it in full")),
        ("replay compare scenarios/quickstart.toml --out runs/rmp4k --set costs.rmpupdate_ns=4000 "
         "--set costs.pvalidate_ns=4000", RUN()),
        ("replay sweep scenarios/sweeps/snp-costs.toml --out runs/snp-costs", RUN()),
        ("replay report runs/snp-costs --out snp-costs.html", RUN()),
    ],
    "scenarios/sweeps/snp-costs.toml": [
        ("replay sweep scenarios/sweeps/snp-costs.toml --out runs/snp-costs", RUN()),
        ("replay report runs/snp-costs --out snp-costs.html", RUN()),
    ],
    "scenarios/vm-busybox.toml": [
        ("replay record --vm", SYNOPSIS),
    ],
    "scenarios/sweeps/mirror-vs-shadow-ci.toml": [
        ("replay sweep scenarios/sweeps/mirror-vs-shadow-ci.toml --out sweep-ci", RUN()),
        ("replay report sweep-ci --out sweep-ci.html", RUN()),
    ],
    "scenarios/sweeps/mirror-vs-shadow-cluster.toml": [
        ("dask scheduler", BACKGROUND("dask scheduler --port {port} --dashboard-address :0", CLUSTER_WHY)),
        ("dask worker tcp://SCHEDULER:8786 --nworkers 16 --nthreads 1 --memory-limit 3GB",
         BACKGROUND("dask worker tcp://127.0.0.1:{port} --nworkers 2 --nthreads 1 --memory-limit 3GB",
                    "2 workers on a 2-core CI machine; " + CLUSTER_WHY)),
        ("replay sweep scenarios/sweeps/mirror-vs-shadow-cluster.toml --out /shared/sweep --scheduler tcp://SCHEDULER:8786",
         RUN_AS("replay sweep scenarios/sweeps/mirror-vs-shadow-ci.toml --out shared/sweep --scheduler "
                "tcp://127.0.0.1:{port}", CLUSTER_WHY)),
        ("replay report /shared/sweep --out /shared/sweep.html",
         RUN_AS("replay report shared/sweep --out shared/sweep.html", "/shared is this test's directory")),
    ],
}
SLOW = {"README.md", "docs/how-it-works.md", "docs/recording.md", "docs/costs.md", "scenarios/sweeps/snp-costs.toml",
        "scenarios/sweeps/mirror-vs-shadow-cluster.toml"}


def test_every_doc_command_has_an_entry():
    """The docs' commands, in order, are exactly the table's; one command run per entry."""
    found: dict[str, list[str]] = {}
    for doc, _, cmd in extract():
        found.setdefault(doc, []).append(cmd)
    assert found == {doc: [cmd for cmd, _ in entries] for doc, entries in SESSIONS.items()}


def test_the_shipped_sweep_comment_writes_its_report_beside_the_sweep():
    """Issue 19: the comment told users to write the report inside the sweep directory (refused: an
    output inside its input). The docs were fixed, not the check."""
    text = (REPO / "scenarios" / "sweeps" / "mirror-vs-shadow-ci.toml").read_text()
    assert "--out sweep-ci/report.html" not in text and "replay report sweep-ci --out sweep-ci.html" in text


# ------------------------------------------------------------------------------------------ running

def _session_dir(tmp: Path) -> dict[str, str]:
    """The shipped inputs copied (never the checkout's own files), the checkout's commands on PATH."""
    shutil.copytree(REPO / "scenarios", tmp / "scenarios")
    shutil.copytree(REPO / "traces", tmp / "traces")
    shutil.copy(REPO / "tests" / "data" / "accesses.csv", tmp / "accesses.csv")
    for name in ("somefile", "file", "f"):  # what the recording examples compress
        (tmp / name).write_bytes(b"snp-replay " * 300)
    (tmp / "tools").symlink_to(REPO / "tools")  # the scripts find the checkout from their own path
    (tmp / "shared").mkdir()
    bindir = tmp / ".bin"
    bindir.mkdir()
    (bindir / "replay").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m replay.cli "$@"\n')
    (bindir / "replay").chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PYTHONPATH": str(REPO), "SNP_REPLAY_CACHE": str(tmp / ".cache")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_synopsis(cmd: str, env: dict, cwd: Path) -> None:
    words = cmd.split()
    argv = words[:2] if words[0] == "replay" else words[:1]
    r = subprocess.run([*argv, "--help"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (cmd, r.stderr)
    for opt in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", cmd):
        assert opt in r.stdout, f"{cmd}: {opt} is not an option of {' '.join(argv)}"


def run_session(doc: str, tmp: Path) -> int:
    env = _session_dir(tmp)
    port = _free_port()
    corpus = REPO / "tests" / "fuzz" / "corpus" / "cases.jsonl"
    corpus_before = corpus.read_bytes()
    services: list[subprocess.Popen] = []
    ran = 0
    try:
        for cmd, how in SESSIONS[doc]:
            if how.kind == "not-run":
                continue
            if how.kind == "synopsis":
                _check_synopsis(cmd, env, tmp)
                ran += 1
                continue
            line = (how.argv or cmd).format(port=port)
            if how.kind == "background":
                services.append(subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=tmp, env=env,
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                _wait_for_port(port) if line.startswith("dask scheduler") else time.sleep(3)
                ran += 1
                continue
            r = subprocess.run(["bash", "-c", line], cwd=tmp, env=env, capture_output=True, text=True,
                               errors="backslashreplace", timeout=1800)  # gzip -c writes binary to stdout
            assert r.returncode == how.rc, f"{doc}: {line}: exit {r.returncode}, docs say {how.rc}\n{r.stderr[-2000:]}"
            assert "Traceback" not in r.stderr, f"{doc}: {line}\n{r.stderr[-2000:]}"
            ran += 1
    finally:
        for p in services:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if corpus.read_bytes() != corpus_before:  # tools/fuzz --save found something: keep the repo clean
            failing = corpus.read_bytes()[len(corpus_before):]
            corpus.write_bytes(corpus_before)
            pytest.fail(f"tools/fuzz --save found failing cases: {failing[:2000]!r}")
    return ran


def _wait_for_port(port: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"dask scheduler did not listen on {port}")


@pytest.mark.parametrize("doc", [pytest.param(d, marks=pytest.mark.slow) if d in SLOW else d for d in SESSIONS])
def test_doc_commands_run_and_exit_as_documented(doc, tmp_path, record_property):
    ran = run_session(doc, tmp_path)
    expected = sum(1 for _, how in SESSIONS[doc] if how.kind != "not-run")
    assert ran == expected
    record_property("doc_commands_run", ran)
    print(f"{doc}: ran {ran} of {len(SESSIONS[doc])} documented commands")


def test_the_cluster_sweep_file_is_valid(tmp_path, capsys):
    """The cluster sweep (not run: 960 runs of 16 GiB guests) passes every check made before a cluster is
    reached: its file, its 960 points, its --out; then the unreachable placeholder scheduler is one line."""
    from replay.cli import main
    from replay.sweeps.sweep import load_sweep, points

    sweep = load_sweep(REPO / "scenarios" / "sweeps" / "mirror-vs-shadow-cluster.toml")
    assert len(points(sweep)) == 960
    assert main(["sweep", str(REPO / "scenarios" / "sweeps" / "mirror-vs-shadow-cluster.toml"), "--out",
                 str(tmp_path / "sweep"), "--scheduler", f"tcp://127.0.0.1:{_free_port()}"]) == 2
    assert "cannot reach a Dask scheduler" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_doc_command_count():
    """How many documented commands the doc sessions run (CI's log shows it): every one but the test
    suite's own line."""
    total = sum(len(v) for v in SESSIONS.values())
    run = sum(1 for v in SESSIONS.values() for _, how in v if how.kind != "not-run")
    print(f"documented commands: {total}; run by test_doc_commands_run_and_exit_as_documented: {run}")
    assert run == total - 1
