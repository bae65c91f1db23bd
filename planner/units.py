"""Bytes in, bytes out: sizes are ints of bytes inside gpuplan; strings with units only at the edges.

NOTE: "GiB"/"MiB"/"KiB" are powers of 1024, "GB"/"MB"/"KB" powers of 1000, as in IEC 80000-13 and as
``nvidia-smi`` (MiB) and GPU datasheets ("80GB" = 80e9 bytes... in practice NVML reports 81559 MiB for an
"80GB" A100) use them. A bare number is bytes.
"""

from __future__ import annotations

import math
import re

from planner.errors import InputError

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "KIB": 1024,
    "M": 1000**2,
    "MB": 1000**2,
    "MIB": 1024**2,
    "G": 1000**3,
    "GB": 1000**3,
    "GIB": 1024**3,
    "T": 1000**4,
    "TB": 1000**4,
    "TIB": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")

GiB = 1024**3
MiB = 1024**2


def parse_bytes(value: int | float | str, *, field: str = "size") -> int:
    """``"24GiB"`` -> 25769803776, ``"24GB"`` -> 24000000000, ``1024`` -> 1024.

    Raises ``InputError`` naming ``field`` for negative, non-finite or unparseable values.
    Fractional byte results are rounded down.
    """
    if isinstance(value, bool):
        raise InputError(f"{field}: expected a size like 24GiB or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise InputError(f"{field}: size must be a non-negative number of bytes, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise InputError(f"{field}: expected a size like 24GiB or a number of bytes, got {type(value).__name__}")
    m = _SIZE.match(value)
    if not m:
        raise InputError(f"{field}: cannot read size {value!r}; write it like 24GiB, 24GB, 512MiB or 1073741824")
    number, unit = m.groups()
    factor = _UNITS.get(unit.upper())
    if factor is None:
        raise InputError(f"{field}: unknown unit {unit!r} in {value!r}; use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB")
    return int(float(number) * factor)


def format_bytes(n: int | float, *, precision: int = 1) -> str:
    """``25769803776`` -> ``"24.0 GiB"``; binary units, as nvidia-smi and torch report memory."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{sign}{n / size:.{precision}f} {unit}"
    return f"{sign}{int(n)} B"
