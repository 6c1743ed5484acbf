"""The soak's calls: aiortc peers over loopback, each speaking a looped phrase, and what each saw.

`soak_call` runs one call until a wall-clock deadline, asking for a response every
`respond_every_s` seconds, and fills a `CallLog` (its `interplay.tick` events' arrival times, its
RTP packets' arrival times and timestamps); it never raises: a failure is the log's `error`.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from dataclasses import dataclass, field

import numpy as np

KEY = "sk-soak"
RATE, FRAME = 48_000, 960  # the call's audio: 20 ms frames at 48 kHz


@dataclass
class CallLog:
    """What one call saw: raw enough to cut into minutes at the end, small enough for an hour."""

    index: int
    session_id: str | None = None
    clock: dict = field(default_factory=dict)
    ticks: list[tuple[int, float]] = field(default_factory=list)  # (tick, arrival time) of interplay.tick events
    packets: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, RTP timestamp)
    started: float | None = None
    ended: float | None = None
    error: str | None = None


def looped_track(samples: np.ndarray):
    """An aiortc audio track playing `samples` (48 kHz mono int16) in a loop, in real time."""
    import av
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class LoopTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self):
            super().__init__()
            self.sent = 0
            self.start: float | None = None

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            if self.start is None:
                self.start = time.time()
            wait = self.start + self.sent / RATE - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            at = self.sent % len(samples)
            chunk = np.take(samples, np.arange(at, at + FRAME), mode="wrap")
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = RATE, self.sent, fractions.Fraction(1, RATE)
            self.sent += FRAME
            return frame

    return LoopTrack()


async def soak_call(url: str, log: CallLog, samples: np.ndarray, until: float, respond_every_s: float) -> None:
    """One call from now until `until` (wall clock); fills `log`, never raises."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    from actors.ingress.ice import use_ice_addresses
    from examples.call import _time_packets, post_offer

    use_ice_addresses(["127.0.0.1"])  # a local server: the media stays on loopback too
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(looped_track(samples))
    channel = pc.createDataChannel("oai-events")
    opened = asyncio.Event()
    sinks: list[asyncio.Task] = []

    @channel.on("open")
    def _open():
        opened.set()

    @channel.on("message")
    def _message(raw):
        event = json.loads(raw)
        kind = event.get("type")
        if kind == "interplay.tick":
            log.ticks.append((int(event["tick"]), time.time()))
        elif kind == "session.created":
            log.clock = event.get("session", {}).get("interplay", {}).get("clock", {})
            channel.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "interplay": {"tick_events": True}}}))
        elif kind == "error" and log.error is None:
            log.error = str(event.get("error", {}).get("code") or event.get("error"))

    async def drain(remote):  # decode and drop what comes back: only the packet times are kept
        while True:
            try:
                await remote.recv()
            except MediaStreamError:
                return

    @pc.on("track")
    def _track(remote):
        for receiver in pc.getReceivers():
            if receiver.track is remote and remote.kind == "audio":
                _time_packets(receiver, log.packets)
        sinks.append(asyncio.ensure_future(drain(remote)))

    try:
        await pc.setLocalDescription(await pc.createOffer())
        status, body, location = await asyncio.to_thread(post_offer, url, pc.localDescription.sdp, KEY)
        if status != 201:
            raise RuntimeError(f"call refused: HTTP {status}: {body[:200]}")
        log.session_id = (location or "").rsplit("/", 1)[-1] or None
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        await asyncio.wait_for(opened.wait(), 30)
        log.started = time.time()
        next_response = log.started + min(2.0, respond_every_s)
        while time.time() < until and pc.connectionState not in ("failed", "closed"):
            if time.time() >= next_response:
                channel.send(json.dumps({"type": "response.create"}))
                next_response += respond_every_s
            await asyncio.sleep(0.1)
        if pc.connectionState in ("failed", "closed"):
            log.error = log.error or f"connection {pc.connectionState}"
    except Exception as exc:  # one call failing is a figure, not the end of the soak
        log.error = f"{type(exc).__name__}: {exc}"
    finally:
        log.ended = time.time()
        await pc.close()
        for task in sinks:
            task.cancel()
