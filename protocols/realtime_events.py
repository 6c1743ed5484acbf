"""OpenAI Realtime (GA) events on our wire: the `openai` package's own typed models where they fit.

`parse_client_event` turns whatever a client sent (text, bytes, dict) into a typed client event
(the `openai.types.realtime` model, strict about unknown top-level fields), or into an `error`
event ready to send back: nothing a client sends escapes as an exception. Oversized events,
unknown event types, JSON nested deeper than `MAX_JSON_DEPTH`, non-finite numbers and strings
that are not Unicode (lone surrogates) are refused. Error codes follow the API's: `invalid_json`
(not a JSON object), `missing_required_parameter`, `unknown_parameter`, `invalid_type`,
`invalid_value`, `message_too_large`, plus `unknown_event` for an event type we do not know.
`session_config` checks an opening session config (an offer's, a WebSocket's) the same way.
`server_event(type, **fields)` builds a server event as a JSON-ready dict and checks it against
the `openai` package's model of that event, so what we send is what the official clients parse.

Our own extensions: `session.update` carries our session object (`realtime_config.SessionConfig`),
and the `interplay.*` server events are ours.
"""

from __future__ import annotations

import json
import typing
import uuid
from typing import Annotated, Any, Literal, Union

from openai.types.realtime import (
    ConversationItemCreateEvent,
    ConversationItemDeleteEvent,
    ConversationItemTruncateEvent,
    InputAudioBufferAppendEvent,
    InputAudioBufferClearEvent,
    InputAudioBufferCommitEvent,
    OutputAudioBufferClearEvent,
    RealtimeServerEvent,
    ResponseCancelEvent,
    ResponseCreateEvent,
)
from openai.types.realtime.conversation_item import ConversationItem
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError

from .chunks import ProtocolError
from .realtime_config import MAX_EVENT_BYTES, MAX_JSON_DEPTH, SessionConfig


def event_id() -> str:
    return f"event_{uuid.uuid4().hex[:20]}"


# --- client events: the API's models, strict at the top level -----------------------------------


def _item_tag(item: Any) -> str | None:
    """Messages are told apart by role, the other items by type (the API's union has no tag)."""
    if isinstance(item, BaseModel):
        item = item.model_dump()
    if not isinstance(item, dict):
        return None
    return f"message.{item.get('role')}" if item.get("type") == "message" else item.get("type")


def _tagged(cls) -> Any:
    fields = cls.model_fields
    if "role" in fields:
        return Annotated[cls, Tag(f"message.{typing.get_args(fields['role'].annotation)[0]}")]
    return Annotated[cls, Tag(typing.get_args(fields["type"].annotation)[0])]


_ITEMS = tuple(_tagged(c) for c in typing.get_args(typing.get_args(ConversationItem)[0]))
_ITEM_TAGS = {typing.get_args(a)[1].tag for a in _ITEMS}
Item = Annotated[Union[_ITEMS], Discriminator(_item_tag)]


def _strict(cls, **overrides):
    """The API's event model, refusing unknown top-level fields, with `.dump()`."""
    namespace = {"model_config": ConfigDict(extra="forbid"), "__module__": __name__, "__annotations__": {}}
    for name, (annotation, default) in overrides.items():
        namespace["__annotations__"][name] = annotation
        namespace[name] = default
    namespace["dump"] = lambda self: self.model_dump(mode="json", exclude_none=True)
    return type(cls.__name__.removesuffix("Event"), (cls,), namespace)


class SessionUpdate(BaseModel):
    """`session.update`, with our session object (see above)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["session.update"]
    event_id: str | None = None
    session: SessionConfig

    def dump(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


InputAudioBufferAppend = _strict(InputAudioBufferAppendEvent)
InputAudioBufferCommit = _strict(InputAudioBufferCommitEvent)
InputAudioBufferClear = _strict(InputAudioBufferClearEvent)
ConversationItemCreate = _strict(ConversationItemCreateEvent, item=(Item, ...))
ConversationItemTruncate = _strict(ConversationItemTruncateEvent, content_index=(int, Field(ge=0)), audio_end_ms=(int, Field(ge=0)))
ConversationItemDelete = _strict(ConversationItemDeleteEvent)
ResponseCreate = _strict(ResponseCreateEvent)
ResponseCancel = _strict(ResponseCancelEvent)
OutputAudioBufferClear = _strict(OutputAudioBufferClearEvent)

_CLIENT_MODELS = (
    SessionUpdate, InputAudioBufferAppend, InputAudioBufferCommit, InputAudioBufferClear, ConversationItemCreate,
    ConversationItemTruncate, ConversationItemDelete, ResponseCreate, ResponseCancel, OutputAudioBufferClear,
)
CLIENT_EVENT_TYPES = tuple(typing.get_args(m.model_fields["type"].annotation)[0] for m in _CLIENT_MODELS)
ClientEvent = Annotated[Union[_CLIENT_MODELS], Field(discriminator="type")]
_client_adapter: TypeAdapter[Any] = TypeAdapter(typing.cast(Any, ClientEvent))  # a union built at import time


# --- server events ------------------------------------------------------------------------------

_SERVER_MODELS: dict[str, type[BaseModel]] = {
    typing.get_args(cls.model_fields["type"].annotation)[0]: cls for cls in typing.get_args(typing.get_args(RealtimeServerEvent)[0])
}
# session.created / session.updated carry our session object: checked by SessionConfig instead.
_OUR_SESSION_EVENTS = ("session.created", "session.updated")
# Our one extension event, sent only to clients that opt in with session.interplay.tick_events:
# per-tick input/output level, step time and stage times, for the browser page's live timeline.
# Our extensions: per-tick figures (opt-in), ticks shed under overload, background tasks and updates.
INTERPLAY_EVENT_TYPES = ("interplay.tick", "interplay.shed", "interplay.background.task", "interplay.background.update")
SERVER_EVENT_TYPES = tuple(_SERVER_MODELS) + INTERPLAY_EVENT_TYPES


def server_event(type: str, **fields: Any) -> dict:
    """A server event as a JSON-ready dict with a fresh `event_id`; None fields are left out.

    Raises ValueError for a type the API does not have, or fields its model refuses: a bug here,
    caught where it is made rather than by a client.
    """
    event = {"type": type, "event_id": event_id(), **{k: v for k, v in fields.items() if v is not None}}
    if type in INTERPLAY_EVENT_TYPES:
        return event
    model = _SERVER_MODELS.get(type)
    if model is None:
        raise ValueError(f"not a server event type: {type!r}")
    if type in _OUR_SESSION_EVENTS:
        SessionConfig.model_validate(event.get("session"))
    else:
        model.model_validate(event)
    return event


def error_event(message: str, code: str = "invalid_value", param: str | None = None, client_event_id: str | None = None, type: str = "invalid_request_error") -> dict:
    error = {"type": type, "code": code, "message": message, "param": param, "event_id": client_event_id}
    return server_event("error", error={k: v for k, v in error.items() if v is not None})


def error_from(exc: ProtocolError, client_event_id: str | None = None) -> dict:
    return error_event(str(exc), exc.code, exc.param, client_event_id)


def internal_error(client_event_id: str | None = None) -> dict:
    """What a client is told when handling its event failed on our side: no internals."""
    return error_event("the server could not handle this event; the session goes on", "server_error", client_event_id=client_event_id, type="server_error")


def expired_error(reason: str) -> dict:
    """The error a session gets before it is closed for `reason` (idle, or its maximum length)."""
    return error_event(reason, "session_expired")


def is_error(event: Any) -> bool:
    return isinstance(event, dict) and event.get("type") == "error"


# --- parsing ------------------------------------------------------------------------------------


_UNION_MEMBERS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param(loc: tuple) -> str | None:
    """A validation error's location as a dotted param, without the union tags pydantic puts in
    it: the event's type first, an item's tag right after "item", and union members
    ("str", "literal[...]", a model's class name) anywhere."""
    rest = list(loc[1:])
    if len(rest) > 1 and rest[0] == "item" and rest[1] in _ITEM_TAGS:
        del rest[1]
    return _dotted(rest) or None


def _dotted(loc) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and (p in _UNION_MEMBERS or "[" in p or p[:1].isupper())))


def _code(error_type: str) -> str:
    """A pydantic error type as the API's error code."""
    if error_type == "missing":
        return "missing_required_parameter"
    if error_type == "extra_forbidden":
        return "unknown_parameter"
    if error_type.endswith(("_type", "_parsing")) and error_type not in ("union_tag_invalid", "union_tag_not_found"):
        return "invalid_type"
    return "invalid_value"


def parse_client_event(raw: str | bytes | bytearray | dict, max_bytes: int = MAX_EVENT_BYTES) -> Any:
    """A typed client event, or an error event dict (never raises for bad input)."""
    try:
        return _parse(raw, max_bytes)
    except Exception:  # a validator we did not foresee: still an error event, never a raise
        return error_event("the event could not be read", "invalid_value")


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_tree(value: Any) -> str | None:
    """What is wrong with a parsed event's shape (too deep, a string that is not Unicode), or None.
    Iterative: a deep tree must not cost a deep stack."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    return "a string holds a lone surrogate: not Unicode text"
            continue
        if isinstance(node, dict):
            children = [*node.keys(), *node.values()]
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            return f"the event is nested deeper than {MAX_JSON_DEPTH} levels"
        stack.extend((child, depth + 1) for child in children)
    return None


def _parse(raw: Any, max_bytes: int) -> Any:
    if isinstance(raw, (str, bytes, bytearray)):
        size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
        if size > max_bytes:
            return error_event(f"event of {size} bytes exceeds the limit of {max_bytes} bytes", "message_too_large")
        try:
            raw = json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
        except RecursionError:
            return error_event(f"the event is nested deeper than {MAX_JSON_DEPTH} levels", "invalid_json")
        except (ValueError, UnicodeDecodeError) as exc:
            return error_event(f"event is not valid JSON: {exc}", "invalid_json")
    if not isinstance(raw, dict):
        return error_event("event must be a JSON object", "invalid_json")
    problem = _check_tree(raw)
    if problem:
        return error_event(problem, "invalid_json")
    client_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
    kind = raw.get("type")
    if kind is None:
        return error_event("event has no 'type'", "missing_required_parameter", "type", client_id)
    if not isinstance(kind, str):
        return error_event("the event's 'type' must be a string", "invalid_type", "type", client_id)
    if kind not in CLIENT_EVENT_TYPES:
        return error_event(f"unknown event type {kind[:64]!r}", "unknown_event", "type", client_id)
    try:
        return _client_adapter.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        param = _param(first["loc"])
        return error_event(f"invalid {kind}: {first['msg']}" + (f" at '{param}'" if param else ""), _code(first["type"]), param, client_id)


def session_config(raw: Any) -> dict:
    """An opening session config (an offer's or a WebSocket's) checked like a session.update's
    `session`, dumped; ProtocolError with the API's code and the offending param otherwise."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ProtocolError("the session config must be a JSON object", "invalid_type", "session")
    problem = _check_tree(raw)
    if problem:
        raise ProtocolError(problem, "invalid_value", "session")
    try:
        return SessionConfig.model_validate(raw).model_dump(mode="json", exclude_none=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        param = ".".join(filter(None, ["session", _dotted(first["loc"])]))
        raise ProtocolError(f"invalid session config: {first['msg']} at '{param}'", _code(first["type"]), param) from None
    except Exception:
        raise ProtocolError("the session config could not be read", "invalid_value", "session") from None


def user_text(item: Any) -> str:
    """The typed text of a user message item ('' for any other item)."""
    if _item_tag(item) != "message.user":
        return ""
    parts = []
    for part in item.content or []:
        if part.type in ("input_text", None) and part.text is not None:
            parts.append(part.text)
        elif part.type == "input_text":
            raise ProtocolError("input_text content needs a string 'text'", "invalid_value", "item.content")
    return "\n".join(parts)
