"""Parsing of human-friendly sizes and durations ("4GiB", "10Gbit", "500ms") into integers."""

from __future__ import annotations

import re

from .errors import UsageError
from .validate import short

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
_TIME_UNITS = {"ns": 1, "us": 1000, "ms": 1000**2, "s": 1000**3}
_NUM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


# Digits a number may have (each side of the point): every quantity fits in 64 bits (20 digits), and a
# longer literal would only reach Python's int-conversion limit (4,300 digits) or waste time.
MAX_DIGITS = 40


def _split(text: str, what: str) -> tuple[str, str]:
    m = _NUM.match(str(text))
    if not m:
        raise UsageError(f"{what}: cannot parse {short(text)}")
    if any(len(part) > MAX_DIGITS for part in m.group(1).split(".")):
        raise UsageError(f"{what}: {short(text)}: number too long (at most {MAX_DIGITS} digits each side of the point)")
    return m.group(1), m.group(2).lower()


def _scale(num: str, factor: int, text: str, what: str) -> int:
    # Exact decimal arithmetic: "1.5GiB" must not go through a float.
    whole, _, frac = num.partition(".")
    value = int(whole) * factor + (int(frac) * factor) // (10 ** len(frac)) if frac else int(whole) * factor
    if frac and (int(frac) * factor) % (10 ** len(frac)):
        raise UsageError(f"{what}: {short(text)} is not a whole number of units")
    return value


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from ``4GiB``, ``512MiB``, ``64k`` or a plain integer."""
    if isinstance(text, int):
        return text
    num, unit = _split(text, what)
    if unit not in _SIZE_UNITS:
        raise UsageError(f"{what}: unknown unit {unit!r} in {short(text)} (use B, KiB, MiB, GiB, KB, MB, GB)")
    return _scale(num, _SIZE_UNITS[unit], text, what)


def parse_duration_ns(text: str | int, what: str = "duration") -> int:
    """Nanoseconds from ``500ms``, ``2s``, ``30us`` or a plain integer (ns)."""
    if isinstance(text, int):
        return text
    num, unit = _split(text, what)
    if unit == "":
        unit = "ns"
    if unit not in _TIME_UNITS:
        raise UsageError(f"{what}: unknown unit {unit!r} in {short(text)} (use ns, us, ms, s)")
    return _scale(num, _TIME_UNITS[unit], text, what)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_ns(n: int) -> str:
    for unit, size in (("s", 10**9), ("ms", 10**6), ("us", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.3f} {unit}"
    return f"{n} ns"
