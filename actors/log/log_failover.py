"""Failover and fencing: what lets another interaction actor take a session over.

`put_snapshot` keeps each open session's newest engine state (durably, in a pickle-free file:
`actors.log.snapshot_codec`), and `recovery` hands back what rebuilds the session elsewhere: that
state, the chunks logged after it, and the session's token. Keeping the token retrievable is the
design choice here: the actor that takes a session over must give the session's clients the
token they already hold, and only the log has it. So while a session is open its token is kept
in clear beside its WAL (mode 0600) and in memory; closing the session deletes it (session.json
only ever has the hash). `recovery` is an internal actor-to-actor call: nothing a client reaches
routes to it.

Fencing: one writer per session at a time. Each session has a writer epoch (0 when opened, kept
in session.json); taking a session over (`recovery`) raises it and hands the new epoch to the
taker. A writer passes the epoch it holds to `append`, `put_snapshot` and `close`; one that holds
an older epoch was superseded (an actor that was slow, not dead, while its session moved) and is
refused with "session_moved" (`fence`), so it can neither interleave rows with the new writer's,
nor replace the snapshot the next takeover starts from, nor close a session that lives on.
Callers that pass no epoch are not fenced.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from protocols.chunks import InputChunk, OutputChunk, ProtocolError
from protocols.deltas import from_record
from protocols.seams import Recovery

from actors.log.log_checks import CHUNK_KINDS
from actors.log.log_reads import resolve_async, to_table
from actors.log.log_store import LogSession, LogStore
from actors.log.snapshot_codec import decode_state, encode_state

log = logging.getLogger("interplay.session_log")


async def put_snapshot(store: LogStore, s: LogSession, tick: int, state: dict, epoch: int | None = None) -> None:
    """Keep `state` (an `Engine.export_session` taken after tick `tick` was stepped) as the
    session's newest snapshot: in memory (a copy), and in its folder (written to a temporary file and
    renamed; fsynced if the log fsyncs), so a restarted log has it. An older snapshot goes; one
    older than the kept one changes nothing, one of the same tick replaces it (a retry).

    ProtocolError: unknown or closed session ("unknown_session", "session_closed"), a tick that
    is not an integer >= 0, or a state that is not a dict of plain values and numpy arrays
    ("invalid_state"), or an `epoch` that is not the session's writer epoch ("session_moved").
    The file is written off the event loop; appends go on meanwhile.
    """
    fence(s, epoch)
    if isinstance(tick, bool) or not isinstance(tick, (int, np.integer)) or tick < 0:
        raise ProtocolError(f"tick must be a non-negative integer, got {tick!r}", "invalid_value", "tick")
    tick = int(tick)
    encoded = encode_state(state)  # checks the state before anything is written
    if s.snapshot_tick is not None and tick < s.snapshot_tick:
        return
    try:
        await asyncio.to_thread(store.write_snapshot, s, tick, encoded)
    except OSError as exc:
        raise ProtocolError(f"could not keep the snapshot of session {s.session_id!r}: {exc.strerror or exc}", "log_unavailable") from None
    if s.closed:  # closed while the file was written
        store.forget(s)
        raise ProtocolError(f"session {s.session_id!r} is closed", "session_closed", "session_id")
    if s.snapshot_tick is None or tick >= s.snapshot_tick:
        s.snapshot_tick, s.snapshot = tick, encoded
    store.drop_snapshots(s, s.snapshot_tick)


async def recovery(store: LogStore, s: LogSession, take_over: bool = True) -> Recovery:
    """What rebuilds an open session on another interaction actor (`protocols.seams.Recovery`):
    its token (None if not kept: a session opened before tokens were kept), the writer epoch
    the caller now holds (with `take_over`, raised by one: whoever wrote before is fenced off;
    without, the current one, for a caller that only reads), the newest snapshot and its tick,
    and the chunks logged after it (the first logged of each seq), from memory and, where
    older, Parquet. Without a snapshot they are every chunk of the session.

    This hands out the token in clear, so it is for the trusted internal caller only (an
    actor-to-actor call; no client-facing route leads here). ProtocolError for an unknown or
    closed session.
    """
    if take_over:
        s.epoch += 1
        try:
            await asyncio.to_thread(store.write_meta, s)
        except OSError as exc:  # the raise stands in memory: no rollback under a takeover that raced this one
            raise ProtocolError(f"could not take over session {s.session_id!r}: {exc.strerror or exc}", "log_unavailable") from None
    epoch = s.epoch
    tick, encoded, state = s.snapshot_tick, s.snapshot, None
    if tick is not None and encoded is None:  # restored: the snapshot is on disk only
        try:
            encoded = await asyncio.to_thread(store.load_snapshot, s, tick)
        except (OSError, ValueError, KeyError) as exc:
            log.error("session %r: snapshot of tick %d is unreadable (%s); recovering from the whole log", s.session_id, tick, exc)
            tick = None
        else:
            if s.snapshot_tick == tick:
                s.snapshot = encoded
    if tick is not None and encoded is not None:
        try:
            state = decode_state(*encoded)  # a fresh copy each time: the caller may change it
        except (ValueError, KeyError) as exc:
            log.error("session %r: snapshot of tick %d is unreadable (%s); recovering from the whole log", s.session_id, tick, exc)
            tick = None
    after = -1 if tick is None else tick
    plan: list[tuple] = []
    for seg in s.segments:
        if seg.blocks is None:
            if seg.seq_max is None or seg.seq_max > after:
                plan.append(("parquet", seg.parquet_path, [("seq", ">", after)]))
        else:
            plan += [("rows", b.batch) for b in seg.blocks]
    table = to_table(await resolve_async(store, plan, None, s.session_id), None)
    keep = pc.and_(pc.is_in(table.column("kind"), pa.array(CHUNK_KINDS)), pc.greater(table.column("seq"), after))  # pyright: ignore[reportAttributeAccessIssue] (pyarrow makes its compute functions at import time)
    chunks: dict[str, dict[int, dict]] = {kind: {} for kind in CHUNK_KINDS}
    for row in table.filter(pc.fill_null(keep, False)).to_pylist():
        chunks[row["kind"]].setdefault(row["seq"], row)
    rows_in, rows_out = ([from_record(chunks[kind][q]) for q in sorted(chunks[kind])] for kind in CHUNK_KINDS)
    inputs = [d for d in rows_in if isinstance(d, InputChunk)]  # every one: rows of kind input_chunk
    outputs = [d for d in rows_out if isinstance(d, OutputChunk)]
    return Recovery(s.token, epoch, tick, state, inputs, outputs)


def is_epoch(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value >= 0)


def fence(s: LogSession, epoch) -> None:
    """Refuse a writer whose epoch is not the session's (None: the caller is not fenced)."""
    if epoch is None:
        return
    if not is_epoch(epoch):
        raise ProtocolError(f"epoch must be a non-negative integer, got {epoch!r}", "invalid_value", "epoch")
    if epoch != s.epoch:
        raise ProtocolError(f"session {s.session_id!r} moved to another writer (epoch {s.epoch}, not {epoch})", "session_moved", "epoch")
