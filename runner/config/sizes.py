"""Byte sizes: parsed from ``10GiB``/``500MB`` strings at the config edge, ints everywhere else."""
from __future__ import annotations

import re
from fractions import Fraction

UNITS = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}
# No device holds more: a bigger figure is a typo, and past it a float would overflow.
LARGEST = 2**60  # 1 EiB
# Kept in sync with the "size" definition in schemas/config.schema.json.
SIZE_PATTERN = r"^[0-9]+(\.[0-9]+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$"
_SIZE = re.compile(SIZE_PATTERN)


def parse_size(text: str) -> int:
    """``"1.5GiB"`` -> 1610612736. Decimal units are powers of 10, binary ones powers of 2.

    Raises:
        ValueError: for anything but a non-negative number followed by a known unit, up to 1 EiB.
    """
    match = _SIZE.match(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a size; expected a number and a unit, e.g. 500MB or 10GiB")
    number = str(text).strip()[: match.start(2)].strip()
    if len(number) > 30:  # past any device, and past what Fraction should be asked to parse
        raise ValueError(f"{text[:24]}...: {len(number)} digits is past any device; expected a size such as 10GiB")
    size = int(Fraction(number) * UNITS[match.group(2)])  # exact: no float rounding, no overflow
    if size > LARGEST:
        raise ValueError(f"{text} is past any device (over 1 EiB); expected a size such as 10GiB")
    return size


def format_bytes(n: int | float) -> str:
    """Human-readable binary size: 1536 -> '1.50 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
