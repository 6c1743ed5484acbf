"""Hypothesis strategies for fuzzing the Realtime session edge: valid client events of every type
(`valid_event`), the same mutated into hostile messages (`fuzzed`, one of `MUTATIONS`), and what
every reply must be (`check_reply`, on events `drain`ed from a WebSocket outbox)."""

import asyncio
import json
import re
import string

import numpy as np
from hypothesis import strategies as st
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from protocols.realtime_audio import encode_audio
from protocols.realtime_config import SessionConfig
from protocols.realtime_events import CLIENT_EVENT_TYPES, INTERPLAY_EVENT_TYPES

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
