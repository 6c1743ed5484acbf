"""Small stand-ins for the ports (`protocols.ports`), for tests that need no torch and no Ray.

- `MockEngine`: an `Engine`. Deterministic: each output's audio is a constant at the input's mean
  level (silence in, silence out); a chunk with `forced == "speak"` speaks (level `SPEAK_LEVEL`);
  typed text containing `trigger` emits "delegate" with that text; a chunk's updates are kept in
  its session's state. Seqs only move forward (gaps allowed); `replay` steps chunks
  as `step` does and record what they were given in `rebuilt`. `step_s` makes a step slow.
- `LocalLog`: a `SessionLog` in this process as the async `Log` port, optionally slow, or held
  (hanging) until a test releases it.
- `FakePool`: a `BackgroundPool` streaming scripted `BackgroundUpdate`s, then (held) whatever a
  test feeds each task, as a pool streams a task's updates; it records what it ran and what was
  cancelled.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from protocols import FRAME_SIZE, BackgroundTask, BackgroundUpdate, InputChunk, OutputChunk, ProtocolError
from protocols.chunks import SAMPLE_RATE, check_audio, check_frame
from protocols.seams import AppendResult, Recovery

SPEAK_LEVEL = 1000


class MockEngine:
    def __init__(self, tick_ms: int = 200, max_sessions: int = 16, step_s: float = 0.0, trigger: str = "please delegate"):
        self.tick_ms = tick_ms
        self.max_sessions = max_sessions
        self.step_s = step_s
        self.trigger = trigger
        self.samples = SAMPLE_RATE * tick_ms // 1000
        self.sessions: dict[str, dict] = {}
        self.steps: list[list[InputChunk]] = []  # every batch stepped, as handed in
        self.rebuilt: list[tuple[str, dict | None, list[InputChunk]]] = []  # every rebuild: id, state, chunks

    def add_session(self, session_id: str, seed: int | None = None) -> None:
        if session_id in self.sessions:
            raise ProtocolError(f"session {session_id!r} already added", "session_exists", "session_id")
        if len(self.sessions) >= self.max_sessions:
            raise ProtocolError("engine full", "capacity")
        self.sessions[session_id] = {"seed": seed, "ticks": 0, "updates": [], "last_seq": None}

    def remove_session(self, session_id: str) -> None:
        if self.sessions.pop(session_id, None) is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")

    def push_update(self, session_id: str, text: str) -> None:
        if session_id not in self.sessions:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        self.sessions[session_id]["updates"].append(text)

    def export_session(self, session_id: str) -> dict:
        return dict(self.sessions[session_id], updates=list(self.sessions[session_id]["updates"]))

    def import_session(self, session_id: str, state: dict) -> None:
        self.sessions[session_id] = dict(state, updates=list(state["updates"]))

    def replay(self, session_id: str, state: dict | None = None, seed: int | None = None,
               chunks: list[InputChunk] = ()) -> tuple[dict, list[OutputChunk]]:
        self.rebuilt.append((session_id, state, list(chunks)))
        scratch = MockEngine(self.tick_ms, 1, 0.0, self.trigger)
        scratch.add_session(session_id, seed)
        if state is not None:
            scratch.import_session(session_id, state)
        outs = [scratch._one(c)[0] for c in chunks]
        return scratch.export_session(session_id), outs

    def step(self, chunks: list[InputChunk]) -> tuple[list[OutputChunk], dict[str, ProtocolError]]:
        self.steps.append(list(chunks))
        if self.step_s:
            time.sleep(self.step_s)
        outputs, errors = [], {}
        for chunk in chunks:
            out, error = self._one(chunk)
            outputs.append(out)
            if error is not None:
                errors[chunk.session_id] = error
        return outputs, errors

    def _one(self, chunk: InputChunk) -> tuple[OutputChunk, ProtocolError | None]:
        """One session's micro-turn: a bad chunk is stepped as silence and its error returned."""
        error, state = None, self.sessions.get(chunk.session_id)
        try:
            if state is None:
                raise ProtocolError(f"unknown session {chunk.session_id!r}", "unknown_session", "session_id")
            if state["last_seq"] is not None and chunk.seq <= state["last_seq"]:
                raise ProtocolError(f"seq {chunk.seq} out of order", "out_of_order", "seq")
            check_audio(chunk.audio, samples=self.samples)
            frame = check_frame(chunk.frame)
            if frame is not None and frame.shape != (FRAME_SIZE, FRAME_SIZE, 3):
                raise ProtocolError(f"frame must be {FRAME_SIZE}x{FRAME_SIZE}", "invalid_frame", "frame")
        except ProtocolError as exc:
            error = exc
            chunk = InputChunk.silent(chunk.session_id, chunk.seq, chunk.t_start, self.samples)
        if state is not None:
            state["ticks"] += 1
            state["updates"].extend(chunk.updates)
            state["last_seq"] = max(chunk.seq, state["last_seq"] if state["last_seq"] is not None else -1)
        level, controls, text = int(np.abs(chunk.audio.astype(np.int32)).mean()), ["silent"], ""
        if chunk.forced == "speak":
            level, controls = SPEAK_LEVEL, ["speak"]
        if self.trigger and self.trigger in chunk.text:
            controls, text = ["delegate"], chunk.text
        audio = np.full(self.samples, level, np.int16)
        return OutputChunk(chunk.session_id, chunk.seq, chunk.t_start, audio, text=text, controls=controls, step_ms=self.step_s * 1000), error


class LocalLog:
    """A `SessionLog` (`actors.log.session_log`) in process as the async `Log` port; each call waits
    `delay_s` first, and while `held` is an unset `asyncio.Event`, until it is set."""

    def __init__(self, log, delay_s: float = 0.0):
        self.log = log
        self.delay_s = delay_s
        self.held: asyncio.Event | None = None
        self.appends = 0

    async def _wait(self) -> None:
        await asyncio.sleep(self.delay_s)
        if self.held is not None:
            await self.held.wait()

    async def open(self, session_id: str) -> str:
        await self._wait()
        return self.log.open(session_id)

    async def close(self, session_id: str, epoch: int | None = None) -> None:
        await self._wait()
        self.log.close(session_id, epoch)

    async def append(self, deltas: list, request_id: str | None = None, epochs: dict | None = None) -> AppendResult:
        await self._wait()
        self.appends += 1
        return self.log.append(deltas, request_id, epochs)

    async def put_snapshot(self, session_id: str, tick: int, state: dict, epoch: int | None = None) -> None:
        await self._wait()
        await self.log.put_snapshot(session_id, tick, state, epoch)

    async def recovery(self, session_id: str, take_over: bool = True) -> Recovery:
        await self._wait()
        return await self.log.recovery(session_id, take_over)


class FakePool:
    """Streams `replies` (one update each, `interval_s` apart, the last one "final") for every
    task; with `hold`, then streams a "partial" update for each text `feed` gives the task, until
    cancelled. Records tasks run and task ids cancelled."""

    def __init__(self, replies: tuple[str, ...] = ("working on it", "it is sunny"), interval_s: float = 0.0, hold: bool = False):
        self.replies = replies
        self.interval_s = interval_s
        self.hold = hold
        self.tasks: list[BackgroundTask] = []
        self.received_at: list[float] = []
        self.cancelled: list[str] = []
        self.inboxes: dict[str, asyncio.Queue[str]] = {}  # task id -> texts fed to its held stream

    def feed(self, task_id: str, text: str) -> None:
        """An update with `text` on task `task_id`'s stream (held, and started: see `inboxes`)."""
        self.inboxes[task_id].put_nowait(text)

    async def run(self, task: BackgroundTask):
        self.tasks.append(task)
        self.received_at.append(time.monotonic())
        try:
            for i, text in enumerate(self.replies):
                await asyncio.sleep(self.interval_s)
                status = "final" if i == len(self.replies) - 1 and not self.hold else "partial"
                yield BackgroundUpdate(task.session_id, time.time(), task.task_id, status, text)
            if self.hold:
                inbox = self.inboxes[task.task_id] = asyncio.Queue()
                while True:
                    yield BackgroundUpdate(task.session_id, time.time(), task.task_id, "partial", await inbox.get())
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(task.task_id)
            raise

