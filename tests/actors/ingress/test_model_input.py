"""What a session's client events put into its next InputChunks: typed text, forwarded events
and the control the client's requests hold, driven through a `RealtimeSession` alone."""

import json

from actors.ingress.model_input import EVENT_BYTES_PER_CHUNK, FORCE_S
from protocols.requests import TaskRequest
from tests.actors.ingress.session_fakes import SILENCE, out, send, session

ITEM = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello there"}]}


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


def test_typed_text_and_events_reach_the_next_chunk():
    s, sink = session({"type": "realtime", "instructions": "be brief"})
    first = s.next_input(0, 0.0)
    assert first.events == [{"type": "session.update", "session": {"instructions": "be brief"}}]
    send(s, {"type": "conversation.item.create", "item": ITEM})
    send(s, {"type": "response.create"})
    nxt = s.next_input(1, 0.2)
    assert nxt.text == "hello there" and nxt.forced == "speak"
    assert [e["type"] for e in nxt.events] == ["conversation.item.create", "response.create"]
    assert nxt.requests == [TaskRequest()]  # what the interaction side acts on, typed
    assert s.next_input(2, 0.4).text == "" and s.next_input(3, 0.6).events == []
    added = sink.of_type("conversation.item.added")[0]["item"]
    assert added["id"].startswith("item") and added["content"][0]["text"] == "hello there"
    assert sink.types() == ["conversation.item.added", "conversation.item.done"]


def test_typed_text_over_the_limit_is_refused_and_not_kept():
    s, sink = session()
    sink.max_event_bytes = 64 * 1024
    send(s, {"type": "conversation.item.create", "item": {**ITEM, "content": [{"type": "input_text", "text": "x" * 5000}]}})
    assert sink.errors() == ["invalid_value"] and s.next_input(0, 0.0).text == ""


def test_forwarded_events_are_spread_over_chunks_in_order():
    s, sink = session()
    sink.max_event_bytes = 256 * 1024
    tool = {"type": "function", "name": "look_up", "description": "d" * 1000, "parameters": {"type": "object", "properties": {}}}
    send(s, {"type": "response.create", "response": {"instructions": "r" * 10_000, "tools": [tool], "tool_choice": "required"}})
    send(s, {"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "c1", "output": "o" * 30_000}})
    for i in range(12):
        send(s, {"type": "response.create", "response": {"instructions": f"{i}" * 3_000, "tools": [tool] * 4}})
    chunks = [s.next_input(k, 0.2 * k).events for k in range(1, 10)]
    sizes = [len(json.dumps(events)) for events in chunks]
    assert all(size <= EVENT_BYTES_PER_CHUNK + 1024 for size in sizes), sizes  # JSON of the list, give or take
    flat = [e for events in chunks for e in events]
    assert len(flat) == 14 and chunks[-1] == []  # all of them, in order, a few a chunk
    assert [e["type"] for e in flat[:2]] == ["response.create", "conversation.item.create"]
    assert [e["response"]["instructions"][0] for e in flat[2:]] == [f"{i}" for i in range(10)] + ["1", "1"]
