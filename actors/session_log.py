"""SessionLog: the append-only log of every session's context deltas, as Arrow batches of `deltas.SCHEMA`.

An append is acknowledged only once it is in the session's Arrow IPC write-ahead file, so neither a dying
writer nor a restarted log loses it; memory holds the retention window, older rows live in Parquet under
`root` (a directory or any pyarrow filesystem URI), and reads need the session's token.

Layout under `root`, one folder per session: sessions/<dir>/session.json (id, hashed token, closed),
sessions/<dir>/seg-<first>-<last>.parquet (persisted rows) and wal-<first>.arrows (rows not yet in
Parquet, one IPC stream per in-memory segment; kept on local disk under `wal_dir` when `root` is remote).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import ray

from protocols.chunks import CHUNK_SAMPLES, MAX_FRAME_EDGE, PATCH, ProtocolError, check_session_id
from protocols.deltas import KINDS, SCHEMA, from_record, kind_of, to_record

log = logging.getLogger(__name__)

AUDIO_BYTES = CHUNK_SAMPLES * 2  # int16 little-endian
CHUNK_KINDS = ("input_chunk", "output_chunk")
_INDEX = SCHEMA.get_field_index("index")
_T = SCHEMA.get_field_index("t")
_SMALL = [n for n in SCHEMA.names if n not in ("audio", "frame")]
_ZERO_AUDIO = bytes(AUDIO_BYTES)
_SEG_RE = re.compile(r"seg-(\d+)-(\d+)\.parquet")
_WAL_RE = re.compile(r"wal-(\d+)\.arrows")
_REMEMBERED_REQUESTS = 4096


class AppendResult(dict):
    """{session_id: (first_index, last_index)} for the sessions whose deltas landed; `errors` maps each
    rejected session to the reason (its deltas were all refused, other sessions' were not)."""

    def __init__(self, ranges: Iterable = (), errors: dict[str, str] | None = None):
        super().__init__(ranges)
        self.errors = dict(errors or {})

    def __repr__(self) -> str:
        return f"AppendResult({dict(self)!r}, errors={self.errors!r})"


@dataclass
class _Block:
    """Rows [first, first + n) of one session, in memory."""

    batch: pa.RecordBatch
    first: int
    t_min: float
    t_max: float
    sorted_t: bool

    @property
    def last(self) -> int:
        return self.first + self.batch.num_rows - 1


def _block(batch: pa.RecordBatch, first: int) -> _Block:
    t = batch.column(_T).to_numpy()
    return _Block(batch, first, float(t.min()), float(t.max()), bool(np.all(t[1:] >= t[:-1])))


@dataclass
class _Segment:
    """A contiguous index range of one session: in memory and in a WAL file, or (blocks None) in Parquet."""

    first: int
    last: int
    t_min: float = math.inf
    t_max: float = -math.inf
    blocks: list[_Block] | None = field(default_factory=list)
    sealed: int = 0  # blocks[:sealed] are compacted; the rest are one slice per append
    tail_rows: int = 0
    wal_path: str | None = None
    file: Any = None  # these three are open only for the session's current segment
    sink: Any = None
    writer: Any = None
    wal_size: int = 0  # bytes of whole batches in the WAL file
    parquet_path: str | None = None
    parquet_bytes: int = 0

    @property
    def rows(self) -> int:
        return self.last - self.first + 1


@dataclass
class _Session:
    session_id: str
    dirname: str
    token_hash: str
    closed: bool = False
    next_index: int = 0
    newest_t: float = -math.inf
    segments: list[_Segment] = field(default_factory=list)
    changed: asyncio.Event | None = None

    @property
    def current(self) -> _Segment | None:
        seg = self.segments[-1] if self.segments else None
        return seg if seg is not None and seg.writer is not None else None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _dirname(session_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", session_id)[:40]
    return f"{safe}-{hashlib.sha256(session_id.encode()).hexdigest()[:16]}"


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    if hasattr(pa, "concat_batches"):  # pyarrow >= 19
        return pa.concat_batches(batches)
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)


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


class SessionLog:
    """The log's logic, usable without Ray; `SessionLogActor` below is the Ray actor.

    One instance owns a root: two logs on the same root would write over each other's files.
    """

    def __init__(
        self,
        root: str | None = None,
        *,
        retention_s: float = 120.0,
        segment_s: float = 30.0,
        segment_rows: int = 4096,
        block_rows: int = 64,
        wal_dir: str | None = None,
        fsync: bool = False,
    ):
        root = os.fspath(root) if root else os.path.join(os.getcwd(), "data", "log")
        if "://" not in root:
            root = os.path.abspath(root)
        self.root = root
        self.fs, base = pafs.FileSystem.from_uri(root)
        self._local = isinstance(self.fs, pafs.LocalFileSystem)
        self._base = base.rstrip("/") + "/sessions"
        # Appending needs a local file: with a remote root the WAL lives on this node's disk.
        self._wal_base = wal_dir or (self._base if self._local else os.path.join(tempfile.gettempdir(), "interplay-wal", _hash(root)[:16]))
        if not (retention_s > 0 and segment_s > 0 and segment_rows > 0 and block_rows > 0):
            raise ValueError("retention_s, segment_s, segment_rows and block_rows must be positive")
        self.retention_s = float(retention_s)
        self.segment_s = float(segment_s)
        self.segment_rows = int(segment_rows)
        self.block_rows = int(block_rows)
        self.fsync = bool(fsync)
        self.fs.create_dir(self._base, recursive=True)
        os.makedirs(self._wal_base, exist_ok=True)
        self._sessions: dict[str, _Session] = {}
        self._requests: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._restore()

    # --- sessions ----------------------------------------------------------------------------

    def open(self, session_id: str, token: str | None = None) -> str:
        """Start a session's log and return its token, the capability every read needs.

        Opening an existing session is refused unless `token` is its token (then it is returned
        again: a retried or restored open is harmless). A caller may choose the token (>= 16 chars).
        """
        check_session_id(session_id)
        s = self._sessions.get(session_id)
        if s is not None:
            if isinstance(token, str) and hmac.compare_digest(s.token_hash, _hash(token)):
                if s.closed:
                    raise ProtocolError(f"session {session_id!r} is closed", "session_closed", "session_id")
                return token
            raise ProtocolError(f"session {session_id!r} already exists; only its token reopens it", "session_exists", "session_id")
        if token is None:
            token = secrets.token_urlsafe(24)
        elif not isinstance(token, str) or len(token) < 16:
            raise ProtocolError("token must be a string of at least 16 characters", "invalid_value", "token")
        s = _Session(session_id, _dirname(session_id), _hash(token))
        self._write_meta(s)
        self._sessions[session_id] = s
        return token

    def close(self, session_id: str) -> None:
        """No more appends: the session's rows go to Parquet and leave memory; reads still work."""
        s = self._sessions.get(session_id)
        if s is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        if s.closed:
            return
        for seg in [seg for seg in s.segments if seg.blocks is not None]:
            self._persist(s, seg)
        s.closed = True
        self._write_meta(s)
        self._notify(s)

    def info(self, session_id: str, token: str) -> dict:
        s = self._authorize(session_id, token)
        return {
            "session_id": s.session_id,
            "next_index": s.next_index,
            "newest_t": s.newest_t if s.next_index else None,
            "closed": s.closed,
            "memory_rows": sum(seg.rows for seg in s.segments if seg.blocks is not None),
            "parquet_rows": sum(seg.rows for seg in s.segments if seg.blocks is None),
        }

    def stats(self) -> dict:
        """Figures for the whole log (not per session, so no token): memory, disk, process."""
        mem_rows = mem_bytes = pq_bytes = pq_files = wal_bytes = 0
        for s in self._sessions.values():
            for seg in s.segments:
                if seg.blocks is None:
                    pq_bytes += seg.parquet_bytes
                    pq_files += 1
                else:
                    mem_rows += seg.rows
                    mem_bytes += sum(b.batch.nbytes for b in seg.blocks)
                    wal_bytes += seg.wal_size
        return {
            "sessions": len(self._sessions),
            "open_sessions": sum(not s.closed for s in self._sessions.values()),
            "memory_rows": mem_rows,
            "memory_bytes": mem_bytes,
            "arrow_pool_bytes": pa.total_allocated_bytes(),
            "wal_bytes": wal_bytes,
            "parquet_bytes": pq_bytes,
            "parquet_files": pq_files,
            **_memory(),
            "pid": os.getpid(),
        }

    # --- append ------------------------------------------------------------------------------

    def append(self, deltas: list | pa.RecordBatch | pa.Table, request_id: str | None = None) -> AppendResult:
        """Append deltas of any number of sessions; the log numbers each session's rows from 0.

        Per session all or nothing: a session with one bad delta (or unknown, or closed) gets
        nothing appended and an entry in `result.errors`; the other sessions' deltas land. If no
        session lands, `ProtocolError` is raised instead (its `errors` attribute holds the same
        map). A batch whose schema is not SCHEMA is refused whole. With `request_id`, a repeated
        call (e.g. Ray retrying it after a restart) returns the first call's indices, appending nothing.
        """
        if request_id is not None and not isinstance(request_id, str):
            raise ProtocolError("request_id must be a string", "invalid_value", "request_id")
        batch, positions, errors, checked = self._as_batch(deltas)
        groups: dict[str, list[int]] = {}
        for i, sid in enumerate(batch.column(0).to_pylist()):
            groups.setdefault(sid, []).append(i)
        ranges: dict[str, tuple[int, int]] = {}
        todo: list[tuple[_Session, list[int]]] = []
        small = batch.select(_SMALL).to_pylist() if groups else []
        audio_len = pc.binary_length(batch.column("audio")).to_pylist() if groups else []
        frame_len = pc.binary_length(batch.column("frame")).to_pylist() if groups else []
        for sid, rows in groups.items():
            done = self._requests.get(request_id, {}).get(sid) if request_id is not None else None
            if sid in errors or done is not None:
                if done is not None:
                    ranges[sid] = done
                continue
            try:
                s = self._writable(sid)
                for i in rows:
                    try:
                        _check_row(small[i], audio_len[i], frame_len[i], rebuild=not checked)
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
            batch = batch.set_column(_INDEX, SCHEMA.field(_INDEX), pa.array(index))
            for s, rows in todo:
                lo = rows[0]
                part = batch.slice(lo, len(rows)) if rows[-1] - lo + 1 == len(rows) else batch.take(pa.array(rows))
                try:
                    ranges[s.session_id] = self._append_rows(s, part, [small[i]["t"] for i in rows], request_id)
                except ProtocolError as exc:
                    errors[s.session_id] = str(exc)
        if errors and not ranges:
            detail = "; ".join(f"session {sid!r}: {msg}" for sid, msg in errors.items())
            exc = ProtocolError(f"append rejected: {detail}", "invalid_delta")
            exc.errors = errors
            raise exc
        return AppendResult(ranges, errors)

    def _as_batch(self, deltas) -> tuple[pa.RecordBatch, list[int], dict[str, str], bool]:
        """One RecordBatch of SCHEMA, each row's position in the call, per-session errors found on the
        way, and whether the rows were already checked (deltas check themselves on construction)."""
        if isinstance(deltas, pa.Table):
            deltas = _one_batch(deltas)
        if isinstance(deltas, pa.RecordBatch):
            return _conform(deltas), range(deltas.num_rows), {}, False
        if not isinstance(deltas, (list, tuple)):
            raise ProtocolError(f"append takes a list of context deltas or a RecordBatch of the log schema, got {type(deltas).__name__}", "invalid_delta")
        records, errors = [], {}
        for i, d in enumerate(deltas):
            sid = getattr(d, "session_id", None)
            try:
                kind_of(d)
                d.__post_init__()  # re-check: a delta may have been changed since it was built
                records.append((i, to_record(d)))
            except ProtocolError as exc:
                if not isinstance(sid, str):
                    raise ProtocolError(f"delta {i}: {exc}", exc.code, exc.param) from None
                errors.setdefault(sid, f"delta {i}: {exc}")
        # Each session's rows together (stable), so its part of the batch is a zero-copy slice.
        order: dict[str, int] = {}
        records = [r for r in records if r[1]["session_id"] not in errors]
        records.sort(key=lambda r: order.setdefault(r[1]["session_id"], len(order)))
        batch = pa.RecordBatch.from_pylist([r for _, r in records], schema=SCHEMA)
        return batch, [i for i, _ in records], errors, True

    def _writable(self, session_id: str) -> _Session:
        s = self._sessions.get(session_id)
        if s is None:
            raise ProtocolError(f"unknown session {session_id!r}: open it before appending", "unknown_session", "session_id")
        if s.closed:
            raise ProtocolError(f"session {session_id!r} is closed", "session_closed", "session_id")
        return s

    def _append_rows(self, s: _Session, part: pa.RecordBatch, ts: list[float], request_id: str | None) -> tuple[int, int]:
        n, first = part.num_rows, s.next_index
        try:
            seg = s.current or self._new_segment(s)
        except OSError as exc:
            raise ProtocolError(f"could not open the log of session {s.session_id!r}: {exc}", "log_unavailable") from None
        try:
            seg.writer.write_batch(part, custom_metadata={"request_id": request_id} if request_id else None)
            seg.sink.flush()  # one write() per append, not one per buffer
            if self.fsync:
                os.fsync(seg.file.fileno())
        except Exception as exc:
            # Cut the torn batch off so the file stays a readable stream, and start a new file next time.
            self._rotate(seg, truncate=True)
            if seg.rows == 0:
                s.segments.remove(seg)
                os.remove(seg.wal_path)
            raise ProtocolError(f"could not write session {s.session_id!r} to its log: {exc}", "log_unavailable") from None
        seg.wal_size = seg.file.tell()
        # Only now, with the rows on disk, does the log change.
        block = _Block(part, first, min(ts), max(ts), all(a <= b for a, b in zip(ts, ts[1:])))
        seg.blocks.append(block)
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
            self._seal(seg)
        if seg.rows >= self.segment_rows or seg.t_max - seg.t_min >= self.segment_s:
            self._rotate(seg)
        try:
            self._evict(s)
        except Exception:  # the rows are safe in the WAL; persisting is retried on the next append
            log.exception("session %r: could not persist old rows to Parquet", s.session_id)
        self._notify(s)
        return first, block.last

    def _new_segment(self, s: _Session) -> _Segment:
        folder = os.path.join(self._wal_base, s.dirname)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"wal-{s.next_index:012d}.arrows")
        file = pa.OSFile(path, "wb")
        sink = pa.BufferedOutputStream(file, 1 << 20)
        writer = ipc.new_stream(sink, SCHEMA)
        sink.flush()
        seg = _Segment(s.next_index, s.next_index - 1, wal_path=path, file=file, sink=sink, writer=writer, wal_size=file.tell())
        s.segments.append(seg)
        return seg

    def _seal(self, seg: _Segment) -> None:
        """Compact the per-append slices into one block: they pin the whole multi-session batch they came in."""
        tail = seg.blocks[seg.sealed :]
        if len(tail) > 1:
            seg.blocks[seg.sealed :] = [_block(_concat([b.batch for b in tail]), tail[0].first)]
        seg.sealed = len(seg.blocks)
        seg.tail_rows = 0

    def _rotate(self, seg: _Segment, truncate: bool = False) -> None:
        """Finish the segment's WAL file; the session's next append starts a new one."""
        self._seal(seg)
        if truncate:
            try:
                seg.file.close()  # unflushed bytes of the torn batch die with the buffer
            finally:
                os.truncate(seg.wal_path, seg.wal_size)
        else:
            seg.writer.close()
            seg.sink.close()
            seg.wal_size = os.path.getsize(seg.wal_path)
        seg.writer = seg.sink = seg.file = None

    def _evict(self, s: _Session) -> None:
        cutoff = s.newest_t - self.retention_s
        for seg in list(s.segments):
            if seg.blocks is not None and seg.writer is None and seg.t_max < cutoff:
                self._persist(s, seg)

    def _persist(self, s: _Session, seg: _Segment) -> None:
        """Write a segment to Parquet, then drop its WAL file and its rows from memory."""
        if seg.writer is not None:
            self._rotate(seg)
        path = f"{self._base}/{s.dirname}/seg-{seg.first:012d}-{seg.last:012d}.parquet"
        table = pa.Table.from_batches([b.batch for b in seg.blocks], schema=SCHEMA)
        # Dictionaries only where values repeat: audio and frames never do.
        options = {"filesystem": self.fs, "row_group_size": 256, "use_dictionary": ["session_id", "kind", "text", "payload"]}
        if self._local:  # rename, so a crash never leaves half a segment under the final name
            pq.write_table(table, path + ".tmp", **options)
            self.fs.move(path + ".tmp", path)
        else:
            pq.write_table(table, path, **options)
        seg.parquet_bytes = self.fs.get_file_info(path).size
        seg.parquet_path = path
        seg.blocks = None
        seg.sealed = 0
        if seg.wal_path is not None and os.path.exists(seg.wal_path):
            os.remove(seg.wal_path)
        seg.wal_path, seg.wal_size = None, 0

    def _notify(self, s: _Session) -> None:
        if s.changed is not None:
            s.changed.set()
            s.changed = None

    # --- reads -------------------------------------------------------------------------------

    def read(self, session_id: str, token: str, start: int = 0, end: int | None = None) -> pa.Table:
        """Rows with start <= index < end (end None: up to the newest), oldest first."""
        s = self._authorize(session_id, token)
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise ProtocolError(f"start must be a non-negative index, got {start!r}", "invalid_value", "start")
        if end is not None and (isinstance(end, bool) or not isinstance(end, (int, np.integer))):
            raise ProtocolError(f"end must be an index or None, got {end!r}", "invalid_value", "end")
        end = s.next_index if end is None else min(int(end), s.next_index)
        return self._rows(s, int(start), end)

    def read_last(self, session_id: str, token: str, seconds: float) -> pa.Table:
        """Rows whose t is within `seconds` of the session's newest t, in index order."""
        s = self._authorize(session_id, token)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float, np.number)) or not math.isfinite(seconds) or seconds < 0:
            raise ProtocolError(f"seconds must be a non-negative number, got {seconds!r}", "invalid_value", "seconds")
        cutoff = s.newest_t - float(seconds)
        parts: list[pa.RecordBatch] = []
        for seg in s.segments:
            if seg.t_max < cutoff:
                continue
            if seg.blocks is None:
                parts += self._load(seg, [("t", ">=", cutoff)])
                continue
            for b in seg.blocks:
                if b.t_max < cutoff:
                    continue
                if b.t_min >= cutoff:
                    parts.append(b.batch)
                elif b.sorted_t:  # a zero-copy slice where t is in order (chunks always are)
                    i = int(np.searchsorted(b.batch.column(_T).to_numpy(), cutoff, side="left"))
                    parts.append(b.batch.slice(i))
                else:
                    parts.append(b.batch.filter(pc.greater_equal(b.batch.column(_T), cutoff)))
        return pa.Table.from_batches(parts, schema=SCHEMA)

    async def wait(self, session_id: str, token: str, after_index: int = -1, timeout_s: float = 30.0) -> pa.Table:
        """Rows with index > after_index as soon as there are any; an empty table at the timeout or once closed."""
        s = self._authorize(session_id, token)
        if isinstance(after_index, bool) or not isinstance(after_index, (int, np.integer)) or after_index < -1:
            raise ProtocolError(f"after_index must be an index >= -1, got {after_index!r}", "invalid_value", "after_index")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s >= 0:
            raise ProtocolError(f"timeout_s must be a non-negative number, got {timeout_s!r}", "invalid_value", "timeout_s")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while s.next_index <= after_index + 1 and not s.closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            if s.changed is None:
                s.changed = asyncio.Event()
            try:
                await asyncio.wait_for(s.changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return self._rows(s, int(after_index) + 1, s.next_index)

    def _authorize(self, session_id: str, token: str) -> _Session:
        s = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if s is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        if not isinstance(token, str) or not hmac.compare_digest(s.token_hash, _hash(token)):
            raise ProtocolError(f"this token does not grant access to session {session_id!r}", "forbidden", "token")
        return s

    def _rows(self, s: _Session, start: int, end: int) -> pa.Table:
        parts: list[pa.RecordBatch] = []
        for seg in s.segments:
            if seg.last < start or seg.first >= end:
                continue
            if seg.blocks is None:
                parts += self._load(seg, [("index", ">=", start), ("index", "<", end)])
                continue
            for b in seg.blocks:
                if b.last < start or b.first >= end:
                    continue
                lo = max(start, b.first) - b.first
                parts.append(b.batch.slice(lo, min(end, b.last + 1) - b.first - lo))
        return pa.Table.from_batches(parts, schema=SCHEMA)

    def _load(self, seg: _Segment, filters: list) -> list[pa.RecordBatch]:
        table = pq.read_table(seg.parquet_path, filesystem=self.fs, filters=filters)
        return table.select(SCHEMA.names).cast(SCHEMA).to_batches()

    # --- storage -----------------------------------------------------------------------------

    def _write_meta(self, s: _Session) -> None:
        folder = f"{self._base}/{s.dirname}"
        self.fs.create_dir(folder, recursive=True)
        data = json.dumps({"session_id": s.session_id, "token_sha256": s.token_hash, "closed": s.closed}).encode()
        path = f"{folder}/session.json"
        if self._local:
            with open(path + ".tmp", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def _restore(self) -> None:
        """Rebuild every session from storage: tokens and state from session.json, rows from Parquet and WAL."""
        for info in self.fs.get_file_info(pafs.FileSelector(self._base, allow_not_found=True)):
            if info.type != pafs.FileType.Directory:
                continue
            try:
                with self.fs.open_input_stream(f"{info.path}/session.json") as f:
                    meta = json.loads(f.read())
                s = _Session(meta["session_id"], info.base_name, meta["token_sha256"], bool(meta.get("closed")))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("skipping %s: no readable session.json (%s)", info.path, exc)
                continue
            self._restore_session(s, info.path)
            self._sessions[s.session_id] = s

    def _restore_session(self, s: _Session, folder: str) -> None:
        segments, broken = [], []
        for info in self.fs.get_file_info(pafs.FileSelector(folder)):
            m = _SEG_RE.fullmatch(info.base_name)
            if not m:
                continue
            first, last = int(m[1]), int(m[2])
            try:
                md = pq.read_metadata(info.path, filesystem=self.fs)
                if md.num_rows != last - first + 1:
                    raise ValueError(f"{md.num_rows} rows, expected {last - first + 1}")
                t_min, t_max = _t_range(md)
                segments.append(_Segment(first, last, t_min, t_max, blocks=None, parquet_path=info.path, parquet_bytes=info.size))
            except Exception as exc:
                broken.append((first, last, info.path, exc))
        wal_folder = os.path.join(self._wal_base, s.dirname)
        for name in sorted(os.listdir(wal_folder)) if os.path.isdir(wal_folder) else []:
            if not _WAL_RE.fullmatch(name):
                continue
            path = os.path.join(wal_folder, name)
            batches, size = _read_wal(path)
            if not batches:
                os.remove(path)
                continue
            first = batches[0][0].column(_INDEX)[0].as_py()
            last = batches[-1][0].column(_INDEX)[-1].as_py()
            if any(p.blocks is None and p.first <= first and last <= p.last for p in segments):
                os.remove(path)  # persisted already; the crash came before the WAL file was dropped
                continue
            block = _block(_concat([b for b, _ in batches]), first)
            segments.append(_Segment(first, last, block.t_min, block.t_max, blocks=[block], sealed=1, wal_path=path, wal_size=size))
            for b, meta in batches:
                rid = meta.get(b"request_id") if meta is not None else None
                if rid is not None:
                    self._requests.setdefault(rid.decode(), {})[s.session_id] = (b.column(_INDEX)[0].as_py(), b.column(_INDEX)[-1].as_py())
        for first, last, path, exc in broken:
            if any(p.first <= first and last <= p.last for p in segments):
                self.fs.delete_file(path)  # a half-written segment whose rows the WAL still holds
            else:
                log.error("session %r: rows %d..%d are lost: %s is unreadable (%s)", s.session_id, first, last, path, exc)
        segments.sort(key=lambda p: p.first)
        for a, b in zip(segments, segments[1:]):
            if b.first != a.last + 1:
                log.error("session %r: rows %d..%d are missing from storage", s.session_id, a.last + 1, b.first - 1)
        s.segments = segments
        s.next_index = segments[-1].last + 1 if segments else 0
        s.newest_t = max((p.t_max for p in segments), default=-math.inf)
        if s.closed:
            for seg in [p for p in segments if p.blocks is not None]:
                self._persist(s, seg)
        else:
            self._evict(s)


def _conform(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch` with exactly SCHEMA (column order, nullability), or ProtocolError naming what differs."""
    have = batch.schema
    missing = [n for n in SCHEMA.names if n not in have.names]
    extra = [n for n in have.names if n not in SCHEMA.names]
    if missing or extra:
        raise ProtocolError(f"batch does not match the log schema: missing columns {missing}, unexpected columns {extra}", "invalid_schema")
    wrong = [f"column {f.name!r} must be {f.type}, got {have.field(f.name).type}" for f in SCHEMA if not have.field(f.name).type.equals(f.type)]
    if wrong:
        raise ProtocolError("batch does not match the log schema: " + "; ".join(wrong), "invalid_schema")
    if batch.column("session_id").null_count:
        raise ProtocolError("session_id must not be null", "invalid_schema", "session_id")
    if have.equals(SCHEMA):
        return batch
    return pa.RecordBatch.from_arrays([batch.column(n) for n in SCHEMA.names], schema=SCHEMA)


def _check_row(row: dict, audio_len: int | None, frame_len: int | None, rebuild: bool) -> None:
    """ProtocolError unless the row is a delta `from_record` reads back; `rebuild` checks every field that way."""
    kind = row["kind"]
    if kind not in KINDS:
        raise ProtocolError(f"unknown delta kind {kind!r}; known: {list(KINDS)}", "invalid_delta", "kind")
    t = row["t"]
    if t is None or not math.isfinite(t):
        raise ProtocolError(f"t must be a finite number of seconds, got {t!r}", "invalid_value", "t")
    if kind in CHUNK_KINDS:
        if row["seq"] is None or row["seq"] < 0:
            raise ProtocolError(f"a chunk needs seq >= 0, got {row['seq']!r}", "invalid_value", "seq")
        if audio_len != AUDIO_BYTES:
            got = "none" if audio_len is None else f"{audio_len:,} bytes"
            raise ProtocolError(f"audio must be {AUDIO_BYTES:,} bytes ({CHUNK_SAMPLES:,} int16 samples: 200 ms at 16 kHz mono), got {got}", "invalid_audio", "audio")
    elif audio_len is not None or row["seq"] is not None:
        raise ProtocolError(f"a {kind} carries no audio and no seq", "invalid_delta")
    h, w = row["frame_h"], row["frame_w"]
    if frame_len is not None or h is not None or w is not None:
        if kind != "input_chunk":
            raise ProtocolError(f"only input chunks carry a frame, not a {kind}", "invalid_frame", "frame")
        if frame_len is None or h is None or w is None:
            raise ProtocolError("frame, frame_h and frame_w come together", "invalid_frame", "frame")
        if h <= 0 or w <= 0 or h % PATCH or w % PATCH or max(h, w) > MAX_FRAME_EDGE:
            raise ProtocolError(f"frame edges must be positive multiples of {PATCH} up to {MAX_FRAME_EDGE}, got {h}x{w}", "invalid_frame", "frame")
        if frame_len != h * w * 3:
            raise ProtocolError(f"frame must be frame_h*frame_w*3 = {h * w * 3:,} bytes of uint8 RGB, got {frame_len:,}", "invalid_frame", "frame")
    if not rebuild:
        return
    try:
        payload = json.loads(row["payload"]) if row["payload"] is not None else None
    except ValueError as exc:
        raise ProtocolError(f"payload is not valid JSON: {exc}", "invalid_delta", "payload") from None
    if not isinstance(payload, dict):
        raise ProtocolError("payload must be a JSON object of the delta's remaining fields", "invalid_delta", "payload")
    # Rebuild the delta with placeholder bytes of the checked sizes: every other field is checked
    # by the delta's own constructor, without copying the payloads.
    probe = dict(row, audio=_ZERO_AUDIO if audio_len is not None else None, frame=bytes(frame_len) if frame_len is not None else None)
    try:
        from_record(probe)
    except ProtocolError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ProtocolError(f"malformed {kind}: {exc}", "invalid_delta", "payload") from None


def _t_range(md: pq.FileMetaData) -> tuple[float, float]:
    col = md.schema.to_arrow_schema().get_field_index("t")
    lo, hi = math.inf, -math.inf
    for i in range(md.num_row_groups):
        st = md.row_group(i).column(col).statistics
        if st is None or not st.has_min_max:
            return -math.inf, math.inf  # unknown: every read_last looks at this segment
        lo, hi = min(lo, st.min), max(hi, st.max)
    return lo, hi


def _read_wal(path: str) -> tuple[list[tuple[pa.RecordBatch, Any]], int]:
    """The whole batches of a WAL file and their byte length. A torn last batch is dropped: its append was never acknowledged."""
    out, size = [], 0
    try:
        with pa.OSFile(path, "rb") as f:
            reader = ipc.open_stream(f)
            size = f.tell()
            while True:
                try:
                    out.append(reader.read_next_batch_with_custom_metadata())
                except StopIteration:
                    break
                size = f.tell()
    except (pa.ArrowInvalid, OSError) as exc:
        log.warning("%s: stopped at a torn batch after %d whole ones (%s)", path, len(out), exc)
    return out, size


# --- Ray --------------------------------------------------------------------------------------


def _table_from_ipc(buf: pa.Buffer) -> pa.Table:
    return ipc.open_stream(buf).read_all()


class _Wire:
    """Ships a table through Ray as one Arrow IPC buffer, which arrives as a pa.Table (zero-copy).

    Ray's own Table reducer costs about 1.5 ms per chunk here, and a read is many zero-copy slices.
    """

    __slots__ = ("table",)

    def __init__(self, table: pa.Table):
        self.table = table

    def __reduce__(self):
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, self.table.schema) as writer:
            writer.write_table(self.table)
        return _table_from_ipc, (sink.getvalue(),)


class _SessionLogActor(SessionLog):
    """The Ray face of SessionLog: an async actor (all methods run on its one event loop, so no locks)."""

    def read(self, session_id: str, token: str, start: int = 0, end: int | None = None) -> pa.Table:
        return _Wire(super().read(session_id, token, start, end))

    def read_last(self, session_id: str, token: str, seconds: float) -> pa.Table:
        return _Wire(super().read_last(session_id, token, seconds))

    async def wait(self, session_id: str, token: str, after_index: int = -1, timeout_s: float = 30.0) -> pa.Table:
        return _Wire(await super().wait(session_id, token, after_index, timeout_s))


# Restarted by Ray whenever it dies (its state comes back from `root`); calls in flight are retried,
# so pass `request_id` to `append` to make a retried append idempotent.
SessionLogActor = ray.remote(max_restarts=-1, max_task_retries=-1)(_SessionLogActor)


def start_session_log(root: str | None = None, *, name: str = "session_log", namespace: str | None = None, detached: bool = False, **options) -> Any:
    """The named SessionLog actor: created with `root` (default ./data/log) and `options`, or the running one."""
    root = root or os.path.join(os.getcwd(), "data", "log")
    if "://" not in root:
        root = os.path.abspath(root)  # the actor's working directory is not the caller's
    actor_options: dict[str, Any] = {"name": name, "namespace": namespace, "get_if_exists": True}
    if detached:
        actor_options["lifetime"] = "detached"
    return SessionLogActor.options(**actor_options).remote(root, **options)
