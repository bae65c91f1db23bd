"""gpuplan's own HTTP front: the ingress's OpenAI API served by uvicorn inside the ingress replica's process.

Through Ray Serve's proxy a request crosses one process more: the proxy parses HTTP, sends the request to the
ingress replica as ASGI messages over Ray (the replica calls back to the proxy for the body), and every streamed
chunk travels back as one more Ray message before it becomes bytes on the socket. Measured on this repo's 2-core
machine (one client, 1-token streamed chats, median of 30): 27 ms per request through the proxy, 17 ms through this
front (docs/benchmarks.md, "Serving", has the timeline). The proxy keeps running
on ``http_options.port`` and serves the same API, so Serve's health checks, KubeRay and anything that expects it still
work; ``args.http.port`` puts this front beside it.

The server runs in a daemon thread with its own event loop. The port is bound here (not by uvicorn). Several ingress
replicas (args.http.replicas) stand by for it: the one holding a file lock serves, the others wait on the lock and
take no CPU (blocked in flock); when the server's process dies the kernel releases its lock and the next one listens
(they bind with SO_REUSEPORT, so a successor can listen while a front being replaced still finishes its requests).
Measured on 2 cores, two fronts that both served (the kernel spreading connections over them) cost 20-30% of the
throughput at 8-16 clients against one; a standby costs nothing there. The bind is tried again every ``retry_s``
while a program that does not share the port holds it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

log = logging.getLogger("ray.serve")


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on (host, port); raises OSError when the port is taken. ``reuse_port``: share the port
    with the other ingress replicas (SO_REUSEPORT: the kernel spreads new connections over the live listeners; a
    program that did not ask for it still makes the bind fail)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def leader_lock_path(host: str, port: int) -> str:
    """The lock the fronts of one (host, port) on this machine take turns on."""
    import os
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"gpuplan-{os.getuid()}", "locks", f"front-{host}-{port}.lock")


_PICKED: set[int] = set()


def pick_port(lo: int = 20000, hi: int = 30000, rng=None) -> int:
    """A free TCP port on 127.0.0.1 for a server started later (tests, benchmarks: gpuplan's front, Ray Serve's proxy,
    a Ray head), never the same one twice in a process: from [lo, hi), below Linux's
    ephemeral range (32768-60999), above Ray's worker ports (10002-19999). A port the OS hands out for bind(0) is in
    the ephemeral range, where the Ray processes that start in between take ports for their own sockets and
    connections: a front binding minutes later found one taken (CI)."""
    import random

    rng = rng or random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(lo, hi)
        if port in _PICKED:  # handed out already, perhaps not bound yet
            continue
        try:
            bind("127.0.0.1", port).close()
        except OSError:
            continue
        _PICKED.add(port)
        return port
    raise RuntimeError(f"no free port in [{lo}, {hi}) after 200 tries")


class DirectFront:
    """Serve ``app`` (an ASGI app) on host:port from a thread of this process until ``stop()``."""

    def __init__(self, app, host: str, port: int, *, retry_s: float = 0.5, graceful_s: int = 15,
                 reuse_port: bool = False, leader_lock: str | None = None):
        self.app, self.host, self.port = app, host, int(port)
        self.reuse_port = reuse_port
        # several fronts of one port: the one holding this file's lock serves, the others wait for it in flock (a
        # standby takes no CPU); a process that dies lets go of the lock at once, and the next one listens
        self.leader_lock = leader_lock
        self._waiting = False  # this front's thread waits for the leader lock
        self._lock_file = None
        self.leader_since: float | None = None
        self.retry_s = float(retry_s)
        self.graceful_s = int(graceful_s)
        self.bound_at: float | None = None  # when the port was bound
        self.error: str | None = None  # why the server stopped on its own, if it did
        self._server = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"gpuplan-front-{self.port}", daemon=True)

    def start(self) -> "DirectFront":
        self._thread.start()
        return self

    def _lead(self) -> bool:
        """Block until this front holds the leader lock (no polling: the kernel wakes the waiter when the holder
        closes the file or dies); False when stopped meanwhile (the lock, if it came, is handed on at once)."""
        import fcntl
        import os

        os.makedirs(os.path.dirname(self.leader_lock), exist_ok=True)
        f = open(self.leader_lock, "a+")
        self._waiting = True
        try:
            fcntl.flock(f, fcntl.LOCK_EX)  # releases the GIL while it waits
        except OSError:
            f.close()
            raise
        finally:
            self._waiting = False
        if self._stop.is_set():
            f.close()
            return False
        self._lock_file, self.leader_since = f, time.time()
        return True

    def _let_go(self) -> None:
        """Hand the port to a waiting front (closing the file releases the lock)."""
        f, self._lock_file = self._lock_file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()

    def serving(self) -> bool:
        """Whether this front listens now (always, without a leader lock)."""
        return self.bound_at is not None and self._thread.is_alive() and (
            self.leader_lock is None or self._lock_file is not None)

    def _run(self) -> None:
        if self.leader_lock and not self._lead():
            return
        try:
            self._serve()
        finally:
            self._let_go()

    def _serve(self) -> None:
        import uvicorn

        sock, warned = None, False
        while not self._stop.is_set():
            try:
                sock = bind(self.host, self.port, reuse_port=self.reuse_port)
                break
            except OSError as exc:
                if not warned:
                    log.warning("gpuplan: the API port %s:%d is taken (%s); retrying every %.1f s (an ingress being "
                                "replaced still holds it, or another program does: change args.http.port)",
                                self.host, self.port, exc.strerror or exc, self.retry_s)
                    warned = True
                self._stop.wait(self.retry_s)
        if sock is None:
            return
        self.bound_at = time.time()
        cfg = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                             timeout_graceful_shutdown=self.graceful_s, timeout_keep_alive=30)
        self._server = uvicorn.Server(cfg)
        try:
            self._server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - a thread has nobody to raise to; the health check reports it
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("gpuplan: the API server on %s:%d stopped: %s", self.host, self.port, self.error)
        finally:
            with contextlib.suppress(OSError):
                sock.close()
        if not self._stop.is_set() and self.error is None:
            self.error = "the server returned without being asked to stop"

    def alive(self) -> bool:
        """False once the server thread ended without ``stop()`` (the ingress's health check fails on it)."""
        return self._stop.is_set() or (self._thread.is_alive() and self.error is None)

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let requests in flight finish (up to ``graceful_s``), close the port. A waiting front takes
        the port over at once (the lock goes first), while this one finishes what it holds."""
        self._stop.set()
        self._let_go()
        if self._server is not None:
            self._server.should_exit = True
        deadline = time.monotonic() + (timeout if timeout is not None else self.graceful_s + 5)
        while self._thread.is_alive() and time.monotonic() < deadline:
            if self._waiting:  # a standby blocked in flock: nothing to wait for (it hands the lock on if it gets it)
                return
            self._thread.join(0.05)
