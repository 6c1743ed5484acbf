"""`TickClock`: the one place tick arithmetic lives.

Tick k covers [t0 + k·tick, t0 + (k+1)·tick) of wall time (`time.time()` seconds), where the
tick length is the model's (a model is trained at one tick length) and `t0` is the interaction
actor's origin. Every part derives ticks, deadlines and sample counts from a `TickClock`; none
re-derives them. A clock travels between processes as `to_dict()` / `from_dict()`.

`offset_s` is this process's wall clock minus the origin's clock (estimated from round trips on
another node; 0 on the origin's own node): `now()` is the origin's time, so skew between nodes
does not make chunks late.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from .chunks import SAMPLE_RATE, ProtocolError

HOP_MS = 25  # the built-in model's dMel hop (`frames`); its config checks its tick is whole hops
MIN_TICK_MS, MAX_TICK_MS = 50, 2_000


def check_tick_ms(tick_ms: int) -> int:
    """A tick length a model can be trained at: whole milliseconds between 50 ms and 2 s (the
    model's own granularity, dMel hops or Mimi frames, is its config's or engine's to check)."""
    if isinstance(tick_ms, bool) or not isinstance(tick_ms, int) or not MIN_TICK_MS <= tick_ms <= MAX_TICK_MS:
        raise ProtocolError(
            f"tick_ms must be a whole number of ms between {MIN_TICK_MS} and {MAX_TICK_MS}, got {tick_ms!r}",
            "invalid_value", "tick_ms",
        )
    return tick_ms


@dataclass(frozen=True)
class TickClock:
    t0: float
    tick_ms: int = 200
    offset_s: float = 0.0

    def __post_init__(self) -> None:
        check_tick_ms(self.tick_ms)
        object.__setattr__(self, "t0", float(self.t0))
        object.__setattr__(self, "offset_s", float(self.offset_s))

    @classmethod
    def starting_now(cls, tick_ms: int = 200) -> "TickClock":
        return cls(time.time(), tick_ms)

    # Lengths.
    @property
    def tick_s(self) -> float:
        return self.tick_ms / 1000

    def samples(self, rate: int = SAMPLE_RATE) -> int:
        """Samples in one tick at `rate` (3,200 at 16 kHz for 200 ms)."""
        return rate * self.tick_ms // 1000

    @property
    def frames(self) -> int:
        """dMel frames in one tick."""
        return self.tick_ms // HOP_MS

    # Times.
    def now(self) -> float:
        """The origin's wall-clock time, as this process best knows it."""
        return time.time() - self.offset_s

    def start(self, k: int) -> float:
        return self.t0 + k * self.tick_s

    def end(self, k: int) -> float:
        return self.t0 + (k + 1) * self.tick_s

    def tick_at(self, t: float) -> int:
        """The tick whose span holds origin time `t`."""
        return math.floor((t - self.t0) / self.tick_s)

    def current(self) -> int:
        return self.tick_at(self.now())

    # Transport between processes.
    def with_offset(self, offset_s: float) -> "TickClock":
        return replace(self, offset_s=offset_s)

    def to_dict(self) -> dict:
        return {"t0": self.t0, "tick_ms": self.tick_ms, "tick_s": self.tick_s}

    @classmethod
    def from_dict(cls, d: dict) -> "TickClock":
        if "tick_ms" in d:
            tick_ms = d["tick_ms"]
        else:
            tick_ms = round(float(d["tick_s"]) * 1000)
        return cls(float(d["t0"]), int(tick_ms))
