"""Audio in: caller audio to clock-aligned 16 kHz chunks; plain classes, no Ray, no network.

- `AudioChunker`: audio at any rate and channel count in, 16 kHz mono `(seq, int16[n])` chunks
  out (n = `clock.samples()`), each chunk covering tick `seq` of the interaction clock.
- `BufferedAudioInput`: the same for WebSocket sessions, whose audio rides base64 events and may
  arrive faster than real time.
- `frame_to_samples`: a decoded PyAV frame -> int16 samples and rate.
"""

from __future__ import annotations

import time
from collections import deque

import av
import numpy as np

from protocols.chunks import SAMPLE_RATE
from protocols.clock import TickClock


def to_av_frame(samples: np.ndarray, rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    return frame


def resample_all(resampler: av.AudioResampler, frame: av.AudioFrame | None) -> np.ndarray:
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

    def __init__(self, clock: TickClock, jitter_ms: float = 40.0, stall_ms: float = 300.0, resync_ms: float = 1000.0, max_ready: int = 25):
        self.clock = clock
        self.tick_samples = clock.samples()
        self.jitter_s = jitter_ms / 1000
        self._tolerance = max(self.jitter_s, 0.02)  # at least one WebRTC frame of arrival noise
        self.stall_s = stall_ms / 1000
        self.resync_s = resync_ms / 1000
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
        start = None if t_arrival is None else self._since_t0(t_arrival) + self.jitter_s - len(x) / rate
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

    def _since_t0(self, t_wall: float) -> float:
        """Seconds since the clock's origin of local wall time `t_wall`."""
        return t_wall - self.clock.offset_s - self.clock.t0

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
        self._write(resample_all(self._resampler, None))

    def _feed(self, x: np.ndarray, rate: int) -> None:
        self._in_end += len(x) / rate
        y = resample_all(self._resampler, to_av_frame(x, rate))
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


class BufferedAudioInput:
    """Audio from a client that may send faster than real time (a WebSocket `input_audio_buffer.append`).

    Samples are resampled to 16 kHz into a FIFO and handed out one chunk per tick, in order,
    never dropped for being early (so a file streamed at once is heard in full, in real time).
    `pop_ready(until=k)` gives chunk k when a whole chunk is buffered, or the padded remainder once
    the client has sent nothing for a tick (the end of what it said). At most `max_s` buffered.
    """

    def __init__(self, clock: TickClock, max_s: float = 60.0):
        self.clock = clock
        self.max_samples = int(max_s * SAMPLE_RATE)
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
        y = x if rate == SAMPLE_RATE else resample_all(self._resampler, to_av_frame(x, rate))
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
        size = self.clock.samples()
        if until is None or n == 0 or (n < size and time.time() - self._last_push < self.clock.tick_s):
            return []
        chunk = np.zeros(size, np.int16)
        take = min(n, size)
        chunk[:take] = self._fifo[:take]
        self._fifo = self._fifo[take:]
        return [(until, chunk)]
