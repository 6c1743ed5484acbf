"""`Core`: what every role of the interaction actor shares, and `JoinedSession`, one session's state there.

The engine and the lock that keeps one call to it at a time (the step runs in a thread), the
`TickClock` and its grace, the wall clock, the joined sessions and the next tick to step, and the
running totals the actor reports. Each role (admission, migration, tasks, the log writer, the
tick loop) holds the one `Core` of its actor.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

from protocols import BackgroundTask, InputChunk, TickClock
from protocols.ports import Engine
from protocols.requests import ToolChoice

from actors.interaction.quotas import TokenBucket

TOTALS = ("ticks", "late_chunks", "missing_chunks", "tasks", "updates", "shed_ticks", "snapshots", "resumed", "released", "orphaned",
          "fenced", "replay_mismatches", "dropped_updates", "log_retries", "log_dropped", "log_refused", "tasks_refused")


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
    tools: list | None = None  # the client's function tools (SessionSettings), offered to the pool
    tool_choice: ToolChoice = "auto"
    typed: list[str] = field(default_factory=list)  # text typed since the last task
    starts: TokenBucket | None = None  # how fast it may start background tasks
    events: list[dict] = field(default_factory=list)  # background events for the next output
    updates: list[str] = field(default_factory=list)  # update texts for the next chunk
    shed: int = 0  # ticks shed since its last output
    heard: int = 0  # the newest tick an exchange brought a chunk of it for (its first tick at first)
    dropped: InputChunk | None = None  # what its late chunks brought besides audio, for its next chunk

    def drop(self, chunk: InputChunk) -> None:
        """A chunk of it came too late to be stepped: its text, requests and forced control go on."""
        self.dropped = chunk.after(self.dropped)

    @property
    def busy(self) -> bool:
        """Whether a background task of it is running."""
        return self.runner is not None and not self.runner.done()


class Core:
    def __init__(self, engine: Engine, clock: TickClock, grace_s: float, now: Callable[[], float], max_sessions: int):
        self.engine = engine
        self.engine_lock = asyncio.Lock()  # the step runs in a thread; the engine is not thread-safe
        self.clock, self.grace_s, self.now = clock, grace_s, now
        self.max_sessions = min(max_sessions, engine.max_sessions)
        self.sessions: dict[str, JoinedSession] = {}
        self.next_tick = self.current_tick()
        self.totals: dict[str, int] = dict.fromkeys(TOTALS, 0)

    def current_tick(self) -> int:
        return self.clock.tick_at(self.now())

    def deadline(self, tick: int) -> float:
        return self.clock.end(tick) + self.grace_s

    def due_tick(self) -> int:
        """The newest tick whose deadline has passed."""
        return self.clock.tick_at(self.now() - self.grace_s) - 1

    def full(self) -> bool:
        return len(self.sessions) >= self.max_sessions
