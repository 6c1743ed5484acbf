"""`Interaction`: owns the clock and steps every session in one batch per tick; `InteractionActor`
at the bottom is the Ray actor.

A façade over one-role parts sharing one `Core` (the engine, the clock, the sessions):
`ticks.Ticks` (the exchange inbox, the tick loop, shedding), `admission.Admission` (join, leave,
capacity while hot), `migration.Migration` (resume from the log, release, drop, fencing),
`tasks.Tasks` (background work and its updates), `log_writer.LogWriter` (the log queue: retries,
epochs, snapshots) and `metrics` (figures). Tick k is the `TickClock`'s, whose length is the
engine's `tick_ms`; every input chunk in the log is a complete record of what entered the model
at its tick.

One writer per session: every call to the log carries the session's writer epoch (0 from `join`,
the one `Log.recovery` hands a `resume`). An actor that was slow, not dead, while its session was
resumed elsewhere is refused by the log ("moved") on its next append, and then lets the session go
(`fenced`): it never writes into the log of a session that lives on elsewhere, nor closes it.

The parts are ports (`protocols.ports`): an `Engine`, and optionally a `Log` and a
`BackgroundPool`, in process or Ray actors wrapped in `actors.remote.Remote`. Given an
`EngineSpec` the actor builds its engine in its own process (on its GPU).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import ray

from protocols import InputChunk, OutputChunk, TickClock
from protocols.ports import BackgroundPool, Engine, Log
from protocols.seams import InteractionStats, Joined, Resumed, TickStats

from actors.interaction.admission import Admission
from actors.interaction.core import Core, JoinedSession
from actors.interaction.engine_spec import EngineSpec
from actors.interaction.log_writer import LogWriter
from actors.interaction.metrics import Figures, TickMetrics
from actors.interaction.migration import Migration
from actors.interaction.tasks import Tasks
from actors.interaction.ticks import Ticks
from actors.remote import actor_class

__all__ = ["EngineSpec", "Interaction", "InteractionActor", "JoinedSession", "TickStats"]


class Interaction:
    """The clock, the sessions, the batched step and delegation; Ray-free.

    `engine` is an `Engine`, or an `EngineSpec` to build one here. With `log` None nothing is
    logged; with `background` None delegated tasks are logged but not run. `now` is the wall
    clock (tests pass a fake one); `t0` the clock's origin (default: now; an actor restarted
    with the same `t0` keeps the same ticks). `snapshot_s` (None: never) is how often each
    session's state goes to the log; `log_backlog` how many log calls may wait. A session no
    exchange has brought a chunk of for `orphan_s` (None: never) leaves on its own ("orphaned":
    its ingress is gone). Each session starts background tasks at most `task_burst` at once,
    refilled at `task_starts_per_s`.
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
        engine = engine.build() if isinstance(engine, EngineSpec) else engine
        self.log = log
        self.core = core = Core(engine, TickClock(now() if t0 is None else t0, engine.tick_ms), grace_ms / 1000, now, max_sessions)
        snapshot_every = max(1, round(snapshot_s * 1000 / engine.tick_ms)) if snapshot_s and log is not None else None
        orphan_ticks = max(1, round(orphan_s * 1000 / engine.tick_ms)) if orphan_s else None
        self.figures = Figures(engine.tick_ms)
        self.logs = LogWriter(core, log, log_backlog, snapshot_every, on_moved=lambda s: self.migration.fenced(s))
        self.tasks = Tasks(core, background, self.logs, task_starts_per_s, task_burst)
        self.admission = Admission(core, log, self.logs, self.tasks, self.figures)
        self.migration = Migration(core, log, self.logs, self.tasks)
        self.ticks = Ticks(core, self.logs, self.tasks, self.figures, snapshot_every=snapshot_every, orphan_ticks=orphan_ticks,
                           on_orphaned=self._orphaned)
        self._loop_task: asyncio.Task | None = None

    @property
    def engine(self) -> Engine:
        return self.core.engine

    @property
    def clock(self) -> TickClock:
        return self.core.clock

    @property
    def now(self) -> Callable[[], float]:
        return self.core.now

    @property
    def sessions(self) -> dict[str, JoinedSession]:
        return self.core.sessions

    # --- clock -------------------------------------------------------------------------------

    def current_tick(self) -> int:
        return self.core.current_tick()

    def deadline(self, tick: int) -> float:
        return self.core.deadline(tick)

    async def clock_info(self) -> dict:
        """The clock, and `now`: this actor's wall clock as it answers (for offset estimates)."""
        self._restarted()
        return {**self.clock.to_dict(), "grace_s": self.core.grace_s, "now": self.core.now()}

    async def ready(self) -> dict:
        """Start the tick loop (idempotent) and return the clock."""
        self._start_loop()
        return await self.clock_info()

    def _start_loop(self) -> None:
        if self._loop_task is None:
            if _in_ray_actor():
                self.figures.metrics = TickMetrics()
            if not self.sessions:  # ticks start now, not when the actor was made
                self.core.next_tick = max(self.core.next_tick, self.current_tick())
            self._loop_task = asyncio.get_running_loop().create_task(self.run())

    def _restarted(self) -> None:
        """An actor Ray restarted runs its constructor again and nothing else: the first call
        that comes (an exchange, a resume, a ping) starts its ticks. In process, `ready` does."""
        if self._loop_task is None and _in_ray_actor():
            self._start_loop()

    async def run(self) -> None:
        """Step every tick at its deadline, or as soon as it is complete; never returns."""
        while True:
            await self.ticks.tick_once()

    async def tick_once(self) -> int:
        return await self.ticks.tick_once()

    async def step(self, tick: int) -> dict[str, OutputChunk]:
        return await self.ticks.step(tick)

    # --- sessions ----------------------------------------------------------------------------

    async def join(self, session_id: str, seed: int | None = None) -> Joined:
        """Add a session from the next tick stepped; answers its first tick, log token and the clock.
        Refused ("capacity") when full, or while steps run hot: new sessions wait, live ones don't."""
        self._restarted()
        return await self._answer(await self.admission.join(session_id, seed))

    async def resume(self, session_id: str) -> Joined:
        """Join a session that was live elsewhere, rebuilt from the log (`Migration.resume`).
        Answers like `join`, with what the rebuild did; a session already here is answered as it is."""
        self._restarted()
        session, resumed = await self.migration.resume(session_id)
        return await self._answer(session, resumed)

    async def _answer(self, session: JoinedSession, resumed: Resumed | None = None) -> Joined:
        return Joined(session.session_id, session.first_tick, session.log_token, await self.clock_info(), resumed)

    async def leave(self, session_id: str) -> None:
        """Remove a session; its background task is cancelled and its log closed once complete."""
        await self.admission.leave(session_id)

    async def release(self, session_id: str) -> None:
        await self.migration.release(session_id)

    async def drop(self, session_id: str) -> None:
        await self.migration.drop(session_id)

    def _orphaned(self, session: JoinedSession) -> None:
        # Its log stays open: the session may live on elsewhere (its ingress moved it while this
        # actor was too busy to answer); a session that truly ended is closed by its ingress's
        # leave, or ages out of the log's retention.
        self.admission.left(session, "orphaned", close=False)

    async def exchange(self, tick: int, chunks: list[InputChunk], session_ids: list[str]) -> list[OutputChunk]:
        """Hand in chunk `tick` of some sessions; get back tick `tick`'s outputs of `session_ids`
        (`Ticks.exchange`)."""
        self._restarted()
        return await self.ticks.exchange(tick, chunks, session_ids)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every log call queued so far is done (or dropped); False if `timeout` passed first."""
        return await self.logs.flush(timeout)

    def hot(self) -> bool:
        return self.figures.hot()

    # --- figures -----------------------------------------------------------------------------

    async def stats(self, last: int = 50) -> InteractionStats:
        """Recent figures (the last `last` ticks) and totals since the actor started."""
        self._restarted()
        return InteractionStats(
            sessions=len(self.sessions), session_ids=sorted(self.sessions), tick=self.core.next_tick - 1, tick_ms=self.clock.tick_ms,
            **self.figures.summary(last), hot=self.hot(), log_backlog=len(self.logs.queue), totals=dict(self.core.totals),
            node_id=ray.get_runtime_context().get_node_id() if _in_ray_actor() else None,
        )


def _in_ray_actor() -> bool:
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


# Async actor: exchanges from every ingress, joins and the tick loop interleave on one event loop.
InteractionActor = actor_class(Interaction, max_concurrency=1000)
