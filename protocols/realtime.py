"""OpenAI Realtime (GA) events on our wire: the `openai` package's own typed models where they fit.

`parse_client_event` turns whatever a client sent (text, bytes, dict) into a typed client event
(the `openai.types.realtime` model, strict about unknown top-level fields), or into an `error`
event ready to send back: validation failures never escape as exceptions, unknown event types and
oversized events are refused. `server_event(type, **fields)` builds a server event as a JSON-ready
dict and checks it against the `openai` package's model of that event, so what we send is what
the official clients parse.

Our own extensions are kept apart, in the marked section below: the `session` object accepts
more PCM rates than the API (16, 24 and 48 kHz) and an `interplay` field (`tick_events`, and on
the way out the session's clock and log token), and the `interplay.tick` server event.
"""

from __future__ import annotations

import base64
import binascii
import json
import typing
import uuid
from typing import Annotated, Any, Literal, Union

import numpy as np
from openai.types.realtime import (
    ConversationItemCreateEvent,
    ConversationItemDeleteEvent,
    ConversationItemTruncateEvent,
    InputAudioBufferAppendEvent,
    InputAudioBufferClearEvent,
    InputAudioBufferCommitEvent,
    OutputAudioBufferClearEvent,
    RealtimeServerEvent,
    RealtimeSessionCreateRequest,
    ResponseCancelEvent,
    ResponseCreateEvent,
)
from openai.types.realtime.conversation_item import ConversationItem
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError

from .chunks import ProtocolError

MAX_EVENT_BYTES = 15 * 1024 * 1024  # the Realtime API's own limit for one append
DEFAULT_RATE = 24_000  # the Realtime API's audio/pcm rate


def event_id() -> str:
    return f"event_{uuid.uuid4().hex[:20]}"


# --- our extensions: the session object ---------------------------------------------------------
# The API's session allows audio/pcm at 24 kHz only; we also take 16 and 48 kHz (no resampling on
# the client), default `type` to "realtime", and carry our own `interplay` field.

SUPPORTED_RATES = (16_000, 24_000, 48_000)


class _Open(BaseModel):
    """Config objects: unknown keys are kept, so newer clients still work."""

    model_config = ConfigDict(extra="allow")


class AudioFormat(_Open):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"] = "audio/pcm"
    rate: int | None = None

    def model_post_init(self, _ctx: Any) -> None:
        if self.type == "audio/pcm":
            self.rate = DEFAULT_RATE if self.rate is None else self.rate
            if self.rate not in SUPPORTED_RATES:
                raise ValueError(f"unsupported audio/pcm rate {self.rate}; supported: {list(SUPPORTED_RATES)}")
        elif self.rate not in (None, 8_000):
            raise ValueError(f"{self.type} is 8 kHz; got rate {self.rate}")


class AudioInput(_Open):
    format: AudioFormat | None = None
    turn_detection: dict | None = None
    transcription: dict | None = None
    noise_reduction: dict | None = None


class AudioOutput(_Open):
    format: AudioFormat | None = None
    voice: str | None = None
    speed: float | None = Field(default=None, ge=0.25, le=1.5)


class AudioConfig(_Open):
    input: AudioInput | None = None
    output: AudioOutput | None = None


class InterplaySession(_Open):
    """`session.interplay`: `tick_events` asks for one `interplay.tick` event per tick."""

    tick_events: bool | None = None


class SessionConfig(RealtimeSessionCreateRequest):
    """The API's realtime session (typed by the `openai` package) with our wider audio and field."""

    model_config = ConfigDict(extra="allow")
    type: Literal["realtime"] = "realtime"
    audio: AudioConfig | None = None
    interplay: InterplaySession | None = None


def rate_of(config: dict, direction: str) -> int:
    """The PCM rate of a (dumped) session config's "input" or "output" audio."""
    fmt = ((config.get("audio") or {}).get(direction) or {}).get("format") or {}
    return int(fmt.get("rate") or DEFAULT_RATE)


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
_client_adapter: TypeAdapter = TypeAdapter(ClientEvent)


# --- server events ------------------------------------------------------------------------------

_SERVER_MODELS: dict[str, type[BaseModel]] = {
    typing.get_args(cls.model_fields["type"].annotation)[0]: cls for cls in typing.get_args(typing.get_args(RealtimeServerEvent)[0])
}
# session.created / session.updated carry our session object: checked by SessionConfig instead.
_OUR_SESSION_EVENTS = ("session.created", "session.updated")
# Our one extension event, sent only to clients that opt in with session.interplay.tick_events:
# per-tick input/output level, step time and stage times, for the browser page's live timeline.
INTERPLAY_EVENT_TYPES = ("interplay.tick",)
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


def is_error(event: Any) -> bool:
    return isinstance(event, dict) and event.get("type") == "error"


# --- parsing ------------------------------------------------------------------------------------


def _param(loc: tuple) -> str | None:
    """A validation error's location as a dotted param, without the union tags pydantic puts in
    it: the event's type first, and an item's tag right after "item"."""
    loc = list(loc[1:])
    if len(loc) > 1 and loc[0] == "item" and loc[1] in _ITEM_TAGS:
        del loc[1]
    return ".".join(str(p) for p in loc) or None


def parse_client_event(raw: str | bytes | dict, max_bytes: int = MAX_EVENT_BYTES) -> Any:
    """A typed client event, or an error event dict (never raises for bad input)."""
    try:
        return _parse(raw, max_bytes)
    except Exception as exc:  # a validator we did not foresee: still an error event, never a raise
        return error_event(f"invalid event: {exc}", "invalid_value")


def _parse(raw: Any, max_bytes: int) -> Any:
    if isinstance(raw, (str, bytes, bytearray)):
        size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
        if size > max_bytes:
            return error_event(f"event of {size} bytes exceeds the limit of {max_bytes} bytes", "message_too_large")
        try:
            raw = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return error_event(f"event is not valid JSON: {exc}", "invalid_json")
    if not isinstance(raw, dict):
        return error_event("event must be a JSON object", "invalid_json")
    client_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
    kind = raw.get("type")
    if not isinstance(kind, str):
        return error_event("event has no string 'type'", "missing_type", "type", client_id)
    if kind not in CLIENT_EVENT_TYPES:
        return error_event(f"unknown event type {kind!r}", "unknown_event", "type", client_id)
    try:
        return _client_adapter.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(first["loc"])
        return error_event(f"invalid {kind}: {first['msg']}" + (f" at '{param}'" if param else ""), "invalid_value", param, client_id)


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


# --- audio payloads -----------------------------------------------------------------------------


def decode_pcm16(b64: str, max_bytes: int = MAX_EVENT_BYTES) -> np.ndarray:
    """base64 little-endian PCM16 mono -> int16 samples; ProtocolError "invalid_audio" for anything else."""
    if len(b64) > max_bytes * 4 // 3 + 4:
        raise ProtocolError("audio is larger than the event limit", "message_too_large", "audio")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("audio is not valid base64", "invalid_audio", "audio") from None
    if len(data) % 2:
        raise ProtocolError("PCM16 audio must have an even number of bytes", "invalid_audio", "audio")
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def encode_pcm16(samples: np.ndarray) -> str:
    return base64.b64encode(np.asarray(samples, dtype="<i2").tobytes()).decode()
