"""`Interaction`: owns the clock and steps every session in one batch per tick.

Tick k is the `TickClock`'s, whose length is the engine's `tick_ms`. Ingresses hand in chunk k of
their sessions with one `exchange` per tick; the tick is stepped as soon as every joined session's
chunk is in, or at its deadline (end of tick + grace) with the absent ones stepped as missing
(silence), so one slow client never delays the others. A delegate or tool-call control becomes a
`BackgroundTask` handed to the background pool at once, and so does a client's `response.create`
when the session has function tools (from the response or session.update) even without such a
control: its instruction is the text typed since the last task. The task's updates are woven into
the session's next micro-turns and reported to the client as events on its next outputs
(`actors.background.update_events`). Every chunk, output, task and update is appended to the session log,
in order, off the tick's path: neither the step nor delegation waits on the log.

The parts are ports (`protocols.ports`): an `Engine`, and optionally a `Log` and a
`BackgroundPool`, in process or Ray actors wrapped in `actors.remote.Remote`.
`InteractionActor` at the bottom is the Ray actor; given an `EngineSpec` it builds its engine in
its own process (on its GPU).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import ray

from protocols import BackgroundTask, BackgroundUpdate, InputChunk, OutputChunk, ProtocolError, SessionEvent, TickClock
from protocols.ports import BackgroundPool, Engine, Log
from protocols.realtime import error_from

if TYPE_CHECKING:
    from models.config import InteractionConfig

log = logging.getLogger("interplay.interaction")

KEEP_TICKS = 25  # outputs kept for late exchange calls
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
        source = load_checkpoint(self.checkpoint, device=device) if self.checkpoint else self.preset
        return StreamingEngine(source, max_sessions=self.max_sessions, device=device)


@dataclass
class TickStats:
    """Per-tick figures, kept for the last few hundred ticks and exported as metrics."""

    tick: int
    sessions: int
    late: int  # chunks that arrived after their tick was stepped
    missing: int  # sessions stepped without a chunk
    step_ms: float
    lag_ms: float  # how long after the deadline the step started


@dataclass
class JoinedSession:
    session_id: str
    first_tick: int
    log_token: str | None = None
    log_index: int = -1  # the last log index known for the session
    task: BackgroundTask | None = None  # the running background task, if any
    runner: asyncio.Task | None = None
    tools: list | None = None  # the client's function tools (session.update), offered to the pool
    tool_choice: object = "auto"
    typed: list[str] = field(default_factory=list)  # text typed since the last task
    events: list[dict] = field(default_factory=list)  # background events for the next output


class Interaction:
    """The clock, the sessions, the batched step and delegation; Ray-free (`InteractionActor` below).

    `engine` is an `Engine`, or an `EngineSpec` to build one here. With `log` None nothing is
    logged; with `background` None delegated tasks are logged but not run. `now` is the wall
    clock (tests pass a fake one); `t0` the clock's origin (default: now).
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
    ):
        self.engine: Engine = engine.build() if isinstance(engine, EngineSpec) else engine
        self.log = log
        self.background = background
        self.now = now
        self.clock = TickClock(now() if t0 is None else t0, self.engine.tick_ms)
        self.grace_s = grace_ms / 1000
        self.max_sessions = min(max_sessions, self.engine.max_sessions)
        self.sessions: dict[str, JoinedSession] = {}
        self._inbox: dict[int, dict[str, InputChunk]] = {}
        self._outputs: dict[int, dict[str, OutputChunk]] = {}
        self._stepped: dict[int, asyncio.Event] = {}
        self._complete: dict[int, asyncio.Event] = {}  # set when every session's chunk k is in
        self._next_tick = self.current_tick()
        self._stats: deque[TickStats] = deque(maxlen=600)
        self._late = 0
        self._totals = {"ticks": 0, "late_chunks": 0, "missing_chunks": 0, "tasks": 0, "updates": 0}
        self._log_tail: asyncio.Task | None = None
        self._loop_task: asyncio.Task | None = None
        self._metrics: _TickMetrics | None = None
        self._engine_lock = asyncio.Lock()  # the step runs in a thread; the engine is not thread-safe

    # --- clock -------------------------------------------------------------------------------

    def current_tick(self) -> int:
        return self.clock.tick_at(self.now())

    def deadline(self, tick: int) -> float:
        return self.clock.end(tick) + self.grace_s

    async def clock_info(self) -> dict:
        return {**self.clock.to_dict(), "grace_s": self.grace_s}

    async def ready(self) -> dict:
        """Start the tick loop (idempotent) and return the clock."""
        if self._loop_task is None:
            if _in_ray_actor():
                self._metrics = _TickMetrics()
            self._loop_task = asyncio.get_running_loop().create_task(self.run())
        return await self.clock_info()

    # --- sessions ----------------------------------------------------------------------------

    async def join(self, session_id: str, seed: int | None = None) -> dict:
        """Add a session from the next tick stepped; returns its first tick, log token and the clock."""
        if session_id in self.sessions:
            raise ProtocolError(f"session {session_id!r} already joined", "session_exists", "session_id")
        if len(self.sessions) >= self.max_sessions:
            raise ProtocolError(f"this interaction actor is full ({self.max_sessions} sessions)", "capacity")
        token = await self.log.open(session_id) if self.log is not None else None
        # Under the lock no step is in flight: every step passes the engine a chunk for each of
        # its sessions, and the joined event is queued for the log ahead of the session's chunks.
        async with self._engine_lock:
            if session_id in self.sessions or len(self.sessions) >= self.max_sessions:
                raise ProtocolError(f"session {session_id!r} could not join: joined meanwhile or full", "capacity")
            first = self._next_tick
            self.engine.add_session(session_id, seed=seed)
            self.sessions[session_id] = JoinedSession(session_id, first, token)
            self._log_later([SessionEvent(session_id, self.now(), "session.joined", {"first_tick": first})])
        return {"session_id": session_id, "first_tick": first, "log_token": token, **await self.clock_info()}

    async def leave(self, session_id: str) -> None:
        """Remove a session; its background task is cancelled and its log closed once complete."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        deltas: list = []
        if session.runner is not None and not session.runner.done():
            session.runner.cancel()
            deltas.append(BackgroundUpdate(session_id, self.now(), session.task.task_id, "cancelled", "the session ended"))
        async with self._engine_lock:
            self.engine.remove_session(session_id)
        if self.log is not None:
            self._log_later(deltas + [SessionEvent(session_id, self.now(), "session.left", {})])
            await self.flush()
            await self.log.close(session_id)

    async def push_update(self, session_id: str, text: str) -> None:
        """Text of a background update, woven into the session's following micro-turns."""
        async with self._engine_lock:
            if session_id not in self.sessions:
                raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
            self.engine.push_update(session_id, text)

    # --- the exchange an ingress makes once per tick --------------------------------------------

    async def exchange(self, tick: int, chunks: list[InputChunk], session_ids: list[str]) -> list[OutputChunk]:
        """Hand in chunk `tick` of some sessions; get back tick `tick`'s outputs of `session_ids`.

        A chunk for a tick already stepped is late: it is counted and dropped, and the outputs
        already computed are returned. Unknown sessions get no output (the caller asked wrongly).
        """
        inbox = None
        for chunk in chunks:
            if chunk.seq != tick:
                raise ProtocolError(f"chunk of session {chunk.session_id!r} has seq {chunk.seq}, not tick {tick}", "invalid_value", "seq")
            if tick < self._next_tick:
                self._late += 1
                continue
            if inbox is None:
                inbox = self._inbox.setdefault(tick, {})
            inbox[chunk.session_id] = chunk
        if inbox is not None and self.sessions and all(sid in inbox for sid in self.sessions):
            self._complete.setdefault(tick, asyncio.Event()).set()
        if tick >= self._next_tick:
            await self._stepped.setdefault(tick, asyncio.Event()).wait()
        outs = self._outputs.get(tick, {})
        return [outs[s] for s in session_ids if s in outs]

    # --- the tick loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Step every tick at its deadline, or as soon as it is complete; never returns."""
        while True:
            tick = self._next_tick
            delay = self.deadline(tick) - self.now()
            if delay > 0:
                complete = self._complete.setdefault(tick, asyncio.Event())
                try:
                    await asyncio.wait_for(complete.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            try:
                await self.step(tick)
            except Exception:  # a broken step must not stop the clock for everyone
                log.exception("tick %d failed", tick)
                self._finish(tick, {})

    async def step(self, tick: int) -> dict[str, OutputChunk]:
        """Step tick `tick` for every joined session now, the engine off the event loop so that
        exchanges keep arriving; hand delegated work to the pool; queue the tick for the log."""
        lag_ms = (self.now() - self.deadline(tick)) * 1000
        outputs: dict[str, OutputChunk] = {}
        step_ms = 0.0
        async with self._engine_lock:
            self._next_tick = tick + 1
            inbox = self._inbox.pop(tick, {})
            chunks, missing = [], 0
            for sid in self.sessions:
                chunk = inbox.get(sid)
                if chunk is None:
                    chunk = InputChunk.silent(sid, tick, self.clock.start(tick), self.clock.samples())
                    missing += 1
                chunks.append(chunk)
            if chunks:
                t = time.perf_counter()
                outs, errors = await asyncio.get_running_loop().run_in_executor(None, self.engine.step, chunks)
                step_ms = (time.perf_counter() - t) * 1000
                for out in outs:
                    if out.session_id in errors:
                        out.events.append(error_from(errors[out.session_id]))
                    outputs[out.session_id] = out
        stats = TickStats(tick, len(chunks), self._late, missing, step_ms, lag_ms)
        self._stats.append(stats)
        for key, n in (("ticks", 1), ("late_chunks", self._late), ("missing_chunks", missing)):
            self._totals[key] += n
        self._late = 0
        if self._metrics is not None:
            self._metrics.record(stats)
        tasks = self._delegate(outputs) + self._requested(chunks, outputs)
        for out in outputs.values():
            session = self.sessions.get(out.session_id)
            if session is not None and session.events:
                out.events.extend(session.events)
                session.events = []
        self._finish(tick, outputs)
        if chunks:
            self._log_later([*chunks, *outputs.values(), *tasks], request_id=f"{id(self):x}:{tick}")
        return outputs

    def _finish(self, tick: int, outputs: dict[str, OutputChunk]) -> None:
        self._outputs[tick] = outputs
        self._outputs.pop(tick - KEEP_TICKS, None)
        self._stepped.setdefault(tick, asyncio.Event()).set()
        self._stepped.pop(tick - KEEP_TICKS, None)
        self._complete.pop(tick, None)

    # --- background work ---------------------------------------------------------------------

    def _delegate(self, outputs: dict[str, OutputChunk]) -> list[BackgroundTask]:
        """Turn delegate/tool controls into BackgroundTasks and hand each to the pool at once.

        A task's `context_upto` is the last log index known for its session when it is made: the
        log is appended off the tick's path, so it may lag the current tick by one (the pool reads
        the rest as it arrives).
        """
        tasks = []
        for out in outputs.values():
            session = self.sessions.get(out.session_id)
            kinds = [DELEGATING[c] for c in out.controls if c in DELEGATING]
            if session is None or not kinds:
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
        """Tasks a client asks for without a delegate control: `response.create` while function
        tools are set (on the response, or the session by session.update) and tool_choice is not
        "none". Sessions that delegated this tick already are left alone."""
        tasks = []
        for chunk in chunks:
            session = self.sessions.get(chunk.session_id)
            if session is None:
                continue
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
                    out = outputs.get(chunk.session_id)
                    delegated = out is not None and any(c in DELEGATING for c in out.controls)
                    if not tools or choice == "none" or delegated:
                        continue
                    running = session.runner is not None and not session.runner.done()
                    instruction = "\n".join(session.typed) or response.get("instructions") or "Help with the conversation so far."
                    session.typed = []
                    task = BackgroundTask(
                        chunk.session_id, self.now(), "tool", instruction[:4000], context_upto=session.log_index,
                        log_token=session.log_token, supersedes=session.task.task_id if running else None,
                        arguments={"tools": tools, "tool_choice": choice},
                    )
                    tasks.append(self._start(session, task))
        return tasks

    def _start(self, session: JoinedSession, task: BackgroundTask) -> BackgroundTask:
        """Hand `task` to the pool (cancelling the session's running one, which it supersedes)."""
        from .background import task_events

        self._totals["tasks"] += 1
        if session.runner is not None and not session.runner.done():
            session.runner.cancel()
        session.task, session.runner = task, None
        if self.background is not None:
            session.events.extend(task_events(task))
            session.runner = asyncio.get_running_loop().create_task(self._consume(session, task))
        return task

    async def _consume(self, session: JoinedSession, task: BackgroundTask) -> None:
        """Stream a task's updates into the engine and the log until it ends, is superseded or its
        session leaves (then this is cancelled, which cancels the pool's stream)."""
        from .background import update_events

        sid = task.session_id
        updates = self.background.run(task)
        try:
            async for update in updates:
                async with self._engine_lock:
                    if self.sessions.get(sid) is not session:
                        return
                    if update.text:
                        self.engine.push_update(sid, update.text)
                    session.events.extend(update_events(update))
                self._totals["updates"] += 1
                self._log_later([update])
        except asyncio.CancelledError:
            if session.task is not task and self.sessions.get(sid) is session:  # superseded
                self._log_later([BackgroundUpdate(sid, self.now(), task.task_id, "cancelled", "superseded")])
            raise
        except Exception as exc:  # a failed task is an error update; the call goes on
            log.exception("background task %s failed", task.task_id)
            if self.sessions.get(sid) is session:
                self._log_later([BackgroundUpdate(sid, self.now(), task.task_id, "error", f"background task failed: {type(exc).__name__}")])
        finally:
            aclose = getattr(updates, "aclose", None)
            if aclose is not None:
                await aclose()

    # --- the log ----------------------------------------------------------------------------

    def _log_later(self, deltas: list, request_id: str | None = None) -> None:
        """Queue an append behind the ones before it (so the log keeps their order); no-op without a log."""
        if self.log is None or not deltas:
            return
        previous = self._log_tail

        async def append_in_order():
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            await self._append(deltas, request_id)

        self._log_tail = asyncio.get_running_loop().create_task(append_in_order())

    async def _append(self, deltas: list, request_id: str | None) -> None:
        # The request id makes the append idempotent if Ray retries it after a log restart.
        try:
            result = await self.log.append(deltas, request_id)
        except Exception:
            log.exception("session log append failed")
            return
        for sid, span in (result or {}).items():
            session = self.sessions.get(sid)
            if session is not None and isinstance(span, (tuple, list)):
                session.log_index = max(session.log_index, int(span[1]))

    async def flush(self) -> None:
        """Wait until everything queued for the log so far is in it."""
        while self._log_tail is not None and not self._log_tail.done():
            await asyncio.gather(self._log_tail, return_exceptions=True)

    # --- figures -----------------------------------------------------------------------------

    async def stats(self, last: int = 50) -> dict:
        """Recent figures (the last `last` ticks) and totals since the actor started."""
        recent = list(self._stats)[-last:]
        steps = np.array([s.step_ms for s in recent]) if recent else np.zeros(1)
        return {
            "sessions": len(self.sessions),
            "tick": self._next_tick - 1,
            "tick_ms": self.clock.tick_ms,
            "step_ms_p50": float(np.percentile(steps, 50)),
            "step_ms_p99": float(np.percentile(steps, 99)),
            "late_chunks": int(sum(s.late for s in recent)),
            "missing_chunks": int(sum(s.missing for s in recent)),
            "totals": dict(self._totals),
            "ticks": [vars(s) for s in recent[-10:]],
        }


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

    def record(self, s: TickStats) -> None:
        self.step.observe(s.step_ms)
        self.lag.observe(max(0.0, s.lag_ms))
        self.sessions.set(s.sessions)
        if s.late:
            self.late.inc(s.late)
        if s.missing:
            self.missing.inc(s.missing)


# Async actor: exchanges from every ingress, joins and the tick loop interleave on one event loop.
InteractionActor = ray.remote(max_concurrency=1000)(Interaction)
