"""`Gatherer`: once per tick, one `InputChunk` per live session and one exchange for all of them.

Tick k is gathered as soon as every live call's chunk k is complete (a call's audio input that
`tells_complete` says so through `on_chunk`; one without is complete only at the deadline), and at
the latest at `clock.end(k) + grace_s` (`actors.interaction.pacer.TickPacer`) (origin time, see `protocols.clock.TickClock`): the caller's audio is
placed so that a tick's last packet normally arrives before the tick ends, so waiting for the end
itself would only add delay. Each live call's chunk k is built from its transport's audio
(flagged `missing`, with silence, when none is in; audio of an earlier tick that comes now is
dropped and counted late), its video frame, and what its `RealtimeSession` adds (text, events,
forced control). Then
`interaction.exchange(k, chunks, session_ids)` is called once, as its own task with a timeout,
so a slow or failing exchange never delays the next tick; at most `max_in_flight` run at once
(a tick beyond that is skipped). The outputs it returns are delivered to each call's session.
A loop that stalls for more than a tick skips to the newest tick that is due.

A gatherer exchanges with one interaction actor (`name`); an ingress has one per actor its calls
are placed on, each on that actor's clock as this process sees it (`clock.offset_s`, estimated
from round trips by `estimate_offset`). When the actor cannot be reached (it died), or answers
for `MISSES` ticks in a row without a call's output (it restarted empty, or let the session go),
`on_lost(session_ids, gone)` is told (`gone`: it did not answer at all), once per call until the call moves (the ingress then finds where
the session lives now: `protocols.ports.Placement.locate`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from protocols import InputChunk, OutputChunk, ProtocolError
from protocols.clock import TickClock
from protocols.ports import Interaction
from protocols.realtime_events import error_from

from actors.ingress.realtime_session import RealtimeSession
from actors.ingress.transports import TellsComplete, Transport
from actors.interaction.pacer import TickPacer

log = logging.getLogger(__name__)

COUNTS = ("ticks", "exchanges", "late_exchanges", "failed_exchanges", "skipped_ticks", "missing_chunks", "late_chunks", "lost", "early_ticks")
MISSES = 3  # exchanges in a row without a call's output before it counts as lost
UNREACHABLE = 2  # failed or timed-out exchanges in a row before the actor counts as gone


async def estimate_offset(interaction: Interaction, samples: int = 5) -> tuple[float, float]:
    """(offset_s, rtt_s): this process's wall clock minus the actor's, from the round trip with
    the shortest time of `samples` (its midpoint is the best guess of when the actor read its
    clock). (0, rtt) when the actor does not say its time."""
    best: tuple[float, float] | None = None
    for _ in range(samples):
        t1 = time.time()
        info = await interaction.clock_info()
        t2 = time.time()
        if not isinstance(info, dict) or "now" not in info:
            return 0.0, t2 - t1
        sample = ((t1 + t2) / 2 - float(info["now"]), t2 - t1)
        if best is None or sample[1] < best[1]:
            best = sample
    if best is None:
        raise ValueError(f"samples must be at least 1, got {samples}")
    return best


@dataclass
class Call:
    """A session and its transport, stepped from its `session.first_tick` on (None: not connected yet)."""

    session: RealtimeSession
    transport: Transport
    actor: str = ""  # the interaction actor stepping it (its gatherer's name; "" until placed)
    owner: str | None = None  # who may hang it up besides an API key holder (a hash of the secret that made it)
    tenant: str | None = None  # whose session quota it counts against (deployments.auth)
    early: dict[int, np.ndarray] = field(default_factory=dict)  # chunks that came before their tick was gathered
    levels: dict[int, float] = field(default_factory=dict)  # input RMS per tick, for interplay.tick

    @property
    def id(self) -> str:
        return self.session.id


class Gatherer:
    def __init__(
        self, interaction: Interaction, clock: TickClock, calls: dict[str, Call], *, grace_s: float = 0.005, exchange_timeout_s: float = 0.5,
        max_in_flight: int = 4, name: str = "interaction", on_lost: Callable[[list[str], bool], None] | None = None,
    ):
        self.interaction = interaction
        self.name = name
        self.on_lost = on_lost
        self.clock = clock
        self.calls = calls
        self.grace_s = grace_s
        self.exchange_timeout_s = exchange_timeout_s
        self.max_in_flight = max_in_flight
        self.counts = dict.fromkeys(COUNTS, 0)
        self._loop: asyncio.Task | None = None
        self._exchanges: set[asyncio.Task] = set()
        self._timing: dict[int, dict[str, float]] = {}  # tick -> wall times: ready, gathered, returned
        deadline = lambda k: clock.end(k) + grace_s
        due = lambda: clock.tick_at(clock.now() - grace_s) - 1
        self.pacer = TickPacer(deadline, due, clock.now, slack_s=clock.tick_s)  # a loop a whole tick late skips ahead
        for call in calls.values():
            self._listen(call)
        self._misses: dict[str, int] = {}  # call id -> exchanges in a row without its output
        self._failures = 0  # exchanges in a row that failed or timed out

    @property
    def in_flight(self) -> int:
        return len(self._exchanges)

    def start(self) -> None:
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._loop:
            self._loop.cancel()

    async def _run(self) -> None:
        clock = self.clock
        k = clock.current()
        while True:
            ready = await self.pacer.next(k, self._complete)
            self.counts["skipped_ticks"] += ready - k  # the loop stalled: skipped to the newest tick that is due
            k = ready
            early = clock.start(k) - clock.now()
            if early > 0:  # it was complete before it began
                # Audio placed ahead of the clock (a client running fast) must not pull the
                # exchanges ahead of the interaction actor's ticks: never gather before the tick starts.
                self.counts["early_ticks"] += 1
                await asyncio.sleep(early)
            try:
                self.gather(k)
            except Exception:
                log.exception("tick %d failed", k)
            k += 1

    def add(self, call: Call) -> None:
        """Exchange for `call` from now on; an audio input that tells when its chunks complete
        tells this gatherer."""
        self.calls[call.id] = call
        self._listen(call)

    def _listen(self, call: Call) -> None:
        audio_in = call.transport.audio_in
        if audio_in.tells_complete and isinstance(audio_in, TellsComplete):
            audio_in.on_chunk = self._chunk_done

    def _complete(self, k: int) -> bool:
        """Whether chunk k of every live call is in (or can no longer come: a later one is)."""
        live = self._live(k)
        for call in live:
            audio_in = call.transport.audio_in
            if not audio_in.tells_complete:
                return False  # no word of complete chunks: wait for the deadline
            call.early.update(audio_in.pop_ready())
            if not any(seq >= k for seq in call.early):
                return False
        return bool(live)

    def _chunk_done(self, seq: int) -> None:
        self.pacer.poke()

    def _live(self, k: int) -> list[Call]:
        return [c for c in self.calls.values() if c.session.first_tick is not None and k >= c.session.first_tick]

    def gather(self, k: int) -> None:
        """Gather chunk k of every live call and start the one exchange for them."""
        ready = time.time()
        live = self._live(k)
        if not live:
            return
        if len(self._exchanges) >= self.max_in_flight:
            self.counts["skipped_ticks"] += 1
            return
        chunks = [self.chunk(c, k) for c in live]
        task = asyncio.create_task(self._exchange(k, chunks, ready))
        self._exchanges.add(task)
        task.add_done_callback(self._exchanges.discard)
        self.counts["ticks"] += 1

    def chunk(self, call: Call, k: int) -> InputChunk:
        call.early.update(call.transport.audio_in.pop_ready(until=k))
        for seq in [seq for seq in call.early if seq < k]:
            del call.early[seq]
            self.counts["late_chunks"] += 1
        audio = call.early.pop(k, None)
        if audio is None:
            self.counts["missing_chunks"] += 1
        else:
            call.levels[k] = float(np.sqrt(np.mean(audio.astype(np.float32) ** 2)) / 32768)
        t_start = self.clock.start(k)
        extra = call.session.next_input(k, t_start)
        samples = self.clock.samples()
        try:
            return InputChunk(
                call.id, k, t_start, np.zeros(samples, np.int16) if audio is None else audio, call.transport.video(),
                extra.text, extra.events, missing=audio is None, forced=extra.forced, requests=extra.requests,
            )
        except ProtocolError as exc:
            log.warning("session %s: bad chunk %d: %s", call.id, k, exc)
            call.session.sink.send(error_from(exc))
            return InputChunk.silent(call.id, k, t_start, samples)

    async def _exchange(self, k: int, chunks: list[InputChunk], ready: float) -> None:
        gathered = time.time()
        ids = [c.session_id for c in chunks]
        try:
            outs = await asyncio.wait_for(self.interaction.exchange(k, chunks, ids), self.exchange_timeout_s)
        except Exception as exc:
            self.counts["failed_exchanges"] += 1
            log.warning("exchange with %s for tick %d (now %+.3f s from its start) failed: %r", self.name, k, self.clock.now() - self.clock.start(k), exc)
            if not isinstance(exc, ProtocolError):
                self._failures += 1
                if self._failures >= UNREACHABLE or not isinstance(exc, asyncio.TimeoutError):
                    self._lose(ids, gone=True)
            return
        self._failures = 0
        self.counts["exchanges"] += 1
        returned = time.time()
        self._timing[k] = {"ready": ready, "gathered": gathered, "returned": returned}
        self._timing.pop(k - 50, None)
        if self.clock.now() > self.clock.end(k + 1) + self.grace_s:  # after the next tick's gather
            self.counts["late_exchanges"] += 1
        answered = {getattr(out, "session_id", None) for out in outs or []}
        missed = []
        for sid in ids:
            if sid in answered:
                self._misses.pop(sid, None)
            else:
                self._misses[sid] = self._misses.get(sid, 0) + 1
                if self._misses[sid] >= MISSES:
                    missed.append(sid)
        if missed:
            self._lose(missed)
        for out in outs or []:
            call = self.calls.get(out.session_id) if isinstance(out, OutputChunk) else None
            if call is not None:
                try:
                    self.deliver(call, out)
                except Exception:
                    log.exception("session %s: delivering tick %d failed", call.id, k)

    def _lose(self, ids: list[str], gone: bool = False) -> None:
        """`gone`: the actor did not answer at all (else it answered without these sessions)."""
        lost = [sid for sid in ids if sid in self.calls]
        if lost and self.on_lost is not None:
            self.counts["lost"] += len(lost)
            self.on_lost(lost, gone)

    def forget(self, session_id: str) -> None:
        """The call left this gatherer (ended, or moved to another actor's)."""
        self.calls.pop(session_id, None)
        self._misses.pop(session_id, None)

    def deliver(self, call: Call, out: OutputChunk) -> None:
        stages = self._timing.get(out.seq, {})
        for old in [seq for seq in call.levels if seq < out.seq]:
            del call.levels[old]
        call.session.deliver(
            out, time.time(), late_s=self.clock.now() - self.clock.end(out.seq), in_level=call.levels.pop(out.seq, 0.0),
            in_source=call.transport.source(out.seq), stages=stages,
        )
