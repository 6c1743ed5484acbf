"""SessionLog reads that take less: a projection of columns, rows of some kinds, the last seconds;
and Parquet reads that run in a thread, so a long read never holds up another session's appends."""

import asyncio
import threading

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from actors.log.log_actor import ServedSessionLog
from actors.log.log_reads import fetch
from actors.log.session_log import SessionLog
from protocols import SCHEMA, ProtocolError

from .test_session_log import assert_rows, new_log, opened, others, tick, ticks


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
