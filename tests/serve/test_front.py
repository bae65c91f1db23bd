"""serve/api/front.py: gpuplan's own HTTP server for the ingress's API, in a thread of the ingress process."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from serve.api.front import DirectFront, bind, pick_port



def app() -> FastAPI:
    a = FastAPI()

    @a.get("/ping")
    async def ping():
        return {"ok": True}

    @a.get("/slow")
    async def slow():
        async def chunks():
            for i in range(4):
                await asyncio.sleep(0.25)
                yield f"data: {i}\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return a


def wait_up(url: str, timeout_s: float = 10.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            time.sleep(0.05)
    return False


def test_serves_then_stops_and_frees_the_port():
    port = pick_port()
    front = DirectFront(app(), "127.0.0.1", port).start()
    try:
        assert wait_up(f"http://127.0.0.1:{port}/ping") and front.alive() and front.bound_at
    finally:
        front.stop(timeout=10)
    assert not front._thread.is_alive() and front.alive()  # stopped on request: not a failure
    bind("127.0.0.1", port).close()  # the port is free again


def test_waits_for_a_taken_port_then_takes_it():
    """A replacement ingress can start while the old one still holds the port: it binds once the port is free."""
    port = pick_port()
    holder = bind("127.0.0.1", port)
    front = DirectFront(app(), "127.0.0.1", port, retry_s=0.1).start()
    try:
        time.sleep(0.5)
        assert front.bound_at is None and front.alive()
        holder.close()
        assert wait_up(f"http://127.0.0.1:{port}/ping", 5) and front.bound_at is not None
    finally:
        holder.close()
        front.stop(timeout=10)


def test_stop_lets_a_stream_in_flight_finish():
    port = pick_port()
    front = DirectFront(app(), "127.0.0.1", port, graceful_s=10).start()
    assert wait_up(f"http://127.0.0.1:{port}/ping")
    got: list[str] = []

    async def stream_and_stop():
        async with httpx.AsyncClient() as c:
            async with c.stream("GET", f"http://127.0.0.1:{port}/slow") as r:
                stopper = None
                async for line in r.aiter_lines():
                    if line:
                        got.append(line)
                        if stopper is None:
                            stopper = asyncio.create_task(asyncio.to_thread(front.stop, 15))
            await stopper

    asyncio.run(stream_and_stop())
    assert got == [f"data: {i}" for i in range(4)]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1)


def test_pick_port_is_free_and_outside_the_ephemeral_range():
    import random

    port = pick_port(rng=random.Random(7))
    assert 20000 <= port < 30000
    bind("127.0.0.1", port).close()  # free
    held = bind("127.0.0.1", port)
    try:  # a taken port is never picked
        assert pick_port(port, port + 2, rng=random.Random(7)) == port + 1
    finally:
        held.close()
    # never the same port twice in a process, though the first is free again (two servers a test starts later)
    with pytest.raises(RuntimeError, match=r"no free port in \[%d, %d\)" % (port, port + 2)):
        pick_port(port, port + 2, rng=random.Random(8))


def test_a_dead_front_fails_the_ingress_health_check_with_the_cause_and_the_fix():
    """Serve restarts an ingress whose health check fails; the error says which port, why, and what to do."""
    from types import SimpleNamespace

    from serve.app.ingress import Ingress

    ingress = SimpleNamespace(front=SimpleNamespace(alive=lambda: False, host="127.0.0.1", port=8000,
                                                    error="OSError: [Errno 98] Address already in use"))
    with pytest.raises(RuntimeError) as exc:  # the method on a stand-in (an Ingress needs a Serve replica context)
        asyncio.run(Ingress.func_or_class.check_health(ingress))
    msg = str(exc.value)
    assert "API server on 127.0.0.1:8000 stopped: OSError: [Errno 98] Address already in use" in msg, msg
    assert "Fix: if another program holds the port, stop it or change args.http.port" in msg, msg


def test_ingress_replicas_share_the_port_and_it_stays_open_when_one_goes():
    """args.http.replicas fronts bind one port with SO_REUSEPORT: both listen, a program that does not share still
    cannot take it, and when one listener closes (its process died) a new connection reaches the other."""
    import socket

    port = pick_port()
    a = bind("127.0.0.1", port, reuse_port=True)
    b = bind("127.0.0.1", port, reuse_port=True)
    try:
        with pytest.raises(OSError):
            bind("127.0.0.1", port)  # a program that does not share
        a.close()  # one ingress replica is gone
        for _ in range(20):  # every new connection lands on the live listener: none is refused
            c = socket.create_connection(("127.0.0.1", port), timeout=2)
            conn, _ = b.accept()
            conn.close()
            c.close()
    finally:
        a.close()
        b.close()


def test_a_drain_asked_of_one_ingress_replica_holds_for_the_others():
    """The registry keeps the drain of a build (its built_at) and each ingress replica's requests in flight: the one
    that got POST /admin/drain records it, the others learn it at their next report, and /readyz counts all."""
    from serve.app.registry import ReplicaBook

    book = ReplicaBook()
    assert book.ingress_report("llm@1", "i1", 3) is None  # not draining
    assert book.ingress_report("llm@1", "i2", 1) is None
    since = book.drain("llm@1")
    assert book.drain("llm@1") == since  # asked again: the same drain
    assert book.ingress_report("llm@1", "i2", 1) == since
    assert book.ingress_report("llm@2", "i9", 0) is None  # a later build of the app does not inherit it
    assert book.in_flight("llm@1") == {"i1": 3, "i2": 1}
    assert book.in_flight("llm@1", within_s=-1) == {}  # stale reports do not count


def test_fronts_of_one_port_take_turns_and_a_standby_takes_over_at_once(tmp_path):
    """Two fronts with one leader lock: the first serves, the second waits without listening; when the first stops
    (or its process dies, which releases the lock) the second listens at once."""
    import httpx

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": scope["app_tag"].encode()})

    def tagged(tag):
        async def inner(scope, receive, send):
            await app(dict(scope, app_tag=tag), receive, send)
        return inner

    port, lock = pick_port(), str(tmp_path / "front.lock")
    a = DirectFront(tagged("a"), "127.0.0.1", port, reuse_port=True, leader_lock=lock, graceful_s=1).start()
    b = None
    try:
        for _ in range(100):
            if a.serving():
                break
            time.sleep(0.05)
        b = DirectFront(tagged("b"), "127.0.0.1", port, reuse_port=True, leader_lock=lock, graceful_s=1).start()
        time.sleep(0.3)
        assert a.serving() and not b.serving() and b.alive()  # the standby waits, alive
        for _ in range(10):
            assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == "a"  # only the leader listens
        a.stop()
        t0 = time.time()
        while not b.serving() and time.time() - t0 < 5:
            time.sleep(0.01)
        assert b.serving(), "the standby did not take the port"
        assert time.time() - t0 < 1.0
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == "b"
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_a_standby_stopped_while_it_waits_returns_at_once_and_hands_the_lock_on(tmp_path):
    """A standby blocks in flock (no polling); stop() on it does not wait for the lock, and if the lock comes after
    all, the stopped standby passes it to the next front instead of serving."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"c"})

    port, lock = pick_port(), str(tmp_path / "front.lock")
    a = DirectFront(app, "127.0.0.1", port, reuse_port=True, leader_lock=lock, graceful_s=1).start()
    b = c = None
    try:
        for _ in range(100):
            if a.serving():
                break
            time.sleep(0.05)
        b = DirectFront(app, "127.0.0.1", port, reuse_port=True, leader_lock=lock, graceful_s=1).start()
        time.sleep(0.2)
        assert b._waiting and not b.serving()
        t0 = time.monotonic()
        b.stop()
        assert time.monotonic() - t0 < 0.5  # no join on a thread blocked in flock
        c = DirectFront(app, "127.0.0.1", port, reuse_port=True, leader_lock=lock, graceful_s=1).start()
        time.sleep(0.2)
        a.stop()  # the lock goes to b (stopped: it closes the file) or to c; either way c serves
        t0 = time.monotonic()
        while not c.serving() and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert c.serving() and not b.serving()
        assert time.monotonic() - t0 < 1.0
    finally:
        for f in (a, b, c):
            if f is not None:
                f.stop()
