"""Sizes and counts: parsing what users type (20GiB, 512MB) and printing them back."""

from __future__ import annotations

import re

from moetool.errors import MoetoolError

_SIZE_RX = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}


def parse_size(text: str | int, what: str = "size") -> int:
    """'20GiB', '512MB', '300KB', '1e9'-free plain integers -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RX.match(str(text))
    if not m:
        raise MoetoolError(f"{what}: cannot read '{text}' as a size (e.g. 20GiB, 512MB, 300000)")
    number, unit = m.group(1), (m.group(2) or "").lower()
    return int(float(number) * _UNITS[unit])


def human_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
