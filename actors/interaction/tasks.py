"""`Tasks`: a session's background work, from asking to the update texts woven into its next chunk.

A delegate or tool-call control becomes a `BackgroundTask` handed to the pool at once, and so does
a client's `TaskRequest` (a Realtime response.create) when the session has function tools (from
the request or its `SessionSettings`) even without such a control: its instruction is the text typed since the last
task. The task's updates are reported to the client as events on its next outputs
(`actors.background.events.update_events`) and their texts enter the model with the session's
next chunk (`InputChunk.updates`). A session runs one task at a time (a new one supersedes it) and
starts them at most `burst` at once, refilled at `starts_per_s` (`TokenBucket`); a start over that
is refused with an `error` event (rate_limit_exceeded), so no client can make the pool work every
tick. With no pool, tasks are logged but not run.
"""

from __future__ import annotations

import asyncio
import logging

from protocols import BackgroundTask, BackgroundUpdate, InputChunk, OutputChunk
from protocols.ports import BackgroundPool
from protocols.realtime_events import error_event
from protocols.requests import SessionSettings, TaskRequest

from actors.interaction.core import Core, JoinedSession
from actors.interaction.log_writer import LogWriter
from actors.interaction.quotas import TokenBucket

log = logging.getLogger("interplay.interaction")

MAX_PENDING_UPDATES = 64  # update texts waiting for a session's next chunk; the oldest go beyond
DELEGATING = {"delegate": "delegate", "tool_call": "tool"}  # control -> BackgroundTask.kind


class Tasks:
    def __init__(self, core: Core, pool: BackgroundPool | None, logs: LogWriter, starts_per_s: float, burst: int):
        self.core, self.pool, self.logs = core, pool, logs
        self.starts_per_s, self.burst = starts_per_s, burst

    def pend(self, session: JoinedSession, text: str) -> None:
        """An update text: it enters the model with the session's next chunk."""
        session.updates.append(text)
        if len(session.updates) > MAX_PENDING_UPDATES:
            del session.updates[0]
            self.core.totals["dropped_updates"] += 1

    def after_step(self, chunks: list[InputChunk], outputs: dict[str, OutputChunk]) -> list[BackgroundTask]:
        """The tasks a tick starts: delegated by the model, or asked for by a client."""
        tasks = [self._delegated(out) for out in outputs.values()]
        for chunk in chunks:
            session = self.core.sessions.get(chunk.session_id)
            if session is not None:
                tasks += self.follow(session, chunk, outputs.get(chunk.session_id))
        return [t for t in tasks if t is not None]

    def _delegated(self, out: OutputChunk) -> BackgroundTask | None:
        """A delegate/tool control as a BackgroundTask handed to the pool at once.

        Its `context_upto` is the last log index known for its session when it is made: the log is
        appended off the tick's path, so it may lag the current tick by one, and the pool's context
        ends there (the tick that made the task, and any before it not yet acknowledged, are not in
        it; the task's own instruction is)."""
        session = self.core.sessions.get(out.session_id)
        kinds = [DELEGATING[c] for c in out.controls if c in DELEGATING]
        if session is None or not kinds or not self._may_start(session):
            return None
        task = BackgroundTask(
            out.session_id, self.core.now(), kinds[0], out.text, context_upto=session.log_index, log_token=session.log_token,
            supersedes=session.task.task_id if session.task and session.busy else None,
            arguments={"tools": session.tools} if session.tools else {},
        )
        return self._start(session, task)

    def follow(self, session: JoinedSession, chunk: InputChunk, out: OutputChunk | None, start: bool = True) -> list[BackgroundTask]:
        """What a chunk tells this actor of its session: typed text, `SessionSettings` (function
        tools, tool_choice) and `TaskRequest`s, each asking for a task while function tools are set
        (on the request, or the session) and tool_choice is not "none", unless the model delegated
        this tick already. With `start` False (a resumed session's replay) no task starts: only the
        tools and typed text come up to date, as when the chunk was first stepped."""
        tasks = []
        if chunk.text:
            session.typed = (session.typed + [chunk.text])[-8:]
        for request in chunk.requests:
            if isinstance(request, SessionSettings):
                if request.tools is not None:
                    session.tools = request.tools or None
                if request.tool_choice is not None:
                    session.tool_choice = request.tool_choice
            else:
                task = self._asked(session, chunk, request, out, start)
                if task is not None:
                    tasks.append(task)
        return tasks

    def _asked(self, session: JoinedSession, chunk: InputChunk, asked: TaskRequest, out: OutputChunk | None, start: bool) -> BackgroundTask | None:
        tools = session.tools if asked.tools is None else asked.tools
        choice = session.tool_choice if asked.tool_choice is None else asked.tool_choice
        delegated = out is not None and any(c in DELEGATING for c in out.controls)
        if not tools or choice == "none" or delegated or (start and not self._may_start(session)):
            return None
        instruction = "\n".join(session.typed) or asked.instructions or "Help with the conversation so far."
        session.typed = []
        if not start:
            return None
        task = BackgroundTask(
            chunk.session_id, self.core.now(), "tool", instruction[:4000], context_upto=session.log_index,
            log_token=session.log_token, supersedes=session.task.task_id if session.task and session.busy else None,
            arguments={"tools": tools, "tool_choice": choice},
        )
        return self._start(session, task)

    def _may_start(self, session: JoinedSession) -> bool:
        """Whether the session may start a background task now (its `TokenBucket`); if not, the
        client is told with an `error` event and the conversation goes on without the task."""
        now = self.core.now()
        if session.starts is None:
            session.starts = TokenBucket(self.starts_per_s, self.burst, now)
        if session.starts.take(now):
            return True
        self.core.totals["tasks_refused"] += 1
        session.events.append(error_event(
            f"background tasks are limited to {self.burst} at once and {self.starts_per_s * 60:g} a minute per session; this one was not started",
            "rate_limit_exceeded",
        ))
        return False

    def _start(self, session: JoinedSession, task: BackgroundTask) -> BackgroundTask:
        """Hand `task` to the pool (cancelling the session's running one, which it supersedes)."""
        from actors.background.events import task_events

        self.core.totals["tasks"] += 1
        if session.runner is not None:
            session.runner.cancel()  # no-op once it is done
        session.task, session.runner = task, None
        if self.pool is not None:
            session.events.extend(task_events(task))
            session.runner = asyncio.get_running_loop().create_task(self._consume(self.pool, session, task))
        return task

    def cancel(self, session: JoinedSession, reason: str) -> list:
        """Cancel the session's running task; -> the update that records it."""
        runner, task = session.runner, session.task
        if runner is None or task is None or runner.done():
            return []
        runner.cancel()
        return [BackgroundUpdate(session.session_id, self.core.now(), task.task_id, "cancelled", reason)]

    async def _consume(self, pool: BackgroundPool, session: JoinedSession, task: BackgroundTask) -> None:
        """Stream a task's updates to the session (its next chunks, its next outputs' events) and
        the log until it ends, is superseded or its session leaves (then this is cancelled, which
        cancels the pool's stream)."""
        from actors.background.events import update_events

        sid, sessions = task.session_id, self.core.sessions
        updates = pool.run(task)
        try:
            async for update in updates:
                if sessions.get(sid) is not session:
                    return
                if update.text:
                    self.pend(session, update.text)
                session.events.extend(update_events(update))
                self.core.totals["updates"] += 1
                self.logs.append([update], [session])
        except asyncio.CancelledError:
            if session.task is not task and sessions.get(sid) is session:  # superseded
                self.logs.append([BackgroundUpdate(sid, self.core.now(), task.task_id, "cancelled", "superseded")], [session])
            raise
        except Exception as exc:  # a failed task is an error update; the call goes on
            log.exception("background task %s failed", task.task_id)
            if sessions.get(sid) is session:
                self.logs.append([BackgroundUpdate(sid, self.core.now(), task.task_id, "error", f"background task failed: {type(exc).__name__}")], [session])
        finally:
            await updates.aclose()
