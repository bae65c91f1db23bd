"""serve/app/status_cache.py: a request never waits for Serve's controller once a value is known."""

from __future__ import annotations

import asyncio

import pytest

from serve.app.status_cache import StaleWhileRevalidate


class Reader:
    """A control plane whose reads take until ``release`` is set; counts them and returns the read's number."""

    def __init__(self):
        self.n = 0
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self):
        self.n += 1
        n = self.n
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return n


def run(coro):
    return asyncio.run(coro)


def cache(released: bool = True):
    """(the fake clock's cell, the reader, the cache) with reads that return at once unless ``released`` is False."""
    now = [0.0]
    r = Reader()
    if released:
        r.release.set()
    return now, r, StaleWhileRevalidate(r, refresh_after_s=1.0, clock=lambda: now[0])


def test_first_read_is_waited_for_and_shared():
    async def main():
        now, r, c = cache(released=False)
        a = asyncio.create_task(c.get(10.0))
        b = asyncio.create_task(c.get(10.0))
        await asyncio.sleep(0)
        assert not a.done() and not b.done()
        r.release.set()
        assert await a == 1 and await b == 1
        assert r.n == 1 and c.waited == 2

    run(main())


def test_stale_value_is_served_at_once_while_a_read_runs_behind_it():
    async def main():
        now, r, c = cache()
        assert await c.get(10.0) == 1
        now[0] = 0.5
        assert await c.get(10.0) == 1 and r.n == 1  # young: no read
        r.release.clear()
        now[0] = 2.0
        # a second old: the old value now, one read behind it, however many ask
        assert await c.get(10.0) == 1
        await asyncio.sleep(0)  # the read begins
        assert await c.get(10.0) == 1
        await asyncio.sleep(0)
        assert r.n == 2 and c.waited == 1
        r.release.set()
        await asyncio.sleep(0.01)
        assert await c.get(10.0) == 2
        assert c.age_s() == 0.0  # the value is as old as its read's start

    run(main())


def test_value_older_than_the_callers_max_age_is_read_afresh():
    async def main():
        now, r, c = cache()
        assert await c.get(10.0) == 1
        now[0] = 30.0  # left alone for long: not trusted for routing
        assert await c.get(10.0) == 2
        now[0] = 30.5
        assert await c.get(1.0) == 2  # young enough for /readyz
        now[0] = 31.5
        assert await c.get(1.0) == 3 and c.waited == 3

    run(main())


def test_a_failed_read_raises_to_who_waits_and_keeps_the_old_value_for_the_rest():
    async def main():
        now, r, c = cache()
        assert await c.get(10.0) == 1
        r.fail = RuntimeError("controller unreachable")
        now[0] = 2.0
        assert await c.get(10.0) == 1  # the background read fails: nobody waits for it
        await asyncio.sleep(0.01)
        assert await c.get(10.0) == 1  # still the old value (and another read behind it)
        with pytest.raises(RuntimeError, match="unreachable"):
            await c.get(0.5)
        r.fail = None
        assert await c.get(0.5) == r.n

    run(main())


def test_a_slow_read_started_earlier_does_not_replace_a_newer_value():
    async def main():
        now = [0.0]
        c = StaleWhileRevalidate(None, clock=lambda: now[0])
        gates = [asyncio.Event(), asyncio.Event()]
        vals = iter(["old", "new"])

        async def read():
            v = next(vals)
            await gates[0 if v == "old" else 1].wait()
            return v

        c._read = read
        slow = asyncio.create_task(c._refresh())
        await asyncio.sleep(0)
        now[0] = 1.0
        fast = asyncio.create_task(c._refresh())
        await asyncio.sleep(0)
        gates[1].set()
        await fast
        gates[0].set()
        await slow
        assert await c.get(10.0) == "new"

    run(main())
