"""Re-record the traces listed in MANIFEST.json and rewrite their digests, sizes and event counts.

Run from the repository root: ``PYTHONPATH=. python traces/regenerate.py [NAME...]``. Each entry's
``record_args`` are passed to ``replay record`` and ``argv`` is the program; its stdout goes to
/dev/null. The digests of lackey recordings depend on valgrind's version and on the environment's size
(argv and environ sit on the program's initial stack); those of whole-VM recordings (``--vm``) on QEMU's
version, the guest kernel and busybox. A re-recording elsewhere may differ: the manifest pins the files.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "traces" / "MANIFEST.json"


def main(names: list[str]) -> int:
    from replay.core.records import write_atomic
    from replay.traces.format import read_meta

    manifest = json.loads(MANIFEST.read_text())
    for entry in manifest["traces"]:
        if names and entry["name"] not in names:
            continue
        cmd = [sys.executable, "-m", "replay.cli", "record", "--out", entry["file"], "--no-progress",
               *entry["record_args"], "--", *entry["argv"]]
        print("+", " ".join(cmd[2:]), file=sys.stderr)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=True)
        os.chmod(ROOT / entry["file"], 0o644)  # the writer's temporary file was private
        meta = read_meta(ROOT / entry["file"])
        # What recorded it: valgrind's version (lackey), or QEMU's and the guest kernel's (record --vm).
        tool = ({"valgrind": meta.source["valgrind"]} if "valgrind" in meta.source else
                {"qemu": meta.source["qemu"], "kernel": meta.source["kernel"]})
        entry.update(digest=meta.digest, events=meta.events, guest_bytes=meta.guest_bytes, vcpus=meta.vcpus,
                     file_bytes=(ROOT / entry["file"]).stat().st_size, **tool,
                     command="replay record --out {} {} -- {} > /dev/null".format(
                         entry["file"], shlex.join(entry["record_args"]), shlex.join(entry["argv"])))
    write_atomic(MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    os.chmod(MANIFEST, 0o644)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
