"""Interaction, the façade: the clock it answers with, and the Ray actor.

The clock test runs against `tests.fakes.MockEngine` through the engine port; the Ray actor test
builds the real `tiny` engine inside the actor from an `EngineSpec`.
"""

import asyncio
import time

import pytest

from actors.interaction.interaction import EngineSpec, Interaction, InteractionActor
from actors.remote import Remote
from actors.log.log_actor import SessionLogActor
from protocols import InputChunk, from_table
from protocols.ports import Log
from tests.fakes import MockEngine

from .helpers import SAMPLES, chunk


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
