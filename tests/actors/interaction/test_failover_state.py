"""A session's model state survives its interaction actor: periodic snapshots and the logged input
chunks rebuild it exactly, after a crash (a new `Interaction` on the same clock and log) or a
drain (`release` here, `resume` there). Ray-free: the real `tiny` engine, a real `SessionLog` in
process, a fake clock, ticks stepped by hand. The engine samples (temperature 1, noise drawn from
each session's seed and tick) and never mutes, so text, controls and audio vary every tick and any
difference in a rebuilt state shows."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from actors.interaction.interaction import Interaction
from actors.log.session_log import SessionLog
from models.engine import StreamingEngine
from protocols.requests import SessionSettings, TaskRequest
from protocols import BackgroundUpdate, InputChunk, OutputChunk, ProtocolError, SessionEvent, from_table
from tests.fakes import FakePool, LocalLog
from tests.waits import until

SIDS = ("a", "b", "c")
SAMPLES = 3_200
# A replay steps a session alone, so its float32 sums differ from the batched ones in the last bits
# (as batching does, see tests/models/test_engine_step.py). What the model decides (text, controls, its
# positions) is compared exactly; two things amplify the last bits and are compared loosely: the
# vocoder's peak-locked phase (a near tie between two bins changes the waveform for good, not its
# level) and the dMel codes of what the model said (a value on a step's edge; a rare code).
LEVEL = 0.01  # relative audio level per tick
CODES = 0.01  # share of fed-back dMel codes that may differ
TOOLS = [{"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}]


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make_chunk(sid: str, k: int) -> InputChunk:
    """Tick k of a session: its own noisy tone; typed text, a forced turn, function tools (tick 0)
    and requests that start a background task with them (the tick before each update, so that an
    actor a session was just resumed on has a task to stream it) at fixed ticks."""
    rng = np.random.default_rng([ord(sid), k])
    t = np.arange(SAMPLES) / 16_000 + k * 0.2
    audio = (3000 * np.sin(2 * np.pi * (180 + 40 * ord(sid) % 7) * t) + rng.normal(0, 900, SAMPLES)).astype(np.int16)
    events = [{"type": "session.update", "session": {"tools": TOOLS}}] if k == 0 else [{"type": "response.create"}] if k % 11 == 1 else []
    requests = [SessionSettings(tools=TOOLS)] if k == 0 else [TaskRequest()] if k % 11 == 1 else []
    return InputChunk(sid, k, k * 0.2, audio, text="and the weather?" if k % 13 == 5 else "",
                      forced="speak" if k % 17 in (8, 9) else None, events=events, requests=requests)


def update_for(sid: str, k: int) -> str | None:
    return f"tick {k}: news for {sid}" if k % 11 == 2 else None  # one between the last snapshots and the crash


class Run:
    """An `Interaction` on the real tiny engine, stepped tick by tick on a fake clock; its pool
    (its own, or the one of the actor it takes over from: the pool outlives an actor) holds every
    task, streaming the updates a test feeds it."""

    def __init__(self, log=None, time=None, snapshot_s=2.0, pool=None):
        self.time = time or FakeTime()
        engine = StreamingEngine("tiny", max_sessions=4, temperature=1.0, mute_when_silent=False)
        self.pool = pool or FakePool(replies=(), hold=True)
        self.inter = Interaction(engine, log=log, background=self.pool, t0=0.0, now=self.time, snapshot_s=snapshot_s)

    async def update(self, sid: str, text: str) -> None:
        """`text` streamed by the session's running task, as the pool's updates come; returns once
        it waits to enter the session's next chunk."""
        session = self.inter.sessions[sid]
        task_id = session.task.task_id
        await until(lambda: task_id in self.pool.inboxes)
        self.pool.feed(task_id, text)
        await until(lambda: text in session.updates)

    async def tick(self, k: int, sids, updates: bool = True) -> dict[str, OutputChunk]:
        self.time.t = k * 0.2 + 0.05
        for sid in sids:
            if updates and update_for(sid, k):
                await self.update(sid, update_for(sid, k))
        chunks = [make_chunk(sid, k) for sid in sids]
        got = asyncio.create_task(self.inter.exchange(k, chunks, list(sids)))
        await asyncio.sleep(0)
        await self.inter.step(k)
        return {o.session_id: o for o in await got}


def heard(engine: StreamingEngine, sid: str) -> dict[str, np.ndarray]:
    """What the session's model carries into its next tick besides its KV cache: the dMel of what
    it said, its text and control, its position and clock."""
    row = engine.sessions.index(sid)
    return {name: engine.rows[name][row].cpu().numpy().copy() for name in ("prev_codes", "prev_text", "prev_ctrl", "pos", "tick")}


def reference(ticks, sids=SIDS) -> dict[int, dict[str, tuple[OutputChunk, dict]]]:
    """The same sessions, never interrupted (the engine is told of skipped ticks as the log is):
    each tick's output and what the model carries on, by session."""
    async def scenario():
        run, out = Run(), {}
        for sid in sids:
            await run.inter.join(sid)
        for k in ticks:
            got = await run.tick(k, sids)
            out[k] = {sid: (got[sid], heard(run.inter.engine, sid)) for sid in sids}
        return out

    return asyncio.run(scenario())


def same(run: "Run", got: dict[str, OutputChunk], want: dict[str, tuple[OutputChunk, dict]], sids=SIDS) -> None:
    for sid in sids:
        out, (ref, carried) = got[sid], want[sid]
        assert (out.session_id, out.seq, out.text, out.controls) == (ref.session_id, ref.seq, ref.text, ref.controls)
        assert abs(_level(out) - _level(ref)) <= LEVEL * _level(ref) + 1
        now = heard(run.inter.engine, sid)
        assert all(np.array_equal(now[name], carried[name]) for name in ("prev_text", "prev_ctrl", "pos", "tick")), sid
        assert np.mean(now["prev_codes"] != carried["prev_codes"]) <= CODES, sid


def _level(out: OutputChunk) -> float:
    return float(np.sqrt(np.mean(out.audio.astype(np.float64) ** 2)))


def test_sessions_resumed_on_a_restarted_actor_go_on_exactly(tmp_path):
    """Three sessions, 40 ticks, a snapshot every 10 ticks (taken in turn); the actor is gone
    (its object dropped) and a new one on the same clock and log resumes all three from their
    snapshots and chunks: the next 20 ticks are the ones an uninterrupted run produces."""
    session_log = SessionLog(tmp_path / "log", tick_ms=200)
    want = reference(range(60))

    async def scenario():
        log = LocalLog(session_log)
        first = Run(log)
        for sid in SIDS:
            await first.inter.join(sid)
        for k in range(40):
            same(first, await first.tick(k, SIDS), want[k])
        assert first.inter.core.totals["snapshots"] >= 3 * 4
        await first.inter.flush()
        time = first.time
        second = Run(log, time, pool=first.pool)
        del first
        answers = {sid: await second.inter.resume(sid) for sid in SIDS}
        for sid, a in answers.items():
            assert a.first_tick == 40 and a.resumed.from_tick == 39 and a.resumed.mismatches == 0
            assert 0 < a.resumed.replayed <= 10  # from a snapshot, not from the start
        assert len({a.resumed.replayed for a in answers.values()}) > 1  # snapshots were taken on different ticks
        assert await second.inter.resume("a") == replace(answers["a"], resumed=None)
        assert second.inter.sessions["a"].tools == TOOLS  # what the chunks told the actor comes back too
        for k in range(40, 60):
            same(second, await second.tick(k, SIDS), want[k])
        stats = await second.inter.stats()
        assert stats.totals["resumed"] == 3 and stats.totals["replay_mismatches"] == 0
        await second.inter.flush()
        return answers

    answers = asyncio.run(scenario())
    deltas = from_table(session_log.read("a", answers["a"].log_token))
    assert [c.seq for c in deltas if isinstance(c, InputChunk)] == list(range(60))  # one complete record
    assert [e.type for e in deltas if isinstance(e, SessionEvent)] == ["session.joined", "session.resumed"]
    assert [c.updates for c in deltas if isinstance(c, InputChunk) and c.updates] == [[update_for("a", k)] for k in (2, 13, 24, 35, 46, 57)]


def test_a_session_that_was_nowhere_for_a_while_resumes_across_a_gap_and_replays_it_exactly(tmp_path):
    """Resumed 5 ticks after its last: those ticks are never stepped (absent from its log and its
    model history, as when ticks are shed). A second crash replays across the gap exactly."""
    session_log = SessionLog(tmp_path / "log", tick_ms=200)
    ticks = [*range(25), *range(30, 45)]
    want = reference(ticks, ("a",))  # stepping 30 after 24 sheds 25-29 there too

    async def scenario():
        log = LocalLog(session_log)
        first = Run(log, snapshot_s=None)  # no snapshots: every replay is from the start
        await first.inter.join("a")
        for k in range(25):
            await first.tick(k, "a")
        await first.inter.flush()
        time = first.time
        time.t = 30 * 0.2 + 0.01
        second = Run(log, time, snapshot_s=None, pool=first.pool)
        del first
        answer = await second.inter.resume("a")
        assert (answer.first_tick, answer.resumed.from_tick, answer.resumed.replayed) == (30, 24, 25)
        for k in range(30, 40):
            same(second, await second.tick(k, "a"), want[k], "a")
        await second.inter.flush()
        third = Run(log, time, snapshot_s=None, pool=second.pool)
        del second
        answer = await third.inter.resume("a")
        assert answer.resumed.replayed == 25 + 10 and answer.resumed.mismatches == 0 and answer.first_tick == 40
        for k in range(40, 45):
            same(third, await third.tick(k, "a"), want[k], "a")
        await third.inter.flush()
        return answer.log_token

    token = asyncio.run(scenario())
    inputs = [c.seq for c in from_table(session_log.read("a", token)) if isinstance(c, InputChunk)]
    assert inputs == ticks


def test_a_released_session_resumes_on_another_actor_exactly(tmp_path):
    """Drain: A leaves actor X by `release` (snapshot after its last tick, its running task
    cancelled as moved, update texts still waiting carried over) and resumes on actor Y; B stays
    on X. Both go on as if nothing had happened."""
    session_log = SessionLog(tmp_path / "log", tick_ms=200)
    want = reference(range(30), ("a", "b"))

    async def scenario():
        log = LocalLog(session_log)
        x = Run(log)
        pool = x.pool
        for sid in ("a", "b"):
            await x.inter.join(sid)
        for k in range(13):
            same(x, await x.tick(k, ("a", "b")), want[k], "ab")
        running = x.inter.sessions["a"].task  # asked for at tick 12 (or delegated since): running when A moves
        assert running.task_id not in pool.cancelled
        await x.update("a", update_for("a", 13))  # waits for tick 13, which is stepped on Y
        await x.inter.release("a")
        assert list(x.inter.sessions) == ["b"] and x.inter.engine.sessions == ["b"]
        await until(lambda: running.task_id in pool.cancelled)

        y = Run(log, x.time)
        answer = await y.inter.resume("a")
        assert answer.resumed.replayed == 0 and answer.first_tick == 13 and answer.resumed.from_tick == 12
        assert y.inter.sessions["a"].updates == [update_for("a", 13)]
        for k in range(13, 30):
            x.time.t = y.time.t = k * 0.2 + 0.05
            got_b = asyncio.create_task(x.tick(k, ("b",)))
            same(y, await y.tick(k, ("a",), updates=k != 13), want[k], "a")
            same(x, await got_b, want[k], "b")
        await y.inter.flush()
        return answer.log_token, running

    token, running = asyncio.run(scenario())
    deltas = from_table(session_log.read("a", token))
    assert [c.seq for c in deltas if isinstance(c, InputChunk)] == list(range(30))
    moved = [u for u in deltas if isinstance(u, BackgroundUpdate) and u.text == "moved"]
    assert [(u.status, u.task_id) for u in moved] == [("cancelled", running.task_id)]
    assert [e.type for e in deltas if isinstance(e, SessionEvent)] == ["session.joined", "session.released", "session.resumed"]


def test_an_actor_too_slow_to_answer_is_fenced_off_when_its_session_resumes_elsewhere(tmp_path):
    """A is resumed on Y while X, slow but alive, still holds it (the ingress gave up on X). X
    goes on stepping A on silence for a tick; the log refuses X's rows, snapshot and close for A
    (its epoch is stale), so A's log is Y's alone, in order, with no tick twice; X lets A go and
    keeps B; Y goes on exactly."""
    session_log = SessionLog(tmp_path / "log", tick_ms=200)
    want = reference(range(20), ("a", "b"))

    async def scenario():
        log = LocalLog(session_log)
        x = Run(log, snapshot_s=0.2)  # a snapshot every tick: X's stale one would be the newest
        for sid in ("a", "b"):
            await x.inter.join(sid)
        for k in range(10):
            same(x, await x.tick(k, ("a", "b")), want[k], "ab")
        await x.inter.flush()

        y = Run(log, x.time)
        answer = await y.inter.resume("a")  # X is not asked: it did not answer in time
        assert answer.first_tick == 10 and y.inter.sessions["a"].epoch == 1
        for k in range(10, 20):
            x.time.t = y.time.t = k * 0.2 + 0.05
            got_b = asyncio.create_task(x.tick(k, ("b",)))  # the ingress feeds A to Y now
            same(y, await y.tick(k, ("a",)), want[k], "a")
            same(x, await got_b, want[k], "b")
            await x.inter.flush()
        stats = await x.inter.stats()
        assert list(x.inter.sessions) == ["b"] and x.inter.engine.sessions == ["b"]
        assert stats.totals["fenced"] == 1 and stats.totals["log_refused"] >= 1  # its snapshot of A too
        await x.inter.leave("b")
        await y.inter.leave("a")
        await y.inter.flush()
        return answer.log_token

    token = asyncio.run(scenario())
    deltas = from_table(session_log.read("a", token))
    assert [c.seq for c in deltas if isinstance(c, InputChunk)] == list(range(20))
    assert [c.seq for c in deltas if isinstance(c, OutputChunk)] == list(range(20))
    assert [e.type for e in deltas if isinstance(e, SessionEvent)] == ["session.joined", "session.resumed", "session.left"]
    with pytest.raises(ProtocolError, match="is closed"):  # closed by Y, its writer, at the end
        session_log.open("a", token)


def test_resume_without_a_log_is_refused():
    async def scenario():
        run = Run()
        with pytest.raises(Exception, match="no session log"):
            await run.inter.resume("a")

    asyncio.run(scenario())
