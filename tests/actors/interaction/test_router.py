"""Placement over several interaction actors (in process, fake actors through the port), and an
ingress whose actor dies or drains: its calls stay up and move, their outputs resume."""

import asyncio
import time

import pytest

from actors.ingress.ingress import Ingress
from actors.interaction.placement import Direct
from actors.interaction.router import Router
from protocols import OutputChunk, ProtocolError, TickClock
from protocols.ports import Placement
from protocols.seams import InteractionStats, Joined
from tests.waits import until

pytestmark = pytest.mark.timeout(180)


class Fake:
    """An interaction actor: `alive` False makes every call fail like a dead actor's; a restart
    (`restart()`) comes back empty."""

    def __init__(self, name: str, capacity: int = 2):
        self.name, self.capacity = name, capacity
        self.members: list[str] = []
        self.resumed: list[str] = []
        self.released: list[str] = []
        self.dropped: list[str] = []
        self.ticks: dict[str, list[int]] = {}
        self.alive = True

    def _check(self):
        if not self.alive:
            raise RuntimeError(f"{self.name} died")

    def restart(self):
        self.alive, self.members = True, []

    async def clock_info(self):
        self._check()
        return {"t0": 0.0, "tick_ms": 200, "tick_s": 0.2, "now": time.time()}

    async def join(self, session_id, seed=None):
        self._check()
        if len(self.members) >= self.capacity:
            raise ProtocolError("full", "capacity")
        self.members.append(session_id)
        return Joined(session_id, 0, "t", {})

    async def resume(self, session_id):
        self._check()
        if session_id not in self.members:
            if len(self.members) >= self.capacity:
                raise ProtocolError("full", "capacity")
            self.members.append(session_id)
            self.resumed.append(session_id)
        return Joined(session_id, 0, "t", {})

    async def release(self, session_id):
        self._check()
        self.members.remove(session_id)
        self.released.append(session_id)

    async def drop(self, session_id):
        self._check()
        if session_id in self.members:
            self.members.remove(session_id)
            self.dropped.append(session_id)

    async def leave(self, session_id):
        self._check()
        self.members.remove(session_id)

    async def exchange(self, tick, chunks, session_ids):
        self._check()
        outs = []
        for c in chunks:
            if c.session_id in self.members:
                self.ticks.setdefault(c.session_id, []).append(tick)
                outs.append(OutputChunk(c.session_id, c.seq, c.t_start, c.audio, controls=["silent"]))
        return outs


def router(*fakes: Fake, **kw) -> Router:
    return Router({f.name: (f, f.capacity) for f in fakes}, **kw)


def test_placements_fit_their_port():
    assert isinstance(router(Fake("a")), Placement) and isinstance(Direct(Fake("a")), Placement)


def test_sessions_pack_onto_the_fullest_actor_with_room_and_are_refused_when_all_are_full():
    async def main():
        a, b = Fake("a"), Fake("b")
        r = router(a, b)
        placed = [(await r.place(f"s{i}")).actor for i in range(4)]
        assert placed == ["a", "a", "b", "b"]
        with pytest.raises(ProtocolError) as info:
            await r.place("s4")
        assert info.value.code == "capacity"
        await r.leave("s0")
        assert (await r.place("s5")).actor == "a"  # the freed slot
        assert (await r.stats())["refused"] == 1

    asyncio.run(main())


def test_a_dead_actor_is_not_placed_on_and_its_lost_session_resumes_elsewhere():
    async def main():
        a, b = Fake("a"), Fake("b")
        r = router(a, b, ping_timeout_s=0.2)
        assert (await r.place("s0")).actor == "a"
        a.alive = False
        assert (await r.place("s1")).actor == "b"
        placed = await r.locate("s0", lost_on="a")
        assert placed.actor == "b" and b.resumed == ["s0"]
        assert (await r.locate("s0", lost_on="a")).actor == "b"  # a stale report: it lives on b now
        assert b.resumed == ["s0"]

    asyncio.run(main())


def test_a_restarted_actor_takes_its_own_sessions_back_from_the_log():
    async def main():
        a, b = Fake("a"), Fake("b")
        r = router(a, b)
        await r.place("s0")
        a.restart()  # came back empty
        placed = await r.locate("s0", lost_on="a")
        assert placed.actor == "a" and a.resumed == ["s0"] and not b.resumed

    asyncio.run(main())


def test_a_busy_actor_reported_gone_keeps_its_session_when_no_other_has_room():
    """The ingress found `a` not answering (busy, not dead) and every other actor is full: rather
    than lose the call, the router asks `a` last, which still holds it and answers as it is."""

    async def main():
        a, b = Fake("a"), Fake("b", capacity=1)
        r = router(a, b)
        assert [(await r.place(s)).actor for s in ("s0", "s1", "s2")] == ["a", "a", "b"]
        placed = await r.locate("s0", lost_on="a", gone=True)
        assert placed.actor == "a" and not a.resumed and not b.resumed
        assert sorted((await r.placements()).items()) == [("s0", "a"), ("s1", "a"), ("s2", "b")]

    asyncio.run(main())


def test_drain_moves_every_session_and_places_nothing_more_there():
    async def main():
        a, b = Fake("a", capacity=3), Fake("b", capacity=3)
        r = router(a, b)
        for i in range(3):
            await r.place(f"s{i}")
        moved = await r.drain("a")
        assert sorted(moved["moved"]) == ["s0", "s1", "s2"] and not moved["failed"]
        assert a.members == [] and sorted(a.released) == ["s0", "s1", "s2"] and sorted(b.resumed) == ["s0", "s1", "s2"]
        with pytest.raises(ProtocolError):
            await r.place("s3")  # b is full and a is draining
        await r.undrain("a")
        assert (await r.place("s3")).actor == "a"

    asyncio.run(main())


def test_capacity_grows_when_the_cluster_offers_more():
    async def main():
        a, c = Fake("a", capacity=1), Fake("c", capacity=1)

        joined = False  # whether the node with c's capacity has joined the cluster

        async def grow(existing):
            return [("c", c, 1)] if joined and "c" not in existing else []

        r = router(a, grow=grow)
        await r.place("s0")
        with pytest.raises(ProtocolError):
            await r.place("s1")
        joined = True
        assert await r.grow_once() == ["c"] and await r.grow_once() == []
        assert (await r.place("s1")).actor == "c"

    asyncio.run(main())


def test_calls_on_a_dying_actor_move_to_another_and_keep_getting_outputs():
    """Two WebSocket calls on actor a, one on b; a dies: a's calls stay connected, are resumed on b
    (from the log, in the real actor), and their ticks are exchanged with b from then on."""

    async def main():
        a, b = Fake("a", capacity=2), Fake("b", capacity=3)
        r = router(a, b, ping_timeout_s=0.2)
        ingress = Ingress(r, TickClock(time.time()), max_sessions=8, relocate_s=5.0)
        ids = [(await ingress.open_websocket())[0] for _ in range(3)]
        assert [ingress.sessions[i].actor for i in ids] == ["a", "a", "b"]
        await until(lambda: all(a.ticks.get(i) for i in ids[:2]) and b.ticks.get(ids[2]))
        a.alive = False
        await until(lambda: all(b.ticks.get(i) for i in ids[:2]), message=lambda: {name: g.counts for name, g in ingress.groups.items()})
        assert sorted(b.resumed) == sorted(ids[:2])
        assert all(ingress.sessions[i].actor == "b" for i in ids) and len(ingress.sessions) == 3
        stats = await ingress.stats()
        assert stats["moved"] == 2 and stats["actors"] == {"a": 0, "b": 3}
        before = {i: len(b.ticks[i]) for i in ids}
        await until(lambda: all(len(b.ticks[i]) > before[i] + 1 for i in ids))  # every call goes on
        for i in ids:
            await ingress.close(i)
        assert b.members == [] and r.where == {}
        await ingress.shutdown()

    asyncio.run(main())


def test_a_call_nobody_can_take_ends_with_an_error_event_and_frees_its_slot():
    async def main():
        a = Fake("a", capacity=1)
        ingress = Ingress(router(a, ping_timeout_s=0.1), TickClock(time.time()), max_sessions=4, relocate_s=1.0)
        sid, outbox = await ingress.open_websocket()
        a.alive = False
        await until(lambda: sid not in ingress.sessions)
        events = []
        while not outbox.empty():
            item = outbox.get_nowait()
            if item is not None:
                events.append(item)
        assert any('"session_lost"' in e for e in events)
        assert (await ingress.stats())["lost"] == 1
        await ingress.shutdown()

    asyncio.run(main())


def test_hangup_belongs_to_the_caller_that_made_the_call():
    async def main():
        ingress = Ingress(Direct(Fake("a", capacity=4)), TickClock(time.time()), max_sessions=4)
        mine, _ = await ingress.open_websocket(owner="alice")
        with pytest.raises(ProtocolError) as info:
            await ingress.close(mine, owner="mallory")
        assert info.value.code == "forbidden" and mine in ingress.sessions
        await ingress.close(mine, owner="alice")
        other, _ = await ingress.open_websocket(owner="bob")
        await ingress.close(other)  # an API key holder (no owner given) may end any call
        assert not ingress.sessions
        await ingress.shutdown()

    asyncio.run(main())


def test_sessions_an_actor_no_longer_has_free_their_slots_on_the_second_check():
    async def main():
        a = Fake("a", capacity=1)

        async def stats():
            return InteractionStats(session_ids=list(a.members))

        a.stats = stats
        r = router(a)
        await r.place("s0")
        a.members.clear()  # it left on its own (orphaned)
        assert await r.reconcile() == []  # a first miss may be a restart being resumed
        assert await r.reconcile() == ["s0"]
        assert (await r.place("s1")).actor == "a"

    asyncio.run(main())


def test_each_gatherer_runs_on_its_actors_clock_estimated_from_round_trips():
    """An actor whose node's clock is 80 ms ahead: the ingress's gatherer for it corrects by the
    offset (to a round trip's precision), so the ticks it sends are the ticks that actor is at."""

    async def main():
        skewed = Fake("a", capacity=2)

        async def clock_info():
            await asyncio.sleep(0.001)  # a round trip takes a moment
            return {"t0": 0.0, "tick_ms": 200, "tick_s": 0.2, "now": time.time() + 0.08}

        skewed.clock_info = clock_info
        ingress = Ingress(router(skewed), TickClock(time.time()), max_sessions=2)
        await ingress.open_websocket()
        await until(lambda: abs(ingress.groups["a"].clock.offset_s + 0.08) <= 0.01, message=lambda: ingress.groups["a"].clock)
        assert abs(ingress.groups["a"].clock.offset_s + 0.08) <= 0.01
        await ingress.shutdown()

    asyncio.run(main())


def test_a_join_cut_short_by_its_caller_is_taken_back():
    """The caller gives up while the placement is under way (a dropped HTTP request): the session
    that landed anyway leaves again, so no slot leaks."""

    async def main():
        a = Fake("a", capacity=2)
        real_join = a.join
        answered = asyncio.Event()

        async def slow_join(session_id, seed=None):
            answer = await real_join(session_id, seed)
            await answered.wait()  # joined, but the answer is not back yet
            return answer

        a.join = slow_join
        r = router(a)
        ingress = Ingress(r, TickClock(time.time()), max_sessions=2)
        opening = asyncio.create_task(ingress.open_websocket())
        await until(lambda: a.members)
        opening.cancel()
        answered.set()  # (an answer may still come back, to nobody)
        with pytest.raises(asyncio.CancelledError):
            await opening
        await until(lambda: not (a.members or r.where), message=lambda: (a.members, r.where))
        await ingress.shutdown()

    asyncio.run(main())


def test_a_restarted_router_knows_the_sessions_from_the_actors_and_resumes_the_rest_from_the_log():
    async def main():
        a, b = Fake("a", capacity=2), Fake("b", capacity=2)
        for f in (a, b):
            async def stats(f=f):
                f._check()
                return InteractionStats(session_ids=list(f.members))
            f.stats = stats
        first = router(a, b)
        await first.place("s0")
        await first.place("s1")
        await first.place("s2")  # on b
        fresh = router(a, b, ping_timeout_s=0.1)  # the router restarted: only its constructor ran
        assert await fresh.placements() == {"s0": "a", "s1": "a", "s2": "b"}
        b.alive = False
        fresh2 = router(a, b, ping_timeout_s=0.1)  # restarted again, and b is gone meanwhile
        assert await fresh2.placements() == {"s0": "a", "s1": "a"}
        with pytest.raises(ProtocolError):
            await fresh2.locate("s2")  # a stray question about a session it never saw
        await fresh2.leave("s1")
        placed = await fresh2.locate("s2", lost_on="b")  # the ingress lost it on b: from the log
        assert placed.actor == "a" and "s2" in a.resumed

    asyncio.run(main())


def test_a_resume_given_up_on_that_lands_later_is_dropped_there():
    """A restarting actor runs a resume only once it is back, after the router has placed the
    session elsewhere: it lets the session go again instead of holding a slot for nothing."""

    async def main():
        slow, b = Fake("a", capacity=2), Fake("b", capacity=2)
        real_resume = slow.resume
        back = asyncio.Event()

        async def late_resume(session_id):
            await back.wait()  # comes back after the router's deadline
            return await real_resume(session_id)

        slow.resume = late_resume
        r = Router({"a": (slow, 2), "b": (b, 2)}, resume_timeout_s=0.1)
        r.where["s0"] = "gone"
        r.actors["a"].sessions.clear()
        placed = await r.locate("s0", lost_on="gone", gone=True)
        assert placed.actor == "b"
        back.set()
        await until(lambda: "s0" in slow.dropped, message=lambda: (slow.members, slow.dropped))
        assert slow.members == [] and b.members == ["s0"]

    asyncio.run(main())
