"""Property-based fuzzing of the Realtime session edge: a hostile client never ends a session
silently, never sees our internals, and never delays the other sessions.

Valid events of every client event type are generated, then mutated (wrong types, missing and
extra fields, huge strings, unicode, deep nesting, random text and bytes, binary frames) and sent
(a) to a `RealtimeSession` alone, its sink a real `WebSocketTransport` whose outbox records what
it sends, and (b) to a live in-process `Ingress` over both transports, a well-behaved session
beside the fuzzed ones. Then calls are dropped at every step, and no slot may leak.
"""

import asyncio
import json
import re
import string
import threading
import time

import numpy as np
import pytest
from aiortc import RTCPeerConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from actors.ingress.ingress import Ingress
from actors.ingress.realtime_session import RealtimeSession
from actors.ingress.transports import WebSocketTransport
from protocols import TickClock
from protocols.realtime import CLIENT_EVENT_TYPES, INTERPLAY_EVENT_TYPES, SessionConfig, encode_audio
from tests.actors.ingress.peers import Client, Echo
from tests.waits import TIMEOUT_S, until

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
LIVE = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
openai_server_event = TypeAdapter(RealtimeServerEvent)

# --- valid events, one strategy per client event type ----------------------------------------------

ID = st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=12)
TEXT = st.text(max_size=40)
FORMAT = st.sampled_from([
    {"type": "audio/pcm", "rate": 16000}, {"type": "audio/pcm", "rate": 24000}, {"type": "audio/pcm", "rate": 48000},
    {"type": "audio/pcm"}, {"type": "audio/pcmu"}, {"type": "audio/pcma"},
])
TOOL = st.fixed_dictionaries(
    {"type": st.just("function"), "name": st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)},
    optional={"description": TEXT, "parameters": st.just({"type": "object", "properties": {"q": {"type": "string"}}})},
)
TOOLS = st.lists(TOOL, max_size=2)
CHOICE = st.sampled_from(["auto", "none", "required", {"type": "function", "name": "f"}, {"type": "mcp", "server_label": "s"}])
SESSION = st.fixed_dictionaries({}, optional={
    "type": st.just("realtime"), "instructions": TEXT, "tools": TOOLS, "tool_choice": CHOICE,
    "tracing": st.sampled_from(["auto", {"workflow_name": "w"}, {"group_id": "g", "metadata": {"k": "v"}}]),
    "truncation": st.sampled_from(["auto", "disabled", {"type": "retention_ratio", "retention_ratio": 0.5}]),
    "max_output_tokens": st.sampled_from([100, "inf"]),
    "audio": st.fixed_dictionaries({}, optional={
        "input": st.fixed_dictionaries({}, optional={"format": FORMAT, "turn_detection": st.sampled_from([None, {"type": "server_vad", "threshold": 0.5}, {"type": "semantic_vad", "eagerness": "low"}])}),
        "output": st.fixed_dictionaries({}, optional={"format": FORMAT, "voice": st.sampled_from(["alloy", "marin"])}),
    }),
    "interplay": st.fixed_dictionaries({}, optional={"tick_events": st.booleans()}),
})
PCM = st.lists(st.integers(-32768, 32767), min_size=1, max_size=400).map(lambda xs: encode_audio(np.array(xs, np.int16)))
ITEM = st.one_of(
    st.fixed_dictionaries({"type": st.just("message"), "role": st.just("user"), "content": st.lists(st.fixed_dictionaries({"type": st.just("input_text"), "text": TEXT}), max_size=2)}),
    st.fixed_dictionaries({"type": st.just("message"), "role": st.just("system"), "content": st.lists(st.fixed_dictionaries({"type": st.just("input_text"), "text": TEXT}), max_size=1)}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": ID, "output": TEXT}),
    st.fixed_dictionaries({"type": st.just("message"), "role": st.just("user"), "content": st.just([{"type": "input_audio", "audio": "AAAA"}])}),
)
RESPONSE = st.fixed_dictionaries({}, optional={"instructions": TEXT, "tools": TOOLS, "tool_choice": CHOICE, "output_modalities": st.just(["audio"])})

FIELDS = {  # type -> (required fields, optional fields), as strategies
    "session.update": ({"session": SESSION}, {}),
    "input_audio_buffer.append": ({"audio": PCM}, {}),
    "input_audio_buffer.commit": ({}, {}),
    "input_audio_buffer.clear": ({}, {}),
    "conversation.item.create": ({"item": ITEM}, {"previous_item_id": ID}),
    "conversation.item.truncate": ({"item_id": ID, "content_index": st.just(0), "audio_end_ms": st.integers(0, 10_000)}, {}),
    "conversation.item.delete": ({"item_id": ID}, {}),
    "response.create": ({}, {"response": RESPONSE}),
    "response.cancel": ({}, {"response_id": ID}),
    "output_audio_buffer.clear": ({}, {}),
}
assert set(FIELDS) == set(CLIENT_EVENT_TYPES)  # every client event type of the API is fuzzed
# What a wrong type is, per required field: a JSON value pydantic never coerces to the right one.
NOT_STR, NOT_INT, NOT_OBJECT = [[1], {"x": 1}, 5], [[1], {"x": 1}, "abc"], [[1], 5, "abc"]
WRONG = {"audio": NOT_STR, "item_id": NOT_STR, "content_index": NOT_INT, "audio_end_ms": NOT_INT, "item": NOT_OBJECT, "session": NOT_OBJECT, "event_id": NOT_STR, "type": [5, None, [1]]}


@st.composite
def valid_event(draw, kind=None) -> dict:
    kind = kind or draw(st.sampled_from(CLIENT_EVENT_TYPES))
    required, optional = FIELDS[kind]
    event = {"type": kind, **draw(st.fixed_dictionaries(required, optional={**optional, "event_id": ID}))}
    return event


def deep(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a": ' * depth + "1" + "}" * depth


def _paths(value, prefix=()):
    """Every (path, value) inside a JSON value."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replace(event: dict, path: tuple, new) -> dict:
    event = json.loads(json.dumps(event))
    node = event
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return event


def _is_event(message) -> bool:
    """Whether random text or bytes happen to be a JSON object of a known event type."""
    try:
        value = json.loads(message)
    except Exception:
        return False
    return isinstance(value, dict) and value.get("type") in CLIENT_EVENT_TYPES


MUTATIONS = (
    "as_is", "binary", "extra_field", "drop_required", "wrong_type", "nested_wrong_type", "bad_type_name", "deep",
    "huge_field", "huge_value", "empty_value", "unicode", "lone_surrogate", "random_value", "random_text", "random_bytes", "truncated",
)


@st.composite
def fuzzed(draw, max_bytes: int = 200_000, how: str | None = None) -> tuple[str | bytes, bool]:
    """A client message and whether it is surely invalid (then it must get an error event):
    a valid event of any type, mutated `how` (any way if None)."""
    event = draw(valid_event())
    text = json.dumps(event)
    how = how or draw(st.sampled_from(MUTATIONS))
    required = list(FIELDS[event["type"]][0])
    if how == "as_is":
        return text, False
    if how == "binary":  # a binary frame holding the same JSON: accepted like text
        return text.encode(draw(st.sampled_from(["utf-8", "utf-16"]))), False
    if how == "extra_field":
        key = draw(st.text(min_size=1, max_size=20).filter(lambda k: k not in event and k not in ("type", "event_id", *FIELDS[event["type"]][1])))
        return json.dumps({**event, key: draw(st.one_of(TEXT, st.integers(), st.none()))}), True
    if how == "drop_required" and required:
        field = draw(st.sampled_from(required))
        return json.dumps({k: v for k, v in event.items() if k != field}), True
    if how in ("wrong_type", "drop_required"):
        field = draw(st.sampled_from([*required, "event_id", "type"]))
        return json.dumps({**event, field: draw(st.sampled_from(WRONG[field]))}), True
    if how == "nested_wrong_type":  # a string where a list or object goes, a list where a string goes, inside the event
        paths = [(p, v) for p, v in _paths(event) if len(p) > 1 and isinstance(v, (str, list, dict)) and p[-1] not in ("tool_choice", "parameters")]
        if not paths:
            return json.dumps({**event, "event_id": [1]}), True
        path, value = draw(st.sampled_from(paths))
        return json.dumps(_replace(event, path, [value] if isinstance(value, str) else "abc")), False  # often invalid, not always
    if how == "bad_type_name":
        kind = draw(st.text(max_size=30).filter(lambda k: k not in CLIENT_EVENT_TYPES))
        return json.dumps({**event, "type": kind}), True
    if how == "deep":  # nested too deep, at the top or inside one of the event's objects
        depth = draw(st.sampled_from([33, 64, 128, 256, 512, 1000, 5000, 25_000]) | st.integers(33, 25_000))
        nest = deep(min(depth, max_bytes // 8), draw(st.sampled_from(["list", "dict"])))
        objects = [p for p, v in _paths(event) if isinstance(v, dict)]
        where = draw(st.sampled_from(objects))
        return json.dumps(_replace(event, (*where, "deep"), "@DEEP@") if where else {**event, "deep": "@DEEP@"}).replace('"@DEEP@"', nest), True
    if how == "huge_field":
        return json.dumps({**event, "pad": "x" * draw(st.integers(min(70_000, max_bytes), max_bytes))}), True
    if how == "huge_value":  # within the limit or not, valid or not
        strings = [p for p, v in _paths(event) if isinstance(v, str) and p != ("type",)]
        if not strings:
            return text, False
        return json.dumps(_replace(event, draw(st.sampled_from(strings)), "A" * draw(st.integers(1_000, max_bytes)))), False
    if how == "empty_value":  # "", [] or {} where something was
        values = [(p, v) for p, v in _paths(event) if p and p != ("type",) and isinstance(v, (str, list, dict))]
        if not values:
            return text, False
        path, value = draw(st.sampled_from(values))
        return json.dumps(_replace(event, path, type(value)())), False
    if how == "unicode":
        strings = [p for p, v in _paths(event) if isinstance(v, str) and p != ("type",)]
        if not strings:
            return text, False
        return json.dumps(_replace(event, draw(st.sampled_from(strings)), draw(st.text(min_size=1, max_size=50))), ensure_ascii=draw(st.booleans())), False
    if how == "lone_surrogate":
        return json.dumps({**event, "event_id": "id\ud800"}), True
    if how == "random_value":
        path = draw(st.sampled_from([p for p, _ in _paths(event) if p]))
        value = draw(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=8))
        return json.dumps(_replace(event, path, value)), path == ("type",) and value not in CLIENT_EVENT_TYPES
    if how == "random_text":
        message = draw(st.text(max_size=200))
        return message, not _is_event(message)
    if how == "random_bytes":
        message = draw(st.binary(max_size=200))
        return message, not _is_event(message)
    cut = draw(st.integers(1, len(text) - 1))  # truncated: a frame cut mid-event
    return text[:cut], True


# --- what every reply must be -------------------------------------------------------------------

INTERNALS = re.compile(r"Traceback|File \"|\.py\b|/work/|/usr/|site-packages|0x[0-9a-f]{6,}")


def check_reply(event: dict) -> None:
    """A server event a client can parse, and an error that says nothing of our insides."""
    if event["type"] in ("session.created", "session.updated"):
        SessionConfig.model_validate(event["session"])
    elif event["type"] not in INTERPLAY_EVENT_TYPES:
        openai_server_event.validate_python(event)
    if event["type"] == "error":
        assert not INTERNALS.search(json.dumps(event["error"])), event
        assert event["error"]["code"] != "server_error", "a client's event made us fail"


def _strict(name):
    raise AssertionError(f"{name} is not JSON: a browser's JSON.parse refuses it")


def drain(outbox: asyncio.Queue) -> list[dict]:
    """What a WebSocket session sent, parsed as strictly as a browser would."""
    out = []
    while not outbox.empty():
        text = outbox.get_nowait()
        if text is not None:
            out.append(json.loads(text, parse_constant=_strict))
    return out


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
