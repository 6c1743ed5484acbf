"""Client events on their way in: read and bounded, checked, and shaped for where they go next.
Plain functions; the session holds the state.

- `read_event(message, limit)`: a raw message -> its typed event, or an `error` event to send
  back. Events are bounded on the way in: at most the sink's `max_event_bytes`, and
  `MAX_CONTROL_EVENT_BYTES` for anything but an audio append.
- `merge(base, update)`: a session config as a session.update changes it.
- `check_tools`, `check_ceiling`: ProtocolError for tools over `MAX_TOOLS_BYTES`, or for a request
  that would widen the session's ceiling. A session opened with a client secret that has a
  config bound to it holds that config as its `ceiling`: a session.update or response.create may
  narrow its tools (a subset, by name) and its tool_choice, but may not name a tool the ceiling
  lacks, change a field the ceiling sets (instructions, say) or unset one; such an event gets an
  `error` (code "forbidden") and changes nothing. With a ceiling that has no tools, no function
  tools may be added.
- `forwarded(event)`: what the model side gets of an event, only the small fields it reads, long
  strings clipped (`FORWARD_CHARS`).
- `echoed(item)`: an item as it is echoed back, without media payloads and with long strings
  clipped (`ECHO_CHARS`).
"""

from __future__ import annotations

import json
from typing import Any

from protocols import ProtocolError
from protocols.realtime_config import MAX_CONTROL_EVENT_BYTES
from protocols.realtime_events import error_event, is_error, parse_client_event

MAX_TOOLS_BYTES = 16 * 1024  # function tools of a session.update or response.create, as JSON
FORWARD_CHARS = 4_000  # longer strings forwarded to the model (instructions, a tool's output) are clipped
ECHO_CHARS = 4_096  # longer strings in echoed items are clipped (typed text is at most MAX_TEXT_CHARS)


def read_event(message: object, limit: int) -> Any:
    """The typed event of a raw message, or an error event (a dict) to send back: a message over
    `limit` bytes (the sink's), or a control event (anything but an audio append) over
    `MAX_CONTROL_EVENT_BYTES`, is refused."""
    if not isinstance(message, (str, bytes, bytearray)):
        return error_event("an event must be a JSON text or binary message", "invalid_json")
    size = len(message) if isinstance(message, (bytes, bytearray)) else len(message.encode("utf-8", "surrogatepass"))
    if size > limit:
        return error_event(f"event of {size} bytes exceeds the limit of {limit} bytes", "message_too_large")
    event = parse_client_event(message, limit)
    if not is_error(event) and event.type != "input_audio_buffer.append" and size > MAX_CONTROL_EVENT_BYTES:
        return error_event(f"{event.type} of {size} bytes exceeds the limit of {MAX_CONTROL_EVENT_BYTES} bytes (larger events are audio appends)", "message_too_large", client_event_id=event.event_id)
    return event


MERGED = ("audio", "input", "output", "interplay")  # config objects a session.update merges into


def merge(base: dict, update: dict) -> dict:
    """A session config updated: `audio` (its `input` and `output`) and `interplay` merge key by
    key; every other field is replaced whole, so an object of one kind never keeps fields of
    another (a tool choice, a turn detection, an audio format and its rate)."""
    out = dict(base)
    for key, value in update.items():
        mergeable = key in MERGED and isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if mergeable else value
    return out


def _clip(value, chars: int):
    return value[:chars] if isinstance(value, str) else value


def _pick(obj: dict, keys: tuple[str, ...]) -> dict:
    return {k: _clip(obj[k], FORWARD_CHARS) for k in keys if k in obj}


def forwarded(event: dict) -> dict:
    """What the model side gets of a (dumped) client event: its type and the few small fields it
    reads (a session.update's or response.create's tools, tool_choice and instructions; an item's
    kind, ids and a function call's arguments or output; what is truncated or deleted), long
    strings clipped. Typed text goes in the chunk's text, audio in its audio."""
    kind = event["type"]
    out: dict = {"type": kind}
    if kind == "session.update":
        out["session"] = _pick(event.get("session") or {}, ("tools", "tool_choice", "instructions"))
    elif kind == "response.create" and event.get("response"):
        out["response"] = _pick(event["response"], ("tools", "tool_choice", "instructions"))
    elif kind == "conversation.item.create":
        out["item"] = _pick(event.get("item") or {}, ("id", "type", "role", "call_id", "name", "arguments", "output"))
    elif kind == "conversation.item.truncate":
        out.update(_pick(event, ("item_id", "content_index", "audio_end_ms")))
    elif kind == "conversation.item.delete":
        out.update(_pick(event, ("item_id",)))
    elif kind == "response.cancel":
        out.update(_pick(event, ("response_id",)))
    return out


def echoed(item: dict) -> dict:
    """An item as conversation.item.added/done show it: media payloads (input audio, image data)
    left out and long strings clipped, so no item goes back at the size it came in."""
    out = {k: _clip(v, ECHO_CHARS) for k, v in item.items() if k != "content"}
    if isinstance(item.get("content"), list):
        out["content"] = [{k: _clip(v, ECHO_CHARS) for k, v in part.items() if k not in ("audio", "image_url")} for part in item["content"]]
    return out


def json_bytes(value: object) -> int:
    """The size of `value` as UTF-8 JSON."""
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8"))


def _tool_name(tool) -> str | None:
    if not isinstance(tool, dict):
        return None
    return tool.get("name") or (tool.get("function") or {}).get("name")


def beyond_ceiling(asked: dict, ceiling: dict, where: str) -> str | None:
    """Why `asked` (a session.update's session or a response.create's response) would widen what
    `ceiling` (a client secret's bound config) allows, or None. Tools narrow by name; tool_choice
    may be "none", "auto", "required" or a tool the ceiling has; any other field the ceiling sets
    is fixed."""
    allowed = {_tool_name(t) for t in ceiling.get("tools") or []}
    for tool in asked.get("tools") or []:
        if _tool_name(tool) not in allowed:
            return f"{where}.tools: {_tool_name(tool)!r} is not among the tools this client secret allows"
    choice = asked.get("tool_choice")
    if isinstance(choice, dict) and _tool_name(choice) not in allowed:
        return f"{where}.tool_choice: {_tool_name(choice)!r} is not among the tools this client secret allows"
    for key, value in asked.items():
        if key in ("tools", "tool_choice", "type") or key not in ceiling:
            continue
        fixed = ceiling[key]
        if isinstance(fixed, dict) and isinstance(value, dict):
            if merge(fixed, value) != fixed:
                return f"{where}.{key} is fixed by this client secret"
        elif value != fixed:
            return f"{where}.{key} is fixed by this client secret"
    return None


def check_ceiling(obj: dict, ceiling: dict | None, where: str) -> None:
    """ProtocolError "forbidden" if `obj` would widen what `ceiling` allows (see `beyond_ceiling`)."""
    if ceiling is not None and (why := beyond_ceiling(obj, ceiling, where)):
        raise ProtocolError(why, "forbidden", where)


def check_tools(obj: dict, where: str) -> None:
    """ProtocolError if the tools of `obj` take more than `MAX_TOOLS_BYTES` as JSON."""
    if "tools" in obj and (size := json_bytes(obj["tools"])) > MAX_TOOLS_BYTES:
        raise ProtocolError(f"the tools take {size} bytes as JSON; at most {MAX_TOOLS_BYTES}", "invalid_value", f"{where}.tools")
