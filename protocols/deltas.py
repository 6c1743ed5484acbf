"""Context deltas and the one Arrow schema of the SessionLog.

Every chunk, output, task, update, tool call, tool result and session event is a context delta.
`to_batch` turns deltas into an Arrow record batch of `SCHEMA`; `from_batch` / `from_table` turn
them back into equal objects (lossless: audio and frames as raw bytes, structured fields as JSON).
`index` is the delta's position in its session's log, assigned by the log (-1 before that).
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Iterable, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .background import BackgroundTask, BackgroundUpdate, SessionEvent, ToolCall, ToolResult
from .chunks import InputChunk, OutputChunk, ProtocolError
from .requests import request_from_dict, requests_of

ContextDelta = Union[InputChunk, OutputChunk, BackgroundTask, BackgroundUpdate, ToolCall, ToolResult, SessionEvent]

KINDS: dict[str, type] = {
    "input_chunk": InputChunk,
    "output_chunk": OutputChunk,
    "background_task": BackgroundTask,
    "background_update": BackgroundUpdate,
    "tool_call": ToolCall,
    "tool_result": ToolResult,
    "session_event": SessionEvent,
}
KIND_OF: dict[type, str] = {cls: kind for kind, cls in KINDS.items()}

SCHEMA = pa.schema(
    [
        pa.field("session_id", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),  # position in the session's log
        pa.field("kind", pa.string(), nullable=False),
        pa.field("t", pa.float64(), nullable=False),  # seconds; tick start for chunks
        pa.field("seq", pa.int64()),  # tick number for chunks, else null
        pa.field("audio", pa.binary()),  # int16 little-endian PCM, 16 kHz mono
        pa.field("frame", pa.binary()),  # uint8 RGB, row-major
        pa.field("frame_h", pa.int32()),
        pa.field("frame_w", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("payload", pa.string()),  # JSON: every remaining field of the delta
    ]
)

# Fields stored in their own columns; everything else of a delta goes into `payload`.
_COLUMN_FIELDS = {"session_id", "t", "t_start", "seq", "audio", "frame", "text"}


def kind_of(delta: ContextDelta) -> str:
    try:
        return KIND_OF[type(delta)]
    except KeyError:
        raise ProtocolError(f"not a context delta: {type(delta).__name__}", "invalid_delta") from None


def to_record(delta: ContextDelta, index: int = -1) -> dict:
    """One row of SCHEMA for `delta`."""
    kind = kind_of(delta)
    values = {f.name: getattr(delta, f.name) for f in fields(delta)}
    if "requests" in values:
        values["requests"] = [r.to_dict() for r in values["requests"]]
    audio = values.get("audio")
    frame = values.get("frame")
    return {
        "session_id": delta.session_id,
        "index": index,
        "kind": kind,
        "t": values["t_start"] if "t_start" in values else values["t"],
        "seq": values.get("seq"),
        "audio": None if audio is None else audio.astype("<i2", copy=False).tobytes(),
        "frame": None if frame is None else frame.tobytes(),
        "frame_h": None if frame is None else frame.shape[0],
        "frame_w": None if frame is None else frame.shape[1],
        "text": values.get("text"),
        "payload": json.dumps({k: v for k, v in values.items() if k not in _COLUMN_FIELDS}, ensure_ascii=False),
    }


def to_batch(deltas: Iterable[ContextDelta], first_index: int = -1) -> pa.RecordBatch:
    """Deltas as one record batch; with `first_index` >= 0, rows are numbered from it."""
    rows = [to_record(d, -1 if first_index < 0 else first_index + i) for i, d in enumerate(deltas)]
    return pa.RecordBatch.from_pylist(rows, schema=SCHEMA)


def from_record(row: dict) -> ContextDelta:
    """The delta a SCHEMA row describes; raises ProtocolError for an unknown kind or bad payload."""
    cls = KINDS.get(row["kind"])
    if cls is None:
        raise ProtocolError(f"unknown delta kind {row['kind']!r}; known: {list(KINDS)}", "invalid_delta", "kind")
    values = json.loads(row["payload"] or "{}")
    values["session_id"] = row["session_id"]
    if cls in (InputChunk, OutputChunk):
        values["t_start"] = row["t"]
        values["seq"] = row["seq"]
        values["audio"] = np.frombuffer(row["audio"], dtype="<i2").astype(np.int16) if row["audio"] is not None else None
        values["text"] = row["text"] or ""
        if cls is InputChunk and "requests" in values:
            values["requests"] = [request_from_dict(r) for r in values["requests"]]
        elif cls is InputChunk:  # logged before chunks carried typed requests: read off its events
            values["requests"] = _old_requests(values.get("events") or [])
        if cls is InputChunk and row["frame"] is not None:
            values["frame"] = np.frombuffer(row["frame"], dtype=np.uint8).reshape(row["frame_h"], row["frame_w"], 3).copy()
    else:
        values["t"] = row["t"]
        if row["text"] is not None:
            values["text"] = row["text"]
    try:
        return cls(**values)
    except TypeError as exc:
        raise ProtocolError(f"malformed {row['kind']} row: {exc}", "invalid_delta") from None


def _old_requests(events: list) -> list:
    try:
        return requests_of(events)
    except ProtocolError:
        return []


def from_table(table: pa.Table | pa.RecordBatch) -> list[ContextDelta]:
    return [from_record(row) for row in table.to_pylist()]


from_batch = from_table


def audio_of(table: pa.Table, kind: str = "input_chunk") -> np.ndarray:
    """All audio of one kind in a log table, concatenated, without building delta objects."""
    rows = table.filter(pc.field("kind") == kind)
    parts = [np.frombuffer(b, dtype="<i2") for b in rows["audio"].to_pylist() if b is not None]
    return np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, np.int16)

