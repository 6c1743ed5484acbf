"""StreamingEngine.replay: a session rebuilt from a snapshot and its logged chunks goes on exactly; what does not
follow is refused and changes nothing."""

from __future__ import annotations

import pickle

import pytest
import torch

from protocols.chunks import ProtocolError
from protocols.deltas import from_table, to_batch
from tests.models.helpers import FLOAT_LSB, assert_same, build_engine, chunks_at, step_ok


def _scripted_inputs(sids, ticks):
    """Chunks with typed text, background updates and forced controls at fixed ticks."""
    for k in ticks:
        chunks = chunks_at(sids, k, text="what about tomorrow" if k % 9 == 4 else "")
        for c in chunks:
            if k % 7 == 3:
                c.updates = [f"result {k} for {c.session_id}", "and more"]
            if k % 11 in (5, 6):
                c.forced = "speak"
        yield k, chunks


def test_a_session_rebuilt_from_a_snapshot_and_its_chunks_goes_on_exactly():
    """A, B, C stepped 30 ticks; A's state exported at tick 12; A rebuilt in a second engine
    (beside a live D, which the rebuild neither steps nor touches) from that snapshot and the
    chunks 13..29 after a trip through the log's Arrow form, and again from no snapshot (all
    its chunks): from tick 30 on, A's outputs are those of the A that never left."""
    src = build_engine(max_sessions=4, sessions=("a", "b", "c"))
    logged, outs_a = [], {}
    snapshot = None
    for k, chunks in _scripted_inputs(["a", "b", "c"], range(30)):
        outs = step_ok(src, chunks)
        logged.append(chunks[0])
        outs_a[k] = outs[0]
        if k == 12:
            snapshot = pickle.loads(pickle.dumps(src.export_session("a")))
    assert any(c.updates for c in logged[13:]) and any(c.forced for c in logged[13:]) and any(c.text for c in logged[13:])
    logged = from_table(to_batch(logged))  # what the log gives back
    assert [c.updates for c in logged] == [c.updates for c in _scripted_inputs_a(30)]

    from_snapshot, from_start = build_engine(sessions=("d",)), build_engine(sessions=("d",))
    for eng in (from_snapshot, from_start):
        step_ok(eng, chunks_at(["d"], 0))
    d_before = {name: t.clone() for name, t in from_snapshot.rows.of(0).items()}
    replayed = _rebuild(from_snapshot, "a", snapshot, chunks=logged[13:])
    assert from_snapshot.sessions == ["d", "a"]
    assert all(torch.equal(d_before[name], t) for name, t in from_snapshot.rows.of(0).items())
    assert [o.seq for o in replayed] == list(range(13, 30))
    for o in replayed:
        assert_same(o, outs_a[o.seq], lsb=FLOAT_LSB)
    replayed = _rebuild(from_start, "a", None, chunks=logged)
    assert [o.seq for o in replayed] == list(range(30))
    for o in replayed:
        assert_same(o, outs_a[o.seq], lsb=FLOAT_LSB)

    for k, chunks in _scripted_inputs(["a", "b", "c"], range(30, 46)):
        ref = step_ok(src, chunks)[0]
        for eng in (from_snapshot, from_start):
            got = {o.session_id: o for o in step_ok(eng, [chunks[0], *chunks_at(["d"], k - 29)])}
            assert_same(got["a"], ref, lsb=FLOAT_LSB)
    assert torch.equal(src.rows["prev_codes"][0], from_snapshot.rows["prev_codes"][1])
    assert src.export_session("a")["session"] == from_start.export_session("a")["session"]


def _rebuild(engine, session_id, state, chunks=()):
    """What a resuming interaction actor does (`actors.interaction.migration`): replay the logged
    chunks from the snapshot, then import the state they reach."""
    rebuilt, outs = engine.replay(session_id, state, None, chunks)
    engine.import_session(session_id, rebuilt)
    return outs


def _scripted_inputs_a(n):
    return [chunks[0] for _, chunks in _scripted_inputs(["a"], range(n))]


def test_rebuild_refuses_what_does_not_follow_and_changes_nothing():
    eng = build_engine(sessions=("a",))
    for k in range(3):
        step_ok(eng, chunks_at(["a"], k))
    state = eng.export_session("a")
    dst = build_engine(sessions=())
    with pytest.raises(ProtocolError, match="not after 2"):
        _rebuild(dst, "a", state, chunks=chunks_at(["a"], 2))
    with pytest.raises(ProtocolError, match="its own"):
        _rebuild(dst, "a", state, chunks=chunks_at(["b"], 3))
    with pytest.raises(ProtocolError, match="not after 4"):
        _rebuild(dst, "a", None, chunks=[*chunks_at(["a"], 4), *chunks_at(["a"], 4)])
    assert dst.sessions == []
    _rebuild(dst, "a", state, chunks=chunks_at(["a"], 3))
    with pytest.raises(ProtocolError, match="already exists"):
        _rebuild(dst, "a", state)
    assert dst.export_session("a")["session"]["last_seq"] == 3
