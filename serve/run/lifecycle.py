"""What `make run` leaves on this machine, and what it finds there when it starts.

Every `make run` has a run id. Its supervisor (serve/run/supervisor.py) starts `serve run` with ``GPUPLAN_RUN_ID=<id>``
in the environment, which every process of a local Ray cluster inherits (gcs_server, raylet, the dashboard, every
worker and actor), and keeps a record of the run in ``state_dir()/run-<id>.json``: the wrapper's, the supervisor's
and `serve run`'s pid and start time, and the processes of the run seen last. So a later start can tell apart:

- another `make run` still alive (its wrapper runs): refuse, it owns the cluster and its app;
- a run whose wrapper is gone but whose processes live (an orphan: wrapper and supervisor killed together): stop it,
  name its pids;
- a Ray cluster in no record (`ray start`, ``RAY_ADDRESS``, someone's script): use it, say so, never stop it;
- a stale ``/tmp/ray/ray_current_cluster`` with no Ray process behind it: remove it (`serve run` would hang on it).

``decide_start`` is the pure decision; ``survey`` reads the machine (psutil) and ``stop_processes`` acts.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

RUN_ENV = "GPUPLAN_RUN_ID"
STALE_CLUSTER_FILE = "/tmp/ray/ray_current_cluster"
RAY_DAEMONS = ("gcs_server", "raylet")


def state_dir() -> str:
    """Where run records live: ``$GPUPLAN_STATE_DIR``, else ``<tmp>/gpuplan-<uid>``."""
    d = os.environ.get("GPUPLAN_STATE_DIR") or os.path.join(tempfile.gettempdir(), f"gpuplan-{os.getuid()}")
    os.makedirs(d, exist_ok=True)
    return d


def record_path(run_id: str, directory: str | None = None) -> str:
    return os.path.join(directory or state_dir(), f"run-{run_id}.json")


@dataclass(frozen=True)
class Proc:
    """A process as (pid, start time): a pid alone may have been reused."""

    pid: int
    create_time: float

    def to_json(self) -> list:
        return [self.pid, self.create_time]


@dataclass
class RunRecord:
    """One `make run`, as its supervisor last wrote it."""

    run_id: str
    wrapper: Proc
    supervisor: Proc | None = None
    serve_run: Proc | None = None
    config: str = ""
    port: int | None = None
    started_at: float = 0.0
    processes: list[Proc] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("wrapper", "supervisor", "serve_run"):
            p = getattr(self, k)
            d[k] = p.to_json() if p else None
        d["processes"] = [p.to_json() for p in self.processes]
        return d

    @classmethod
    def from_json(cls, d: dict) -> RunRecord:
        def proc(v):
            return Proc(int(v[0]), float(v[1])) if v else None

        return cls(run_id=str(d["run_id"]), wrapper=proc(d["wrapper"]), supervisor=proc(d.get("supervisor")),
                   serve_run=proc(d.get("serve_run")), config=d.get("config", ""), port=d.get("port"),
                   started_at=float(d.get("started_at") or 0.0),
                   processes=[proc(p) for p in d.get("processes") or []])

    def write(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f)
        os.replace(tmp, path)


def read_records(directory: str | None = None) -> list[tuple[str, RunRecord]]:
    """Every readable run record of the state directory, with its path (unreadable ones are skipped)."""
    d = directory or state_dir()
    out = []
    for name in sorted(os.listdir(d)):
        if not (name.startswith("run-") and name.endswith(".json")):
            continue
        path = os.path.join(d, name)
        try:
            with open(path) as f:
                out.append((path, RunRecord.from_json(json.load(f))))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
    return out


# ---------------------------------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class RunSeen:
    """A run record and what of it is alive now."""

    path: str
    record: RunRecord
    wrapper_alive: bool
    supervisor_alive: bool
    alive: tuple[int, ...]  # pids of the run's processes still running (Ray daemons, workers, serve run)


@dataclass(frozen=True)
class StartPlan:
    """What a new `make run` does before it starts `serve run`."""

    refuse: str | None = None  # another make run owns this machine's cluster: the message (exit 2)
    wait_for: tuple[str, ...] = ()  # run ids whose supervisor is still tearing down: wait, then look again
    stop: tuple[tuple[str, tuple[int, ...]], ...] = ()  # orphaned runs: (run id, pids) to stop
    forget: tuple[str, ...] = ()  # record paths of runs with nothing left
    remove_stale_file: bool = False
    messages: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


def decide_start(runs: list[RunSeen], other_ray: list[tuple[int, str]], ray_address: str | None,
                 stale_file: str | None, now: float) -> StartPlan:
    """Decide what to do with what an earlier run left. ``other_ray``: (pid, name) of Ray daemons that belong to no
    run record; ``stale_file``: the address in /tmp/ray/ray_current_cluster, or None when there is none."""
    msgs: list[str] = []
    for r in runs:
        if r.wrapper_alive:
            rec = r.record
            age = max(0.0, now - rec.started_at)
            return StartPlan(refuse=(
                f"another `make run` is serving from this machine (wrapper pid {rec.wrapper.pid}, {rec.config or '?'}"
                f"{f', port {rec.port}' if rec.port else ''}, started {age:.0f} s ago) on its own Ray cluster; a second "
                f"one would deploy onto that cluster and replace its app. Fix: stop it first (`kill {rec.wrapper.pid}`:"
                " one SIGTERM drains and stops it), or serve both configs from one deploy.yaml."))
    wait = tuple(r.record.run_id for r in runs if r.supervisor_alive)
    if wait:
        return StartPlan(wait_for=wait, messages=(
            f"gpuplan: an earlier `make run` ({', '.join(wait)}) is still stopping; waiting for it",))
    stop, forget = [], []
    for r in runs:
        if r.alive:
            stop.append((r.record.run_id, tuple(sorted(r.alive))))
            msgs.append(f"gpuplan: an earlier `make run` (run {r.record.run_id}, {r.record.config or '?'}, wrapper pid "
                        f"{r.record.wrapper.pid}) is gone but left {len(r.alive)} process(es) of its Ray cluster "
                        f"running; stopping them: pids {', '.join(map(str, sorted(r.alive)))}")
        forget.append(r.path)
    if ray_address:
        msgs.append(f"gpuplan: RAY_ADDRESS={ray_address}: deploying onto that cluster; it is left running on exit "
                    "(only this app is shut down)")
    elif other_ray:
        pids = ", ".join(f"{name} {pid}" for pid, name in sorted(other_ray))
        msgs.append(f"gpuplan: a Ray cluster that `make run` did not start is running on this machine ({pids}); "
                    "`serve run` deploys onto it, and it is left running on exit (only Serve is shut down). For a "
                    "fresh local cluster, stop it first (`ray stop`).")
    # the orphans are stopped first, so only a cluster of no run keeps the file alive
    remove = stale_file is not None and not other_ray and not ray_address
    if remove:
        msgs.append(f"gpuplan: {STALE_CLUSTER_FILE} names a Ray cluster at {stale_file or '?'} that no running Ray "
                    "process will back once the above is done (a cluster that was killed); `serve run` would hang "
                    "trying to reach it. Removing the stale file.")
    return StartPlan(stop=tuple(stop), forget=tuple(forget), remove_stale_file=remove, messages=tuple(msgs))


# ------------------------------------------------------------------------------------------------ reading the host
def proc_alive(p: Proc | None) -> bool:
    """Is this (pid, start time) still the same running process (not a zombie, not a reused pid)?"""
    if p is None:
        return False
    import psutil

    try:
        q = psutil.Process(p.pid)
        return abs(q.create_time() - p.create_time) < 0.5 and q.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError):
        return False


def describe(pid: int) -> Proc | None:
    import psutil

    try:
        return Proc(pid, psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _with_descendants(pids: set[int]) -> set[int]:
    import psutil

    out = set(pids)
    for pid in pids:
        try:
            out.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    return out


def run_processes(record: RunRecord, marked: dict[str, set[int]]) -> set[int]:
    """The live processes of a run: those carrying its run id in their environment, the recorded ones that still run
    (same start time), and the descendants of both (a Ray agent that rewrote its environment, for one)."""
    import psutil

    pids = set(marked.get(record.run_id, ()))
    for p in [*record.processes, record.serve_run]:
        if proc_alive(p):
            pids.add(p.pid)
    pids = _with_descendants(pids)
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.Error:
            pass
    return alive - {os.getpid()}


def marked_processes() -> dict[str, set[int]]:
    """run id -> pids of this user's processes whose environment carries ``GPUPLAN_RUN_ID``."""
    import psutil

    out: dict[str, set[int]] = {}
    me = os.getpid()
    for p in psutil.process_iter(["pid", "uids"]):
        if p.pid == me:
            continue
        try:
            if p.info["uids"] and p.info["uids"].real != os.getuid():
                continue
            rid = p.environ().get(RUN_ENV)
        except (psutil.Error, OSError):
            continue
        if rid:
            out.setdefault(rid, set()).add(p.pid)
    return out


def ray_daemons() -> list[tuple[int, str]]:
    """(pid, name) of the Ray daemons (gcs_server, raylet) running on this machine."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            name = p.info["name"] or ""
            exe = os.path.basename((p.info["cmdline"] or [""])[0])
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.Error, OSError, IndexError):
            continue
        for d in RAY_DAEMONS:
            if name == d or exe == d:
                out.append((p.pid, d))
                break
    return out


def survey(directory: str | None = None) -> tuple[list[RunSeen], list[tuple[int, str]], str | None]:
    """Read the machine: runs on record with what of them lives, Ray daemons of no run, the stale-file address."""
    marked = marked_processes()
    runs, owned = [], set()
    for path, rec in read_records(directory):
        alive = run_processes(rec, marked)
        owned |= alive
        runs.append(RunSeen(path, rec, proc_alive(rec.wrapper), proc_alive(rec.supervisor), tuple(sorted(alive))))
    known = {r.record.run_id for r in runs}
    for rid, pids in marked.items():  # a marked process without a record (the record was deleted): still ours
        if rid not in known:
            owned |= _with_descendants(pids)
    other = [(pid, name) for pid, name in ray_daemons() if pid not in owned]
    stale = None
    if os.path.exists(STALE_CLUSTER_FILE):
        try:
            with open(STALE_CLUSTER_FILE) as f:
                stale = f.read().strip()
        except OSError:
            stale = ""
    return runs, other, stale


def stop_processes(pids: list[int] | tuple[int, ...], grace_s: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace_s`` what still runs; returns the pids that survived both (none, normally)."""
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=3)
    return [p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def wait_gone(pids, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not any(proc_alive(describe(pid)) for pid in pids):
            return True
        time.sleep(0.2)
    return False
