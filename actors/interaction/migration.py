"""`Migration`: sessions moving between interaction actors through the session log.

`resume` rebuilds a session that was live on another actor (or on this one before it restarted)
from `Log.recovery`: the newest snapshot, then its logged input chunks stepped again alone
(`Engine.replay`, off the tick's path), checked against the logged outputs (`replay_mismatches`);
it is then stepped from the next tick here. The ticks it spent nowhere are a forward gap: never
stepped, absent from its log as from its model history, so a later replay of its log sees the same
gap and stays exact. `release` snapshots a session after its last tick and lets it go without
closing its log, for `resume` elsewhere; `drop` lets go of one that lives elsewhere, logging
nothing. `fenced` lets go of a session the log says another writer took over.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from protocols import OutputChunk, ProtocolError, SessionEvent
from protocols.chunks import check_session_id
from protocols.ports import Log
from protocols.seams import Recovery, Resumed

from actors.interaction.admission import refuse_if_full
from actors.interaction.core import Core, JoinedSession
from actors.interaction.log_writer import INTERACTION_STATE, LogWriter
from actors.interaction.tasks import Tasks

log = logging.getLogger("interplay.interaction")

RESUME_WAIT_TICKS = 25  # a resumed session's last tick may be this far ahead of this actor's clock
RELEASE_FLUSH_S = 30.0
REPLAY_AUDIO_LSB, REPLAY_LEVEL = 64, 0.01  # a replayed output's level may differ from the logged one this much


class Migration:
    def __init__(self, core: Core, log_port: Log | None, logs: LogWriter, tasks: Tasks):
        self.core, self.log, self.logs, self.tasks = core, log_port, logs, tasks
        self._removals: set[asyncio.Task] = set()  # held so a pending removal is not garbage-collected

    async def resume(self, session_id: str) -> tuple[JoinedSession, Resumed | None]:
        """-> the session, and what rebuilding it did; None for a session already here, answered
        as it is."""
        core = self.core
        check_session_id(session_id)
        if session_id in core.sessions:
            return core.sessions[session_id], None
        refuse_if_full(core)
        if self.log is None:
            raise ProtocolError("there is no session log to resume a session from", "unavailable")
        rec = await self.log.recovery(session_id)
        inputs, last = rec.inputs, rec.last_tick
        # The replay runs beside the ticks (it touches no live session); only joining takes the lock.
        rebuilt, replayed = await asyncio.get_running_loop().run_in_executor(None, core.engine.replay, session_id, rec.state, None, inputs)
        logged = {o.seq: o for o in rec.outputs}
        mismatches = sum(1 for o in replayed if o.seq in logged and _differs(o, logged[o.seq]))
        async with core.engine_lock:
            if session_id in core.sessions:
                return core.sessions[session_id], None
            refuse_if_full(core)
            first = max(core.next_tick, last + 1 if last is not None else 0)
            if first - max(core.next_tick, core.current_tick()) > RESUME_WAIT_TICKS:
                raise ProtocolError(f"session {session_id!r} is ahead of this actor's clock", "unavailable")
            core.engine.import_session(session_id, rebuilt)
            session = self._rejoined(session_id, rec, first, last, replayed)
            core.totals["resumed"] += 1
            core.totals["replay_mismatches"] += mismatches
            if mismatches:
                log.warning("session %r: %d of %d replayed ticks differ from the log", session_id, mismatches, len(replayed))
            self.logs.append([SessionEvent(session_id, core.now(), "session.resumed",
                                           {"first_tick": first, "from_tick": last, "replayed": len(inputs), "mismatches": mismatches})])
        return session, Resumed(last, len(inputs), mismatches)

    def _rejoined(self, session_id: str, rec: Recovery, first: int, last: int | None, replayed: list[OutputChunk]) -> JoinedSession:
        """The session as the log rebuilds it, joined here from tick `first`."""
        inputs = rec.inputs
        mine = dict((rec.state or {}).get(INTERACTION_STATE) or {})
        session = JoinedSession(session_id, first, rec.log_token, epoch=rec.epoch, last_seq=last,
                                snapshot_due=first, snapshot_phase=self.logs.turn(), heard=first)
        session.tools, session.tool_choice = mine.get("tools"), mine.get("tool_choice", "auto")
        session.typed = list(mine.get("typed") or [])
        by_seq = {o.seq: o for o in replayed}
        for chunk in inputs:  # what the chunks after the snapshot told this actor (tools, typed text)
            self.tasks.follow(session, chunk, by_seq.get(chunk.seq), start=False)
        entered = sum(len(c.updates) for c in inputs)  # updates waiting at the snapshot entered in these, in order
        session.updates = list(mine.get("pending") or [])[entered:]
        self.core.sessions[session_id] = session
        return session

    async def drop(self, session_id: str) -> None:
        """Let a session go that lives elsewhere (a resume here that its asker gave up on, which
        landed anyway): no snapshot, nothing logged, its log left open. Unknown: nothing to do."""
        session = self.core.sessions.pop(session_id, None)
        if session is None:
            return
        self.tasks.cancel(session, "moved")
        async with self.core.engine_lock:
            self.core.engine.remove_session(session_id)

    async def release(self, session_id: str) -> None:
        """Let a session go for `resume` elsewhere: its state after its last tick is snapshotted,
        its running task cancelled ("moved"), and it leaves without its log being closed. Returns
        once the log has all of it; raises "log_unavailable" if the log does not take it in time
        (it is still written when the log is back)."""
        core = self.core
        session = core.sessions.get(session_id)
        if session is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        async with core.engine_lock:
            del core.sessions[session_id]
            state = await asyncio.get_running_loop().run_in_executor(None, self._export_and_remove, session_id)
        core.totals["released"] += 1
        deltas = self.tasks.cancel(session, "moved")
        if self.log is None:
            return
        self.logs.append(deltas + [SessionEvent(session_id, core.now(), "session.released", {"last_tick": session.last_seq})], [session])
        if session.last_seq is not None:
            self.logs.snapshot(session, session.last_seq, state)
        if not await self.logs.flush(RELEASE_FLUSH_S):
            raise ProtocolError("the session log has not taken the session's state yet", "log_unavailable")

    def _export_and_remove(self, session_id: str) -> dict:
        state = self.core.engine.export_session(session_id)
        self.core.engine.remove_session(session_id)
        return state

    def fenced(self, session: JoinedSession) -> None:
        """The log says the session moved on to another writer: let it go here, logging nothing
        (its log is the other writer's now). Its next tick no longer steps it."""
        core, sid = self.core, session.session_id
        del core.sessions[sid]
        core.totals["fenced"] += 1
        log.warning("session %r was taken over elsewhere; letting it go here", sid)
        self.tasks.cancel(session, "moved")

        async def remove() -> None:
            async with core.engine_lock:
                if sid not in core.sessions and sid in core.engine.sessions:
                    core.engine.remove_session(sid)

        task = asyncio.get_running_loop().create_task(remove())
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)


def _differs(replayed: OutputChunk, logged: OutputChunk) -> bool:
    """Whether a replayed output is not the logged one: its text or controls differ, or its level
    does. Not its waveform: float noise may move the vocoder's phase without changing what is said."""
    if (replayed.text, replayed.controls) != (logged.text, logged.controls) or replayed.audio.shape != logged.audio.shape:
        return True
    a, b = _level(replayed.audio), _level(logged.audio)
    return abs(a - b) > max(REPLAY_AUDIO_LSB, REPLAY_LEVEL * b)


def _level(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if audio.size else 0.0
