"""The direct stream: the ingress reaches a model replica over one TCP connection per request, not through Ray Serve's
router and Ray's streaming generator.

Why: a short answer's cost is per request, and through Serve it is paid in Serve's router (a thread of its own in
the ingress, futures between threads), Ray's actor call and object serialization, and the replica's request wrapper
(another event-loop hop, an access log line, metrics). Profiled on this repo's 2-core machine with the simulated engine
(docs/benchmarks.md, "the path's own CPU"): Ray's and Serve's frames were 46% of the ingress's busy samples and 70% of
the replica's. The direct stream is one socket between the front's event loop and the replica's user-code event loop
(where its engine runs), frames of JSON, no thread hand-off on either side.

Serve still places, starts, health-checks, scales and stops the replicas; the ingress learns each replica's address
from the registry (``direct`` in its row) and falls back to Serve's handle whenever a replica has no address, says it is
busy (its requests in flight reached ``max_ongoing_requests``: Serve's router then queues, and its queue limit answers
429), or cannot be reached (the request is retried as for a dead replica). Requests that went direct are counted by the
replica and reported with its autoscaling metrics, so the policy sees the same load either way; a replica being stopped
stops accepting and lets its direct requests finish first.

Wire format: the ingress sends a 32-byte shared secret (made when the app is built, known to the ingress and the
replicas only), then one frame; the replica answers with frames until the last chunk. A frame is a 4-byte big-endian
length and a JSON object: the request ``{"prompt_ids": [...], "params": {...}}``; the answers ``{"c": [[text,
finish_reason, prompt_tokens, completion_tokens], ...]}`` or ``{"e": kind, "m": message}`` (kind ``busy``,
``closed``, ``error``). Nothing is unpickled: a peer without the secret is dropped before its frame is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import socket
import struct
import time
from typing import AsyncIterator, Callable

from planner.rollout.routing import two_at_random
from serve.types import GenerationChunk, SamplingParams

log = logging.getLogger("gpuplan")
SECRET_BYTES = 32
_LEN = struct.Struct(">I")
MAX_FRAME = 64 * 2**20  # a request of a few hundred thousand token ids, with room


def new_secret() -> str:
    """The shared secret of one app build (hex)."""
    return os.urandom(SECRET_BYTES).hex()


class DirectBusy(Exception):
    """The replica holds max_ongoing_requests already: send the request through Serve (which queues it)."""


class DirectLost(Exception):
    """The replica could not be reached, or its connection broke. ``unreachable``: the connection timed out (a
    firewall between nodes drops the port, say): the route is passed over for much longer than after a refusal."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def _frame(obj) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return _LEN.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader):
    head = await reader.readexactly(_LEN.size)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes is larger than {MAX_FRAME}")
    return json.loads(await reader.readexactly(n))


def _params_json(p: SamplingParams) -> dict:
    d = dataclasses.asdict(p)
    d["stop"] = list(p.stop)
    return d


def _params_of(d: dict) -> SamplingParams:
    return SamplingParams(**{**d, "stop": tuple(d.get("stop") or ())})


class DirectServer:
    """The replica's side: serves ``generate(prompt_ids, params)`` (an async generator of GenerationChunk) on a TCP
    port of ``host``, on the event loop that calls ``start()`` (the replica's, where its engine runs)."""

    def __init__(self, generate: Callable[[list[int], SamplingParams], AsyncIterator[GenerationChunk]], secret: str,
                 *, max_ongoing: int, busy: Callable[[], int] = lambda: 0, host: str = "127.0.0.1"):
        self.generate = generate
        self.secret = bytes.fromhex(secret)
        self.max_ongoing = int(max_ongoing)
        self.busy = busy  # requests the replica holds through Serve (they count toward max_ongoing too)
        self.inflight = 0
        self.served = 0
        self.sock = socket.create_server((host, 0), backlog=1024, reuse_port=False)
        self.address = (host, self.sock.getsockname()[1])
        self._server: asyncio.base_events.Server | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set = set()

    async def start(self) -> "DirectServer":
        self._server = await asyncio.start_server(self._handle, sock=self.sock)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            secret = await asyncio.wait_for(reader.readexactly(SECRET_BYTES), 10)
            if not hmac.compare_digest(secret, self.secret):
                return
            req = await _read_frame(reader)
            if self.inflight + self.busy() >= self.max_ongoing:
                writer.write(_frame({"e": "busy", "m": f"{self.inflight + self.busy()} requests in flight"}))
                await writer.drain()
                return
            await self._serve(req, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, ValueError):
            pass  # the ingress went away (client gone, process died), or sent nothing we understand
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, req: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.inflight += 1
        self._idle.clear()
        gen = None
        try:
            try:
                gen = self.generate([int(t) for t in req["prompt_ids"]], _params_of(req["params"]))
                async for c in gen:
                    writer.write(_frame({"c": [[c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens]]}))
                    await writer.drain()  # a gone client raises here: the engine stops its sequence
                    if c.finish_reason:
                        break
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - the ingress raises it for the API to answer
                kind = "closed" if type(exc).__name__ == "EngineClosed" else "error"
                with contextlib.suppress(Exception):
                    writer.write(_frame({"e": kind, "m": f"{type(exc).__name__}: {exc}"}))
                    await writer.drain()
        finally:
            if gen is not None:
                with contextlib.suppress(Exception):
                    await gen.aclose()
            self.inflight -= 1
            self.served += 1
            if self.inflight == 0:
                self._idle.set()

    async def stop(self, timeout_s: float) -> int:
        """Stop accepting; wait up to ``timeout_s`` for the requests in flight; returns how many were still running."""
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        left = self.inflight
        for t in list(self._tasks):
            t.cancel()
        return left


async def direct_stream(address: tuple[str, int], secret: str, prompt_ids: list[int], params: SamplingParams,
                        connect_timeout_s: float = 2.0) -> AsyncIterator[GenerationChunk]:
    """The ingress's side: the chunks of one generation from the replica at ``address``. Raises DirectBusy before any
    chunk when the replica is full, DirectLost when it cannot be reached or the connection breaks, RuntimeError for
    an error the engine raised."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), connect_timeout_s)
    except (OSError, asyncio.TimeoutError) as exc:
        raise DirectLost(f"cannot connect to {address[0]}:{address[1]} ({type(exc).__name__})",
                         unreachable=isinstance(exc, asyncio.TimeoutError)) from None
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(bytes.fromhex(secret) + _frame({"prompt_ids": prompt_ids, "params": _params_json(params)}))
        while True:
            try:
                msg = await _read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise DirectLost(f"the connection to {address[0]}:{address[1]} broke ({type(exc).__name__})") from None
            if "c" in msg:
                for text, finish, n_prompt, n_done in msg["c"]:
                    yield GenerationChunk(text=text, finish_reason=finish, prompt_tokens=n_prompt,
                                          completion_tokens=n_done)
                    if finish:
                        return
                continue
            kind, message = msg.get("e"), msg.get("m", "")
            if kind == "busy":
                raise DirectBusy(message)
            if kind == "closed":
                raise DirectLost(f"the replica's engine is closed ({message})")
            raise RuntimeError(message)
    finally:
        writer.close()


@dataclasses.dataclass
class DirectRoutes:
    """The ingress's view of the replicas it can reach directly: per deployment, (replica id, address), with its own
    count of requests in flight per replica (it picks the less loaded of two, as Serve's router does) and the replicas
    that just failed (passed over for a few seconds; for minutes when the connection timed out, so that a port a
    firewall drops costs one slow request now and then, not every request)."""

    secret: str
    avoid_s: float = 5.0
    unreachable_s: float = 300.0
    full_s: float = 1.0
    by_deployment: dict = dataclasses.field(default_factory=dict)  # deployment -> [(replica_id, (host, port))]
    inflight: dict = dataclasses.field(default_factory=dict)  # replica_id -> requests sent and not finished
    passed_over: dict = dataclasses.field(default_factory=dict)  # replica_id -> until when it is passed over
    # replica_id -> until when it counts as full: it answered busy, its slots taken by requests that came through
    # Serve's queue, which this ingress's own count does not see
    full_until: dict = dataclasses.field(default_factory=dict)

    def failed(self, replica_id: str, exc: DirectLost, now: float | None = None) -> None:
        """A request to ``replica_id`` found it gone or unreachable: pass it over for a while."""
        now = time.monotonic() if now is None else now
        self.passed_over[replica_id] = now + (self.unreachable_s if exc.unreachable else self.avoid_s)

    def full(self, replica_id: str, now: float | None = None) -> None:
        """``replica_id`` answered busy: leave it out for ``full_s``, or until a stream of this ingress to it ends."""
        self.full_until[replica_id] = (time.monotonic() if now is None else now) + self.full_s

    def ended(self, replica_id: str, ran: bool = True) -> None:
        """A request of this ingress to ``replica_id`` ended; ``ran``: it held one of the replica's slots (not
        answered busy), which is free now."""
        self.inflight[replica_id] = self.inflight.get(replica_id, 0) - 1
        if ran:
            self.full_until.pop(replica_id, None)

    def update(self, rows: list[dict]) -> None:
        """The registry's rows of running replicas: those with a ``direct`` address become routes."""
        out: dict = {}
        for r in rows:
            addr = r.get("direct")
            if r.get("state") == "running" and addr and r.get("deployment"):
                out.setdefault(r["deployment"], []).append((r["replica_id"], (addr[0], int(addr[1]))))
        self.by_deployment = out

    def live(self, deployment: str, now: float | None = None, max_ongoing: int | None = None) -> list:
        """(replica id, address) of ``deployment``'s routes not passed over, not full, and below ``max_ongoing`` in
        flight."""
        now = time.monotonic() if now is None else now
        return [x for x in self.by_deployment.get(deployment, ())
                if now >= self.passed_over.get(x[0], -1e18) and now >= self.full_until.get(x[0], -1e18)
                and (max_ongoing is None or self.inflight.get(x[0], 0) < max_ongoing)]

    def pick(self, deployment: str, rand, now: float | None = None, max_ongoing: int | None = None):
        """(replica id, address) of the less loaded of two live routes of ``deployment``, or None."""
        got = self.pick_any([deployment], rand, now, max_ongoing)
        return None if got is None else got[1]

    def pick_any(self, deployments, rand, now: float | None = None, max_ongoing: int | None = None):
        """(deployment, (replica id, address)): the less loaded of two live routes among ``deployments``', or None."""
        routes = [(d, x) for d in deployments for x in self.live(d, now, max_ongoing)]
        if not routes:
            return None
        if len(routes) == 1:
            return routes[0]
        a, b = two_at_random(routes, rand)
        return a if self.inflight.get(a[1][0], 0) <= self.inflight.get(b[1][0], 0) else b
