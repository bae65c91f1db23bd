"""Fill ``.whl/`` with what benchmarks/gpu_session.sh installs on the lent GPU machine, which has torch, transformers,
accelerate and nvidia-ml-py but no package index: bitsandbytes repacked with only the CUDA library of that machine's
CUDA (the full wheel is 43 MB of libraries for every CUDA and ROCm; the tree that travels is capped at 64 MiB) and
the CPU one, and pydantic with its dependencies (the planner's edges use it).

    .venv/bin/python -m benchmarks.gpu_wheels                   # CUDA 13.0, Python 3.12 (the H200/H100 machines)
    .venv/bin/python -m benchmarks.gpu_wheels --cuda 128 --python 3.11

Then ``run`` the device with ``carry: [".whl"]`` and ``bash benchmarks/gpu_session.sh`` (docs/gpu-validation.md).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = ("manylinux_2_24_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64")


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(wheel: Path, keep_cuda: str, out: Path) -> Path:
    """``wheel`` without the native libraries of other CUDA / ROCm versions, RECORD rewritten to match."""
    dest = out / wheel.name
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        record_name, lines = None, []
        for info in zin.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if base.startswith("libbitsandbytes_") and base.endswith(".so") and \
                    base not in (f"libbitsandbytes_cuda{keep_cuda}.so", "libbitsandbytes_cpu.so"):
                continue
            if info.filename.endswith(".dist-info/RECORD"):
                record_name = info.filename
                continue
            data = zin.read(info)
            zout.writestr(info, data)
            lines.append(_record_line(info.filename, data))
        if record_name is None:
            raise SystemExit(f"{wheel.name}: no RECORD; not a wheel?")
        zout.writestr(record_name, "\n".join(lines + [f"{record_name},,"]) + "\n")
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda", default="130", help="the CUDA of the GPU machine's torch, as bitsandbytes names it")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python")
    ap.add_argument("--bitsandbytes", default="0.50.2")
    ap.add_argument("--out", default=str(ROOT / ".whl"))
    a = ap.parse_args(argv)
    import pydantic
    import pydantic_core

    out = Path(a.out)
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               a.python, *[x for p in PLATFORMS for x in ("--platform", p)], "-d", tmp,
               f"bitsandbytes=={a.bitsandbytes}", f"pydantic=={pydantic.VERSION}",
               f"pydantic-core=={pydantic_core.__version__}", "annotated-types", "typing-inspection",
               "typing-extensions"]
        subprocess.run(cmd, check=True)
        for w in sorted(Path(tmp).glob("*.whl")):
            if w.name.startswith("bitsandbytes-"):
                dest = repack(w, a.cuda, out)
            else:
                dest = out / w.name
                dest.write_bytes(w.read_bytes())
            print(f"{dest}: {dest.stat().st_size / 2**20:.1f} MiB")
    total = sum(f.stat().st_size for f in out.glob("*.whl"))
    print(f"{out}: {total / 2**20:.1f} MiB in all (the carried tree is capped at 64 MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
