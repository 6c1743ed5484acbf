"""The WebSocket input audio buffer: base64 audio appends in, one 16 kHz chunk per tick out.

`BufferedAudioInput` takes audio that may arrive faster than real time (a client streaming a
file at once) and hands it out in order, a chunk a tick, never dropping it for being early;
`InputBufferFull` is raised when a client sends more than it holds.
"""

from __future__ import annotations

import time

import av
import numpy as np

from protocols.chunks import SAMPLE_RATE
from protocols.clock import TickClock

from actors.ingress.audio_frames import resample_all, to_av_frame


class InputBufferFull(ValueError):
    """More audio than a `BufferedAudioInput` holds: the client sends faster than it is heard."""


class BufferedAudioInput:
    """Audio from a client that may send faster than real time (a WebSocket `input_audio_buffer.append`).

    Samples are resampled to 16 kHz into a FIFO and handed out one chunk per tick, in order,
    never dropped for being early (so a file streamed at once is heard in full, in real time).
    `pop_ready(until=k)` gives chunk k when a whole chunk is buffered, or the padded remainder once
    the client has sent nothing for a tick (the end of what it said). At most `max_s` buffered:
    beyond that `push` raises `InputBufferFull` and keeps nothing of that block. Empty blocks are
    ignored.
    """

    tells_complete = False  # a chunk is whole only when the client has sent enough: taken at the deadline

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
        if not 8_000 <= int(rate) <= 192_000:
            raise ValueError(f"unsupported sample rate {rate}")
        if len(x) == 0:
            return
        if len(self._fifo) + len(x) * SAMPLE_RATE // rate > self.max_samples:  # before resampling: nothing is kept of it
            raise InputBufferFull(f"more than {self.max_samples / SAMPLE_RATE:.0f} s of input audio buffered")
        resampler = self._resampler
        if rate != self._rate or resampler is None:
            resampler = self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            self._rate = rate
        y = x if rate == SAMPLE_RATE else resample_all(resampler, to_av_frame(x, rate))
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
