"""Peers for ingress tests: aiortc clients that talk to the ingress like a browser would (`Client`,
with a `Sine` microphone and optionally a `Camera`), a fake interaction side (`Echo`, the
`protocols.ports.Interaction` port in process), a data channel stand-in (`FakeChannel`), and
`call`, one connected call whose audio flows."""

import asyncio
import fractions
import json
import time
from contextlib import asynccontextmanager

import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack, VideoStreamTrack

from actors.ingress.ingress import Ingress
from protocols import OutputChunk, ProtocolError, TickClock
from protocols.seams import Joined
from tests.waits import TIMEOUT_S, until


class Sine(MediaStreamTrack):
    """A microphone stand-in: 440 Hz, 48 kHz stereo, 20 ms frames in real time."""

    kind = "audio"

    def __init__(self):
        super().__init__()
        self.n = 0
        self.start = None

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        if self.start is None:
            self.start = time.time()
        await asyncio.sleep(max(0.0, self.start + self.n * 0.02 - time.time()))
        t = (self.n * 960 + np.arange(960)) / 48000
        x = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.repeat(x, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48000, self.n * 960, fractions.Fraction(1, 48000)
        self.n += 1
        return frame


class Camera(VideoStreamTrack):
    """A small, slow camera (5 fps, 320x240) so that VP8 costs little CPU."""

    def __init__(self):
        super().__init__()
        self.n = 0

    async def recv(self):
        await asyncio.sleep(0.2)
        frame = av.VideoFrame.from_ndarray(np.full((240, 320, 3), 180, np.uint8), format="rgb24").reformat(format="yuv420p")
        frame.pts, frame.time_base = self.n * 18000, fractions.Fraction(1, 90000)
        self.n += 1
        return frame


class Client:
    """An aiortc peer that talks to the ingress like a browser would."""

    def __init__(self, video: bool = False):
        self.pc = RTCPeerConnection()
        self.pc.addTrack(Sine())
        if video:
            self.pc.addTrack(Camera())
        self.channel = self.pc.createDataChannel("oai-events")
        self.events: list[dict] = []
        self.channel.on("message", lambda m: self.events.append(json.loads(m)))
        self.audio: list[np.ndarray] = []
        self.pc.on("track", lambda track: asyncio.ensure_future(self._read(track)))

    async def _read(self, track):
        try:
            while True:
                frame = await track.recv()
                self.audio.append(frame.to_ndarray().reshape(-1))
        except MediaStreamError:
            pass

    async def connect(self, ingress) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        answer = await ingress.offer(self.pc.localDescription.sdp)
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        self.session_id = answer["session_id"]
        return self.session_id

    def send(self, event):
        self.channel.send(event if isinstance(event, str) else json.dumps(event))

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    async def wait_for(self, kind: str, timeout: float = TIMEOUT_S) -> dict:
        await until(lambda: self.of_type(kind), timeout, message=lambda: f"no {kind} event; got {[e['type'] for e in self.events]}")
        return self.of_type(kind)[-1]

    def loud_frames(self) -> int:
        return sum(int(np.abs(a).max() > 2000) for a in self.audio)


class Echo:
    """The fake interaction side (the Interaction port): every session speaks its own input back,
    with a word of text. `max_sessions` bounds join; `members` are the sessions joined."""

    def __init__(self, max_sessions: int = 100):
        self.calls: list[tuple[int, list[str]]] = []
        self.chunks = []
        self.max_sessions = max_sessions
        self.members: list[str] = []
        self.left: list[str] = []

    async def clock_info(self):
        return {"t0": 0.0, "tick_ms": 200, "tick_s": 0.2, "grace_s": 0.04}

    async def join(self, session_id, seed=None):
        if len(self.members) >= self.max_sessions:
            raise ProtocolError("the interaction side is full", "capacity")
        self.members.append(session_id)
        return Joined(session_id, 0, f"token-{session_id}", {})

    async def leave(self, session_id):
        self.members.remove(session_id)
        self.left.append(session_id)

    async def resume(self, session_id):
        if session_id not in self.members:
            self.members.append(session_id)
        return Joined(session_id, 0, f"token-{session_id}", {})

    async def release(self, session_id):
        self.members.remove(session_id)

    async def drop(self, session_id):
        if session_id in self.members:
            self.members.remove(session_id)

    async def exchange(self, tick, chunks, session_ids):
        self.calls.append((tick, list(session_ids)))
        self.chunks.extend(chunks)
        return self.outputs(chunks)

    def outputs(self, chunks):
        return [OutputChunk(c.session_id, c.seq, c.t_start, c.audio, text="la ", controls=["speak"]) for c in chunks]


class FakeChannel:
    readyState = "open"

    def __init__(self):
        self.sent = []
        self.sent_at = []  # time.monotonic() of each

    def send(self, message):
        self.sent.append(json.loads(message))
        self.sent_at.append(time.monotonic())


def now_clock(behind_s: float = 0.0) -> TickClock:
    return TickClock(time.time() - behind_s)


@asynccontextmanager
async def call(echo: Echo | None = None, video: bool = False, **options):
    """One call to an ingress that `echo` answers (its clock 130 ms behind, so the call joins
    mid-tick), held until its echo is heard: (ingress, client, echo, session id). Hung up and
    shut down after."""
    echo = echo or Echo()
    ingress = Ingress(echo, now_clock(0.13), **options)
    client = Client(video=video)
    sid = await client.connect(ingress)
    try:
        await client.wait_for("output_audio_buffer.started")
        await until(lambda: client.loud_frames() > 30 and sum(not c.missing for c in echo.chunks) >= 8 and (not video or sum(c.frame is not None for c in echo.chunks) >= 3))
        yield ingress, client, echo, sid
    finally:
        await client.pc.close()
        await ingress.shutdown()
