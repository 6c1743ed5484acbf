"""Transports: how one Realtime session's media and events travel. Two kinds, one small interface.

Each transport is a `sink.Sink` (events out, model audio out, and the behaviours
that differ) plus what the gatherer reads every tick: `audio_in.pop_ready(until=k)` and
`video()`. What differs lives here, not in flags tested elsewhere:

- `WebRTCTransport` (aiortc): SDP negotiation, audio in on the client's track (clock-aligned by
  an `AudioChunker`), video in (one resized frame a tick), model audio out on a paced track that
  the server plays, events on the "oai-events" data channel. Because the server plays the audio,
  it sends `output_audio_buffer.started/stopped/cleared`; input audio as events is refused.
  The media is Opus on the tracks, decoded to and encoded from 48 kHz PCM: a session's audio
  formats (which describe audio carried in events) do not apply, and the session reports the
  tracks' 48 kHz PCM as its formats whatever a client asks for.
- `WebSocketTransport`: events through a bounded queue that the socket gateway drains; audio in
  as `input_audio_buffer.append` (base64 audio/pcm at 16, 24 or 48 kHz, or G.711 audio/pcmu /
  audio/pcma at 8 kHz, into a FIFO), audio out as `response.output_audio.delta` events in the
  session's output format (the client plays them); no output_audio_buffer.* events.

No client message ends a session: whatever goes wrong handling one becomes an `error` event.
Events are at most `max_event_bytes` (both kinds: 256 KB, which is aiortc's SCTP message limit
and about 2.7 s of 24 kHz PCM16 in one append); `last_arrival` is the wall time the client's
media last arrived (None where audio rides events: the session sees those itself).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from fractions import Fraction
from typing import Awaitable, Callable, Protocol, runtime_checkable

import numpy as np

from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from protocols import ProtocolError
from protocols.clock import TickClock
from protocols.realtime_config import MAX_EVENT_BYTES as REALTIME_MAX_EVENT_BYTES
from protocols.realtime_audio import decode_audio
from protocols.realtime_config import audio_format
from protocols.realtime_events import internal_error, server_event

from actors.ingress.audio_chunker import AudioChunker
from actors.ingress.audio_frames import frame_to_samples
from actors.ingress.buffered_audio import BufferedAudioInput, InputBufferFull
from actors.ingress.ice import allowed_candidates, pinned_ice_addresses
from actors.ingress.playout import EventAudioSink, PacedAudioTrack
from actors.ingress.receive_buffer import release_on_arrival
from actors.ingress.sink import Sink
from actors.ingress.video_in import FrameSampler

log = logging.getLogger(__name__)

DATA_CHANNEL = "oai-events"
MAX_SDP_BYTES = 64 * 1024
MAX_CANDIDATES = 32  # ICE candidates in an offer; each one costs connectivity checks
MAX_CHANNEL_EVENT_BYTES = 256 * 1024  # what aiortc advertises as its SCTP max-message-size
TRACK_FORMAT = {"type": "audio/pcm", "rate": 48_000}  # what the Opus tracks decode to and encode from
MAX_EARLY_EVENTS = 256  # events held for a data channel that is not open yet (media can flow first)


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


class AudioIn(Protocol):
    """`tells_complete`: whether the input calls its `on_chunk(seq)` as each chunk completes
    (the gatherer sets it, and takes a tick as soon as every chunk is in, else at its deadline)."""

    tells_complete: bool

    def pop_ready(self, until: int | None = None) -> list[tuple[int, np.ndarray]]: ...


@runtime_checkable
class TellsComplete(Protocol):
    """An audio input that calls `on_chunk(seq)` (the gatherer sets it) as each chunk completes."""

    on_chunk: Callable[[int], None] | None


class Transport(Sink, Protocol):
    """A session's transport: its Sink, plus what the gatherer reads each tick, and the end."""

    kind: str
    audio_in: AudioIn

    def video(self) -> np.ndarray | None: ...

    def source(self, seq: int) -> dict | None:
        """Where tick `seq`'s input audio came from, for interplay.tick (None where unknown)."""

    async def close(self) -> None: ...


async def _nothing() -> None:
    pass


class WebRTCTransport:
    """One WebRTC call. The host sets the callbacks: `on_message(text)` for each data-channel
    message, `on_open()` once the channel is there, `on_connected()` when media flows, and
    `on_closed()` when the connection fails or closes."""

    kind = "webrtc"

    def __init__(self, clock: TickClock, *, jitter_ms: float = 40.0, frame_size: int = 160, max_playout_s: float = 0.6, max_event_bytes: int = MAX_CHANNEL_EVENT_BYTES):
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates only: no STUN
        self.audio_in = AudioChunker(clock, jitter_ms=jitter_ms)
        self.frames = FrameSampler(frame_size)
        self.audio_out = PacedAudioTrack(max_queue_s=max_playout_s)
        self.max_event_bytes = max_event_bytes
        self.last_arrival: float | None = None
        self.channel: RTCDataChannel | None = None
        self._early: list[str] = []  # events sent before the channel opened, in order
        self._closed = False
        self.tasks: list[asyncio.Task] = []
        self.on_message: Callable[[str | bytes], None] = lambda message: None
        self.on_open: Callable[[], None] = lambda: None
        self.on_connected: Callable[[], None] = lambda: None
        self.on_closed: Callable[[], Awaitable[object]] = _nothing  # its result is not used
        self._stopping: tuple[asyncio.TimerHandle, str] | None = None
        self._wire()

    # --- setup ----------------------------------------------------------------------------------

    async def negotiate(self, sdp: str) -> str:
        """The SDP answer to `sdp` (already `check_sdp`-ed); ProtocolError "invalid_sdp"."""
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=allowed_candidates(sdp, pinned_ice_addresses()), type="offer"))
            self._unbuffer()
            self.pc.addTrack(self.audio_out)  # sends on the transceiver of the client's audio m-line
            await self.pc.setLocalDescription(await self.pc.createAnswer())  # returns once ICE gathering is done
        except Exception as exc:
            raise ProtocolError(f"could not negotiate the SDP offer: {exc}", "invalid_sdp", "sdp") from None
        return self.pc.localDescription.sdp

    def _unbuffer(self) -> None:
        """Packets go to the decoder as they arrive: the chunker's adaptive margin is the only
        receive buffer, not aiortc's fixed one (about 80 ms) as well."""
        try:
            release_on_arrival(self.pc)
        except RuntimeError as exc:  # calls still work, only later
            log.warning("aiortc's receive jitter buffer stays in place: %s", exc)

    def _wire(self) -> None:
        pc = self.pc

        @pc.on("track")
        def on_track(track):
            reader = self._read_audio if track.kind == "audio" else self._read_video
            self.tasks.append(asyncio.create_task(reader(track)))

        @pc.on("datachannel")
        def on_datachannel(channel):
            if channel.label != DATA_CHANNEL or self.channel is not None:
                return
            self.channel = channel
            channel.on("message", self._message)
            self.on_open()  # aiortc emits the channel open; session.created goes first
            early, self._early = self._early, []
            for text in early:
                self._send_text(channel, text)

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState == "connected":
                self.on_connected()
            elif pc.connectionState in ("failed", "closed"):
                await self.on_closed()

    def _message(self, message) -> None:
        """A data-channel message: an exception must not reach aiortc, whose SCTP transport would
        drop the channel under a call that keeps its slot."""
        try:
            self.on_message(message)
        except Exception:
            log.exception("a data channel message failed")
            self.send(internal_error())

    async def _read_audio(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return  # the client stopped sending; the call may go on with text
            self.last_arrival = time.time()
            try:
                samples, rate = frame_to_samples(frame)
                pts = frame.pts if frame.pts is not None and frame.time_base == Fraction(1, rate) else None
                self.audio_in.push(samples, rate, time.time(), pts)
            except ValueError as exc:
                log.warning("dropped an audio frame: %s", exc)

    async def _read_video(self, track) -> None:
        while True:
            try:
                self.frames.push(await track.recv())
            except MediaStreamError:
                return

    # --- the session's sink ---------------------------------------------------------------------

    def send(self, event: dict) -> None:
        """Send on the data channel; until it opens (the call's media may come up first, and a
        response start with it), the first `MAX_EARLY_EVENTS` wait for it."""
        text = json.dumps(event)
        if self.channel is None:
            if len(self._early) < MAX_EARLY_EVENTS:
                self._early.append(text)
            return
        self._send_text(self.channel, text)

    @staticmethod
    def _send_text(channel: RTCDataChannel, text: str) -> None:
        if channel.readyState == "open":
            try:
                channel.send(text)
            except Exception as exc:  # a closing channel must not break the tick
                log.debug("send failed: %s", exc)

    def append_audio(self, audio_b64: str, fmt: tuple[str, int], t_arrival: float) -> None:
        raise ProtocolError("over WebRTC, audio rides the audio track; input_audio_buffer.append is for WebSocket sessions", "unsupported_event", "type")

    def audio_formats(self, input: dict, output: dict) -> tuple[dict, dict]:
        """The tracks' formats, whatever was asked: over WebRTC no audio rides events."""
        return dict(TRACK_FORMAT), dict(TRACK_FORMAT)

    def clear_input(self) -> None:
        pass  # live audio from a track has no buffer to clear

    def audio_written(self, response_id: str, item_id: str) -> None:
        pass  # it plays on the track

    def playout_started(self, response_id: str) -> None:
        if self._stopping:  # the previous response's audio is still playing out: close it first
            timer, previous = self._stopping
            timer.cancel()
            self._stopping = None
            self.send(server_event("output_audio_buffer.stopped", response_id=previous))
        self.send(server_event("output_audio_buffer.started", response_id=response_id))

    def playout_done(self, response_id: str) -> None:
        """output_audio_buffer.stopped once what is queued now has played."""
        self._cancel_stop()
        timer = asyncio.get_running_loop().call_later(self.audio_out.queued_ms / 1000, self._stopped, response_id)
        self._stopping = (timer, response_id)

    def _stopped(self, response_id: str) -> None:
        self._stopping = None
        self.send(server_event("output_audio_buffer.stopped", response_id=response_id))

    def playout_cleared(self, response_id: str | None) -> None:
        """output_audio_buffer.cleared for the response whose audio was dropped; before any
        response there was nothing to clear, and the event (which names one) is not sent."""
        self._cancel_stop()
        if response_id is not None:
            self.send(server_event("output_audio_buffer.cleared", response_id=response_id))

    def _cancel_stop(self) -> None:
        if self._stopping:
            self._stopping[0].cancel()
            self._stopping = None

    # --- per tick, and the end ------------------------------------------------------------------

    def video(self):
        return self.frames.take()

    def source(self, seq: int) -> dict | None:
        """Where tick `seq`'s audio came from in the caller's stream (see AudioChunker.source)."""
        return self.audio_in.source(seq)

    async def close(self) -> None:
        """End the call; never raises, also for a peer connection whose negotiation failed."""
        if self._closed:
            return
        self._closed = True
        self._cancel_stop()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self.audio_out.stop()
        try:
            await self.pc.close()
        except Exception as exc:
            # aiortc stops at the first transport a failed negotiation never made: stop the others
            log.info("closing a call that never fully negotiated: %r", exc)
            sctp = self.pc.sctp
            for dtls in [t.receiver.transport for t in self.pc.getTransceivers()] + [sctp.transport if sctp else None]:
                for transport in (dtls, getattr(dtls, "transport", None)):
                    if transport is not None:
                        try:
                            await transport.stop()
                        except Exception:
                            pass


class WebSocketTransport:
    """One Realtime session over a WebSocket. Outgoing events wait in `outbox` as JSON text for
    the gateway to send; `None` there means the session ended."""

    kind = "websocket"

    def __init__(self, clock: TickClock, *, output_rate: int = 24_000, max_event_bytes: int = REALTIME_MAX_EVENT_BYTES, max_queued: int = 2000, max_input_s: float = 60.0):
        self.audio_in = BufferedAudioInput(clock, max_s=max_input_s)
        self.audio_out = EventAudioSink(output_rate)
        self.max_event_bytes = max_event_bytes
        self.last_arrival: float | None = None
        self.outbox: asyncio.Queue = asyncio.Queue(max_queued)
        self.closed = False

    def send(self, event: dict) -> None:
        if self.closed:
            return
        try:
            self.outbox.put_nowait(json.dumps(event))
        except asyncio.QueueFull:  # a client that stopped reading loses events, nobody else does
            log.warning("websocket client is not reading; dropping an event")

    def append_audio(self, audio_b64: str, fmt: tuple[str, int], t_arrival: float) -> None:
        """Base64 audio in format `fmt` (type, rate) into the input FIFO; ProtocolError
        "invalid_value" for audio that does not decode, "input_audio_buffer_full" when the FIFO is."""
        kind, rate = fmt
        samples = decode_audio(audio_b64, kind, self.max_event_bytes)
        try:
            self.audio_in.push(samples, rate, t_arrival)
        except InputBufferFull as exc:
            raise ProtocolError(str(exc), "input_audio_buffer_full", "audio") from None

    def audio_formats(self, input: dict, output: dict) -> tuple[dict, dict]:
        """Appended audio is decoded in the input format; deltas go out in the output format."""
        self.audio_out.set_format(*audio_format(output))
        return input, output

    def clear_input(self) -> None:
        self.audio_in.clear()

    def audio_written(self, response_id: str, item_id: str) -> None:
        delta = self.audio_out.take()
        self.send(server_event("response.output_audio.delta", response_id=response_id, item_id=item_id, output_index=0, content_index=0, delta=delta))

    def playout_started(self, response_id: str) -> None:
        pass  # the client plays the audio: the output audio buffer is WebRTC's

    def playout_done(self, response_id: str) -> None:
        pass

    def playout_cleared(self, response_id: str | None) -> None:
        pass

    def video(self):
        return None

    def source(self, seq: int) -> dict | None:
        return None  # appended audio has no place in a caller's real-time stream

    async def close(self) -> None:
        self.closed = True
        self.audio_out.stop()
        try:
            self.outbox.put_nowait(None)
        except asyncio.QueueFull:  # make room for the end mark: the gateway must learn of it
            self.outbox.get_nowait()
            self.outbox.put_nowait(None)
