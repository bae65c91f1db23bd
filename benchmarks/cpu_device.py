"""This host's CPU as a device for the speed model: memory bandwidth and dense compute, measured.

- bandwidth: the sum of a 1 GiB float32 array (numpy; one read of every byte), best of 5;
- compute: torch matmuls of 2,048 x 2,048 in fp32 and bf16 on all the threads torch uses, best of 5.

Prints the entry for planner/catalog/cpus.json (the speed model's CPU device).

    python -m benchmarks.cpu_device
"""

from __future__ import annotations

import json
import sys
import time

from benchmarks.common.machine import machine_line


def bandwidth_bytes_per_s(n_bytes: int = 1 << 30, rounds: int = 5) -> float:
    import numpy as np

    a = np.ones(n_bytes // 4, dtype=np.float32)
    a.sum()  # pages in
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return n_bytes / best


def tflops(dtype: str, n: int = 2048, rounds: int = 5) -> float:
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(n, n, dtype=dt)
    b = torch.randn(n, n, dtype=dt)
    a @ b
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def main(argv=None) -> int:
    import torch

    bw = bandwidth_bytes_per_s()
    out = {"memory_bandwidth_gb_per_s": round(bw / 1e9, 2),
           "dense_tflops": {"fp32": round(tflops("fp32"), 4), "bf16": round(tflops("bf16"), 4)},
           "torch_threads": torch.get_num_threads()}
    print(machine_line())
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
