"""`SessionLog`: the append-only log of every session's context deltas, as Arrow batches of `deltas.SCHEMA`.

An append is acknowledged only once it is in the session's write-ahead file, so neither a dying
writer nor a restarted log loses it; memory holds the last `retention_s` of each open session,
older rows live in Parquet under `root` (a directory or any pyarrow filesystem URI), and reads
need the session's token. `SessionLog` is the façade over one module per role:

- `actors.log.log_sessions`: the sessions in memory (open, a few recently closed), tokens, request ids;
- `actors.log.log_appends`: an append checked (`actors.log.log_checks`), numbered and written;
- `actors.log.log_reads`: `read`, `refs` and `fetch`, with projection and filters;
- `actors.log.log_failover`: snapshots, `recovery` and the writer epochs that fence a superseded writer;
- `actors.log.log_retention`: deleting sessions closed for `keep_s`;
- `actors.log.log_store` and `actors.log.log_restore`: segments, WAL and Parquet files, and reading them back;
- `actors.log.log_actor`: `SessionLogActor`, the Ray actor.

Keeping and deleting. `retention_s` only says what stays in memory; nothing leaves disk for it.
`keep_s` is the data-retention promise: a session closed for `keep_s` seconds is deleted (None:
kept forever); open sessions never are. A closed session leaves memory when it closes: only the
last few closed (read by tasks that ran late) are held, the others are read from disk when asked
for, so memory does not grow with the calls served.
"""

from __future__ import annotations

import hmac
import math
import os
import secrets
import time
from typing import Callable

import pyarrow as pa
import ray

from protocols.chunks import ProtocolError, check_session_id
from protocols.seams import AppendResult, Recovery

from actors.log import log_failover, log_reads
from actors.log.log_appends import Appender
from actors.log.log_checks import audio_bytes
from actors.log.log_failover import fence
from actors.log.log_restore import restore
from actors.log.log_retention import Retention
from actors.log.log_sessions import Sessions
from actors.log.log_store import LogSession, LogStore, dirname_of, hash_token


class SessionLog:
    """The log's logic, usable without Ray; `actors.log.log_actor.SessionLogActor` is the Ray actor.

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
        shared = ray.is_initialized() if object_store is None else bool(object_store)
        self.store = LogStore(root, wal_dir, fsync, shared=shared)
        self.sessions = Sessions(self.store, self.keep_s)
        self.appender = Appender(self.store, self.sessions, tick_bytes=audio_bytes(tick_ms), retention_s=float(retention_s),
                                 segment_s=float(segment_s), segment_rows=int(segment_rows), block_rows=int(block_rows))
        self.retention = Retention(self.sessions, self.store, self.keep_s, clock)
        opened, closed, requests = restore(self.store)
        for rid, sid, span in requests:
            self.sessions.requests.setdefault(rid, {})[sid] = span
        for s in opened:
            self.sessions.open[s.session_id] = s
            self.appender.evict(s)
        self.retention.restored(closed)
        self.retention.start()

    # --- sessions ----------------------------------------------------------------------------

    def open(self, session_id: str, token: str | None = None) -> str:
        """Start a session's log and return its token, the capability every read needs.

        Opening an existing session is refused unless `token` is its token (then it is returned
        again: a retried or restored open is harmless). A caller may choose the token (>= 16 chars).
        """
        check_session_id(session_id)
        self.retention.start()
        if session_id in self.sessions.deleting:
            raise ProtocolError(f"session {session_id!r} is being deleted; open it again once it is gone", "session_exists", "session_id")
        s = self.sessions.find(session_id)
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
        self.sessions.open[session_id] = s
        return token

    def close(self, session_id: str, epoch: int | None = None) -> None:
        """No more appends: the session's rows go to Parquet and leave memory; reads still work.
        With `epoch`, refused ("session_moved") unless it is the session's current writer epoch.
        From now on `keep_s` counts: the session is deleted once it has been closed that long."""
        s = self.sessions.find(session_id)
        if s is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        if s.closed:
            return
        fence(s, epoch)
        for seg in [seg for seg in s.segments if seg.blocks is not None]:
            self.store.persist(s, seg)
        s.closed, s.closed_at = True, self._clock()
        self.store.write_meta(s)
        self.store.forget(s)
        del self.sessions.open[session_id]
        self.sessions.hold_closed(s)
        self.retention.closing(s)
        self.retention.start()

    # --- keeping and deleting ----------------------------------------------------------------

    async def sweep(self, now: float | None = None) -> list[str]:
        """Delete every session closed for `keep_s` or longer at `now` (default: the clock): its
        files (in a thread: appends go on) and what it held in memory. Returns the ids deleted.
        Open sessions are never deleted; a delete that fails is logged and tried again next sweep."""
        return await self.retention.sweep(now)

    # --- figures -----------------------------------------------------------------------------

    def stats(self) -> dict:
        """Figures for the whole log (not per session, so no token): memory, disk, process."""
        mem_rows = mem_bytes = pq_bytes = pq_files = wal_bytes = shared_objects = shared_bytes = 0
        for s in self.sessions.in_memory():
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
            "sessions": len(self.sessions.open) + len(self.sessions.recent),  # in memory: the open ones and a few closed
            "open_sessions": len(self.sessions.open),
            "closed_to_delete": len(self.sessions.closed),  # closed sessions on disk that keep_s will delete
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
        holds (see fencing in `actors.log.log_failover`): a session whose epoch is not current
        lands nothing and is listed in `result.moved`.
        """
        return self.appender.append(deltas, request_id, epochs)

    # --- failover ----------------------------------------------------------------------------

    async def put_snapshot(self, session_id: str, tick: int, state: dict, epoch: int | None = None) -> None:
        """Keep `state` as the session's newest snapshot, durably and off the event loop (see
        `actors.log.log_failover.put_snapshot`)."""
        await log_failover.put_snapshot(self.store, self.sessions.writable(session_id), tick, state, epoch)

    async def recovery(self, session_id: str, take_over: bool = True) -> Recovery:
        """What rebuilds an open session on another interaction actor, token included: for the
        trusted internal caller only (see `actors.log.log_failover.recovery`)."""
        return await log_failover.recovery(self.store, self.sessions.writable(session_id), take_over)

    # --- reads -------------------------------------------------------------------------------

    def read(self, session_id: str, token: str, start: int = 0, end: int | None = None, *,
             columns: list[str] | None = None, kinds: list[str] | None = None, last_s: float | None = None) -> pa.Table:
        """Rows with start <= index < end (end None: up to the newest), oldest first; only `columns`
        (None: all; "index" always), only rows of `kinds` (None: all) whose t is at most `last_s`
        before the t of the range's last row (None: any). Reads Parquet inline; the actor's `read`
        is a coroutine that reads it in a thread."""
        return log_reads.read(self.store, self.sessions.authorize(session_id, token), start, end, columns, kinds, last_s)

    async def refs(self, session_id: str, token: str, start: int = 0, end: int | None = None, *,
                   columns: list[str] | None = None, kinds: list[str] | None = None, last_s: float | None = None) -> list[tuple[int, int, "ray.ObjectRef | pa.Table"]]:
        """Where rows start <= index < end are: (first_index, last_index, part) in index order.

        A part is the ObjectRef of a sealed segment in the object store (one Arrow IPC stream,
        owned by this log; it may hold rows outside the range), or a table of exactly its rows
        (those not sealed yet, at most `block_rows` of the newest, and any read from Parquet, which
        is read in a thread). `actors.log.log_reads.fetch` reads them into one table. With `columns`, `kinds` or
        `last_s` (as `read`) every part is a table of just those rows and columns: the reader
        never receives the bytes it did not ask for.
        """
        s = await self.sessions.authorize_async(session_id, token)
        return await log_reads.refs(self.store, s, start, end, columns, kinds, last_s)


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
