"""The audio chunker: caller audio to clock-aligned 16 kHz chunks; a plain class, no Ray, no network.

`AudioChunker` takes audio at any rate and channel count, as it arrives from a WebRTC track, and
gives 16 kHz mono `(seq, int16[n])` chunks (n = `clock.samples()`), each covering tick `seq` of
the interaction clock, placed by arrival time with an adaptive margin for network jitter.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

import av
import numpy as np

from protocols.chunks import SAMPLE_RATE
from protocols.clock import TickClock

from actors.ingress.audio_frames import resample_all, to_av_frame


class AudioChunker:
    """Turns incoming audio into 16 kHz mono chunks aligned to the tick clock.

    Placement rule. The first block is placed so that it ends `margin` after its arrival on the
    clock (`t_arrival`: local wall time, `time.time()`, when it was received); the first chunk
    gets leading silence up to where it starts. Every later block follows the previous one
    contiguously; with `pts` (the block's first sample index in the sender's stream, e.g. the
    RTP timestamp) a small forward jump (lost packets, up to `stall_ms`) is filled with silence.
    Arrival times then keep the stream honest, with `late` = how long after its placed end a
    block arrived (normally between -margin and 0):
      - late > `stall_ms` - margin, or late > max(0, 20 ms - margin) for every block over
        `resync_ms` of audio (the client stalled, or its clock runs slow): re-anchor this block by
        the first block's rule. Ticks entirely inside the gap are never produced; a partly
        filled tick is padded with silence.
      - late < -(margin + max(`jitter_ms`, 20 ms)) (the client runs ahead of real time, or stale
        audio after a stall): the block is dropped.
      - otherwise (jitter, bursts after a hiccup) the block stays contiguous.

    The margin adapts to each session. It starts at `jitter_ms` (the cap); once `history_ms` of
    audio came, it is the `percentile` of the arrival spread over the last `window_ms` (each
    block's lateness relative to the earliest-arriving block in the window) plus `floor_ms`,
    capped at `jitter_ms`: a steady caller gets a few ms, a jittery one more. Blocks are placed
    to end on tick boundaries (when they tile the tick, as 20 ms packets do 200 ms ticks), so the
    packet carrying a tick's last sample is the last one that tick waits for: that costs up to
    one block more than the margin, depending on the caller's packet phase. The placement moves
    only where that cannot tear audio: on a quiet block (RMS below `quiet`) or over lost packets,
    and only by 1 ms or more. So tick k's audio is normally complete `margin` before the tick
    ends. The resampler's own delay (about 1 ms) is added to the placement, so a chunk completes
    as soon as its input has arrived. `t_arrival=None` means contiguous and
    unchecked (the first block is stamped now); the margin then stays at the cap.

    Chunks come out of `pop_ready()`; `pop_ready(until=k)` also closes a partly filled chunk of
    tick <= k (padded with silence): samples that later land in an already emitted tick are
    dropped, so a chunk never changes after it was handed out. At most `max_ready` chunks wait;
    older ones are dropped first. `source(k)` says where tick k's audio came from: the sender's
    index just after its last sample, when that block arrived, and the margin then.
    `on_chunk(seq)`, when set, is called as each chunk is closed, so a consumer can take tick k
    as soon as it is complete instead of waiting for the tick's end.
    """

    tells_complete = True  # `on_chunk` is called as each chunk closes

    def __init__(
        self, clock: TickClock, jitter_ms: float = 40.0, stall_ms: float = 300.0, resync_ms: float = 1000.0, max_ready: int = 25,
        floor_ms: float = 3.0, percentile: float = 95.0, window_ms: float = 2000.0, history_ms: float = 300.0, quiet: float = 300.0,
    ):
        self.clock = clock
        self.tick_samples = clock.samples()
        self.jitter_s = jitter_ms / 1000
        self._tolerance = max(self.jitter_s, 0.02)  # at least one WebRTC frame of arrival noise
        self.stall_s = stall_ms / 1000
        self.resync_s = resync_ms / 1000
        self.max_ready = max_ready
        self.floor_s = min(floor_ms / 1000, self.jitter_s)
        self.percentile = percentile
        self.window_s = window_ms / 1000
        self.history_s = history_ms / 1000
        self.quiet = quiet
        self.margin_s = self.jitter_s  # how long before its placed end the earliest audio arrives
        self._lates: deque[tuple[float, float]] = deque()  # (block seconds, late + _shift) in the window
        self._window_len = 0.0
        self._shift = 0.0  # sum of placement moves since the anchor
        self._ready: deque[tuple[int, np.ndarray]] = deque()
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)  # a new one at each anchor
        self._rate: int | None = None
        self._fresh = False  # the resampler has not output anything yet: its delay is unknown
        self._delay_s = 0.0  # how much of its input the resampler holds back (s)
        self._anchored = False  # placed in the clock yet (at the first block)
        self._pos = 0  # 16 kHz sample index (since t0) of the next resampled sample, once anchored
        self._in_end = 0.0  # clock time (s since t0) where the input so far ends
        self._next_pts: int | None = None  # the sender's index of the sample expected next
        self._src = 0  # the sender's index after the last sample placed
        self._late_run = 0.0  # seconds of consecutive audio that arrived late
        self._sources: deque[tuple] = deque(maxlen=64)  # (16 kHz start, end, sender's start index, rate, arrival, margin) a block
        self._seq = -1  # tick of the chunk being filled
        self._buf = np.zeros(self.tick_samples, np.int16)
        self._filled = 0  # samples written into _buf (including leading silence)
        self._next_seq = 0  # lowest tick not yet emitted; samples for earlier ticks are dropped
        self.gaps = 0
        self.cut_short = 0  # chunks closed by pop_ready(until) before all their audio came
        self.dropped_blocks = 0
        self.dropped_chunks = 0
        self.late_blocks = 0  # blocks that arrived after their placed end
        self.moves = 0  # placement moves to a new margin
        self.on_chunk: Callable[[int], None] | None = None

    @property
    def margin_ms(self) -> float:
        return self.margin_s * 1000

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
        checked = t_arrival is not None
        if t_arrival is None:
            t_arrival = time.time()
        arrived = self._since_t0(t_arrival)  # clock s
        gap = 0
        if not self._anchored:
            self._anchor(self._aligned(arrived + self.margin_s, len(x) / rate) - len(x) / rate, rate)
        else:
            if rate != self._rate:
                self._flush_resampler()
                self._new_resampler(rate)
            elif pts is not None and self._next_pts is not None and 0 < pts - self._next_pts <= self.stall_s * rate:
                gap = pts - self._next_pts  # lost packets
            late = arrived - (self._in_end + (gap + len(x)) / rate) if checked else None
            if late is not None and late < -(self.margin_s + self._tolerance):
                self.dropped_blocks += 1
                return
            is_late = late is not None and late > max(0.0, 0.02 - self.margin_s)
            self._late_run = self._late_run + len(x) / rate if is_late else 0.0
            if late is not None and (late > self.stall_s - self.margin_s or self._late_run >= self.resync_s):
                self._flush_resampler()
                self._anchor(self._aligned(arrived + self.margin_s, len(x) / rate) - len(x) / rate, rate)
                self.gaps += 1
                gap = 0
            elif late is not None:
                self.late_blocks += late > 0
                self._observe(len(x) / rate, late)
                move = self._move(self._in_end + (gap + len(x)) / rate, len(x) / rate)
                if not (gap or self._is_quiet(x)):
                    move = 0.0
                if move < 0:  # place earlier: leave out part of the lost stretch, or of this quiet block
                    cut = min(gap + len(x), round(-move * rate))
                    from_gap = min(gap, cut)
                    gap -= from_gap
                    x = x[cut - from_gap :]
                    self._moved(-cut / rate)
                elif move > 0:  # place later: a little more silence
                    gap += round(move * rate)
                    self._moved(round(move * rate) / rate)
            if gap:
                self._feed(np.zeros(gap, np.int16), rate)
        self._src = (pts if pts is not None else self._src) + len(samples)
        if len(x):
            self._feed(x, rate)
            placed = round(len(x) * SAMPLE_RATE / rate)
            self._sources.append((self._pos - placed, self._pos, self._src - len(x), rate, t_arrival, self.margin_ms))
        self._next_pts = None if pts is None else pts + len(samples)

    def source(self, seq: int) -> dict | None:
        """Where tick `seq`'s audio came from: {"end": the sender's index (its pts units, else
        samples pushed) just after the last sample placed in it, "arrived": local wall time the
        block holding that sample arrived, "margin_ms": the margin then}; None if unknown."""
        lo, hi = seq * self.tick_samples, (seq + 1) * self.tick_samples
        found = None
        for start, end, src, rate, arrived, margin_ms in self._sources:
            if start < hi and end > lo:  # the block holding the tick's last sample wins
                upto = min(end, hi)
                found = {"end": src + round((upto - start) * rate / SAMPLE_RATE), "arrived": arrived, "margin_ms": margin_ms}
        return found

    def _is_quiet(self, x: np.ndarray) -> bool:
        return float(np.sqrt(np.mean(x.astype(np.float32) ** 2))) < self.quiet

    def _observe(self, seconds: float, late: float) -> None:
        self._lates.append((seconds, late + self._shift))
        self._window_len += seconds
        while self._window_len - self._lates[0][0] >= self.window_s:
            self._window_len -= self._lates.popleft()[0]

    def _aligned(self, end: float, block_s: float) -> float:
        """The earliest place >= `end` (clock s) for a block of `block_s` to end at so that what
        the resampler has given out of it by then ends on a tick boundary: so a tick's audio is
        complete as soon as the block carrying its last sample has come, and no tick ends
        inside a block that arrives after it. Unchanged when blocks do not tile the tick."""
        per_tick = self.clock.tick_s / block_s
        if abs(per_tick - round(per_tick)) > 1e-6:
            return end
        pad = (self._delay_s - end) % block_s
        return end if pad > block_s - 1e-6 else end + pad

    def _move(self, block_end: float, block_s: float) -> float:
        """The placement move (s, + later) to the margin the arrival spread asks for, aligned
        (see `_aligned`; 0 if under 1 ms); refreshes `margin_s` from the window."""
        if self._window_len < self.history_s:
            return 0.0
        lates = np.fromiter((v for _, v in self._lates), float, len(self._lates)) - self._shift
        earliest = float(lates.min())
        self.margin_s = max(0.0, -earliest)
        spread = float(np.percentile(lates, self.percentile)) - earliest
        target = min(spread + self.floor_s, self.jitter_s)
        move = self._aligned(block_end + earliest + target, block_s) - block_end  # the earliest block then arrives `target` (or up to a block more) early
        return move if abs(move) >= 0.001 else 0.0

    def _moved(self, seconds: float) -> None:
        self._shift += seconds
        self.margin_s = max(0.0, self.margin_s + seconds)
        self.moves += 1

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
        self._lates.clear()
        self._window_len = 0.0
        self._shift = 0.0
        pos = round(start * SAMPLE_RATE)
        self._pos = max(pos, self._pos) if self._anchored else pos
        self._anchored = True
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
            held = max(0, round(len(x) * SAMPLE_RATE / rate) - len(y))
            self._pos += held
            self._delay_s = held / SAMPLE_RATE
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
        if self.on_chunk is not None:
            self.on_chunk(self._next_seq - 1)
