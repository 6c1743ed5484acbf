"""Tasks: delegation to the background pool, its updates entering with the next chunk, the log's
record of tasks and updates, cancelling on leave, a newer task superseding the running one, and a
task logged with no pool. Against `tests.fakes.MockEngine` through the engine port.
"""

import asyncio

from actors.log.session_log import SessionLog
from protocols import BackgroundTask, BackgroundUpdate, InputChunk, from_table
from tests.fakes import FakePool, LocalLog
from tests.waits import until

from .helpers import chunk, exchange_then_step, make


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
