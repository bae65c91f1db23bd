"""A pure stand-in for what Ray and Serve do with gpuplan's targets, for the rollout tests: Serve adds replicas up to
a target and stops surplus ones (a random running one when none is still starting); each lease request reaches the
raylet after a random delay, in random order, and gets a GPU by Ray's best fit or stays pending; a started replica
runs (and reports its GPU) a few ticks later; a stopped one holds its GPU share a few ticks more. The per-GPU ledger
is checked on every placement."""

from __future__ import annotations

import random

from planner.placement.packing import RAY_GPU_UNITS
from planner.rollout import DeploymentObs, Rollout, ScaleMemory, applied, best_fit, decide_scale, observe


class FakeRay:
    def __init__(self, rollout: Rollout, rng: random.Random):
        self.ro, self.rng = rollout, rng
        self.rooms = {n.node: [RAY_GPU_UNITS] * len(n.gpus) for n in rollout.nodes}
        self.gpus = {n.node: list(n.gpus) for n in rollout.nodes}
        self.target = {d.name: 0 for d in rollout.deployments}
        self.running: dict[str, dict[str, int | None]] = {d.name: {} for d in rollout.deployments}
        self.starting: dict[str, dict[str, list]] = {d.name: {} for d in rollout.deployments}  # rid -> [pos, ticks]
        self.stopping: list[list] = []  # [node, pos, units, ticks]
        self.n = 0

    def apply(self, name: str, target: int) -> None:
        self.target[name] = target
        d = self.ro.deployment(name)
        have = len(self.running[name]) + len(self.starting[name])
        for _ in range(target - have):
            self.n += 1
            self.starting[name][f"r{self.n}"] = [None, 0]
        for _ in range(have - target):
            if self.starting[name]:  # Serve stops replicas that are not running yet first
                rid = next(iter(self.starting[name]))
                pos, _ = self.starting[name].pop(rid)
                if pos is not None:
                    self.stopping.append([d.node, pos, d.units, 0])
            else:
                rid = self.rng.choice(sorted(self.running[name]))
                gpu = self.running[name].pop(rid)
                if d.kind != "cpu":
                    self.stopping.append([d.node, self.gpus[d.node].index(gpu), d.units, self.rng.randint(0, 3)])

    def tick(self) -> None:
        for s in list(self.stopping):
            if s[3] <= 0:
                self.rooms[s[0]][s[1]] += s[2]
                self.stopping.remove(s)
            else:
                s[3] -= 1
        reqs = [(name, rid) for name, st in self.starting.items() for rid, (pos, _) in st.items() if pos is None]
        self.rng.shuffle(reqs)
        for name, rid in reqs:
            if self.rng.random() < 0.3:
                continue  # this request has not reached the raylet yet
            d = self.ro.deployment(name)
            if d.kind == "cpu":
                self.starting[name][rid] = [-1, self.rng.randint(0, 3)]
                continue
            i = best_fit(self.rooms[d.node], d.units)
            if i is None:
                continue  # pending
            self.rooms[d.node][i] -= d.units
            assert self.rooms[d.node][i] >= 0
            self.starting[name][rid] = [i, self.rng.randint(0, 3)]
        for name, st in self.starting.items():
            d = self.ro.deployment(name)
            for rid in list(st):
                pos, left = st[rid]
                if pos is None:
                    continue
                if left <= 0:
                    self.running[name][rid] = None if d.kind == "cpu" else self.gpus[d.node][pos]
                    del st[rid]
                else:
                    st[rid][1] = left - 1

    def pending(self) -> int:
        return sum(1 for st in self.starting.values() for pos, _ in st.values() if pos is None)

    def obs(self, name: str, load: float) -> DeploymentObs:
        return DeploymentObs(self.target[name], tuple(sorted(self.running[name].items())), load)

    def count(self, model: str) -> int:
        return sum(len(self.running[d.name]) for d in self.ro.of_model(model))


def drive(fr: FakeRay, memory: ScaleMemory, loads: dict, ticks: int, now: float) -> tuple[ScaleMemory, float, list]:
    """Run the policy as Serve does: every tick, each deployment (in random order) records its context and gets its
    target from the shared decision."""
    ro, names, waits = fr.ro, [d.name for d in fr.ro.deployments], []
    share = {r.name: max(1, len(ro.of_model(r.name))) for r in ro.models}

    def load_of(n):
        m = ro.deployment(n).model
        return loads.get(m, 0.0) / share[m]

    for _ in range(ticks):
        now += 1.0
        fr.rng.shuffle(names)
        for name in names:
            memory = observe(ro, memory, name, fr.obs(name, load_of(name)), now)
            dec = decide_scale(ro, {n: fr.obs(n, load_of(n)) for n in names}, memory, now)
            waits.extend(dec.waits)
            memory = applied(dec.memory, name, dec.targets[name])
            fr.apply(name, dec.targets[name])
        fr.tick()
    return memory, now, waits
