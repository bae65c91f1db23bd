"""A value read from the control plane (Serve's status of the app's deployments) that a request must not wait for.

The ingress routes a request for a model with several deployments by how many replicas each runs, which it reads
from Serve's controller (``serve.status()``). Read on the request's path, that call waited for the controller: on a
loaded machine 100-400 ms before the request went anywhere (measured: benchmarks/policy_replay.py --timeline, the
time between the API's entry and the ingress's call to the replica, p50 141 ms for a model whose requests came more
than a second apart). So the value is kept and served stale while a read runs in the background
(stale-while-revalidate): a caller waits only when no value is younger than the ``max_age_s`` it asks for (the first
read, a value left unrefreshed for long, a caller that needs a fresh one), and concurrent callers share one read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("gpuplan")


class StaleWhileRevalidate(Generic[T]):
    """``read``: an async function returning the value; ``refresh_after_s``: a value this old starts a background read
    when asked for; ``clock``: time.monotonic, or a fake in tests."""

    def __init__(self, read: Callable[[], Awaitable[T]], *, refresh_after_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self._read = read
        self.refresh_after_s = float(refresh_after_s)
        self._clock = clock
        self._value: tuple[float, T] | None = None  # (when its read began, the value)
        self._task: asyncio.Task | None = None
        self.reads = 0  # reads started (tests, and what a request waited for is the rest)
        self.waited = 0  # calls that waited for a read

    def age_s(self) -> float | None:
        return None if self._value is None else self._clock() - self._value[0]

    async def get(self, max_age_s: float) -> T:
        """The last value if it is younger than ``max_age_s`` (a read starts in the background once it is
        ``refresh_after_s`` old), else a fresh one (waited for; its error is raised)."""
        age = self.age_s()
        if age is not None and age < max_age_s:
            if age >= self.refresh_after_s:
                self._start()
            return self._value[1]
        self.waited += 1
        await asyncio.shield(self._start())  # raises the read's error
        return self._value[1]

    def _start(self) -> asyncio.Task:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._refresh())
            # a background read's error is not waited for by anyone: retrieve it so asyncio does not log it
            self._task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self._task

    async def _refresh(self) -> None:
        began = self._clock()
        self.reads += 1
        try:
            value = await self._read()
        except Exception as exc:  # noqa: BLE001 - a waiting caller gets it; a background read keeps the old value
            log.debug("gpuplan: a background read of Serve's status failed: %r", exc)
            raise
        if self._value is None or began >= self._value[0]:
            self._value = (began, value)

    def __repr__(self) -> str:
        return f"StaleWhileRevalidate(age_s={self.age_s()}, reads={self.reads}, waited={self.waited})"
