"""Gatherer alone: when tick k is taken, with fake calls and a fake interaction port.

Tick k is taken as soon as every live call's chunk k is complete (audio inputs that say so
through `on_chunk`), else at the deadline `clock.end(k) + grace_s`. Times are wall-clock, so
ticks are long (1 s): the test starts in the first hundredth of a tick, a deadline far off is
one only the early path can beat, and one held to its deadline is taken no sooner. How soon after
it a loaded machine gets round to it is not checked (a tick it gets to more than a tick late is
skipped, which the `tick == k` checks would show).
"""

import asyncio
import time

import numpy as np
import pytest

from actors.ingress.audio_chunker import AudioChunker
from actors.ingress.buffered_audio import BufferedAudioInput
from actors.ingress.gatherer import Call, Gatherer
from actors.ingress.playout import EventAudioSink
from actors.ingress.realtime_session import RealtimeSession
from protocols import OutputChunk
from protocols.clock import TickClock
from tests.waits import TIMEOUT_S, until

TICK_MS = 1000


class Chunker:
    """An AudioChunker's face to the gatherer: chunks complete only when the test says so."""

    tells_complete = True

    def __init__(self, clock: TickClock):
        self.clock = clock
        self.on_chunk = None
        self._ready: list[tuple[int, np.ndarray]] = []

    def complete(self, k: int) -> np.ndarray:
        audio = np.full(self.clock.samples(), 1000 + k, np.int16)
        self._ready.append((k, audio))
        if self.on_chunk is not None:
            self.on_chunk(k)
        return audio

    def pop_ready(self, until=None):
        out, self._ready = self._ready, []
        return out


class Transport:
    """A transport (and the session's sink) with a given audio input and no video."""

    max_event_bytes = 4096

    def __init__(self, audio_in):
        self.audio_in = audio_in
        self.audio_out = EventAudioSink(24_000)
        self.events: list[dict] = []

    def send(self, event):
        self.events.append(event)

    def video(self):
        return None

    def source(self, seq):
        return None

    def append_audio(self, audio_b64, rate, t_arrival): ...
    def clear_input(self): ...
    def audio_written(self, response_id, item_id): ...
    def playout_started(self, response_id): ...
    def playout_done(self, response_id): ...
    def playout_cleared(self, response_id): ...

    def ticks(self) -> list[dict]:
        return [e for e in self.events if e["type"] == "interplay.tick"]


class Interaction:
    """The port's `exchange`: records each tick, when (origin time) it came and its chunks."""

    def __init__(self, clock: TickClock):
        self.clock = clock
        self.exchanges: asyncio.Queue = asyncio.Queue()

    async def exchange(self, tick, chunks, session_ids):
        assert [c.session_id for c in chunks] == list(session_ids)
        self.exchanges.put_nowait((tick, self.clock.now(), {c.session_id: c for c in chunks}))
        return [OutputChunk(c.session_id, c.seq, c.t_start, np.zeros(len(c.audio), np.int16), controls=["silent"]) for c in chunks]


def clock_in_a_fresh_tick() -> TickClock:
    """A clock whose current tick has just begun: the whole tick is left before it ends."""
    return TickClock(time.time() - TICK_MS / 100_000, TICK_MS)


def call(audio_in, first_tick: int) -> Call:
    transport = Transport(audio_in)
    session = RealtimeSession(transport, {"type": "realtime", "interplay": {"tick_events": True}})
    session.first_tick = first_tick
    return Call(session, transport)


async def hooked(audio_in) -> None:
    """Until the gatherer listens to this audio input: it is waiting for its chunk (it looks at
    the calls in turn, the next one once this one's chunk is in)."""
    for _ in range(10_000):
        if audio_in.on_chunk is not None:
            return
        await asyncio.sleep(0)
    raise AssertionError("the gatherer never hooked on_chunk")


def setup(clock: TickClock, grace_ticks: float, *audio_ins) -> tuple[int, Interaction, Gatherer, list[Call]]:
    """One call per audio input, live from the current tick k; a gatherer whose grace is in ticks."""
    k = clock.current()
    calls = [call(a, k) for a in audio_ins]
    interaction = Interaction(clock)
    gatherer = Gatherer(interaction, clock, {c.id: c for c in calls}, grace_s=grace_ticks * clock.tick_s)
    return k, interaction, gatherer, calls


@pytest.mark.timeout(180)
def test_a_tick_whose_chunks_are_all_complete_is_exchanged_at_once():
    async def main():
        clock = clock_in_a_fresh_tick()
        a, b = Chunker(clock), Chunker(clock)
        k, interaction, gatherer, calls = setup(clock, 20, a, b)  # the deadline is 21 ticks off
        deadline = clock.end(k) + gatherer.grace_s
        gatherer.start()
        await hooked(a)
        audio_a = a.complete(k)
        await hooked(b)  # the gatherer took note of a's chunk and waits for b's
        await asyncio.sleep(0)
        assert interaction.exchanges.empty()  # one call's chunk alone does not make the tick
        audio_b = b.complete(k)
        tick, at, chunks = await asyncio.wait_for(interaction.exchanges.get(), TIMEOUT_S)
        gatherer.stop()
        assert tick == k and at < deadline  # 21 ticks early: only a complete tick is taken before its deadline
        assert not any(c.missing for c in chunks.values())
        assert np.array_equal(chunks[calls[0].id].audio, audio_a) and np.array_equal(chunks[calls[1].id].audio, audio_b)
        assert gatherer.counts["missing_chunks"] == 0
        await until(calls[0].transport.ticks)  # the outputs are delivered; interplay.tick says when the tick was taken
        at = calls[0].transport.ticks()[0]["at"]
        assert at["ready"] <= at["gathered"] <= at["returned"] <= at["written"]

    asyncio.run(main())


@pytest.mark.timeout(180)
def test_a_later_chunk_means_the_earlier_one_cannot_come():
    async def main():
        clock = clock_in_a_fresh_tick()
        a = Chunker(clock)
        k, interaction, gatherer, calls = setup(clock, 20, a)
        gatherer.start()
        await hooked(a)
        a.complete(k + 1)  # chunk k was skipped (the caller's audio jumped past it)
        tick, at, chunks = await asyncio.wait_for(interaction.exchanges.get(), TIMEOUT_S)
        assert tick == k and at < clock.end(k) + gatherer.grace_s and chunks[calls[0].id].missing
        tick, at, chunks = await asyncio.wait_for(interaction.exchanges.get(), TIMEOUT_S)
        gatherer.stop()
        assert tick == k + 1 and not chunks[calls[0].id].missing

    asyncio.run(main())


@pytest.mark.timeout(180)
def test_a_real_chunker_wakes_the_gatherer_as_it_completes_a_chunk():
    async def main():
        clock = clock_in_a_fresh_tick()
        chunker = AudioChunker(clock, jitter_ms=40.0)
        k, interaction, gatherer, calls = setup(clock, 20, chunker)
        gatherer.start()
        await hooked(chunker)
        chunker.push(np.full(clock.samples(), 3000, np.int16), 16_000)  # a tick of audio, placed to end as tick k ends
        tick, at, chunks = await asyncio.wait_for(interaction.exchanges.get(), TIMEOUT_S)
        gatherer.stop()
        assert tick == k and at < clock.end(k) + gatherer.grace_s
        chunk = chunks[calls[0].id]
        assert not chunk.missing and chunk.audio[-1] == 3000

    asyncio.run(main())


@pytest.mark.timeout(180)
def test_a_missing_chunk_holds_the_tick_to_its_deadline_and_is_flagged():
    async def main():
        clock = clock_in_a_fresh_tick()
        a, b = Chunker(clock), Chunker(clock)
        k, interaction, gatherer, calls = setup(clock, 0.2, a, b)
        deadline = clock.end(k) + gatherer.grace_s
        gatherer.start()
        await hooked(a)
        audio_a = a.complete(k)  # b's chunk k never comes
        await hooked(b)
        tick, at, chunks = await asyncio.wait_for(interaction.exchanges.get(), TIMEOUT_S)
        gatherer.stop()
        assert tick == k and deadline <= at
        assert not chunks[calls[0].id].missing and np.array_equal(chunks[calls[0].id].audio, audio_a)
        assert chunks[calls[1].id].missing and not chunks[calls[1].id].audio.any()
        assert gatherer.counts["missing_chunks"] == 1

    asyncio.run(main())


@pytest.mark.timeout(180)
@pytest.mark.parametrize("with_webrtc", [False, True])
def test_a_call_without_on_chunk_is_gathered_at_the_deadline(with_webrtc):
    async def main():
        clock = clock_in_a_fresh_tick()
        buffered = BufferedAudioInput(clock)  # a WebSocket call's input: no word of complete chunks
        assert not hasattr(buffered, "on_chunk")
        said = np.full(clock.samples(), 2000, np.int16)
        buffered.push(said, 16_000)  # a whole chunk is in already
        a = Chunker(clock)
        k, interaction, gatherer, calls = setup(clock, 0.2, buffered, *([a] if with_webrtc else []))
        deadline = clock.end(k) + gatherer.grace_s
        if with_webrtc:
            a.complete(k)  # complete from the start: the WebSocket call alone holds the tick
        gatherer.start()
        tick, at, chunks = await asyncio.wait_for(interaction.exchanges.get(), TIMEOUT_S)
        gatherer.stop()
        assert tick == k and deadline <= at
        assert not any(c.missing for c in chunks.values()) and len(chunks) == len(calls)
        assert np.array_equal(chunks[calls[0].id].audio, said)

    asyncio.run(main())
