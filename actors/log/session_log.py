"""`SessionLog`: the append-only log of every session's context deltas, as Arrow batches of `deltas.SCHEMA`.

An append is acknowledged only once it is in the session's write-ahead file, so neither a dying
writer nor a restarted log loses it; memory holds the last `retention_s` of each open session,
older rows live in Parquet under `root` (a directory or any pyarrow filesystem URI), and reads
need the session's token. Storage (segments, WAL, Parquet, restore) is `actors.log.log_store`; what an
append accepts is `actors.log.log_checks`. `SessionLogActor` at the bottom is the Ray actor.

Keeping and deleting. `retention_s` only says what stays in memory; nothing leaves disk for it.
`keep_s` is the data-retention promise: a session closed for `keep_s` seconds is deleted, its
Parquet, WAL, snapshots and session.json with its folder, and whatever memory it held (None: kept
forever). Open sessions are never deleted. `sweep` does it, by itself every min(keep_s / 10, 60 s)
where an event loop runs (the actor's), its file work in a thread so appends go on; a restarted
log deletes at once what expired while it was down. A closed session leaves memory when it closes:
only the last few closed (read by tasks that ran late) are held, the others are read from disk
when asked for, so memory does not grow with the calls served.

Two ways to read. `read` returns a copy of the rows (through an actor call, serialised once).
`refs` returns where the rows are: the ObjectRefs of the sealed segments the log owns in the Ray
object store, then the few rows not sealed yet (and any from Parquet) as small tables; `fetch`
turns that into one table, reading the objects zero-copy when on the same node. Either way the
session's token is checked first; an ObjectRef, once handed out, is itself the capability to its
rows, so only a token holder ever gets one. Both can read less: `columns` (a projection: the big
`audio` and `frame` bytes stay where they are unless asked for), `kinds` and `last_s` (rows of
those kinds, in the last `last_s` seconds before the range's last row). Rows that left memory are
read from Parquet in a thread where the read is a coroutine (`refs`, `recovery`, and the actor's
`read`), so a long read never holds up another session's appends.

Failover: `put_snapshot` keeps each open session's newest engine state (durably, in a
pickle-free file), and `recovery` hands back what rebuilds the session elsewhere: that state, the
chunks logged after it, and the session's token. Keeping the token retrievable is the design
choice here: the actor that takes a session over must give the session's clients the token they
already hold, and only the log has it. So while a session is open its token is kept in clear
beside its WAL (mode 0600) and in memory; closing the session deletes it (session.json only ever
has the hash). `recovery` is an internal actor-to-actor call: nothing a client reaches routes to it.

Fencing: one writer per session at a time. Each session has a writer epoch (0 when opened, kept
in session.json); taking a session over (`recovery`) raises it and hands the new epoch to the
taker. A writer passes the epoch it holds to `append`, `put_snapshot` and `close`; one that holds
an older epoch was superseded (an actor that was slow, not dead, while its session moved) and is
refused with "session_moved", so it can neither interleave rows with the new writer's, nor
replace the snapshot the next takeover starts from, nor close a session that lives on. Callers
that pass no epoch are not fenced.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import secrets
import time
from collections import OrderedDict
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from protocols.chunks import InputChunk, OutputChunk, ProtocolError, check_session_id
from protocols.deltas import KINDS, SCHEMA, from_record
from protocols.seams import AppendResult, Recovery

from actors.log.log_checks import CHUNK_KINDS, as_batch, audio_bytes, check_row
from actors.log.log_restore import find, restore
from actors.log.log_store import INDEX, T, Block, LogSession, LogStore, dirname_of, from_ipc, hash_token, to_ipc
from actors.log.snapshot_codec import decode_state, encode_state

log = logging.getLogger("interplay.session_log")

_SMALL = [n for n in SCHEMA.names if n not in ("audio", "frame")]
_REMEMBERED_REQUESTS = 4096
_INDEX_T = ["index", "t"]
_RECENT_CLOSED = 32  # closed sessions held in memory (the last closed or read), the rest read from disk


class AppendRejected(ProtocolError):
    """An append whose every session was refused; `errors` says why, per session id."""

    def __init__(self, message: str, errors: dict[str, str] | None = None):
        super().__init__(message, "invalid_delta")
        self.errors = errors or {}


class SessionLog:
    """The log's logic, usable without Ray; `SessionLogActor` below is the Ray actor.

    One instance owns a root: two logs on the same root would write over each other's files.
    With `tick_ms`, a chunk's audio must be exactly one tick of it; without, any whole samples up to
    the longest tick (`protocols.chunks.check_audio`).
    `retention_s` is the in-memory window of an open session (older rows go to Parquet, nothing is
    deleted for it); `keep_s` how long a closed session is kept on disk before it is deleted
    (None: forever); `clock` the wall clock a session's closing time is taken from.
    `object_store` (default: whether Ray is running here) puts sealed segments into Ray's object
    store for `refs`; without it `refs` hands out the in-memory tables themselves.
    """

    def __init__(
        self,
        root: str | None = None,
        *,
        tick_ms: int | None = None,
        retention_s: float = 120.0,
        segment_s: float = 30.0,
        segment_rows: int = 4096,
        block_rows: int = 64,
        wal_dir: str | None = None,
        fsync: bool = False,
        object_store: bool | None = None,
        keep_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        root = os.fspath(root) if root else os.path.join(os.getcwd(), "data", "log")
        if "://" not in root:
            root = os.path.abspath(root)
        if not (retention_s > 0 and segment_s > 0 and segment_rows > 0 and block_rows > 0):
            raise ValueError("retention_s, segment_s, segment_rows and block_rows must be positive")
        if keep_s is not None and (isinstance(keep_s, bool) or not isinstance(keep_s, (int, float)) or not (math.isfinite(keep_s) and keep_s > 0)):
            raise ValueError("keep_s must be a positive number of seconds, or None to keep closed sessions forever")
        self.root = root
        self.keep_s = None if keep_s is None else float(keep_s)
        self._clock = clock
        self.retention_s = float(retention_s)
        self.segment_s = float(segment_s)
        self.segment_rows = int(segment_rows)
        self.block_rows = int(block_rows)
        self._tick_bytes = audio_bytes(tick_ms)
        shared = ray.is_initialized() if object_store is None else bool(object_store)
        self.store = LogStore(root, wal_dir, fsync, shared=shared)
        self._sessions: dict[str, LogSession] = {}  # the open ones
        self._recent: OrderedDict[str, LogSession] = OrderedDict()  # a few closed ones, newest last
        self._closed: dict[str, tuple[float, str]] = {}  # with keep_s, every closed one on disk: (closed_at, dirname)
        self._deleting: set[str] = set()
        self._sweeper: asyncio.Task | None = None
        self._requests: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        opened, closed, requests = restore(self.store)
        for rid, sid, span in requests:
            self._requests.setdefault(rid, {})[sid] = span
        for s in opened:
            self._sessions[s.session_id] = s
            self._evict(s)
        if self.keep_s is not None:
            now = self._clock()
            for s in closed:
                closed_at = now if s.closed_at is None else s.closed_at  # a closed one read back has its time
                self._closed[s.session_id] = (closed_at, s.dirname)
                if closed_at + self.keep_s <= now:  # expired while the log was down
                    self._delete(s.session_id)
        self._start_sweeper()
        if _in_ray_actor():
            ray.util.register_serializer(pa.Table, serializer=_table_to_ipc, deserializer=_table_from_ipc)

    # --- sessions ----------------------------------------------------------------------------

    def open(self, session_id: str, token: str | None = None) -> str:
        """Start a session's log and return its token, the capability every read needs.

        Opening an existing session is refused unless `token` is its token (then it is returned
        again: a retried or restored open is harmless). A caller may choose the token (>= 16 chars).
        """
        check_session_id(session_id)
        self._start_sweeper()
        if session_id in self._deleting:
            raise ProtocolError(f"session {session_id!r} is being deleted; open it again once it is gone", "session_exists", "session_id")
        s = self._find(session_id)
        if s is not None:
            if isinstance(token, str) and hmac.compare_digest(s.token_hash, hash_token(token)):
                if s.closed:
                    raise ProtocolError(f"session {session_id!r} is closed", "session_closed", "session_id")
                if s.token is None:
                    self.store.write_token(s, token)
                    s.token = token
                return token
            raise ProtocolError(f"session {session_id!r} already exists; only its token reopens it", "session_exists", "session_id")
        if token is None:
            token = secrets.token_urlsafe(24)
        elif not isinstance(token, str) or len(token) < 16:
            raise ProtocolError("token must be a string of at least 16 characters", "invalid_value", "token")
        s = LogSession(session_id, dirname_of(session_id), hash_token(token), token=token)
        self.store.write_token(s, token)
        self.store.write_meta(s)
        self._sessions[session_id] = s
        return token

    def close(self, session_id: str, epoch: int | None = None) -> None:
        """No more appends: the session's rows go to Parquet and leave memory; reads still work.
        With `epoch`, refused ("session_moved") unless it is the session's current writer epoch.
        From now on `keep_s` counts: the session is deleted once it has been closed that long."""
        s = self._find(session_id)
        if s is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        if s.closed:
            return
        _fence(s, epoch)
        for seg in [seg for seg in s.segments if seg.blocks is not None]:
            self.store.persist(s, seg)
        s.closed, s.closed_at = True, self._clock()
        self.store.write_meta(s)
        self.store.forget(s)
        del self._sessions[session_id]
        self._hold_closed(s)
        if self.keep_s is not None:
            self._closed[session_id] = (s.closed_at, s.dirname)
        self._start_sweeper()

    # --- keeping and deleting ----------------------------------------------------------------

    async def sweep(self, now: float | None = None) -> list[str]:
        """Delete every session closed for `keep_s` or longer at `now` (default: the clock): its
        files (in a thread: appends go on) and what it held in memory. Returns the ids deleted.
        Open sessions are never deleted; a delete that fails is logged and tried again next sweep."""
        if self.keep_s is None:
            return []
        now = self._clock() if now is None else float(now)
        due = [sid for sid, (closed_at, _) in self._closed.items() if closed_at + self.keep_s <= now]
        gone = []
        for sid in due:
            if await self._delete_async(sid):
                gone.append(sid)
        return gone

    async def _delete_async(self, session_id: str) -> bool:
        entry = self._closed.pop(session_id, None)
        if entry is None:  # deleted meanwhile by another sweep
            return False
        self._forget_closed(session_id)
        self._deleting.add(session_id)
        try:
            await asyncio.to_thread(self.store.delete, entry[1])
            return True
        except OSError as exc:
            log.error("session %r: could not delete its files (%s); trying again at the next sweep", session_id, exc)
            self._closed[session_id] = entry
            return False
        finally:
            self._deleting.discard(session_id)

    def _delete(self, session_id: str) -> None:
        """`_delete_async` inline, for a log starting up."""
        entry = self._closed.pop(session_id)
        self._forget_closed(session_id)
        try:
            self.store.delete(entry[1])
        except OSError as exc:
            log.error("session %r: could not delete its files (%s); trying again at the next sweep", session_id, exc)
            self._closed[session_id] = entry

    def _forget_closed(self, session_id: str) -> None:
        """Drop what memory holds of a closed session: its rows' places and its request ids."""
        self._recent.pop(session_id, None)
        for rid in [rid for rid, spans in self._requests.items() if session_id in spans]:
            del self._requests[rid][session_id]
            if not self._requests[rid]:
                del self._requests[rid]

    def _start_sweeper(self) -> None:
        """Sweep every min(keep_s / 10, 60 s) on the running event loop, if there is one (the
        actor's is; without one, call `sweep`)."""
        if self.keep_s is None or (self._sweeper is not None and not self._sweeper.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._sweeper = loop.create_task(self._sweep_forever(min(self.keep_s / 10, 60.0)))

    async def _sweep_forever(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await self.sweep()
            except Exception:
                log.exception("sweeping expired sessions failed; trying again in %.0f s", period)

    def _hold_closed(self, s: LogSession) -> None:
        self._recent[s.session_id] = s
        self._recent.move_to_end(s.session_id)
        while len(self._recent) > _RECENT_CLOSED:
            self._recent.popitem(last=False)

    def _known(self, session_id) -> tuple[LogSession | None, bool]:
        """The session if memory holds it, and whether storage must be asked (a closed one)."""
        if not isinstance(session_id, str):
            return None, False
        s = self._sessions.get(session_id) or self._recent.get(session_id)
        if s is not None:
            if s.closed:
                self._recent.move_to_end(session_id)
            return s, False
        if session_id in self._deleting or (self.keep_s is not None and session_id not in self._closed):
            return None, False  # with keep_s every closed session on disk is listed
        return None, True

    def _find(self, session_id) -> LogSession | None:
        """An open session, or a closed one from memory or else storage; None if there is none."""
        s, ask = self._known(session_id)
        if ask:
            s = self._found(session_id, self._from_store(session_id))
        return s

    async def _find_async(self, session_id) -> LogSession | None:
        """`_find`, asking storage in a thread."""
        s, ask = self._known(session_id)
        if ask:
            s = self._found(session_id, await asyncio.to_thread(self._from_store, session_id))
        return s

    def _from_store(self, session_id: str) -> LogSession | None:
        try:
            return find(self.store, session_id)
        except OSError as exc:
            raise ProtocolError(f"could not read session {session_id!r} from storage: {exc.strerror or exc}", "log_unavailable") from None

    def _found(self, session_id: str, s: LogSession | None) -> LogSession | None:
        """Hold a closed session read from storage, unless it went meanwhile (deleted) or is held already."""
        if s is None or session_id in self._deleting or (self.keep_s is not None and session_id not in self._closed):
            return None
        held = self._sessions.get(session_id) or self._recent.get(session_id)
        if held is not None:
            return held
        self._hold_closed(s)
        return s

    def stats(self) -> dict:
        """Figures for the whole log (not per session, so no token): memory, disk, process."""
        mem_rows = mem_bytes = pq_bytes = pq_files = wal_bytes = shared_objects = shared_bytes = 0
        for s in [*self._sessions.values(), *self._recent.values()]:
            for seg in s.segments:
                if seg.blocks is None:
                    pq_bytes += seg.parquet_bytes
                    pq_files += 1
                else:
                    mem_rows += seg.rows
                    mem_bytes += sum(b.batch.nbytes for b in seg.blocks)
                    wal_bytes += seg.wal_size
                    shared = [b for b in seg.blocks if b.ref is not None]
                    shared_objects += len(shared)
                    shared_bytes += sum(b.batch.nbytes for b in shared)
        return {
            "sessions": len(self._sessions) + len(self._recent),  # in memory: the open ones and a few closed
            "open_sessions": len(self._sessions),
            "closed_to_delete": len(self._closed),  # closed sessions on disk that keep_s will delete
            "memory_rows": mem_rows,
            "memory_bytes": mem_bytes,
            "object_store_objects": shared_objects,  # sealed segments held in Ray's object store
            "object_store_bytes": shared_bytes,  # of memory_bytes, the part in the object store
            "arrow_pool_bytes": pa.total_allocated_bytes(),
            "wal_bytes": wal_bytes,
            "parquet_bytes": pq_bytes,  # of the sessions in memory
            "parquet_files": pq_files,
            **_memory(),
            "pid": os.getpid(),
        }

    # --- append ------------------------------------------------------------------------------

    def append(self, deltas: list | pa.RecordBatch | pa.Table, request_id: str | None = None,
               epochs: dict[str, int] | None = None) -> AppendResult:
        """Append deltas of any number of sessions; the log numbers each session's rows from 0.

        Per session all or nothing: a session with one bad delta (or unknown, or closed) gets
        nothing appended and an entry in `result.errors`; the other sessions' deltas land. If no
        session lands and one had an error, `ProtocolError` is raised instead (its `errors`
        attribute holds the same map). A batch whose schema is not SCHEMA is refused whole. With
        `request_id`, a repeated call (e.g. Ray retrying it after a restart) returns the first
        call's indices, appending nothing. `epochs` maps a session to the writer epoch the caller
        holds (see Fencing above): a session whose epoch is not current lands nothing and is
        listed in `result.moved`.
        """
        if request_id is not None and not isinstance(request_id, str):
            raise ProtocolError("request_id must be a string", "invalid_value", "request_id")
        if epochs is not None and not (isinstance(epochs, dict) and all(isinstance(k, str) and _is_epoch(v) for k, v in epochs.items())):
            raise ProtocolError("epochs must map session ids to non-negative integers", "invalid_value", "epochs")
        moved: list[str] = []
        batch, positions, errors, checked = as_batch(deltas)
        groups: dict[str, list[int]] = {}
        for i, sid in enumerate(batch.column(0).to_pylist()):
            groups.setdefault(sid, []).append(i)
        ranges: dict[str, tuple[int, int]] = {}
        todo: list[tuple[LogSession, list[int]]] = []
        small = batch.select(_SMALL).to_pylist() if groups else []
        audio_len = pc.binary_length(batch.column("audio")).to_pylist() if groups else []  # pyright: ignore[reportAttributeAccessIssue] (pyarrow makes its compute functions at import time)
        frame_len = pc.binary_length(batch.column("frame")).to_pylist() if groups else []  # pyright: ignore[reportAttributeAccessIssue] (pyarrow makes its compute functions at import time)
        for sid, rows in groups.items():
            done = self._requests.get(request_id, {}).get(sid) if request_id is not None else None
            if sid in errors or done is not None:
                if done is not None:
                    ranges[sid] = done
                continue
            try:
                s = self._writable(sid)
                if epochs is not None and sid in epochs and epochs[sid] != s.epoch:
                    moved.append(sid)
                    continue
                for i in rows:
                    try:
                        check_row(small[i], audio_len[i], frame_len[i], rebuild=not checked, tick_bytes=self._tick_bytes)
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

    def _writable(self, session_id: str) -> LogSession:
        s = self._sessions.get(session_id)
        if s is not None:
            return s
        if self._find(session_id) is None:
            raise ProtocolError(f"unknown session {session_id!r}: open it before appending", "unknown_session", "session_id")
        raise ProtocolError(f"session {session_id!r} is closed", "session_closed", "session_id")

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
            self._requests.setdefault(request_id, {})[s.session_id] = (first, block.last)
            self._requests.move_to_end(request_id)
            while len(self._requests) > _REMEMBERED_REQUESTS:
                self._requests.popitem(last=False)
        if seg.tail_rows >= self.block_rows:
            self.store.seal(seg)
        if seg.rows >= self.segment_rows or seg.t_max - seg.t_min >= self.segment_s:
            self.store.rotate(seg)
        try:
            self._evict(s)
        except Exception:  # the rows are safe in the WAL; persisting is retried on the next append
            log.exception("session %r: could not persist old rows to Parquet", s.session_id)
        return first, block.last

    def _evict(self, s: LogSession) -> None:
        """Persist the session's finished segments that are older than the retention window."""
        cutoff = s.newest_t - self.retention_s
        for seg in list(s.segments):
            if seg.blocks is not None and seg.writer is None and seg.t_max < cutoff:
                self.store.persist(s, seg)

    # --- failover ----------------------------------------------------------------------------

    async def put_snapshot(self, session_id: str, tick: int, state: dict, epoch: int | None = None) -> None:
        """Keep `state` (an `Engine.export_session` taken after tick `tick` was stepped) as the
        session's newest snapshot: in memory (a copy), and in its folder (written to a temporary file and
        renamed; fsynced if the log fsyncs), so a restarted log has it. An older snapshot goes; one
        older than the kept one changes nothing, one of the same tick replaces it (a retry).

        ProtocolError: unknown or closed session ("unknown_session", "session_closed"), a tick that
        is not an integer >= 0, or a state that is not a dict of plain values and numpy arrays
        ("invalid_state"), or an `epoch` that is not the session's writer epoch ("session_moved").
        The file is written off the event loop; appends go on meanwhile.
        """
        s = self._writable(session_id)
        _fence(s, epoch)
        if isinstance(tick, bool) or not isinstance(tick, (int, np.integer)) or tick < 0:
            raise ProtocolError(f"tick must be a non-negative integer, got {tick!r}", "invalid_value", "tick")
        tick = int(tick)
        encoded = encode_state(state)  # checks the state before anything is written
        if s.snapshot_tick is not None and tick < s.snapshot_tick:
            return
        try:
            await asyncio.to_thread(self.store.write_snapshot, s, tick, encoded)
        except OSError as exc:
            raise ProtocolError(f"could not keep the snapshot of session {session_id!r}: {exc.strerror or exc}", "log_unavailable") from None
        if s.closed:  # closed while the file was written
            self.store.forget(s)
            raise ProtocolError(f"session {session_id!r} is closed", "session_closed", "session_id")
        if s.snapshot_tick is None or tick >= s.snapshot_tick:
            s.snapshot_tick, s.snapshot = tick, encoded
        self.store.drop_snapshots(s, s.snapshot_tick)

    async def recovery(self, session_id: str, take_over: bool = True) -> Recovery:
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
        s = self._writable(session_id)
        if take_over:
            s.epoch += 1
            try:
                await asyncio.to_thread(self.store.write_meta, s)
            except OSError as exc:  # the raise stands in memory: no rollback under a takeover that raced this one
                raise ProtocolError(f"could not take over session {session_id!r}: {exc.strerror or exc}", "log_unavailable") from None
        epoch = s.epoch
        tick, encoded, state = s.snapshot_tick, s.snapshot, None
        if tick is not None and encoded is None:  # restored: the snapshot is on disk only
            try:
                encoded = await asyncio.to_thread(self.store.load_snapshot, s, tick)
            except (OSError, ValueError, KeyError) as exc:
                log.error("session %r: snapshot of tick %d is unreadable (%s); recovering from the whole log", session_id, tick, exc)
                tick = None
            else:
                if s.snapshot_tick == tick:
                    s.snapshot = encoded
        if tick is not None and encoded is not None:
            try:
                state = decode_state(*encoded)  # a fresh copy each time: the caller may change it
            except (ValueError, KeyError) as exc:
                log.error("session %r: snapshot of tick %d is unreadable (%s); recovering from the whole log", session_id, tick, exc)
                tick = None
        after = -1 if tick is None else tick
        plan: list[tuple] = []
        for seg in s.segments:
            if seg.blocks is None:
                if seg.seq_max is None or seg.seq_max > after:
                    plan.append(("parquet", seg.parquet_path, [("seq", ">", after)]))
            else:
                plan += [("rows", b.batch) for b in seg.blocks]
        table = self._table(await self._resolve_async(plan, None, session_id), None)
        keep = pc.and_(pc.is_in(table.column("kind"), pa.array(CHUNK_KINDS)), pc.greater(table.column("seq"), after))  # pyright: ignore[reportAttributeAccessIssue] (pyarrow makes its compute functions at import time)
        chunks: dict[str, dict[int, dict]] = {kind: {} for kind in CHUNK_KINDS}
        for row in table.filter(pc.fill_null(keep, False)).to_pylist():
            chunks[row["kind"]].setdefault(row["seq"], row)
        rows_in, rows_out = ([from_record(chunks[kind][q]) for q in sorted(chunks[kind])] for kind in CHUNK_KINDS)
        inputs = [d for d in rows_in if isinstance(d, InputChunk)]  # every one: rows of kind input_chunk
        outputs = [d for d in rows_out if isinstance(d, OutputChunk)]
        return Recovery(s.token, epoch, tick, state, inputs, outputs)

    # --- reads -------------------------------------------------------------------------------

    def read(self, session_id: str, token: str, start: int = 0, end: int | None = None, *,
             columns: list[str] | None = None, kinds: list[str] | None = None, last_s: float | None = None) -> pa.Table:
        """Rows with start <= index < end (end None: up to the newest), oldest first; only `columns`
        (None: all; "index" always), only rows of `kinds` (None: all) whose t is at most `last_s`
        before the t of the range's last row (None: any). Reads Parquet inline; the actor's `read`
        is a coroutine that reads it in a thread."""
        s = self._authorize(session_id, token)
        columns, kinds, last_s = _options(columns, kinds, last_s)
        start, end = _span(s, start, end)
        since_t = None if last_s is None else _since(self._resolve(self._last_row(s, start, end), _INDEX_T, session_id), last_s)
        plan = self._plan(s, start, end, columns, kinds, since_t)
        return self._table(self._resolve(plan, columns, session_id), columns)

    async def refs(self, session_id: str, token: str, start: int = 0, end: int | None = None, *,
                   columns: list[str] | None = None, kinds: list[str] | None = None, last_s: float | None = None) -> list[tuple[int, int, "ray.ObjectRef | pa.Table"]]:
        """Where rows start <= index < end are: (first_index, last_index, part) in index order.

        A part is the ObjectRef of a sealed segment in the object store (one Arrow IPC stream,
        owned by this log; it may hold rows outside the range), or a table of exactly its rows
        (those not sealed yet, at most `block_rows` of the newest, and any read from Parquet, which
        is read in a thread). `fetch` reads them into one table. With `columns`, `kinds` or
        `last_s` (as `read`) every part is a table of just those rows and columns: the reader
        never receives the bytes it did not ask for.
        """
        s = await self._authorize_async(session_id, token)
        start, end, columns, kinds, since_t = await self._window(s, session_id, start, end, columns, kinds, last_s)
        plan = self._plan(s, start, end, columns, kinds, since_t, shared=True)
        items = await self._resolve_async(plan, columns, session_id)
        parts: list[tuple[int, int, object]] = []
        rows: list[pa.RecordBatch] = []  # consecutive rows not in the object store, sent as one table

        def flush():
            if rows:
                table = pa.Table.from_batches(rows, schema=_schema(columns))
                index = table.column("index")
                parts.append((index[0].as_py(), index[-1].as_py(), table))
                rows.clear()

        for item in items:
            if item[0] == "ref":
                flush()
                parts.append(item[1:])
            elif item[1].num_rows:
                rows.append(item[1])
        flush()
        return parts

    def _authorize(self, session_id: str, token: str) -> LogSession:
        return _check_token(self._find(session_id), session_id, token)

    async def _authorize_async(self, session_id: str, token: str) -> LogSession:
        return _check_token(await self._find_async(session_id), session_id, token)

    async def _window(self, s: LogSession, session_id: str, start, end, columns, kinds, last_s
                      ) -> tuple[int, int, list[str] | None, list[str] | None, float | None]:
        """A read's arguments checked, as `_plan` takes them: (start, end, columns, kinds, since_t);
        the t of the range's last row is read in a thread if it is in Parquet."""
        columns, kinds, last_s = _options(columns, kinds, last_s)
        start, end = _span(s, start, end)
        since_t = None if last_s is None else _since(await self._resolve_async(self._last_row(s, start, end), _INDEX_T, session_id), last_s)
        return start, end, columns, kinds, since_t

    def _last_row(self, s: LogSession, start: int, end: int) -> list[tuple]:
        """The plan that reads the index and t of row end - 1 (none for an empty range)."""
        return self._plan(s, end - 1, end, _INDEX_T) if end > start else []

    def _plan(self, s: LogSession, start: int, end: int, columns: list[str] | None = None, kinds: list[str] | None = None,
              since_t: float | None = None, shared: bool = False) -> list[tuple]:
        """Where rows start <= index < end (of `kinds`, with t >= since_t) are, in index order:
        ("ref", first, last, ObjectRef) for a block in the object store (only when `shared` and
        nothing is projected or filtered), ("rows", batch) for rows in memory (a zero-copy slice
        unless filtered), ("parquet", path, filters) for rows in Parquet. Made on the event loop
        (it reads the session's segments); `_resolve` may then run in a thread."""
        plain = columns is None and kinds is None and since_t is None
        plan: list[tuple] = []
        for seg in s.segments:
            if seg.last < start or seg.first >= end or (since_t is not None and seg.t_max < since_t):
                continue
            if seg.blocks is None:
                filters: list[tuple] = [("index", ">=", start), ("index", "<", end)]
                if kinds is not None:
                    filters.append(("kind", "in", list(kinds)))
                if since_t is not None:
                    filters.append(("t", ">=", since_t))
                plan.append(("parquet", seg.parquet_path, filters))
                continue
            for b in seg.blocks:
                if b.last < start or b.first >= end or (since_t is not None and b.t_max < since_t):
                    continue
                if shared and plain and b.ref is not None:
                    plan.append(("ref", b.first, b.last, b.ref))
                    continue
                lo = max(start, b.first) - b.first
                batch = b.batch.slice(lo, min(end, b.last + 1) - b.first - lo)
                if kinds is not None or (since_t is not None and b.t_min < since_t):
                    keep = pc.is_in(batch.column("kind"), pa.array(kinds)) if kinds is not None else None  # pyright: ignore[reportAttributeAccessIssue] (pyarrow makes its compute functions at import time)
                    if since_t is not None:
                        late = pc.greater_equal(batch.column(T), since_t)  # pyright: ignore[reportAttributeAccessIssue] (pyarrow makes its compute functions at import time)
                        keep = late if keep is None else pc.and_(keep, late)  # pyright: ignore[reportAttributeAccessIssue] (pyarrow makes its compute functions at import time)
                    batch = batch.filter(keep)
                plan.append(("rows", batch if columns is None else batch.select(columns)))
        return plan

    def _resolve(self, plan: list[tuple], columns: list[str] | None, session_id: str) -> list[tuple]:
        """`plan` with each Parquet item read into ("rows", batch) items. Touches nothing the
        event loop changes: it may run in a thread."""
        out: list[tuple] = []
        try:
            for item in plan:
                if item[0] == "parquet":
                    out += [("rows", b) for b in self.store.load(item[1], item[2], columns)]
                else:
                    out.append(item)
        except FileNotFoundError:
            raise ProtocolError(f"session {session_id!r} was deleted", "unknown_session", "session_id") from None
        except OSError as exc:
            raise ProtocolError(f"could not read session {session_id!r} from storage: {exc.strerror or exc}", "log_unavailable") from None
        return out

    async def _resolve_async(self, plan: list[tuple], columns: list[str] | None, session_id: str) -> list[tuple]:
        """`_resolve` in a thread when there is Parquet to read, so the event loop (every other
        session's appends) goes on meanwhile; inline when everything is in memory."""
        if any(item[0] == "parquet" for item in plan):
            return await asyncio.to_thread(self._resolve, plan, columns, session_id)
        return plan

    @staticmethod
    def _table(items: list[tuple], columns: list[str] | None) -> pa.Table:
        return pa.Table.from_batches([item[1] for item in items], schema=_schema(columns))


def _is_epoch(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value >= 0)


def _fence(s: LogSession, epoch) -> None:
    """Refuse a writer whose epoch is not the session's (None: the caller is not fenced)."""
    if epoch is None:
        return
    if not _is_epoch(epoch):
        raise ProtocolError(f"epoch must be a non-negative integer, got {epoch!r}", "invalid_value", "epoch")
    if epoch != s.epoch:
        raise ProtocolError(f"session {s.session_id!r} moved to another writer (epoch {s.epoch}, not {epoch})", "session_moved", "epoch")


def _span(s: LogSession, start, end) -> tuple[int, int]:
    """[start, end) checked and clipped to the session's rows."""
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ProtocolError(f"start must be a non-negative index, got {start!r}", "invalid_value", "start")
    if end is not None and (isinstance(end, bool) or not isinstance(end, (int, np.integer))):
        raise ProtocolError(f"end must be an index or None, got {end!r}", "invalid_value", "end")
    return int(start), s.next_index if end is None else min(int(end), s.next_index)


def _check_token(s: LogSession | None, session_id, token) -> LogSession:
    if s is None:
        raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
    if not isinstance(token, str) or not hmac.compare_digest(s.token_hash, hash_token(token)):
        raise ProtocolError(f"this token does not grant access to session {session_id!r}", "forbidden", "token")
    return s


def _options(columns, kinds, last_s) -> tuple[list[str] | None, list[str] | None, float | None]:
    """A read's projection and filters, checked: columns in SCHEMA's order with "index" always
    among them (None: all), kinds known ones, last_s a finite number of seconds >= 0."""
    if columns is not None:
        if isinstance(columns, str) or not isinstance(columns, (list, tuple)) or not all(isinstance(c, str) for c in columns):
            raise ProtocolError("columns must be a list of column names", "invalid_value", "columns")
        unknown = [c for c in columns if c not in SCHEMA.names]
        if unknown:
            raise ProtocolError(f"unknown columns {unknown}; the log has {SCHEMA.names}", "invalid_value", "columns")
        columns = [n for n in SCHEMA.names if n in columns or n == "index"]
        if len(columns) == len(SCHEMA.names):
            columns = None
    if kinds is not None:
        if isinstance(kinds, str) or not isinstance(kinds, (list, tuple)) or not all(k in KINDS for k in kinds):
            raise ProtocolError(f"kinds must be a list of delta kinds out of {list(KINDS)}", "invalid_value", "kinds")
        kinds = list(kinds)
    if last_s is not None:
        if isinstance(last_s, bool) or not isinstance(last_s, (int, float, np.number)) or not (math.isfinite(last_s) and last_s >= 0):
            raise ProtocolError(f"last_s must be a non-negative number of seconds, got {last_s!r}", "invalid_value", "last_s")
        last_s = float(last_s)
    return columns, kinds, last_s


def _since(items: list[tuple], last_s: float) -> float | None:
    """The first t of a window of `last_s` seconds ending at the t of the row `items` hold (None: no row)."""
    ts = [item[1].column("t") for item in items if item[1].num_rows]
    return ts[-1][-1].as_py() - last_s if ts else None


def _as_table(part: object) -> pa.Table:
    """A part of `refs` as a table: a sealed block's IPC stream (from the object store), a batch or a table."""
    if isinstance(part, pa.Buffer):
        return from_ipc(part)
    if isinstance(part, pa.RecordBatch):
        return pa.Table.from_batches([part])
    if isinstance(part, pa.Table):
        return part
    raise TypeError(f"not a part of a session log: {type(part).__name__}")


def _schema(columns: list[str] | None) -> pa.Schema:
    return SCHEMA if columns is None else pa.schema([SCHEMA.field(n) for n in columns])


async def fetch(parts: list[tuple[int, int, object]], start: int = 0, end: int | None = None, columns: list[str] | None = None) -> pa.Table:
    """The rows of `parts` (from `SessionLog.refs`) with start <= index < end as one table
    (`columns`: those `refs` was asked for, so that no parts still gives the right schema).

    Objects are awaited together; on the log's node their columns point into the object store
    (no copy). The table keeps them alive as long as it lives.
    """
    refs = [p for _, _, p in parts if isinstance(p, ray.ObjectRef)]
    got = iter(await asyncio.gather(*refs)) if refs else iter(())
    tables = []
    for first, last, ref_or_part in parts:
        part = _as_table(next(got) if isinstance(ref_or_part, ray.ObjectRef) else ref_or_part)
        if first + part.num_rows - 1 == last:  # contiguous rows: cut by position
            lo = max(start - first, 0)
            hi = part.num_rows if end is None else min(end - first, part.num_rows)
        else:  # a filtered table (kinds, last_s): cut by its index column, which is in order
            index = part.column("index").to_numpy()
            lo = int(np.searchsorted(index, start, side="left"))
            hi = part.num_rows if end is None else int(np.searchsorted(index, end, side="left"))
        if hi > lo:
            tables.append(part.slice(lo, hi - lo))
    return pa.concat_tables(tables) if tables else _schema(_options(columns, None, None)[0]).empty_table()


def _memory() -> dict:
    """This process's resident memory, and the part of it not shared (Ray's object store pages are shared)."""
    try:
        import psutil  # Ray's workers have it

        info = psutil.Process().memory_info()
        return {"rss_bytes": info.rss, "rss_private_bytes": info.rss - info.shared}
    except ImportError:
        try:
            with open("/proc/self/statm") as f:
                _, rss, shared = (int(v) * os.sysconf("SC_PAGE_SIZE") for v in f.read().split()[:3])
            return {"rss_bytes": rss, "rss_private_bytes": rss - shared}
        except (OSError, ValueError):
            return {"rss_bytes": None, "rss_private_bytes": None}


# --- Ray --------------------------------------------------------------------------------------


def _in_ray_actor() -> bool:
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _table_to_ipc(table: pa.Table) -> pa.Buffer:
    """A table as one Arrow IPC buffer: Ray's own Table reducer costs about 1.5 ms per chunk here,
    and a read is many zero-copy slices. The log's actor process sends every table this way."""
    return to_ipc(table)


def _table_from_ipc(buf: pa.Buffer) -> pa.Table:
    return from_ipc(buf)


class ServedSessionLog(SessionLog):
    """The log as its actor serves it: `read` is a coroutine whose Parquet part is read in a
    thread (the plain class reads inline, for callers without an event loop)."""

    async def read(self, session_id: str, token: str, start: int = 0, end: int | None = None, *,
                   columns: list[str] | None = None, kinds: list[str] | None = None, last_s: float | None = None) -> pa.Table:
        s = await self._authorize_async(session_id, token)
        start, end, columns, kinds, since_t = await self._window(s, session_id, start, end, columns, kinds, last_s)
        plan = self._plan(s, start, end, columns, kinds, since_t)
        return self._table(await self._resolve_async(plan, columns, session_id), columns)



# An async actor (all methods run on its one event loop, so no locks: what runs in a thread only
# reads files and immutable batches). Restarted by Ray whenever it dies (its state comes back from
# `root`); calls in flight are retried, so pass `request_id` to `append` to make a retried append
# idempotent.
SessionLogActor = ray.remote(max_restarts=-1, max_task_retries=-1)(ServedSessionLog)
