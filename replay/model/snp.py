"""SEV-SNP constants shared by both page engines, the driver and the reports.

Values follow Linux (arch/x86/include/asm/sev.h, sev-common.h) where Linux defines them; see
../shared/reference/snp-semantics.md section 1 for sources. The Cython engine declares the same numbers
in cext/_engine.pxd; tests/test_engine_api.py checks that the two agree.
"""

from __future__ import annotations

import enum

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGES_PER_2M = 512
VMPLS = 4


class Op(enum.IntEnum):
    """Trace ``op`` column."""

    WRITE = 0
    READ = 1
    TO_SHARED = 2
    TO_PRIVATE = 3


class Perm(enum.IntFlag):
    """Per-VMPL RMP permission mask bits (VMPL0 always has all of them)."""

    READ = 1
    WRITE = 2
    USER_EXEC = 4
    SUPERVISOR_EXEC = 8
    ALL = 15


class Rc(enum.IntEnum):
    """Return codes of RMPUPDATE / PVALIDATE / RMPADJUST / PSMASH."""

    SUCCESS = 0
    FAIL_INPUT = 1
    FAIL_PERMISSION = 2  # RMPADJUST: insufficient VMPL permission; RMPUPDATE: immutable entry
    FAIL_INUSE = 3  # PSMASH on an entry that is not a 2M head / in use
    FAIL_OVERLAP = 4  # RMPUPDATE: 4K/2M overlap
    FAIL_SIZEMISMATCH = 6  # PVALIDATE/RMPADJUST 2M on a 4K entry
    FAIL_NOUPDATE = 255  # PVALIDATE: already in the requested state (CF=1): double validation
    NESTED_PF = 0x100  # not an instruction return code: the instruction took a nested #PF


class Fault(enum.IntEnum):
    """What an access (guest or host) ends in. NONE is success; USERFAULT is post-copy, not a fault."""

    NONE = 0
    NPF_GPA_MISMATCH = 1  # private access, entry.gpa != gpa
    NPF_NOT_ASSIGNED = 2  # private access to an unassigned (hypervisor) page
    NPF_ASID = 3  # private access, entry belongs to another ASID
    NPF_IMMUTABLE = 4  # private access to an immutable entry
    NPF_SIZE = 5  # page-size mismatch
    VC_NOT_VALIDATED = 6  # private access to an assigned but not validated page (#VC)
    NPF_VMPL = 7  # the VMPL's permission mask lacks the access
    NPF_SHARED_ASSIGNED = 8  # shared access to a guest-assigned page
    HOST_RMP_PF = 9  # host write to an assigned page (RMP #PF; SIGBUS for a host process)
    USERFAULT = 10  # post-copy: the target does not hold the page yet

    @property
    def key(self) -> str:
        """The name used in run records (``faults`` by kind)."""
        return self.name.lower()


FAULT_KINDS = [f for f in Fault if f not in (Fault.NONE, Fault.USERFAULT)]


class Access(enum.IntEnum):
    """Kind of access checked against the VMPL permission mask (a subset of Perm)."""

    READ = 1
    WRITE = 2
