"""SessionLog reads: by copy and by reference (sealed segments in Ray's object store, owned by
the log actor); reads that take less (a projection of columns, rows of some kinds, the last
seconds); and Parquet reads that run in a thread, so a long read never holds up another
session's appends."""

import asyncio
import threading

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from ray._private.internal_api import memory_summary

from actors.log.log_actor import ServedSessionLog
from actors.log.log_reads import fetch
from actors.log.session_log import SessionLog
from protocols import SCHEMA, ProtocolError

from .test_session_log import assert_rows, kill_and_restart, new_log, opened, others, tick, ticks


def append_ticks(ray, log, sid, start, n, step=5):
    for k in range(start, start + n, step):
        ray.get(log.append.remote(ticks(sid, k, min(step, start + n - k))))


def objects_alive(ray, ids: list[str]) -> list[bool]:
    """Whether each object id is still referenced anywhere in the cluster."""
    summary = memory_summary(ray.get_runtime_context().gcs_address, stats_only=False)
    return [i in summary for i in ids]


def audio_address(table: pa.Table) -> int:
    return table.column("audio").chunk(0).buffers()[2].address


@pytest.fixture
def log(ray_cluster, tmp_path):
    handle = new_log(tmp_path, block_rows=16)
    yield handle
    ray_cluster.kill(handle, no_restart=True)


def test_sealed_segments_are_in_the_object_store_and_read_zero_copy(ray_cluster, log):
    ray = ray_cluster
    sid, token = opened(ray, log)
    append_ticks(ray, log, sid, 0, 40, step=8)  # 80 rows: five sealed blocks of 16, nothing left over
    ray.get(log.append.remote(tick(sid, 40) + others(sid, 9.0)))  # 7 rows not sealed yet
    stats = ray.get(log.stats.remote())
    assert stats["object_store_objects"] == 5 and stats["object_store_bytes"] > 40 * 2 * 6_400
    parts = ray.get(log.refs.remote(sid, token))
    assert [p[:2] for p in parts] == [(0, 15), (16, 31), (32, 47), (48, 63), (64, 79), (80, 86)]
    assert all(isinstance(p, ray.ObjectRef) for _, _, p in parts[:-1])
    assert isinstance(parts[-1][2], pa.Table) and parts[-1][2].num_rows == 7  # the unsealed tail, inline
    everything = ticks(sid, 0, 41) + others(sid, 9.0)
    assert_rows(asyncio.run(fetch(parts)), everything)

    # Twice fetched, the same bytes: the columns point into the shared object, nothing was copied.
    allocated = pa.total_allocated_bytes()
    a, b = asyncio.run(fetch(parts[:3])), asyncio.run(fetch(parts[:3]))
    assert audio_address(a) == audio_address(b) != audio_address(ray.get(log.read.remote(sid, token, 0, 48)))
    assert pa.total_allocated_bytes() - allocated < 64 * 1024
    del a, b

    # A range cuts inside segments; the refs cover it and fetch trims to it.
    parts = ray.get(log.refs.remote(sid, token, 20, 70))
    assert [p[:2] for p in parts] == [(16, 31), (32, 47), (48, 63), (64, 79)]
    assert_rows(asyncio.run(fetch(parts, 20, 70)), everything[20:70], first=20)
    assert ray.get(log.refs.remote(sid, token, 87)) == []
    assert asyncio.run(fetch([])).schema.equals(SCHEMA)


def test_finished_segments_become_one_object_each(ray_cluster, tmp_path):
    ray = ray_cluster
    log = new_log(tmp_path, block_rows=8, segment_s=4.0)  # a segment per 4 s of rows
    sid, token = opened(ray, log)
    append_ticks(ray, log, sid, 0, 50, step=2)
    parts = ray.get(log.refs.remote(sid, token))
    spans = [p[:2] for p in parts]
    assert spans[:2] == [(0, 43), (44, 87)]  # merged on rotation (at the append reaching 4 s); then the current segment's blocks
    assert spans[2:] == [(88, 95), (96, 99)]  # a sealed block of 8, and the 4 rows after it inline
    assert all(isinstance(p, ray.ObjectRef) for _, _, p in parts[:-1]) and isinstance(parts[-1][2], pa.Table)
    assert_rows(asyncio.run(fetch(parts)), ticks(sid, 0, 50))
    ray.kill(log, no_restart=True)


def test_eviction_frees_the_objects_once_no_reader_holds_them(ray_cluster, tmp_path):
    ray = ray_cluster
    log = new_log(tmp_path, retention_s=3.0, segment_s=1.0, block_rows=8)
    sid, token = opened(ray, log)
    append_ticks(ray, log, sid, 0, 10)
    held = ray.get(log.refs.remote(sid, token, 0, 10))
    early = [p for _, _, p in held if isinstance(p, ray.ObjectRef)]
    ids = [r.hex() for r in early]
    assert ids and all(objects_alive(ray, ids))
    append_ticks(ray, log, sid, 10, 40)  # 10 s on: the first seconds go to Parquet
    assert ray.get(log.stats.remote())["memory_rows"] <= 2 * 50 - 20
    assert_rows(asyncio.run(fetch(held, 0, 10)), ticks(sid, 0, 5))  # a reader's ref still reads
    del held, early
    assert not any(objects_alive(ray, ids))  # the log dropped them on eviction, the reader now too
    # The evicted rows still read by reference: loaded from Parquet, sent inline.
    parts = ray.get(log.refs.remote(sid, token))
    assert isinstance(parts[0][2], pa.Table) and parts[0][0] == 0
    assert_rows(asyncio.run(fetch(parts)), ticks(sid, 0, 50))
    ray.kill(log, no_restart=True)


def test_a_wrong_token_gets_no_refs(ray_cluster, log):
    ray = ray_cluster
    (a, ta), (b, tb) = opened(ray, log), opened(ray, log)
    append_ticks(ray, log, a, 0, 10)
    append_ticks(ray, log, b, 0, 10)
    for session, token, code in ((a, tb, "forbidden"), (a, "x" * 32, "forbidden"), (a, None, "forbidden"), ("nobody", ta, "unknown_session")):
        with pytest.raises(ProtocolError) as exc:
            ray.get(log.refs.remote(session, token))
        assert exc.value.code == code
    with pytest.raises(ProtocolError, match="start"):
        ray.get(log.refs.remote(a, ta, -1))
    # Each token reaches exactly its own session's rows.
    assert set(asyncio.run(fetch(ray.get(log.refs.remote(b, tb))))["session_id"].to_pylist()) == {b}


def test_restart_puts_the_restored_segments_back(ray_cluster, tmp_path):
    ray = ray_cluster
    log = new_log(tmp_path, block_rows=16)
    sid, token = opened(ray, log)
    append_ticks(ray, log, sid, 0, 30)
    assert any(isinstance(p, ray.ObjectRef) for _, _, p in ray.get(log.refs.remote(sid, token)))
    restored = kill_and_restart(ray, log)
    assert restored["object_store_objects"] >= 1
    after = ray.get(log.refs.remote(sid, token))
    assert any(isinstance(p, ray.ObjectRef) for _, _, p in after)
    assert_rows(asyncio.run(fetch(after)), ticks(sid, 0, 30))
    ray.get(log.append.remote(tick(sid, 30)))
    assert_rows(asyncio.run(fetch(ray.get(log.refs.remote(sid, token)))), ticks(sid, 0, 31))
    ray.kill(log, no_restart=True)


def test_without_the_object_store_refs_are_the_tables(tmp_path):
    log = SessionLog(str(tmp_path), block_rows=4, object_store=False)
    token = log.open("s")
    log.append(ticks("s", 0, 5))
    parts = asyncio.run(log.refs("s", token, 3))
    assert all(isinstance(p, pa.Table) for _, _, p in parts) and parts[0][0] == 3
    assert_rows(asyncio.run(fetch(parts, 3)), ticks("s", 0, 5)[3:], first=3)
    assert log.stats()["object_store_objects"] == 0



def long_log(tmp_path, cls=SessionLog, **options):
    """A log of 20 s of session "s" (a frame every 5th tick), the first ~16 s of it in Parquet."""
    log = cls(str(tmp_path), tick_ms=200, retention_s=2.0, segment_s=1.0, block_rows=8, object_store=False, **options)
    token = log.open("s")
    deltas = ticks("s", 0, 100) + others("s", 10.0)
    for i in range(0, len(deltas), 10):
        log.append(deltas[i : i + 10])
    assert log.stats()["memory_rows"] < len(deltas) - 150
    return log, token, deltas


def expected(log, token, start=0, end=None, kinds=None, last_s=None) -> pa.Table:
    """What a read with these filters must give: the whole read, filtered here."""
    table = log.read("s", token, start, end)
    keep = pc.is_in(table["kind"], pa.array(kinds)) if kinds else pc.greater_equal(table["index"], 0)
    if last_s is not None:  # the last seconds before the range's last row
        keep = pc.and_(keep, pc.greater_equal(table["t"], table["t"][-1].as_py() - last_s))
    return table.filter(keep)


def test_projection_and_filters_across_parquet_and_memory(tmp_path):
    log, token, deltas = long_log(tmp_path)
    assert_rows(log.read("s", token), deltas)
    cases = [
        dict(columns=["t", "kind", "text"]),
        dict(columns=["audio"], kinds=["input_chunk"]),
        dict(columns=["kind", "payload"], last_s=4.5),
        dict(kinds=["background_task", "tool_call"], last_s=11.0),
        dict(columns=["session_id", "t", "kind"], kinds=["output_chunk"], last_s=6.0, start=10, end=61),  # ends in Parquet
    ]
    for case in cases:
        start, end = case.pop("start", 0), case.pop("end", None)
        columns = case.get("columns")
        got = log.read("s", token, start, end, **case)
        names = SCHEMA.names if columns is None else [n for n in SCHEMA.names if n in columns or n == "index"]
        assert got.column_names == names, case  # "index" always, in the log's order
        want = expected(log, token, start, end, case.get("kinds"), case.get("last_s")).select(names)
        assert got.num_rows > 0 and got.equals(want), case
        parts = asyncio.run(log.refs("s", token, start, end, **case))
        assert all(isinstance(p, pa.Table) and p.column_names == names for _, _, p in parts)
        assert asyncio.run(fetch(parts, start, end, columns)).equals(want), case
        assert asyncio.run(fetch(parts, start + 20, end, columns)).equals(want.filter(pc.greater_equal(want["index"], start + 20))), case
    assert asyncio.run(fetch([], columns=["kind"])).column_names == ["index", "kind"]
    for bad, param in ((dict(columns=["audio", "nope"]), "columns"), (dict(columns="audio"), "columns"),
                       (dict(kinds=["speech"]), "kinds"), (dict(last_s=float("nan")), "last_s"), (dict(last_s=-1), "last_s")):
        with pytest.raises(ProtocolError) as exc:
            log.read("s", token, **bad)
        assert exc.value.code == "invalid_value" and exc.value.param == param


def test_a_projected_read_by_reference_moves_no_frames(ray_cluster, tmp_path):
    ray = ray_cluster
    log = new_log(tmp_path, block_rows=16)
    sid, token = opened(ray, log)
    for k in range(0, 40, 8):
        ray.get(log.append.remote(ticks(sid, k, 8)))
    ray.get(log.append.remote(tick(sid, 40)))
    assert any(isinstance(p, ray.ObjectRef) for _, _, p in ray.get(log.refs.remote(sid, token)))  # whole segments, shared
    parts = ray.get(log.refs.remote(sid, token, columns=["t", "kind", "text"]))
    assert parts and all(isinstance(p, pa.Table) and p.column_names == ["index", "kind", "t", "text"] for _, _, p in parts)  # the log's order
    table = asyncio.run(fetch(parts, columns=["t", "kind", "text"]))
    assert table["index"].to_pylist() == list(range(82)) and table.nbytes < 82 * 100
    audio = asyncio.run(fetch(ray.get(log.refs.remote(sid, token, columns=["audio"], kinds=["input_chunk"]))))
    assert audio.column_names == ["index", "audio"] and audio["index"].to_pylist() == list(range(0, 82, 2))
    # The actor's read is a coroutine and takes the same options.
    assert ray.get(log.read.remote(sid, token, 80, columns=["kind"])).to_pylist() == [{"index": 80, "kind": "input_chunk"}, {"index": 81, "kind": "output_chunk"}]
    ray.kill(log, no_restart=True)


class Gate:
    """Holds every Parquet read of a store until released: a slow filesystem."""

    def __init__(self, store):
        self.entered, self.release = threading.Event(), threading.Event()
        self.load = store.load
        store.load = self

    def __call__(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(30), "never released"
        return self.load(*args, **kwargs)


@pytest.mark.parametrize("how", ["refs", "served read"])
def test_a_slow_parquet_read_does_not_hold_up_appends(tmp_path, how):
    async def scenario():
        log, token, deltas = long_log(tmp_path, cls=ServedSessionLog if how.startswith("served") else SessionLog)
        other = log.open("other")
        gate = Gate(log.store)
        reads = {
            "refs": lambda: log.refs("s", token, 0, 40),
            "served read": lambda: log.read("s", token, 0, 40),
        }
        reader = asyncio.create_task(reads[how]())
        assert await asyncio.to_thread(gate.entered.wait, 30), "the read never reached Parquet"
        # The read is inside Parquet, in a thread: the event loop serves another session's appends.
        assert log.append(ticks("other", 0, 3))["other"] == (0, 5)
        assert not reader.done()
        gate.release.set()
        got = await reader
        table = await fetch(got) if how == "refs" else got
        assert_rows(table, deltas[:40])
        assert_rows(await fetch(await log.refs("other", other)), ticks("other", 0, 3))

    asyncio.run(scenario())
