"""OpenAI Realtime (GA) client and server events, as pydantic models.

`parse_client_event` turns whatever a client sent (text, bytes, dict) into a typed client event,
or into an `ErrorEvent` ready to send back: validation failures never escape as exceptions.
Server events are built with `server_event(...)` or the model classes, and serialised with
`.dump()`. Unknown fields inside `session` are kept (clients written for newer API versions
still connect); unknown event types are refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .chunks import ProtocolError

MAX_EVENT_BYTES = 15 * 1024 * 1024  # the Realtime API's own limit for one append
SUPPORTED_RATES = (16_000, 24_000, 48_000)
DEFAULT_RATE = 24_000  # the Realtime API's audio/pcm rate


def event_id() -> str:
    return f"event_{uuid.uuid4().hex[:20]}"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def dump(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


class _Open(BaseModel):
    """Config objects: unknown keys are kept, so newer clients still work."""

    model_config = ConfigDict(extra="allow")


# --- session configuration --------------------------------------------------------------------


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


class SessionConfig(_Open):
    type: Literal["realtime"] = "realtime"
    model: str | None = None
    instructions: str | None = None
    output_modalities: list[Literal["audio", "text"]] | None = None
    audio: AudioConfig | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    max_output_tokens: int | Literal["inf"] | None = None


# --- client events ----------------------------------------------------------------------------


class SessionUpdate(_Model):
    type: Literal["session.update"]
    event_id: str | None = None
    session: SessionConfig


class InputAudioBufferAppend(_Model):
    type: Literal["input_audio_buffer.append"]
    event_id: str | None = None
    audio: str  # base64 of audio in the session's input format


class InputAudioBufferCommit(_Model):
    type: Literal["input_audio_buffer.commit"]
    event_id: str | None = None


class InputAudioBufferClear(_Model):
    type: Literal["input_audio_buffer.clear"]
    event_id: str | None = None


class ConversationItemCreate(_Model):
    type: Literal["conversation.item.create"]
    event_id: str | None = None
    previous_item_id: str | None = None
    item: dict


class ConversationItemTruncate(_Model):
    type: Literal["conversation.item.truncate"]
    event_id: str | None = None
    item_id: str
    content_index: int = Field(ge=0)
    audio_end_ms: int = Field(ge=0)


class ConversationItemDelete(_Model):
    type: Literal["conversation.item.delete"]
    event_id: str | None = None
    item_id: str


class ResponseCreate(_Model):
    type: Literal["response.create"]
    event_id: str | None = None
    response: dict | None = None


class ResponseCancel(_Model):
    type: Literal["response.cancel"]
    event_id: str | None = None
    response_id: str | None = None


class OutputAudioBufferClear(_Model):
    type: Literal["output_audio_buffer.clear"]
    event_id: str | None = None


ClientEvent = Annotated[
    Union[
        SessionUpdate,
        InputAudioBufferAppend,
        InputAudioBufferCommit,
        InputAudioBufferClear,
        ConversationItemCreate,
        ConversationItemTruncate,
        ConversationItemDelete,
        ResponseCreate,
        ResponseCancel,
        OutputAudioBufferClear,
    ],
    Field(discriminator="type"),
]
CLIENT_EVENT_TYPES = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.truncate",
    "conversation.item.delete",
    "response.create",
    "response.cancel",
    "output_audio_buffer.clear",
)
_client_adapter: TypeAdapter = TypeAdapter(ClientEvent)


# --- server events ----------------------------------------------------------------------------


class ErrorDetail(_Model):
    type: str = "invalid_request_error"
    code: str | None = None
    message: str
    param: str | None = None
    event_id: str | None = None  # the client event that caused it


class ErrorEvent(_Model):
    type: Literal["error"] = "error"
    event_id: str = Field(default_factory=event_id)
    error: ErrorDetail


class ServerEvent(_Open):
    """Any other server event: `type`, a fresh `event_id`, and the event's own fields."""

    type: str
    event_id: str = Field(default_factory=event_id)

    def dump(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


SERVER_EVENT_TYPES = (
    "error",
    "session.created",
    "session.updated",
    "input_audio_buffer.committed",
    "input_audio_buffer.cleared",
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "conversation.item.added",
    "conversation.item.done",
    "conversation.item.truncated",
    "conversation.item.deleted",
    "response.created",
    "response.done",
    "response.output_item.added",
    "response.output_item.done",
    "response.output_audio.delta",
    "response.output_audio.done",
    "response.output_audio_transcript.delta",
    "response.output_audio_transcript.done",
    "response.output_text.delta",
    "response.output_text.done",
    "output_audio_buffer.started",
    "output_audio_buffer.stopped",
    "output_audio_buffer.cleared",
    "rate_limits.updated",
    # Our one extension, sent only to clients that opt in with session.interplay.tick_events:
    # per-tick input/output level and step time, for the browser page's live timeline.
    "interplay.tick",
)


def server_event(type: str, **fields: Any) -> dict:
    """A server event as a JSON-ready dict; refuses types we do not speak, to catch typos early."""
    if type not in SERVER_EVENT_TYPES:
        raise ValueError(f"not a server event type: {type!r}")
    if type == "error":
        return ErrorEvent(error=ErrorDetail(**fields)).dump()
    return ServerEvent(type=type, **fields).dump()


def error_event(message: str, code: str = "invalid_value", param: str | None = None, client_event_id: str | None = None, type: str = "invalid_request_error") -> dict:
    return ErrorEvent(error=ErrorDetail(type=type, code=code, message=message, param=param, event_id=client_event_id)).dump()


def error_from(exc: ProtocolError, client_event_id: str | None = None) -> dict:
    return error_event(str(exc), exc.code, exc.param, client_event_id)


# --- parsing ----------------------------------------------------------------------------------


def parse_client_event(raw: str | bytes | dict, max_bytes: int = MAX_EVENT_BYTES) -> Any:
    """A typed client event, or an error event dict (never raises for bad input).

    Returns a pydantic model on success; on failure a dict with `type == "error"`.
    """
    if isinstance(raw, (str, bytes, bytearray)):
        size = len(raw.encode() if isinstance(raw, str) else raw)
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
        param = ".".join(str(p) for p in first["loc"][1:]) or None  # drop the union tag
        return error_event(f"invalid {kind}: {first['msg']}" + (f" at '{param}'" if param else ""), "invalid_value", param, client_id)


def is_error(event: Any) -> bool:
    return isinstance(event, dict) and event.get("type") == "error"


def decode_pcm16(b64: str, max_bytes: int = MAX_EVENT_BYTES) -> np.ndarray:
    """base64 little-endian PCM16 mono -> int16 samples; ProtocolError for anything else."""
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
