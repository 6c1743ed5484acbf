"""Restoring a SessionLog from its files: a restarted log has every session's rows, tokens,
indices and request ids back, and a torn last WAL batch (never acknowledged) is dropped."""

import glob
import os

import pytest

from actors.log.session_log import SessionLog
from protocols import ProtocolError

from .test_session_log import assert_rows, kill_and_restart, new_log, opened, tick, ticks


def test_restart_restores_history_tokens_and_indices(ray_cluster, tmp_path):
    ray = ray_cluster
    log = new_log(tmp_path)
    (a, ta), (b, tb) = opened(ray, log), opened(ray, log)
    for k in range(30):
        ray.get(log.append.remote(tick(a, k) + tick(b, k), request_id=f"tick-{k}"))
    ray.get(log.close.remote(b))
    restarted = kill_and_restart(ray, log)
    assert restarted["open_sessions"] == 1 and restarted["sessions"] == 1  # the closed one stays on disk until read
    assert_rows(ray.get(log.read.remote(a, ta)), ticks(a, 0, 30))
    assert_rows(ray.get(log.read.remote(b, tb)), ticks(b, 0, 30))
    with pytest.raises(ProtocolError, match="does not grant"):
        ray.get(log.read.remote(a, tb))
    # A retried append (same request_id) lands once; new appends continue the indices.
    assert ray.get(log.append.remote(tick(a, 29), request_id="tick-29"))[a] == (58, 59)
    assert ray.get(log.append.remote(tick(a, 30)))[a] == (60, 61)
    assert_rows(ray.get(log.read.remote(a, ta)), ticks(a, 0, 31))
    with pytest.raises(ProtocolError, match="closed"):
        ray.get(log.append.remote(tick(b, 30)))
    ray.kill(log, no_restart=True)


def test_a_torn_wal_tail_is_dropped_on_restore(tmp_path):
    log = SessionLog(str(tmp_path))
    token = log.open("s")
    sizes = []
    for k in range(4):
        log.append(tick("s", k))
        (wal,) = glob.glob(str(tmp_path / "sessions" / "*" / "wal-*.arrows"))
        sizes.append(os.path.getsize(wal))
    del log  # a crash: nothing closed
    with open(wal, "r+b") as f:
        f.truncate((sizes[2] + sizes[3]) // 2)  # the 4th append torn half-way (it was never acknowledged)
    log = SessionLog(str(tmp_path))
    assert_rows(log.read("s", token), ticks("s", 0, 3))
    assert log.append(tick("s", 3))["s"] == (6, 7)
    assert_rows(SessionLog(str(tmp_path)).read("s", token), ticks("s", 0, 4))
