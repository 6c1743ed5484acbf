"""`Admission`: sessions joining and leaving an interaction actor.

`join` adds a session from the next tick stepped, refused ("capacity") when the actor is full or
while its steps run hot (`Figures.hot`: new sessions wait, live ones keep their ticks). `leave`
takes a session out, cancels its background task and closes its log behind its appends; `left`
is the same for a session that already left `sessions` (orphaned: its log stays open).
"""

from __future__ import annotations

import logging

from protocols import ProtocolError, SessionEvent
from protocols.ports import Log

from actors.interaction.core import Core, JoinedSession
from actors.interaction.log_writer import LogWriter
from actors.interaction.metrics import Figures
from actors.interaction.tasks import Tasks

log = logging.getLogger("interplay.interaction")

LEAVE_FLUSH_S = 10.0


def refuse_if_full(core: Core) -> None:
    if core.full():
        raise ProtocolError(f"this interaction actor is full ({core.max_sessions} sessions)", "capacity")


class Admission:
    def __init__(self, core: Core, log_port: Log | None, logs: LogWriter, tasks: Tasks, figures: Figures):
        self.core, self.log, self.logs, self.tasks, self.figures = core, log_port, logs, tasks, figures

    async def join(self, session_id: str, seed: int | None = None) -> JoinedSession:
        core = self.core
        if session_id in core.sessions:
            raise ProtocolError(f"session {session_id!r} already joined", "session_exists", "session_id")
        refuse_if_full(core)
        if self.figures.hot():
            raise ProtocolError("this interaction actor is overloaded; try again or elsewhere", "capacity")
        token = await self.log.open(session_id) if self.log is not None else None
        # Under the lock no step is in flight: every step passes the engine a chunk for each of
        # its sessions, and the joined event is queued for the log ahead of the session's chunks.
        async with core.engine_lock:
            if session_id in core.sessions or core.full():
                raise ProtocolError(f"session {session_id!r} could not join: joined meanwhile or full", "capacity")
            first = core.next_tick
            core.engine.add_session(session_id, seed=seed)
            session = core.sessions[session_id] = JoinedSession(session_id, first, token, snapshot_due=first,
                                                                snapshot_phase=self.logs.turn(), heard=first)
            self.logs.append([SessionEvent(session_id, core.now(), "session.joined", {"first_tick": first, "seed": seed})])
        return session

    async def leave(self, session_id: str) -> None:
        session = self.core.sessions.pop(session_id, None)
        if session is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        async with self.core.engine_lock:
            self.core.engine.remove_session(session_id)
        self.left(session)
        if self.log is not None and not await self.logs.flush(LEAVE_FLUSH_S):
            log.warning("session %r left; its log closes once the log is back", session_id)

    def left(self, session: JoinedSession, reason: str | None = None, close: bool = True) -> None:
        """A session is out of `sessions` and the engine: its task is cancelled, `session.left`
        logged and (with `close`) its log closed behind its appends."""
        deltas = self.tasks.cancel(session, "the session ended")
        self.logs.append(deltas + [SessionEvent(session.session_id, self.core.now(), "session.left", {"reason": reason} if reason else {})], [session])
        if close:
            self.logs.close(session)
