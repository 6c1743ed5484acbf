"""The contracts every part of Interplay speaks: chunks, context deltas, background work, Realtime events.

No Ray and no torch here: pydantic at the edges, numpy and Arrow for payloads.
"""

from .background import BackgroundTask, BackgroundUpdate, SessionEvent, ToolCall, ToolResult, new_id
from .chunks import (
    CONTROLS,
    FRAME_SIZE,
    PATCH,
    SAMPLE_RATE,
    InputChunk,
    OutputChunk,
    ProtocolError,
)
from .clock import TickClock, check_tick_ms
from .deltas import KINDS, SCHEMA, ContextDelta, from_table, kind_of, to_batch

__all__ = [
    "BackgroundTask", "BackgroundUpdate", "SessionEvent", "ToolCall", "ToolResult", "new_id",
    "CONTROLS", "FRAME_SIZE", "PATCH", "SAMPLE_RATE",
    "InputChunk", "OutputChunk", "ProtocolError",
    "TickClock", "check_tick_ms",
    "KINDS", "SCHEMA", "ContextDelta", "from_table", "kind_of", "to_batch",
]
