"""Interaction: the clock, missing and late chunks, bad input, the log, delegation, overload
(shedding, admission, bounded queues, a failing log), the Ray actor.

Every test but the last runs against `tests.fakes.MockEngine` through the engine port; the Ray
actor test builds the real `tiny` engine inside the actor from an `EngineSpec`.
"""

import asyncio
import time

import numpy as np
import pytest

from actors.interaction.interaction import EngineSpec, Interaction, InteractionActor
from actors.remote import Remote
from actors.log.log_actor import SessionLogActor
from actors.log.session_log import SessionLog
from protocols import BackgroundTask, BackgroundUpdate, InputChunk, OutputChunk, ProtocolError, SessionEvent, from_table
from protocols.ports import Log
from protocols.requests import TaskRequest
from tests.fakes import FakePool, LocalLog, MockEngine
from tests.waits import TIMEOUT_S, until

SAMPLES = 3_200  # MockEngine's default tick: 200 ms at 16 kHz
rng = np.random.default_rng(1)


def chunk(sid, seq, frame=None, text="", samples=SAMPLES):
    audio = rng.integers(-3000, 3000, samples, dtype=np.int16)
    return InputChunk(sid, seq, seq * 0.2, audio, frame=frame, text=text)


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make(log=None, background=None, **engine):
    return Interaction(MockEngine(max_sessions=4, **engine), log=log, background=background, t0=0.0, now=FakeTime())


async def exchange_then_step(inter, tick, chunks, sids):
    task = asyncio.create_task(inter.exchange(tick, chunks, sids))
    await asyncio.sleep(0)  # the exchange hands its chunks in before the deadline
    stepped = await inter.step(tick)
    return await task, stepped


def test_the_clock_comes_from_the_engine():
    async def scenario():
        inter = Interaction(MockEngine(tick_ms=100), t0=10.0, now=lambda: 10.35, grace_ms=40)
        info = await inter.clock_info()
        assert info["tick_ms"] == 100 and info["t0"] == 10.0 and info["grace_s"] == 0.04
        assert inter.current_tick() == 3 and inter.deadline(3) == pytest.approx(10.44)
        await inter.join("a")
        out = await inter.step(3)  # nobody sent: a missing chunk is one 100 ms tick of silence
        assert out["a"].audio.shape == (1_600,) and not out["a"].audio.any()

    asyncio.run(scenario())


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


def test_every_chunk_and_output_lands_in_the_log_in_order(tmp_path):
    session_log = SessionLog(tmp_path / "log", tick_ms=200)

    async def scenario():
        inter = make(log=LocalLog(session_log, delay_s=0.01))
        a = await inter.join("a")
        await inter.join("b")
        sent = []
        for k in range(4):
            c = chunk("a", k)
            sent.append(c)
            await exchange_then_step(inter, k, [c], ["a", "b"])
        await inter.leave("b")
        await inter.flush()
        assert inter.sessions["a"].log_index == 8  # joined event + 4 ticks of (input, output)
        return a.log_token, sent

    token, sent = asyncio.run(scenario())
    deltas = from_table(session_log.read("a", token))
    assert isinstance(deltas[0], SessionEvent) and deltas[0].type == "session.joined"
    inputs = [d for d in deltas if isinstance(d, InputChunk)]
    outputs = [d for d in deltas if isinstance(d, OutputChunk)]
    assert [c.seq for c in inputs] == [0, 1, 2, 3] and [o.seq for o in outputs] == [0, 1, 2, 3]
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(inputs, sent))
    with pytest.raises(Exception, match="forbidden|token"):
        session_log.read("b", token)  # a session reads only its own log


def test_join_beyond_capacity_and_unknown_leave_are_refused():
    async def scenario():
        inter = make()
        for i in range(4):
            await inter.join(f"s{i}")
        with pytest.raises(Exception, match="full"):
            await inter.join("s4")
        with pytest.raises(Exception, match="already joined"):
            await inter.join("s0")
        with pytest.raises(Exception, match="unknown session"):
            await inter.leave("nobody")

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


# --- delegation --------------------------------------------------------------------------------


def test_delegation_reaches_the_pool_with_no_log_and_its_updates_enter_with_the_next_chunk():
    async def scenario():
        pool = FakePool(replies=("working on it", "it is sunny"))
        inter = make(background=pool)
        await inter.join("a")
        await exchange_then_step(inter, 0, [chunk("a", 0)], ["a"])
        assert pool.tasks == []
        got, _ = await exchange_then_step(inter, 1, [chunk("a", 1, text="please delegate the weather")], ["a"])
        assert got[0].controls == ["delegate"]
        await until(lambda: inter.sessions["a"].updates == ["working on it", "it is sunny"])
        assert inter.engine.sessions["a"]["updates"] == []  # waiting for the session's next chunk
        await exchange_then_step(inter, 2, [chunk("a", 2)], ["a"])
        assert inter.engine.steps[-1][0].updates == ["working on it", "it is sunny"]
        assert inter.engine.sessions["a"]["updates"] == ["working on it", "it is sunny"] and inter.sessions["a"].updates == []
        (task,) = pool.tasks
        assert task.session_id == "a" and task.kind == "delegate" and task.instruction == "please delegate the weather"
        assert task.context_upto == -1  # nothing is logged
        assert (await inter.stats()).totals["updates"] == 2

    asyncio.run(scenario())


def test_delegation_does_not_wait_on_a_slow_log_and_the_log_records_task_and_updates(tmp_path):
    session_log = SessionLog(tmp_path / "log", tick_ms=200)

    async def scenario():
        pool = FakePool(replies=("done",))
        inter = make(log=LocalLog(session_log, delay_s=0.0), background=pool)
        token = (await inter.join("a")).log_token
        await exchange_then_step(inter, 0, [chunk("a", 0)], ["a"])
        await inter.flush()
        inter.log.held = asyncio.Event()  # the log hangs: nothing it is asked returns until released
        appends = inter.log.appends
        await exchange_then_step(inter, 1, [chunk("a", 1, text="please delegate")], ["a"])
        await until(lambda: inter.sessions["a"].updates == ["done"])
        assert inter.log.appends == appends  # the task ran and answered while the log took nothing
        assert pool.tasks[0].context_upto == 2  # joined event, tick 0's input and output: the log may lag a tick
        await exchange_then_step(inter, 2, [chunk("a", 2)], ["a"])
        inter.log.held.set()
        await inter.flush()
        return token, pool.tasks[0]

    token, task = asyncio.run(scenario())
    deltas = from_table(session_log.read("a", token))
    assert [c.updates for c in deltas if isinstance(c, InputChunk)] == [[], [], ["done"]]  # the record of what entered when
    logged = [d for d in deltas if isinstance(d, BackgroundTask)]
    assert [t.task_id for t in logged] == [task.task_id] and logged[0].context_upto == 2
    updates = [d for d in deltas if isinstance(d, BackgroundUpdate)]
    assert [(u.task_id, u.status, u.text) for u in updates] == [(task.task_id, "final", "done")]
    kinds = [type(d).__name__ for d in deltas]
    assert kinds.index("BackgroundTask") > kinds.index("OutputChunk")  # in order after its tick


def test_leaving_cancels_the_running_task(tmp_path):
    session_log = SessionLog(tmp_path / "log", tick_ms=200)

    async def scenario():
        pool = FakePool(replies=("thinking",), hold=True)
        inter = make(log=LocalLog(session_log), background=pool)
        token = (await inter.join("a")).log_token
        await exchange_then_step(inter, 0, [chunk("a", 0, text="please delegate")], ["a"])
        await until(lambda: inter.sessions["a"].updates == ["thinking"])
        assert pool.cancelled == []
        await inter.leave("a")
        await until(lambda: pool.cancelled == [pool.tasks[0].task_id])
        return token, pool.tasks[0]

    token, task = asyncio.run(scenario())
    deltas = from_table(session_log.read("a", token))
    assert [(u.status, u.task_id) for u in deltas if isinstance(u, BackgroundUpdate)][-1] == ("cancelled", task.task_id)
    assert deltas[-1].type == "session.left"


def test_a_newer_task_supersedes_the_running_one():
    async def scenario():
        pool = FakePool(replies=("thinking",), hold=True)
        inter = make(background=pool)
        await inter.join("a")
        await exchange_then_step(inter, 0, [chunk("a", 0, text="please delegate one")], ["a"])
        await until(lambda: len(pool.tasks) == 1)
        await exchange_then_step(inter, 1, [chunk("a", 1, text="please delegate two")], ["a"])
        await until(lambda: pool.cancelled == [pool.tasks[0].task_id])
        first, second = pool.tasks
        assert second.supersedes == first.task_id and second.instruction == "please delegate two"
        assert inter.sessions["a"].task is second and not inter.sessions["a"].runner.done()
        await inter.leave("a")
        await until(lambda: pool.cancelled == [first.task_id, second.task_id])

    asyncio.run(scenario())


def test_with_no_pool_a_delegated_task_is_still_logged(tmp_path):
    session_log = SessionLog(tmp_path / "log", tick_ms=200)

    async def scenario():
        inter = make(log=LocalLog(session_log))
        token = (await inter.join("a")).log_token
        await exchange_then_step(inter, 0, [chunk("a", 0, text="please delegate")], ["a"])
        await inter.flush()
        return token

    token = asyncio.run(scenario())
    assert [d.kind for d in from_table(session_log.read("a", token)) if isinstance(d, BackgroundTask)] == ["delegate"]


# --- the Ray actor, with the real engine -------------------------------------------------------


def test_ray_actor_builds_the_real_engine_and_keeps_time_when_a_client_stops_sending(ray_cluster, tmp_path):
    """Real clock, real `tiny` engine built inside the actor, the log actor through its port:
    B stops after 3 ticks; A's and B's outputs keep coming every tick; everything is logged.
    A tick the actor sheds (a machine too busy to keep up) is no tick for either: counted, not stepped."""
    log_actor = SessionLogActor.remote(str(tmp_path / "log"), tick_ms=200)
    actor = InteractionActor.remote(EngineSpec("tiny", device="cpu", max_sessions=4), log=Remote(log_actor, Log), grace_ms=60, max_sessions=4)
    clock = ray_cluster.get(actor.ready.remote(), timeout=120)
    assert clock["tick_ms"] == 200

    async def client(sid, ticks_sending, n_ticks):
        info = await actor.join.remote(sid)
        first = info.first_tick
        got = []
        for k in range(first, first + n_ticks):
            delay = clock["t0"] + k * clock["tick_s"] - time.time()
            if delay > 0:  # a client in real time: chunk k goes in when tick k starts
                await asyncio.sleep(delay)
            chunks = [chunk(sid, k)] if k - first < ticks_sending else []
            got.append(asyncio.ensure_future(actor.exchange.remote(k, chunks, [sid])))
        outs = [o for batch in await asyncio.gather(*got) for o in batch]
        await actor.leave.remote(sid)
        return info, outs

    async def both():
        return await asyncio.gather(client("a", 12, 12), client("b", 3, 12))

    (ia, outs_a), (ib, outs_b) = asyncio.run(both())
    stats = ray_cluster.get(actor.stats.remote())
    shed = stats.totals["shed_ticks"]
    seqs_a, seqs_b = [o.seq for o in outs_a], [o.seq for o in outs_b]
    for info, seqs in ((ia, seqs_a), (ib, seqs_b)):  # B's too: stepped as missing, never waited for
        assert seqs == sorted(set(seqs)) and set(seqs) <= set(range(info.first_tick, info.first_tick + 12))
        assert len(seqs) + shed >= 12, (seqs, shed)
    both_on = range(max(ia.first_tick, ib.first_tick), min(ia.first_tick, ib.first_tick) + 12)
    assert [k for k in seqs_a if k in both_on] == [k for k in seqs_b if k in both_on]  # one batched step for both
    assert all(o.audio.shape == (SAMPLES,) for o in outs_a + outs_b)
    assert stats.sessions == 0 and stats.totals["missing_chunks"] + shed >= 9
    table = ray_cluster.get(log_actor.read.remote("b", ib.log_token))
    logged = [d for d in from_table(table) if isinstance(d, InputChunk)]
    assert [c.seq for c in logged][: len(seqs_b)] == seqs_b  # every tick stepped is on record (and any stepped before B left)
    assert sum(c.missing for c in logged) + shed >= 9  # B's silence is on record
    ray_cluster.kill(actor)
    ray_cluster.kill(log_actor, no_restart=True)


# --- overload: shedding, admission, bounded queues -----------------------------------------------


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


def test_join_is_refused_while_steps_run_hot_and_accepted_again_after():
    async def scenario():
        inter = Interaction(MockEngine(tick_ms=50, max_sessions=4, step_s=0.04), t0=0.0, now=FakeTime())  # 80% of the tick
        await inter.join("a")
        for k in range(3):
            await inter.step(k)
        with pytest.raises(ProtocolError, match="overloaded"):
            await inter.join("b")
        inter.engine.step_s = 0.0
        for k in range(3, 3 + 25):
            await inter.step(k)
        assert (await inter.join("b")).first_tick == 28

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


class FlakyLog(LocalLog):
    """Fails `fail` appends with a connection error (and refuses `refuse` with a ProtocolError) first."""

    def __init__(self, log, fail=0, refuse=0):
        super().__init__(log)
        self.fail, self.refuse, self.calls = fail, refuse, []

    async def append(self, deltas, request_id=None, epochs=None):
        self.calls.append(request_id)
        if self.refuse:
            self.refuse -= 1
            raise ProtocolError("no", "invalid_delta")
        if self.fail:
            self.fail -= 1
            raise ConnectionError("the log is restarting")
        return await super().append(deltas, request_id, epochs)


def test_a_failing_log_is_retried_in_order_and_a_refusal_is_not(tmp_path):
    session_log = SessionLog(tmp_path / "log", tick_ms=200)

    async def scenario():
        log = FlakyLog(session_log)
        inter = make(log=log)
        token = (await inter.join("a")).log_token
        await inter.flush()
        log.fail = 3
        for k in range(3):
            await exchange_then_step(inter, k, [chunk("a", k)], ["a"])
        assert await inter.flush(timeout=30)
        assert len(log.calls) == 1 + 3 + 3 and log.calls[1:4] == [log.calls[4]] * 3  # the same request, again
        log.refuse = 1
        await exchange_then_step(inter, 3, [chunk("a", 3)], ["a"])
        await exchange_then_step(inter, 4, [chunk("a", 4)], ["a"])
        assert await inter.flush(timeout=30)
        totals = (await inter.stats()).totals
        assert (totals["log_retries"], totals["log_refused"], totals["log_dropped"]) == (3, 1, 0)
        return token

    token = asyncio.run(scenario())
    inputs = [d.seq for d in from_table(session_log.read("a", token)) if isinstance(d, InputChunk)]
    assert inputs == [0, 1, 2, 4]  # once each, in order; the refused tick 3 is not retried


def test_the_log_backlog_is_bounded_and_drops_the_oldest(tmp_path):
    session_log = SessionLog(tmp_path / "log", tick_ms=200)

    async def scenario():
        log = FlakyLog(session_log)
        inter = Interaction(MockEngine(max_sessions=4), log=log, t0=0.0, now=FakeTime(), log_backlog=3, snapshot_s=None)
        token = (await inter.join("a")).log_token
        await inter.flush()
        log.fail = 10**9  # down
        for k in range(8):
            await exchange_then_step(inter, k, [chunk("a", k)], ["a"])
            assert len(inter.logs.queue) <= 3
        assert not await inter.flush(timeout=0.2)
        log.fail = 0  # back
        assert await inter.flush(timeout=30)
        assert (await inter.stats()).totals["log_dropped"] == 5
        return token

    token = asyncio.run(scenario())
    inputs = [d.seq for d in from_table(session_log.read("a", token)) if isinstance(d, InputChunk)]
    assert inputs == [5, 6, 7]  # the newest; the oldest were dropped while the log was down


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
