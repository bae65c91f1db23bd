"""Adding replicas up to each model's maximum (smallest first, spread across nodes and GPUs), CPU replicas, and
growing split GPU+CPU (offload) replicas into the room left on their GPU."""

from __future__ import annotations

from typing import Sequence

from planner.placement.problem import RAY_GPU_UNITS, _State, ray_gpu_units  # noqa: F401

# ----------------------------------------------------------------------------------------------------------------
# Extra replicas up to max


def _fill(st: _State, models: Sequence[int], spread: bool) -> None:
    """Add replicas up to max, smallest replica first (maximises how many are placed), anti-affinity per model."""
    import heapq

    heap = [(int(st.size[m]), int(st.placed[m]), m) for m in models if st.placed[m] < st.P.max_rep[m]]
    heapq.heapify(heap)
    while heap:
        size, placed, m = heapq.heappop(heap)
        b = st.choose(m, spread)
        if b < 0:
            continue  # nothing this size fits any more; bins only get fuller
        st.place(m, b)
        if st.placed[m] < st.P.max_rep[m]:
            heapq.heappush(heap, (size, int(st.placed[m]), m))


# ----------------------------------------------------------------------------------------------------------------
# Offload and CPU replicas (models that fit on no GPU)


def _place_cpu_replica(st: _State, m: int) -> bool:
    """One CPU replica of model m (replica_bytes + cpu_bytes of host RAM) on the node with the most RAM left, fewest
    replicas of m first."""
    P = st.P
    o = P.demands[m].options[st.choice[m]]
    need = o.replica_bytes + o.cpu_bytes
    best, bkey = -1, None
    for n in range(P.nn):
        if int(st.ram[n]) >= need:
            key = (int(st.cnt_node[m, n]), -int(st.ram[n]), n)
            if bkey is None or key < bkey:
                best, bkey = n, key
    if best < 0:
        return False
    st.ram[best] -= need
    st.cnt_node[m, best] += 1
    st.placed[m] += 1
    st.extra.append((m, -1, 0, need, 0, best))
    return True


def _grow_offload(st: _State, models: Sequence[int]) -> None:
    """Turn the packed items of split models into split replicas: each keeps its least GPU share and grows into the
    usable bytes left on its GPU (more layers on the GPU, fewer in host RAM), never past its replica_bytes nor the
    GPU's Ray fraction. Recorded in ``st.extra``; the items leave ``st.cnt``."""
    P = st.P
    np = P.np
    for m in models:
        o = P.demands[m].options[st.choice[m]]
        base = int(st.size[m])
        for b in np.flatnonzero(st.cnt[m]).tolist():
            k = int(st.cnt[m, b])
            n = int(P.node_of[b])
            total = int(P.denom[b])
            for j in range(k):
                # give back this item, then take its grown share
                st.rem[b] += base
                st.rem_units[b] += int(st.units[m, b])
                share_room = int(st.rem[b]) // (k - j)
                gpu_part = min(o.replica_bytes, max(base, share_room))
                max_units = int(st.rem_units[b])
                while ray_gpu_units(gpu_part, total) > max_units and gpu_part > base:
                    gpu_part = max(base, (max_units * total) // RAY_GPU_UNITS)
                    if ray_gpu_units(gpu_part, total) > max_units:
                        gpu_part -= 1
                units = ray_gpu_units(gpu_part, total)
                st.rem[b] -= gpu_part
                st.rem_units[b] -= units
                cpu_part = o.replica_bytes - gpu_part
                st.ram[n] += gpu_part - base  # host RAM released by the bytes that moved to the GPU
                st.extra.append((m, b, gpu_part, cpu_part, units, n))
            st.cnt[m, b] = 0


