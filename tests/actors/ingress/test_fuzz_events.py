"""Property-based fuzzing of the Realtime session edge: a hostile client never ends a session
silently, never sees our internals, and never delays the other sessions.

Valid events of every client event type are generated, then mutated (wrong types, missing and
extra fields, huge strings, unicode, deep nesting, random text and bytes, binary frames) and sent
(a) to a `RealtimeSession` alone, its sink a real `WebSocketTransport` whose outbox records what
it sends, and (b) to a live in-process `Ingress` over both transports, a well-behaved session
beside the fuzzed ones. Then calls are dropped at every step, and no slot may leak. The
strategies and the reply checks are in fuzzed_events.py.
"""

import asyncio
import json
import threading
import time

import numpy as np
import pytest
from aiortc import RTCPeerConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.ingress.ingress import Ingress
from actors.ingress.realtime_session import RealtimeSession
from actors.ingress.transports import WebSocketTransport
from protocols import TickClock
from protocols.realtime_audio import encode_audio
from protocols.realtime_events import CLIENT_EVENT_TYPES
from tests.actors.ingress.fuzzed_events import MUTATIONS, SESSION, check_reply, drain, fuzzed, valid_event
from tests.actors.ingress.peers import Client, Echo
from tests.waits import TIMEOUT_S, until

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
LIVE = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
PROBE = json.dumps({"type": "input_audio_buffer.clear"})  # a valid event that is always answered
TONE = (6000 * np.sin(np.arange(64_000) / 5)).astype(np.int16)  # 4 s at 16 kHz


# --- (a) a session alone ------------------------------------------------------------------------


@pytest.mark.parametrize("how", MUTATIONS)
def test_a_session_survives_any_message(how):
    """Each kind of mutation over every event type, each on a session of a random config."""

    @FUZZ
    @given(case=fuzzed(how=how), config=SESSION)
    def check(case, config):
        _survives(*case, config)

    check()


def _survives(message, invalid: bool, config: dict) -> None:
    ws = WebSocketTransport(TickClock(0.0), max_queued=10_000)
    s = RealtimeSession(ws, {"type": "realtime", **config})
    s.created()
    drain(ws.outbox)
    s.receive(message, 1.0)  # never raises
    replies = drain(ws.outbox)
    for event in replies:
        check_reply(event)
    if invalid:
        assert [e for e in replies if e["type"] == "error"], (message[:200], replies)
    s.receive(PROBE, 2.0)  # the session goes on
    assert [e["type"] for e in drain(ws.outbox)] == ["input_audio_buffer.cleared"]
    chunk = s.next_input(0, 0.0)  # and what it forwards is small JSON
    assert len(json.dumps(chunk.events)) < 64 * 1024


@FUZZ
@given(events=st.lists(fuzzed(max_bytes=20_000), min_size=1, max_size=12))
def test_a_session_survives_any_sequence(events):
    ws = WebSocketTransport(TickClock(0.0), max_queued=10_000)
    s = RealtimeSession(ws, {"type": "realtime"})
    for i, (message, _) in enumerate(events):
        s.receive(message, float(i))
        s.next_input(i, 0.2 * i)
    s.receive(PROBE, 99.0)
    replies = drain(ws.outbox)
    for event in replies:
        check_reply(event)
    assert replies[-1]["type"] == "input_audio_buffer.cleared"


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(CLIENT_EVENT_TYPES), data=st.data())
def test_valid_events_of_every_type_get_no_error(kind, data):
    """Over a WebSocket every valid event is honoured, except what the session's state refuses
    (truncating an unknown item, cancelling nothing)."""
    event = data.draw(valid_event(kind))
    ws = WebSocketTransport(TickClock(0.0))
    s = RealtimeSession(ws, {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}})
    s.receive(json.dumps(event), 1.0)
    codes = [e["error"]["code"] for e in drain(ws.outbox) if e["type"] == "error"]
    allowed = {"conversation.item.truncate": ["item_not_found"], "response.cancel": ["response_cancel_not_active"]}.get(kind, [])
    assert codes == allowed, (event, codes)


# --- (b) a live ingress over both transports ----------------------------------------------------


class Live:
    """An ingress with a well-behaved WebSocket session (its audio kept 20 s or more ahead, so
    each of its chunks is complete) and two fuzzed sessions, one a WebSocket, one a WebRTC call."""

    async def start(self) -> "Live":
        self.echo = Echo()
        self.ingress = Ingress(self.echo, TickClock(time.time()), max_sessions=8)
        self.good, self.good_out = await self.ingress.open_websocket({"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}})
        self.feed()
        self.ws, self.ws_out = await self.ingress.open_websocket(None)
        self.rtc = Client()
        self.rtc_id = await self.rtc.connect(self.ingress)
        await self.rtc.wait_for("session.created")
        self.first = self.ingress.sessions[self.good].session.first_tick
        self.cases = 0
        self.busiest_s = 0.0  # the most CPU time the ingress's loop spent on one fuzzed message and its probe
        return self

    def feed(self) -> None:
        """The well-behaved client streams ahead: 4 s an append (128 KB of PCM16) up to 24 s."""
        audio_in = self.ingress.sessions[self.good].transport.audio_in
        while audio_in.buffered_s < 20:
            self.ingress.receive(self.good, json.dumps({"type": "input_audio_buffer.append", "audio": encode_audio(TONE)}))
        assert not [e for e in drain(self.good_out) if e["type"] == "error"]

    async def step(self, message, invalid: bool) -> None:
        self.cases += 1
        self.feed()
        # WebSocket: what the gateway does with each frame
        drain(self.ws_out)
        cpu = time.thread_time()
        self.ingress.receive(self.ws, message)
        self.ingress.receive(self.ws, PROBE)
        self.busiest_s = max(self.busiest_s, time.thread_time() - cpu)
        replies = drain(self.ws_out)
        for event in replies:
            check_reply(event)
        assert replies and replies[-1]["type"] == "input_audio_buffer.cleared", (message[:200], replies)
        if invalid:
            assert [e for e in replies if e["type"] == "error"], message[:200]
        # WebRTC: the same message on the data channel, then the probe; wait for the probe's answer
        n, seen = len(self.rtc.of_type("input_audio_buffer.cleared")), len(self.rtc.events)
        self.rtc.channel.send(message)
        self.rtc.channel.send(PROBE)
        await until(lambda: len(self.rtc.of_type("input_audio_buffer.cleared")) > n, interval=0.005, message=("the call went quiet after", message[:200]))
        replies = self.rtc.events[seen:]
        for event in replies:
            check_reply(event)
        if invalid:
            assert [e for e in replies if e["type"] == "error"], message[:200]
        await asyncio.sleep(0.02)  # the examples span a few ticks

    async def close(self) -> None:
        await self.rtc.pc.close()
        for sid in (self.good, self.ws):
            await self.ingress.close(sid)
        await until(lambda: not self.ingress.sessions, message=lambda: list(self.ingress.sessions))
        await self.ingress.shutdown()


@pytest.mark.timeout(180)
def test_a_live_ingress_survives_fuzzed_clients_and_keeps_the_others_on_time():
    """The ingress's loop runs on its own thread the whole time, as it would in its actor, so its
    ticks go on while examples are made; each example is one message on each transport."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro, timeout: float = 2 * TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    live = run(Live().start())

    @LIVE
    @given(case=fuzzed(max_bytes=200_000))  # aiortc sends at most 256 KB a message
    def fuzz(case):
        run(live.step(*case))

    try:
        fuzz()
        after = len(live.echo.calls)
        run(until(lambda: len(live.echo.calls) >= after + 2))  # the ticks go on after the last example
        stats = run(live.ingress.stats())
        calls = list(live.echo.calls)  # before the sessions close
    finally:
        run(live.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert live.cases >= 10
    # the well-behaved session was in every exchange from its first tick on, its chunks complete
    exchanged = [(tick, ids) for tick, ids in calls if tick >= live.first]
    assert len(exchanged) >= 5 and all(live.good in ids for _, ids in exchanged)
    good = [c for c in live.echo.chunks if c.session_id == live.good and c.seq <= exchanged[-1][0]]
    assert len(good) == len(exchanged) and not [c.seq for c in good if c.missing]
    assert stats["failed_exchanges"] == 0
    # No message keeps the ingress's loop from its ticks: each costs it far less than a tick of
    # CPU time (CPU time, not wall time: a loaded machine slows the loop, not the message's cost).
    assert live.busiest_s < live.ingress.clock.tick_s, live.busiest_s
    # and nothing leaked: every session left the interaction side
    assert not live.ingress.sessions and not live.echo.members
    assert sorted(live.echo.left) == sorted([live.good, live.ws, live.rtc_id])


# --- dropped connections at every step of a call --------------------------------------------------


async def _settled(ingress, echo) -> None:
    await until(lambda: not (ingress.sessions or echo.members), message=lambda: f"leaked: {list(ingress.sessions)} {echo.members}")


@pytest.mark.timeout(120)
def test_dropped_connections_leak_no_slot():
    async def main():
        echo = Echo()
        ingress = Ingress(echo, TickClock(time.time()), max_sessions=4, connect_timeout_s=1.0)
        joined = 0

        # WebRTC: the peer goes away right after its offer, after connecting, mid-event, mid-audio
        pc = RTCPeerConnection()
        pc.addTransceiver("audio")
        await pc.setLocalDescription(await pc.createOffer())
        await ingress.offer(pc.localDescription.sdp)  # and never takes the answer
        await pc.close()
        joined += 1
        for step in ("connected", "mid_event", "mid_audio"):
            client = Client()
            await client.connect(ingress)
            joined += 1
            await client.wait_for("session.created")
            if step == "mid_event":
                client.channel.send(json.dumps({"type": "session.update", "session": {"instructions": "x" * 30_000}}))
            elif step == "mid_audio":
                await client.wait_for("response.output_audio_transcript.delta")
            await client.pc.close()
        await _settled(ingress, echo)

        # WebSocket: the socket goes away right after opening, mid-event, mid-audio
        for step in ("opened", "mid_event", "mid_audio"):
            sid, outbox = await ingress.open_websocket(None)
            joined += 1
            if step == "mid_event":
                ingress.receive(sid, '{"type": "session.update", "session": {"instr')
            elif step == "mid_audio":
                ingress.receive(sid, json.dumps({"type": "input_audio_buffer.append", "audio": encode_audio(np.ones(48_000, np.int16))}))
                await until(lambda: any(c.session_id == sid and not c.missing for c in echo.chunks))  # chunks of it were exchanged
            await ingress.close(sid)
            while (await asyncio.wait_for(outbox.get(), TIMEOUT_S)) is not None:  # the end mark comes
                pass
        await _settled(ingress, echo)

        assert len(echo.left) == joined and len(set(echo.left)) == joined
        stats = await ingress.stats()
        assert stats["sessions"] == 0
        client = Client()  # every slot is free again
        await client.connect(ingress)
        await client.wait_for("session.created")
        await client.pc.close()
        await _settled(ingress, echo)
        await ingress.shutdown()

    asyncio.run(main())
