"""IngressActor: WebRTC calls in, one batched exchange with the interaction side per 200 ms tick.

`Ingress.offer(sdp)` answers a client's SDP offer (the `POST /v1/realtime/calls` body) and holds
the call: Opus audio becomes 16 kHz chunks aligned to the interaction clock, video becomes one
resized frame a tick, and the client's `oai-events` data channel carries Realtime events. At
tick k's end + `grace_s` the ingress builds one `InputChunk` per live session (flagged `missing`,
with silence, when its audio is not in) and calls `exchange(k, chunks, session_ids)` once for
all of them; the `OutputChunk`s it returns are played on each call's paced audio track and
announced as Realtime events. `Ingress` is plain asyncio with the interaction side injected;
`IngressActor` is the Ray actor, wired to an InteractionActor by name or handle.

Output events, per speaking run (consecutive speaking chunks, see `is_speaking`):
  run starts  -> response.created, response.output_item.added, conversation.item.added,
                 output_audio_buffer.started
  each chunk  -> response.output_audio_transcript.delta (when it carries text)
  run ends    -> response.output_audio_transcript.done, response.output_audio.done,
                 response.output_item.done, response.done (status "completed"), and
                 output_audio_buffer.stopped once its audio has played out
  interrupted -> (response.cancel, output_audio_buffer.clear, or truncating the item that is
                 still playing) queued audio is dropped, response.done (status "cancelled"),
                 output_audio_buffer.cleared; the model's speech stays muted until it yields.
Over a WebSocket the same, less the output_audio_buffer.* events (the client plays the audio,
which arrives as response.output_audio.delta). Client events that parse are forwarded to the model in the next InputChunk's `events`; typed
user text (`conversation.item.create`) goes into its `text`. Bad events get an `error` event
and the call goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Awaitable, Callable

import numpy as np
import ray
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from protocols import CHUNK_SAMPLES, SAMPLE_RATE, InputChunk, OutputChunk, ProtocolError, new_id
from protocols.chunks import MAX_FRAME_EDGE, MAX_TEXT_CHARS, PATCH, silence
from protocols.realtime import MAX_EVENT_BYTES as REALTIME_MAX_EVENT_BYTES
from protocols.realtime import DEFAULT_RATE, SessionConfig, decode_pcm16, error_event, error_from, is_error, parse_client_event, server_event

from .media import (
    OUT_RATE, AudioChunker, BufferedAudioInput, EventAudioSink, FrameSampler, PacedAudioTrack, allowed_candidates,
    frame_to_samples, pinned_ice_addresses, use_ice_addresses,
)

log = logging.getLogger(__name__)

Exchange = Callable[[int, list[InputChunk], list[str]], Awaitable[list[OutputChunk]]]

DATA_CHANNEL = "oai-events"
MAX_SDP_BYTES = 64 * 1024
MAX_CANDIDATES = 32  # ICE candidates in an offer; each one costs connectivity checks
MAX_EVENT_BYTES = 256 * 1024  # also what aiortc advertises as its SCTP max-message-size
MAX_EVENTS_PER_TICK = 64  # client events waiting for the next chunk; beyond that they are refused
MAX_ITEMS = 32  # assistant audio items remembered per call, for conversation.item.truncate
SPEAKING, NOT_SPEAKING = {"speak", "backchannel"}, {"silent", "yield"}


def is_speaking(out: OutputChunk) -> bool:
    """A chunk is spoken output if its controls say speak/backchannel; silent/yield say it is not.

    Without either (no controls, or only delegate/tool_call) it is spoken if it has text or any
    non-zero audio sample.
    """
    controls = set(out.controls)
    if controls & SPEAKING:
        return True
    if controls & NOT_SPEAKING:
        return False
    return bool(out.text) or bool(np.any(out.audio))


def check_sdp(sdp) -> str:
    """Cheap checks before aiortc parses anything: size, shape, m-lines, candidate count."""
    if not isinstance(sdp, str):
        raise ProtocolError("the SDP offer must be a string", "invalid_sdp", "sdp")
    if len(sdp.encode("utf-8", "replace")) > MAX_SDP_BYTES:
        raise ProtocolError(f"the SDP offer is larger than {MAX_SDP_BYTES} bytes", "invalid_sdp", "sdp")
    if not sdp.startswith("v=0") or "\x00" in sdp:
        raise ProtocolError("not an SDP offer: it must start with 'v=0'", "invalid_sdp", "sdp")
    if sdp.count("a=candidate:") > MAX_CANDIDATES:
        raise ProtocolError(f"the SDP offer has more than {MAX_CANDIDATES} ICE candidates", "invalid_sdp", "sdp")
    kinds = [line[2:].split(" ", 1)[0] for line in sdp.splitlines() if line.startswith("m=")]
    if kinds.count("audio") != 1 or kinds.count("video") > 1 or kinds.count("application") > 1 or len(kinds) > 3:
        raise ProtocolError(f"the SDP offer must have exactly one audio m-line, at most one video and one application (data channel) m-line; got {kinds}", "invalid_sdp", "sdp")
    return sdp


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_config(config: dict | None) -> dict:
    try:
        return SessionConfig.model_validate(config or {}).model_dump(mode="json", exclude_none=True)
    except Exception as exc:
        raise ProtocolError(f"invalid session config: {exc}", "invalid_value", "session") from None


def _user_text(item: dict) -> str:
    """The typed text of a user message item ('' for any other item)."""
    if item.get("type") != "message" or item.get("role") != "user":
        return ""
    parts = []
    for part in item.get("content") or []:
        if isinstance(part, dict) and part.get("type") in ("input_text", "text"):
            if not isinstance(part.get("text"), str):
                raise ProtocolError("input_text content needs a string 'text'", "invalid_value", "item.content")
            parts.append(part["text"])
    return "\n".join(parts)


@dataclass
class _Item:
    """An assistant audio item on its track's timeline (48 kHz samples, see PacedAudioTrack)."""

    start: int
    end: int


@dataclass
class _Run:
    response_id: str
    item_id: str
    transcript: list[str] = field(default_factory=list)


class QueueChannel:
    """A WebSocket session's outgoing events: the gateway drains `queue` into the socket.

    Shaped like the data channel (`readyState`, `send`) so a session speaks to both alike; `None`
    in the queue means the session ended.
    """

    readyState = "open"

    def __init__(self, max_queued: int = 2000):
        self.queue: asyncio.Queue = asyncio.Queue(max_queued)

    def send(self, text: str) -> None:
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:  # a client that stopped reading loses events, nobody else does
            log.warning("websocket client is not reading; dropping an event")

    def close(self) -> None:
        self.readyState = "closed"
        try:
            self.queue.put_nowait(None)
        except asyncio.QueueFull:
            pass


def _rate(config: dict, direction: str) -> int:
    fmt = ((config.get("audio") or {}).get(direction) or {}).get("format") or {}
    return int(fmt.get("rate") or DEFAULT_RATE)


class _Session:
    """One call. Over WebRTC audio rides tracks and events the data channel; over a WebSocket
    (`websocket=True`) both ride events: audio in through a FIFO, audio out as deltas."""

    def __init__(self, pc: RTCPeerConnection | None, chunker, frame_size: int, max_playout_s: float, config: dict, clock: dict | None = None, websocket: bool = False):
        self.id = new_id("sess")
        self.pc = pc
        self.websocket = websocket
        self.chunker = chunker
        self.frames = FrameSampler(frame_size)
        self.track = EventAudioSink(_rate(config, "output")) if websocket else PacedAudioTrack(max_queue_s=max_playout_s)
        self.channel = QueueChannel() if websocket else None
        # A data channel message is capped by SCTP; a WebSocket append may carry far more audio.
        self.max_event_bytes = REALTIME_MAX_EVENT_BYTES if websocket else MAX_EVENT_BYTES
        self.clock = clock or {}
        self.log_token: str | None = None
        self.levels: dict[int, float] = {}  # input RMS per tick, for interplay.tick events
        self.lateness: deque[float] = deque(maxlen=100)  # seconds after its tick's end each output came
        self.config = config
        self.first_tick: int | None = None  # stepped from this tick on; set once connected
        self.early: dict[int, np.ndarray] = {}  # chunks that came before their tick was gathered
        self.text: list[str] = []
        # The offer's session config reaches the model with the first chunk, like a session.update.
        self.events: list[dict] = [{"type": "session.update", "session": config}] if len(config) > 1 else []
        self.run: _Run | None = None
        self.items: OrderedDict[str, _Item] = OrderedDict()
        self.last_response_id: str | None = None
        self.muted = False
        self.stop_timer: asyncio.TimerHandle | None = None
        self.last_out_seq = -1
        self.tasks: list[asyncio.Task] = []

    def send(self, event: dict) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            try:
                self.channel.send(json.dumps(event))
            except Exception as exc:  # a closing channel must not break the tick
                log.debug("session %s: send failed: %s", self.id, exc)

    def join_info(self, joined) -> None:
        """What the interaction side said on join: the session's log token, its capability to
        read its own log (and only that), handed to the client in session.created."""
        self.log_token = joined.get("log_token") if isinstance(joined, dict) else None

    def session_object(self) -> dict:
        extension = {**self.config.get("interplay", {}), "clock": {**self.clock, "first_tick": self.first_tick}, "log_token": self.log_token}
        return {"id": self.id, "object": "realtime.session", **self.config, "interplay": extension}

    def item_played(self, item: _Item) -> int:
        """Samples of the item consumed by the track so far (sent, or skipped on overflow)."""
        return min(max(self.track.position - item.start, 0), item.end - item.start)


class Ingress:
    """Holds many WebRTC calls and exchanges their chunks with the interaction side every tick.

    `exchange(tick, chunks, session_ids)` is called once per tick with every live session and
    returns their OutputChunks for that tick; it runs as its own task with a timeout, so a slow
    or failing call never delays the next tick. `on_join(session_id)`, if given, is awaited
    before an offer is answered (a ProtocolError from it, e.g. "capacity", refuses the call);
    `on_close(session_id)` is awaited when a call ends, so the interaction side can free it.

    A session is stepped from the tick in which its connection came up. Tick k is gathered at
    t0 + (k+1)·tick_s + grace_s, which must come before the interaction side's own deadline;
    audio is placed `jitter_s` after its arrival (see AudioChunker), which is the margin for
    network jitter. Audio of tick k not in by the gather is dropped (the chunk is sent as
    missing, or padded if partly in). Speech is played with a margin of at most `prebuffer_ms` at the
    start of each response and at most `max_playout_s` queued; a call that does not connect
    within `connect_timeout_s` is closed.
    """

    def __init__(
        self,
        exchange: Exchange,
        clock_t0: float | None = None,
        tick_s: float = 0.2,
        max_sessions: int = 32,
        grace_s: float = 0.02,
        jitter_s: float = 0.04,
        frame_size: int = 160,
        exchange_timeout_s: float = 1.0,
        max_in_flight: int = 4,
        connect_timeout_s: float = 20.0,
        prebuffer_ms: float = 60.0,
        max_playout_s: float = 0.6,
        max_event_bytes: int = MAX_EVENT_BYTES,
        on_join: Callable[[str], Awaitable] | None = None,
        on_close: Callable[[str], Awaitable] | None = None,
    ):
        if round(tick_s * SAMPLE_RATE) != CHUNK_SAMPLES:
            raise ValueError(f"tick_s must be {CHUNK_SAMPLES / SAMPLE_RATE} s to match the chunk contract")
        if frame_size % PATCH or not 0 < frame_size <= MAX_FRAME_EDGE:
            raise ValueError(f"frame_size must be a multiple of {PATCH} up to {MAX_FRAME_EDGE}")
        self.exchange = exchange
        self.t0 = time.time() if clock_t0 is None else float(clock_t0)
        self.tick_s = tick_s
        self.max_sessions = max_sessions
        self.grace_s = grace_s
        self.jitter_s = jitter_s
        self.frame_size = frame_size
        self.exchange_timeout_s = exchange_timeout_s
        self.max_in_flight = max_in_flight
        self.connect_timeout_s = connect_timeout_s
        self.prebuffer_ms = prebuffer_ms
        self.max_playout_s = max_playout_s
        self.max_event_bytes = max_event_bytes
        self.on_join = on_join
        self.on_close = on_close
        self.sessions: dict[str, _Session] = {}
        self._negotiating = 0
        self._loop: asyncio.Task | None = None
        self._exchanges: set[asyncio.Task] = set()
        self._timing: dict[int, tuple[float, float]] = {}  # tick -> (gathered, exchange returned)
        self._counts = dict.fromkeys(
            ["ticks", "exchanges", "late_exchanges", "failed_exchanges", "skipped_ticks", "missing_chunks", "late_chunks", "calls", "closed"], 0
        )

    # --- calls ----------------------------------------------------------------------------------

    async def offer(self, sdp: str, session_config: dict | None = None) -> dict:
        """SDP offer in, {"session_id", "sdp": answer} out; ProtocolError "invalid_sdp" / "capacity"."""
        check_sdp(sdp)
        config = _check_config(session_config)
        if len(self.sessions) + self._negotiating >= self.max_sessions:
            raise ProtocolError(f"this ingress is full ({self.max_sessions} calls)", "capacity")
        self._ensure_loop()
        self._negotiating += 1
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates only: no STUN
        s = _Session(pc, AudioChunker(self.t0, self.tick_s, self.jitter_s), self.frame_size, self.max_playout_s, config, self._clock())
        s.max_event_bytes = self.max_event_bytes
        try:
            self._wire(s)
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=allowed_candidates(sdp, pinned_ice_addresses()), type="offer"))
                pc.addTrack(s.track)  # sends on the transceiver of the client's audio m-line
                await pc.setLocalDescription(await pc.createAnswer())  # returns once ICE gathering is done
            except Exception as exc:
                raise ProtocolError(f"could not negotiate the SDP offer: {exc}", "invalid_sdp", "sdp") from None
            await self._join(s)
        except BaseException:
            await pc.close()
            raise
        finally:
            self._negotiating -= 1
        self.sessions[s.id] = s
        self._counts["calls"] += 1
        s.tasks.append(asyncio.create_task(self._watch_connect(s)))
        return {"session_id": s.id, "sdp": pc.localDescription.sdp}

    async def open_websocket(self, session_config: dict | None = None) -> tuple[str, QueueChannel]:
        """A Realtime session over a WebSocket: returns its id and the channel its events leave by.

        The caller feeds the client's messages to `receive` and sends what the channel's queue
        yields until it yields None; `close` ends the session.
        """
        config = _check_config(session_config)
        if len(self.sessions) + self._negotiating >= self.max_sessions:
            raise ProtocolError(f"this ingress is full ({self.max_sessions} calls)", "capacity")
        self._ensure_loop()
        s = _Session(None, BufferedAudioInput(tick_s=self.tick_s), self.frame_size, self.max_playout_s, config, self._clock(), websocket=True)
        self._negotiating += 1
        try:
            await self._join(s)
        finally:
            self._negotiating -= 1
        s.first_tick = self._tick_of(time.time())
        self.sessions[s.id] = s
        self._counts["calls"] += 1
        s.send(server_event("session.created", session=s.session_object()))
        return s.id, s.channel

    async def _join(self, s: _Session) -> None:
        """Announce the session to the interaction side (which may refuse it, e.g. "capacity")."""
        if self.on_join is None:
            return
        try:
            s.join_info(await self.on_join(s.id))
        except ProtocolError as exc:
            cause = getattr(exc, "cause", exc)  # unwrap a RayTaskError into a plain ProtocolError
            raise ProtocolError(str(cause), cause.code, cause.param) from None

    def receive(self, session_id: str, message: str | bytes) -> None:
        """A client message of a WebSocket session (errors go back on its channel)."""
        s = self.sessions.get(session_id)
        if s is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        self._on_message(s, message)

    def _clock(self) -> dict:
        # jitter_s: audio is placed this long after it arrives, so the last sample of chunk k
        # arrives at t0 + (k+1)·tick_s - jitter_s (what a client needs to time its turns).
        return {"t0": self.t0, "tick_s": self.tick_s, "jitter_s": self.jitter_s}

    async def close(self, session_id: str) -> None:
        """End a call (hang up) and free its slot; ProtocolError "unknown_session" if there is none."""
        if not await self._end(session_id):
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")

    async def _end(self, session_id: str) -> bool:
        s = self.sessions.pop(session_id, None)
        if s is None:
            return False  # already ended: the several signals of a hang-up race each other
        self._counts["closed"] += 1
        if s.stop_timer:
            s.stop_timer.cancel()
        for task in s.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        s.track.stop()
        if s.pc is not None:
            await s.pc.close()
        if s.websocket:
            s.channel.close()
        if self.on_close is not None:
            try:
                await self.on_close(s.id)
            except Exception:
                log.exception("on_close(%s) failed", s.id)
        return True

    async def shutdown(self) -> None:
        if self._loop:
            self._loop.cancel()
        for sid in list(self.sessions):
            await self._end(sid)

    async def stats(self) -> dict:
        return {"sessions": len(self.sessions), "max_sessions": self.max_sessions, "in_flight": len(self._exchanges), **self._counts}

    def _wire(self, s: _Session) -> None:
        pc = s.pc

        @pc.on("track")
        def on_track(track):
            reader = self._read_audio if track.kind == "audio" else self._read_video
            s.tasks.append(asyncio.create_task(reader(s, track)))

        @pc.on("datachannel")
        def on_datachannel(channel):
            if channel.label != DATA_CHANNEL or s.channel is not None:
                return
            s.channel = channel
            channel.on("message", lambda message: self._on_message(s, message))
            s.send(server_event("session.created", session=s.session_object()))  # aiortc emits it open

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState == "connected" and s.first_tick is None:
                s.first_tick = self._tick_of(time.time())
            elif pc.connectionState in ("failed", "closed"):
                await self._end(s.id)

    async def _watch_connect(self, s: _Session) -> None:
        await asyncio.sleep(self.connect_timeout_s)
        if s.first_tick is None:
            log.info("session %s never connected; closing it", s.id)
            await self._end(s.id)

    async def _read_audio(self, s: _Session, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return  # the client stopped sending; the call may go on with text
            try:
                samples, rate = frame_to_samples(frame)
                pts = frame.pts if frame.pts is not None and frame.time_base == Fraction(1, rate) else None
                s.chunker.push(samples, rate, time.time(), pts)
            except ValueError as exc:
                log.warning("session %s: dropped an audio frame: %s", s.id, exc)

    async def _read_video(self, s: _Session, track) -> None:
        while True:
            try:
                s.frames.push(await track.recv())
            except MediaStreamError:
                return

    # --- data channel ---------------------------------------------------------------------------

    def _on_message(self, s: _Session, message) -> None:
        size = len(message) if isinstance(message, (bytes, bytearray)) else len(message.encode("utf-8", "surrogatepass"))
        if size > s.max_event_bytes:
            s.send(error_event(f"event of {size} bytes exceeds the limit of {s.max_event_bytes} bytes", "message_too_large"))
            return
        event = parse_client_event(message, s.max_event_bytes)
        if is_error(event):
            s.send(event)
            return
        try:
            self._handle(s, event)
        except ProtocolError as exc:
            s.send(error_from(exc, event.event_id))

    def _handle(self, s: _Session, ev) -> None:
        if len(s.events) >= MAX_EVENTS_PER_TICK:
            raise ProtocolError(f"more than {MAX_EVENTS_PER_TICK} events in one tick", "rate_limit_exceeded")
        kind = ev.type
        if kind == "input_audio_buffer.append":
            if not s.websocket:
                raise ProtocolError("over WebRTC, audio rides the audio track; input_audio_buffer.append is for WebSocket sessions", "unsupported_event", "type")
            try:
                s.chunker.push(decode_pcm16(ev.audio), _rate(s.config, "input"), time.time())
            except ValueError as exc:
                raise ProtocolError(str(exc), "input_audio_buffer_full", "audio") from None
            return  # audio is not forwarded to the model as an event: it is the chunk itself
        if kind == "session.update":
            s.config = _merge(s.config, ev.session.model_dump(mode="json", exclude_none=True))
            s.send(server_event("session.updated", session=s.session_object()))
        elif kind == "conversation.item.create":
            text = _user_text(ev.item)
            if len(text) > MAX_TEXT_CHARS or sum(map(len, s.text)) + len(text) > 4 * MAX_TEXT_CHARS:
                raise ProtocolError(f"typed text is limited to {MAX_TEXT_CHARS} characters an item", "invalid_value", "item.content")
            if text:
                s.text.append(text)
            item = {**ev.item, "id": ev.item.get("id") or new_id("item"), "object": "realtime.item", "status": "completed"}
            s.send(server_event("conversation.item.added", previous_item_id=ev.previous_item_id, item=item))
            s.send(server_event("conversation.item.done", item=item))
        elif kind == "conversation.item.truncate":
            self._truncate(s, ev)
        elif kind == "response.cancel":
            if s.run is None and not s.track.queued_ms:
                raise ProtocolError("there is no active response to cancel", "response_cancel_not_active")
            self._interrupt(s)
        elif kind == "output_audio_buffer.clear":
            self._interrupt(s)
        elif kind == "input_audio_buffer.clear":
            if s.websocket:
                s.chunker.clear()
            s.send(server_event("input_audio_buffer.cleared"))
        elif kind == "conversation.item.delete":
            s.items.pop(ev.item_id, None)
            s.send(server_event("conversation.item.deleted", item_id=ev.item_id))
        # response.create and input_audio_buffer.commit need no answer here: the model decides.
        s.events.append(ev.dump())

    def _truncate(self, s: _Session, ev) -> None:
        item = s.items.get(ev.item_id)
        if item is None:
            raise ProtocolError(f"no assistant audio item {ev.item_id!r}", "item_not_found", "item_id")
        if ev.content_index != 0:
            raise ProtocolError("assistant audio items have one content part (content_index 0)", "invalid_value", "content_index")
        played_ms = s.item_played(item) * 1000 / OUT_RATE
        if ev.audio_end_ms > math.ceil(played_ms):
            raise ProtocolError(f"audio_end_ms {ev.audio_end_ms} is beyond the {played_ms:.0f} ms of this item played so far", "invalid_value", "audio_end_ms")
        if (s.run and s.run.item_id == ev.item_id) or item.end > s.track.position:
            self._interrupt(s)  # the rest of it must not play
        item.end = item.start + ev.audio_end_ms * OUT_RATE // 1000
        s.send(server_event("conversation.item.truncated", item_id=ev.item_id, content_index=0, audio_end_ms=ev.audio_end_ms))

    def _interrupt(self, s: _Session) -> None:
        position = s.track.position
        s.track.clear()
        for item in s.items.values():  # what was not played is gone
            item.end = min(item.end, max(item.start, position))
        if s.stop_timer:
            s.stop_timer.cancel()
            s.stop_timer = None
        if s.run:
            response_id = s.run.response_id
            self._end_run(s, "cancelled")
            s.muted = True
        else:
            response_id = s.last_response_id
        if not s.websocket:  # the output audio buffer is WebRTC's: over a socket the client plays
            s.send(server_event("output_audio_buffer.cleared", response_id=response_id))

    # --- output ---------------------------------------------------------------------------------

    def _deliver(self, s: _Session, out: OutputChunk) -> None:
        if out.seq <= s.last_out_seq:
            return  # an older tick answered after a newer one: its moment has passed
        s.last_out_seq = out.seq
        # How late this output came relative to its tick's end: its spread sizes the prebuffer.
        s.lateness.append(time.time() - (self.t0 + (out.seq + 1) * self.tick_s))
        for event in out.events:
            s.send(event)
        if s.config.get("interplay", {}).get("tick_events"):
            self._send_tick(s, out)
        speaking = is_speaking(out)
        if s.muted:  # interrupted: drop speech until the model yields
            if speaking:
                return
            s.muted = False
        if not speaking:
            if s.run:
                self._end_run(s, "completed")
            return
        if s.run is None:
            self._start_run(s)
        s.track.write(out.audio)
        s.items[s.run.item_id].end = s.track.written
        if s.websocket:
            s.send(server_event("response.output_audio.delta", response_id=s.run.response_id, item_id=s.run.item_id, output_index=0, content_index=0, delta=s.track.take()))
        if out.text:
            s.run.transcript.append(out.text)
            s.send(server_event("response.output_audio_transcript.delta", response_id=s.run.response_id, item_id=s.run.item_id, output_index=0, content_index=0, delta=out.text))

    def _send_tick(self, s: _Session, out: OutputChunk) -> None:
        """Our extension event: the tick's input/output level (RMS, 0..1 of full scale), the step's
        time, the sample of the outgoing stream (48 kHz, silence included) where this tick's
        audio, if any, begins to play, and the wall-clock times of each stage on the way."""
        out_level = float(np.sqrt(np.mean(out.audio.astype(np.float32) ** 2)) / 32768)
        gathered, returned = self._timing.get(out.seq, (None, None))
        sample = s.track.next_play_sample
        s.send({
            "type": "interplay.tick", "event_id": new_id("event"), "tick": out.seq, "step_ms": round(out.step_ms, 3),
            "in_level": round(s.levels.pop(out.seq, 0.0), 4), "out_level": round(out_level, 4), "out_sample": sample,
            # wall-clock times: chunk gathered, outputs back, audio written, and when it will play
            "at": {"gathered": gathered, "returned": returned, "written": time.time(), "plays": s.track.time_of(sample)},
        })
        for old in [k for k in s.levels if k < out.seq]:
            del s.levels[old]

    def _prebuffer(self, s: _Session) -> float:
        """The margin (ms) queued ahead of a response: enough to cover how much later than usual
        this session's outputs have come lately (p95 minus p5 of their lateness, plus 10 ms),
        never more than `prebuffer_ms`; the whole `prebuffer_ms` until there is history."""
        if len(s.lateness) < 10:
            return self.prebuffer_ms
        spread = float(np.percentile(s.lateness, 95) - np.percentile(s.lateness, 5)) * 1000
        return min(self.prebuffer_ms, spread + 10.0)

    def _start_run(self, s: _Session) -> None:
        if s.stop_timer:  # the previous response's audio is still playing out: close it first
            s.stop_timer.cancel()
            s.stop_timer = None
            s.send(server_event("output_audio_buffer.stopped", response_id=s.last_response_id))
        margin = self._prebuffer(s)
        if s.track.queued_ms < margin:  # so a later output that comes late still plays on time
            s.track.write(np.zeros(round((margin - s.track.queued_ms) * SAMPLE_RATE / 1000), np.int16))
        run = s.run = _Run(new_id("resp"), new_id("item"))
        s.items[run.item_id] = _Item(s.track.written, s.track.written)
        while len(s.items) > MAX_ITEMS:
            s.items.popitem(last=False)
        item = {"id": run.item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        s.send(server_event("response.created", response={"id": run.response_id, "object": "realtime.response", "status": "in_progress", "output": []}))
        s.send(server_event("response.output_item.added", response_id=run.response_id, output_index=0, item=item))
        s.send(server_event("conversation.item.added", item=item))
        if not s.websocket:
            s.send(server_event("output_audio_buffer.started", response_id=run.response_id))

    def _end_run(self, s: _Session, status: str) -> None:
        run, s.run = s.run, None
        s.last_response_id = run.response_id
        transcript = "".join(run.transcript)
        ids = dict(response_id=run.response_id, item_id=run.item_id, output_index=0, content_index=0)
        item = {
            "id": run.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
            "status": "completed" if status == "completed" else "incomplete",
            "content": [{"type": "output_audio", "transcript": transcript}],
        }
        s.send(server_event("response.output_audio_transcript.done", **ids, transcript=transcript))
        s.send(server_event("response.output_audio.done", **ids))
        s.send(server_event("response.output_item.done", response_id=run.response_id, output_index=0, item=item))
        s.send(server_event("response.done", response={"id": run.response_id, "object": "realtime.response", "status": status, "output": [item]}))
        if status == "completed" and not s.websocket:
            s.stop_timer = asyncio.get_running_loop().call_later(
                s.track.queued_ms / 1000, s.send, server_event("output_audio_buffer.stopped", response_id=run.response_id)
            )

    # --- the tick loop --------------------------------------------------------------------------

    def _tick_of(self, t: float) -> int:
        return math.floor((t - self.t0) / self.tick_s)

    def _ensure_loop(self) -> None:
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._tick_loop())

    async def _tick_loop(self) -> None:
        k = self._tick_of(time.time())
        while True:
            delay = self.t0 + (k + 1) * self.tick_s + self.grace_s - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > self.tick_s:  # the loop stalled: skip to the newest tick that is due
                newest = self._tick_of(time.time() - self.grace_s) - 1
                self._counts["skipped_ticks"] += newest - k
                k = newest
            try:
                self._tick(k)
            except Exception:
                log.exception("tick %d failed", k)
            k += 1

    def _tick(self, k: int) -> None:
        """Gather chunk k of every live session and start the one exchange for them."""
        live = [s for s in self.sessions.values() if s.first_tick is not None and k >= s.first_tick]
        if not live:
            return
        if len(self._exchanges) >= self.max_in_flight:
            self._counts["skipped_ticks"] += 1
            return
        chunks = [self._chunk(s, k) for s in live]
        task = asyncio.create_task(self._exchange(k, chunks))
        self._exchanges.add(task)
        task.add_done_callback(self._exchanges.discard)
        self._counts["ticks"] += 1

    def _chunk(self, s: _Session, k: int) -> InputChunk:
        s.early.update(s.chunker.pop_ready(until=k))
        for seq in [seq for seq in s.early if seq < k]:
            del s.early[seq]
            self._counts["late_chunks"] += 1
        audio = s.early.pop(k, None)
        if audio is None:
            self._counts["missing_chunks"] += 1
        else:
            s.levels[k] = float(np.sqrt(np.mean(audio.astype(np.float32) ** 2)) / 32768)
        text, size = [], 0
        while s.text and size + len(s.text[0]) + len(text) <= MAX_TEXT_CHARS:
            size += len(s.text[0])
            text.append(s.text.pop(0))
        events, s.events = s.events, []
        t_start = self.t0 + k * self.tick_s
        try:
            return InputChunk(s.id, k, t_start, silence() if audio is None else audio, s.frames.take(), "\n".join(text), events, missing=audio is None)
        except ProtocolError as exc:
            log.warning("session %s: bad chunk %d: %s", s.id, k, exc)
            s.send(error_from(exc))
            return InputChunk.silent(s.id, k, t_start)

    async def _exchange(self, k: int, chunks: list[InputChunk]) -> None:
        gathered = time.time()
        try:
            outs = await asyncio.wait_for(self.exchange(k, chunks, [c.session_id for c in chunks]), self.exchange_timeout_s)
        except Exception as exc:
            self._counts["failed_exchanges"] += 1
            log.warning("exchange for tick %d failed: %r", k, exc)
            return
        self._counts["exchanges"] += 1
        self._timing[k] = (gathered, time.time())
        self._timing.pop(k - 50, None)
        if time.time() > self.t0 + (k + 2) * self.tick_s + self.grace_s:  # after the next tick's gather
            self._counts["late_exchanges"] += 1
        for out in outs or []:
            s = self.sessions.get(getattr(out, "session_id", None))
            if s is not None and isinstance(out, OutputChunk):
                try:
                    self._deliver(s, out)
                except Exception:
                    log.exception("session %s: delivering tick %d failed", s.id, k)


class InteractionIngress(Ingress):
    """The Ray actor's class: an Ingress wired to an InteractionActor (its name or handle).

    It takes the interaction actor's clock (`clock_info()`: t0, tick_s), gathers each tick just
    after it ends, well before that actor's deadline, calls its
    `exchange` once per tick, and announces calls with its `join` / `leave`.
    """

    def __init__(
        self, interaction, namespace: str = "interplay", max_sessions: int = 32,
        ice_addresses: list[str] | None = None, clock: dict | None = None, **options,
    ):
        use_ice_addresses(ice_addresses)
        handle = ray.get_actor(interaction, namespace=namespace) if isinstance(interaction, str) else interaction
        clock = clock or ray.get(handle.clock_info.remote())  # callers that know it spare a blocking call
        # Gather right after the tick ends: audio is already placed jitter_s after it arrived, so
        # that margin, not a wait, absorbs late packets; the interaction actor steps as soon as
        # all of a tick's chunks are in, and its grace only covers a late exchange.
        options.setdefault("grace_s", 0.005)
        super().__init__(
            exchange=lambda tick, chunks, session_ids: handle.exchange.remote(tick, chunks, session_ids),
            clock_t0=clock["t0"],
            tick_s=clock["tick_s"],
            max_sessions=max_sessions,
            on_join=lambda session_id: handle.join.remote(session_id),
            on_close=lambda session_id: handle.leave.remote(session_id),
            **options,
        )


# Ray's async actor: every method runs on the actor's event loop, next to aiortc's tasks.
IngressActor = ray.remote(max_concurrency=1000)(InteractionIngress)
