import json

import numpy as np
import pytest

from protocols import ProtocolError
from protocols.realtime_audio import encode_pcm16
from protocols.realtime_events import (
    CLIENT_EVENT_TYPES, ConversationItemTruncate, InputAudioBufferAppend, SessionUpdate, error_from, internal_error, is_error,
    parse_client_event, server_event,
)

VALID = {
    "session.update": {"session": {"type": "realtime", "instructions": "be brief", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}, "output": {"voice": "alloy"}}}},
    "input_audio_buffer.append": {"audio": encode_pcm16(np.arange(480, dtype=np.int16))},
    "input_audio_buffer.commit": {},
    "input_audio_buffer.clear": {},
    "conversation.item.create": {"item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}},
    "conversation.item.truncate": {"item_id": "item_1", "content_index": 0, "audio_end_ms": 1500},
    "conversation.item.delete": {"item_id": "item_1"},
    "response.create": {},
    "response.cancel": {},
    "output_audio_buffer.clear": {},
}


@pytest.mark.parametrize("kind", CLIENT_EVENT_TYPES)
def test_every_client_event_parses_from_json_text(kind):
    event = parse_client_event(json.dumps({"type": kind, "event_id": "c1", **VALID[kind]}))
    assert not is_error(event), event
    assert event.type == kind and event.event_id == "c1"


def test_session_keeps_unknown_fields_and_defaults_rate():
    event = parse_client_event({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm"}}}, "future_knob": 3}})
    assert isinstance(event, SessionUpdate)
    assert event.session.audio.input.format.rate == 24000
    assert event.session.model_extra == {"future_knob": 3}


@pytest.mark.parametrize(
    "raw, code, param",
    [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_json", None),
        ({"event_id": "c9"}, "missing_required_parameter", "type"),
        ({"type": 5, "event_id": "c9"}, "invalid_type", "type"),
        ({"type": "response.explode", "event_id": "c9"}, "unknown_event", "type"),
        ({"type": "conversation.item.truncate", "item_id": "i", "content_index": 0, "audio_end_ms": -1, "event_id": "c9"}, "invalid_value", "audio_end_ms"),
        ({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 11025}}}}}, "invalid_value", "session.audio.input.format"),
        ({"type": "input_audio_buffer.append"}, "missing_required_parameter", "audio"),
        ({"type": "input_audio_buffer.append", "audio": 5}, "invalid_type", "audio"),
        ({"type": "input_audio_buffer.append", "audio": "AA==", "junk": 1}, "unknown_parameter", "junk"),
        ({"type": "session.update", "session": None}, "invalid_type", "session"),
        ({"type": "session.update", "session": {"tool_choice": 5}}, "invalid_value", "session.tool_choice"),
        ({"type": "conversation.item.truncate", "item_id": "i", "content_index": "x", "audio_end_ms": 0}, "invalid_type", "content_index"),
        ('{"type": "session.update", "session": {"temperature": NaN}}', "invalid_json", None),
        ('{"type": "session.update", "session": {"temperature": 1e999}}', "invalid_json", None),
        ('{"type": "session.update", "session": {"instructions": "\\ud800"}}', "invalid_json", None),
        ('{"type": "response.create", "x": ' + "[" * 40 + "]" * 40 + "}", "invalid_json", None),
        ('{"type": "response.create", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "invalid_json", None),
    ],
)
def test_bad_client_events_become_error_events(raw, code, param):
    event = parse_client_event(raw)
    assert is_error(event)
    assert event["error"]["code"] == code
    assert event["error"].get("param") == param
    assert event["error"]["message"]
    if isinstance(raw, dict) and "event_id" in raw:
        assert event["error"]["event_id"] == raw["event_id"]


def test_oversized_event_is_refused_before_parsing():
    event = parse_client_event("x" * 2000, max_bytes=1000)
    assert is_error(event) and event["error"]["code"] == "message_too_large"


def test_server_events_have_ids_and_refuse_typos():
    delta = server_event("response.output_audio.delta", response_id="r", item_id="i", output_index=0, content_index=0, delta="AA==")
    assert delta["type"] == "response.output_audio.delta" and delta["event_id"].startswith("event_")
    err = error_from(ProtocolError("bad frame", "invalid_frame", "frame"), "c1")
    assert err["error"] == {"type": "invalid_request_error", "code": "invalid_frame", "message": "bad frame", "param": "frame", "event_id": "c1"}
    with pytest.raises(ValueError):
        server_event("response.audio.delta")


def test_typed_models_are_returned():
    assert isinstance(parse_client_event({"type": "input_audio_buffer.append", "audio": "AA=="}), InputAudioBufferAppend)
    assert isinstance(parse_client_event({"type": "conversation.item.truncate", "item_id": "a", "content_index": 0, "audio_end_ms": 0}), ConversationItemTruncate)


def test_client_events_are_the_openai_packages_own_models():
    from openai.types.realtime import ConversationItemCreateEvent, InputAudioBufferAppendEvent, ResponseCreateEvent
    from openai.types.realtime.realtime_conversation_item_user_message import RealtimeConversationItemUserMessage

    assert isinstance(parse_client_event({"type": "input_audio_buffer.append", "audio": "AA=="}), InputAudioBufferAppendEvent)
    create = parse_client_event({"type": "conversation.item.create", **VALID["conversation.item.create"]})
    assert isinstance(create, ConversationItemCreateEvent) and isinstance(create.item, RealtimeConversationItemUserMessage)
    response = parse_client_event({"type": "response.create", "response": {"output_modalities": ["audio"], "instructions": "short"}})
    assert isinstance(response, ResponseCreateEvent) and response.response.instructions == "short"


@pytest.mark.parametrize(
    "item, code, param",
    [
        ({"type": "message", "role": "robot", "content": []}, "invalid_value", "item"),
        ({"type": "message", "role": "user", "content": [{"type": "bogus", "text": "x"}]}, "invalid_value", "item.content.0.type"),
        ({"type": "message", "role": "user"}, "missing_required_parameter", "item.content"),
        ({"type": "function_call_output"}, "missing_required_parameter", "item.call_id"),
        ({"type": "function_call_output", "call_id": "c", "output": 5}, "invalid_type", "item.output"),
    ],
)
def test_bad_items_name_the_field_without_union_tags(item, code, param):
    event = parse_client_event({"type": "conversation.item.create", "item": item})
    assert is_error(event) and event["error"]["code"] == code and event["error"]["param"] == param


def test_bad_response_create_is_an_error_event():
    event = parse_client_event({"type": "response.create", "response": {"output_modalities": ["smell"]}})
    assert is_error(event) and event["error"]["param"] == "response.output_modalities.0"


def test_our_session_extensions_pass_and_the_apis_fields_are_typed():
    event = parse_client_event({"type": "session.update", "session": {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 48000}}}, "interplay": {"tick_events": True}}})
    assert not is_error(event) and event.session.audio.output.format.rate == 48000 and event.session.interplay.tick_events is True
    bad = parse_client_event({"type": "session.update", "session": {"tools": [{"type": "function", "name": 3}]}})
    assert is_error(bad) and bad["error"]["param"].startswith("session.tools.0")
    assert server_event("session.created", session={"id": "s", "object": "realtime.session", "type": "realtime", "interplay": {"clock": {"t0": 1.0}}})


def test_server_events_are_checked_against_the_openai_models():
    with pytest.raises(ValueError):  # a required field missing
        server_event("response.output_audio.delta", response_id="r", item_id="i", output_index=0, content_index=0)
    with pytest.raises(ValueError):  # a field of the wrong type
        server_event("response.done", response={"status": "exploded"})
    done = server_event("response.done", response={"id": "r", "object": "realtime.response", "status": "cancelled", "output": []})
    assert done["response"]["status"] == "cancelled"
    assert "previous_item_id" not in server_event("conversation.item.added", previous_item_id=None, item={"type": "message", "role": "user", "content": []})
    tick = server_event("interplay.tick", tick=3)  # ours: not in the API, passed as is
    assert tick["type"] == "interplay.tick" and tick["tick"] == 3


def test_parsing_never_raises():
    for raw in [b"\xff\xfe", "null", "{}", {"type": None}, {"type": "session.update", "session": None}, {"type": "response.create", "response": "x"}, "1e999999", None, 5, ["x"]]:
        assert is_error(parse_client_event(raw)), raw


def test_nesting_up_to_the_limit_is_fine():
    schema = {"type": "object"}
    for _ in range(10):  # a tool whose JSON schema nests ten objects deep
        schema = {"type": "object", "properties": {"x": schema}}
    event = parse_client_event(json.dumps({"type": "session.update", "session": {"tools": [{"type": "function", "name": "f", "parameters": schema}]}}))
    assert not is_error(event), event


def test_internal_errors_say_nothing_of_the_inside():
    error = internal_error("c1")["error"]
    assert error["type"] == "server_error" and error["code"] == "server_error" and error["event_id"] == "c1"


def test_opening_session_configs_are_checked_like_updates():
    from protocols.realtime_events import session_config

    assert session_config(None) == {"type": "realtime"}
    assert session_config({"instructions": "hi", "audio": {"input": {"format": {"type": "audio/pcmu"}}}})["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    for raw, code, param in [
        ([1], "invalid_type", "session"),
        ({"type": "nope"}, "invalid_value", "session.type"),
        ({"tools": "abc"}, "invalid_type", "session.tools"),
        ({"audio": {"output": {"speed": 9}}}, "invalid_value", "session.audio.output.speed"),
        ({"x": json.loads("[" * 40 + "]" * 40)}, "invalid_value", "session"),
    ]:
        with pytest.raises(ProtocolError) as info:
            session_config(raw)
        assert (info.value.code, info.value.param) == (code, param), raw
        assert "pydantic" not in str(info.value)
