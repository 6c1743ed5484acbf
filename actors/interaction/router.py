"""Placement: which interaction actor steps each session, and moving sessions when one dies or drains.

An ingress asks its `Placement` three things (`protocols.ports.Placement`):
- `place(session_id, tenant)`: join a new session somewhere with room -> `Placed(actor, port, joined)`;
  ProtocolError "capacity" when every actor is full (or refuses, e.g. overloaded),
  "rate_limit_exceeded" when `tenant` (the caller's API key) holds its limit of sessions already
  (`actors.interaction.quotas.Tenants`; counted here because every session of the deployment is placed here);
- `locate(session_id, lost_on)`: where the session lives now. `lost_on` names the actor the
  ingress last exchanged with and found without the session (it died and restarted empty, or
  could not be reached, or let the session go to drain): the session is resumed from the log
  (`Interaction.resume`), on that actor if it answers and has room, else on another;
- `leave(session_id)`.

`Router` places over many interaction ports (`actors.interaction.placement.Direct` over one):
the interaction actors of the deployment, named `interaction-<i>`, packed (a new session goes to the fullest actor that has room: batches stay large, and the
others stay warm for failover), never onto one that is draining or does not answer. `watch`
adds an actor for each new unit of capacity the cluster offers (a node with the `interaction`
resource joining) through the `grow` callback, so capacity grows without a restart. `drain(name)`
stops placing on an actor and moves its live sessions to the others (`release` there, `resume`
here). `RouterActor` is the Ray actor; ingresses reach it as `Remote(handle, Placement)`, and the
`Placed` it answers holds the actor's port (a `Remote`, which crosses processes as itself).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from protocols import ProtocolError
from protocols.ports import Interaction

from actors.interaction.placement import Placed, drop_if_elsewhere, join_seen_through
from actors.interaction.quotas import Tenants
from actors.remote import actor_class

log = logging.getLogger("interplay.router")

PING_TIMEOUT_S = 0.5  # an actor that does not answer a ping this fast is not placed on
_FREE = asyncio.Lock()  # stands for "no one is moving this session"


@dataclass
class _Actor:
    name: str
    port: Interaction
    capacity: int
    handle: Any = None  # the Ray handle (`handles`: the fleet's figures read every actor through it)
    sessions: set[str] = field(default_factory=set)
    draining: bool = False


class Router:
    """Places sessions over named interaction ports; Ray-free (`RouterActor` below).

    `actors` maps name -> (port, capacity[, handle]). `grow(existing_names)` -> a list of new
    (name, port, capacity, handle) for capacity the cluster gained; `watch()` calls it every
    `watch_s`.
    """

    def __init__(
        self,
        actors: dict[str, tuple] | None = None,
        *,
        grow: Callable[[list[str]], Awaitable[list[tuple]]] | None = None,
        watch_s: float = 5.0,
        ping_timeout_s: float = PING_TIMEOUT_S,
        resume_timeout_s: float = 5.0,
        sessions_per_tenant: int | None = None,
    ):
        self.actors: dict[str, _Actor] = {}
        self.tenants = Tenants(sessions_per_tenant)
        for name, spec in (actors or {}).items():
            self.add(name, *spec)
        self.where: dict[str, str] = {}  # session id -> actor name
        self.grow = grow
        self.watch_s = watch_s
        self.ping_timeout_s = ping_timeout_s
        self.resume_timeout_s = resume_timeout_s
        self.counts = {"placed": 0, "refused": 0, "resumed": 0, "moved": 0, "grown": 0, "forgotten": 0}
        self._strikes: dict[str, int] = {}
        self._session_locks: dict[str, asyncio.Lock] = {}
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task | None = None
        self._started: asyncio.Task | None = None

    def add(self, name: str, port: Interaction, capacity: int, handle: Any = None) -> None:
        self.actors[name] = _Actor(name, port, int(capacity), handle)

    # --- placement ----------------------------------------------------------------------------

    async def place(self, session_id: str, tenant: str | None = None) -> Placed:
        await self.start()
        async with self._lock:
            if session_id in self.where:
                raise ProtocolError(f"session {session_id!r} is already placed", "session_exists", "session_id")
            self.tenants.admit(session_id, tenant)
            try:
                return await self._place(session_id)
            finally:
                if session_id not in self.where:  # refused, failed or cancelled: its place is free
                    self.tenants.release(session_id)

    async def _place(self, session_id: str) -> Placed:
        last: ProtocolError | None = None
        for actor in await self._candidates():
            try:
                joined = await join_seen_through(actor.port, actor.name, session_id)
            except ProtocolError as exc:  # full or overloaded there: try the next
                last = exc
                continue
            except Exception:
                log.warning("join on %s failed; trying another", actor.name, exc_info=True)
                continue
            self._put(session_id, actor)
            self.counts["placed"] += 1
            return Placed(actor.name, actor.port, joined)
        self.counts["refused"] += 1
        if last is not None and last.code != "capacity":
            raise last
        raise ProtocolError("every interaction actor is full; try again later", "capacity")

    async def locate(self, session_id: str, lost_on: str | None = None, gone: bool = False) -> Placed:
        """`gone`: the asker found `lost_on` not answering at all (not just without the session),
        so it is not asked again before the session moves."""
        await self.start()
        # One session at a time, not one placement at a time: the sessions of a dead actor are
        # resumed side by side, each a log read and a short replay.
        async with self._session_locks.setdefault(session_id, asyncio.Lock()):
            name = self.where.get(session_id)
            if name is None:
                if lost_on is None:
                    raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
                # Lost where this router never saw it (it restarted since, and that actor is
                # gone): the log knows it; resume it anywhere.
                return await self._resume(session_id, prefer=None)
            actor = self.actors.get(name)
            if lost_on is None or lost_on != name:
                if actor is not None:
                    return Placed(actor.name, actor.port)  # it moved already: tell the ingress where
            return await self._resume(session_id, prefer=actor, gone=gone)

    async def leave(self, session_id: str) -> None:
        await self.start()
        async with self._lock:
            name = self.where.pop(session_id, None)
            self.tenants.release(session_id)
            self._session_locks.pop(session_id, None)
            actor = self.actors.get(name) if name else None
            if actor is None:
                raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
            actor.sessions.discard(session_id)
        await actor.port.leave(session_id)

    async def drain(self, name: str) -> dict:
        """Place nothing more on `name` and move its sessions to the others; {"moved", "failed"}."""
        actor = self.actors.get(name)
        if actor is None:
            raise ProtocolError(f"unknown interaction actor {name!r}", "unknown_actor", "name")
        actor.draining = True
        moved, failed = [], []
        for sid in sorted(actor.sessions):
            async with self._lock:
                try:
                    await actor.port.release(sid)
                    self._drop(sid)
                    self.where[sid] = name  # until it lands elsewhere
                    await self._resume(sid, prefer=None, avoid=name)
                    moved.append(sid)
                except Exception:
                    log.exception("moving %s off %s failed", sid, name)
                    failed.append(sid)
        self.counts["moved"] += len(moved)
        return {"moved": moved, "failed": failed}

    async def undrain(self, name: str) -> None:
        self.actors[name].draining = False

    # --- capacity -------------------------------------------------------------------------------

    async def watch(self) -> None:
        """Grow with the cluster and reconcile with the actors, every `watch_s`; never returns."""
        growing: asyncio.Task | None = None
        while True:
            if growing is None or growing.done():  # a new actor takes a while to load: beside, not in the way
                growing = asyncio.get_running_loop().create_task(self._grow_logged())
            await asyncio.sleep(self.watch_s)
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconciling with the interaction actors failed")

    async def _grow_logged(self) -> None:
        try:
            await self.grow_once()
        except Exception:
            log.exception("growing the interaction actors failed")

    async def reconcile(self) -> list[str]:
        """Forget sessions an actor no longer has on two checks in a row (they left on their own,
        e.g. orphaned by a dead ingress), so their slots count as free again. A session lost to a
        restart is found by its ingress within a second or two, well before a second check."""
        forgotten = []
        present: dict[str, set] = {}  # actor name -> the sessions it holds, for those that answered
        for actor in list(self.actors.values()):
            try:
                stats = await asyncio.wait_for(actor.port.stats(), self.ping_timeout_s * 4)
            except Exception:
                continue
            present[actor.name] = set(stats.session_ids)
        async with self._lock:
            for sid, name in list(self.where.items()):
                if name not in present or self._session_locks.get(sid, _FREE).locked():
                    continue  # that actor did not answer, or the session is being moved right now
                if sid in present[name]:
                    self._strikes.pop(sid, None)
                elif self._strikes.get(sid, 0) >= 1:
                    self._strikes.pop(sid, None)
                    del self.where[sid]
                    self.tenants.release(sid)
                    self._session_locks.pop(sid, None)
                    if name in self.actors:
                        self.actors[name].sessions.discard(sid)
                    forgotten.append(sid)
                else:
                    self._strikes[sid] = 1
        self.counts["forgotten"] += len(forgotten)
        return forgotten

    async def grow_once(self) -> list[str]:
        if self.grow is None:
            return []
        new = await self.grow(list(self.actors))
        for spec in new:
            self.add(*spec)
        self.counts["grown"] += len(new)
        return [spec[0] for spec in new]

    async def start(self) -> None:
        """Take in what the actors hold, then watch the cluster and the actors (idempotent). A
        router Ray restarted has only its constructor's arguments: the first call that reaches it
        starts it, and waits for it."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._start_up())
        await asyncio.shield(self._started)

    async def _start_up(self) -> None:
        # The actors there are (a restarted router knows only its first ones) and what they hold,
        # briefly each: an actor that cannot be placed right now must not hold placements up.
        try:
            await asyncio.wait_for(self.grow_once(), 10.0)
        except Exception:
            log.warning("looking for interaction actors at start-up failed", exc_info=True)
        await self.adopt()
        self._watcher = asyncio.get_running_loop().create_task(self.watch())

    async def adopt(self) -> int:
        """Know every session the actors step (after a restart, the map is rebuilt from them)."""
        found = 0
        async def held(actor: _Actor) -> list:
            stats = await asyncio.wait_for(actor.port.stats(), 2.0)
            return list(stats.session_ids)

        answers = await asyncio.gather(*(held(a) for a in self.actors.values()), return_exceptions=True)
        async with self._lock:
            for actor, stats in zip(list(self.actors.values()), answers):
                for sid in stats if isinstance(stats, list) else []:
                    if sid not in self.where:
                        self.where[sid] = actor.name
                        actor.sessions.add(sid)
                        found += 1
        return found

    async def stats(self) -> dict:
        await self.start()
        return {
            "actors": {a.name: {"sessions": len(a.sessions), "capacity": a.capacity, "draining": a.draining} for a in self.actors.values()},
            "sessions": len(self.where), **self.counts,
        }

    async def placements(self) -> dict[str, str]:
        """Session id -> the name of the actor stepping it."""
        await self.start()
        return dict(self.where)

    async def handles(self) -> dict[str, Any]:
        return {a.name: a.handle for a in self.actors.values()}

    # --- inside ---------------------------------------------------------------------------------

    def _open(self, avoid: str | None = None) -> list[_Actor]:
        """Actors with room that are not draining, fullest first."""
        open_ = [a for a in self.actors.values() if not a.draining and a.name != avoid and len(a.sessions) < a.capacity]
        return sorted(open_, key=lambda a: (-len(a.sessions), a.name))

    async def _candidates(self, avoid: str | None = None) -> list[_Actor]:
        """`_open` actors that answer a ping."""
        open_ = self._open(avoid)
        alive = await asyncio.gather(*(self._alive(a, self.ping_timeout_s) for a in open_))
        return [a for a, ok in zip(open_, alive) if ok]

    async def _alive(self, actor: _Actor, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(actor.port.clock_info(), timeout_s)
            return True
        except Exception:
            return False

    async def _resume(self, session_id: str, prefer: _Actor | None, avoid: str | None = None, gone: bool = False) -> Placed:
        """Resume a lost session: on `prefer` (where it was) if it answers, else anywhere with room."""
        self._drop(session_id)
        # Never move a session off an actor that still answers (it is busy, not gone: moving would
        # leave it stepping a session nobody feeds). The others are not pinged first: the resume
        # itself is the question, and a loaded machine answers pings late.
        home = prefer is not None and not prefer.draining and not gone and await self._alive(prefer, self.ping_timeout_s)
        others = [a for a in self._open(avoid) if a is not prefer]
        # Where it was comes last even when it did not answer: with no room elsewhere it is the
        # only hope, and a busy actor that still holds the session answers a resume as it is.
        late = prefer is not None and not home and not prefer.draining and prefer.name != avoid and prefer.name in self.actors
        order = others if prefer is None else ([prefer] if home else []) + others + ([prefer] if late else [])
        for actor in order:
            attempt = asyncio.ensure_future(actor.port.resume(session_id))
            try:
                joined = await asyncio.wait_for(asyncio.shield(attempt), self.resume_timeout_s)
            except Exception as exc:
                log.warning("resuming %s on %s failed: %r", session_id, actor.name, exc)
                if not isinstance(exc, ProtocolError):  # it may land there yet (a restarting actor runs it later)
                    landed = drop_if_elsewhere(actor.port, actor.name, attempt, session_id, lambda: self.where.get(session_id))
                    asyncio.get_running_loop().create_task(landed)
                continue
            self._put(session_id, actor)
            self.counts["resumed"] += 1
            return Placed(actor.name, actor.port, joined)
        # Still known (where it was): the ingress asks again until an actor can take it.
        raise ProtocolError("no interaction actor can take this session now", "capacity")

    def _put(self, session_id: str, actor: _Actor) -> None:
        self.where[session_id] = actor.name
        actor.sessions.add(session_id)

    def _drop(self, session_id: str) -> None:
        name = self.where.get(session_id)
        if name in self.actors:
            self.actors[name].sessions.discard(session_id)


# One event loop: placements are serialised by the router's lock, pings and joins interleave.
RouterActor = actor_class(Router, max_concurrency=1000)
