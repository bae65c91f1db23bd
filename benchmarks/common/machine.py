"""The header every benchmark prints first: the machine, its CPUs, Python, and what else the run depends on."""

from __future__ import annotations

import datetime
import os
import platform


def machine_line(**extra) -> str:
    """``machine: <platform> | cpus: N (usable M) | python X | <key> <value> ... | <date>``."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    parts = [f"machine: {platform.platform()}", f"cpus: {os.cpu_count()} (usable {usable})",
             f"python {platform.python_version()}"]
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in extra.items()]
    parts.append(datetime.date.today().isoformat())
    return " | ".join(parts)
