"""Cases of a GPU benchmark, each in a subprocess of its own (CUDA peaks, contexts and allocations do not leak from
one case into the next): ``python -m MODULE --case "MODEL|SCHEME" ARGS...`` prints one ``ROW {json}`` line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]


def each_case(module: str, models: list[str], schemes: list[str], args: list[str], jsonl: str | None = None,
              scratch: str | None = None) -> Iterator[dict]:
    """The row of every (model, scheme) case that produced one, in order, each appended to ``jsonl`` as it finishes
    (a run stopped at its time limit keeps what it measured); a case that failed is said on stderr and skipped.
    ``scratch``: a folder emptied after each model's cases (the random checkpoints written there: three 8-9B models
    in bf16 are 50 GB, most of the lent GPU machine's 64 GiB disk)."""
    for m in models:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        for s in schemes:
            p = subprocess.run([sys.executable, "-m", module, "--case", f"{m}|{s}", *args], capture_output=True,
                               text=True, cwd=ROOT)
            got = [ln[4:] for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
            if not got:
                print(f"{m} {s}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
                continue
            if jsonl:
                with open(jsonl, "a") as f:
                    f.write(got[0] + "\n")
            yield json.loads(got[0])
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
