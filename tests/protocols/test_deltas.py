import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from protocols import (
    CHUNK_SAMPLES, SCHEMA, BackgroundTask, BackgroundUpdate, InputChunk, OutputChunk, ProtocolError,
    SessionEvent, ToolCall, ToolResult, from_table, to_batch,
)
from protocols.deltas import audio_of, from_record, to_record

rng = np.random.default_rng(0)


def pcm():
    return rng.integers(-32768, 32767, CHUNK_SAMPLES, dtype=np.int16)


def every_kind():
    return [
        InputChunk("s", 0, 0.0, pcm(), frame=rng.integers(0, 255, (80, 120, 3), dtype=np.uint8), text="héllo 👋", events=[{"type": "x", "n": 1}]),
        InputChunk("s", 1, 0.2, pcm(), missing=True),
        OutputChunk("s", 0, 0.0, pcm(), text="hi", controls=["speak", "delegate"], events=[{"k": [1, 2]}], step_ms=12.5),
        BackgroundTask("s", 0.3, "delegate", "find the weather", context_upto=1, supersedes="task_old"),
        BackgroundTask("s", 0.3, "tool", "", context_upto=-1, tool="search", arguments={"q": "rain", "n": 3}),
        BackgroundUpdate("s", 0.9, "task_1", "partial", "it is", data={"confidence": 0.5}),
        BackgroundUpdate("s", 1.1, "task_1", "final", "sunny", contradicts=True),
        ToolCall("s", 0.4, "search", {"q": "rain"}, task_id="task_1"),
        ToolResult("s", 0.8, "call_1", output=[{"title": "x"}]),
        ToolResult("s", 0.8, "call_2", error="timeout"),
        SessionEvent("s", 0.0, "session.created", {"model": "tiny"}),
    ]


def assert_same(a, b):
    assert type(a) is type(b)
    for k, va in vars(a).items():
        vb = getattr(b, k)
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype and np.array_equal(va, vb), k
        else:
            assert va == vb, k


def test_every_kind_round_trips_through_arrow():
    deltas = every_kind()
    batch = to_batch(deltas, first_index=0)
    assert batch.schema.equals(SCHEMA)
    assert batch.column("index").to_pylist() == list(range(len(deltas)))
    for a, b in zip(deltas, from_table(batch)):
        assert_same(a, b)


def test_every_kind_round_trips_through_parquet():
    deltas = every_kind()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_batches([to_batch(deltas)]), buf)
    back = from_table(pq.read_table(io.BytesIO(buf.getvalue())))
    for a, b in zip(deltas, back):
        assert_same(a, b)


def test_arrow_batch_round_trips_through_the_ray_object_store(ray_cluster):
    deltas = every_kind()
    ref = ray_cluster.put(to_batch(deltas))
    for a, b in zip(deltas, from_table(ray_cluster.get(ref))):
        assert_same(a, b)


def test_audio_of_concatenates_without_objects():
    deltas = every_kind()
    got = audio_of(pa.Table.from_batches([to_batch(deltas)]))
    assert np.array_equal(got, np.concatenate([deltas[0].audio, deltas[1].audio]))


def test_unknown_kind_and_malformed_rows_are_refused():
    row = to_record(every_kind()[0])
    with pytest.raises(ProtocolError, match="unknown delta kind"):
        from_record(dict(row, kind="telepathy"))
    with pytest.raises(ProtocolError, match="invalid_audio|samples"):
        from_record(dict(row, audio=row["audio"][:100]))
    with pytest.raises(ProtocolError):
        from_record(dict(row, payload='{"bogus_field": 1}'))
    with pytest.raises(ProtocolError, match="not a context delta"):
        to_batch([object()])
