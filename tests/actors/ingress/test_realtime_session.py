"""RealtimeSession alone: client events and outputs in, server events and model inputs out.

No transport, no network, no clock: a recording sink stands in for the transport, its audio
queue plays only when the test says so, and times are passed in. How its parts behave is in
test_client_events.py, test_model_input.py and test_responses.py."""

import json

import numpy as np
import pytest

from actors.ingress.realtime_session import RealtimeSession
from protocols import ProtocolError
from protocols.realtime_audio import encode_pcm16
from tests.actors.ingress.session_fakes import OUT_FRAME, OUT_RATE, SILENCE, TONE, RecordingSink, openai_server_event, out, send, session


def test_stale_outputs_are_ignored():
    s, sink = session()
    s.deliver(out(s, 5, ["speak"], "new"), 0.0)
    s.deliver(out(s, 4, ["speak"], "old"), 0.0)
    assert [e["delta"] for e in sink.of_type("response.output_audio_transcript.delta")] == ["new"]


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
    send(s, {"type": "session.update", "session": {"instructions": "be brief"}})
    assert sink.of_type("session.updated")[-1]["session"]["instructions"] == "be brief"


def test_tick_events_carry_the_ticks_levels_source_and_stage_times():
    s, sink = session()
    send(s, {"type": "session.update", "session": {"interplay": {"tick_events": True}}})
    assert sink.of_type("session.updated")[-1]["session"]["interplay"]["tick_events"] is True
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
        assert first % OUT_FRAME == 0 and plays == track.time_of(first) >= now + s.responses.prebuffer() / 1000  # after the lead-in
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
    assert tick["out_sample"] == sink.audio_out.written - 3 * len(speech[0]) == round(s.responses.prebuffer() * OUT_RATE / 1000)


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


# --- audio formats ------------------------------------------------------------------------------


class FormatSink(RecordingSink):
    """A sink that applies the audio formats it is given, or `replace` in their stead."""

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


def test_a_sink_that_carries_other_formats_reports_those():
    track = {"type": "audio/pcm", "rate": 48000}
    sink = FormatSink(replace=track)  # a transport whose audio rides tracks says what they carry
    s = RealtimeSession(sink, {"type": "realtime"})
    s.created()
    send(s, {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}})
    for event in sink.of_type("session.created") + sink.of_type("session.updated"):
        assert event["session"]["audio"]["input"]["format"] == event["session"]["audio"]["output"]["format"] == track


# --- idle and maximum length --------------------------------------------------------------------


def test_idle_timeout_and_maximum_length():
    from protocols.realtime_events import expired_error

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
