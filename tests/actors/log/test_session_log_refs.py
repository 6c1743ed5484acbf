"""SessionLog reads by reference: sealed segments in Ray's object store, owned by the log actor."""

import asyncio

import pyarrow as pa
import pytest
from ray._private.internal_api import memory_summary

from actors.log.log_reads import fetch
from actors.log.session_log import SessionLog
from protocols import SCHEMA, ProtocolError
from tests.actors.log.test_session_log import assert_rows, kill_and_restart, new_log, opened, others, tick, ticks


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
