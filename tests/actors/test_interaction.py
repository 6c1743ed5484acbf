"""The InteractionActor: the clock, missing and late chunks, bad input, the log, the Ray actor."""

import asyncio
import time
import uuid

import numpy as np
import pytest

from actors.interaction import Interaction, InteractionActor
from actors.session_log import SessionLog, start_session_log
from models.engine import StreamingEngine
from protocols import CHUNK_SAMPLES, InputChunk, from_table

rng = np.random.default_rng(1)


def chunk(sid, seq, frame=None):
    audio = rng.integers(-3000, 3000, CHUNK_SAMPLES, dtype=np.int16)
    return InputChunk(sid, seq, seq * 0.2, audio, frame=frame)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(tmp_path, log=True):
    clock = Clock()
    session_log = SessionLog(tmp_path / "log") if log else None
    return Interaction(StreamingEngine("tiny", max_sessions=4), session_log, t0=0.0, clock=clock), clock, session_log


async def exchange_then_step(inter, tick, chunks, sids):
    task = asyncio.create_task(inter.exchange(tick, chunks, sids))
    await asyncio.sleep(0)  # the exchange hands its chunks in before the deadline
    stepped = await inter.step(tick)
    return await task, stepped


def test_missing_chunk_is_stepped_as_silence_and_others_get_their_output(tmp_path):
    async def scenario():
        inter, clock, _ = make(tmp_path, log=False)
        assert (await inter.join("a"))["first_tick"] == 0
        await inter.join("b")
        got, stepped = await exchange_then_step(inter, 0, [chunk("a", 0)], ["a", "b"])
        assert [o.session_id for o in got] == ["a", "b"] and all(o.seq == 0 for o in got)
        assert set(stepped) == {"a", "b"}
        assert inter.stats()["missing_chunks"] == 1
        return got

    got = asyncio.run(scenario())
    assert got[0].audio.shape == (CHUNK_SAMPLES,)


def test_late_chunk_is_counted_and_still_gets_the_tick_output(tmp_path):
    async def scenario():
        inter, clock, _ = make(tmp_path, log=False)
        await inter.join("a")
        stepped = await inter.step(0)  # nobody handed chunk 0 in: stepped as missing
        late = await inter.exchange(0, [chunk("a", 0)], ["a"])
        assert late == [stepped["a"]]
        await exchange_then_step(inter, 1, [chunk("a", 1)], ["a"])
        stats = inter.stats()
        assert stats["late_chunks"] == 1 and stats["missing_chunks"] == 1

    asyncio.run(scenario())


def test_one_sessions_bad_frame_is_an_error_event_and_the_other_goes_on(tmp_path):
    async def scenario():
        inter, clock, _ = make(tmp_path, log=False)
        await inter.join("a")
        await inter.join("b")
        wrong = np.zeros((80, 80, 3), np.uint8)  # a valid frame, but not the model's 160x160
        got, _ = await exchange_then_step(inter, 0, [chunk("a", 0), chunk("b", 0, frame=wrong)], ["a", "b"])
        by = {o.session_id: o for o in got}
        assert not [e for e in by["a"].events if e.get("type") == "error"]
        errors = [e for e in by["b"].events if e.get("type") == "error"]
        assert errors and errors[0]["error"]["code"] == "invalid_frame"
        got, _ = await exchange_then_step(inter, 1, [chunk("a", 1), chunk("b", 1)], ["a", "b"])
        assert all(not [e for e in o.events if e.get("type") == "error"] for o in got)

    asyncio.run(scenario())


def test_every_chunk_and_output_lands_in_the_log_in_order(tmp_path):
    async def scenario():
        inter, clock, session_log = make(tmp_path)
        a = await inter.join("a")
        await inter.join("b")
        sent = []
        for k in range(4):
            c = chunk("a", k)
            sent.append(c)
            await exchange_then_step(inter, k, [c], ["a", "b"])
        await inter.leave("b")
        await inter.flush()
        return session_log, a["log_token"], sent

    session_log, token, sent = asyncio.run(scenario())
    deltas = from_table(session_log.read("a", token))
    inputs = [d for d in deltas if type(d).__name__ == "InputChunk"]
    outputs = [d for d in deltas if type(d).__name__ == "OutputChunk"]
    assert [c.seq for c in inputs] == [0, 1, 2, 3] and [o.seq for o in outputs] == [0, 1, 2, 3]
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(inputs, sent))
    assert type(deltas[0]).__name__ == "SessionEvent" and deltas[0].type == "session.joined"
    with pytest.raises(Exception, match="forbidden|token"):
        session_log.read("b", token)  # a session reads only its own log


def test_join_beyond_capacity_and_unknown_leave_are_refused(tmp_path):
    async def scenario():
        inter, _, _ = make(tmp_path, log=False)
        for i in range(4):
            await inter.join(f"s{i}")
        with pytest.raises(Exception, match="full"):
            await inter.join("s4")
        with pytest.raises(Exception, match="already joined"):
            await inter.join("s0")
        with pytest.raises(Exception, match="unknown session"):
            await inter.leave("nobody")

    asyncio.run(scenario())


def test_ray_actor_keeps_time_when_a_client_stops_sending(ray_cluster, tmp_path):
    """Real clock and Ray actor: B stops after 3 ticks; A's outputs keep coming every tick."""
    log_name = f"log-{uuid.uuid4().hex[:6]}"
    log_actor = start_session_log(str(tmp_path / "log"), name=log_name, namespace="test")
    ray_cluster.get(log_actor.stats.remote())
    config = {"model": {"preset": "tiny", "device": "cpu"}, "interaction": {"max_sessions": 4, "grace_ms": 60}}
    actor = InteractionActor.options(namespace="test").remote(config, log_name, "test")
    clock = ray_cluster.get(actor.ready.remote(), timeout=120)

    async def client(sid, ticks_sending, n_ticks):
        info = await actor.join.remote(sid)
        first = info["first_tick"]
        got = []
        for k in range(first, first + n_ticks):
            delay = clock["t0"] + k * clock["tick_s"] - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            chunks = [chunk(sid, k)] if k - first < ticks_sending else []
            got.append(asyncio.ensure_future(actor.exchange.remote(k, chunks, [sid])))
        outs = [o for batch in await asyncio.gather(*got) for o in batch]
        return first, outs

    async def both():
        return await asyncio.gather(client("a", 12, 12), client("b", 3, 12))

    (fa, outs_a), (fb, outs_b) = asyncio.run(both())
    assert [o.seq for o in outs_a] == list(range(fa, fa + 12))
    assert [o.seq for o in outs_b] == list(range(fb, fb + 12))  # stepped as missing, never waited for
    stats = ray_cluster.get(actor.stats.remote())
    assert stats["sessions"] == 2 and stats["missing_chunks"] >= 8
    ray_cluster.kill(actor)
    ray_cluster.kill(log_actor)


def test_a_tick_is_stepped_as_soon_as_every_chunk_is_in():
    """With a long grace, a complete tick still steps at once instead of at its deadline."""

    async def scenario():
        inter = Interaction(StreamingEngine("tiny", max_sessions=2), None, t0=time.time(), grace_s=0.6)
        first = (await inter.join("a"))["first_tick"]
        inter.start()
        for k in range(first, first + 3):
            await asyncio.sleep(max(0.0, inter.t0 + (k + 1) * inter.tick_s - time.time()))
            await inter.exchange(k, [chunk("a", k)], ["a"])
        return inter.stats()["ticks"]

    ticks = asyncio.run(scenario())
    assert len(ticks) == 3
    assert all(t["lag_ms"] < -300 for t in ticks)  # stepped long before end of tick + 600 ms
