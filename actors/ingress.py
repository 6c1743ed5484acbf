"""IngressActor: Realtime sessions in (WebRTC calls, WebSockets), one exchange a tick with the interaction side.

`Ingress` composes three parts, one file each:
- a transport per session (`transports.py`): WebRTC (SDP, tracks, the "oai-events" data
  channel) or WebSocket (events through a queue, audio as base64 events);
- the session's Realtime protocol state (`realtime_session.py`): client events in, server events
  and model inputs out, the same code whichever transport carries them;
- the gatherer (`gatherer.py`): once per tick one InputChunk per live session, one `exchange`
  through the `protocols.ports.Interaction` port, outputs delivered back.

`Ingress(interaction, clock, ...)` takes the interaction side as a port (in process, or a Ray
actor through `actors.remote.Remote`) and its `TickClock` (or the clock's dict); `IngressActor`
is the Ray actor of the same class.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray

from protocols import ProtocolError
from protocols.chunks import MAX_FRAME_EDGE, PATCH
from protocols.clock import TickClock
from protocols.ports import Interaction
from protocols.realtime import SessionConfig, rate_of

from .gatherer import Call, Gatherer
from .ice import use_ice_addresses
from .realtime_session import RealtimeSession
from .transports import MAX_CHANNEL_EVENT_BYTES, WebRTCTransport, WebSocketTransport, check_sdp

log = logging.getLogger(__name__)


def check_config(config: dict | None) -> dict:
    """A session config as the client gave it (offer or WebSocket), validated and dumped."""
    try:
        return SessionConfig.model_validate(config or {}).model_dump(mode="json", exclude_none=True)
    except Exception as exc:
        raise ProtocolError(f"invalid session config: {exc}", "invalid_value", "session") from None


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
    candidates (see `actors.ice`).
    """

    def __init__(
        self,
        interaction: Interaction,
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
        exchange_timeout_s: float = 1.0,
        max_in_flight: int = 4,
        connect_timeout_s: float = 20.0,
        prebuffer_ms: float = 60.0,
        max_playout_s: float = 0.6,
        max_event_bytes: int = MAX_CHANNEL_EVENT_BYTES,
        ice_addresses: list[str] | None = None,
    ):
        if frame_size % PATCH or not 0 < frame_size <= MAX_FRAME_EDGE:
            raise ValueError(f"frame_size must be a multiple of {PATCH} up to {MAX_FRAME_EDGE}")
        if ice_addresses is not None:
            use_ice_addresses(ice_addresses)
        self.interaction = interaction
        self.clock = clock if isinstance(clock, TickClock) else TickClock.from_dict(clock)
        self.max_sessions = max_sessions
        self.jitter_ms = jitter_ms
        self.frame_size = frame_size
        self.connect_timeout_s = connect_timeout_s
        self.prebuffer_ms = prebuffer_ms
        self.max_playout_s = max_playout_s
        self.max_event_bytes = max_event_bytes
        self.sessions: dict[str, Call] = {}
        self.gatherer = Gatherer(interaction, self.clock, self.sessions, grace_s=grace_ms / 1000, exchange_timeout_s=exchange_timeout_s, max_in_flight=max_in_flight)
        self._negotiating = 0
        self._counts = {"calls": 0, "closed": 0}

    # --- sessions -------------------------------------------------------------------------------

    async def offer(self, sdp: str, session_config: dict | None = None) -> dict:
        """SDP offer in, {"session_id", "sdp": answer} out; ProtocolError "invalid_sdp" / "capacity"."""
        check_sdp(sdp)
        config = check_config(session_config)
        self._check_room()
        self.gatherer.start()
        self._negotiating += 1
        transport = WebRTCTransport(self.clock, jitter_ms=self.jitter_ms, frame_size=self.frame_size, max_playout_s=self.max_playout_s, max_event_bytes=self.max_event_bytes)
        call = self._new_call(transport, config)
        session = call.session
        transport.on_message = lambda message: session.receive(message, time.time())
        transport.on_open = session.created
        transport.on_connected = lambda: self._connected(session)
        transport.on_closed = lambda: self._end(session.id)
        try:
            answer = await transport.negotiate(sdp)
            await self._join(session)
        except BaseException:
            await transport.close()
            raise
        finally:
            self._negotiating -= 1
        self._register(call)
        transport.tasks.append(asyncio.create_task(self._watch_connect(session)))
        return {"session_id": session.id, "sdp": answer}

    async def open_websocket(self, session_config: dict | None = None) -> tuple[str, asyncio.Queue]:
        """A Realtime session over a WebSocket: its id, and the queue its events leave by (JSON
        text; None once it ended). The caller feeds the client's messages to `receive`, sends what
        the queue yields, and calls `close` when the socket closes."""
        config = check_config(session_config)
        self._check_room()
        self.gatherer.start()
        transport = WebSocketTransport(self.clock, output_rate=rate_of(config, "output"))
        call = self._new_call(transport, config)
        self._negotiating += 1
        try:
            await self._join(call.session)
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

    async def close(self, session_id: str) -> None:
        """End a session (hang up) and free its slot; ProtocolError "unknown_session" if there is none."""
        if not await self._end(session_id):
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")

    async def stats(self) -> dict:
        return {"sessions": len(self.sessions), "max_sessions": self.max_sessions, "in_flight": self.gatherer.in_flight, **self.gatherer.counts, **self._counts}

    async def shutdown(self) -> None:
        self.gatherer.stop()
        for session_id in list(self.sessions):
            await self._end(session_id)

    # --- inside ---------------------------------------------------------------------------------

    def _check_room(self) -> None:
        if len(self.sessions) + self._negotiating >= self.max_sessions:
            raise ProtocolError(f"this ingress is full ({self.max_sessions} calls)", "capacity")

    def _new_call(self, transport, config: dict) -> Call:
        session = RealtimeSession(transport, config, prebuffer_ms=self.prebuffer_ms)
        # The last sample of chunk k arrives by clock.end(k) - jitter_s: what a client needs to time its turns.
        session.clock_info = {**self.clock.to_dict(), "jitter_s": self.jitter_ms / 1000}
        return Call(session, transport)

    def _register(self, call: Call) -> None:
        self.sessions[call.id] = call
        self._counts["calls"] += 1

    async def _join(self, session: RealtimeSession) -> None:
        """Announce the session to the interaction side (which may refuse it, e.g. "capacity").
        What it answers carries the session's log token, handed to the client in session.created."""
        joined = await self.interaction.join(session.id)
        session.log_token = joined.get("log_token") if isinstance(joined, dict) else None

    def _connected(self, session: RealtimeSession) -> None:
        if session.first_tick is None:
            session.first_tick = self.clock.current()

    async def _watch_connect(self, session: RealtimeSession) -> None:
        await asyncio.sleep(self.connect_timeout_s)
        if session.first_tick is None:
            log.info("session %s never connected; closing it", session.id)
            await self._end(session.id)

    async def _end(self, session_id: str) -> bool:
        call = self.sessions.pop(session_id, None)
        if call is None:
            return False  # already ended: the several signals of a hang-up race each other
        self._counts["closed"] += 1
        await call.transport.close()
        try:
            await self.interaction.leave(session_id)
        except Exception:
            log.exception("leave(%s) failed", session_id)
        return True


# Ray's async actor: every method runs on the actor's event loop, next to aiortc's tasks.
IngressActor = ray.remote(max_concurrency=1000)(Ingress)
