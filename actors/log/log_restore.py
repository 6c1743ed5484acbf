"""Restoring a SessionLog from its files (the layout is `actors.log.log_store`'s).

`restore` lists every session under the root: an open one comes back whole (token and writer
epoch from session.json, rows from Parquet and the WAL files, the token in clear and the newest
snapshot's tick from its local folder), a closed one is only listed (its session.json read), and
the request ids still in WAL files come back so a retried append stays idempotent. `find` reads a
closed session's rows' places when it is asked for. A torn last WAL batch was never acknowledged
and is dropped; a Parquet file whose rows the WAL still holds was half-written and is deleted;
rows found nowhere are logged as lost.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from actors.log.log_store import INDEX, SNAPSHOT_RE, LogSession, LogStore, Segment, block_of, concat, dirname_of, hash_token, remove_file

log = logging.getLogger("interplay.session_log")

_SEG_RE = re.compile(r"seg-(\d+)-(\d+)\.parquet")
_WAL_RE = re.compile(r"wal-(\d+)\.arrows")


def restore(store: LogStore) -> tuple[list[LogSession], list[LogSession], list[tuple[str, str, tuple[int, int]]]]:
    """The open sessions in storage (tokens and state from session.json, rows from Parquet and
    WAL), the closed ones (session.json only: no rows read), and the (request_id, session_id,
    index range) of each append still in a WAL file."""
    opened, closed, requests = [], [], []
    for info in store.fs.get_file_info(pafs.FileSelector(store.base, allow_not_found=True)):
        if info.type != pafs.FileType.Directory:
            continue
        s = _read_meta(store, info.path, info.base_name)
        if s is None:
            if not store.fs.get_file_info(pafs.FileSelector(info.path)):
                store.fs.delete_dir(info.path)  # what a delete interrupted after session.json leaves
            continue
        if not s.closed:
            requests += _restore_session(store, s, info.path)
            opened.append(s)
            continue
        wal = store.folder(s)
        if any(_WAL_RE.fullmatch(n) for n in (os.listdir(wal) if os.path.isdir(wal) else ())):
            _restore_session(store, s, info.path)  # closed with rows never persisted: persist them now
            for seg in [seg for seg in s.segments if seg.blocks is not None]:
                store.persist(s, seg)
            s.segments = []
        else:
            store.forget(s)  # the crash came between closing and dropping these
        closed.append(s)
    return opened, closed, requests


def find(store: LogStore, session_id: str) -> LogSession | None:
    """A session that is not in memory (a closed one), with where its rows are; None if none."""
    folder = f"{store.base}/{dirname_of(session_id)}"
    s = _read_meta(store, folder, dirname_of(session_id), quiet=True)
    if s is None or s.session_id != session_id or not s.closed:  # an open session is in memory, always
        return None
    _restore_session(store, s, folder)
    return s


def _read_meta(store: LogStore, folder: str, dirname: str, quiet: bool = False) -> LogSession | None:
    try:
        with store.fs.open_input_stream(f"{folder}/session.json") as f:
            meta = json.loads(f.read())
        s = LogSession(meta["session_id"], dirname, meta["token_sha256"], bool(meta.get("closed")), epoch=int(meta.get("epoch", 0)))
        if s.closed:
            closed_at = meta.get("closed_at")
            if closed_at is None:  # closed before the time was kept: the file's own time is when
                closed_at = store.fs.get_file_info(f"{folder}/session.json").mtime.timestamp()
            s.closed_at = float(closed_at)
        return s
    except FileNotFoundError:
        if not quiet and store.fs.get_file_info(pafs.FileSelector(folder)):
            log.warning("skipping %s: it has no session.json", folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("skipping %s: no readable session.json (%s)", folder, exc)
    return None

def _restore_session(store: LogStore, s: LogSession, folder: str) -> list[tuple[str, str, tuple[int, int]]]:
    segments, broken, requests = [], [], []
    for info in store.fs.get_file_info(pafs.FileSelector(folder)):
        m = _SEG_RE.fullmatch(info.base_name)
        if not m:
            continue
        first, last = int(m[1]), int(m[2])
        try:
            md = pq.read_metadata(info.path, filesystem=store.fs)
            if md.num_rows != last - first + 1:
                raise ValueError(f"{md.num_rows} rows, expected {last - first + 1}")
            t_min, t_max = _range(md, "t")
            seq_max = _range(md, "seq")[1]
            seq_max = None if seq_max == math.inf else int(seq_max)
            segments.append(Segment(first, last, t_min, t_max, blocks=None, parquet_path=info.path, parquet_bytes=info.size, seq_max=seq_max))
        except Exception as exc:
            broken.append((first, last, info.path, exc))
    wal_folder = store.folder(s)
    names = sorted(os.listdir(wal_folder)) if os.path.isdir(wal_folder) else []
    if s.closed:
        store.forget(s)  # the crash came between closing and dropping these
    else:
        if "token" in names:
            with open(os.path.join(wal_folder, "token"), "rb") as f:
                token = f.read().decode()
            s.token = token if hash_token(token) == s.token_hash else None
        ticks = [int(m[1]) for m in map(SNAPSHOT_RE.fullmatch, names) if m]
        s.snapshot_tick = max(ticks, default=None)
        store.drop_snapshots(s, s.snapshot_tick)
        for name in names:
            if name.startswith("snapshot-") and ".tmp" in name:
                remove_file(os.path.join(wal_folder, name))
    for name in names:
        if not _WAL_RE.fullmatch(name):
            continue
        path = os.path.join(wal_folder, name)
        batches, size = _read_wal(path)
        if not batches:
            os.remove(path)
            continue
        first = batches[0][0].column(INDEX)[0].as_py()
        last = batches[-1][0].column(INDEX)[-1].as_py()
        if any(p.blocks is None and p.first <= first and last <= p.last for p in segments):
            os.remove(path)  # persisted already; the crash came before the WAL file was dropped
            continue
        block = block_of(concat([b for b, _ in batches]), first)
        store.share(block)
        segments.append(Segment(first, last, block.t_min, block.t_max, blocks=[block], sealed=1, wal_path=path, wal_size=size))
        for b, meta in batches:
            rid = meta.get(b"request_id") if meta is not None else None
            if rid is not None:
                requests.append((rid.decode(), s.session_id, (b.column(INDEX)[0].as_py(), b.column(INDEX)[-1].as_py())))
    for first, last, path, exc in broken:
        if any(p.first <= first and last <= p.last for p in segments):
            store.fs.delete_file(path)  # a half-written segment whose rows the WAL still holds
        else:
            log.error("session %r: rows %d..%d are lost: %s is unreadable (%s)", s.session_id, first, last, path, exc)
    segments.sort(key=lambda p: p.first)
    for a, b in zip(segments, segments[1:]):
        if b.first != a.last + 1:
            log.error("session %r: rows %d..%d are missing from storage", s.session_id, a.last + 1, b.first - 1)
    s.segments = segments
    s.next_index = segments[-1].last + 1 if segments else 0
    s.newest_t = max((p.t_max for p in segments), default=-math.inf)
    return requests


def _range(md: pq.FileMetaData, name: str) -> tuple[float, float]:
    """A column's (min, max) from a Parquet file's statistics; (-inf, inf) where unknown, so
    every read looks at the file."""
    col = md.schema.to_arrow_schema().get_field_index(name)
    lo, hi = math.inf, -math.inf
    for i in range(md.num_row_groups):
        c = md.row_group(i).column(col)
        st = c.statistics
        if st is not None and st.null_count == c.num_values:
            continue  # all null: no chunks in this row group
        if st is None or not st.has_min_max:
            return -math.inf, math.inf
        lo, hi = min(lo, st.min), max(hi, st.max)
    return (lo, hi) if lo <= hi else (-math.inf, -1)


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
