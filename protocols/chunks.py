"""Micro-turn chunks: what enters and leaves the interaction model every tick.

An `InputChunk` is one session's input for tick `seq`; an `OutputChunk` is the model's answer for
the same tick. Both validate on construction, so a malformed chunk never exists: bad input raises
`ProtocolError` with a message fit to show the client. The tick length is the model's (see
`protocols.clock.TickClock`): a chunk holds 1-D int16 16 kHz audio of at most `MAX_CHUNK_SAMPLES`,
and the engine checks that it holds exactly one tick's worth (its own granularity: whole 25 ms
dMel hops for the built-in model, whole 80 ms Mimi frames for Moshi-family models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ProtocolError
from .requests import Request, check_requests

SAMPLE_RATE = 16_000  # Hz, mono, inside the system
HOP_SAMPLES = SAMPLE_RATE * 25 // 1000  # the built-in model's 25 ms dMel hop (its engine's check)
MAX_CHUNK_SAMPLES = SAMPLE_RATE * 2  # the longest tick a model may use (2 s)
PATCH = 40  # video patches are PATCH x PATCH pixels
FRAME_SIZE = 160  # default frame edge: 160 x 160 -> 16 patches
MAX_FRAME_EDGE = 640  # larger frames are refused, not silently resized
MAX_TEXT_CHARS = 4_096  # typed text per chunk
MAX_UPDATES = 8  # background update texts entering at one tick

# What the model may emit each micro-turn instead of a harness deciding it.
CONTROLS = ("speak", "silent", "yield", "backchannel", "delegate", "tool_call")


def check_session_id(session_id: Any) -> str:
    if not isinstance(session_id, str) or not session_id or len(session_id) > 128:
        raise ProtocolError(f"session_id must be a non-empty string of at most 128 characters, got {session_id!r}", "invalid_session", "session_id")
    return session_id


def check_audio(audio: Any, param: str = "audio", samples: int | None = None) -> np.ndarray:
    """A chunk's audio: 1-D int16 at 16 kHz, 1 to MAX_CHUNK_SAMPLES samples; exactly `samples`
    when given (an engine passes its tick's length)."""
    if not isinstance(audio, np.ndarray):
        raise ProtocolError(f"{param} must be a numpy int16 array, got {type(audio).__name__}", "invalid_audio", param)
    if audio.dtype != np.int16:
        raise ProtocolError(f"{param} must be int16 PCM at {SAMPLE_RATE} Hz, got dtype {audio.dtype}", "invalid_audio", param)
    if samples is not None and audio.shape != (samples,):
        raise ProtocolError(f"{param} must hold {samples} samples (one tick at {SAMPLE_RATE} Hz mono), got shape {audio.shape}", "invalid_audio", param)
    if audio.ndim != 1 or not 0 < audio.shape[0] <= MAX_CHUNK_SAMPLES:
        raise ProtocolError(f"{param} must be 1-D with 1 to {MAX_CHUNK_SAMPLES} samples, got shape {audio.shape}", "invalid_audio", param)
    return audio


def check_frame(frame: Any, param: str = "frame") -> np.ndarray | None:
    """An optional RGB frame: uint8 (H, W, 3), both edges multiples of PATCH, at most MAX_FRAME_EDGE."""
    if frame is None:
        return None
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise ProtocolError(f"{param} must be a uint8 RGB array", "invalid_frame", param)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ProtocolError(f"{param} must have shape (H, W, 3), got {frame.shape}", "invalid_frame", param)
    h, w = frame.shape[:2]
    if h == 0 or w == 0 or h % PATCH or w % PATCH or max(h, w) > MAX_FRAME_EDGE:
        raise ProtocolError(f"{param} edges must be positive multiples of {PATCH} up to {MAX_FRAME_EDGE}, got {h}x{w}", "invalid_frame", param)
    return frame


def check_text(text: Any, param: str = "text") -> str:
    if not isinstance(text, str):
        raise ProtocolError(f"{param} must be a string", "invalid_text", param)
    if len(text) > MAX_TEXT_CHARS:
        raise ProtocolError(f"{param} is longer than {MAX_TEXT_CHARS} characters", "invalid_text", param)
    return text


def check_updates(updates: Any, param: str = "updates") -> list[str]:
    """Background update texts: a list of at most MAX_UPDATES strings, each bounded like text."""
    if not isinstance(updates, list) or len(updates) > MAX_UPDATES:
        raise ProtocolError(f"{param} must be a list of at most {MAX_UPDATES} strings", "invalid_value", param)
    for u in updates:
        check_text(u, param)
    return updates


def check_events(events: Any, param: str = "events") -> list[dict]:
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ProtocolError(f"{param} must be a list of JSON objects", "invalid_value", param)
    return events


def _check_seq(seq: Any) -> int:
    if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or seq < 0:
        raise ProtocolError(f"seq must be a non-negative integer, got {seq!r}", "invalid_value", "seq")
    return int(seq)


def silence(samples: int) -> np.ndarray:
    return np.zeros(samples, dtype=np.int16)


@dataclass
class InputChunk:
    """One session's input for tick `seq`, covering [t_start, t_start + tick) on the actor clock.

    `missing` marks a chunk that did not arrive by the tick's deadline: its audio is silence.
    `forced` is a control the client's request imposes on this micro-turn (a Realtime
    `response.create` holds "speak" until the model yields; `response.cancel` holds "silent"):
    the model's own choice stands only where it is "yield". `updates` are background update texts
    that enter the model at this tick (queued before the chunk's own text): with them a session's
    logged input chunks are a complete record, and replaying them rebuilds its state exactly.
    `events` are the client's Realtime events, a record for the log and the background context;
    `requests` (`protocols.requests`) are what the interaction side acts on.
    """

    session_id: str
    seq: int
    t_start: float
    audio: np.ndarray
    frame: np.ndarray | None = None
    text: str = ""
    events: list[dict] = field(default_factory=list)
    missing: bool = False
    forced: str | None = None
    updates: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        self.seq = _check_seq(self.seq)
        self.t_start = float(self.t_start)
        check_audio(self.audio)
        check_frame(self.frame)
        check_text(self.text)
        check_events(self.events)
        check_updates(self.updates)
        check_requests(self.requests)
        self.missing = bool(self.missing)
        if self.forced is not None and self.forced not in CONTROLS:
            raise ProtocolError(f"forced must be one of {list(CONTROLS)} or null, got {self.forced!r}", "invalid_value", "forced")

    @classmethod
    def silent(cls, session_id: str, seq: int, t_start: float, samples: int, missing: bool = True) -> "InputChunk":
        return cls(session_id, seq, t_start, silence(samples), missing=missing)

    def after(self, dropped: "InputChunk | None") -> "InputChunk":
        """This chunk carrying what `dropped` (an earlier chunk of the session that came too late
        to be stepped) brought besides its audio: its text and client events come first, and its
        forced control holds where this chunk forces none. So a late chunk loses only its sound,
        never a request the client made."""
        if dropped is None or not (dropped.text or dropped.events or dropped.requests or dropped.forced):
            return self
        text = "\n".join(t for t in (dropped.text, self.text) if t)[-MAX_TEXT_CHARS:]
        return InputChunk(self.session_id, self.seq, self.t_start, self.audio, self.frame, text, [*dropped.events, *self.events],
                          self.missing, self.forced or dropped.forced, self.updates, [*dropped.requests, *self.requests])


@dataclass
class OutputChunk:
    """The model's answer for tick `seq`: one tick of audio, the text it spoke, its control tokens.

    `step_ms` is the batched step's compute time; `events` are Realtime-style server events the
    step raised (e.g. a delegated task id).
    """

    session_id: str
    seq: int
    t_start: float
    audio: np.ndarray
    text: str = ""
    controls: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    step_ms: float = 0.0

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        self.seq = _check_seq(self.seq)
        self.t_start = float(self.t_start)
        check_audio(self.audio)
        check_text(self.text)
        check_events(self.events)
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            raise ProtocolError(f"unknown control token(s) {unknown}; known: {list(CONTROLS)}", "invalid_value", "controls")
        self.step_ms = float(self.step_ms)
