"""Where the SessionLog keeps its rows: in-memory blocks, write-ahead files and Parquet.

Layout under `root` (a directory or any pyarrow filesystem URI), one folder per session:
sessions/<dir>/session.json (id, hashed token, closed and when, writer epoch), sessions/<dir>/seg-<first>-<last>.parquet
(persisted rows) and wal-<first>.arrows (rows not yet in Parquet, one Arrow IPC stream per
in-memory segment; kept on local disk under `wal_dir` when `root` is remote). A row is
acknowledged only once its batch is whole in the WAL file, so `actors.log.log_restore` rebuilds
every open session from these files alone. `delete` removes a session's folder whole.

What a session needs to fail over lives beside its WAL files while it is open, and goes when it
closes: `token` (the session's token in clear, mode 0600: the interaction side that takes a
session over hands it to the session's clients again; session.json keeps only its hash) and
snapshot-<tick>.npz (the newest `Engine.export_session` state as `actors.log.snapshot_codec`
encodes it: arrays as .npy members, the rest as JSON in the "__state__" member, so reading one
never unpickles anything). Both are written to a
temporary name and renamed, so a crash leaves the old file or the new one, never half of one.

With `shared` (a Ray process), every sealed block is `ray.put` into the object store as one Arrow
IPC stream (`to_ipc`); the store keeps the ObjectRef and reads its rows from that shared copy
(zero-copy), so the heap holds only the unsealed tail. When a segment's WAL file is finished its
blocks are merged into one object (a sealed segment). Persisting a segment to Parquet drops its
refs: Ray frees each object once no reader holds a ref to it either.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from protocols.chunks import ProtocolError
from protocols.deltas import SCHEMA

INDEX = SCHEMA.get_field_index("index")
T = SCHEMA.get_field_index("t")
SNAPSHOT_RE = re.compile(r"snapshot-(\d+)\.npz")


@dataclass
class Block:
    """Rows [first, first + n) of one session, in memory."""

    batch: pa.RecordBatch
    first: int
    t_min: float
    t_max: float
    ref: Any = None  # its ObjectRef once sealed into the object store (`batch` then reads from it)

    @property
    def last(self) -> int:
        return self.first + self.batch.num_rows - 1


def block_of(batch: pa.RecordBatch, first: int) -> Block:
    t = batch.column(T).to_numpy()
    return Block(batch, first, float(t.min()), float(t.max()))


@dataclass
class Segment:
    """A contiguous index range of one session: in memory and in a WAL file, or (blocks None) in Parquet."""

    first: int
    last: int
    t_min: float = math.inf
    t_max: float = -math.inf
    blocks: list[Block] | None = field(default_factory=list)
    sealed: int = 0  # blocks[:sealed] are compacted; the rest are one slice per append
    tail_rows: int = 0
    wal_path: str | None = None
    file: Any = None  # these three are open only for the session's current segment
    sink: Any = None
    writer: Any = None
    wal_size: int = 0  # bytes of whole batches in the WAL file
    parquet_path: str | None = None
    parquet_bytes: int = 0
    seq_max: int | None = None  # of a persisted segment's chunks, if known (recovery skips older ones)

    @property
    def rows(self) -> int:
        return self.last - self.first + 1

    @property
    def memory(self) -> list[Block]:
        """Its blocks, of a segment still in memory (asking a persisted one is a bug)."""
        if self.blocks is None:
            raise RuntimeError(f"segment {self.first}..{self.last} is persisted: it has no blocks in memory")
        return self.blocks

    @property
    def wal(self) -> str:
        """Its WAL file's path, of a segment that has one (asking one without is a bug)."""
        if self.wal_path is None:
            raise RuntimeError(f"segment {self.first}..{self.last} has no WAL file")
        return self.wal_path


@dataclass
class LogSession:
    """One session's log: its token (hashed), its segments, and what failover needs while it is open."""

    session_id: str
    dirname: str
    token_hash: str
    closed: bool = False
    closed_at: float | None = None  # wall-clock seconds; the data-retention clock (`SessionLog.keep_s`) starts here
    epoch: int = 0  # the writer's: raised each time the session is taken over (`SessionLog.recovery`)
    next_index: int = 0
    newest_t: float = -math.inf
    segments: list[Segment] = field(default_factory=list)
    token: str | None = field(default=None, repr=False)  # in clear, while open (None: not kept)
    snapshot_tick: int | None = None  # the newest snapshot's tick
    snapshot: tuple[bytes, dict[str, np.ndarray]] | None = field(default=None, repr=False)  # and its `encode_state`, once read (None: on disk only)

    @property
    def current(self) -> Segment | None:
        seg = self.segments[-1] if self.segments else None
        return seg if seg is not None and seg.writer is not None else None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def dirname_of(session_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", session_id)[:40]
    return f"{safe}-{hashlib.sha256(session_id.encode()).hexdigest()[:16]}"


def to_ipc(batch: pa.RecordBatch | pa.Table) -> pa.Buffer:
    """Rows as one Arrow IPC stream buffer: what the object store holds, and how tables cross actors."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, batch.schema) as writer:
        writer.write(batch)
    return sink.getvalue()


def from_ipc(buf: pa.Buffer) -> pa.Table:
    """A table whose columns point into `buf` (no copy)."""
    return ipc.open_stream(buf).read_all()


def concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    if hasattr(pa, "concat_batches"):  # pyarrow >= 19
        return pa.concat_batches(batches)
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


class LogStore:
    """The files of one log root. One store owns a root: two on the same root would write over each other."""

    def __init__(self, root: str, wal_dir: str | None = None, fsync: bool = False, shared: bool = False):
        self.root = root
        self.shared = bool(shared)
        self.fs, base = pafs.FileSystem.from_uri(root)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.base = base.rstrip("/") + "/sessions"
        # Appending needs a local file: with a remote root the WAL lives on this node's disk.
        self.wal_base = wal_dir or (self.base if self.local else os.path.join(tempfile.gettempdir(), "interplay-wal", hash_token(root)[:16]))
        self.fsync = bool(fsync)
        self.fs.create_dir(self.base, recursive=True)
        os.makedirs(self.wal_base, exist_ok=True)

    # --- writing -----------------------------------------------------------------------------

    def write_meta(self, s: LogSession) -> None:
        folder = f"{self.base}/{s.dirname}"
        self.fs.create_dir(folder, recursive=True)
        meta = {"session_id": s.session_id, "token_sha256": s.token_hash, "closed": s.closed, "epoch": s.epoch}
        if s.closed_at is not None:
            meta["closed_at"] = s.closed_at
        data = json.dumps(meta).encode()
        path = f"{folder}/session.json"
        if self.local:
            with open(path + ".tmp", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def folder(self, s: LogSession) -> str:
        """The session's local folder: its WAL files, and while it is open its token and snapshot."""
        return os.path.join(self.wal_base, s.dirname)

    def write_token(self, s: LogSession, token: str) -> None:
        folder = self.folder(s)
        os.makedirs(folder, exist_ok=True)
        _write_atomic(os.path.join(folder, "token"), lambda f: f.write(token.encode()), fsync=True, mode=0o600)

    def write_snapshot(self, s: LogSession, tick: int, encoded: tuple[bytes, dict[str, np.ndarray]]) -> None:
        """Write `encode_state` output as the session's snapshot of `tick`. Touches no shared state:
        it may run in a thread."""
        meta, arrays = encoded
        folder = self.folder(s)
        os.makedirs(folder, exist_ok=True)
        members = {"__state__": np.frombuffer(meta, np.uint8), **arrays}
        _write_atomic(os.path.join(folder, f"snapshot-{tick:012d}.npz"), lambda f: np.savez(f, **members), fsync=self.fsync)

    def load_snapshot(self, s: LogSession, tick: int) -> tuple[bytes, dict[str, np.ndarray]]:
        """The session's snapshot of `tick` as `encode_state` made it (OSError or ValueError if unreadable)."""
        with np.load(os.path.join(self.folder(s), f"snapshot-{tick:012d}.npz"), allow_pickle=False) as z:
            return bytes(z["__state__"]), {k: z[k] for k in z.files if k != "__state__"}

    def drop_snapshots(self, s: LogSession, below: int | None = None) -> None:
        """Remove the session's snapshots older than tick `below` (None: all of them) and any
        half-written ones."""
        folder = self.folder(s)
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            m = SNAPSHOT_RE.fullmatch(name)
            stale = m is not None and (below is None or int(m[1]) < below)
            if stale or (name.startswith("snapshot-") and ".tmp" in name and below is None):
                remove_file(os.path.join(folder, name))

    def forget(self, s: LogSession) -> None:
        """Drop what only failover needs (token, snapshots): the session is closed."""
        self.drop_snapshots(s)
        remove_file(os.path.join(self.folder(s), "token"))
        s.token = s.snapshot = s.snapshot_tick = None
        if self.folder(s) != f"{self.base}/{s.dirname}":  # a local folder apart from the root's: empty now
            try:
                os.rmdir(self.folder(s))
            except OSError:
                pass

    def new_segment(self, s: LogSession) -> Segment:
        folder = os.path.join(self.wal_base, s.dirname)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"wal-{s.next_index:012d}.arrows")
        file = pa.OSFile(path, "wb")
        sink = pa.BufferedOutputStream(file, 1 << 20)
        writer = ipc.new_stream(sink, SCHEMA)
        sink.flush()
        seg = Segment(s.next_index, s.next_index - 1, wal_path=path, file=file, sink=sink, writer=writer, wal_size=file.tell())
        s.segments.append(seg)
        return seg

    def write(self, s: LogSession, seg: Segment, part: pa.RecordBatch, request_id: str | None) -> None:
        """Append one batch to the segment's WAL file; ProtocolError("log_unavailable") if it fails,
        with the file cut back to its last whole batch."""
        try:
            seg.writer.write_batch(part, custom_metadata={"request_id": request_id} if request_id else None)
            seg.sink.flush()  # one write() per append, not one per buffer
            if self.fsync:
                os.fsync(seg.file.fileno())
        except Exception as exc:
            # Cut the torn batch off so the file stays a readable stream, and start a new file next time.
            self.rotate(seg, truncate=True)
            if seg.rows == 0:
                s.segments.remove(seg)
                os.remove(seg.wal)
            raise ProtocolError(f"could not write session {s.session_id!r} to its log: {exc}", "log_unavailable") from None
        seg.wal_size = seg.file.tell()

    def seal(self, seg: Segment) -> None:
        """Compact the per-append slices into one block: they pin the whole multi-session batch they came in."""
        blocks = seg.memory
        tail = blocks[seg.sealed :]
        if len(tail) > 1:
            blocks[seg.sealed :] = [block_of(concat([b.batch for b in tail]), tail[0].first)]
        for b in blocks[seg.sealed :]:
            self.share(b)
        seg.sealed = len(blocks)
        seg.tail_rows = 0

    def share(self, block: Block) -> None:
        """Put a sealed block into the object store; from then on the block reads the shared copy."""
        if not self.shared or block.ref is not None:
            return
        block.ref = ray.put(to_ipc(block.batch))
        (block.batch,) = from_ipc(ray.get(block.ref)).to_batches()

    def rotate(self, seg: Segment, truncate: bool = False) -> None:
        """Finish the segment's WAL file (its blocks become one sealed object); the session's next
        append starts a new one."""
        self.seal(seg)
        blocks = seg.memory
        if self.shared and len(blocks) > 1:  # a few large objects read faster than many small ones
            seg.blocks = [block_of(concat([b.batch for b in blocks]), blocks[0].first)]
            seg.sealed = 1
            self.share(seg.blocks[0])
        if truncate:
            try:
                seg.file.close()  # unflushed bytes of the torn batch die with the buffer
            finally:
                os.truncate(seg.wal, seg.wal_size)
        else:
            seg.writer.close()
            seg.sink.close()
            seg.wal_size = os.path.getsize(seg.wal)
        seg.writer = seg.sink = seg.file = None

    def persist(self, s: LogSession, seg: Segment) -> None:
        """Write a segment to Parquet, then drop its WAL file and its rows from memory."""
        if seg.writer is not None:
            self.rotate(seg)
        path = f"{self.base}/{s.dirname}/seg-{seg.first:012d}-{seg.last:012d}.parquet"
        table = pa.Table.from_batches([b.batch for b in seg.memory], schema=SCHEMA)
        # Dictionaries only where values repeat: audio and frames never do.
        options = {"filesystem": self.fs, "row_group_size": 256, "use_dictionary": ["session_id", "kind", "text", "payload"]}
        if self.local:  # rename, so a crash never leaves half a segment under the final name
            pq.write_table(table, path + ".tmp", **options)
            self.fs.move(path + ".tmp", path)
        else:
            pq.write_table(table, path, **options)
        seg.parquet_bytes = self.fs.get_file_info(path).size
        seg.parquet_path = path
        seq_max = pc.max(table.column("seq")).as_py()  # pyright: ignore[reportAttributeAccessIssue] (pyarrow makes pc.max at import time; pyright cannot see it)
        seg.seq_max = -1 if seq_max is None else seq_max
        seg.blocks = None
        seg.sealed = 0
        if seg.wal_path is not None and os.path.exists(seg.wal_path):
            os.remove(seg.wal_path)
        seg.wal_path, seg.wal_size = None, 0

    # --- reading and deleting ----------------------------------------------------------------

    def load(self, path: str, filters: list, columns: list[str] | None = None) -> list[pa.RecordBatch]:
        """The rows of one Parquet segment that pass `filters`, only `columns` (None: all), in
        SCHEMA's types. Reads no shared state: it may run in a thread."""
        names = SCHEMA.names if columns is None else columns
        table = pq.read_table(path, filesystem=self.fs, filters=filters, columns=names)
        return table.select(names).cast(pa.schema([SCHEMA.field(n) for n in names])).to_batches()

    def delete(self, dirname: str) -> None:
        """Remove a session from storage: its Parquet files and local folder (WAL, token,
        snapshots) first and session.json last, so an interrupted delete leaves a folder that
        `log_restore.restore` still lists as closed and deletes again. Reads no shared state: it may run in a thread."""
        folder = f"{self.base}/{dirname}"
        infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        for info in infos:
            if info.base_name == "session.json":
                continue
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(info.path)
            else:
                self.fs.delete_file(info.path)
        local = os.path.join(self.wal_base, dirname)
        if os.path.isdir(local) and (not self.local or local != folder):
            shutil.rmtree(local)
        if self.fs.get_file_info(folder).type != pafs.FileType.NotFound:
            try:
                self.fs.delete_file(f"{folder}/session.json")
            except FileNotFoundError:
                pass
            self.fs.delete_dir(folder)


def _write_atomic(path: str, write, fsync: bool, mode: int = 0o644) -> None:
    """`write(file)` into a temporary file beside `path`, then rename it over `path`."""
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_file(tmp)
        raise


def remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
