"""SessionLog: through the real Ray actor (shared local cluster) and a few cases on the plain class."""

import glob
import time
import uuid

import numpy as np
import pyarrow as pa
import pytest

from actors.log.log_actor import SessionLogActor
from actors.log.session_log import SessionLog
from protocols import (
    SCHEMA,
    BackgroundTask,
    BackgroundUpdate,
    InputChunk,
    OutputChunk,
    ProtocolError,
    SessionEvent,
    ToolCall,
    ToolResult,
    from_table,
    to_batch,
)
from protocols.deltas import to_record


SAMPLES = 3_200  # one 200 ms tick at 16 kHz, the tick the module's log is made for


def tick(sid: str, k: int, t0: float = 0.0) -> list:
    """Tick k of a session: an input chunk (a frame every 5th tick) and an output chunk, both deterministic in k."""
    rng = np.random.default_rng(k)
    frame = rng.integers(0, 256, (40, 80, 3), dtype=np.uint8) if k % 5 == 0 else None
    t = t0 + k * 0.2
    return [
        InputChunk(sid, k, t, rng.integers(-32768, 32767, SAMPLES, dtype=np.int16), frame=frame, text="hello" if k % 7 == 0 else "", events=[{"type": "x", "k": k}] if k % 3 == 0 else []),
        OutputChunk(sid, k, t, rng.integers(-32768, 32767, SAMPLES, dtype=np.int16), text="hi", controls=["speak"] if k % 2 else ["silent"], step_ms=12.5),
    ]


def ticks(sid: str, start: int, n: int, t0: float = 0.0) -> list:
    return [d for k in range(start, start + n) for d in tick(sid, k, t0)]


def others(sid: str, t: float) -> list:
    return [
        BackgroundTask(sid, t, "delegate", "look it up", context_upto=3, task_id="task_1"),
        BackgroundUpdate(sid, t + 0.1, "task_1", "final", text="42", data={"answer": 42}),
        ToolCall(sid, t + 0.2, "search", {"q": "weather"}, call_id="call_1"),
        ToolResult(sid, t + 0.3, "call_1", output={"temp": 21}),
        SessionEvent(sid, t + 0.4, "session.updated", {"voice": "alloy"}),
    ]


def assert_rows(table: pa.Table, deltas: list, first: int = 0) -> None:
    """`table` holds exactly `deltas`, numbered from `first`, and they read back equal."""
    assert table.schema.equals(SCHEMA)
    assert table["index"].to_pylist() == list(range(first, first + len(deltas)))
    assert [to_record(d, first + i) for i, d in enumerate(from_table(table))] == [to_record(d, first + i) for i, d in enumerate(deltas)]


def new_log(root, **options):
    return SessionLogActor.remote(str(root), tick_ms=200, **options)


@pytest.fixture(scope="module")
def log(ray_cluster, tmp_path_factory):
    handle = new_log(tmp_path_factory.mktemp("log"))
    yield handle
    ray_cluster.kill(handle, no_restart=True)


def kill_and_restart(ray, log) -> dict:
    """ray.kill the log actor, let Ray restart it, and return the new process's stats."""
    pid = ray.get(log.stats.remote())["pid"]
    ray.kill(log, no_restart=False)
    deadline = time.time() + 60
    while time.time() < deadline:
        stats = ray.get(log.stats.remote(), timeout=60)  # calls wait (or are retried) until it is back
        if stats["pid"] != pid:
            return stats
        time.sleep(0.05)
    raise AssertionError("the log actor did not restart")


def opened(ray, log, prefix="s"):
    sid = f"{prefix}-{uuid.uuid4().hex[:8]}"
    return sid, ray.get(log.open.remote(sid))


# --- through the Ray actor -------------------------------------------------------------------


def test_append_read_round_trip_across_sessions(ray_cluster, log):
    ray = ray_cluster
    (a, ta), (b, tb) = opened(ray, log), opened(ray, log)
    da = ticks(a, 0, 3) + others(a, 1.0)
    db = ticks(b, 0, 4)
    mixed = [d for pair in zip(da, db) for d in pair] + da[len(db):]  # one call, sessions interleaved
    result = ray.get(log.append.remote(mixed))
    assert dict(result) == {a: (0, len(da) - 1), b: (0, len(db) - 1)} and result.errors == {}
    assert_rows(ray.get(log.read.remote(a, ta)), da)
    assert_rows(ray.get(log.read.remote(b, tb)), db)
    # A RecordBatch (sessions interleaved) or a Table appends the same way; indices continue.
    result = ray.get(log.append.remote(to_batch([d for pair in zip(ticks(a, 3, 2), ticks(b, 4, 2)) for d in pair])))
    assert dict(result) == {a: (len(da), len(da) + 3), b: (len(db), len(db) + 3)}
    result = ray.get(log.append.remote(pa.Table.from_batches([to_batch(ticks(a, 5, 1))])))
    assert result[a] == (len(da) + 4, len(da) + 5)
    assert_rows(ray.get(log.read.remote(a, ta)), da + ticks(a, 3, 3))
    assert_rows(ray.get(log.read.remote(b, tb)), db + ticks(b, 4, 2))


def test_read_ranges_and_last_seconds(ray_cluster, log):
    ray = ray_cluster
    sid, token = opened(ray, log)
    deltas = ticks(sid, 0, 400, t0=1000.0)  # 80 s of a session
    for i in range(0, len(deltas), 20):
        ray.get(log.append.remote(deltas[i : i + 20]))
    assert_rows(ray.get(log.read.remote(sid, token, 10, 20)), deltas[10:20], first=10)
    assert_rows(ray.get(log.read.remote(sid, token, 790)), deltas[790:], first=790)
    assert ray.get(log.read.remote(sid, token, 5, 5)).num_rows == 0
    assert ray.get(log.read.remote(sid, token, 900)).num_rows == 0
    newest = max(d.t_start for d in deltas)
    last60 = ray.get(log.read.remote(sid, token, last_s=60))
    expected = [d for d in deltas if d.t_start >= newest - 60]
    assert 590 <= len(expected) < 610
    assert_rows(last60, expected, first=len(deltas) - len(expected))
    assert ray.get(log.read.remote(sid, token, last_s=0)).num_rows == 2
    with pytest.raises(ProtocolError, match="start"):
        ray.get(log.read.remote(sid, token, -1))
    with pytest.raises(ProtocolError, match="seconds"):
        ray.get(log.read.remote(sid, token, last_s=float("nan")))


def test_a_session_reads_only_its_own_log(ray_cluster, log):
    ray = ray_cluster
    (a, ta), (b, tb) = opened(ray, log), opened(ray, log)
    ray.get(log.append.remote(ticks(a, 0, 1) + ticks(b, 0, 1)))
    for call in (log.read.remote(a, tb), log.read.remote(a, tb, last_s=60), log.refs.remote(a, "x" * 32)):
        with pytest.raises(ProtocolError) as exc:
            ray.get(call)
        assert exc.value.code == "forbidden" and repr(a) in str(exc.value)
    with pytest.raises(ProtocolError) as exc:
        ray.get(log.read.remote("nobody", ta))
    assert exc.value.code == "unknown_session"
    with pytest.raises(ProtocolError) as exc:
        ray.get(log.open.remote(a))  # an existing session opens again only with its token
    assert exc.value.code == "session_exists"
    assert ray.get(log.open.remote(a, ta)) == ta
    assert ray.get(log.read.remote(a, ta)).num_rows == 2


def _set(batch: pa.RecordBatch, name: str, row: int, value, type_=None) -> pa.RecordBatch:
    values = batch.column(name).to_pylist()
    values[row] = value
    i = SCHEMA.get_field_index(name)
    return batch.set_column(i, SCHEMA.field(i), pa.array(values, type_ or SCHEMA.field(i).type))


BAD_ROWS = {
    "wrong dtype (float32 audio)": (lambda b: _set(b, "audio", 1, np.zeros(SAMPLES, np.float32).tobytes()), "audio must be 6,400 bytes (3,200 int16 samples: one tick"),
    "wrong length": (lambda b: _set(b, "audio", 1, bytes(6398)), "got 6,398 bytes"),
    "unknown kind": (lambda b: _set(b, "kind", 1, "video_chunk"), "unknown delta kind 'video_chunk'"),
    "malformed payload": (lambda b: _set(b, "payload", 1, "{not json"), "payload is not valid JSON"),
    "bad field in payload": (lambda b: _set(b, "payload", 1, '{"controls": ["dance"], "events": [], "step_ms": 0}'), "unknown control"),
    "frame size": (lambda b: _set(_set(_set(b, "frame", 0, bytes(100)), "frame_h", 0, 40), "frame_w", 0, 40), "frame must be frame_h*frame_w*3 = 4,800 bytes"),
    "null t": (lambda b: _set(b, "t", 1, None), "t must be a finite number"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_delta_is_rejected_and_other_sessions_land(ray_cluster, log, case):
    ray = ray_cluster
    (good, tg), (bad, tb) = opened(ray, log, "good"), opened(ray, log, "bad")
    ray.get(log.append.remote(ticks(bad, 0, 1)))
    spoil, message = BAD_ROWS[case]
    batch = to_batch(ticks(good, 0, 1) + ticks(bad, 1, 1))  # rows 2, 3 are the bad session's
    batch = pa.RecordBatch.from_arrays(batch.columns, schema=SCHEMA)
    spoiled = spoil(batch.slice(2, 2))
    batch = pa.concat_batches([batch.slice(0, 2), spoiled])
    result = ray.get(log.append.remote(batch))
    assert dict(result) == {good: (0, 1)}
    assert message in result.errors[bad], result.errors
    assert_rows(ray.get(log.read.remote(bad, tb)), ticks(bad, 0, 1))  # unchanged: nothing of the call landed
    assert_rows(ray.get(log.read.remote(good, tg)), ticks(good, 0, 1))


def test_unknown_session_whole_bad_calls_and_schema_errors(ray_cluster, log):
    ray = ray_cluster
    sid, token = opened(ray, log)
    result = ray.get(log.append.remote(ticks(sid, 0, 1) + ticks("nobody", 0, 1)))
    assert dict(result) == {sid: (0, 1)} and "unknown session 'nobody'" in result.errors["nobody"]
    with pytest.raises(ProtocolError, match="unknown session 'nobody'") as exc:  # nothing lands: raised
        ray.get(log.append.remote(ticks("nobody", 1, 1)))
    assert exc.value.code == "invalid_delta" and "nobody" in exc.value.errors
    wrong_t = to_batch(ticks(sid, 1, 1))
    wrong_t = wrong_t.set_column(3, "t", pa.array([1, 2], pa.int64()))
    with pytest.raises(ProtocolError, match="column 't' must be double, got int64") as exc:
        ray.get(log.append.remote(wrong_t))
    assert exc.value.code == "invalid_schema"
    with pytest.raises(ProtocolError, match="list of context deltas"):
        ray.get(log.append.remote("hello"))
    with pytest.raises(ProtocolError, match="not a context delta"):
        ray.get(log.append.remote([{"session_id": sid}]))
    assert_rows(ray.get(log.read.remote(sid, token)), ticks(sid, 0, 1))


def test_a_writer_killed_mid_session_loses_nothing_it_appended(ray_cluster, log, tmp_path):
    ray = ray_cluster
    sid, token = opened(ray, log)
    acks = tmp_path / "acks.txt"

    @ray.remote(max_restarts=0)
    class Writer:
        def run(self, log, sid, path, n):
            for k in range(n):
                first, last = ray.get(log.append.remote(tick(sid, k)))[sid]
                with open(path, "a") as f:
                    f.write(f"{k} {first} {last}\n")

    writer = Writer.remote()
    run = writer.run.remote(log, sid, str(acks), 100_000)
    deadline = time.time() + 30
    while time.time() < deadline and (not acks.exists() or len(acks.read_text().splitlines()) < 30):
        time.sleep(0.05)
    ray.kill(writer)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(run, timeout=30)
    acked = [tuple(map(int, line.split())) for line in acks.read_text().splitlines()]
    assert len(acked) >= 30
    table = ray.get(log.read.remote(sid, token))
    # Every acknowledged append is there, and the log is whole ticks in order: nothing torn or lost.
    assert all(first == 2 * k and last == 2 * k + 1 for k, first, last in acked)
    assert table.num_rows % 2 == 0 and table.num_rows >= 2 * len(acked)
    assert_rows(table, ticks(sid, 0, table.num_rows // 2))


def test_retention_keeps_the_window_in_memory_and_the_rest_in_parquet(ray_cluster, tmp_path):
    ray = ray_cluster
    log = new_log(tmp_path, retention_s=4.0, segment_s=2.0, block_rows=16)
    sid, token = opened(ray, log)
    deltas = ticks(sid, 0, 150)  # 30 s
    for i in range(0, len(deltas), 10):
        ray.get(log.append.remote(deltas[i : i + 10]))
    stats = ray.get(log.stats.remote())
    # In memory: the retention window plus at most one segment and one call, about 6 s of 30.
    assert stats["memory_rows"] <= 2 * (4.0 + 2.0) / 0.2 + 10, stats
    assert stats["parquet_files"] >= 5 and stats["parquet_bytes"] > 0
    assert glob.glob(str(tmp_path / "sessions" / "*" / "seg-*.parquet"))
    assert_rows(ray.get(log.read.remote(sid, token, 0, 10)), deltas[:10])  # from Parquet
    assert_rows(ray.get(log.read.remote(sid, token)), deltas)  # Parquet and memory
    last20 = [d for d in deltas if d.t_start >= deltas[-1].t_start - 20]
    assert_rows(ray.get(log.read.remote(sid, token, last_s=20)), last20, first=len(deltas) - len(last20))
    restored = kill_and_restart(ray, log)  # from Parquet and the WAL files together
    assert restored["memory_rows"] == stats["memory_rows"] and restored["parquet_files"] == stats["parquet_files"]
    assert_rows(ray.get(log.read.remote(sid, token)), deltas)
    ray.kill(log, no_restart=True)


# --- the plain class -------------------------------------------------------------------------


def test_close_persists_everything_and_refuses_appends(tmp_path):
    log = SessionLog(f"file://{tmp_path}")  # any pyarrow filesystem URI
    token = log.open("s")
    log.append(ticks("s", 0, 20) + others("s", 5.0))
    log.close("s")
    assert not glob.glob(str(tmp_path / "sessions" / "*" / "wal-*"))
    stats = log.stats()
    assert stats["memory_rows"] == 0 and stats["parquet_files"] == 1
    with pytest.raises(ProtocolError, match="is closed"):
        log.append(tick("s", 20))
    with pytest.raises(ProtocolError, match="already exists"):
        log.open("s")
    restored = SessionLog(f"file://{tmp_path}")
    assert_rows(restored.read("s", token), ticks("s", 0, 20) + others("s", 5.0))
    with pytest.raises(ProtocolError, match="is closed"):
        restored.open("s", token)


def test_without_a_tick_length_chunks_need_whole_samples_up_to_the_longest_tick(tmp_path):
    log = SessionLog(str(tmp_path))
    token = log.open("s")
    short = [InputChunk("s", 0, 0.0, np.ones(1_600, np.int16)), OutputChunk("s", 0, 0.0, np.ones(1_600, np.int16))]  # a 100 ms tick
    assert log.append(short)["s"] == (0, 1)
    batch = to_batch([InputChunk("s", 1, 0.1, np.ones(1_600, np.int16))])
    for bad in (bytes(3_201), bytes(2 * 32_000 + 2), b""):  # a torn sample, past the longest tick (2 s), none
        with pytest.raises(ProtocolError, match="whole int16 samples"):
            log.append(_set(batch, "audio", 0, bad))
    assert_rows(log.read("s", token), short)
    strict = SessionLog(str(tmp_path / "strict"), tick_ms=100)
    strict.open("s")
    with pytest.raises(ProtocolError, match="audio must be 3,200 bytes"):
        strict.append(tick("s", 0))  # 200 ms chunks in a 100 ms log


@pytest.mark.parametrize("tick_ms", [None, 80])
def test_an_80_ms_chunk_is_logged_and_read_back(tmp_path, tick_ms):
    """A Moshi-family engine ticks in 80 ms Mimi frames: 1,280 samples, not whole 25 ms hops."""
    log = SessionLog(str(tmp_path), tick_ms=tick_ms)
    token = log.open("s")
    rng = np.random.default_rng(0)
    frames = [d for k in range(3) for d in (InputChunk("s", k, k * 0.08, rng.integers(-32768, 32767, 1_280, dtype=np.int16)),
                                            OutputChunk("s", k, k * 0.08, rng.integers(-32768, 32767, 1_280, dtype=np.int16), text="hi"))]
    assert log.append(frames)["s"] == (0, 5)
    assert_rows(log.read("s", token), frames)
