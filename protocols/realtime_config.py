"""The Realtime session object on our wire, and the limits every event is held to.

`SessionConfig` is the API's session (the `openai` package's `RealtimeSessionCreateRequest`) with
our extensions: it accepts more PCM rates than the API (16, 24 and 48 kHz), defaults `type` to
"realtime", keeps unknown config keys (newer clients still work) and carries an `interplay` field
(`tick_events`, and on the way out the session's clock and log token). `audio_format`,
`format_of` and `rate_of` read the audio format of a dumped config. Checking an opening config
the way a session.update's is checked is `realtime_events.session_config`.
"""

from __future__ import annotations

from typing import Any, Literal

from openai.types.realtime import RealtimeSessionCreateRequest
from pydantic import BaseModel, ConfigDict, Field

MAX_EVENT_BYTES = 256 * 1024  # one client event: about 2.7 s of 24 kHz PCM16 in an append (the API allows 15 MB)
MAX_CONTROL_EVENT_BYTES = 64 * 1024  # any other event: a session config with its tools, an item
MAX_JSON_DEPTH = 32  # nesting of a client event (a tool's JSON schema included)
DEFAULT_RATE = 24_000  # the Realtime API's audio/pcm rate
G711_RATE = 8_000  # audio/pcmu and audio/pcma


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
    # Wider than the API's own audio config on purpose (our formats and rates): pydantic takes the override.
    audio: AudioConfig | None = None  # pyright: ignore[reportIncompatibleVariableOverride]
    interplay: InterplaySession | None = None


def audio_format(fmt: dict | None) -> tuple[str, int]:
    """A (dumped) audio format object as (type, rate): G.711 is 8 kHz, audio/pcm 24 kHz unless said."""
    fmt = fmt or {}
    kind = fmt.get("type") or "audio/pcm"
    return kind, G711_RATE if kind != "audio/pcm" else int(fmt.get("rate") or DEFAULT_RATE)


def format_of(config: dict, direction: str) -> tuple[str, int]:
    """The audio format (type, rate) of a (dumped) session config's "input" or "output" audio."""
    return audio_format(((config.get("audio") or {}).get(direction) or {}).get("format"))


def rate_of(config: dict, direction: str) -> int:
    """The sample rate of a (dumped) session config's "input" or "output" audio."""
    return format_of(config, direction)[1]

