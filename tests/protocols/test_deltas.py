import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from protocols import (
    SCHEMA, BackgroundTask, BackgroundUpdate, InputChunk, OutputChunk, ProtocolError,
    SessionEvent, ToolCall, ToolResult, from_table, to_batch,
)
from protocols.deltas import audio_of, from_record, to_record
from protocols.requests import SessionSettings, TaskRequest

rng = np.random.default_rng(0)
SAMPLES = 3_200  # one 200 ms tick at 16 kHz


def pcm():
    return rng.integers(-32768, 32767, SAMPLES, dtype=np.int16)


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
        InputChunk("s", 2, 0.4, pcm(), requests=[SessionSettings([{"type": "function", "name": "f"}], "required"), TaskRequest(instructions="go")]),
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


def test_every_kind_round_trips_through_the_log_actor_and_the_object_store(ray_cluster, tmp_path):
    """Appended to the SessionLog actor and read back across the object store: the real path."""
    from actors.log.log_actor import SessionLogActor

    log = SessionLogActor.remote(str(tmp_path / "log"), tick_ms=200)
    try:
        token = ray_cluster.get(log.open.remote("s"))
        deltas = every_kind()
        assert ray_cluster.get(log.append.remote(deltas))["s"] == (0, len(deltas) - 1)
        table = ray_cluster.get(log.read.remote("s", token))
        assert isinstance(table, pa.Table) and table.schema.equals(SCHEMA)
        assert table.column("index").to_pylist() == list(range(len(deltas)))
        for a, b in zip(deltas, from_table(table), strict=True):
            assert_same(a, b)
        # A slice leaves the actor as just its rows, not the whole buffer it was cut from.
        one = ray_cluster.get(log.read.remote("s", token, 2, 3))
        assert from_table(one)[0].text == "hi" and one.get_total_buffer_size() < 3 * SAMPLES * 2
    finally:
        ray_cluster.kill(log, no_restart=True)


def test_audio_of_concatenates_without_objects():
    deltas = every_kind()
    got = audio_of(pa.Table.from_batches([to_batch(deltas)]))
    assert np.array_equal(got, np.concatenate([d.audio for d in deltas if isinstance(d, InputChunk)]))


def test_unknown_kind_and_malformed_rows_are_refused():
    row = to_record(every_kind()[0])
    with pytest.raises(ProtocolError, match="unknown delta kind"):
        from_record(dict(row, kind="telepathy"))
    with pytest.raises(ProtocolError, match="samples"):
        from_record(dict(row, audio=row["audio"] * 11))  # longer than the longest tick
    with pytest.raises(ProtocolError):
        from_record(dict(row, payload='{"bogus_field": 1}'))
    with pytest.raises(ProtocolError, match="not a context delta"):
        to_batch([object()])


def test_an_input_chunk_logged_before_typed_requests_reads_them_off_its_events():
    events = [{"type": "session.update", "session": {"tools": [{"name": "f"}]}}, {"type": "response.create", "response": {"tools": None}},
              {"type": "conversation.item.create", "item": {"type": "message"}}]
    row = to_record(InputChunk("s", 0, 0.0, pcm(), events=events))
    payload = json.loads(row["payload"])
    del payload["requests"]  # as rows were written before
    old = from_record({**row, "payload": json.dumps(payload)})
    assert old.requests == [SessionSettings(tools=[{"name": "f"}]), TaskRequest(tools=[])]


def test_a_malformed_request_is_refused():
    with pytest.raises(ProtocolError):
        TaskRequest(tool_choice="sometimes")
    with pytest.raises(ProtocolError):
        InputChunk("s", 0, 0.0, pcm(), requests=[{"type": "task_request"}])
