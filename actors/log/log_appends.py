"""Appending to a SessionLog: one call's deltas of any number of sessions, checked, numbered and written.

An append's batch is checked (`actors.log.log_checks`) and split by session; per session it is
all or nothing. Each accepted session's rows are numbered from its next index, written to its
current WAL file (`LogStore.write`: only then does anything in memory change) and kept as a
zero-copy slice of the call's batch; every `block_rows` rows the slices are sealed into one
block, and a segment is finished after `segment_rows` rows or `segment_s` seconds. Finished
segments older than `retention_s` before a session's newest row go to Parquet (`evict`).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from protocols.chunks import ProtocolError
from protocols.deltas import SCHEMA
from protocols.seams import AppendResult

from actors.log.log_checks import as_batch, check_row
from actors.log.log_failover import is_epoch
from actors.log.log_sessions import Sessions
from actors.log.log_store import INDEX, Block, LogSession, LogStore

log = logging.getLogger("interplay.session_log")

SMALL_COLUMNS = [n for n in SCHEMA.names if n not in ("audio", "frame")]  # what checking a row reads


class AppendRejected(ProtocolError):
    """An append whose every session was refused; `errors` says why, per session id."""

    def __init__(self, message: str, errors: dict[str, str] | None = None):
        super().__init__(message, "invalid_delta")
        self.errors = errors or {}


class Appender:
    """Appends to the open sessions of `sessions`; `tick_bytes` is a chunk's exact audio length
    (None: any), the rest sizes the in-memory segments as `SessionLog` documents."""

    def __init__(self, store: LogStore, sessions: Sessions, *, tick_bytes: int | None, retention_s: float,
                 segment_s: float, segment_rows: int, block_rows: int):
        self.store = store
        self.sessions = sessions
        self.tick_bytes = tick_bytes
        self.retention_s = retention_s
        self.segment_s = segment_s
        self.segment_rows = segment_rows
        self.block_rows = block_rows

    def append(self, deltas: list | pa.RecordBatch | pa.Table, request_id: str | None = None,
               epochs: dict[str, int] | None = None) -> AppendResult:
        """`SessionLog.append`: check, number and write each session's rows; see there."""
        if request_id is not None and not isinstance(request_id, str):
            raise ProtocolError("request_id must be a string", "invalid_value", "request_id")
        if epochs is not None and not (isinstance(epochs, dict) and all(isinstance(k, str) and is_epoch(v) for k, v in epochs.items())):
            raise ProtocolError("epochs must map session ids to non-negative integers", "invalid_value", "epochs")
        moved: list[str] = []
        batch, positions, errors, checked = as_batch(deltas)
        groups: dict[str, list[int]] = {}
        for i, sid in enumerate(batch.column(0).to_pylist()):
            groups.setdefault(sid, []).append(i)
        ranges: dict[str, tuple[int, int]] = {}
        todo: list[tuple[LogSession, list[int]]] = []
        small = batch.select(SMALL_COLUMNS).to_pylist() if groups else []
        audio_len = pc.binary_length(batch.column("audio")).to_pylist() if groups else []  # pyright: ignore[reportAttributeAccessIssue] (pyarrow makes its compute functions at import time)
        frame_len = pc.binary_length(batch.column("frame")).to_pylist() if groups else []  # pyright: ignore[reportAttributeAccessIssue] (pyarrow makes its compute functions at import time)
        for sid, rows in groups.items():
            done = self.sessions.request_span(request_id, sid)
            if sid in errors or done is not None:
                if done is not None:
                    ranges[sid] = done
                continue
            try:
                s = self.sessions.writable(sid)
                if epochs is not None and sid in epochs and epochs[sid] != s.epoch:
                    moved.append(sid)
                    continue
                for i in rows:
                    try:
                        check_row(small[i], audio_len[i], frame_len[i], rebuild=not checked, tick_bytes=self.tick_bytes)
                    except ProtocolError as exc:
                        what = small[i]["kind"] if small[i]["seq"] is None else f"{small[i]['kind']} seq {small[i]['seq']}"
                        raise ProtocolError(f"delta {positions[i]} ({what}): {exc}", exc.code, exc.param) from None
                todo.append((s, rows))
            except ProtocolError as exc:
                errors[sid] = str(exc)
        if todo:
            # Number every accepted row in one column, then hand each session its slice of the batch.
            index = np.full(batch.num_rows, -1, dtype=np.int64)
            for s, rows in todo:
                index[rows] = np.arange(s.next_index, s.next_index + len(rows))
            batch = batch.set_column(INDEX, SCHEMA.field(INDEX), pa.array(index))
            for s, rows in todo:
                lo = rows[0]
                part = batch.slice(lo, len(rows)) if rows[-1] - lo + 1 == len(rows) else batch.take(pa.array(rows))
                try:
                    ranges[s.session_id] = self._append_rows(s, part, [small[i]["t"] for i in rows], request_id)
                except ProtocolError as exc:
                    errors[s.session_id] = str(exc)
        if errors and not ranges:
            detail = "; ".join(f"session {sid!r}: {msg}" for sid, msg in errors.items())
            raise AppendRejected(f"append rejected: {detail}", errors)
        return AppendResult(ranges, errors, moved)

    def _append_rows(self, s: LogSession, part: pa.RecordBatch, ts: list[float], request_id: str | None) -> tuple[int, int]:
        n, first = part.num_rows, s.next_index
        try:
            seg = s.current or self.store.new_segment(s)
        except OSError as exc:
            raise ProtocolError(f"could not open the log of session {s.session_id!r}: {exc}", "log_unavailable") from None
        self.store.write(s, seg, part, request_id)
        # Only now, with the rows on disk, does the log change.
        block = Block(part, first, min(ts), max(ts))
        seg.memory.append(block)
        seg.tail_rows += n
        seg.last = block.last
        seg.t_min, seg.t_max = min(seg.t_min, block.t_min), max(seg.t_max, block.t_max)
        s.next_index += n
        s.newest_t = max(s.newest_t, block.t_max)
        if request_id is not None:
            self.sessions.remember_request(request_id, s.session_id, (first, block.last))
        if seg.tail_rows >= self.block_rows:
            self.store.seal(seg)
        if seg.rows >= self.segment_rows or seg.t_max - seg.t_min >= self.segment_s:
            self.store.rotate(seg)
        try:
            self.evict(s)
        except Exception:  # the rows are safe in the WAL; persisting is retried on the next append
            log.exception("session %r: could not persist old rows to Parquet", s.session_id)
        return first, block.last

    def evict(self, s: LogSession) -> None:
        """Persist the session's finished segments that are older than the retention window."""
        cutoff = s.newest_t - self.retention_s
        for seg in list(s.segments):
            if seg.blocks is not None and seg.writer is None and seg.t_max < cutoff:
                self.store.persist(s, seg)
