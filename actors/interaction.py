"""The InteractionActor: owns the clock and steps every session in one batch per 200 ms tick.

Tick k covers [t0 + k·tick, t0 + (k+1)·tick). Ingresses hand in chunk k of their sessions with
one `exchange` call per tick; the tick is stepped as soon as every joined session's chunk is in,
or at its deadline (end of tick + grace) with the absent ones stepped as missing (silence), so
one slow client never delays the others. `exchange` returns the outputs of tick k for the sessions asked about. Every input and
output chunk is appended to the SessionLog in one call per tick.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np
import ray

from protocols import BackgroundTask, InputChunk, OutputChunk, ProtocolError, SessionEvent
from protocols.chunks import silence
from protocols.realtime import error_from

log = logging.getLogger("interplay.interaction")

KEEP_TICKS = 25  # outputs kept for late exchange calls (5 s)


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
class _Session:
    session_id: str
    first_tick: int
    log_token: str | None = None
    log_index: int = -1  # last log index appended for this session
    pending_text: list[str] = field(default_factory=list)


class Interaction:
    """The clock, the sessions and the batched step; Ray-free (see `InteractionActor` below).

    `engine` is a `models.engine.StreamingEngine` (or anything with add_session, remove_session,
    step_checked, push_update). `session_log` is a SessionLog (`actors.session_log`), in-process or
    as a Ray actor wrapped in `RemoteLog`, or None to log nothing. `on_task` receives each
    BackgroundTask the model delegates.
    """

    def __init__(
        self,
        engine: Any,
        session_log: Any = None,
        tick_s: float = 0.2,
        grace_s: float = 0.04,
        t0: float | None = None,
        max_sessions: int = 16,
        on_task: Callable[[BackgroundTask], Awaitable[None] | None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.engine = engine
        self.session_log = session_log
        self.tick_s = tick_s
        self.grace_s = grace_s
        self.clock = clock
        self.t0 = clock() if t0 is None else t0
        self.max_sessions = max_sessions
        self.on_task = on_task
        self.sessions: dict[str, _Session] = {}
        self._inbox: dict[int, dict[str, InputChunk]] = {}
        self._outputs: dict[int, dict[str, OutputChunk]] = {}
        self._stepped: dict[int, asyncio.Event] = {}
        self._complete: dict[int, asyncio.Event] = {}  # set when every session's chunk k is in
        self._next_tick = self.current_tick()
        self._stats: deque[TickStats] = deque(maxlen=600)
        self._late = 0
        self._log_tail: asyncio.Task | None = None
        self._task: asyncio.Task | None = None
        self._engine_lock = asyncio.Lock()  # the step runs in a thread; the engine is not thread-safe

    # --- clock -------------------------------------------------------------------------------

    def current_tick(self) -> int:
        return int((self.clock() - self.t0) // self.tick_s)

    def clock_info(self) -> dict:
        return {"t0": self.t0, "tick_s": self.tick_s, "grace_s": self.grace_s, "tick": self.current_tick()}

    def deadline(self, tick: int) -> float:
        return self.t0 + (tick + 1) * self.tick_s + self.grace_s

    # --- sessions ----------------------------------------------------------------------------

    async def join(self, session_id: str, seed: int | None = None) -> dict:
        """Add a session at the current tick; returns its first tick and the clock."""
        if session_id in self.sessions:
            raise ProtocolError(f"session {session_id!r} already joined", "session_exists", "session_id")
        if len(self.sessions) >= self.max_sessions:
            raise ProtocolError(f"this interaction actor is full ({self.max_sessions} sessions)", "capacity")
        # Under the lock no step is in flight: the session is a member from the next tick
        # stepped on, so every step passes the engine a chunk for each of its sessions.
        async with self._engine_lock:
            first = self._next_tick
            self.engine.add_session(session_id, seed=seed)
            session = _Session(session_id, first)
            self.sessions[session_id] = session
        if self.session_log is not None:
            session.log_token = await _maybe_await(self.session_log.open(session_id))
            await self._append([SessionEvent(session_id, self.clock(), "session.joined", {"first_tick": first})])
        return {"session_id": session_id, "first_tick": first, **self.clock_info(), "log_token": session.log_token}

    async def leave(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        async with self._engine_lock:
            self.engine.remove_session(session_id)
        if self.session_log is not None:
            await self._append([SessionEvent(session_id, self.clock(), "session.left", {})])
            await _maybe_await(self.session_log.close(session_id))

    async def push_update(self, session_id: str, text: str) -> None:
        """A background update's text, woven into the session's following micro-turns."""
        if session_id not in self.sessions:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        async with self._engine_lock:
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

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            tick = self._next_tick
            delay = self.deadline(tick) - self.clock()
            if delay > 0:
                complete = self._complete.setdefault(tick, asyncio.Event())
                try:
                    await asyncio.wait_for(complete.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            try:
                await self.step(tick, loop)
            except Exception:  # a broken step must not stop the clock for everyone
                log.exception("tick %d failed", tick)
                self._finish(tick, {})

    async def step(self, tick: int, loop: asyncio.AbstractEventLoop | None = None) -> dict[str, OutputChunk]:
        """Step tick `tick` for every joined session now (the loop calls this at the deadline)."""
        lag_ms = (self.clock() - self.deadline(tick)) * 1000
        outputs: dict[str, OutputChunk] = {}
        step_ms = 0.0
        async with self._engine_lock:
            self._next_tick = tick + 1
            inbox = self._inbox.pop(tick, {})
            t_start = self.t0 + tick * self.tick_s
            chunks, missing = [], 0
            for sid in self.sessions:
                chunk = inbox.get(sid)
                if chunk is None:
                    chunk = InputChunk(sid, tick, t_start, silence(), missing=True)
                    missing += 1
                chunks.append(chunk)
            if chunks:
                t = time.perf_counter()
                if loop is None:
                    outs, errors = self.engine.step_checked(chunks)
                else:  # off the event loop, so exchanges keep arriving during the step
                    outs, errors = await loop.run_in_executor(None, self.engine.step_checked, chunks)
                step_ms = (time.perf_counter() - t) * 1000
                for out in outs:
                    if out.session_id in errors:
                        out.events.append(error_from(errors[out.session_id]))
                    outputs[out.session_id] = out
        self._stats.append(TickStats(tick, len(chunks), self._late, missing, step_ms, lag_ms))
        self._late = 0
        self._finish(tick, outputs)
        if chunks and self.session_log is not None:
            self._log_tick(chunks, list(outputs.values()))
        return outputs

    def _finish(self, tick: int, outputs: dict[str, OutputChunk]) -> None:
        self._outputs[tick] = outputs
        self._outputs.pop(tick - KEEP_TICKS, None)
        self._stepped.setdefault(tick, asyncio.Event()).set()
        self._stepped.pop(tick - KEEP_TICKS, None)
        self._complete.pop(tick, None)

    # --- the log ----------------------------------------------------------------------------

    def _log_tick(self, chunks: list[InputChunk], outputs: list[OutputChunk]) -> None:
        deltas: list = [c for c in chunks if c.session_id in self.sessions]
        deltas += [o for o in outputs if o.session_id in self.sessions]
        previous = self._log_tail

        async def append_in_order():
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            # The request id makes the append idempotent if Ray retries it after a log restart.
            result = await self._append(deltas, request_id=f"{id(self):x}:{chunks[0].seq}")
            await self._delegate(outputs, result)

        self._log_tail = asyncio.get_running_loop().create_task(append_in_order())

    async def _append(self, deltas: list, request_id: str | None = None) -> dict:
        try:
            result = await _maybe_await(self.session_log.append(deltas, request_id))
        except Exception:
            log.exception("session log append failed")
            return {}
        for sid, span in (result or {}).items():
            if sid in self.sessions and isinstance(span, (tuple, list)):
                self.sessions[sid].log_index = span[1]
        return result or {}

    async def _delegate(self, outputs: list[OutputChunk], appended: dict) -> None:
        """Turn delegate/tool controls into BackgroundTasks carrying a reference into the log."""
        tasks = []
        for out in outputs:
            session = self.sessions.get(out.session_id)
            if session is None or not ({"delegate", "tool_call"} & set(out.controls)):
                continue
            kind = "delegate" if "delegate" in out.controls else "tool"
            tasks.append(BackgroundTask(out.session_id, self.clock(), kind, out.text, context_upto=session.log_index))
        if not tasks:
            return
        await self._append(tasks, request_id=f"{id(self):x}:tasks:{outputs[0].seq}")
        for task in tasks:
            if self.on_task is not None:
                await _maybe_await(self.on_task(task))

    async def flush(self) -> None:
        """Wait until every tick stepped so far is in the log."""
        if self._log_tail is not None:
            await asyncio.gather(self._log_tail, return_exceptions=True)

    # --- metrics -----------------------------------------------------------------------------

    def stats(self, last: int = 50) -> dict:
        recent = list(self._stats)[-last:]
        steps = np.array([s.step_ms for s in recent]) if recent else np.zeros(1)
        return {
            "sessions": len(self.sessions),
            "tick": self._next_tick - 1,
            "step_ms_p50": float(np.percentile(steps, 50)),
            "step_ms_p99": float(np.percentile(steps, 99)),
            "late_chunks": int(sum(s.late for s in recent)),
            "missing_chunks": int(sum(s.missing for s in recent)),
            "ticks": [vars(s) for s in recent[-10:]],
        }


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class RemoteLog:
    """Adapts a SessionLog Ray actor handle to the awaitable interface `Interaction` uses."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def open(self, session_id: str) -> str:
        return await self.handle.open.remote(session_id)

    async def close(self, session_id: str) -> None:
        await self.handle.close.remote(session_id)

    async def append(self, deltas: list, request_id: str | None = None) -> dict:
        return await self.handle.append.remote(deltas, request_id)


def build_engine(model: dict, max_sessions: int) -> Any:
    """A StreamingEngine from the deployment's `model` section: a checkpoint or a preset."""
    import torch

    from models.checkpoint import load_checkpoint
    from models.engine import StreamingEngine

    device = model.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    source = load_checkpoint(model["checkpoint"], device=device) if model.get("checkpoint") else model.get("preset", "tiny")
    return StreamingEngine(source, max_sessions=max_sessions, device=device)


class _TickMetrics:
    """Exports each tick's figures through Ray's metrics (scraped with the cluster's Prometheus)."""

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


class InteractionActorImpl(Interaction):
    """The Ray actor: builds its engine from the deployment config and finds the log by name."""

    def __init__(self, config: dict, log_name: str | None = None, namespace: str = "interplay"):
        section = config.get("interaction", {})
        tick_s = section.get("tick_ms", 200) / 1000
        engine = build_engine(config.get("model", {}), section.get("max_sessions", 16))
        session_log = RemoteLog(ray.get_actor(log_name, namespace=namespace)) if log_name else None
        super().__init__(engine, session_log, tick_s=tick_s, grace_s=section.get("grace_ms", 40) / 1000, max_sessions=section.get("max_sessions", 16))
        self._metrics = _TickMetrics()

    async def ready(self) -> dict:
        """Starts the clock (idempotent) and returns it."""
        self.start()
        return self.clock_info()

    async def step(self, tick: int, loop: asyncio.AbstractEventLoop | None = None) -> dict[str, OutputChunk]:
        outputs = await super().step(tick, loop)
        self._metrics.record(self._stats[-1])
        return outputs


# Async actor: exchanges from every ingress, joins and the tick loop interleave on one event loop.
InteractionActor = ray.remote(max_concurrency=1000)(InteractionActorImpl)
