"""The interaction actor's figures: per-tick `TickStats` (`protocols.seams`), the recent ones kept in `Figures` (which
also says whether steps run hot), and `TickMetrics`, each tick through Ray's metrics (scraped with
the cluster's Prometheus) when the actor runs in Ray.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from protocols.seams import TickStats

HOT_TICKS, HOT_FRACTION = 25, 0.7  # join refuses while recent steps run this hot (or shed)


class Figures:
    """The last `keep` ticks' `TickStats`, for `stats` and for admission (`hot`)."""

    def __init__(self, tick_ms: float, keep: int = 600):
        self.tick_ms = tick_ms
        self.ticks: deque[TickStats] = deque(maxlen=keep)
        self.metrics: TickMetrics | None = None  # set when running as a Ray actor

    def record(self, stats: TickStats) -> None:
        self.ticks.append(stats)
        if self.metrics is not None:
            self.metrics.record(stats)

    def recent(self, last: int) -> list[TickStats]:
        return list(self.ticks)[-last:]

    def hot(self) -> bool:
        """Whether recent steps ran hot: p95 over HOT_FRACTION of the tick, or any tick shed."""
        recent = self.recent(HOT_TICKS)
        if any(s.shed for s in recent):
            return True
        steps = [s.step_ms for s in recent if s.sessions]
        return bool(steps) and float(np.percentile(steps, 95)) > HOT_FRACTION * self.tick_ms

    def summary(self, last: int) -> dict:
        """Step time percentiles and sums over the last `last` ticks, and the last ten ticks."""
        recent = self.recent(last)
        steps = np.array([s.step_ms for s in recent]) if recent else np.zeros(1)
        return {
            "step_ms_p50": float(np.percentile(steps, 50)),
            "step_ms_p99": float(np.percentile(steps, 99)),
            "late_chunks": int(sum(s.late for s in recent)),
            "missing_chunks": int(sum(s.missing for s in recent)),
            "shed_ticks": int(sum(s.shed for s in recent)),
            "ticks": recent[-10:],
        }


class TickMetrics:
    """Each tick's figures through Ray's metrics."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.step = metrics.Histogram("interplay_step_ms", "batched micro-turn step time", boundaries=[5, 10, 20, 40, 60, 100, 150, 200, 400])
        self.lag = metrics.Histogram("interplay_tick_lag_ms", "step start after the tick deadline", boundaries=[1, 5, 10, 20, 50, 100, 200])
        self.sessions = metrics.Gauge("interplay_sessions", "sessions stepped per tick")
        self.late = metrics.Counter("interplay_late_chunks", "chunks that arrived after their tick was stepped")
        self.missing = metrics.Counter("interplay_missing_chunks", "sessions stepped without a chunk")
        self.shed = metrics.Counter("interplay_shed_ticks", "ticks skipped because stepping fell behind")

    def record(self, s: TickStats) -> None:
        self.step.observe(s.step_ms)
        self.lag.observe(max(0.0, s.lag_ms))
        self.sessions.set(s.sessions)
        if s.late:
            self.late.inc(s.late)
        if s.missing:
            self.missing.inc(s.missing)
        if s.shed:
            self.shed.inc(s.shed)
