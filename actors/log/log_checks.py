"""What the SessionLog accepts: a batch of exactly its schema, and rows a delta reads back from.

`as_batch` turns an append's argument (deltas, a RecordBatch or a Table) into one RecordBatch of
`protocols.deltas.SCHEMA`; `check_row` checks one row. A chunk's audio follows
`protocols.chunks.check_audio`: 1 to `MAX_CHUNK_SAMPLES` whole int16 samples at 16 kHz (a tick's
granularity, 25 ms dMel hops or 80 ms Mimi frames, is its model's to check); a log made with
`tick_ms` also wants exactly one tick of it.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import pyarrow as pa

from protocols.chunks import MAX_CHUNK_SAMPLES, MAX_FRAME_EDGE, PATCH, ProtocolError
from protocols.clock import TickClock
from protocols.deltas import KINDS, SCHEMA, from_record, kind_of, to_record

CHUNK_KINDS = ("input_chunk", "output_chunk")


def audio_bytes(tick_ms: int | None) -> int | None:
    """The exact audio bytes of one chunk at `tick_ms` (int16, 16 kHz), or None: any length."""
    return None if tick_ms is None else TickClock(0.0, tick_ms).samples() * 2


def as_batch(deltas) -> tuple[pa.RecordBatch, Sequence[int], dict[str, str], bool]:
    """`deltas` (a list of deltas, a RecordBatch or a Table) as one RecordBatch of SCHEMA, each
    row's position in the call, per-session errors found on the way, and whether the rows were
    already checked (deltas check themselves on construction)."""
    if isinstance(deltas, pa.Table):
        deltas = _one_batch(deltas)
    if isinstance(deltas, pa.RecordBatch):
        return conform(deltas), range(deltas.num_rows), {}, False
    if not isinstance(deltas, (list, tuple)):
        raise ProtocolError(f"append takes a list of context deltas or a RecordBatch of the log schema, got {type(deltas).__name__}", "invalid_delta")
    records, errors = [], {}
    for i, d in enumerate(deltas):
        sid = getattr(d, "session_id", None)
        try:
            kind_of(d)
            d.__post_init__()  # re-check: a delta may have been changed since it was built
            records.append((i, _without_capabilities(to_record(d))))
        except ProtocolError as exc:
            if not isinstance(sid, str):
                raise ProtocolError(f"delta {i}: {exc}", exc.code, exc.param) from None
            errors.setdefault(sid, f"delta {i}: {exc}")
    # Each session's rows together (stable), so its part of the batch is a zero-copy slice.
    order: dict[str, int] = {}
    records = [r for r in records if r[1]["session_id"] not in errors]
    records.sort(key=lambda r: order.setdefault(r[1]["session_id"], len(order)))
    batch = pa.RecordBatch.from_pylist([r for _, r in records], schema=SCHEMA)
    return batch, [i for i, _ in records], errors, True


def _without_capabilities(record: dict) -> dict:
    """A task's log token is the key to the log, not part of it: the row keeps everything else."""
    if record["kind"] == "background_task" and '"log_token"' in record["payload"]:
        payload = json.loads(record["payload"])
        payload.pop("log_token", None)
        record["payload"] = json.dumps(payload, ensure_ascii=False)
    return record


def conform(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch` with exactly SCHEMA (column order, nullability), or ProtocolError naming what differs."""
    have = batch.schema
    missing = [n for n in SCHEMA.names if n not in have.names]
    extra = [n for n in have.names if n not in SCHEMA.names]
    if missing or extra:
        raise ProtocolError(f"batch does not match the log schema: missing columns {missing}, unexpected columns {extra}", "invalid_schema")
    wrong = [f"column {f.name!r} must be {f.type}, got {have.field(f.name).type}" for f in SCHEMA if not have.field(f.name).type.equals(f.type)]
    if wrong:
        raise ProtocolError("batch does not match the log schema: " + "; ".join(wrong), "invalid_schema")
    if batch.column("session_id").null_count:
        raise ProtocolError("session_id must not be null", "invalid_schema", "session_id")
    if have.equals(SCHEMA):
        return batch
    return pa.RecordBatch.from_arrays([batch.column(n) for n in SCHEMA.names], schema=SCHEMA)


def check_row(row: dict, audio_len: int | None, frame_len: int | None, rebuild: bool, tick_bytes: int | None = None) -> None:
    """ProtocolError unless the row is a delta `from_record` reads back; `rebuild` checks every field
    that way. `tick_bytes`, when given, is the exact audio length of a chunk."""
    kind = row["kind"]
    if kind not in KINDS:
        raise ProtocolError(f"unknown delta kind {kind!r}; known: {list(KINDS)}", "invalid_delta", "kind")
    t = row["t"]
    if t is None or not math.isfinite(t):
        raise ProtocolError(f"t must be a finite number of seconds, got {t!r}", "invalid_value", "t")
    if kind in CHUNK_KINDS:
        if row["seq"] is None or row["seq"] < 0:
            raise ProtocolError(f"a chunk needs seq >= 0, got {row['seq']!r}", "invalid_value", "seq")
        got = "none" if audio_len is None else f"{audio_len:,} bytes"
        if tick_bytes is not None and audio_len != tick_bytes:
            raise ProtocolError(f"audio must be {tick_bytes:,} bytes ({tick_bytes // 2:,} int16 samples: one tick at 16 kHz mono), got {got}", "invalid_audio", "audio")
        if audio_len is None or not 0 < audio_len <= MAX_CHUNK_SAMPLES * 2 or audio_len % 2:
            raise ProtocolError(f"audio must be 1 to {MAX_CHUNK_SAMPLES:,} whole int16 samples at 16 kHz mono (2 to {MAX_CHUNK_SAMPLES * 2:,} bytes), got {got}", "invalid_audio", "audio")
    elif audio_len is not None or row["seq"] is not None:
        raise ProtocolError(f"a {kind} carries no audio and no seq", "invalid_delta")
    h, w = row["frame_h"], row["frame_w"]
    if frame_len is not None or h is not None or w is not None:
        if kind != "input_chunk":
            raise ProtocolError(f"only input chunks carry a frame, not a {kind}", "invalid_frame", "frame")
        if frame_len is None or h is None or w is None:
            raise ProtocolError("frame, frame_h and frame_w come together", "invalid_frame", "frame")
        if h <= 0 or w <= 0 or h % PATCH or w % PATCH or max(h, w) > MAX_FRAME_EDGE:
            raise ProtocolError(f"frame edges must be positive multiples of {PATCH} up to {MAX_FRAME_EDGE}, got {h}x{w}", "invalid_frame", "frame")
        if frame_len != h * w * 3:
            raise ProtocolError(f"frame must be frame_h*frame_w*3 = {h * w * 3:,} bytes of uint8 RGB, got {frame_len:,}", "invalid_frame", "frame")
    if not rebuild:
        return
    try:
        payload = json.loads(row["payload"]) if row["payload"] is not None else None
    except ValueError as exc:
        raise ProtocolError(f"payload is not valid JSON: {exc}", "invalid_delta", "payload") from None
    if not isinstance(payload, dict):
        raise ProtocolError("payload must be a JSON object of the delta's remaining fields", "invalid_delta", "payload")
    # Rebuild the delta with placeholder bytes of the checked sizes: every other field is checked
    # by the delta's own constructor, without copying the payloads.
    probe = dict(row, audio=bytes(audio_len) if audio_len is not None else None, frame=bytes(frame_len) if frame_len is not None else None)
    try:
        from_record(probe)
    except ProtocolError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ProtocolError(f"malformed {kind}: {exc}", "invalid_delta", "payload") from None


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)
