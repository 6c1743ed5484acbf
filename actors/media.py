"""Media plumbing between WebRTC and the 200 ms tick clock; plain classes, no Ray, no network.

- `AudioChunker`: audio at any rate and channel count in, 16 kHz mono `(seq, int16[3200])` chunks
  out, each chunk covering tick `seq` = [t0 + seq·tick, t0 + (seq+1)·tick) of the interaction clock.
- `FrameSampler`: keeps the newest video frame and hands it out once, centre-cropped and resized.
- `PacedAudioTrack`: an aiortc audio track that plays the model's 16 kHz audio as 20 ms 48 kHz
  frames on an absolute wall-clock schedule, with silence whenever nothing is queued.
- `BufferedAudioInput` / `EventAudioSink`: the same two jobs for WebSocket sessions, whose audio
  rides base64 events and may arrive faster than real time.
"""

from __future__ import annotations

import asyncio
import base64
import fractions
import functools
import time
from collections import deque

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from protocols.chunks import CHUNK_SAMPLES, SAMPLE_RATE


def _to_frame(samples: np.ndarray, rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    return frame


def _resample(resampler: av.AudioResampler, frame: av.AudioFrame | None) -> np.ndarray:
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    return np.concatenate(out) if out else np.zeros(0, np.int16)


def frame_to_samples(frame: av.AudioFrame) -> tuple[np.ndarray, int]:
    """A decoded PyAV audio frame -> (int16 (n, channels), rate)."""
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    arr = arr if frame.format.is_planar else arr.reshape(-1, channels).T  # -> (channels, n)
    if arr.dtype.kind == "f":
        arr = np.clip(arr * 32767.0, -32768, 32767)
    return arr.T.astype(np.int16), frame.sample_rate


class AudioChunker:
    """Turns incoming audio into 16 kHz mono chunks aligned to the tick clock.

    Placement rule. The first block is placed so that it ends at `t_arrival + jitter_s` on the
    clock (`t_arrival`: wall time, `time.time()`, when it was received); the first chunk gets
    leading silence up to where it starts. Every later block follows the previous one
    contiguously; with `pts` (the block's first sample index in the sender's stream, e.g. the
    RTP timestamp) a small forward jump (lost packets, up to `stall_s`) is filled with silence.
    Arrival times then only keep the stream honest, with `lag` = how much later a block arrived
    than its contiguous place implies, and tolerance = max(`jitter_s`, 20 ms):
      - lag > `stall_s`, or lag > tolerance for every block over `resync_s` of audio (the client
        stalled, or its clock runs slow): re-anchor this block by the first block's rule. Ticks
        entirely inside the gap are never produced; a partly filled tick is padded with silence.
      - lag < -tolerance (the client runs ahead of real time, or stale audio after a stall):
        the block is dropped.
      - otherwise (jitter, bursts after a hiccup) the block stays contiguous.
    So tick k's audio is normally complete `jitter_s` before the tick ends: the margin for
    network jitter, paid for in latency. `t_arrival=None` means contiguous, unchecked (the first
    block is stamped now). The resampler's own delay (about 1 ms) is added to the placement, so
    a chunk completes as soon as its input has arrived.

    Chunks come out of `pop_ready()`; `pop_ready(until=k)` also closes a partly filled chunk of
    tick <= k (padded with silence): samples that later land in an already emitted tick are
    dropped, so a chunk never changes after it was handed out. At most `max_ready` chunks wait;
    older ones are dropped first.
    """

    def __init__(self, clock_t0: float, tick_s: float = 0.2, jitter_s: float = 0.04, stall_s: float = 0.3, resync_s: float = 1.0, max_ready: int = 25):
        self.t0 = float(clock_t0)
        self.tick_s = float(tick_s)
        self.tick_samples = round(tick_s * SAMPLE_RATE)
        self.jitter_s = jitter_s
        self._tolerance = max(jitter_s, 0.02)  # at least one WebRTC frame of arrival noise
        self.stall_s = stall_s
        self.resync_s = resync_s
        self.max_ready = max_ready
        self._ready: deque[tuple[int, np.ndarray]] = deque()
        self._resampler: av.AudioResampler | None = None
        self._rate: int | None = None
        self._fresh = False  # the resampler has not output anything yet: its delay is unknown
        self._pos: int | None = None  # 16 kHz sample index (since t0) of the next resampled sample
        self._in_end = 0.0  # clock time (s since t0) where the input so far ends
        self._next_pts: int | None = None  # the sender's index of the sample expected next
        self._late_run = 0.0  # seconds of consecutive audio that arrived more than jitter_s late
        self._seq = -1  # tick of the chunk being filled
        self._buf = np.zeros(self.tick_samples, np.int16)
        self._filled = 0  # samples written into _buf (including leading silence)
        self._next_seq = 0  # lowest tick not yet emitted; samples for earlier ticks are dropped
        self.gaps = 0
        self.cut_short = 0  # chunks closed by pop_ready(until) before all their audio came
        self.dropped_blocks = 0
        self.dropped_chunks = 0

    def push(self, samples: np.ndarray, rate: int, t_arrival: float | None = None, pts: int | None = None) -> None:
        x = np.asarray(samples)
        if x.dtype != np.int16:
            raise ValueError(f"samples must be int16 PCM, got {x.dtype}")
        if x.ndim == 2:  # (n, channels): downmix by averaging
            x = x.mean(axis=1).round().astype(np.int16) if x.shape[1] > 1 else x[:, 0]
        elif x.ndim != 1:
            raise ValueError(f"samples must have shape (n,) or (n, channels), got {x.shape}")
        if not 8_000 <= int(rate) <= 192_000:
            raise ValueError(f"unsupported sample rate {rate}")
        if len(x) == 0:
            return
        rate = int(rate)
        if t_arrival is None and self._pos is None:
            t_arrival = time.time()
        start = None if t_arrival is None else t_arrival + self.jitter_s - len(x) / rate - self.t0  # clock s
        if self._pos is None:
            self._anchor(start, rate)
        else:
            if rate != self._rate:
                self._flush_resampler()
                self._new_resampler(rate)
            elif pts is not None and self._next_pts is not None and 0 < pts - self._next_pts <= self.stall_s * rate:
                self._feed(np.zeros(pts - self._next_pts, np.int16), rate)  # lost packets
            lag = None if start is None else start - self._in_end
            if lag is not None and lag < -self._tolerance:
                self.dropped_blocks += 1
                return
            self._late_run = self._late_run + len(x) / rate if lag is not None and lag > self._tolerance else 0.0
            if lag is not None and (lag > self.stall_s or self._late_run >= self.resync_s):
                self._flush_resampler()
                self._anchor(start, rate)
                self.gaps += 1
        self._feed(x, rate)
        self._next_pts = None if pts is None else pts + len(x)

    def pop_ready(self, until: int | None = None) -> list[tuple[int, np.ndarray]]:
        """Complete chunks, oldest first; with `until`, also the partly filled chunk of a tick <= until."""
        if until is not None and self._filled and self._seq <= until:
            self.cut_short += 1
            self._emit()
            self._next_seq = max(self._next_seq, until + 1)
        out = list(self._ready)
        self._ready.clear()
        return out

    def _anchor(self, start: float, rate: int) -> None:
        self._in_end = start
        self._late_run = 0.0
        pos = round(start * SAMPLE_RATE)
        self._pos = pos if self._pos is None else max(pos, self._pos)
        self._new_resampler(rate)

    def _new_resampler(self, rate: int) -> None:
        self._rate = rate
        self._fresh = True
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)

    def _flush_resampler(self) -> None:
        self._write(_resample(self._resampler, None))

    def _feed(self, x: np.ndarray, rate: int) -> None:
        self._in_end += len(x) / rate
        y = _resample(self._resampler, _to_frame(x, rate))
        if self._fresh:  # place output as late as the resampler holds it back
            self._pos += max(0, round(len(x) * SAMPLE_RATE / rate) - len(y))
            self._fresh = False
        self._write(y)

    def _write(self, y: np.ndarray) -> None:
        n_tick = self.tick_samples
        i = 0
        while i < len(y):
            seq, offset = divmod(self._pos, n_tick)
            take = min(len(y) - i, n_tick - offset)
            if seq >= self._next_seq:  # earlier ticks were already handed out (or precede t0)
                if seq != self._seq:
                    if self._filled:
                        self._emit()
                    self._seq, self._filled = seq, 0
                    self._buf = np.zeros(n_tick, np.int16)
                self._buf[offset : offset + take] = y[i : i + take]
                self._filled = offset + take
                if self._filled == n_tick:
                    self._emit()
            self._pos += take
            i += take

    def _emit(self) -> None:
        if len(self._ready) >= self.max_ready:
            self._ready.popleft()
            self.dropped_chunks += 1
        self._ready.append((self._seq, self._buf))
        self._next_seq = self._seq + 1
        self._buf = np.zeros(self.tick_samples, np.int16)
        self._filled = 0


# --- video ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights: area averaging when shrinking, bilinear when growing.

    Matches torch's F.interpolate(mode="area") / (mode="bilinear", align_corners=False), which
    `models.features.resize_frame` uses, so frames reach the model the same way in training.
    """
    m = np.zeros((n_out, n_in), np.float32)
    if n_in >= n_out:
        for i in range(n_out):
            a, b = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
            m[i, a:b] = 1.0 / (b - a)
    else:
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w1 = (src - i0).astype(np.float32)
        m[np.arange(n_out), i0] += 1.0 - w1
        m[np.arange(n_out), i1] += w1
    return m


def resize_frame(frame: np.ndarray, size: int = 160) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3): centre-crop to a square, then resize."""
    h, w = frame.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = frame[top : top + side, left : left + side].astype(np.float32)
    m = _resize_matrix(side, size)
    out = np.einsum("ij,jkc,lk->ilc", m, square, m, optimize=True)  # rows, then columns
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class FrameSampler:
    """Keeps only the newest video frame; `take()` returns it once, resized to size x size RGB.

    Called once per tick, this yields the latest frame of that tick (or None if no new frame
    came). Decoding to RGB and resizing happen in `take()`, so dropped frames cost nothing.
    """

    def __init__(self, size: int = 160):
        self.size = size
        self._latest = None
        self.frames_in = 0

    def push(self, frame) -> None:
        """`frame`: a uint8 (H, W, 3) RGB array or an `av.VideoFrame`."""
        self._latest = frame
        self.frames_in += 1

    def take(self) -> np.ndarray | None:
        frame, self._latest = self._latest, None
        if frame is None:
            return None
        if isinstance(frame, av.VideoFrame):
            frame = frame.to_ndarray(format="rgb24")
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or min(frame.shape[:2]) == 0:
            return None
        return resize_frame(frame, self.size)


# --- audio out --------------------------------------------------------------------------------

OUT_RATE = 48_000
PTIME = 0.020
OUT_SAMPLES = int(OUT_RATE * PTIME)  # 960 samples a frame


class PacedAudioTrack(MediaStreamTrack):
    """Outgoing audio: `write()` queues 16 kHz model audio; `recv()` plays it in real time.

    Frame n is released at start + n·20 ms (absolute, so no drift however long the call), with
    pts = n·960 at 48 kHz; whatever part of a frame the queue cannot fill is silence. If the
    consumer falls more than `max_late_s` behind (a stalled event loop) the schedule is moved
    instead of bursting out the backlog. More than `max_queue_s` queued drops the oldest audio,
    which bounds the playout latency.

    Counters, in 48 kHz samples of the written stream: `written` (ever queued), `position`
    (consumed: sent, cleared or dropped; `written - position` is queued), `played` (sent).
    """

    kind = "audio"

    def __init__(self, max_queue_s: float = 5.0, max_late_s: float = 0.5):
        super().__init__()
        self._queue = np.zeros(0, np.int16)
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=OUT_RATE)
        self.max_queue = int(max_queue_s * OUT_RATE)
        self.max_late_s = max_late_s
        self._start: float | None = None
        self._n = 0
        self.written = 0
        self.position = 0
        self.played = 0
        self.overflow = 0

    def write(self, samples: np.ndarray) -> None:
        """Queue int16 16 kHz mono audio."""
        y = _resample(self._resampler, _to_frame(samples, SAMPLE_RATE))
        self._queue = np.concatenate([self._queue, y])
        self.written += len(y)
        excess = len(self._queue) - self.max_queue
        if excess > 0:  # keep the newest audio
            self._queue = self._queue[excess:]
            self.position += excess
            self.overflow += excess

    def clear(self) -> float:
        """Drop all queued audio (an interruption); returns how many ms were dropped."""
        dropped = len(self._queue)
        self._queue = np.zeros(0, np.int16)
        self.position = self.written
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=OUT_RATE)  # forget its tail too
        return dropped * 1000 / OUT_RATE

    @property
    def queued_ms(self) -> float:
        return len(self._queue) * 1000 / OUT_RATE

    @property
    def played_ms(self) -> float:
        return self.played * 1000 / OUT_RATE

    @property
    def next_play_sample(self) -> int:
        """Sample index of the outgoing stream (silence included) where audio written now will play."""
        return self._n * OUT_SAMPLES + len(self._queue)

    def time_of(self, sample: int) -> float | None:
        """The wall-clock time the frame holding stream sample `sample` is due to be sent."""
        return None if self._start is None else self._start + (sample // OUT_SAMPLES) * PTIME

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.time()
        if self._start is None:
            self._start = now
        due = self._start + self._n * PTIME
        if now - due > self.max_late_s:
            self._start = now - self._n * PTIME
        elif due > now:
            await asyncio.sleep(due - now)
        out = np.zeros(OUT_SAMPLES, np.int16)
        take = min(OUT_SAMPLES, len(self._queue))
        out[:take] = self._queue[:take]
        self._queue = self._queue[take:]
        self.position += take
        self.played += take
        frame = av.AudioFrame.from_ndarray(out.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OUT_RATE
        frame.pts = self._n * OUT_SAMPLES
        frame.time_base = fractions.Fraction(1, OUT_RATE)
        self._n += 1
        return frame


# --- where media may go ------------------------------------------------------------------------

_pinned: list[str] | None = None


def use_ice_addresses(addresses: list[str] | None) -> None:
    """Gather ICE host candidates on `addresses` only (process-wide), or on every interface (None).

    aioice never offers 127.0.0.1 by itself; a server bound to loopback (the local default, and
    every test) keeps its media there too, so calls never leave the machine.
    """
    import aioice.ice

    global _pinned
    if not hasattr(aioice.ice, "_all_host_addresses"):
        aioice.ice._all_host_addresses = aioice.ice.get_host_addresses
    _pinned = None if addresses is None else list(addresses)
    if _pinned is None:
        aioice.ice.get_host_addresses = aioice.ice._all_host_addresses
    else:
        fixed = _pinned
        aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: [a for a in fixed if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


def pinned_ice_addresses() -> list[str] | None:
    return _pinned


def allowed_candidates(sdp: str, addresses: list[str] | None) -> str:
    """`sdp` without the remote ICE candidates outside `addresses` (all kept when None), so a
    pinned peer never sends to, or resolves (mDNS), anything else."""
    if addresses is None:
        return sdp
    keep = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            if len(parts) < 5 or parts[4] not in addresses:
                continue
        keep.append(line)
    return "\r\n".join(keep) + "\r\n"


# --- WebSocket sessions -----------------------------------------------------------------------


class BufferedAudioInput:
    """Audio from a client that may send faster than real time (a WebSocket `input_audio_buffer.append`).

    Samples are resampled to 16 kHz into a FIFO and handed out one chunk per tick, in order,
    never dropped for being early (so a file streamed at once is heard in full, in real time).
    `pop_ready(until=k)` gives chunk k when a whole chunk is buffered, or the padded remainder once
    the client has sent nothing for a tick (the end of what it said). At most `max_s` buffered.
    """

    def __init__(self, max_s: float = 60.0, tick_s: float = 0.2):
        self.max_samples = int(max_s * SAMPLE_RATE)
        self.tick_s = tick_s
        self._fifo = np.zeros(0, np.int16)
        self._resampler: av.AudioResampler | None = None
        self._rate: int | None = None
        self._last_push = 0.0

    def push(self, samples: np.ndarray, rate: int, t_arrival: float | None = None, pts: int | None = None) -> None:
        x = np.asarray(samples)
        if x.dtype != np.int16 or x.ndim != 1:
            raise ValueError("samples must be mono int16 PCM")
        if rate != self._rate:
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            self._rate = rate
        y = x if rate == SAMPLE_RATE else _resample(self._resampler, _to_frame(x, rate))
        if len(self._fifo) + len(y) > self.max_samples:
            raise ValueError(f"more than {self.max_samples / SAMPLE_RATE:.0f} s of input audio buffered")
        self._fifo = np.concatenate([self._fifo, y])
        self._last_push = time.time() if t_arrival is None else t_arrival

    def clear(self) -> None:
        self._fifo = np.zeros(0, np.int16)

    @property
    def buffered_s(self) -> float:
        return len(self._fifo) / SAMPLE_RATE

    def pop_ready(self, until: int | None = None) -> list[tuple[int, np.ndarray]]:
        n = len(self._fifo)
        if until is None or n == 0 or (n < CHUNK_SAMPLES and time.time() - self._last_push < self.tick_s):
            return []
        chunk = np.zeros(CHUNK_SAMPLES, np.int16)
        take = min(n, CHUNK_SAMPLES)
        chunk[:take] = self._fifo[:take]
        self._fifo = self._fifo[take:]
        return [(until, chunk)]


class EventAudioSink:
    """The WebSocket counterpart of PacedAudioTrack: model audio goes out as events, not a track.

    `write()` resamples 16 kHz model audio to the session's output `rate` and keeps it for
    `take()` (base64 PCM16 for `response.output_audio.delta`). The client plays it, so nothing is
    queued here: counters are in 48 kHz samples like the track's, with `position == written`.
    """

    def __init__(self, rate: int = 24_000):
        self.rate = rate
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        self._pending: list[np.ndarray] = []
        self.written = 0
        self.played = 0

    def write(self, samples: np.ndarray) -> None:
        self._pending.append(_resample(self._resampler, _to_frame(samples, SAMPLE_RATE)))
        self.written += len(samples) * OUT_RATE // SAMPLE_RATE
        self.played = self.written

    def take(self) -> str:
        data = np.concatenate(self._pending) if self._pending else np.zeros(0, np.int16)
        self._pending = []
        return base64.b64encode(data.astype("<i2").tobytes()).decode()

    @property
    def position(self) -> int:
        return self.written

    @property
    def next_play_sample(self) -> int:
        return self.written

    def time_of(self, sample: int) -> float | None:
        return None  # the client plays it

    @property
    def queued_ms(self) -> float:
        return 0.0

    @property
    def played_ms(self) -> float:
        return self.played * 1000 / OUT_RATE

    def clear(self) -> float:
        self._pending = []
        return 0.0

    def stop(self) -> None:
        self._pending = []
