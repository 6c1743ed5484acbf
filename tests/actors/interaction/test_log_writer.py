"""LogWriter: every chunk and output in the session log in order, a failing log retried in order
(a refusal not), and the bounded backlog. Against `tests.fakes.MockEngine` through the engine port.
"""

import asyncio

import numpy as np
import pytest

from actors.interaction.interaction import Interaction
from actors.log.session_log import SessionLog
from protocols import InputChunk, OutputChunk, ProtocolError, SessionEvent, from_table
from tests.fakes import LocalLog, MockEngine

from .helpers import FakeTime, chunk, exchange_then_step, make


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
