"""What crosses the interaction actor's ports besides chunks, typed: the log's `AppendResult` and
`Recovery`, what joining or resuming a session answers (`Joined`, `Resumed`), and the interaction
actor's figures (`InteractionStats`, with the recent ticks' `TickStats`). Plain (picklable) classes, so they cross Ray actors as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .chunks import InputChunk, OutputChunk


class AppendResult(dict):
    """{session_id: (first_index, last_index)} for the sessions whose deltas landed; `errors` maps each
    rejected session to the reason (its deltas were all refused, other sessions' were not); `moved`
    lists the sessions refused because the writer's epoch is stale (the session moved on)."""

    def __init__(self, ranges: Iterable = (), errors: dict[str, str] | None = None, moved: Iterable[str] = ()):
        super().__init__(ranges)
        self.errors = dict(errors or {})
        self.moved = list(moved)

    def __repr__(self) -> str:
        return f"AppendResult({dict(self)!r}, errors={self.errors!r}, moved={self.moved!r})"


@dataclass
class Recovery:
    """What rebuilds a session on another interaction actor (`Log.recovery`): its `log_token`
    (None if not kept), the writer `epoch` the caller now holds, the newest snapshot's `tick` and
    `state` (None, None without one), and the logged `inputs` and `outputs` after that tick, in
    seq order, one chunk per seq."""

    log_token: str | None
    epoch: int
    tick: int | None = None
    state: dict[str, Any] | None = None
    inputs: list[InputChunk] = field(default_factory=list)
    outputs: list[OutputChunk] = field(default_factory=list)

    @property
    def last_tick(self) -> int | None:
        """The last tick the session's model stepped, as far as the log knows."""
        return self.inputs[-1].seq if self.inputs else self.tick


@dataclass(frozen=True)
class Resumed:
    """What rebuilding a session from the log did: the last tick the log had of it (`from_tick`;
    None if none), how many logged ticks were `replayed` onto its snapshot, and how many of those
    gave other outputs than the logged ones (`mismatches`)."""

    from_tick: int | None
    replayed: int
    mismatches: int


@dataclass(frozen=True)
class Joined:
    """What `Interaction.join` (and `resume`) answers: the session, the first tick it is stepped
    on, its `log_token` (None with no log), the actor's `clock` (its `clock_info` as it answered)
    and, when `resume` rebuilt it from the log just now, what that did (`resumed`; None for a
    join, or a session that was there already)."""

    session_id: str
    first_tick: int
    log_token: str | None
    clock: dict[str, Any]
    resumed: Resumed | None = None


@dataclass(frozen=True)
class TickStats:
    """One tick's figures, as the interaction actor keeps them for its last few hundred ticks and
    exports them as metrics."""

    tick: int
    sessions: int
    late: int  # chunks that arrived after their tick was stepped (or shed)
    missing: int  # sessions stepped without a chunk
    step_ms: float
    lag_ms: float  # how long after the deadline the step started
    shed: int = 0  # ticks skipped just before this one, the loop being behind


@dataclass(frozen=True)
class InteractionStats:
    """What `Interaction.stats(last)` answers: the sessions it steps now (`sessions` of them,
    `session_ids` sorted), the last tick stepped and the tick length; over the last `last` ticks
    the step time's median and p99, the late, missing and shed chunk counts, and the last ten
    ticks' `TickStats`; whether steps run `hot` (joins are refused then), how many log calls wait
    (`log_backlog`), the `totals` since the actor started, and the Ray node it runs on (None out
    of Ray). Figures default to none, so a stand-in states only what it is about."""

    sessions: int = 0
    session_ids: list[str] = field(default_factory=list)
    tick: int = -1
    tick_ms: int = 0
    step_ms_p50: float = 0.0
    step_ms_p99: float = 0.0
    late_chunks: int = 0
    missing_chunks: int = 0
    shed_ticks: int = 0
    ticks: list[TickStats] = field(default_factory=list)
    hot: bool = False
    log_backlog: int = 0
    totals: dict[str, int] = field(default_factory=dict)
    node_id: str | None = None
