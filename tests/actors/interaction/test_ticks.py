"""Ticks: the tick loop and its inbox. Missing and late chunks, bad input, a tick stepped as soon as
every chunk is in, shedding when the loop falls behind, the inbox's bounds, and a session whose
ingress is gone leaving on its own. Against `tests.fakes.MockEngine` through the engine port.
"""

import asyncio

import numpy as np
import pytest

from actors.interaction.interaction import Interaction
from actors.log.session_log import SessionLog
from protocols import InputChunk, ProtocolError, SessionEvent, from_table
from protocols.requests import TaskRequest
from tests.fakes import LocalLog, MockEngine
from tests.waits import TIMEOUT_S

from .helpers import FakeTime, chunk, exchange_then_step, make


def test_missing_chunk_is_stepped_as_silence_and_others_get_their_output():
    async def scenario():
        inter = make()
        assert (await inter.join("a")).first_tick == 0
        await inter.join("b")
        got, stepped = await exchange_then_step(inter, 0, [chunk("a", 0)], ["a", "b"])
        assert [o.session_id for o in got] == ["a", "b"] and all(o.seq == 0 for o in got)
        assert set(stepped) == {"a", "b"}
        handed = {c.session_id: c for c in inter.engine.steps[-1]}
        assert handed["b"].missing and not handed["b"].audio.any() and not handed["a"].missing
        stats = await inter.stats()
        assert stats.missing_chunks == 1 and stats.totals["missing_chunks"] == 1
        assert stepped["a"].audio.any() and not stepped["b"].audio.any()  # a's level echoed, b silent

    asyncio.run(scenario())


def test_late_chunk_is_counted_and_still_gets_the_tick_output():
    async def scenario():
        inter = make()
        await inter.join("a")
        stepped = await inter.step(0)  # nobody handed chunk 0 in: stepped as missing
        late = await inter.exchange(0, [chunk("a", 0)], ["a"])
        assert late == [stepped["a"]]
        await exchange_then_step(inter, 1, [chunk("a", 1)], ["a"])
        stats = await inter.stats()
        assert stats.late_chunks == 1 and stats.missing_chunks == 1
        assert {k: v for k, v in stats.totals.items() if v} == {"ticks": 2, "late_chunks": 1, "missing_chunks": 1}

    asyncio.run(scenario())


def test_a_late_chunk_loses_only_its_sound_its_text_events_and_forced_control_go_on():
    """A `response.create` that rode a chunk which came after its tick was stepped (or was shed)
    is not lost: the session's next stepped chunk carries it, after anything dropped before."""

    async def scenario():
        inter = make()
        await inter.join("a")
        await inter.step(0)  # nobody handed chunk 0 in: stepped as missing
        asking = InputChunk("a", 0, 0.0, chunk("a", 0).audio, text="hello", events=[{"type": "response.create"}],
                            forced="speak", requests=[TaskRequest()])
        await inter.exchange(0, [asking], ["a"])  # late
        shed = InputChunk("a", 1, 0.2, chunk("a", 1).audio, text="again", events=[{"type": "conversation.item.create"}])
        inter.ticks.inbox[1] = {"a": shed}  # handed in for tick 1, which is shed: tick 2 is stepped first
        await inter.step(2)
        carried = next(c for c in inter.engine.steps[-1] if c.session_id == "a")
        assert carried.text == "hello\nagain" and carried.forced == "speak"
        assert [e["type"] for e in carried.events] == ["response.create", "conversation.item.create"]
        assert carried.requests == [TaskRequest()]
        await inter.step(3)  # carried once, not again
        assert next(c for c in inter.engine.steps[-1] if c.session_id == "a").text == ""
        assert (await inter.stats()).totals["late_chunks"] == 2

    asyncio.run(scenario())


def test_one_sessions_bad_input_is_an_error_event_and_the_other_goes_on():
    async def scenario():
        inter = make()
        await inter.join("a")
        await inter.join("b")
        wrong = np.zeros((80, 80, 3), np.uint8)  # a valid frame, but not the model's 160x160
        got, _ = await exchange_then_step(inter, 0, [chunk("a", 0), chunk("b", 0, frame=wrong)], ["a", "b"])
        by = {o.session_id: o for o in got}
        assert not [e for e in by["a"].events if e.get("type") == "error"]
        errors = [e for e in by["b"].events if e.get("type") == "error"]
        assert errors and errors[0]["error"]["code"] == "invalid_frame"
        got, _ = await exchange_then_step(inter, 1, [chunk("a", 1), chunk("b", 1, samples=1_600)], ["a", "b"])
        by = {o.session_id: o for o in got}
        assert [e["error"]["code"] for e in by["b"].events if e.get("type") == "error"] == ["invalid_audio"]
        assert not by["a"].events

    asyncio.run(scenario())


def test_a_tick_is_stepped_as_soon_as_every_chunk_is_in():
    """A complete tick steps at once instead of at its deadline. The grace puts every deadline an
    hour past its tick on a clock that stands still at the tick's start, so the tick loop can only
    step it early (the exchange returns once it is stepped)."""

    async def scenario():
        clock = FakeTime()
        inter = Interaction(MockEngine(max_sessions=2), t0=0.0, now=clock, grace_ms=3_600_000)
        first = (await inter.join("a")).first_tick
        await inter.ready()
        for k in range(first, first + 3):
            clock.t = inter.clock.start(k)
            got = await asyncio.wait_for(inter.exchange(k, [chunk("a", k)], ["a"]), TIMEOUT_S)
            assert [o.seq for o in got] == [k]
        return (await inter.stats()).ticks

    ticks = asyncio.run(scenario())
    assert [t.tick for t in ticks] == [0, 1, 2]
    assert all(t.lag_ms < 0 for t in ticks)  # before the deadline, by the actor's own clock


# --- overload: shedding, bounded inbox ----------------------------------------------------------


class SlowEngine(MockEngine):
    """A MockEngine whose every step takes `step_s` of the fake clock."""

    def __init__(self, clock, step_s, **kw):
        super().__init__(max_sessions=4, **kw)
        self.clock, self.slow_s = clock, step_s

    def step(self, chunks):
        self.clock.t += self.slow_s
        return super().step(chunks)


def test_a_loop_that_falls_behind_sheds_to_the_newest_due_tick_and_tells_the_sessions():
    """Each step takes 2.5 ticks: the loop steps one tick per turn, always the newest due one, and
    never piles up; the ticks in between are shed (no outputs, counted), the engine sees a forward
    gap, and each session's next output says how many ticks it lost."""

    async def scenario():
        clock = FakeTime()
        inter = Interaction(SlowEngine(clock, 0.5), t0=0.0, now=clock)
        await inter.join("a")
        await inter.join("b")
        clock.t = 0.25  # tick 0's deadline (0.24) has passed
        waiting = asyncio.create_task(inter.exchange(1, [chunk("a", 1)], ["a"]))
        await asyncio.sleep(0)
        stepped = [await inter.tick_once() for _ in range(4)]
        assert stepped == [0, 2, 5, 7] and len(inter.engine.steps) == 4
        assert [c.seq for c in inter.engine.steps[2]] == [5, 5]  # a forward gap, as the engine is told
        assert await waiting == []  # an exchange of a shed tick gets no output and does not hang
        assert not [k for k in inter.ticks.inbox if k < inter.core.next_tick]
        shed = {k: [e for o in await inter.exchange(k, [], ["a", "b"]) for e in o.events if e["type"] == "interplay.shed"] for k in stepped}
        assert [[e["ticks"] for e in shed[k]] for k in stepped] == [[], [1, 1], [2, 2], [1, 1]]
        assert shed[2][0]["reason"] == "overload" and shed[2][0]["event_id"]
        stats = await inter.stats()
        assert stats.totals["shed_ticks"] == 4 and stats.shed_ticks == 4 and stats.totals["late_chunks"] == 1
        assert stats.hot
        with pytest.raises(ProtocolError, match="overloaded") as refused:
            await inter.join("c")
        assert refused.value.code == "capacity"
        assert len(inter.sessions) == 2  # the sessions already here go on

    asyncio.run(scenario())


def test_the_inbox_takes_only_ticks_near_the_clock():
    async def scenario():
        inter = make()
        await inter.join("a")
        with pytest.raises(ProtocolError, match="too far ahead"):
            await inter.exchange(6, [chunk("a", 6)], ["a"])
        inter.now.t = 3.0  # tick 13 is due; ticks 0-12 will be shed, not stepped
        shed = [asyncio.create_task(inter.exchange(k, [chunk("a", k)], ["a"])) for k in (12, 2)]
        await asyncio.sleep(0)
        assert inter.ticks.inbox == {} and inter.ticks.late == 2  # not kept: dropped as late
        assert await inter.tick_once() == 13
        assert [await t for t in shed] == [[], []]

    asyncio.run(scenario())


def test_a_session_whose_ingress_is_gone_leaves_on_its_own(tmp_path):
    """No chunk of B for `orphan_s` (late ones count as signs of life): B leaves, "orphaned", its
    log left open (it may live on elsewhere); A, whose chunks keep coming, stays. The clock answers with the actor's time."""
    session_log = SessionLog(tmp_path / "log", tick_ms=200)

    async def scenario():
        inter = Interaction(MockEngine(max_sessions=4), log=LocalLog(session_log), t0=0.0, now=FakeTime(), orphan_s=1.0)
        await inter.join("a")
        token = (await inter.join("b")).log_token
        inter.now.t = 0.1
        assert (await inter.clock_info())["now"] == 0.1
        for k in range(7):
            late = [chunk("b", k - 1)] if k == 2 else []
            await exchange_then_step(inter, k, [chunk("a", k)], ["a"])
            if late:
                await inter.exchange(k - 1, late, ["b"])
        assert sorted(inter.sessions) == ["a", "b"]  # heard of at tick 1 (late): 5 ticks of silence so far
        await exchange_then_step(inter, 7, [chunk("a", 7)], ["a"])
        stats = await inter.stats()
        assert stats.session_ids == ["a"] and stats.totals["orphaned"] == 1
        assert inter.engine.sessions.keys() == {"a"}
        await inter.flush()
        return token

    token = asyncio.run(scenario())
    assert session_log.open("b", token) == token  # still open: its token reopens it
    left = [d for d in from_table(session_log.read("b", token)) if isinstance(d, SessionEvent)][-1]
    assert (left.type, left.data) == ("session.left", {"reason": "orphaned"})
