"""The command line's adversary grammar: ``--adversary KIND[@WHEN][,KEY=VALUE...]`` and ``--kinds``.

One action per ``--adversary``: exactly one KIND, at most one WHEN (a virtual time such as ``30ms``, or a
packet ``STREAM:SEQUENCE``; none: the first chance after the migration starts), then options, each a key
of ``[[adversary]]`` other than those the head already gives (``kind``, ``at_ns``, ``stream``,
``sequence``), each at most once. Anything else is refused with one line naming the part that is wrong:
``flip@30ms,kind=drop`` (a key overriding the head), ``flip@`` (an empty time), ``flip@1ms@2ms``,
``flip,where=header,where=payload``, an empty item (``flip,,where=header``). The values are checked by
the scenario loader's key rules, as in a scenario file; a time given in the head accepts the same units.

``parse_kinds`` is the same strictness for comma-separated lists (``adversary-matrix --kinds``): no empty
item, no repeat, only known names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..core.errors import ScenarioError, UsageError
from ..core.validate import short

# Keys the head (KIND@WHEN) sets: an option may not set them again.
HEAD_KEYS = ("kind", "at_ns", "stream", "sequence")
_INT = re.compile(r"[0-9]{1,20}")


def parse_adversary(text: str):
    """An ``AdversarySpec`` from one ``--adversary`` value (see the module docstring); ScenarioError, one
    line naming the value and the part that is wrong, otherwise."""
    from dataclasses import fields

    from .spec import ADVERSARY_KINDS, AdversarySpec, build_section, hint, parse_value, check_adversary

    where = f"--adversary {short(text)}"
    if not isinstance(text, str) or text.strip() == "":
        raise ScenarioError(f"{where}: empty (expected KIND[@WHEN][,key=value...], e.g. flip@30ms)")
    head, *options = text.split(",")
    kind, at, when = head.strip().partition("@")
    kind = kind.strip()
    if not kind:
        raise ScenarioError(f"{where}: no kind before {'@' if at else 'the options'} (expected KIND[@WHEN])")
    if kind not in ADVERSARY_KINDS:  # named once, shortly: the value and the list of kinds fit one line
        raise ScenarioError(f"--adversary: unknown kind {short(kind, 40)} (one of "
                            f"{', '.join(ADVERSARY_KINDS)}){hint(kind, ADVERSARY_KINDS)}")
    table: dict[str, Any] = {"kind": kind}
    if at:
        when = when.strip()
        if not when:
            raise ScenarioError(f"{where}: nothing after '@' (a time such as 30ms, or a packet stream:sequence)")
        if "@" in when:
            raise ScenarioError(f"{where}: one time per action (one '@')")
        if ":" in when:
            stream, _, seq = when.partition(":")
            if not (_INT.fullmatch(stream) and _INT.fullmatch(seq)):
                raise ScenarioError(f"{where}: a packet is stream:sequence, two integers of at most 20 digits")
            table["stream"], table["sequence"] = int(stream), int(seq)
        else:
            table["at_ns"] = when
    names = [f.name for f in fields(AdversarySpec)]
    for item in options:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not item.strip():
            raise ScenarioError(f"{where}: empty option (expected key=value after each comma)")
        if not sep:
            raise ScenarioError(f"{where}: expected key=value after the comma, got {short(item)}")
        if key in HEAD_KEYS:
            raise ScenarioError(f"{where}: {key!r} is not an option: the kind and the time (or packet) are given "
                                f"once, before the options, as KIND@WHEN")
        if key not in names:
            options_ = [n for n in names if n not in HEAD_KEYS]
            raise ScenarioError(f"{where}: unknown option {short(key, 40)} (one of {', '.join(options_)})"
                                f"{hint(key, options_)}")
        if key in table:
            raise ScenarioError(f"{where}: option {key!r} given twice")
        try:
            table[key] = parse_value(value.strip())
        except ScenarioError as exc:
            raise ScenarioError(f"{where}: {key}: {exc}") from None
    a = build_section(AdversarySpec, table, "adversary", "--adversary", short(text))
    check_adversary(a, where)
    return a


def parse_kinds(text: str, choices: Sequence[str], what: str) -> list[str]:
    """A comma-separated list of names from ``choices``: no empty item, no repeat (UsageError)."""
    from .spec import hint

    items = [x.strip() for x in text.split(",")]
    if not any(items):
        raise UsageError(f"--{what}: empty list (one or more of {', '.join(choices)})")
    seen: set[str] = set()
    for i, x in enumerate(items):
        if not x:
            raise UsageError(f"--{what} {short(text)}: empty item at position {i + 1}")
        if x not in choices:
            raise UsageError(f"--{what}: {short(x)} is not one of {', '.join(choices)}{hint(x, choices)}")
        if x in seen:
            raise UsageError(f"--{what}: {x!r} given twice")
        seen.add(x)
    return items
