"""SessionLog benchmark: appends per second with real 200 ms audio, a background task's context read latency, memory after an hour.

`python -m bench.session_log` prints a table and writes bench/results/session_log.json. Every chunk
carries 3,200 int16 samples of noise (6,400 bytes), as the InteractionActor's per-tick calls do.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import tempfile
import time

import numpy as np

from actors.background.context import read as context_read
from actors.log.log_actor import SessionLogActor
from actors.log.session_log import SessionLog
from actors.remote import call_remote
from bench.common import actor, percentiles, print_table, write_json
from protocols import BackgroundTask, InputChunk, OutputChunk, TickClock, to_batch

CLOCK = TickClock(0.0)  # the default 200 ms tick
SAMPLES, TICK_S = CLOCK.samples(), CLOCK.tick_s


class Progress:
    """A line every few seconds, so a long phase shows it is moving."""

    def __init__(self, label: str, total: int, every_s: float = 3.0):
        self.label, self.total, self.every_s = label, total, every_s
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            print(f"  {self.label}: {done:,}/{self.total:,} ({now - self.t0:.0f} s)", flush=True)


def noise_pool(n: int = 256, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(-32768, 32767, SAMPLES, dtype=np.int16) for _ in range(n)]


def tick_deltas(sessions: list[str], k: int, pool: list[np.ndarray]) -> list:
    """One tick of every session: its input chunk and the model's output chunk."""
    t = k * TICK_S
    out = []
    for j, sid in enumerate(sessions):
        out.append(InputChunk(sid, k, t, pool[(k * 7 + j) % len(pool)]))
        out.append(OutputChunk(sid, k, t, pool[(k * 7 + j + 3) % len(pool)], controls=["speak"], step_ms=20.0))
    return out


def bench_in_process(root: str, sessions: int, calls: int, pool) -> list[dict]:
    rows = []
    for mode in ("deltas", "batch"):
        log = SessionLog(os.path.join(root, f"inproc-{mode}"))
        sids = [f"{mode}-{i}" for i in range(sessions)]
        for sid in sids:
            log.open(sid)
        payloads = [tick_deltas(sids, k, pool) for k in range(calls)]
        if mode == "batch":
            payloads = [to_batch(p) for p in payloads]
        progress = Progress(f"in-process {mode}", calls)
        lat = []
        t0 = time.perf_counter()
        for i, p in enumerate(payloads):
            t = time.perf_counter()
            log.append(p)
            lat.append((time.perf_counter() - t) * 1000)
            progress(i + 1)
        dt = time.perf_counter() - t0
        pc = percentiles(lat)
        rows.append({"path": f"plain class, {mode}", "in flight": 1, "deltas/call": 2 * sessions, "deltas/s": calls * 2 * sessions / dt, "call p50 ms": pc["p50"], "call p99 ms": pc["p99"], "calls": calls})
    return rows


def bench_actor_appends(ray, root: str, sessions: int, calls: int, pool) -> list[dict]:
    handle = actor(SessionLogActor.remote(os.path.join(root, "actor-appends")))
    rows = []
    for mode, inflight in (("deltas", 1), ("deltas", 8), ("batch", 8)):
        sids = [f"{mode}{inflight}-{i}" for i in range(sessions)]
        ray.get([handle.open.remote(sid) for sid in sids])
        payloads = [tick_deltas(sids, k, pool) for k in range(calls)]
        if mode == "batch":  # built by the caller, as an InteractionActor could on its own core
            payloads = [to_batch(p) for p in payloads]
        ray.get(handle.append.remote(payloads[0]))
        progress = Progress(f"actor {mode}, {inflight} in flight", calls)
        lat, pending = [], []
        t0 = time.perf_counter()
        for i, p in enumerate(payloads[1:], 1):
            pending.append((time.perf_counter(), handle.append.remote(p)))
            if len(pending) >= inflight:
                t, ref = pending.pop(0)
                ray.get(ref)
                lat.append((time.perf_counter() - t) * 1000)
            progress(i)
        for t, ref in pending:
            ray.get(ref)
            lat.append((time.perf_counter() - t) * 1000)
        dt = time.perf_counter() - t0
        pc = percentiles(lat)
        rows.append({"path": f"Ray actor, {mode}", "in flight": inflight, "deltas/call": 2 * sessions, "deltas/s": (calls - 1) * 2 * sessions / dt, "call p50 ms": pc["p50"], "call p99 ms": pc["p99"], "calls": calls - 1})
    ray.kill(handle, no_restart=True)
    return rows


def bench_reads(ray, root: str, reads: int, pool) -> list[dict]:
    """The read a background task makes for its context (`actors.background.context.read`: the
    rows up to the task's index by reference, then the user's audio), through the actor as the
    pool calls it and on the plain class; and a plain `read` of the last 20 rows."""
    handle = actor(SessionLogActor.remote(os.path.join(root, "actor-reads")))
    sid = "reader"
    token = ray.get(handle.open.remote(sid))
    for k in range(0, 450, 50):  # 90 s of history
        ray.get(handle.append.remote([d for kk in range(k, k + 50) for d in tick_deltas([sid], kk, pool)]))
    task = BackgroundTask(sid, 450 * TICK_S, "delegate", "bench", context_upto=899, log_token=token, task_id="bench")
    rows = [
        timed_reads("Ray actor, context read(300 s)", reads, lambda: context_read(task, handle)),
        timed_reads("Ray actor, read(last 20 rows)", reads, lambda: call_remote(handle.read, sid, token, 880)),
    ]
    ray.kill(handle, no_restart=True)
    # The same read on the plain class: what the actor adds is Ray's transport.
    log = SessionLog(os.path.join(root, "actor-reads"))
    rows.append(timed_reads("plain class, context read(300 s)", reads, lambda: context_read(task, log)))
    return rows


def timed_reads(what: str, reads: int, read) -> dict:
    """Latency of `await read()` (a table, or a tuple of tables) on one event loop, after five warm-up reads."""

    async def run() -> tuple[list[float], list]:
        for _ in range(5):
            await read()
        progress = Progress(what, reads)
        lat, got = [], []
        for i in range(reads):
            t = time.perf_counter()
            got = await read()
            lat.append((time.perf_counter() - t) * 1000)
            progress(i + 1)
        return lat, list(got) if isinstance(got, tuple) else [got]

    lat, tables = asyncio.run(run())
    pc = percentiles(lat)
    return {"read": what, "rows": sum(t.num_rows for t in tables), "MB": sum(t.nbytes for t in tables) / 1e6, "p50 ms": pc["p50"], "p99 ms": pc["p99"], "mean ms": pc["mean"], "n": pc["n"]}


def dir_bytes(path: str, suffix: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files if f.endswith(suffix))


def unique_ticks(sid: str, start: int, n: int, rng: np.random.Generator) -> list:
    """Ticks whose audio is all fresh noise, so Parquet sizes are honest (the shared pool would dedupe)."""
    audio = rng.integers(-32768, 32767, (n, 2, SAMPLES), dtype=np.int16)
    out = []
    for i, k in enumerate(range(start, start + n)):
        out.append(InputChunk(sid, k, k * TICK_S, audio[i, 0]))
        out.append(OutputChunk(sid, k, k * TICK_S, audio[i, 1], controls=["speak"], step_ms=20.0))
    return out


def bench_hour(ray, root: str, ticks: int, per_call: int) -> dict:
    path = os.path.join(root, "actor-hour")
    handle = actor(SessionLogActor.remote(os.path.abspath(path)))
    sid = "hour"
    ray.get(handle.open.remote(sid))
    before = ray.get(handle.stats.remote())
    progress = Progress("simulated hour (ticks)", ticks)
    rng = np.random.default_rng(1)
    rss_trace = {}  # RSS as the hour goes by: flat means bounded
    t0 = time.perf_counter()
    pending = []
    for k in range(0, ticks, per_call):
        pending.append(handle.append.remote(unique_ticks(sid, k, min(per_call, ticks - k), rng)))
        if len(pending) >= 2:
            ray.get(pending.pop(0))
        done = min(k + per_call, ticks)
        progress(done)
        if done * 4 // ticks != k * 4 // ticks:
            ray.get(pending)
            pending = []
            st = ray.get(handle.stats.remote())
            rss_trace[f"rss_MB_at_{done * TICK_S / 60:.0f}_min"] = st["rss_bytes"] / 1e6
            rss_trace[f"rss_private_MB_at_{done * TICK_S / 60:.0f}_min"] = st["rss_private_bytes"] / 1e6
    ray.get(pending)
    dt = time.perf_counter() - t0
    after = ray.get(handle.stats.remote())
    ray.get(handle.close.remote(sid))
    closed = ray.get(handle.stats.remote())
    ray.kill(handle, no_restart=True)
    mb = 1e6
    return {
        "ticks": ticks,
        "deltas": 2 * ticks,
        "audio_MB": 2 * ticks * SAMPLES * 2 / mb,
        "append_s": dt,
        "deltas_per_s": 2 * ticks / dt,
        "rss_MB_before": before["rss_bytes"] / mb,
        "rss_private_MB_before": before["rss_private_bytes"] / mb,
        **rss_trace,
        "rss_MB_after": after["rss_bytes"] / mb,
        "rss_private_MB_after": after["rss_private_bytes"] / mb,
        "memory_rows_after": after["memory_rows"],
        "memory_MB_before": before["memory_bytes"] / mb,
        "memory_MB_after": after["memory_bytes"] / mb,
        "arrow_pool_MB_after": after["arrow_pool_bytes"] / mb,
        "wal_MB_after": after["wal_bytes"] / mb,
        "parquet_MB_after": after["parquet_bytes"] / mb,
        "parquet_files_after": after["parquet_files"],
        "parquet_MB_on_disk_after_close": dir_bytes(path, ".parquet") / mb,
        "memory_MB_after_close": closed["memory_bytes"] / mb,
        "rss_MB_after_close": closed["rss_bytes"] / mb,
        "rss_private_MB_after_close": closed["rss_private_bytes"] / mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=8, help="sessions per tick call (each sends input + output)")
    parser.add_argument("--calls", type=int, default=1000, help="calls per append run")
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--hour-ticks", type=int, default=18_000)
    parser.add_argument("--root", default=None, help="where the logs go (default: a temporary directory, removed after)")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    root = args.root or tempfile.mkdtemp(prefix="interplay-bench-log-")
    pool = noise_pool()
    try:
        print(f"== appends: {args.sessions} sessions x (input + output) per call, 6,400-byte audio each", flush=True)
        appends = bench_in_process(root, args.sessions, args.calls, pool)
        appends += bench_actor_appends(ray, root, args.sessions, args.calls, pool)
        print(f"== reads: {args.reads} reads of a session with 90 s of history", flush=True)
        reads = bench_reads(ray, root, args.reads, pool)
        print(f"== memory: one session, {args.hour_ticks:,} ticks of input + output (default retention)", flush=True)
        hour = bench_hour(ray, root, args.hour_ticks, 100)
    finally:
        ray.shutdown()
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print_table(appends, ["path", "in flight", "deltas/call", "deltas/s", "call p50 ms", "call p99 ms", "calls"])
    print()
    print_table(reads, ["read", "rows", "MB", "p50 ms", "p99 ms", "mean ms", "n"])
    print()
    print_table([{"memory after a simulated hour": k, "value": v} for k, v in hour.items()], ["memory after a simulated hour", "value"])
    load = os.getloadavg()
    path = write_json("session_log", {"cpus": os.cpu_count(), "loadavg": load, "appends": appends, "reads": reads, "hour": hour})
    print(f"\nload average {load[0]:.1f} on {os.cpu_count()} cores; wrote {path}")


if __name__ == "__main__":
    main()
