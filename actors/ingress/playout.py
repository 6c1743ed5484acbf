"""Audio out: the model's 16 kHz audio on its way to the caller; no Ray, no network.

- `PacedAudioTrack`: an aiortc audio track that plays the model's audio as 20 ms 48 kHz frames
  on an absolute wall-clock schedule, with silence whenever nothing is queued.
- `EventAudioSink`: the same job for WebSocket sessions, whose audio leaves as base64 events.
Both count in 48 kHz samples of the outgoing stream (`OUT_RATE`), so a response's place in the
stream is measured the same way whichever transport carries it.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from protocols.chunks import SAMPLE_RATE
from protocols.realtime_audio import encode_audio

from actors.ingress.audio_frames import resample_all, to_av_frame

OUT_RATE = 48_000
PTIME = 0.020
OUT_SAMPLES = int(OUT_RATE * PTIME)  # 960 samples a frame


def _primed_resampler() -> av.AudioResampler:
    """A 16 kHz -> 48 kHz resampler that already holds back its delay (in silence), so that from
    the first write on it gives out three samples for each one in."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=OUT_RATE)
    resample_all(resampler, to_av_frame(np.zeros(SAMPLE_RATE // 100, np.int16), SAMPLE_RATE))
    return resampler


class PacedAudioTrack(MediaStreamTrack):
    """Outgoing audio: `write()` queues 16 kHz model audio; `recv()` plays it in real time.

    Frame n is released at start + n·20 ms (absolute, so no drift however long the call), with
    pts = n·960 at 48 kHz; whatever part of a frame the queue cannot fill is silence. If the
    consumer falls more than `max_late_s` behind (a stalled event loop) the schedule is moved
    instead of bursting out the backlog. More than `max_queue_s` queued drops the oldest audio,
    which bounds the playout latency.

    Counters, in 48 kHz samples of the written stream: `written` (ever queued), `position`
    (consumed: sent, cleared or dropped; `written - position` is queued), `played` (sent).
    The resampler is primed with silence, so `write(n samples)` always queues exactly 3·n: where
    audio written now begins (`next_play_sample`) is known before it is written.
    """

    kind = "audio"

    def __init__(self, max_queue_s: float = 5.0, max_late_s: float = 0.5):
        super().__init__()
        self._queue = np.zeros(0, np.int16)
        self._resampler = _primed_resampler()
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
        y = resample_all(self._resampler, to_av_frame(samples, SAMPLE_RATE))
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
        self._resampler = _primed_resampler()  # forget its tail too
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


class EventAudioSink:
    """The WebSocket counterpart of PacedAudioTrack: model audio goes out as events, not a track.

    `write()` resamples 16 kHz model audio to the session's output `rate` and keeps it for
    `take()`: base64 in the session's output format (`kind`: audio/pcm PCM16, or G.711
    audio/pcmu or audio/pcma at 8 kHz) for `response.output_audio.delta`. `set_format` changes
    both mid-session (a session.update). The client plays it, so nothing is queued here:
    counters are in 48 kHz samples like the track's, with `position == written`.
    """

    def __init__(self, rate: int = 24_000, kind: str = "audio/pcm"):
        self._pending: list[np.ndarray] = []
        self.written = 0
        self.played = 0
        self.set_format(kind, rate)

    def set_format(self, kind: str, rate: int) -> None:
        """Audio written from now on leaves as `kind` at `rate`. Anything written but not taken is
        dropped (a session takes it after each write, so between events nothing is)."""
        self._pending = []
        self.kind, self.rate = kind, rate
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)

    def write(self, samples: np.ndarray) -> None:
        self._pending.append(resample_all(self._resampler, to_av_frame(samples, SAMPLE_RATE)))
        self.written += len(samples) * OUT_RATE // SAMPLE_RATE
        self.played = self.written

    def take(self) -> str:
        data = np.concatenate(self._pending) if self._pending else np.zeros(0, np.int16)
        self._pending = []
        return encode_audio(data, self.kind)

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
