"""The contracts every part of Interplay speaks: chunks, context deltas, background work, Realtime events.

No Ray and no torch here: pydantic at the edges, numpy and Arrow for payloads.
"""

from .background import BackgroundTask, BackgroundUpdate, SessionEvent, ToolCall, ToolResult, new_id
from .chunks import (
    CHUNK_MS,
    CHUNK_SAMPLES,
    CONTROLS,
    FRAME_SIZE,
    PATCH,
    SAMPLE_RATE,
    InputChunk,
    OutputChunk,
    ProtocolError,
)
from .deltas import KINDS, SCHEMA, ContextDelta, from_table, kind_of, to_batch

__all__ = [
    "BackgroundTask", "BackgroundUpdate", "SessionEvent", "ToolCall", "ToolResult", "new_id",
    "CHUNK_MS", "CHUNK_SAMPLES", "CONTROLS", "FRAME_SIZE", "PATCH", "SAMPLE_RATE",
    "InputChunk", "OutputChunk", "ProtocolError",
    "KINDS", "SCHEMA", "ContextDelta", "from_table", "kind_of", "to_batch",
]
