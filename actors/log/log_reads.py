"""Reading a SessionLog's rows: by copy (`read`) or by reference (`refs`, then `fetch`).

`read` returns a copy of the rows (through an actor call, serialised once). `refs` returns where
the rows are: the ObjectRefs of the sealed segments the log owns in the Ray object store, then
the few rows not sealed yet (and any from Parquet) as small tables; `fetch` turns that into one
table, reading the objects zero-copy when on the same node. The caller checks the session's
token first (`actors.log.log_sessions`); an ObjectRef, once handed out, is itself the capability
to its rows, so only a token holder ever gets one. Both can read less: `columns` (a projection:
the big `audio` and `frame` bytes stay where they are unless asked for), `kinds` and `last_s`
(rows of those kinds, in the last `last_s` seconds before the range's last row).

A read is planned on the event loop (`plan`: it looks at the session's segments), then resolved
(`resolve`: Parquet read into batches), which touches nothing the event loop changes. Where the
read is a coroutine (`read_async`, `refs`, and recovery's) the Parquet part is read in a thread,
so a long read never holds up another session's appends; `read` reads it inline, for callers
without an event loop.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from protocols.chunks import ProtocolError
from protocols.deltas import KINDS, SCHEMA

from actors.log.log_store import T, LogSession, LogStore, from_ipc

_INDEX_T = ["index", "t"]


def read(store: LogStore, s: LogSession, start, end, columns, kinds, last_s) -> pa.Table:
    """`SessionLog.read` of an authorized session, Parquet read inline."""
    columns, kinds, last_s = _options(columns, kinds, last_s)
    start, end = _span(s, start, end)
    since_t = None if last_s is None else _since(resolve(store, _last_row(s, start, end), _INDEX_T, s.session_id), last_s)
    items = plan(s, start, end, columns, kinds, since_t)
    return to_table(resolve(store, items, columns, s.session_id), columns)


async def read_async(store: LogStore, s: LogSession, start, end, columns, kinds, last_s) -> pa.Table:
    """`read`, Parquet read in a thread."""
    start, end, columns, kinds, since_t = await _window(store, s, start, end, columns, kinds, last_s)
    items = plan(s, start, end, columns, kinds, since_t)
    return to_table(await resolve_async(store, items, columns, s.session_id), columns)


async def refs(store: LogStore, s: LogSession, start, end, columns, kinds, last_s) -> list[tuple[int, int, "ray.ObjectRef | pa.Table"]]:
    """`SessionLog.refs` of an authorized session: (first_index, last_index, part) in index order."""
    start, end, columns, kinds, since_t = await _window(store, s, start, end, columns, kinds, last_s)
    items = await resolve_async(store, plan(s, start, end, columns, kinds, since_t, shared=True), columns, s.session_id)
    parts: list[tuple[int, int, object]] = []
    rows: list[pa.RecordBatch] = []  # consecutive rows not in the object store, sent as one table

    def flush():
        if rows:
            table = pa.Table.from_batches(rows, schema=schema_of(columns))
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


async def _window(store: LogStore, s: LogSession, start, end, columns, kinds, last_s
                  ) -> tuple[int, int, list[str] | None, list[str] | None, float | None]:
    """A read's arguments checked, as `plan` takes them: (start, end, columns, kinds, since_t);
    the t of the range's last row is read in a thread if it is in Parquet."""
    columns, kinds, last_s = _options(columns, kinds, last_s)
    start, end = _span(s, start, end)
    since_t = None if last_s is None else _since(await resolve_async(store, _last_row(s, start, end), _INDEX_T, s.session_id), last_s)
    return start, end, columns, kinds, since_t


def _last_row(s: LogSession, start: int, end: int) -> list[tuple]:
    """The plan that reads the index and t of row end - 1 (none for an empty range)."""
    return plan(s, end - 1, end, _INDEX_T) if end > start else []


def plan(s: LogSession, start: int, end: int, columns: list[str] | None = None, kinds: list[str] | None = None,
         since_t: float | None = None, shared: bool = False) -> list[tuple]:
    """Where rows start <= index < end (of `kinds`, with t >= since_t) are, in index order:
    ("ref", first, last, ObjectRef) for a block in the object store (only when `shared` and
    nothing is projected or filtered), ("rows", batch) for rows in memory (a zero-copy slice
    unless filtered), ("parquet", path, filters) for rows in Parquet. Made on the event loop
    (it reads the session's segments); `resolve` may then run in a thread."""
    plain = columns is None and kinds is None and since_t is None
    items: list[tuple] = []
    for seg in s.segments:
        if seg.last < start or seg.first >= end or (since_t is not None and seg.t_max < since_t):
            continue
        if seg.blocks is None:
            filters: list[tuple] = [("index", ">=", start), ("index", "<", end)]
            if kinds is not None:
                filters.append(("kind", "in", list(kinds)))
            if since_t is not None:
                filters.append(("t", ">=", since_t))
            items.append(("parquet", seg.parquet_path, filters))
            continue
        for b in seg.blocks:
            if b.last < start or b.first >= end or (since_t is not None and b.t_max < since_t):
                continue
            if shared and plain and b.ref is not None:
                items.append(("ref", b.first, b.last, b.ref))
                continue
            lo = max(start, b.first) - b.first
            batch = b.batch.slice(lo, min(end, b.last + 1) - b.first - lo)
            if kinds is not None or (since_t is not None and b.t_min < since_t):
                keep = pc.is_in(batch.column("kind"), pa.array(kinds)) if kinds is not None else None  # pyright: ignore[reportAttributeAccessIssue] (pyarrow makes its compute functions at import time)
                if since_t is not None:
                    late = pc.greater_equal(batch.column(T), since_t)  # pyright: ignore[reportAttributeAccessIssue] (pyarrow makes its compute functions at import time)
                    keep = late if keep is None else pc.and_(keep, late)  # pyright: ignore[reportAttributeAccessIssue] (pyarrow makes its compute functions at import time)
                batch = batch.filter(keep)
            items.append(("rows", batch if columns is None else batch.select(columns)))
    return items


def resolve(store: LogStore, items: list[tuple], columns: list[str] | None, session_id: str) -> list[tuple]:
    """`items` (a plan) with each Parquet item read into ("rows", batch) items. Touches nothing the
    event loop changes: it may run in a thread."""
    out: list[tuple] = []
    try:
        for item in items:
            if item[0] == "parquet":
                out += [("rows", b) for b in store.load(item[1], item[2], columns)]
            else:
                out.append(item)
    except FileNotFoundError:
        raise ProtocolError(f"session {session_id!r} was deleted", "unknown_session", "session_id") from None
    except OSError as exc:
        raise ProtocolError(f"could not read session {session_id!r} from storage: {exc.strerror or exc}", "log_unavailable") from None
    return out


async def resolve_async(store: LogStore, items: list[tuple], columns: list[str] | None, session_id: str) -> list[tuple]:
    """`resolve` in a thread when there is Parquet to read, so the event loop (every other
    session's appends) goes on meanwhile; inline when everything is in memory."""
    if any(item[0] == "parquet" for item in items):
        return await asyncio.to_thread(resolve, store, items, columns, session_id)
    return items


def to_table(items: list[tuple], columns: list[str] | None) -> pa.Table:
    return pa.Table.from_batches([item[1] for item in items], schema=schema_of(columns))


def _span(s: LogSession, start, end) -> tuple[int, int]:
    """[start, end) checked and clipped to the session's rows."""
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ProtocolError(f"start must be a non-negative index, got {start!r}", "invalid_value", "start")
    if end is not None and (isinstance(end, bool) or not isinstance(end, (int, np.integer))):
        raise ProtocolError(f"end must be an index or None, got {end!r}", "invalid_value", "end")
    return int(start), s.next_index if end is None else min(int(end), s.next_index)


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


def schema_of(columns: list[str] | None) -> pa.Schema:
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
    return pa.concat_tables(tables) if tables else schema_of(_options(columns, None, None)[0]).empty_table()
