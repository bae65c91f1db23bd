"""The supervisor of one `make run`: it starts `serve run` and makes sure nothing of it outlives the wrapper.

    python -m serve.run.supervisor --run-id ID --wrapper-pid PID [--config F --port P] -- serve run deploy.yaml

The wrapper (serve/run/main.py) starts it in a session of its own with a pipe on stdin, and holds the pipe's only write
end. The supervisor:

- becomes a *child subreaper* (Linux ``PR_SET_CHILD_SUBREAPER``): the Ray daemons and workers that `serve run`
  starts leave their process groups, and when `serve run` dies they are re-parented here instead of to init, so the
  whole local cluster stays this process's descendants;
- starts `serve run` with ``GPUPLAN_RUN_ID`` in its environment (every Ray process inherits it: the mark a later
  start looks for) and ``PR_SET_PDEATHSIG`` = SIGTERM (if the supervisor itself is killed, `serve run` is told);
- records the run in ``serve.run.lifecycle.state_dir()`` and refreshes the list of its processes every second;
- reads the pipe. A line ``stop`` (the wrapper was signalled and has drained) is a graceful stop: SIGINT to `serve
  run` (what Ctrl-C on `serve run` does: shut Serve down, then the Ray it started), up to 25 s, then SIGTERM and
  SIGKILL to every descendant left. End of file without ``stop`` means the wrapper died (SIGKILL, OOM kill): the same
  with 5 s for `serve run`, so everything is gone within 10 s. The same when `serve run` exits by itself.

A Ray cluster that `serve run` connected to but did not start (``ray start``, ``RAY_ADDRESS``) has no process under
the supervisor, so nothing of it is ever stopped here.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import subprocess
import sys
import time

from serve.run.lifecycle import RUN_ENV, Proc, RunRecord, describe, record_path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GRACEFUL_S = 25.0  # after a drain: `serve run` shuts Serve and its Ray down (measured: docs/serving.md)
HARD_S = 5.0  # the wrapper died: everything gone within 10 s
TERM_S = 1.5  # SIGTERM to what is left, then SIGKILL


def prctl(option: int, arg: int) -> bool:
    """Linux prctl(2); False where there is none (macOS: the recorded process list is the fallback)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def say(msg: str) -> None:
    try:
        print(f"gpuplan: {msg}", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # the terminal is gone
        pass


class Supervisor:
    def __init__(self, run_id: str, cmd: list[str], wrapper_pid: int, config: str, port: int | None,
                 directory: str | None = None):
        self.run_id, self.cmd = run_id, cmd
        self.path = record_path(run_id, directory)
        self.subreaper = prctl(PR_SET_CHILD_SUBREAPER, 1)
        self.record = RunRecord(run_id=run_id, wrapper=describe(wrapper_pid) or Proc(wrapper_pid, 0.0),
                                supervisor=describe(os.getpid()), config=config, port=port, started_at=time.time())
        self.child: subprocess.Popen | None = None
        self.child_rc: int | None = None
        self.signalled = False
        self.seen: dict[int, float] = {}  # every descendant seen: pid -> start time (the fallback without subreaper)

    # ---------------------------------------------------------------------------------------------- processes
    def spawn(self) -> None:
        env = dict(os.environ, **{RUN_ENV: self.run_id})

        def in_child() -> None:
            # Python turns SIGINT into KeyboardInterrupt only when it is not ignored at start; a background job
            # inherits it ignored. serve run's KeyboardInterrupt path is its clean shutdown.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

        self.child = subprocess.Popen(self.cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                      preexec_fn=in_child)
        self.record.serve_run = describe(self.child.pid)
        self.snapshot()

    def reap(self) -> None:
        """Collect exited children (orphans re-parented here included), noting `serve run`'s exit code."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.child is not None and pid == self.child.pid:
                self.child_rc = os.waitstatus_to_exitcode(status)
                self.child.returncode = self.child_rc

    def descendants(self) -> list:
        import psutil

        me = psutil.Process()
        procs = {}
        try:
            for c in me.children(recursive=True):
                procs[c.pid] = c
        except psutil.Error:
            pass
        for pid, t in list(self.seen.items()):  # without a subreaper, orphans are found by what was recorded
            if pid in procs:
                continue
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - t) < 0.5:
                    procs[pid] = p
            except psutil.Error:
                self.seen.pop(pid, None)
        out = []
        for p in procs.values():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def snapshot(self) -> None:
        procs = []
        for p in self.descendants():
            try:
                t = p.create_time()
            except Exception:
                continue
            self.seen[p.pid] = t
            procs.append(Proc(p.pid, t))
        procs.sort(key=lambda p: p.pid)
        if procs != self.record.processes or not os.path.exists(self.path):
            self.record.processes = procs
            try:
                self.record.write(self.path)
            except OSError as exc:
                say(f"cannot write the run record {self.path}: {exc}")

    def child_alive(self) -> bool:
        self.reap()
        return self.child is not None and self.child_rc is None

    # --------------------------------------------------------------------------------------------- the loop
    def wait_for_stop(self) -> str:
        """Block until the wrapper says stop, dies, or `serve run` exits; returns which."""
        last = 0.0
        while True:
            try:
                ready, _, _ = select.select([sys.stdin.fileno()], [], [], 0.5)
            except (OSError, ValueError):
                ready = []
            if ready:
                try:
                    data = os.read(sys.stdin.fileno(), 4096)
                except OSError:
                    data = b""
                if not data:
                    return "wrapper-gone"
                if b"stop" in data:
                    return "stop"
            if self.signalled:
                return "stop"
            if not self.child_alive():
                return "serve-run-exited"
            if time.time() - last >= 1.0:
                self.snapshot()
                last = time.time()

    def teardown(self, graceful: bool) -> list[int]:
        """Stop `serve run` the way Ctrl-C does, then whatever of its cluster is left. Returns the pids that could
        not be stopped (none, normally)."""
        import psutil

        t0 = time.time()
        budget = GRACEFUL_S if graceful else HARD_S
        if self.child_alive():
            try:
                os.killpg(self.child.pid, signal.SIGINT)
            except (ProcessLookupError, PermissionError):
                pass
        while time.time() - t0 < budget:
            if not self.child_alive() and not self.descendants():
                break
            time.sleep(0.1)
        left = self.descendants()
        if left:
            for p in left:
                try:
                    p.terminate()
                except psutil.Error:
                    pass
            _, left = psutil.wait_procs(left, timeout=TERM_S, callback=None)
            for p in left:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            end = time.time() + TERM_S
            while time.time() < end:
                self.reap()
                left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
                if not left:
                    break
                time.sleep(0.05)
        self.reap()
        left = self.descendants()
        return [p.pid for p in left]

    def run(self) -> int:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, lambda *_: setattr(self, "signalled", True))
        self.spawn()
        why = self.wait_for_stop()
        t0 = time.time()
        if why == "wrapper-gone":
            say(f"the `make run` wrapper (pid {self.record.wrapper.pid}) is gone; stopping `serve run` and its Ray")
        n = len(self.descendants())
        left = self.teardown(graceful=(why == "stop"))
        if left:
            say(f"could not stop pids {left}; run record kept at {self.path}")
            self.snapshot()
        else:
            try:
                os.remove(self.path)
            except OSError:
                pass
        if why != "stop" or n:
            say(f"stopped {n} process(es) in {time.time() - t0:.1f} s ({why}"
                f"{'' if self.subreaper else '; no subreaper here, stopped what was recorded'})")
        if why == "serve-run-exited":
            return self.child_rc or 0
        return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--wrapper-pid", type=int, required=True)
    ap.add_argument("--config", default="")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("no command to supervise")
    return Supervisor(a.run_id, cmd, a.wrapper_pid, a.config, a.port).run()


if __name__ == "__main__":
    sys.exit(main())
