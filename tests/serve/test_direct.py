"""The direct stream between the ingress and a replica (serve/app/direct.py), in one process: chunks and request
semantics cross it unchanged, a peer without the secret gets nothing, a full replica says busy, a broken connection
is DirectLost, a stopped server lets its requests finish, and the ingress picks the less loaded of two routes."""

from __future__ import annotations

import asyncio
import random

import pytest

from serve.app.direct import DirectBusy, DirectLost, DirectRoutes, DirectServer, direct_stream, new_secret
from serve.engines.sim import SimEngine
from serve.types import GenerationChunk, SamplingParams


def _engine():
    return SimEngine(step_s=lambda b, c: 0.002, prefill_s=lambda n: 0.001, max_num_seqs=4, max_model_len=256,
                     kv_tokens=4096, emit_s=0.01)


async def _collect(addr, secret, n=10, **kw):
    out = []
    async for c in direct_stream(addr, secret, list(range(8)), SamplingParams(max_tokens=n, seed=3, **kw)):
        out.append(c)
    return out


def test_chunks_cross_unchanged():
    async def go():
        eng, secret = _engine(), new_secret()
        srv = await DirectServer(eng.generate, secret, max_ongoing=8).start()
        got = await _collect(srv.address, secret, n=12)
        local = [c async for c in eng.generate(list(range(8)), SamplingParams(max_tokens=12, seed=3))]
        stopped = await _collect(srv.address, secret, n=12, stop=(local[-1].text.split()[-1],))
        await srv.stop(1)
        return got, local, stopped, srv.served

    got, local, stopped, served = asyncio.run(go())
    assert "".join(c.text for c in got) == "".join(c.text for c in local)
    assert got[-1].finish_reason == "length" and got[-1].completion_tokens == 12 and got[-1].prompt_tokens == 8
    assert stopped[-1].finish_reason == "stop"
    assert served == 2


def test_a_peer_without_the_secret_gets_nothing():
    async def go():
        srv = await DirectServer(_engine().generate, new_secret(), max_ongoing=8).start()
        with pytest.raises(DirectLost):
            await _collect(srv.address, new_secret())
        await srv.stop(1)
        return srv.served

    assert asyncio.run(go()) == 0


def test_a_full_replica_says_busy_and_an_engine_error_is_raised():
    async def go():
        secret = new_secret()
        held = 1
        srv = await DirectServer(_engine().generate, secret, max_ongoing=1, busy=lambda: held).start()
        with pytest.raises(DirectBusy):
            await _collect(srv.address, secret)
        held = 0
        with pytest.raises(RuntimeError, match="exceeds max_model_len"):
            await _collect(srv.address, secret, n=500)
        await srv.stop(1)

    asyncio.run(go())


def test_a_broken_connection_is_lost_and_stop_waits_for_requests_in_flight():
    async def dies(ids, params):
        yield GenerationChunk(text="a", completion_tokens=1)
        raise ConnectionResetError("gone")

    async def go():
        secret = new_secret()
        srv = await DirectServer(dies, secret, max_ongoing=4).start()
        got = []
        with pytest.raises(DirectLost):
            async for c in direct_stream(srv.address, secret, [1], SamplingParams(max_tokens=5)):
                got.append(c)
        await srv.stop(1)
        # a stopped server: new connections are refused
        with pytest.raises(DirectLost, match="cannot connect"):
            await _collect(srv.address, secret)
        # stop() waits for what runs
        srv2 = await DirectServer(_engine().generate, secret, max_ongoing=4).start()
        task = asyncio.create_task(_collect(srv2.address, secret, n=60))
        await asyncio.sleep(0.03)
        left = await srv2.stop(5)
        return got, left, await task

    got, left, finished = asyncio.run(go())
    assert [c.text for c in got] == ["a"]
    assert left == 0 and finished[-1].completion_tokens == 60


def test_routes_pick_the_less_loaded_of_two_and_pass_over_failed_ones():
    r = DirectRoutes(new_secret())
    r.update([{"replica_id": "a", "deployment": "m@n", "state": "running", "direct": ["127.0.0.1", 1]},
              {"replica_id": "b", "deployment": "m@n", "state": "running", "direct": ["127.0.0.1", 2]},
              {"replica_id": "c", "deployment": "m@n", "state": "loading", "direct": ["127.0.0.1", 3]}])
    r.inflight = {"a": 5, "b": 1}
    rng = random.Random(0)
    assert {r.pick("m@n", rng.random)[0] for _ in range(20)} == {"b"}
    r.failed("b", DirectLost("refused"), now=100.0)
    assert r.pick("m@n", rng.random, now=101.0)[0] == "a"
    assert r.pick("m@n", rng.random, now=101.0, max_ongoing=5) is None
    assert {r.pick("m@n", rng.random, now=106.0)[0] for _ in range(20)} == {"b"}  # back after avoid_s
    r.failed("b", DirectLost("timed out", unreachable=True), now=200.0)
    assert {r.pick("m@n", rng.random, now=400.0)[0] for _ in range(20)} == {"a"}  # minutes after a timeout
    assert r.pick("other", rng.random) is None


def test_the_ingress_routes_a_shared_prefix_to_one_replica_across_deployments():
    """Ingress._by_prefix (the ingress's choice before Serve's handle): every replica of the model, whatever its
    deployment (model@node), is a candidate; prompts sharing a long start go where the first went, until that
    replica has more than max_imbalance requests beyond the least loaded; routing.prefix false leaves it to load."""
    from types import SimpleNamespace

    from serve.app.ingress import Ingress

    by_prefix = Ingress.func_or_class._by_prefix
    routes = DirectRoutes(new_secret())
    routes.update([{"replica_id": rid, "deployment": dep, "state": "running", "direct": ["127.0.0.1", port]}
                   for rid, dep, port in (("a", "m@n0", 1), ("b", "m@n0", 2), ("c", "m@n1", 3))])
    me = SimpleNamespace(routing={"m": {"prefix": True, "max_imbalance": 2, "min_match_tokens": 32}}, routes=routes,
                         max_ongoing={"m": 16}, prefix={}, routed={})
    pairs = [("m@n0", None), ("m@n1", None)]
    system = list(range(500, 900))
    first = by_prefix(me, "m", pairs, system + [1, 2, 3])
    dep, (rid, addr) = first
    assert dep == next(d for d, rows in routes.by_deployment.items() if any(r[0] == rid for r in rows))
    for q in range(6):
        assert by_prefix(me, "m", pairs, system + [q] * 20)[1][0] == rid
    routes.inflight = {rid: 3}  # 3 beyond the least loaded (0) > max_imbalance 2
    assert by_prefix(me, "m", pairs, system + [9] * 20)[1][0] != rid
    assert me.routed["m"] == {"room": 1, "prefix": 6, "imbalanced": 1}
    me.routing["m"]["prefix"] = False
    assert by_prefix(me, "m", pairs, system) == (None, None)
    me.routing["m"]["prefix"] = True
    routes.update([{"replica_id": "a", "deployment": "m@n0", "state": "running", "direct": ["127.0.0.1", 1]}])
    assert by_prefix(me, "m", pairs, system) == (None, None)  # one replica: nothing to choose


def test_routes_count_a_busy_replica_full_until_a_slot_frees_and_pick_across_deployments():
    r = DirectRoutes(new_secret(), full_s=1.0)
    r.update([{"replica_id": rid, "deployment": dep, "state": "running", "direct": ["127.0.0.1", port]}
              for rid, dep, port in (("a", "m@n0", 1), ("b", "m@n1", 2))])
    rng = random.Random(1)
    assert {r.pick_any(["m@n0", "m@n1"], rng.random, now=10.0)[0] for _ in range(40)} == {"m@n0", "m@n1"}
    r.full("a", now=10.0)
    assert {r.pick_any(["m@n0", "m@n1"], rng.random, now=10.5)[1][0] for _ in range(20)} == {"b"}
    assert r.pick("m@n0", rng.random, now=10.5) is None
    assert r.pick("m@n0", rng.random, now=11.0)[0] == "a"  # full_s later it is tried again
    r.full("a", now=20.0)
    r.inflight["a"] = 1
    r.ended("a")  # a stream of ours to it ended: a slot is free now
    assert r.inflight["a"] == 0 and r.pick("m@n0", rng.random, now=20.1)[0] == "a"
    r.full("a", now=30.0)
    r.inflight["a"] = 1
    r.ended("a", ran=False)  # it answered busy: no slot was freed
    assert r.inflight["a"] == 0 and r.pick("m@n0", rng.random, now=30.1) is None


class _Handle:
    """A deployment's Serve handle that answers at once and records that it was called."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def options(self, **kw):
        return self

    @property
    def generate(self):
        return self

    def remote(self, ids, params):
        self.calls.append(self.name)

        async def gen():
            yield GenerationChunk(text=f"via {self.name}", finish_reason="length", completion_tokens=1)
        return gen()


def _ingress_holding(secret, a, b):
    """An Ingress (its methods, no Ray) for model m with replica "a" (server ``a``) on deployment m@n0 and "b" on
    m@n1, whose prefix index sends the returned prompt to "a": (routes, handle calls, ingress, prompt, params)."""
    from planner.rollout import PrefixIndex, prefix_hashes
    from serve.app.ingress import Ingress

    routes = DirectRoutes(secret)
    routes.update([{"replica_id": "a", "deployment": "m@n0", "state": "running", "direct": list(a.address)},
                   {"replica_id": "b", "deployment": "m@n1", "state": "running", "direct": list(b.address)}])
    calls = []

    me = Ingress.func_or_class.__new__(Ingress.func_or_class)
    me.__dict__.update(draining=None, handles={"m": [("m@n0", _Handle("m@n0", calls)),
                                                     ("m@n1", _Handle("m@n1", calls))]},
                       wake_mode={}, routing={"m": {"prefix": True, "max_imbalance": 4, "min_match_tokens": 32}},
                       routes=routes, max_ongoing={"m": 8}, prefix={}, routed={}, inflight={"m@n0": 5},
                       waking={}, _lost={})

    async def running(max_age_s=None):
        return {"m@n0": 1, "m@n1": 1}
    me._running = running
    system = list(range(500, 700))
    me.prefix["m"] = PrefixIndex()
    me.prefix["m"].record(prefix_hashes(system), "a")
    return routes, calls, me, system, SamplingParams(max_tokens=4, seed=1)


def test_a_replica_gone_before_answering_sends_the_request_to_another_not_to_its_empty_deployment():
    """The replica the ingress chose stopped (scaled down) before the registry said so: the request goes to another
    replica directly, and the deployment is passed over (a request queued at a deployment with no replica made
    Serve start one there, against the plan's decision, again and again)."""
    async def go():
        secret = new_secret()
        a = await DirectServer(_engine().generate, secret, max_ongoing=4).start()
        b = await DirectServer(_engine().generate, secret, max_ongoing=4).start()
        await a.stop(1)  # refuses connections from now on
        routes, calls, me, system, params = _ingress_holding(secret, a, b)
        got = [c async for c in me.generate("m", system, params)]
        await b.stop(1)
        return got, b.served, calls, me

    got, b_served, calls, me = asyncio.run(go())
    assert len("".join(c.text for c in got).split()) == 4 and b_served == 1 and calls == []
    assert "m@n0" in me._lost and me.inflight == {"m@n0": 5, "m@n1": 0}


def test_a_deployment_chosen_on_an_old_status_without_a_replica_is_not_queued_at():
    """The model went from 2 replicas to 1: the ingress's status (up to 10 s old) still says m@n0 runs one, and
    m@n0 looks less loaded, but the registry no longer has its replica: the request goes to m@n1's replica directly,
    not to m@n0's Serve queue (which made Serve start a replica there against the plan's decision, seen as churn in a
    policy replay)."""
    async def go():
        secret = new_secret()
        a = await DirectServer(_engine().generate, secret, max_ongoing=4).start()
        b = await DirectServer(_engine().generate, secret, max_ongoing=4).start()
        routes, calls, me, system, params = _ingress_holding(secret, a, b)
        routes.update([{"replica_id": "b", "deployment": "m@n1", "state": "running", "direct": list(b.address)}])
        me.inflight = {"m@n1": 3}
        got = [c async for c in me.generate("m", [1, 2, 3], params)]
        await a.stop(1)
        await b.stop(1)
        return got, b.served, calls, me.inflight

    got, b_served, calls, inflight = asyncio.run(go())
    assert len("".join(c.text for c in got).split()) == 4 and b_served == 1 and calls == []
    assert inflight == {"m@n0": 0, "m@n1": 3}


def test_a_busy_replica_sends_the_request_to_another_with_room_then_to_serves_least_loaded_queue():
    """Ingress.generate: the replica a prefix chose answers busy (its slots held by requests that came through Serve's
    queue, which the ingress's own counts do not see): the request goes to a replica of another deployment with room,
    not to the busy replica's queue; with every replica busy, to Serve's queue of the least loaded deployment."""
    async def go():
        secret = new_secret()
        full_a = [1]
        a = await DirectServer(_engine().generate, secret, max_ongoing=1, busy=lambda: full_a[0]).start()
        b_busy = [0]
        b = await DirectServer(_engine().generate, secret, max_ongoing=1, busy=lambda: b_busy[0]).start()
        routes, calls, me, system, params = _ingress_holding(secret, a, b)
        got = [c async for c in me.generate("m", system, params)]
        first = ("".join(c.text for c in got), b.served, a.served, dict(routes.inflight), dict(me.inflight))
        b_busy[0] = 1  # now both are full: Serve's queue, of the deployment with fewer in flight (m@n1)
        routes.full_until.clear()
        got2 = [c async for c in me.generate("m", system, params)]
        await a.stop(1)
        await b.stop(1)
        return first, got2, calls, me.inflight

    first, got2, calls, inflight = asyncio.run(go())
    text, b_served, a_served, routes_inflight, dep_inflight = first
    assert b_served == 1 and a_served == 0 and len(text.split()) == 4
    assert routes_inflight == {"a": 0, "b": 0} and dep_inflight == {"m@n0": 5, "m@n1": 0}
    assert [c.text for c in got2] == ["via m@n1"] and calls == ["m@n1"]
    assert inflight == {"m@n0": 5, "m@n1": 0}
