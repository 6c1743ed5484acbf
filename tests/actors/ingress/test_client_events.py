"""Client events on their way in: bounded, checked, and only their small fields forwarded to the
model or echoed back; driven through a `RealtimeSession` alone."""

import json

import numpy as np

from actors.ingress.client_events import ECHO_CHARS, FORWARD_CHARS, MAX_TOOLS_BYTES, merge
from protocols.realtime_audio import encode_pcm16
from protocols.realtime_config import MAX_CONTROL_EVENT_BYTES
from tests.actors.ingress.session_fakes import send, session

TOOL = {"type": "function", "name": "look_up", "description": "d" * 1000, "parameters": {"type": "object", "properties": {}}}


def test_tools_over_the_limit_are_refused():
    s, sink = session()
    sink.max_event_bytes = 256 * 1024
    assert len(json.dumps([TOOL] * 20)) > MAX_TOOLS_BYTES
    send(s, {"type": "session.update", "session": {"tools": [TOOL] * 20}})
    assert sink.errors() == ["invalid_value"] and sink.of_type("error")[0]["error"]["param"] == "session.tools"
    assert s.next_input(0, 0.0).events == []


def test_a_session_update_reaches_the_model_clipped_and_the_client_in_full():
    s, sink = session()
    sink.max_event_bytes = 256 * 1024
    send(s, {"type": "session.update", "session": {"instructions": "i" * 20_000, "tools": [TOOL], "tool_choice": "auto", "voice": "alloy"}})
    (update,) = s.next_input(0, 0.0).events
    assert update["session"] == {"instructions": "i" * FORWARD_CHARS, "tools": [TOOL], "tool_choice": "auto"}
    assert sink.of_type("session.updated")[0]["session"]["instructions"] == "i" * 20_000


def test_requests_and_items_reach_the_model_with_only_the_fields_it_reads():
    s, sink = session()
    sink.max_event_bytes = 256 * 1024
    send(s, {"type": "response.create", "response": {"instructions": "r" * 10_000, "tools": [TOOL], "tool_choice": "required", "metadata": {"k": "v"}}})
    send(s, {"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "c1", "output": "o" * 30_000}})
    request, item = s.next_input(0, 0.0).events
    assert request["response"] == {"instructions": "r" * FORWARD_CHARS, "tools": [TOOL], "tool_choice": "required"}
    assert item["item"] == {"type": "function_call_output", "call_id": "c1", "output": "o" * FORWARD_CHARS}


def test_control_events_are_smaller_than_appends():
    s, sink = session({"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}})
    sink.max_event_bytes = 256 * 1024
    send(s, {"type": "session.update", "session": {"instructions": "x" * MAX_CONTROL_EVENT_BYTES}, "event_id": "big"})
    send(s, {"type": "input_audio_buffer.append", "audio": encode_pcm16(np.zeros(48_000, np.int16))})  # 2 s at 24 kHz: 128 KB
    send(s, {"type": "input_audio_buffer.append", "audio": encode_pcm16(np.zeros(120_000, np.int16))})  # 320 KB: too large
    assert sink.errors() == ["message_too_large", "message_too_large"]
    assert sink.of_type("error")[0]["error"]["event_id"] == "big"
    assert len(sink.appended) == 1


def test_items_are_echoed_once_small():
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


def test_session_update_replaces_objects_of_another_kind():
    s, sink = session({"type": "realtime", "tool_choice": {"type": "function", "name": "f"}, "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.5}}}})
    send(s, {"type": "session.update", "session": {"tool_choice": {"type": "mcp", "server_label": "s"}, "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}})
    assert sink.errors() == []
    assert s.config["tool_choice"] == {"type": "mcp", "server_label": "s"}
    assert s.config["audio"]["input"]["turn_detection"] == {"type": "semantic_vad"}
    send(s, {"type": "session.update", "session": {"interplay": {"tick_events": True}}})
    send(s, {"type": "session.update", "session": {"audio": {"output": {"voice": "marin"}}}})
    assert s.config["interplay"] == {"tick_events": True} and s.config["audio"]["input"]["turn_detection"] == {"type": "semantic_vad"}


def test_merge_merges_audio_and_interplay_key_by_key_and_replaces_the_rest():
    base = {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "noise": 1}}, "tool_choice": {"type": "function", "name": "f"}}
    update = {"audio": {"input": {"format": {"type": "audio/pcmu"}}}, "tool_choice": "auto"}
    assert merge(base, update) == {"audio": {"input": {"format": {"type": "audio/pcmu"}, "noise": 1}}, "tool_choice": "auto"}
    assert base["audio"]["input"]["format"]["rate"] == 24000  # the base is left as it was
