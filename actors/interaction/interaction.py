"""`Interaction`: owns the clock and steps every session in one batch per tick.

Tick k is the `TickClock`'s, whose length is the engine's `tick_ms`. Ingresses hand in chunk k of
their sessions with one `exchange` per tick; the tick is stepped as soon as every joined session's
chunk is in, or at its deadline (end of tick + grace) with the absent ones stepped as missing
(silence), so one slow client never delays the others. A delegate or tool-call control becomes a
`BackgroundTask` handed to the background pool at once, and so does a client's `response.create`
when the session has function tools (from the response or session.update) even without such a
control: its instruction is the text typed since the last task. The task's updates are reported
to the client as events on its next outputs (`actors.background.background.update_events`) and their texts
enter the model with the session's next chunk (`InputChunk.updates`), so every input chunk in the
log is a complete record of what entered the model at its tick. A session runs one task at a time
(a new one supersedes it) and starts them at most `task_burst` at once, refilled at
`task_starts_per_s` (`actors.interaction.quotas.TokenBucket`); a start over that is refused with an `error`
event (rate_limit_exceeded), so no client can make the pool work every tick.

The log. Every chunk, output, task and update is appended to the session log in order, off the
tick's path: neither the step nor delegation waits on the log. The appends wait in one bounded
queue (`log_backlog`): while the log fails they are retried with backoff (each append carries a
request id, so a retry never doubles it); past the bound the oldest are dropped and counted.

Snapshots and moving sessions. Every `snapshot_s` each session's model state, exported right
after its tick was stepped, is queued to `Log.put_snapshot` behind that tick's appends (sessions
take turns, a few a tick). `resume` rebuilds a session that was live on another actor (or on this
one before it restarted) from `Log.recovery`: the newest snapshot, then its logged input chunks
stepped again alone (`Engine.replay`, off the tick's path), checked against the logged outputs
(`replay_mismatches`); it is then stepped from the next tick here. The ticks it spent nowhere are
a forward gap: never stepped, absent from its log as from its model history, so a later replay of
its log sees the same gap and stays exact. `release` snapshots a session after its last tick and
lets it go without closing its log, for `resume` elsewhere.

One writer per session: every call to the log carries the session's writer epoch (0 from `join`,
the one `Log.recovery` hands a `resume`). An actor that was slow, not dead, while its session was
resumed elsewhere is refused by the log ("moved") on its next append, and then lets the session go
(`fenced`): it never writes into the log of a session that lives on elsewhere, nor closes it.

Overload. A tick whose stepping starts after the next tick's deadline is not piled up: the loop
skips to the newest due tick (the ticks between are shed: never stepped, a forward gap for every
session, counted) and each session's next output carries an `interplay.shed` event. `join` refuses
new sessions ("capacity") while steps run hot (p95 over 70% of the tick, or any shedding, in the
last 25 ticks), so existing sessions keep their ticks. Exchanges are taken only a few ticks ahead.

The parts are ports (`protocols.ports`): an `Engine`, and optionally a `Log` and a
`BackgroundPool`, in process or Ray actors wrapped in `actors.remote.Remote`.
`InteractionActor` at the bottom is the Ray actor; given an `EngineSpec` it builds its engine in
its own process (on its GPU).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

import numpy as np
import ray

from protocols import BackgroundTask, BackgroundUpdate, InputChunk, OutputChunk, ProtocolError, SessionEvent, TickClock
from protocols.chunks import MAX_UPDATES, check_session_id
from protocols.ports import BackgroundPool, Engine, Log

from actors.interaction.quotas import TokenBucket
from protocols.realtime import error_event, error_from, server_event

if TYPE_CHECKING:
    from models.config import InteractionConfig

log = logging.getLogger("interplay.interaction")

KEEP_TICKS = 25  # outputs kept for late exchange calls
AHEAD_TICKS = 5  # an exchange may hand in chunks this many ticks ahead of the clock, no more
HOT_TICKS, HOT_FRACTION = 25, 0.7  # join refuses while recent steps run this hot (or shed)
MAX_PENDING_UPDATES = 64  # update texts waiting for a session's next chunk; the oldest go beyond
RESUME_WAIT_TICKS = 25  # a resumed session's last tick may be this far ahead of this actor's clock
LOG_RETRY_S = (0.05, 2.0)  # backoff of a failing log call: first and longest wait
LEAVE_FLUSH_S, RELEASE_FLUSH_S = 10.0, 30.0
REPLAY_AUDIO_LSB, REPLAY_LEVEL = 64, 0.01  # a replayed output's level may differ from the logged one this much
INTERACTION_STATE = "interaction"  # the key of this actor's part of a snapshot
DELEGATING = {"delegate": "delegate", "tool_call": "tool"}  # control -> BackgroundTask.kind


@dataclass(frozen=True)
class EngineSpec:
    """What engine to build, and where: a preset or a checkpoint directory; `device` "auto" is
    CUDA when present. Built by `Interaction` in its own process, so an actor's engine lands on
    the actor's GPU."""

    preset: str = "tiny"
    checkpoint: str | None = None
    device: str = "auto"
    max_sessions: int = 16
    onset_margin: float | None = None  # None: the checkpoint's calibrated one (0 for random weights)

    def model_config(self) -> "InteractionConfig":
        """The model's `InteractionConfig` (its tick length, shapes), read without building it."""
        if self.checkpoint:
            from models.checkpoint import load_config

            return load_config(self.checkpoint)
        from models.config import InteractionConfig

        return InteractionConfig.preset(self.preset)

    def build(self) -> Engine:
        import torch

        from models.checkpoint import load_checkpoint
        from models.engine import StreamingEngine

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        from models.checkpoint import onset_margin

        source = load_checkpoint(self.checkpoint, device=device) if self.checkpoint else self.preset
        return StreamingEngine(source, max_sessions=self.max_sessions, device=device,
                               onset_margin=onset_margin(self.checkpoint, self.onset_margin))


@dataclass
class TickStats:
    """Per-tick figures, kept for the last few hundred ticks and exported as metrics."""

    tick: int
    sessions: int
    late: int  # chunks that arrived after their tick was stepped (or shed)
    missing: int  # sessions stepped without a chunk
    step_ms: float
    lag_ms: float  # how long after the deadline the step started
    shed: int = 0  # ticks skipped just before this one, the loop being behind


@dataclass
class JoinedSession:
    session_id: str
    first_tick: int  # the first tick stepped here
    log_token: str | None = None
    log_index: int = -1  # the last log index known for the session
    epoch: int = 0  # the session log's writer epoch this actor holds for it
    last_seq: int | None = None  # the last tick its model stepped (here, or before it resumed here)
    snapshot_due: int = 0  # the tick after which its state is next snapshotted
    snapshot_phase: int = 0  # and then the ticks congruent to this (sessions take turns)
    task: BackgroundTask | None = None  # the running background task, if any
    runner: asyncio.Task | None = None
    tools: list | None = None  # the client's function tools (session.update), offered to the pool
    tool_choice: object = "auto"
    typed: list[str] = field(default_factory=list)  # text typed since the last task
    starts: TokenBucket | None = None  # how fast it may start background tasks
    events: list[dict] = field(default_factory=list)  # background events for the next output
    updates: list[str] = field(default_factory=list)  # update texts for the next chunk
    shed: int = 0  # ticks shed since its last output
    heard: int = 0  # the newest tick an exchange brought a chunk of it for (its first tick at first)
    dropped: InputChunk | None = None  # what its late chunks brought besides audio, for its next chunk

    def drop(self, chunk: InputChunk) -> None:
        """A chunk of it came too late to be stepped: its text, events and forced control go on."""
        self.dropped = chunk.after(self.dropped)


@dataclass
class _LogCall:
    """One queued call to the log, repeatable (appends carry a request id)."""

    call: Callable[[], Awaitable[Any]]
    what: str
    done: Callable[[Any], None] | None = None


class Interaction:
    """The clock, the sessions, the batched step and delegation; Ray-free (`InteractionActor` below).

    `engine` is an `Engine`, or an `EngineSpec` to build one here. With `log` None nothing is
    logged; with `background` None delegated tasks are logged but not run. `now` is the wall
    clock (tests pass a fake one); `t0` the clock's origin (default: now; an actor restarted
    with the same `t0` keeps the same ticks). `snapshot_s` (None: never) is how often each
    session's state goes to the log; `log_backlog` how many log calls may wait. A session no
    exchange has brought a chunk of for `orphan_s` (None: never) leaves on its own ("orphaned":
    its ingress is gone).
    """

    def __init__(
        self,
        engine: Engine | EngineSpec,
        *,
        log: Log | None = None,
        background: BackgroundPool | None = None,
        grace_ms: float = 40,
        max_sessions: int = 16,
        t0: float | None = None,
        now: Callable[[], float] = time.time,
        snapshot_s: float | None = 5.0,
        log_backlog: int = 150,
        orphan_s: float | None = 10.0,
        task_starts_per_s: float = 0.2,
        task_burst: int = 3,
    ):
        self.engine: Engine = engine.build() if isinstance(engine, EngineSpec) else engine
        self.task_starts_per_s, self.task_burst = task_starts_per_s, task_burst
        self.log = log
        self.background = background
        self.now = now
        self.clock = TickClock(now() if t0 is None else t0, self.engine.tick_ms)
        self.grace_s = grace_ms / 1000
        self.max_sessions = min(max_sessions, self.engine.max_sessions)
        snapshots = bool(snapshot_s) and log is not None and hasattr(log, "put_snapshot")
        self.snapshot_every = max(1, round(snapshot_s * 1000 / self.engine.tick_ms)) if snapshots else None
        self.orphan_ticks = max(1, round(orphan_s * 1000 / self.engine.tick_ms)) if orphan_s else None
        self.sessions: dict[str, JoinedSession] = {}
        self._inbox: dict[int, dict[str, InputChunk]] = {}
        self._outputs: dict[int, dict[str, OutputChunk]] = {}
        self._stepped: dict[int, asyncio.Event] = {}
        self._complete: dict[int, asyncio.Event] = {}  # set when every session's chunk k is in
        self._next_tick = self.current_tick()
        self._stats: deque[TickStats] = deque(maxlen=600)
        self._late = 0
        self._phase = 0  # the next session's snapshot turn
        self._totals = {"ticks": 0, "late_chunks": 0, "missing_chunks": 0, "tasks": 0, "updates": 0, "shed_ticks": 0,
                        "snapshots": 0, "resumed": 0, "released": 0, "orphaned": 0, "fenced": 0, "replay_mismatches": 0, "dropped_updates": 0,
                        "log_retries": 0, "log_dropped": 0, "log_refused": 0, "tasks_refused": 0}
        self._loop_task: asyncio.Task | None = None
        self._removals: set[asyncio.Task] = set()  # held so a pending removal is not garbage-collected
        self._metrics: _TickMetrics | None = None
        self._engine_lock = asyncio.Lock()  # the step runs in a thread; the engine is not thread-safe
        # The log's queue: calls in order, one at a time, by one writer task.
        self.log_backlog = log_backlog
        self._log_queue: deque[_LogCall] = deque()
        self._log_writer: asyncio.Task | None = None
        self._log_queued = self._log_finished = 0
        self._log_progress = asyncio.Event()
        self._request_prefix = secrets.token_hex(6)
        self._requests = 0

    # --- clock -------------------------------------------------------------------------------

    def current_tick(self) -> int:
        return self.clock.tick_at(self.now())

    def deadline(self, tick: int) -> float:
        return self.clock.end(tick) + self.grace_s

    def due_tick(self) -> int:
        """The newest tick whose deadline has passed."""
        return self.clock.tick_at(self.now() - self.grace_s) - 1

    async def clock_info(self) -> dict:
        """The clock, and `now`: this actor's wall clock as it answers (for offset estimates)."""
        self._restarted()
        return {**self.clock.to_dict(), "grace_s": self.grace_s, "now": self.now()}

    async def ready(self) -> dict:
        """Start the tick loop (idempotent) and return the clock."""
        self._start_loop()
        return await self.clock_info()

    def _start_loop(self) -> None:
        if self._loop_task is None:
            if _in_ray_actor():
                self._metrics = _TickMetrics()
            if not self.sessions:  # ticks start now, not when the actor was made
                self._next_tick = max(self._next_tick, self.current_tick())
            self._loop_task = asyncio.get_running_loop().create_task(self.run())

    def _restarted(self) -> None:
        """An actor Ray restarted runs its constructor again and nothing else: the first call
        that comes (an exchange, a resume, a ping) starts its ticks. In process, `ready` does."""
        if self._loop_task is None and _in_ray_actor():
            self._start_loop()

    # --- sessions ----------------------------------------------------------------------------

    async def join(self, session_id: str, seed: int | None = None) -> dict:
        """Add a session from the next tick stepped; returns its first tick, log token and the clock.
        Refused ("capacity") when full, or while steps run hot: new sessions wait, live ones don't."""
        self._restarted()
        if session_id in self.sessions:
            raise ProtocolError(f"session {session_id!r} already joined", "session_exists", "session_id")
        self._admit()
        token = await self.log.open(session_id) if self.log is not None else None
        # Under the lock no step is in flight: every step passes the engine a chunk for each of
        # its sessions, and the joined event is queued for the log ahead of the session's chunks.
        async with self._engine_lock:
            if session_id in self.sessions or len(self.sessions) >= self.max_sessions:
                raise ProtocolError(f"session {session_id!r} could not join: joined meanwhile or full", "capacity")
            first = self._next_tick
            self.engine.add_session(session_id, seed=seed)
            session = self.sessions[session_id] = JoinedSession(session_id, first, token, snapshot_due=first, snapshot_phase=self._turn(), heard=first)
            self._log_later([SessionEvent(session_id, self.now(), "session.joined", {"first_tick": first, "seed": seed})])
        return await self._answer(session)

    def _admit(self) -> None:
        if len(self.sessions) >= self.max_sessions:
            raise ProtocolError(f"this interaction actor is full ({self.max_sessions} sessions)", "capacity")
        if self.hot():
            raise ProtocolError("this interaction actor is overloaded; try again or elsewhere", "capacity")

    def hot(self) -> bool:
        """Whether recent steps ran hot: p95 over HOT_FRACTION of the tick, or any tick shed."""
        recent = list(self._stats)[-HOT_TICKS:]
        if any(s.shed for s in recent):
            return True
        steps = [s.step_ms for s in recent if s.sessions]
        return bool(steps) and float(np.percentile(steps, 95)) > HOT_FRACTION * self.clock.tick_ms

    async def _answer(self, session: JoinedSession) -> dict:
        return {"session_id": session.session_id, "first_tick": session.first_tick, "log_token": session.log_token, **await self.clock_info()}

    async def leave(self, session_id: str) -> None:
        """Remove a session; its background task is cancelled and its log closed once complete."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        async with self._engine_lock:
            self.engine.remove_session(session_id)
        self._left(session)
        if self.log is not None and not await self.flush(LEAVE_FLUSH_S):
            log.warning("session %r left; its log closes once the log is back", session_id)

    def _left(self, session: JoinedSession, reason: str | None = None, close: bool = True) -> None:
        """A session is out of `sessions` and the engine: its task is cancelled, `session.left`
        logged and (with `close`) its log closed behind its appends."""
        sid = session.session_id
        deltas = self._cancel(session, "the session ended")
        if self.log is not None:
            self._log_later(deltas + [SessionEvent(sid, self.now(), "session.left", {"reason": reason} if reason else {})], [session])
            if close:
                self._queue_log(_LogCall(lambda: self.log.close(sid, session.epoch), f"close {sid!r}"))

    async def resume(self, session_id: str) -> dict:
        """Join a session that was live elsewhere, rebuilt from the log (see the module doc).
        Answers like `join`; a session already here is answered as it is."""
        self._restarted()
        check_session_id(session_id)
        if session_id in self.sessions:
            return await self._answer(self.sessions[session_id])
        if len(self.sessions) >= self.max_sessions:
            raise ProtocolError(f"this interaction actor is full ({self.max_sessions} sessions)", "capacity")
        if self.log is None or not hasattr(self.log, "recovery"):
            raise ProtocolError("there is no session log to resume a session from", "unavailable")
        rec = await self.log.recovery(session_id)
        state, inputs = rec.get("state"), list(rec.get("inputs") or [])
        last = inputs[-1].seq if inputs else rec.get("tick")
        mine = dict((state or {}).get(INTERACTION_STATE) or {})
        # The replay runs beside the ticks (it touches no live session); only joining takes the lock.
        loop = asyncio.get_running_loop()
        rebuilt, replayed = await loop.run_in_executor(None, self.engine.replay, session_id, state, None, inputs)
        logged = {o.seq: o for o in rec.get("outputs") or []}
        mismatches = sum(1 for o in replayed if o.seq in logged and _differs(o, logged[o.seq]))
        async with self._engine_lock:
            if session_id in self.sessions:
                return await self._answer(self.sessions[session_id])
            if len(self.sessions) >= self.max_sessions:
                raise ProtocolError(f"this interaction actor is full ({self.max_sessions} sessions)", "capacity")
            first = max(self._next_tick, last + 1 if last is not None else 0)
            if first - max(self._next_tick, self.current_tick()) > RESUME_WAIT_TICKS:
                raise ProtocolError(f"session {session_id!r} is ahead of this actor's clock", "unavailable")
            self.engine.import_session(session_id, rebuilt)
            session = JoinedSession(session_id, first, rec.get("log_token"), epoch=int(rec.get("epoch") or 0), last_seq=last,
                                    snapshot_due=first, snapshot_phase=self._turn(), heard=first)
            session.tools, session.tool_choice = mine.get("tools"), mine.get("tool_choice", "auto")
            session.typed = list(mine.get("typed") or [])
            by_seq = {o.seq: o for o in replayed}
            for chunk in inputs:  # what the chunks after the snapshot told this actor (tools, typed text)
                self._follow(session, chunk, by_seq.get(chunk.seq), start=False)
            entered = sum(len(c.updates) for c in inputs)  # updates waiting at the snapshot entered in these, in order
            session.updates = list(mine.get("pending") or [])[entered:]
            self.sessions[session_id] = session
            self._totals["resumed"] += 1
            self._totals["replay_mismatches"] += mismatches
            if mismatches:
                log.warning("session %r: %d of %d replayed ticks differ from the log", session_id, mismatches, len(replayed))
            self._log_later([SessionEvent(session_id, self.now(), "session.resumed",
                                          {"first_tick": first, "from_tick": last, "replayed": len(inputs), "mismatches": mismatches})])
        return {**await self._answer(session), "resumed_from": last, "replayed": len(inputs), "mismatches": mismatches}

    async def drop(self, session_id: str) -> None:
        """Let a session go that lives elsewhere (a resume here that its asker gave up on, which
        landed anyway): no snapshot, nothing logged, its log left open. Unknown: nothing to do."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        self._cancel(session, "moved")
        async with self._engine_lock:
            self.engine.remove_session(session_id)

    async def release(self, session_id: str) -> None:
        """Let a session go for `resume` elsewhere: its state after its last tick is snapshotted,
        its running task cancelled ("moved"), and it leaves without its log being closed. Returns
        once the log has all of it; raises "log_unavailable" if the log does not take it in time
        (it is still written when the log is back)."""
        session = self.sessions.get(session_id)
        if session is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        async with self._engine_lock:
            del self.sessions[session_id]
            state = await asyncio.get_running_loop().run_in_executor(None, self._export_and_remove, session_id)
        self._totals["released"] += 1
        deltas = self._cancel(session, "moved")
        if self.log is None:
            return
        self._log_later(deltas + [SessionEvent(session_id, self.now(), "session.released", {"last_tick": session.last_seq})], [session])
        if session.last_seq is not None and hasattr(self.log, "put_snapshot"):
            self._snapshot_later(session, session.last_seq, state)
        if not await self.flush(RELEASE_FLUSH_S):
            raise ProtocolError("the session log has not taken the session's state yet", "log_unavailable")

    def _export_and_remove(self, session_id: str) -> dict:
        state = self.engine.export_session(session_id)
        self.engine.remove_session(session_id)
        return state

    def _cancel(self, session: JoinedSession, reason: str) -> list:
        """Cancel the session's running task; -> the update that records it."""
        if session.runner is None or session.runner.done():
            return []
        session.runner.cancel()
        return [BackgroundUpdate(session.session_id, self.now(), session.task.task_id, "cancelled", reason)]

    async def push_update(self, session_id: str, text: str) -> None:
        """Text of a background update: it enters the model with the session's next chunk."""
        session = self.sessions.get(session_id)
        if session is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        self._pend(session, text)

    def _pend(self, session: JoinedSession, text: str) -> None:
        session.updates.append(text)
        if len(session.updates) > MAX_PENDING_UPDATES:
            del session.updates[0]
            self._totals["dropped_updates"] += 1

    # --- the exchange an ingress makes once per tick --------------------------------------------

    async def exchange(self, tick: int, chunks: list[InputChunk], session_ids: list[str]) -> list[OutputChunk]:
        """Hand in chunk `tick` of some sessions; get back tick `tick`'s outputs of `session_ids`.

        A chunk for a tick already stepped, or that will be shed (a newer tick is due), is late:
        it is counted and dropped, and whatever outputs that tick has are returned. A tick more than
        AHEAD_TICKS ahead of the clock is refused. Chunks of sessions not joined are dropped;
        unknown sessions get no output (the caller asked wrongly).
        """
        self._restarted()
        horizon = max(self._next_tick, self.current_tick()) + AHEAD_TICKS
        if tick > horizon:
            raise ProtocolError(
                f"tick {tick} is too far ahead: the clock is at tick {horizon - AHEAD_TICKS} ({self.now() - self.clock.start(tick):+.3f} s to its start)",
                "invalid_value", "seq",
            )
        stale = tick < self._next_tick or tick < self.due_tick()
        inbox = None
        for chunk in chunks:
            if chunk.seq != tick:
                raise ProtocolError(f"chunk of session {chunk.session_id!r} has seq {chunk.seq}, not tick {tick}", "invalid_value", "seq")
            session = self.sessions.get(chunk.session_id)
            if session is not None:  # late or not, its ingress is alive
                session.heard = max(session.heard, tick)
            if stale:
                self._late += 1
                if session is not None:
                    session.drop(chunk)
                continue
            if chunk.session_id not in self.sessions:
                continue
            if inbox is None:
                inbox = self._inbox.setdefault(tick, {})
            inbox[chunk.session_id] = chunk
        if inbox is not None and all(sid in inbox for sid, s in self.sessions.items() if s.first_tick <= tick):
            self._complete.setdefault(tick, asyncio.Event()).set()
        if tick >= self._next_tick:
            await self._stepped.setdefault(tick, asyncio.Event()).wait()
        outs = self._outputs.get(tick, {})
        return [outs[s] for s in session_ids if s in outs]

    # --- the tick loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Step every tick at its deadline, or as soon as it is complete; never returns."""
        while True:
            await self.tick_once()

    async def tick_once(self) -> int:
        """Wait for the next tick (its deadline, or until its chunks are all in) and step it; when
        behind (a newer tick is due already), step the newest due tick instead, shedding those
        between. Returns the tick stepped."""
        tick = self._next_tick
        delay = self.deadline(tick) - self.now()
        if delay > 0:
            complete = self._complete.setdefault(tick, asyncio.Event())
            try:
                await asyncio.wait_for(complete.wait(), delay)
            except asyncio.TimeoutError:
                pass
        else:
            tick = max(tick, self.due_tick())
        try:
            await self.step(tick)
        except Exception:  # a broken step must not stop the clock for everyone
            log.exception("tick %d failed", tick)
            self._next_tick = max(self._next_tick, tick + 1)
            self._finish(tick, {})
        return tick

    async def step(self, tick: int) -> dict[str, OutputChunk]:
        """Step tick `tick` for every joined session now, the engine off the event loop so that
        exchanges keep arriving; ticks skipped since the last one are shed. Hand delegated work
        to the pool; queue the tick (and the snapshots due) for the log."""
        lag_ms = (self.now() - self.deadline(tick)) * 1000
        outputs: dict[str, OutputChunk] = {}
        states: dict[str, dict] = {}
        step_ms = 0.0
        async with self._engine_lock:
            if tick < self._next_tick:
                raise ValueError(f"tick {tick} was stepped already (next is {self._next_tick})")
            shed = self._shed(tick)
            orphans = self._orphans(tick)
            self._next_tick = tick + 1
            inbox = self._inbox.pop(tick, {})
            chunks, missing, stepped = [], 0, []
            for sid, session in self.sessions.items():
                if session.first_tick > tick:
                    continue
                stepped.append(session)
                chunk = inbox.get(sid)
                if chunk is None:
                    chunk = InputChunk.silent(sid, tick, self.clock.start(tick), self.clock.samples())
                    missing += 1
                chunk, session.dropped = chunk.after(session.dropped), None
                room = MAX_UPDATES - len(chunk.updates)
                if session.updates and room > 0:  # the texts enter with the chunk, and are logged with it
                    chunk = dataclasses.replace(chunk, updates=[*chunk.updates, *session.updates[:room]])
                    del session.updates[:room]
                chunks.append(chunk)
            if chunks:
                due = [c.session_id for c in chunks if self.snapshot_every and self.sessions[c.session_id].snapshot_due <= tick]
                t = time.perf_counter()
                outs, errors, states = await asyncio.get_running_loop().run_in_executor(None, self._step_engine, chunks, due)
                step_ms = (time.perf_counter() - t) * 1000
                for out in outs:
                    if out.session_id in errors:
                        out.events.append(error_from(errors[out.session_id]))
                    outputs[out.session_id] = out
                for c in chunks:  # a session may have left while the step ran (leave waits only for the engine)
                    session = self.sessions.get(c.session_id)
                    if session is not None:
                        session.last_seq = tick
        stats = TickStats(tick, len(chunks), self._late, missing, step_ms, lag_ms, shed)
        self._stats.append(stats)
        for key, n in (("ticks", 1), ("late_chunks", self._late), ("missing_chunks", missing), ("shed_ticks", shed)):
            self._totals[key] += n
        self._late = 0
        if self._metrics is not None:
            self._metrics.record(stats)
        tasks = self._delegate(outputs) + self._requested(chunks, outputs)
        for out in outputs.values():
            session = self.sessions.get(out.session_id)
            if session is None:
                continue
            if session.shed:
                out.events.append(server_event("interplay.shed", ticks=session.shed, reason="overload"))
                session.shed = 0
            if session.events:
                out.events.extend(session.events)
                session.events = []
        self._finish(tick, outputs)
        if chunks:
            self._log_later([*chunks, *outputs.values(), *tasks], stepped)
        for session in orphans:
            # Its log stays open: the session may live on elsewhere (its ingress moved it while
            # this actor was too busy to answer); a session that truly ended is closed by its
            # ingress's leave, or ages out of the log's retention.
            self._left(session, "orphaned", close=False)
        for sid, state in states.items():  # behind the tick's own chunks in the log
            session = self.sessions.get(sid)
            if session is not None:
                self._snapshot_later(session, tick, state)
        return outputs

    def _orphans(self, tick: int) -> list[JoinedSession]:
        """Take out the sessions no chunk came for in `orphan_ticks` (their ingress is gone)."""
        if not self.orphan_ticks:
            return []
        gone = [s for s in self.sessions.values() if tick - s.heard > self.orphan_ticks]
        for session in gone:
            log.warning("session %r: no chunk for %d ticks; it leaves", session.session_id, tick - session.heard)
            del self.sessions[session.session_id]
            self.engine.remove_session(session.session_id)
            self._totals["orphaned"] += 1
        return gone

    def _step_engine(self, chunks: list[InputChunk], export: list[str]) -> tuple[list[OutputChunk], dict, dict[str, dict]]:
        """The engine's step, and the states of `export` right after it (in the executor)."""
        outs, errors = self.engine.step(chunks)
        return outs, errors, {sid: self.engine.export_session(sid) for sid in export}

    def _shed(self, tick: int) -> int:
        """Give up the ticks from the next one up to `tick` (not stepped, never will be): their
        exchanges get no outputs and the sessions live then are told on their next output."""
        n = tick - self._next_tick
        if n <= 0:
            return 0
        for k in sorted(k for k in self._inbox if k < tick):
            for chunk in self._inbox.pop(k).values():
                self._late += 1
                if chunk.session_id in self.sessions:
                    self.sessions[chunk.session_id].drop(chunk)
        for k in [k for k in self._stepped if k < tick]:
            self._stepped[k].set()
        for k in [k for k in self._complete if k < tick]:
            del self._complete[k]
        affected = [s for s in self.sessions.values() if s.first_tick < tick]
        if not affected:  # nobody was due a tick (e.g. a restarted actor's first tick): nothing lost
            return 0
        for session in affected:
            session.shed += min(n, tick - session.first_tick)
        log.warning("behind: shed %d tick(s) before tick %d", n, tick)
        return n

    def _finish(self, tick: int, outputs: dict[str, OutputChunk]) -> None:
        self._outputs[tick] = outputs
        self._stepped.setdefault(tick, asyncio.Event()).set()
        self._complete.pop(tick, None)
        for table in (self._outputs, self._stepped):
            for k in [k for k in table if k <= tick - KEEP_TICKS]:
                del table[k]

    # --- background work ---------------------------------------------------------------------

    def _delegate(self, outputs: dict[str, OutputChunk]) -> list[BackgroundTask]:
        """Turn delegate/tool controls into BackgroundTasks and hand each to the pool at once.

        A task's `context_upto` is the last log index known for its session when it is made: the
        log is appended off the tick's path, so it may lag the current tick by one, and the pool's
        context ends there (the tick that made the task, and any before it not yet acknowledged,
        are not in it; the task's own instruction is).
        """
        tasks = []
        for out in outputs.values():
            session = self.sessions.get(out.session_id)
            kinds = [DELEGATING[c] for c in out.controls if c in DELEGATING]
            if session is None or not kinds or not self._may_start(session):
                continue
            running = session.runner is not None and not session.runner.done()
            task = BackgroundTask(
                out.session_id, self.now(), kinds[0], out.text, context_upto=session.log_index, log_token=session.log_token,
                supersedes=session.task.task_id if running else None,
                arguments={"tools": session.tools} if session.tools else {},
            )
            tasks.append(self._start(session, task))
        return tasks

    def _requested(self, chunks: list[InputChunk], outputs: dict[str, OutputChunk]) -> list[BackgroundTask]:
        """Tasks a client asks for without a delegate control (see `_follow`)."""
        tasks = []
        for chunk in chunks:
            session = self.sessions.get(chunk.session_id)
            if session is not None:
                tasks += self._follow(session, chunk, outputs.get(chunk.session_id))
        return tasks

    def _follow(self, session: JoinedSession, chunk: InputChunk, out: OutputChunk | None, start: bool = True) -> list[BackgroundTask]:
        """What a chunk tells this actor of its session: typed text, function tools (session.update)
        and `response.create`, which asks for a task while function tools are set (on the
        response, or the session) and tool_choice is not "none", unless the model delegated this
        tick already. With `start` False (a resumed session's replay) no task starts: only the
        tools and typed text come up to date, as when the chunk was first stepped."""
        tasks = []
        if chunk.text:
            session.typed = (session.typed + [chunk.text])[-8:]
        for event in chunk.events:
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "session.update":
                config = event.get("session") or {}
                if "tools" in config:
                    session.tools = config["tools"] or None
                if "tool_choice" in config:
                    session.tool_choice = config["tool_choice"]
            elif kind == "response.create":
                response = event.get("response") or {}
                tools = response.get("tools", session.tools)
                choice = response.get("tool_choice", session.tool_choice)
                delegated = out is not None and any(c in DELEGATING for c in out.controls)
                if not tools or choice == "none" or delegated or (start and not self._may_start(session)):
                    continue
                running = session.runner is not None and not session.runner.done()
                instruction = "\n".join(session.typed) or response.get("instructions") or "Help with the conversation so far."
                session.typed = []
                if start:
                    task = BackgroundTask(
                        chunk.session_id, self.now(), "tool", instruction[:4000], context_upto=session.log_index,
                        log_token=session.log_token, supersedes=session.task.task_id if running else None,
                        arguments={"tools": tools, "tool_choice": choice},
                    )
                    tasks.append(self._start(session, task))
        return tasks

    def _may_start(self, session: JoinedSession) -> bool:
        """Whether the session may start a background task now (its `TokenBucket`); if not, the
        client is told with an `error` event and the conversation goes on without the task."""
        if session.starts is None:
            session.starts = TokenBucket(self.task_starts_per_s, self.task_burst, self.now())
        if session.starts.take(self.now()):
            return True
        self._totals["tasks_refused"] += 1
        session.events.append(error_event(
            f"background tasks are limited to {self.task_burst} at once and {self.task_starts_per_s * 60:g} a minute per session; this one was not started",
            "rate_limit_exceeded",
        ))
        return False

    def _start(self, session: JoinedSession, task: BackgroundTask) -> BackgroundTask:
        """Hand `task` to the pool (cancelling the session's running one, which it supersedes)."""
        from actors.background.background import task_events

        self._totals["tasks"] += 1
        if session.runner is not None and not session.runner.done():
            session.runner.cancel()
        session.task, session.runner = task, None
        if self.background is not None:
            session.events.extend(task_events(task))
            session.runner = asyncio.get_running_loop().create_task(self._consume(session, task))
        return task

    async def _consume(self, session: JoinedSession, task: BackgroundTask) -> None:
        """Stream a task's updates to the session (its next chunks, its next outputs' events) and
        the log until it ends, is superseded or its session leaves (then this is cancelled, which
        cancels the pool's stream)."""
        from actors.background.background import update_events

        sid = task.session_id
        updates = self.background.run(task)
        try:
            async for update in updates:
                if self.sessions.get(sid) is not session:
                    return
                if update.text:
                    self._pend(session, update.text)
                session.events.extend(update_events(update))
                self._totals["updates"] += 1
                self._log_later([update], [session])
        except asyncio.CancelledError:
            if session.task is not task and self.sessions.get(sid) is session:  # superseded
                self._log_later([BackgroundUpdate(sid, self.now(), task.task_id, "cancelled", "superseded")], [session])
            raise
        except Exception as exc:  # a failed task is an error update; the call goes on
            log.exception("background task %s failed", task.task_id)
            if self.sessions.get(sid) is session:
                self._log_later([BackgroundUpdate(sid, self.now(), task.task_id, "error", f"background task failed: {type(exc).__name__}")], [session])
        finally:
            aclose = getattr(updates, "aclose", None)
            if aclose is not None:
                await aclose()

    # --- the log ----------------------------------------------------------------------------

    def _log_later(self, deltas: list, sessions: Iterable[JoinedSession] = ()) -> None:
        """Queue an append behind the calls before it (so the log keeps their order), with the
        writer epoch of each session in it: of `sessions` (those the deltas were made for, which
        may have left `sessions` since), else of the session here; no-op without a log."""
        if self.log is None or not deltas:
            return
        self._requests += 1
        request_id = f"{self._request_prefix}:{self._requests}"  # the same on every retry: appended once
        epochs = {s.session_id: s.epoch for s in sessions}
        for sid in {d.session_id for d in deltas} - set(epochs):
            if sid in self.sessions:
                epochs[sid] = self.sessions[sid].epoch
        self._queue_log(_LogCall(lambda: self.log.append(deltas, request_id, epochs), f"append {request_id}",
                                 lambda result: self._appended(result, epochs)))

    def _snapshot_later(self, session: JoinedSession, tick: int, state: dict) -> None:
        """Queue `state` (the engine's, after `tick`) as the session's snapshot, with what this
        actor knows of it: tools, typed text and the update texts still waiting for a chunk (on
        resume, those that entered with the chunks replayed are not waiting any more)."""
        mine = {"tools": session.tools, "tool_choice": session.tool_choice, "typed": list(session.typed),
                "pending": list(session.updates)}
        state = {**state, INTERACTION_STATE: mine}
        every = self.snapshot_every or 1
        session.snapshot_due = tick + 1 + (session.snapshot_phase - tick - 1) % every
        self._totals["snapshots"] += 1
        sid = session.session_id
        epoch = session.epoch
        self._queue_log(_LogCall(lambda: self.log.put_snapshot(sid, tick, state, epoch), f"snapshot {sid!r} at tick {tick}"))

    def _turn(self) -> int:
        """The next session's snapshot turn: sessions get them in rotation, so one tick does not export them all."""
        turn = self._phase
        self._phase = (self._phase + 1) % (self.snapshot_every or 1)
        return turn

    def _appended(self, result: Any, epochs: dict[str, int]) -> None:
        for sid, span in (result or {}).items():
            session = self.sessions.get(sid)
            if session is not None and isinstance(span, (tuple, list)):
                session.log_index = max(session.log_index, int(span[1]))
        for sid in getattr(result, "moved", ()):
            session = self.sessions.get(sid)
            if session is not None and session.epoch == epochs.get(sid):  # not resumed here again since
                self._fenced(session)

    def _fenced(self, session: JoinedSession) -> None:
        """The log says the session moved on to another writer: let it go here, logging nothing
        (its log is the other writer's now). Its next tick no longer steps it."""
        sid = session.session_id
        del self.sessions[sid]
        self._totals["fenced"] += 1
        log.warning("session %r was taken over elsewhere; letting it go here", sid)
        self._cancel(session, "moved")

        async def remove() -> None:
            async with self._engine_lock:
                if sid not in self.sessions and sid in self.engine.sessions:
                    self.engine.remove_session(sid)

        task = asyncio.get_running_loop().create_task(remove())
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    def _queue_log(self, call: _LogCall) -> None:
        self._log_queue.append(call)
        self._log_queued += 1
        while len(self._log_queue) > self.log_backlog:  # the log is down or slow: drop the oldest
            dropped = self._log_queue.popleft()
            self._totals["log_dropped"] += 1
            self._progress()
            log.warning("log backlog full: dropped %s", dropped.what)
        if self._log_writer is None:
            self._log_writer = asyncio.get_running_loop().create_task(self._write_log())

    async def _write_log(self) -> None:
        """The one writer: each queued call in order, retried with backoff while the log fails;
        a call the log refuses (ProtocolError) is not retried."""
        wait, failing = LOG_RETRY_S[0], False
        try:
            while self._log_queue:
                call = self._log_queue[0]
                try:
                    result = await call.call()
                except ProtocolError as exc:
                    self._totals["log_refused"] += 1
                    log.warning("the session log refused %s: %s", call.what, exc)
                except Exception:
                    self._totals["log_retries"] += 1
                    if not failing:
                        log.exception("session log call failed (%s); retrying", call.what)
                    failing = True
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, LOG_RETRY_S[1])
                    continue
                else:
                    if call.done is not None:
                        call.done(result)
                if failing:
                    log.info("the session log is back")
                wait, failing = LOG_RETRY_S[0], False
                if self._log_queue and self._log_queue[0] is call:  # not dropped meanwhile
                    self._log_queue.popleft()
                    self._progress()
        finally:
            self._log_writer = None

    def _progress(self) -> None:
        self._log_finished += 1
        self._log_progress.set()
        self._log_progress = asyncio.Event()

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every log call queued so far is done (or dropped); False if `timeout` passed first."""
        target = self._log_queued

        async def done():
            while self._log_finished < target:
                await self._log_progress.wait()

        try:
            await asyncio.wait_for(done(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    # --- figures -----------------------------------------------------------------------------

    async def stats(self, last: int = 50) -> dict:
        """Recent figures (the last `last` ticks) and totals since the actor started."""
        self._restarted()
        recent = list(self._stats)[-last:]
        steps = np.array([s.step_ms for s in recent]) if recent else np.zeros(1)
        return {
            "sessions": len(self.sessions),
            "session_ids": sorted(self.sessions),
            "tick": self._next_tick - 1,
            "tick_ms": self.clock.tick_ms,
            "step_ms_p50": float(np.percentile(steps, 50)),
            "step_ms_p99": float(np.percentile(steps, 99)),
            "late_chunks": int(sum(s.late for s in recent)),
            "missing_chunks": int(sum(s.missing for s in recent)),
            "shed_ticks": int(sum(s.shed for s in recent)),
            "hot": self.hot(),
            "log_backlog": len(self._log_queue),
            "totals": dict(self._totals),
            "ticks": [vars(s) for s in recent[-10:]],
            "node_id": ray.get_runtime_context().get_node_id() if _in_ray_actor() else None,
        }


def _differs(replayed: OutputChunk, logged: OutputChunk) -> bool:
    """Whether a replayed output is not the logged one: its text or controls differ, or its level
    does. Not its waveform: float noise may move the vocoder's phase without changing what is said."""
    if (replayed.text, replayed.controls) != (logged.text, logged.controls) or replayed.audio.shape != logged.audio.shape:
        return True
    a, b = _level(replayed.audio), _level(logged.audio)
    return abs(a - b) > max(REPLAY_AUDIO_LSB, REPLAY_LEVEL * b)


def _level(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if audio.size else 0.0


def _in_ray_actor() -> bool:
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


class _TickMetrics:
    """Each tick's figures through Ray's metrics (scraped with the cluster's Prometheus)."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.step = metrics.Histogram("interplay_step_ms", "batched micro-turn step time", boundaries=[5, 10, 20, 40, 60, 100, 150, 200, 400])
        self.lag = metrics.Histogram("interplay_tick_lag_ms", "step start after the tick deadline", boundaries=[1, 5, 10, 20, 50, 100, 200])
        self.sessions = metrics.Gauge("interplay_sessions", "sessions stepped per tick")
        self.late = metrics.Counter("interplay_late_chunks", "chunks that arrived after their tick was stepped")
        self.missing = metrics.Counter("interplay_missing_chunks", "sessions stepped without a chunk")
        self.shed = metrics.Counter("interplay_shed_ticks", "ticks skipped because stepping fell behind")

    def record(self, s: TickStats) -> None:
        self.step.observe(s.step_ms)
        self.lag.observe(max(0.0, s.lag_ms))
        self.sessions.set(s.sessions)
        if s.late:
            self.late.inc(s.late)
        if s.missing:
            self.missing.inc(s.missing)
        if s.shed:
            self.shed.inc(s.shed)


# Async actor: exchanges from every ingress, joins and the tick loop interleave on one event loop.
InteractionActor = ray.remote(max_concurrency=1000)(Interaction)
