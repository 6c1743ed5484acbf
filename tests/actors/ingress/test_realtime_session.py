"""RealtimeSession alone: client events and outputs in, server events and model inputs out.

No transport, no network, no clock: a recording sink stands in for the transport, its audio
queue plays only when the test says so, and times are passed in."""

import json

import numpy as np
import pytest
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from actors.ingress.realtime_session import FORCE_S, RealtimeSession
from protocols.requests import TaskRequest
from protocols import OutputChunk, ProtocolError
from protocols.realtime import encode_pcm16

OUT_RATE = 48_000
OUT_FRAME = 960  # samples in a 20 ms frame of the outgoing stream
TONE = (8000 * np.sin(np.arange(3200) / 5)).astype(np.int16)
SILENCE = np.zeros(3200, np.int16)
openai_server_event = TypeAdapter(RealtimeServerEvent)


class FakeAudio:
    """An audio queue in 48 kHz samples that plays only when `play(ms)` is called."""

    def __init__(self):
        self.written = 0
        self.position = 0

    @property
    def queued_ms(self) -> float:
        return (self.written - self.position) * 1000 / OUT_RATE

    @property
    def next_play_sample(self) -> int:
        return self.written

    def write(self, samples):
        self.written += len(samples) * 3

    def clear(self) -> float:
        dropped, self.position = self.queued_ms, self.written
        return dropped

    def play(self, ms: float) -> None:
        self.position = min(self.written, self.position + int(ms * OUT_RATE / 1000))

    def time_of(self, sample):
        return None


class Sink:
    """Records what the session sends; `playout` records the transport-specific calls."""

    max_event_bytes = 4096

    def __init__(self):
        self.events: list[dict] = []
        self.playout: list[tuple[str, str | None]] = []
        self.appended: list[tuple[str, int]] = []
        self.audio_out = FakeAudio()

    def send(self, event):
        self.events.append(json.loads(json.dumps(event)))  # what a client would parse

    def append_audio(self, audio_b64, fmt, t_arrival):
        self.appended.append((audio_b64, fmt))

    def clear_input(self):
        self.appended.clear()

    def audio_written(self, response_id, item_id):
        self.playout.append(("written", response_id))

    def playout_started(self, response_id):
        self.playout.append(("started", response_id))

    def playout_done(self, response_id):
        self.playout.append(("done", response_id))

    def playout_cleared(self, response_id):
        self.playout.append(("cleared", response_id))

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of_type(self, kind):
        return [e for e in self.events if e["type"] == kind]

    def errors(self) -> list[str]:
        return [e["error"]["code"] for e in self.of_type("error")]


def session(config=None, **kw) -> tuple[RealtimeSession, Sink]:
    sink = Sink()
    return RealtimeSession(sink, config or {"type": "realtime"}, **kw), sink


def out(s, seq, controls, text="", audio=TONE):
    return OutputChunk(s.id, seq, seq * 0.2, audio, text=text, controls=controls)


def send(s, event, now=0.0):
    s.receive(json.dumps(event), now)


def forced(s, seqs):
    return [s.next_input(k, k * 0.2).forced for k in seqs]


def test_response_create_forces_speak_until_the_model_yields():
    s, sink = session()
    assert forced(s, [0, 1]) == [None, None]
    send(s, {"type": "response.create"})
    assert forced(s, [2, 3, 4]) == ["speak", "speak", "speak"]
    s.deliver(out(s, 1, ["yield"], audio=SILENCE), 0.0)  # an output from before the request: it goes on
    assert forced(s, [5]) == ["speak"]
    s.deliver(out(s, 2, ["speak"]), 0.0)
    s.deliver(out(s, 3, ["yield"], audio=SILENCE), 0.0)  # the model yielded within the response
    assert forced(s, [6, 7]) == [None, None]
    assert sink.errors() == []


def test_response_create_lasts_at_most_force_s():
    s, _ = session()
    send(s, {"type": "response.create"})
    ticks = int(FORCE_S / 0.2)
    held = forced(s, range(10, 10 + ticks + 3))
    assert held[:ticks] == ["speak"] * ticks and held[ticks:] == [None, None, None]


def test_response_cancel_holds_silent_for_one_chunk():
    s, sink = session()
    send(s, {"type": "response.cancel", "event_id": "c1"})  # nothing to cancel: an error, nothing forced
    assert sink.of_type("error")[-1]["error"]["code"] == "response_cancel_not_active"
    assert sink.of_type("error")[-1]["error"]["event_id"] == "c1"
    assert forced(s, [0]) == [None]
    send(s, {"type": "response.create"})
    assert forced(s, [1]) == ["speak"]
    send(s, {"type": "response.cancel"})
    assert forced(s, [2, 3, 4]) == ["silent", None, None]
    assert sink.errors() == ["response_cancel_not_active"]


def test_speaking_runs_become_responses_and_truncate_interrupts():
    s, sink = session()
    for seq, controls, text in [(0, ["speak"], "hel"), (1, ["speak"], "lo")]:
        s.deliver(out(s, seq, controls, text), 0.0)
    rid = sink.of_type("response.created")[0]["response"]["id"]
    item_id = sink.of_type("response.output_item.added")[0]["item"]["id"]
    assert sink.playout == [("started", rid), ("written", rid), ("written", rid)]
    assert sink.audio_out.queued_ms == pytest.approx(460, abs=1)  # 60 ms margin + two chunks
    sink.audio_out.play(260)  # margin + 200 ms of the item played
    send(s, {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 300})
    assert sink.of_type("error")[-1]["error"]["param"] == "audio_end_ms"  # beyond what was played
    send(s, {"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0, "audio_end_ms": 0})
    assert sink.errors() == ["invalid_value", "item_not_found"]
    send(s, {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 150})
    assert sink.types()[-5:] == [
        "response.output_audio_transcript.done", "response.output_audio.done", "response.output_item.done", "response.done",
        "conversation.item.truncated",
    ]
    done = sink.of_type("response.done")[-1]["response"]
    assert done["status"] == "cancelled" and done["output"][0]["status"] == "incomplete"
    assert sink.of_type("conversation.item.truncated")[-1]["audio_end_ms"] == 150
    assert sink.playout[-1] == ("cleared", rid) and sink.audio_out.queued_ms == 0

    # muted: the model still speaks, but nothing plays and no response starts until it yields
    written = sink.audio_out.written
    n = len(sink.events)
    s.deliver(out(s, 2, ["speak"], "more"), 0.0)
    assert sink.audio_out.written == written and len(sink.events) == n
    s.deliver(out(s, 3, ["yield"], audio=SILENCE), 0.0)
    s.deliver(out(s, 4, ["speak"], "again"), 0.0)
    assert len(sink.of_type("response.created")) == 2 and sink.audio_out.written > written
    s.deliver(out(s, 5, ["silent"], audio=SILENCE), 0.0)
    done = sink.of_type("response.done")[-1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["transcript"] == "again"
    assert sink.playout[-1] == ("done", done["id"])


def test_stale_outputs_are_ignored():
    s, sink = session()
    s.deliver(out(s, 5, ["speak"], "new"), 0.0)
    s.deliver(out(s, 4, ["speak"], "old"), 0.0)
    assert [e["delta"] for e in sink.of_type("response.output_audio_transcript.delta")] == ["new"]


def test_typed_text_and_events_reach_the_next_chunk():
    s, sink = session({"type": "realtime", "instructions": "be brief"})
    first = s.next_input(0, 0.0)
    assert first.events == [{"type": "session.update", "session": {"instructions": "be brief"}}]
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello there"}]}
    send(s, {"type": "conversation.item.create", "item": item})
    send(s, {"type": "response.create"})
    nxt = s.next_input(1, 0.2)
    assert nxt.text == "hello there" and nxt.forced == "speak"
    assert [e["type"] for e in nxt.events] == ["conversation.item.create", "response.create"]
    assert nxt.requests == [TaskRequest()]  # what the interaction side acts on, typed
    assert s.next_input(2, 0.4).text == "" and s.next_input(3, 0.6).events == []
    added = sink.of_type("conversation.item.added")[0]["item"]
    assert added["id"].startswith("item") and added["content"][0]["text"] == "hello there"
    assert sink.types() == ["conversation.item.added", "conversation.item.done"]
    sink.max_event_bytes = 64 * 1024
    send(s, {"type": "conversation.item.create", "item": {**item, "content": [{"type": "input_text", "text": "x" * 5000}]}})
    assert sink.errors() == ["invalid_value"] and s.next_input(4, 0.8).text == ""


def test_bad_events_get_errors_and_the_session_goes_on():
    s, sink = session()
    s.receive("not json", 0.0)
    send(s, {"type": "no.such.event", "event_id": "e2"})
    send(s, {"type": "session.update", "session": {"audio": {"output": {"speed": 9}}}})
    send(s, {"type": "conversation.item.create", "item": {"type": "message", "role": "robot"}})
    s.receive(json.dumps({"type": "session.update", "pad": "y" * 5000}), 0.0)  # over the sink's limit
    send(s, {"type": "input_audio_buffer.append", "audio": "AA==", "junk": 1})
    assert sink.errors() == ["invalid_json", "unknown_event", "invalid_value", "invalid_value", "message_too_large", "unknown_parameter"]
    assert sink.of_type("error")[1]["error"]["event_id"] == "e2"
    assert s.next_input(0, 0.0).events == []  # nothing bad was forwarded
    send(s, {"type": "session.update", "session": {"instructions": "be brief", "interplay": {"tick_events": True}}})
    updated = sink.of_type("session.updated")[-1]["session"]
    assert updated["instructions"] == "be brief" and updated["interplay"]["tick_events"] is True
    s.deliver(out(s, 0, ["speak"], "hi"), 1.0, late_s=0.01, in_level=0.5, in_source={"end": 9600}, stages={"gathered": 0.9})
    tick = sink.of_type("interplay.tick")[-1]
    assert tick["tick"] == 0 and tick["in_level"] == 0.5 and tick["out_level"] > 0.1
    assert tick["at"] == {"gathered": 0.9, "written": 1.0, "plays": None} and tick["in"] == {"end": 9600}


def test_input_audio_and_buffer_events_go_to_the_transport():
    s, sink = session({"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}})
    send(s, {"type": "input_audio_buffer.append", "audio": encode_pcm16(TONE[:800])})
    assert sink.appended == [(encode_pcm16(TONE[:800]), ("audio/pcm", 16000))]
    assert s.next_input(0, 0.0).events[1:] == []  # audio rides the chunk itself, not an event
    send(s, {"type": "input_audio_buffer.clear"})
    assert sink.appended == [] and sink.types() == ["input_audio_buffer.cleared"]


def test_a_transport_refusal_is_an_error_event():
    s, sink = session()

    def refuse(audio, rate, t):
        raise ProtocolError("not here", "unsupported_event", "type")

    sink.append_audio = refuse
    send(s, {"type": "input_audio_buffer.append", "audio": "AA==", "event_id": "a1"})
    assert sink.of_type("error")[-1]["error"] == {"type": "invalid_request_error", "code": "unsupported_event", "message": "not here", "param": "type", "event_id": "a1"}


def test_every_server_event_is_one_the_openai_client_parses():
    s, sink = session()
    send(s, {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
    for seq in range(3):
        s.deliver(out(s, seq, ["speak"], "la "), 0.0)
    sink.audio_out.play(100)
    item_id = sink.of_type("response.output_item.added")[0]["item"]["id"]
    send(s, {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 20})
    s.deliver(out(s, 3, ["yield"], audio=SILENCE), 0.0)
    s.deliver(out(s, 4, ["speak"], "again"), 0.0)
    s.deliver(out(s, 5, ["silent"], audio=SILENCE), 0.0)
    send(s, {"type": "conversation.item.delete", "item_id": item_id})
    send(s, {"type": "bogus"})
    assert len(set(sink.types())) >= 10
    for event in sink.events:
        parsed = openai_server_event.validate_python(event)
        assert parsed.type == event["type"]


def test_prebuffer_adapts_to_how_steadily_outputs_arrive():
    s, _ = session(prebuffer_ms=60.0)
    assert s.prebuffer() == 60.0  # no history yet: the configured margin
    s.lateness.extend(0.030 + 0.004 * (i % 3) for i in range(20))  # steady: within 8 ms
    assert 10.0 <= s.prebuffer() <= 20.0
    s.lateness.extend([0.030, 0.200] * 20)  # erratic: capped at the configured margin
    assert s.prebuffer() == 60.0


@pytest.mark.timeout(20)
def test_interplay_tick_out_sample_is_where_the_ticks_audio_plays():
    import asyncio

    from actors.ingress.playout import EventAudioSink, PacedAudioTrack
    from tests.actors.ingress.test_playout import RESAMPLER_DELAY, onset

    rng = np.random.default_rng(1)
    speech = [rng.integers(-8000, 8000, 3200).astype(np.int16) for _ in range(2)]  # two ticks of a response
    config = {"type": "realtime", "interplay": {"tick_events": True}}

    async def main():
        track = PacedAudioTrack()
        frames = [await track.recv()]  # live: the response is placed on its frames
        s, sink = session(config)
        sink.audio_out = track
        now = track.time_of(track.next_play_sample) + 0.005
        for seq, audio in enumerate(speech):
            s.deliver(out(s, seq, ["speak"], audio=audio), now + 0.2 * seq)
        first, second = (e["out_sample"] for e in sink.of_type("interplay.tick"))
        plays = sink.of_type("interplay.tick")[0]["at"]["plays"]
        assert first % OUT_FRAME == 0 and plays == track.time_of(first) >= now + s.prebuffer() / 1000  # after the lead-in
        assert second == first + 3 * len(speech[0])
        while track.queued_ms:
            frames.append(await track.recv())
        track.stop()
        stream = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
        for sample, audio in [(first, speech[0]), (second, speech[1])]:
            assert sample <= onset(stream, audio, after=sample - RESAMPLER_DELAY) <= sample + RESAMPLER_DELAY

    asyncio.run(main())

    s, sink = session(config)  # the client plays it: the lead-in is the margin, queued
    sink.audio_out = EventAudioSink(24_000)
    s.deliver(out(s, 0, ["speak"], audio=speech[0]), 0.0)
    (tick,) = sink.of_type("interplay.tick")
    assert tick["out_sample"] == sink.audio_out.written - 3 * len(speech[0]) == round(s.prebuffer() * OUT_RATE / 1000)


# --- a hostile client ---------------------------------------------------------------------------


def internals(text: str) -> bool:
    """Whether an error message shows our insides: a traceback, a source path, an address."""
    import re

    return bool(re.search(r"Traceback|File \"|\.py\b|/work/|/usr/|site-packages|0x[0-9a-f]{6,}", text))


def answered(s, sink) -> bool:
    """Whether the session still answers a valid event."""
    n = len(sink.of_type("conversation.item.deleted"))
    send(s, {"type": "conversation.item.delete", "item_id": "item_probe"})
    return len(sink.of_type("conversation.item.deleted")) == n + 1


@pytest.mark.parametrize(
    "message",
    [
        '{"type": "session.update", "session": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}",  # RecursionError in json
        '{"type": "session.update", "session": {"x": ' + "[" * 200 + "]" * 200 + "}}",  # parses, too deep to keep
        '{"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x", "y": ' + "{\"a\": " * 300 + "1" + "}" * 300 + "}]}}",
        json.dumps({"type": "input_audio_buffer.append", "audio": 5}),
        json.dumps({"type": "session.update", "session": {"tools": "abc"}}),
        json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": "fast"}}}}}),
        json.dumps({"type": "conversation.item.truncate", "item_id": 5, "content_index": [], "audio_end_ms": {}}),
        json.dumps({"type": "response.create", "response": {"tools": [{"type": "function", "name": {"x": 1}}]}}),
        '{"type": "session.update", "session": {"temperature": NaN}}',
        '{"type": "session.update", "session": {"instructions": "\\ud800"}}',
        b"\xff\xfe\x00",
        "",
        None,
        12,
    ],
)
def test_no_client_message_ends_the_session(message):
    s, sink = session()
    sink.max_event_bytes = 256 * 1024
    s.receive(message, 0.0)
    (error,) = sink.of_type("error")
    assert error["error"]["code"] in ("invalid_json", "invalid_value", "invalid_type", "missing_required_parameter", "unknown_parameter")
    assert not internals(error["error"]["message"])
    assert answered(s, sink) and s.next_input(0, 0.0).events == [{"type": "conversation.item.delete", "item_id": "item_probe"}]


@pytest.mark.parametrize("exc", [RuntimeError("at /work/main/actors/x.py line 3"), RecursionError("maximum recursion depth exceeded"), MemoryError(), KeyError("k"), TypeError("bad")])
def test_a_failure_of_ours_is_a_server_error_without_internals(exc):
    s, sink = session({"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}})

    def fail(*args):
        raise exc

    sink.append_audio = fail
    send(s, {"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": "a1"})
    (error,) = sink.of_type("error")
    assert error["error"] == {"type": "server_error", "code": "server_error", "message": error["error"]["message"], "event_id": "a1"}
    assert not internals(error["error"]["message"])
    assert answered(s, sink)


def test_a_sink_that_fails_to_send_does_not_raise():
    s, sink = session()

    def broken(event):
        raise RuntimeError("socket gone")

    sink.send = broken
    s.receive("not json", 0.0)
    send(s, {"type": "conversation.item.delete", "item_id": "x"})  # its answer is lost, the session is not
    assert s.next_input(0, 0.0).events == []  # the failed event changed nothing


def test_a_failed_event_changes_nothing():
    s, sink = session({"type": "realtime", "instructions": "be brief"})
    s.next_input(0, 0.0)
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi", "extra": [[[1]]]}]}
    real = RealtimeSession.session_object

    def broken(self, config=None):
        raise ValueError("boom")

    RealtimeSession.session_object = broken
    try:
        send(s, {"type": "session.update", "session": {"instructions": "changed"}})
    finally:
        RealtimeSession.session_object = real
    assert s.config["instructions"] == "be brief" and sink.errors() == ["server_error"]
    send(s, {"type": "conversation.item.create", "item": item, "previous_item_id": 5})  # refused by validation: no text kept
    assert sink.errors() == ["server_error", "invalid_type"] and s.next_input(1, 0.2).text == ""


def test_control_events_are_smaller_than_appends():
    from protocols.realtime import MAX_CONTROL_EVENT_BYTES

    s, sink = session({"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}})
    sink.max_event_bytes = 256 * 1024
    send(s, {"type": "session.update", "session": {"instructions": "x" * MAX_CONTROL_EVENT_BYTES}, "event_id": "big"})
    send(s, {"type": "input_audio_buffer.append", "audio": encode_pcm16(np.zeros(48_000, np.int16))})  # 2 s at 24 kHz: 128 KB
    send(s, {"type": "input_audio_buffer.append", "audio": encode_pcm16(np.zeros(120_000, np.int16))})  # 320 KB: too large
    assert sink.errors() == ["message_too_large", "message_too_large"]
    assert sink.of_type("error")[0]["error"]["event_id"] == "big"
    assert len(sink.appended) == 1


def test_what_reaches_the_model_is_small_and_bounded():
    from actors.ingress.realtime_session import EVENT_BYTES_PER_CHUNK, FORWARD_CHARS, MAX_TOOLS_BYTES

    s, sink = session()
    sink.max_event_bytes = 256 * 1024
    tool = {"type": "function", "name": "look_up", "description": "d" * 1000, "parameters": {"type": "object", "properties": {}}}
    send(s, {"type": "session.update", "session": {"instructions": "i" * 20_000, "tools": [tool], "tool_choice": "auto", "voice": "alloy"}})
    send(s, {"type": "session.update", "session": {"tools": [tool] * 20}})  # over MAX_TOOLS_BYTES: refused
    assert sink.errors() == ["invalid_value"] and sink.of_type("error")[0]["error"]["param"] == "session.tools"
    assert len(json.dumps([tool] * 20)) > MAX_TOOLS_BYTES
    (update,) = s.next_input(0, 0.0).events
    assert update["session"] == {"instructions": "i" * FORWARD_CHARS, "tools": [tool], "tool_choice": "auto"}
    assert sink.of_type("session.updated")[0]["session"]["instructions"] == "i" * 20_000  # the client is told in full

    send(s, {"type": "response.create", "response": {"instructions": "r" * 10_000, "tools": [tool], "tool_choice": "required", "metadata": {"k": "v"}}})
    output = {"type": "function_call_output", "call_id": "c1", "output": "o" * 30_000}
    send(s, {"type": "conversation.item.create", "item": output})
    for i in range(12):
        send(s, {"type": "response.create", "response": {"instructions": f"{i}" * 3_000, "tools": [tool] * 4}})
    chunks = [s.next_input(k, 0.2 * k).events for k in range(1, 10)]
    sizes = [len(json.dumps(events)) for events in chunks]
    assert all(size <= EVENT_BYTES_PER_CHUNK + 1024 for size in sizes), sizes  # JSON of the list, give or take
    flat = [e for events in chunks for e in events]
    assert len(flat) == 14 and chunks[-1] == []  # all of them, in order, a few a chunk
    assert flat[0]["response"] == {"instructions": "r" * FORWARD_CHARS, "tools": [tool], "tool_choice": "required"}
    assert flat[1]["item"] == {"type": "function_call_output", "call_id": "c1", "output": "o" * FORWARD_CHARS}
    assert [e["response"]["instructions"][0] for e in flat[2:]] == [f"{i}" for i in range(10)] + ["1", "1"]


def test_items_are_echoed_once_small():
    from actors.ingress.realtime_session import ECHO_CHARS

    s, sink = session()
    sink.max_event_bytes = 256 * 1024
    audio = encode_pcm16(np.zeros(20_000, np.int16))
    item = {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": audio}, {"type": "input_text", "text": "look"}]}
    send(s, {"type": "conversation.item.create", "item": item})
    send(s, {"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "c", "output": "o" * 50_000}})
    assert sink.errors() == []
    added = sink.of_type("conversation.item.added")
    assert added[0]["item"]["content"] == [{"type": "input_audio"}, {"type": "input_text", "text": "look"}]
    assert added[1]["item"]["output"] == "o" * ECHO_CHARS
    assert all(len(json.dumps(e)) < 2 * ECHO_CHARS for e in sink.events)
    assert [e["type"] for e in s.next_input(0, 0.0).events] == ["conversation.item.create"] * 2


def test_transcripts_in_done_events_are_bounded():
    from actors.ingress.realtime_session import MAX_TRANSCRIPT_CHARS

    s, sink = session()
    for seq in range(40):
        s.deliver(out(s, seq, ["speak"], "w" * 1000), 0.0)
    s.deliver(out(s, 40, ["silent"], audio=SILENCE), 0.0)
    assert len(sink.of_type("response.output_audio_transcript.done")[0]["transcript"]) == MAX_TRANSCRIPT_CHARS
    assert len(sink.of_type("response.done")[0]["response"]["output"][0]["content"][0]["transcript"]) == MAX_TRANSCRIPT_CHARS


# --- audio formats ------------------------------------------------------------------------------


class FormatSink(Sink):
    """A sink that applies the audio formats it is given, except what `refuse` maps elsewhere."""

    def __init__(self, replace=None):
        super().__init__()
        self.applied = []
        self.replace = replace

    def audio_formats(self, input, output):
        self.applied.append((input, output))
        return (self.replace, self.replace) if self.replace else (input, output)


def test_audio_formats_are_applied_by_the_sink_and_reported_as_applied():
    sink = FormatSink()
    s = RealtimeSession(sink, {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu"}}}})
    pcm24 = {"type": "audio/pcm", "rate": 24000}
    assert sink.applied == [({"type": "audio/pcmu"}, pcm24)]
    send(s, {"type": "input_audio_buffer.append", "audio": "AAAA"})
    assert sink.appended == [("AAAA", ("audio/pcmu", 8000))]
    send(s, {"type": "session.update", "session": {"instructions": "x"}})  # formats unchanged: not applied again
    send(s, {"type": "session.update", "session": {"audio": {"output": {"format": {"type": "audio/pcma"}, "voice": "alloy"}}}})
    assert sink.applied[1:] == [({"type": "audio/pcmu"}, {"type": "audio/pcma"})]
    audio = sink.of_type("session.updated")[-1]["session"]["audio"]
    assert audio["input"]["format"] == {"type": "audio/pcmu"} and audio["output"] == {"format": {"type": "audio/pcma"}, "voice": "alloy"}

    track = {"type": "audio/pcm", "rate": 48000}
    sink = FormatSink(replace=track)  # a transport whose audio rides tracks says what they carry
    s = RealtimeSession(sink, {"type": "realtime"})
    s.created()
    send(s, {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}})
    for event in sink.of_type("session.created") + sink.of_type("session.updated"):
        assert event["session"]["audio"]["input"]["format"] == event["session"]["audio"]["output"]["format"] == track


# --- idle and maximum length --------------------------------------------------------------------


def test_idle_timeout_and_maximum_length():
    from protocols.realtime import expired_error

    s, sink = session(idle_timeout_s=10, max_session_s=100)
    assert s.expired(1000.0) is None  # the session's time starts at its first look
    assert s.expired(1009.0) is None
    assert "idle" in s.expired(1010.0)
    send(s, {"type": "bogus"}, now=1009.5)  # any client event is activity, even a bad one
    assert s.expired(1015.0) is None
    s.touch(1020.0)  # e.g. audio arriving
    assert s.expired(1029.0) is None
    sink.last_arrival = 1035.0  # the transport saw media arrive
    assert s.expired(1044.0) is None and "idle" in s.expired(1045.0)
    sink.last_arrival = 1099.0
    assert "maximum length" in s.expired(1100.0)
    error = expired_error(s.expired(1100.0))
    assert error["type"] == "error" and error["error"]["code"] == "session_expired" and "100 s" in error["error"]["message"]
    openai_server_event.validate_python(error)

    forever, _ = session()
    assert forever.expired(0.0) is None and forever.expired(1e9) is None


def test_session_update_replaces_objects_of_another_kind():
    s, sink = session({"type": "realtime", "tool_choice": {"type": "function", "name": "f"}, "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.5}}}})
    send(s, {"type": "session.update", "session": {"tool_choice": {"type": "mcp", "server_label": "s"}, "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}})
    assert sink.errors() == []
    assert s.config["tool_choice"] == {"type": "mcp", "server_label": "s"}
    assert s.config["audio"]["input"]["turn_detection"] == {"type": "semantic_vad"}
    send(s, {"type": "session.update", "session": {"interplay": {"tick_events": True}}})
    send(s, {"type": "session.update", "session": {"audio": {"output": {"voice": "marin"}}}})
    assert s.config["interplay"] == {"tick_events": True} and s.config["audio"]["input"]["turn_detection"] == {"type": "semantic_vad"}
