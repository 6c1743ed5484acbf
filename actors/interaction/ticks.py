"""`Ticks`: the exchange inbox and the tick loop, one batched step of every session per tick.

Ingresses hand in chunk k of their sessions with one `exchange` per tick; tick k is stepped as
soon as every joined session's chunk is in, or at its deadline (end of tick + grace) with the
absent ones stepped as missing (silence), so one slow client never delays the others
(`TickPacer`). Exchanges are taken only AHEAD_TICKS ahead. Overload: a tick whose stepping starts
after the next tick's deadline is not piled up: the loop skips to the newest due tick (the ticks
between are shed: never stepped, a forward gap for every session, counted) and each session's next
output carries an `interplay.shed` event. A session no exchange brought a chunk of for
`orphan_ticks` leaves on its own. Each stepped tick's chunks (with the update texts that entered
with them), outputs and tasks go to the log, then the snapshots due.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Callable

from protocols import InputChunk, OutputChunk, ProtocolError
from protocols.chunks import MAX_UPDATES
from protocols.realtime_events import error_from, server_event
from protocols.seams import TickStats

from actors.interaction.core import Core, JoinedSession
from actors.interaction.log_writer import LogWriter
from actors.interaction.metrics import Figures
from actors.interaction.pacer import TickPacer
from actors.interaction.tasks import Tasks

log = logging.getLogger("interplay.interaction")

KEEP_TICKS = 25  # outputs kept for late exchange calls
AHEAD_TICKS = 5  # an exchange may hand in chunks this many ticks ahead of the clock, no more


class Ticks:
    def __init__(self, core: Core, logs: LogWriter, tasks: Tasks, figures: Figures, *, snapshot_every: int | None,
                 orphan_ticks: int | None, on_orphaned: Callable[[JoinedSession], None]):
        self.core, self.logs, self.tasks, self.figures = core, logs, tasks, figures
        self.snapshot_every, self.orphan_ticks, self.on_orphaned = snapshot_every, orphan_ticks, on_orphaned
        self.pacer = TickPacer(core.deadline, core.due_tick, core.now)
        self.inbox: dict[int, dict[str, InputChunk]] = {}
        self.outputs: dict[int, dict[str, OutputChunk]] = {}
        self.stepped: dict[int, asyncio.Event] = {}
        self.complete: set[int] = set()  # ticks every session's chunk is in for
        self.late = 0

    # --- the exchange an ingress makes once per tick --------------------------------------------

    async def exchange(self, tick: int, chunks: list[InputChunk], session_ids: list[str]) -> list[OutputChunk]:
        """Hand in chunk `tick` of some sessions; get back tick `tick`'s outputs of `session_ids`.

        A chunk for a tick already stepped, or that will be shed (a newer tick is due), is late:
        it is counted and dropped, and whatever outputs that tick has are returned. A tick more than
        AHEAD_TICKS ahead of the clock is refused. Chunks of sessions not joined are dropped;
        unknown sessions get no output (the caller asked wrongly).
        """
        core = self.core
        horizon = max(core.next_tick, core.current_tick()) + AHEAD_TICKS
        if tick > horizon:
            raise ProtocolError(
                f"tick {tick} is too far ahead: the clock is at tick {horizon - AHEAD_TICKS} ({core.now() - core.clock.start(tick):+.3f} s to its start)",
                "invalid_value", "seq",
            )
        if self._hand_in(tick, chunks):
            self.complete.add(tick)
            self.pacer.poke()
        if tick >= core.next_tick:
            await self.stepped.setdefault(tick, asyncio.Event()).wait()
        outs = self.outputs.get(tick, {})
        return [outs[s] for s in session_ids if s in outs]

    def _hand_in(self, tick: int, chunks: list[InputChunk]) -> bool:
        """Put the chunks in tick `tick`'s inbox (late ones are dropped); -> whether it is complete."""
        sessions = self.core.sessions
        stale = tick < self.core.next_tick or tick < self.core.due_tick()
        inbox = None
        for chunk in chunks:
            if chunk.seq != tick:
                raise ProtocolError(f"chunk of session {chunk.session_id!r} has seq {chunk.seq}, not tick {tick}", "invalid_value", "seq")
            session = sessions.get(chunk.session_id)
            if session is not None:  # late or not, its ingress is alive
                session.heard = max(session.heard, tick)
            if stale:
                self.late += 1
                if session is not None:
                    session.drop(chunk)
            elif session is not None:
                inbox = self.inbox.setdefault(tick, {}) if inbox is None else inbox
                inbox[chunk.session_id] = chunk
        return inbox is not None and all(sid in inbox for sid, s in sessions.items() if s.first_tick <= tick)

    # --- the tick loop -----------------------------------------------------------------------

    async def tick_once(self) -> int:
        """Wait for the next tick (its deadline, or until its chunks are all in) and step it; when
        behind (a newer tick is due already), step the newest due tick instead, shedding those
        between. Returns the tick stepped."""
        tick = await self.pacer.next(self.core.next_tick, self.complete.__contains__)
        try:
            await self.step(tick)
        except Exception:  # a broken step must not stop the clock for everyone
            log.exception("tick %d failed", tick)
            self.core.next_tick = max(self.core.next_tick, tick + 1)
            self._finish(tick, {})
        return tick

    async def step(self, tick: int) -> dict[str, OutputChunk]:
        """Step tick `tick` for every joined session now, the engine off the event loop so that
        exchanges keep arriving; ticks skipped since the last one are shed. Hand delegated work
        to the pool; queue the tick (and the snapshots due) for the log."""
        core = self.core
        lag_ms = (core.now() - core.deadline(tick)) * 1000
        async with core.engine_lock:
            if tick < core.next_tick:
                raise ValueError(f"tick {tick} was stepped already (next is {core.next_tick})")
            shed = self._shed(tick)
            orphans = self._orphans(tick)
            core.next_tick = tick + 1
            chunks, missing, stepped = self._chunks(tick, self.inbox.pop(tick, {}))
            outputs, states, step_ms = await self._run_engine(tick, chunks) if chunks else ({}, {}, 0.0)
        self._count(TickStats(tick, len(chunks), self.late, missing, step_ms, lag_ms, shed))
        tasks = self.tasks.after_step(chunks, outputs)
        self._tell(outputs)
        self._finish(tick, outputs)
        if chunks:
            self.logs.append([*chunks, *outputs.values(), *tasks], stepped)
        for session in orphans:
            self.on_orphaned(session)
        for sid, state in states.items():  # behind the tick's own chunks in the log
            session = core.sessions.get(sid)
            if session is not None:
                self.logs.snapshot(session, tick, state)
        return outputs

    def _chunks(self, tick: int, inbox: dict[str, InputChunk]) -> tuple[list[InputChunk], int, list[JoinedSession]]:
        """Each live session's chunk for `tick` (silence where none came), carrying what its late
        chunks brought and the update texts waiting for it; the number missing; the sessions."""
        chunks, missing, stepped = [], 0, []
        for sid, session in self.core.sessions.items():
            if session.first_tick > tick:
                continue
            stepped.append(session)
            chunk = inbox.get(sid)
            if chunk is None:
                chunk = InputChunk.silent(sid, tick, self.core.clock.start(tick), self.core.clock.samples())
                missing += 1
            chunk, session.dropped = chunk.after(session.dropped), None
            room = MAX_UPDATES - len(chunk.updates)
            if session.updates and room > 0:  # the texts enter with the chunk, and are logged with it
                chunk = dataclasses.replace(chunk, updates=[*chunk.updates, *session.updates[:room]])
                del session.updates[:room]
            chunks.append(chunk)
        return chunks, missing, stepped

    async def _run_engine(self, tick: int, chunks: list[InputChunk]) -> tuple[dict[str, OutputChunk], dict[str, dict], float]:
        """The engine's step in the executor -> outputs (errors as events), the states of the
        sessions whose snapshot is due, and the step's time in ms."""
        sessions = self.core.sessions
        due = [c.session_id for c in chunks if self.snapshot_every and sessions[c.session_id].snapshot_due <= tick]
        t = time.perf_counter()
        outs, errors, states = await asyncio.get_running_loop().run_in_executor(None, self._step_engine, chunks, due)
        step_ms = (time.perf_counter() - t) * 1000
        outputs = {}
        for out in outs:
            if out.session_id in errors:
                out.events.append(error_from(errors[out.session_id]))
            outputs[out.session_id] = out
        for c in chunks:  # a session may have left while the step ran (leave waits only for the engine)
            session = sessions.get(c.session_id)
            if session is not None:
                session.last_seq = tick
        return outputs, states, step_ms

    def _step_engine(self, chunks: list[InputChunk], export: list[str]) -> tuple[list[OutputChunk], dict, dict[str, dict]]:
        """The engine's step, and the states of `export` right after it (in the executor)."""
        engine = self.core.engine
        outs, errors = engine.step(chunks)
        return outs, errors, {sid: engine.export_session(sid) for sid in export}

    def _count(self, stats: TickStats) -> None:
        self.figures.record(stats)
        totals = self.core.totals
        totals["ticks"] += 1
        totals["late_chunks"] += stats.late
        totals["missing_chunks"] += stats.missing
        totals["shed_ticks"] += stats.shed
        self.late = 0

    def _tell(self, outputs: dict[str, OutputChunk]) -> None:
        """Each output carries its session's news: ticks shed, background events."""
        for out in outputs.values():
            session = self.core.sessions.get(out.session_id)
            if session is None:
                continue
            if session.shed:
                out.events.append(server_event("interplay.shed", ticks=session.shed, reason="overload"))
                session.shed = 0
            if session.events:
                out.events.extend(session.events)
                session.events = []

    def _orphans(self, tick: int) -> list[JoinedSession]:
        """Take out the sessions no chunk came for in `orphan_ticks` (their ingress is gone)."""
        if not self.orphan_ticks:
            return []
        core = self.core
        gone = [s for s in core.sessions.values() if tick - s.heard > self.orphan_ticks]
        for session in gone:
            log.warning("session %r: no chunk for %d ticks; it leaves", session.session_id, tick - session.heard)
            del core.sessions[session.session_id]
            core.engine.remove_session(session.session_id)
            core.totals["orphaned"] += 1
        return gone

    def _shed(self, tick: int) -> int:
        """Give up the ticks from the next one up to `tick` (not stepped, never will be): their
        exchanges get no outputs and the sessions live then are told on their next output."""
        core = self.core
        n = tick - core.next_tick
        if n <= 0:
            return 0
        for k in sorted(k for k in self.inbox if k < tick):
            for chunk in self.inbox.pop(k).values():
                self.late += 1
                if chunk.session_id in core.sessions:
                    core.sessions[chunk.session_id].drop(chunk)
        for k in [k for k in self.stepped if k < tick]:
            self.stepped[k].set()
        self.complete = {k for k in self.complete if k >= tick}
        affected = [s for s in core.sessions.values() if s.first_tick < tick]
        if not affected:  # nobody was due a tick (e.g. a restarted actor's first tick): nothing lost
            return 0
        for session in affected:
            session.shed += min(n, tick - session.first_tick)
        log.warning("behind: shed %d tick(s) before tick %d", n, tick)
        return n

    def _finish(self, tick: int, outputs: dict[str, OutputChunk]) -> None:
        self.outputs[tick] = outputs
        self.stepped.setdefault(tick, asyncio.Event()).set()
        self.complete.discard(tick)
        for table in (self.outputs, self.stepped):
            for k in [k for k in table if k <= tick - KEEP_TICKS]:
                del table[k]
