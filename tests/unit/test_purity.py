"""planner/ imports none of ray, torch, transformers, bitsandbytes, accelerate or the NVML bindings, and the CLI
starts fast."""

import os
import subprocess
import sys
import time

import planner

HEAVY = ("ray", "torch", "transformers", "bitsandbytes", "accelerate", "pynvml", "numpy")
PLANNER_DIR = os.path.dirname(planner.__file__)


def _all_planner_modules():
    for root, _, files in os.walk(PLANNER_DIR):
        for f in files:
            if f.endswith(".py") and f != "__main__.py":
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PLANNER_DIR))
                yield rel[:-3].replace(os.sep, ".").removesuffix(".__init__")


def test_importing_every_planner_module_pulls_no_heavy_module():
    mods = sorted(_all_planner_modules())
    assert "planner.model.spec" in mods and "planner.model.estimate" in mods
    code = (
        "import sys, importlib\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"planner imported: {out}"


def test_estimate_and_help_do_not_import_heavy_modules():
    code = (
        "import sys\nfrom planner.cli import main\n"
        "main(['estimate', 'meta-llama/Llama-3.1-8B', '--quant', 'int4', '--json'])\n"
        f"print('HEAVY=' + ','.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY="


def test_help_starts_fast():
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "planner", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - t0 < 1.0
