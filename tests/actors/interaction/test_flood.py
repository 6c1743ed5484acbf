"""One caller floods, another goes on: a session asking for a background task every tick, whose
tasks call the tools with hostile input (a CPU-burning snippet in the real sandbox, calculator
expressions built to be huge), beside a session that talks and asks for one task. Real parts: the
interaction logic, the session log on disk, the background pool's work and its tools; the LLM is
scripted (`bench.flood.FloodChat`) and the engine is the mock (neither is what is under test)."""

import asyncio

from actors.background.background import Background
from actors.interaction.interaction import Interaction
from actors.log.session_log import SessionLog
from actors.background.tools import default_tools
from bench.flood import FloodChat
from protocols import BackgroundTask, BackgroundUpdate, InputChunk, from_table
from tests.fakes import LocalLog, MockEngine
from tests.sandboxes import sandbox_python

from tests.waits import until

from .helpers import FakeTime, chunk, exchange_then_step

TICKS = 30


def test_a_session_flooding_tasks_and_tools_does_not_hold_up_another_sessions_ticks_log_or_task(tmp_path):
    python, why = sandbox_python()
    from actors.background.sandbox import SandboxLimits

    sandbox = SandboxLimits(timeout_s=3.0, cpu_s=2, python=python) if why is None else None
    tools = default_tools(sandbox)

    async def scenario():
        session_log = SessionLog(tmp_path / "log", tick_ms=200)
        log = LocalLog(session_log)
        pool = Background(FloodChat(python=sandbox is not None), log=session_log, tools=tools, timeout_s=30)
        inter = Interaction(MockEngine(max_sessions=4), log=log, background=pool, t0=0.0, now=FakeTime(), snapshot_s=None,
                            task_starts_per_s=0.5, task_burst=3)
        await inter.join("flood")
        await inter.join("calm")
        refused = 0
        for tick in range(TICKS):
            inter.now.t = tick * 0.2
            chunks = [chunk("flood", tick, text="please delegate flood the tools"),
                      chunk("calm", tick, text="please delegate the weather" if tick == 10 else "")]
            got, _ = await exchange_then_step(inter, tick, chunks, ["flood", "calm"])
            assert {o.session_id for o in got} == {"flood", "calm"}  # both stepped at every tick
            for out in got:
                errors = [e["error"]["code"] for e in out.events if e.get("type") == "error"]
                assert out.session_id == "flood" or not errors, errors  # nothing of the flood reaches the calm session
                refused += errors.count("rate_limit_exceeded")
            await asyncio.sleep(0)  # the pool's work and the log writer run between ticks
        stats = (await inter.stats()).totals
        started = stats["tasks"]
        # the flooder got its burst and the refill of 6 s at 0.5 a second, no more; the rest were refused out loud
        assert started - 1 <= 3 + 3 and stats["tasks_refused"] == TICKS - (started - 1)
        assert refused >= stats["tasks_refused"] - 1  # the last refusal's event may wait for the next output
        # the calm session's task answered, and its answer reached its model
        await until(lambda: "it is sunny" in inter.engine.sessions["calm"]["updates"] + inter.sessions["calm"].updates, timeout=60)
        assert await inter.flush(timeout=60)
        assert stats["missing_chunks"] == 0 and inter.core.totals["log_dropped"] == 0
        # the calm session's log: every tick in order, its task and the task's final answer, nothing of the flooder's
        rows = from_table(session_log.read("calm", inter.sessions["calm"].log_token))
        inputs = [r.seq for r in rows if isinstance(r, InputChunk)]
        assert inputs == list(range(TICKS))
        tasks = [r for r in rows if isinstance(r, BackgroundTask)]
        assert [t.session_id for t in tasks] == ["calm"]
        assert any(isinstance(r, BackgroundUpdate) and r.status == "final" and r.text == "it is sunny" for r in rows)
        # the flooder's tool calls ended as errors (refused, or stopped at their limits)
        flood = from_table(session_log.read("flood", inter.sessions["flood"].log_token))
        ends = [r for r in flood if isinstance(r, BackgroundUpdate) and r.status in ("final", "error", "cancelled")]
        assert ends and all(r.status != "final" for r in ends)
        for sid in ("flood", "calm"):
            await inter.leave(sid)

    asyncio.run(scenario())
