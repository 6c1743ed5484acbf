"""Call Interplay over WebRTC from Python: stream a WAV file in real time, record the reply.

    python examples/call.py --url http://127.0.0.1:8000 --wav hello.wav --out reply.wav
    interplay call --wav hello.wav            (the same, installed)

The client does what a browser does: an aiortc peer with one audio track and the `oai-events`
data channel, `POST /v1/realtime/calls` with the SDP offer. It opts into the per-tick
`interplay.tick` events and records, for timing: when each outgoing 20 ms frame left, when each
incoming RTP packet arrived, and when the receive track (aiortc's default jitter buffer) handed
each decoded frame out.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import sys
import time
import urllib.error
import urllib.request
import wave
from urllib.parse import urlparse
from dataclasses import dataclass, field

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

RATE = 48_000
FRAME = 960  # 20 ms at 48 kHz


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """Mono int16 samples and their rate (any PCM16 WAV; channels are averaged)."""
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
        return data.mean(axis=1).astype(np.int16), w.getframerate()


def write_wav(path: str, samples: np.ndarray, rate: int) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def resample(samples: np.ndarray, rate: int, to: int = RATE) -> np.ndarray:
    if rate == to:
        return samples
    resampler = av.AudioResampler(format="s16", layout="mono", rate=to)
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame) + resampler.resample(None)]
    return np.concatenate(out).astype(np.int16) if out else np.zeros(0, np.int16)


class FileTrack(MediaStreamTrack):
    """Plays samples (48 kHz mono int16) in real time in 20 ms frames, then silence."""

    kind = "audio"

    def __init__(self, samples: np.ndarray):
        super().__init__()
        self.samples = samples
        self.sent = 0
        self.start: float | None = None
        self.sent_at: list[float] = []  # when frame i (samples i·960 ...) went to the encoder

    @property
    def done(self) -> bool:
        return self.sent >= len(self.samples)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.start is None:
            self.start = time.time()
        wait = self.start + self.sent / RATE - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = self.samples[self.sent : self.sent + FRAME]
        if len(chunk) < FRAME:
            chunk = np.concatenate([chunk, np.zeros(FRAME - len(chunk), np.int16)])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self.sent, fractions.Fraction(1, RATE)
        self.sent += FRAME
        self.sent_at.append(time.time())
        return frame


@dataclass
class CallReport:
    session_id: str | None = None
    clock: dict = field(default_factory=dict)  # the server's {t0, tick_s, first_tick}
    received: list[np.ndarray] = field(default_factory=list)
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, samples received before)
    frames: list[tuple[float, int]] = field(default_factory=list)  # (time, pts) as the receive track hands frames out
    sent_at: list[float] = field(default_factory=list)  # when outgoing frame i left (see FileTrack)
    packets: list[tuple[float, int]] = field(default_factory=list)  # (time, RTP timestamp) as packets arrive
    events: list[dict] = field(default_factory=list)
    ticks: list[dict] = field(default_factory=list)  # interplay.tick events, with arrival times

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.received) if self.received else np.zeros(0, np.int16)

    @property
    def max_gap_ms(self) -> float:
        times = [t for t, _ in self.arrivals]
        return float(np.max(np.diff(times)) * 1000) if len(times) > 1 else float("nan")

    def arrival_of(self, sample: int) -> float | None:
        """When the packet carrying output stream sample `sample` (48 kHz) arrived, or None.

        Timed at the transport: the RTP timestamp (48 kHz) counts stream samples from the first
        packet, so no receive-side buffering (aiortc holds an audio frame until the next packet
        comes) is counted. Without packet times, the decoded frames' arrival is used.
        """
        if self.packets:
            first = self.packets[0][1]
            for t, ts in self.packets:
                if ((ts - first) & 0xFFFFFFFF) + FRAME > sample:
                    return t
            return None
        for t, before in self.arrivals:
            if before + FRAME > sample:
                return t
        return None

    def event_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.events:
            counts[e.get("type", "?")] = counts.get(e.get("type", "?"), 0) + 1
        return counts


def _time_packets(receiver, into: list) -> None:
    """Record (arrival time, RTP timestamp) of every RTP packet the receiver gets."""
    handle = receiver._handle_rtp_packet

    async def timed(packet, arrival_time_ms):
        into.append((time.time(), packet.timestamp))
        return await handle(packet, arrival_time_ms)

    receiver._handle_rtp_packet = timed


def post_offer(url: str, sdp: str, api_key: str | None) -> tuple[int, str, str | None]:
    headers = {"Content-Type": "application/sdp"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/realtime/calls", data=sdp.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(), response.headers.get("Location")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), None


async def call(
    url: str, samples: np.ndarray, rate: int, api_key: str | None = None, tail_s: float = 1.5,
    send_events: list[dict] | None = None, stop_sending_after_s: float | None = None, verbose: bool = False,
    respond_after_s: float | None = None, video: str | None = None,
) -> CallReport:
    """Stream `samples` in real time, keep listening `tail_s` after they end, hang up; the report.

    `stop_sending_after_s` ends the outgoing track early (a client that goes quiet mid-call)
    while the call and the recording go on. `respond_after_s` asks the model for a response (response.create) that long into the call.
    `video` is a video file (anything PyAV decodes) sent alongside, in real time.
    """
    report = CallReport()
    if urlparse(url).hostname in ("127.0.0.1", "localhost", "::1"):
        from actors.ingress.ice import use_ice_addresses

        use_ice_addresses(["127.0.0.1"])  # a local server: keep the media on loopback too
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = FileTrack(resample(samples, rate))
    report.sent_at = track.sent_at
    pc.addTrack(track)
    player = None
    if video is not None:
        from aiortc.contrib.media import MediaPlayer

        player = MediaPlayer(video)
        if player.video is None:
            raise ValueError(f"{video}: no video stream")
        pc.addTrack(player.video)
    channel = pc.createDataChannel("oai-events")
    opened = asyncio.Event()

    @channel.on("open")
    def _open():
        opened.set()

    @channel.on("message")
    def _message(raw):
        event = json.loads(raw)
        now = time.time()
        if event.get("type") == "interplay.tick":
            report.ticks.append({**event, "received_at": now})
            return
        report.events.append(event)
        if verbose:
            print(f"  <- {event.get('type')}", file=sys.stderr)
        if event.get("type") == "session.created":
            report.clock = event.get("session", {}).get("interplay", {}).get("clock", {})
            channel.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "interplay": {"tick_events": True}}}))

    async def record(remote):
        while True:
            try:
                frame = await remote.recv()
            except MediaStreamError:
                return
            data = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0] if frame.format.is_packed else frame.to_ndarray()[0]
            now = time.time()
            report.arrivals.append((now, sum(len(r) for r in report.received)))
            report.frames.append((now, frame.pts))
            report.received.append(data.astype(np.int16))

    recorders: list[asyncio.Task] = []

    @pc.on("track")
    def _track(remote):
        for receiver in pc.getReceivers():
            if receiver.track is remote and remote.kind == "audio":
                _time_packets(receiver, report.packets)
        recorders.append(asyncio.ensure_future(record(remote)))

    await pc.setLocalDescription(await pc.createOffer())
    status, body, location = await asyncio.to_thread(post_offer, url, pc.localDescription.sdp, api_key)
    if status != 201:
        await pc.close()
        raise RuntimeError(f"call refused: HTTP {status}: {body}")
    report.session_id = (location or "").rsplit("/", 1)[-1] or None
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
    await asyncio.wait_for(opened.wait(), 20)
    for event in send_events or []:
        channel.send(json.dumps(event))
    started, duration = time.time(), len(track.samples) / RATE
    while not track.done or time.time() - started < duration:
        if respond_after_s is not None and time.time() - started >= respond_after_s:
            channel.send(json.dumps({"type": "response.create"}))
            respond_after_s = None
        if stop_sending_after_s is not None and time.time() - started >= stop_sending_after_s and track.readyState == "live":
            track.stop()  # goes quiet, but stays on the call
            track.sent = len(track.samples)
        await asyncio.sleep(0.05)
    await asyncio.sleep(tail_s)
    await pc.close()
    for task in recorders:
        task.cancel()
    if player is not None and player.video is not None:
        player.video.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="interplay call", description="Call Interplay with a WAV file and record the reply.")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--wav", required=True, help="16-bit PCM WAV to say (any rate; mono or stereo)")
    parser.add_argument("--out", default="reply.wav", help="where to write the reply (48 kHz mono)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--video", default=None, help="a video file to send alongside (any format PyAV reads)")
    parser.add_argument("--tail", type=float, default=1.5, help="seconds to keep listening after the file ends")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    samples, rate = read_wav(args.wav)
    print(f"calling {args.url} with {len(samples) / rate:.1f} s of audio ...", file=sys.stderr)
    report = asyncio.run(call(args.url, samples, rate, args.api_key, args.tail, verbose=args.verbose, video=args.video))
    write_wav(args.out, report.audio, RATE)
    print(f"session {report.session_id}: received {len(report.audio) / RATE:.1f} s of audio -> {args.out}; longest gap {report.max_gap_ms:.0f} ms")
    print(f"events: {report.event_types()}")
    steps = [t["step_ms"] for t in report.ticks if "step_ms" in t]
    if steps:
        print(f"ticks: {len(steps)}, step p50 {np.percentile(steps, 50):.1f} ms, p99 {np.percentile(steps, 99):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
