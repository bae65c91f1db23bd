"""GPU catalog and fit_gpus: the smallest (or cheapest) set of GPUs that holds every model's minimum replicas."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from planner.placement.capacity import CATALOG_PATH, FitResult, GpuSpec, fit_gpus, load_gpu_catalog, lookup_gpu
from planner.errors import InfeasiblePlanError, InputError
from planner.placement.packing import ModelDemand, QuantOption, usable_gpu_bytes
from planner.cluster.inventory import Gpu
from planner.units import GiB, MiB

REQUIRED = {"T4", "L4", "A10G", "L40S", "A100-40GB", "A100-80GB", "H100", "H200", "RTX-4090"}


def one(name, size, mn=1, mx=None, **kw):
    return ModelDemand(name, (QuantOption("bf16", size),), mn, mn if mx is None else mx, **kw)


def test_catalog_has_the_common_gpus_with_sources():
    cat = {g.name: g for g in load_gpu_catalog()}
    assert REQUIRED <= cat.keys()
    assert cat["A10G"].memory_bytes == 24 * GiB and cat["A10G"].nvml_total_bytes == 23028 * MiB
    assert cat["H200"].memory_bytes == 141 * GiB
    for g in cat.values():
        assert g.memory_bytes > 0
        assert g.nvml_total_bytes is None or g.nvml_total_bytes <= g.memory_bytes  # NVML totals are a bit lower
        assert g.planning_bytes == (g.nvml_total_bytes or g.memory_bytes)
        assert g.price_per_hour is None or g.price_per_hour > 0
    raw = json.loads(CATALOG_PATH.read_text())
    assert "NVML" in raw["_source"] and "APPROXIMATE" in raw["_prices"]


@pytest.mark.parametrize(
    "name,expect",
    [
        ("a10g", "A10G"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("Tesla T4", "T4"),
        ("rtx 4090", "RTX-4090"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("A100_40GB", "A100-40GB"),
    ],
)
def test_lookup_by_name_alias_or_nvml_product_name(name, expect):
    assert lookup_gpu(name).name == expect


def test_custom_gpu_and_unknown_gpu():
    g = lookup_gpu("MI300X:192GiB:3.5")
    assert g == GpuSpec("MI300X", 192 * GiB, None, 3.5)
    with pytest.raises(InputError) as e:
        lookup_gpu("B300")
    msg = str(e.value)
    assert "unknown GPU 'B300'" in msg and "A10G" in msg and "B300:24GiB" in msg and "\n" not in msg
    with pytest.raises(InputError):
        lookup_gpu("X:lots")


def test_fit_by_count_single_type():
    ds = [one("a", 8 * GiB, 2, 6), one("b", 12 * GiB, 1, 2)]
    r = fit_gpus(ds, ["A10G"])
    usable = usable_gpu_bytes(Gpu("x", "A10G", 23028 * MiB))
    assert usable < 20 * GiB  # 8 + 12 does not share one A10G
    assert dict(r.counts) == {"A10G": 2} and r.gpus == 2
    assert r.cost_per_hour == pytest.approx(2 * 1.006)
    assert r.plan.feasible and all(m.placed_replicas >= m.min_replicas for m in r.plan.models)
    assert r.total_bytes == 2 * 23028 * MiB
    json.dumps(r.to_json())
    assert isinstance(r, FitResult)


def test_fit_by_count_prefers_fewer_gpus_then_cheaper():
    ds = [one("a", 30 * GiB, 2, 2)]
    r = fit_gpus(ds, ["L40S", "A100-80GB", "H100"])
    # one 80 GB GPU holds both; A100-80GB is cheaper than H100 in the catalog
    assert dict(r.counts) == {"L40S": 0, "A100-80GB": 1, "H100": 0}


def test_fit_by_cost_can_pick_more_cheaper_gpus():
    ds = [one("a", 9 * GiB, 4, 4)]
    by_count = fit_gpus(ds, ["L4", "A100-80GB"], by="count")
    by_cost = fit_gpus(ds, ["L4", "A100-80GB"], by="cost")
    assert by_count.gpus == 1 and dict(by_count.counts)["A100-80GB"] == 1
    assert dict(by_cost.counts) == {"L4": 2, "A100-80GB": 0}
    assert by_cost.cost_per_hour < by_count.cost_per_hour


def test_fit_uses_preferred_or_smallest_option():
    m = ModelDemand("m", (QuantOption("bf16", 16 * GiB), QuantOption("int4", 5 * GiB)), 3, 3)
    pref = fit_gpus([m], ["L4"])
    small = fit_gpus([m], ["L4"], quantization="smallest")
    assert pref.gpus == 3 and small.gpus == 1
    assert small.plan.model("m").quantization == "int4"


def test_fit_respects_pins():
    ds = [one("pinned", 10 * GiB, 1, 1, gpu_type="L4"), one("any", 60 * GiB, 1, 1)]
    r = fit_gpus(ds, ["L4", "A100-80GB"])
    assert dict(r.counts) == {"L4": 1, "A100-80GB": 1}


def test_fit_errors():
    with pytest.raises(InputError) as e:
        fit_gpus([one("a", GiB)], ["H200"], by="cost")
    assert "H200" in str(e.value) and "price" in str(e.value)
    with pytest.raises(InfeasiblePlanError) as e:
        fit_gpus([one("huge", 60 * GiB)], ["A10G", "L4"])
    msg = str(e.value)
    assert "60.0 GiB" in msg and "A100-80GB" in msg and "H100" in msg
    with pytest.raises(InfeasiblePlanError) as e:
        fit_gpus([one("a", 15 * GiB, 10, 10)], ["A10G"], max_gpus=4)
    assert "at most 4 GPUs" in str(e.value) and "150.0 GiB" in str(e.value)
    with pytest.raises(InputError):
        fit_gpus([one("a", GiB)], ["A10G"], by="speed")
    with pytest.raises(InputError):
        fit_gpus([one("a", GiB)], [])


def test_planner_imports_no_heavy_modules():
    code = (
        "import sys, planner.placement.packing, planner.placement.capacity, planner.output.plan_report\n"
        "bad = [m for m in ('numpy', 'scipy', 'ray', 'torch', 'transformers', 'bitsandbytes', 'pynvml') "
        "if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
