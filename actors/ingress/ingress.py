"""IngressActor: Realtime sessions in (WebRTC calls, WebSockets), one exchange a tick with the interaction side.

`Ingress` composes three parts, one file each:
- a transport per session (`transports.py`): WebRTC (SDP, tracks, the "oai-events" data
  channel) or WebSocket (events through a queue, audio as base64 events);
- the session's Realtime protocol state (`realtime_session.py`): client events in, server events
  and model inputs out, the same code whichever transport carries them;
- the gatherer (`gatherer.py`): once per tick one InputChunk per live session, one `exchange`
  through the `protocols.ports.Interaction` port, outputs delivered back.

`Ingress(interaction, clock, ...)` takes the interaction side as a port (in process, or a Ray
actor through `actors.remote.Remote`) or as a `protocols.ports.Placement` over many interaction
actors (the router actor as `Remote(handle, Placement)`), and the `TickClock` (or the clock's dict) they share; `IngressActor`
is the Ray actor of the same class. There is one gatherer per interaction actor the calls are
placed on, each exchanging once a tick with its actor on that actor's clock as seen from here.
When a gatherer finds its actor gone or without a call's session, the call stays connected while
the placement finds (or resumes from the log) where its session lives now, and it moves to that
actor's gatherer; the client hears silence meanwhile. A call that cannot be placed again within
`relocate_s` ends with an `error` event.
"""

from __future__ import annotations

import asyncio
import logging
import time

from protocols import ProtocolError
from protocols.chunks import MAX_FRAME_EDGE, PATCH
from protocols.clock import TickClock
from protocols.ports import Interaction, Placement
from protocols.realtime_config import rate_of
from protocols.realtime_events import error_event, expired_error, session_config

from actors.ingress.gatherer import COUNTS, Call, Gatherer, estimate_offset
from actors.ingress.ice import use_ice_addresses
from actors.ingress.realtime_session import RealtimeSession
from actors.interaction.placement import Direct, Placed
from actors.ingress.transports import MAX_CHANNEL_EVENT_BYTES, WebRTCTransport, WebSocketTransport, check_sdp
from actors.remote import actor_class

log = logging.getLogger(__name__)

MAX_OFFSET_RTT_S = 0.02  # a clock offset is taken from round trips no longer than this (or a tenth of a tick)


def check_config(config: dict | None) -> dict:
    """A session config as the client gave it (offer or WebSocket), validated and dumped; the
    same checks as a session.update's (`protocols.realtime_events.session_config`)."""
    return session_config(config)


class Ingress:
    """Holds many sessions and exchanges their chunks with the interaction side every tick.

    A session is stepped from the tick in which its connection came up (a WebSocket's at once).
    `join(session_id)` on the interaction side is awaited before a session is accepted (a
    ProtocolError from it, e.g. "capacity", refuses it) and `leave` when it ends. A call's audio
    is placed a margin after its arrival that follows the packets' arrival spread, at most
    `jitter_ms` (see AudioChunker), so tick k's chunk is normally complete before the tick ends.
    Tick k is gathered as soon as every live call's chunk k is complete, at the latest
    `grace_ms` after the tick ends: a call whose chunk is not complete (a late or silent track,
    or any WebSocket call, whose buffered input never says so) holds the tick that long, and a
    chunk still not in is sent as missing (silence). A response starts on the first outgoing
    frame due at least its margin (at most `prebuffer_ms`) after its first output is written,
    and at most `max_playout_s` is queued; a call that does not connect within
    `connect_timeout_s` is closed. `ice_addresses`, when given, pins this process's WebRTC host
    candidates (see `actors.ingress.ice`).
    """

    def __init__(
        self,
        interaction: Interaction | Placement,
        clock: TickClock | dict,
        *,
        max_sessions: int = 32,
        # A complete chunk is gathered at once, so the grace only delays ticks in which some call's
        # chunk is not complete, and then for every call (each tick while a WebSocket call is live).
        # Audio is placed so its blocks normally arrive 3 ms or more before their tick ends: 1 ms
        # more takes a block that is a little late without making such ticks cost much.
        grace_ms: float = 1.0,
        jitter_ms: float = 40.0,
        frame_size: int = 160,
        exchange_timeout_s: float = 0.5,
        max_in_flight: int = 4,
        connect_timeout_s: float = 20.0,
        prebuffer_ms: float = 60.0,
        max_playout_s: float = 0.6,
        max_event_bytes: int = MAX_CHANNEL_EVENT_BYTES,
        ice_addresses: list[str] | None = None,
        relocate_s: float = 30.0,
        offset_every_s: float = 30.0,
        idle_timeout_s: float | None = None,
        max_session_s: float | None = None,
    ):
        if frame_size % PATCH or not 0 < frame_size <= MAX_FRAME_EDGE:
            raise ValueError(f"frame_size must be a multiple of {PATCH} up to {MAX_FRAME_EDGE}")
        if ice_addresses is not None:
            use_ice_addresses(ice_addresses)
        # A port answers only what it declares (a `Remote` too), so a placement is told by its methods.
        self.placement: Placement = interaction if isinstance(interaction, Placement) else Direct(interaction)
        self.clock = clock if isinstance(clock, TickClock) else TickClock.from_dict(clock)
        self.max_sessions = max_sessions
        self.jitter_ms = jitter_ms
        self.frame_size = frame_size
        self.connect_timeout_s = connect_timeout_s
        self.prebuffer_ms = prebuffer_ms
        self.max_playout_s = max_playout_s
        self.max_event_bytes = max_event_bytes
        self.relocate_s = relocate_s
        self.offset_every_s = offset_every_s
        self.idle_timeout_s, self.max_session_s = idle_timeout_s, max_session_s
        self._reaper: asyncio.Task | None = None
        self.sessions: dict[str, Call] = {}
        self.groups: dict[str, Gatherer] = {}  # interaction actor name -> the gatherer exchanging with it
        self._gatherer_args = {"grace_s": grace_ms / 1000, "exchange_timeout_s": exchange_timeout_s, "max_in_flight": max_in_flight}
        self._moving: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._negotiating = 0
        self._counts = {"calls": 0, "closed": 0, "moved": 0, "lost": 0}

    # --- sessions -------------------------------------------------------------------------------

    async def offer(self, sdp: str, session_config: dict | None = None, owner: str | None = None, tenant: str | None = None,
                    ceiling: dict | None = None) -> dict:
        """SDP offer in, {"session_id", "sdp": answer} out; ProtocolError "invalid_sdp" / "capacity" /
        "rate_limit_exceeded". `owner`, when given, is who (besides an API key holder) may hang the
        call up; `tenant` whose session quota the call counts against; `ceiling` the config bound to
        the caller's client secret, which no session.update or response.create may widen."""
        check_sdp(sdp)
        config = check_config(session_config)
        self._check_room()
        self._negotiating += 1
        transport = WebRTCTransport(self.clock, jitter_ms=self.jitter_ms, frame_size=self.frame_size, max_playout_s=self.max_playout_s, max_event_bytes=self.max_event_bytes)
        call = self._new_call(transport, config, ceiling)
        call.owner, call.tenant = owner, tenant
        session = call.session
        transport.on_message = lambda message: session.receive(message, time.time())
        transport.on_open = session.created
        transport.on_connected = lambda: self._connected(session)
        transport.on_closed = lambda: self._end(session.id)
        try:
            answer = await transport.negotiate(sdp)
            await self._join(call)
        except BaseException:
            try:
                await transport.close()
            except Exception:  # the original error is the one to report
                log.warning("closing a failed offer's transport failed", exc_info=True)
            raise
        finally:
            self._negotiating -= 1
        self._register(call)
        transport.tasks.append(asyncio.create_task(self._watch_connect(session)))
        return {"session_id": session.id, "sdp": answer}

    async def open_websocket(self, session_config: dict | None = None, owner: str | None = None, tenant: str | None = None,
                             ceiling: dict | None = None) -> tuple[str, asyncio.Queue]:
        """A Realtime session over a WebSocket: its id, and the queue its events leave by (JSON
        text; None once it ended). The caller feeds the client's messages to `receive`, sends what
        the queue yields, and calls `close` when the socket closes. `owner`, `tenant` and
        `ceiling` as for `offer`."""
        config = check_config(session_config)
        self._check_room()
        transport = WebSocketTransport(self.clock, output_rate=rate_of(config, "output"), max_event_bytes=self.max_event_bytes)
        call = self._new_call(transport, config, ceiling)
        call.owner, call.tenant = owner, tenant
        self._negotiating += 1
        try:
            await self._join(call)
        finally:
            self._negotiating -= 1
        call.session.first_tick = self.clock.current()
        self._register(call)
        call.session.created()
        return call.id, transport.outbox

    def receive(self, session_id: str, message: str | bytes) -> None:
        """A client message of a WebSocket session (errors go back on its queue)."""
        call = self.sessions.get(session_id)
        if call is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        call.session.receive(message, time.time())

    async def close(self, session_id: str, owner: str | None = None) -> None:
        """End a session (hang up) and free its slot; ProtocolError "unknown_session" if there is
        none, "forbidden" if `owner` is given and the call is someone else's."""
        call = self.sessions.get(session_id)
        if call is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        if owner is not None and call.owner != owner:
            raise ProtocolError("this call was not made with these credentials", "forbidden", "session_id")
        if not await self._end(session_id):
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")

    async def stats(self) -> dict:
        counts = dict.fromkeys(COUNTS, 0)  # every counter, also before the first call is placed
        for group in self.groups.values():
            for key, value in group.counts.items():
                counts[key] = counts.get(key, 0) + value
        in_flight = sum(g.in_flight for g in self.groups.values())
        return {
            "sessions": len(self.sessions), "max_sessions": self.max_sessions, "in_flight": in_flight, **counts, **self._counts,
            "actors": {name: len(g.calls) for name, g in self.groups.items()},
        }

    async def shutdown(self) -> None:
        for group in self.groups.values():
            group.stop()
        for task in [*self._tasks, self._reaper]:
            if task is not None:
                task.cancel()
        for session_id in list(self.sessions):
            await self._end(session_id)

    # --- inside ---------------------------------------------------------------------------------

    def _check_room(self) -> None:
        if len(self.sessions) + self._negotiating >= self.max_sessions:
            raise ProtocolError(f"this ingress is full ({self.max_sessions} calls)", "capacity")

    def _new_call(self, transport, config: dict, ceiling: dict | None = None) -> Call:
        session = RealtimeSession(transport, config, prebuffer_ms=self.prebuffer_ms, idle_timeout_s=self.idle_timeout_s, max_session_s=self.max_session_s, ceiling=ceiling)
        # The last sample of chunk k arrives by clock.end(k) - jitter_s: what a client needs to time its turns.
        session.clock_info = {**self.clock.to_dict(), "jitter_s": self.jitter_ms / 1000}
        return Call(session, transport)

    def _register(self, call: Call) -> None:
        self.sessions[call.id] = call
        self.groups[call.actor].add(call)
        self._counts["calls"] += 1
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self, every_s: float = 1.0) -> None:
        """End the sessions that were idle too long or reached their maximum length, each after
        an `error` event (code session_expired) saying which."""
        while True:
            await asyncio.sleep(every_s)
            now = time.time()
            for call in list(self.sessions.values()):
                try:
                    reason = call.session.expired(now)
                    if reason:
                        self._counts["expired"] = self._counts.get("expired", 0) + 1
                        call.session.sink.send(expired_error(reason))
                        await self._end(call.id)
                except Exception:
                    log.exception("session %s: expiry check failed", call.id)

    async def _join(self, call: Call) -> None:
        """Place the session on an interaction actor (which may refuse it, e.g. "capacity").
        What it answers carries the session's log token, handed to the client in session.created."""
        try:
            placed = await self.placement.place(call.id, call.tenant)
        except asyncio.CancelledError:  # the join may have landed before the caller gave up: take it back
            self._spawn(self._leave_quietly(call.id))
            raise
        call.session.log_token = placed.joined.log_token if placed.joined is not None else None
        call.actor = placed.actor
        self._group(placed)

    async def _leave_quietly(self, session_id: str) -> None:
        try:
            await self.placement.leave(session_id)
        except Exception:
            pass  # it never joined

    def _group(self, placed: Placed) -> Gatherer:
        """The gatherer exchanging with `placed.actor` (made, started and its clock offset
        estimated on first use)."""
        group = self.groups.get(placed.actor)
        if group is None:
            group = self.groups[placed.actor] = Gatherer(
                placed.port, self.clock, {}, name=placed.actor, on_lost=self._lost, **self._gatherer_args,
            )
            self._spawn(self._keep_offset(group))
        group.start()
        return group

    async def _keep_offset(self, group: Gatherer) -> None:
        """Keep `group`'s clock on its actor's: the offset from round trips, now and then."""
        while self.groups.get(group.name) is group:
            try:
                offset, rtt = await asyncio.wait_for(estimate_offset(group.interaction), 5.0)
                # The midpoint of a round trip is only as good as the trip is short: a busy actor
                # answering late would skew the clock by up to half of it. Keep the last estimate then.
                if rtt <= max(MAX_OFFSET_RTT_S, 0.1 * self.clock.tick_s):
                    group.clock = self.clock.with_offset(offset)
            except Exception:
                pass  # unreachable for now: keep the last estimate
            await asyncio.sleep(self.offset_every_s)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- moving calls between interaction actors -------------------------------------------------

    def _lost(self, session_ids: list[str], gone: bool = False) -> None:
        for sid in session_ids:
            call = self.sessions.get(sid)
            if call is not None and sid not in self._moving:
                self._moving.add(sid)
                self._spawn(self._relocate(call, call.actor, gone))

    async def _relocate(self, call: Call, lost_on: str | None, gone: bool = False) -> None:
        """Find where the call's session lives now (resumed from the log if need be) and move the
        call to that actor's gatherer; end the call if none can take it within `relocate_s`."""
        deadline = time.monotonic() + self.relocate_s
        try:
            while call.id in self.sessions:
                try:
                    placed = await asyncio.wait_for(self.placement.locate(call.id, lost_on, gone), max(0.1, deadline - time.monotonic()))
                except Exception as exc:
                    if isinstance(exc, ProtocolError) and exc.code == "unknown_session" or time.monotonic() > deadline:
                        log.warning("session %s could not be placed again: %r", call.id, exc)
                        self._counts["lost"] += 1
                        call.session.sink.send(error_event("the session was lost by the server; please call again", "session_lost", type="server_error"))
                        await self._end(call.id)  # the placement forgets it (wherever it is not)
                        return
                    await asyncio.sleep(0.2)
                    continue
                old = self.groups.get(call.actor)
                if old is not None:
                    old.forget(call.id)
                call.actor = placed.actor
                group = self._group(placed)
                if call.id in self.sessions:
                    group.add(call)
                if placed.actor != lost_on:
                    self._counts["moved"] += 1
                return
        finally:
            self._moving.discard(call.id)

    def _connected(self, session: RealtimeSession) -> None:
        if session.first_tick is None:
            session.first_tick = self.clock.current()

    async def _watch_connect(self, session: RealtimeSession) -> None:
        await asyncio.sleep(self.connect_timeout_s)
        if session.first_tick is None:
            log.info("session %s never connected; closing it", session.id)
            await self._end(session.id)

    async def _end(self, session_id: str, leave: bool = True) -> bool:
        call = self.sessions.pop(session_id, None)
        if call is None:
            return False  # already ended: the several signals of a hang-up race each other
        self._counts["closed"] += 1
        group = self.groups.get(call.actor)
        if group is not None:
            group.forget(session_id)
        await call.transport.close()
        if leave:
            try:
                await self.placement.leave(session_id)
            except Exception:
                log.exception("leave(%s) failed", session_id)
        return True


# Ray's async actor: every method runs on the actor's event loop, next to aiortc's tasks.
IngressActor = actor_class(Ingress, max_concurrency=1000)
