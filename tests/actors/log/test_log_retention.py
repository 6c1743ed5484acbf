"""SessionLog retention: closed sessions are deleted from disk and memory after `keep_s`, open ones
never; a restarted log deletes what expired while it was down and never rescans what is gone.

The plain class with an injected wall clock (`clock`) and explicit `sweep(now)` calls; one test
lets the log's own periodic sweep run on an event loop.
"""

import asyncio
import glob
import os
import threading
import time

import pytest

from actors.log.log_store import dirname_of
from actors.log.session_log import SessionLog
from protocols import ProtocolError

from .test_session_log import assert_rows, ticks

DAY = 24 * 3600.0


class Clock:
    """A wall clock that moves only when the test moves it."""

    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def new_log(tmp_path, clock, **options):
    # WAL files on a disk of their own, as with a remote root: both places must be cleaned.
    options = {"tick_ms": 200, "keep_s": DAY, "clock": clock, "retention_s": 2.0, "segment_s": 1.0, "block_rows": 8, **options}
    return SessionLog(f"file://{tmp_path / 'root'}", wal_dir=str(tmp_path / "wal"), **options)


def files(tmp_path, sid: str) -> list[str]:
    """Every file the log keeps for session `sid`, in the root and in the WAL folder."""
    name = dirname_of(sid)
    found = glob.glob(str(tmp_path / "root" / "sessions" / name / "*")) + glob.glob(str(tmp_path / "wal" / name / "*"))
    return sorted(os.path.basename(p) for p in found)


def folders(tmp_path, sid: str) -> list[bool]:
    name = dirname_of(sid)
    return [os.path.isdir(tmp_path / "root" / "sessions" / name), os.path.isdir(tmp_path / "wal" / name)]


def test_a_closed_session_is_deleted_after_keep_s_and_an_open_one_is_kept(tmp_path):
    clock = Clock()
    log = new_log(tmp_path, clock)
    ta, tb = log.open("a"), log.open("b")
    log.append(ticks("a", 0, 30) + ticks("b", 0, 30))  # 6 s each: most of it in Parquet already
    asyncio.run(log.put_snapshot("b", 20, {"at": 20}))
    log.close("a")
    kept = files(tmp_path, "a")
    assert "session.json" in kept and any(f.endswith(".parquet") for f in kept)
    b_files = files(tmp_path, "b")
    assert {"session.json", "token", "snapshot-000000000020.npz"} <= set(b_files) and any(f.startswith("wal-") for f in b_files)
    assert log.stats()["closed_to_delete"] == 1

    # One second short of keep_s: nothing goes.
    assert asyncio.run(log.sweep(clock.t + DAY - 1)) == []
    assert files(tmp_path, "a") == kept
    assert_rows(log.read("a", ta), ticks("a", 0, 30))

    # keep_s after closing: the closed session's files, folders and memory are gone; the open one
    # (older, and idle all that time) keeps everything.
    clock.t += DAY
    assert asyncio.run(log.sweep()) == ["a"]
    assert files(tmp_path, "a") == [] and folders(tmp_path, "a") == [False, False]
    assert files(tmp_path, "b") == b_files
    stats = log.stats()
    assert stats["sessions"] == stats["open_sessions"] == 1 and stats["closed_to_delete"] == 0
    for call in (lambda: log.read("a", ta), lambda: asyncio.run(log.refs("a", ta))):
        with pytest.raises(ProtocolError) as exc:
            call()
        assert exc.value.code == "unknown_session"
    assert_rows(log.read("b", tb), ticks("b", 0, 30))
    assert asyncio.run(log.sweep(clock.t + 100 * DAY)) == []  # an open session is never deleted
    assert files(tmp_path, "b") == b_files


def test_a_restart_skips_what_was_deleted_and_deletes_what_expired_meanwhile(tmp_path):
    clock = Clock()
    log = new_log(tmp_path, clock)
    tokens = {sid: log.open(sid) for sid in ("gone", "expires", "stays", "open")}
    log.append([d for sid in tokens for d in ticks(sid, 0, 20)])
    log.close("gone")
    clock.t += DAY
    assert asyncio.run(log.sweep()) == ["gone"]
    log.close("expires")
    clock.t += DAY / 2
    log.close("stays")
    del log  # the log goes down...

    clock.t += DAY * 0.75  # ...and "expires" passes keep_s meanwhile; "stays" does not
    restarted = new_log(tmp_path, clock)
    assert files(tmp_path, "expires") == [] and folders(tmp_path, "expires") == [False, False]
    assert folders(tmp_path, "gone") == [False, False]
    stats = restarted.stats()
    # Only the open session is read back into memory; the closed one still kept is only listed.
    assert stats["open_sessions"] == stats["sessions"] == 1 and stats["closed_to_delete"] == 1
    for sid in ("gone", "expires"):
        with pytest.raises(ProtocolError) as exc:
            restarted.read(sid, tokens[sid])
        assert exc.value.code == "unknown_session"
    assert_rows(restarted.read("stays", tokens["stays"]), ticks("stays", 0, 20))  # from disk, when asked
    assert_rows(restarted.read("open", tokens["open"]), ticks("open", 0, 20))
    with pytest.raises(ProtocolError, match="is closed"):
        restarted.open("stays", tokens["stays"])
    # A deleted session's id is free again; a kept one's is not.
    assert restarted.open("gone") != tokens["gone"]
    with pytest.raises(ProtocolError, match="already exists"):
        restarted.open("stays")
    clock.t += DAY / 2
    assert asyncio.run(restarted.sweep()) == ["stays"]
    assert folders(tmp_path, "stays") == [False, False]


def test_closed_sessions_leave_memory_whatever_keep_s(tmp_path):
    log = new_log(tmp_path, Clock(), keep_s=None)
    tokens = {}
    for i in range(100):
        sid = f"call-{i}"
        tokens[sid] = log.open(sid)
        log.append(ticks(sid, 0, 3))
        log.close(sid)
    stats = log.stats()
    assert stats["open_sessions"] == 0 and stats["sessions"] <= 32 and stats["closed_to_delete"] == 0
    assert asyncio.run(log.sweep(Clock().t + 1000 * DAY)) == []  # keep_s None: kept forever
    assert_rows(log.read("call-0", tokens["call-0"]), ticks("call-0", 0, 3))  # read back from disk
    with pytest.raises(ProtocolError, match="is closed"):
        log.append(ticks("call-1", 3, 1))
    with pytest.raises(ValueError, match="keep_s"):
        new_log(tmp_path, Clock(), keep_s=0)


def test_the_periodic_sweep_deletes_in_a_thread_while_appends_go_on(tmp_path):
    clock = Clock()

    async def scenario():
        log = new_log(tmp_path, clock, keep_s=0.5)  # on a running loop: it sweeps every 0.05 s
        log.open("old")
        log.append(ticks("old", 0, 5))
        log.close("old")
        token = log.open("live")
        entered, release = threading.Event(), threading.Event()
        delete = log.store.delete

        def slow_delete(dirname):
            entered.set()
            release.wait(30)  # a slow filesystem
            delete(dirname)

        log.store.delete = slow_delete
        clock.t += 1.0
        assert await asyncio.to_thread(entered.wait, 30), "the sweep did not start"
        # The delete is under way in a thread: the event loop is free, appends land.
        assert log.append(ticks("live", 0, 5))["live"] == (0, 9)
        assert folders(tmp_path, "old")[0]
        release.set()
        while folders(tmp_path, "old") != [False, False]:
            await asyncio.sleep(0.01)
        assert log.stats()["closed_to_delete"] == 0
        assert_rows(log.read("live", token), ticks("live", 0, 5))

    asyncio.run(scenario())


def test_the_actor_sweeps_by_itself(ray_cluster, tmp_path):
    from .test_session_log import new_log as new_actor

    ray = ray_cluster
    log = new_actor(tmp_path, keep_s=0.5)  # the wall clock; a sweep every 0.05 s
    token = ray.get(log.open.remote("s"))
    ray.get(log.append.remote(ticks("s", 0, 5)))
    ray.get(log.close.remote("s"))
    folder = tmp_path / "sessions" / dirname_of("s")
    assert folder.is_dir()
    deadline = time.monotonic() + 60
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not folder.exists()
    assert ray.get(log.stats.remote())["closed_to_delete"] == 0
    with pytest.raises(ProtocolError) as exc:
        ray.get(log.read.remote("s", token))
    assert exc.value.code == "unknown_session"
    ray.kill(log, no_restart=True)
